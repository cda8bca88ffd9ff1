//! FTP through a router with a stateful forward policy, real peers
//! (pyftpdlib, ftplib), real programs and glue.

use enforcer_tests::{
    Daemon, Family, Topology,
    peers::{BIG_FILE, FtpClient, FtpRouter, FtpServer, SMALL_FILE},
};

fn lines_with<'a>(text: &'a str, needle: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.contains(needle)).collect()
}

/// With the helper: passive and active data connections pass as RELATED,
/// conntrack shows the helper on the control connection and the rule's
/// mark on the data connections.
fn ftp_works_with_helper(family: Family) {
    let FtpRouter { topo, daemon, server: _server, .. } = FtpRouter::new(Topology::new(), family);

    let mut ftp = FtpClient::login(&topo, family);
    let listing = ftp.ok("list passive");
    assert!(listing["lines"].to_string().contains("small.bin"), "{listing}");
    ftp.ok("list active");
    assert_eq!(ftp.ok("retr small.bin passive")["bytes"], SMALL_FILE);
    assert_eq!(ftp.ok("retr small.bin active")["bytes"], SMALL_FILE);

    let family_arg = if family == Family::V6 { "ipv6" } else { "ipv4" };
    let ct = topo.conntrack(&["-L", "-f", family_arg]);
    let control = lines_with(&ct, "dport=21 ");
    assert!(control.iter().any(|l| l.contains("helper=ftp")), "control connection has the helper:\n{ct}");
    // Data connections: every entry not on port 21 carries the control
    // connection's (non-zero) mark, inherited as RELATED.
    let control_mark = control.iter().find(|l| l.contains("helper=ftp")).and_then(|l| l.split_whitespace().find(|w| w.starts_with("mark="))).unwrap();
    assert_ne!(control_mark, "mark=0");
    let data: Vec<_> = ct.lines().filter(|l| l.starts_with("tcp") && !l.contains("port=21 ")).collect();
    assert!(data.len() >= 4, "four data connections seen:\n{ct}");
    assert!(data.iter().all(|l| l.contains(control_mark)), "data connections carry {control_mark}:\n{ct}");
    let dump = daemon.dump();
    assert!(dump["slots"][0]["tagged"].as_u64().unwrap() > 0, "{dump}");
}

#[test]
fn ftp_with_helper_ipv4() {
    ftp_works_with_helper(Family::V4);
}

#[test]
fn ftp_with_helper_ipv6() {
    ftp_works_with_helper(Family::V6);
}

/// Without a helper the router's policy blocks the data connections: this
/// proves the tests above can fail.
fn ftp_blocked_without_helper(family: Family) {
    let topo = Topology::new();
    let _daemon = Daemon::enforcing(&topo);
    let _server = FtpServer::start(&topo, family);
    let mut ftp = FtpClient::login(&topo, family);
    ftp.ok("noop");
    ftp.fails("list passive");
    let mut ftp = FtpClient::login(&topo, family);
    ftp.fails("list active");
    let ct = topo.conntrack(&["-L"]);
    assert!(!ct.contains("helper="), "no helper without a rule:\n{ct}");
}

#[test]
fn ftp_blocked_without_helper_ipv4() {
    ftp_blocked_without_helper(Family::V4);
}

#[test]
fn ftp_blocked_without_helper_ipv6() {
    ftp_blocked_without_helper(Family::V6);
}

/// `helper delete` cuts the control connection and a transfer in progress,
/// and a new control connection gets no helper.
fn delete_revokes(family: Family) {
    let FtpRouter { topo, daemon, helper_id: id, server: _server } = FtpRouter::new(Topology::new(), family);

    let mut ftp = FtpClient::login(&topo, family);
    ftp.ok("list passive");
    let mut transfer = FtpClient::login(&topo, family);
    let started = transfer.ok("retr_start big.bin passive");
    assert!(started["bytes"].as_u64().unwrap() > 0, "transfer running: {started}");

    daemon.delete_helper(&topo.router_id, &id);

    let cut = transfer.cmd("retr_wait");
    assert_eq!(cut["ok"], false, "transfer in progress is cut: {cut}");
    assert!(cut["bytes"].as_u64().unwrap() < BIG_FILE, "{cut}");
    ftp.fails("noop");

    let mut fresh = FtpClient::login(&topo, family);
    fresh.ok("noop");
    fresh.fails("list passive");
    let ct = topo.conntrack(&["-L"]);
    assert!(
        ct.lines().any(|l| l.contains("dport=21 ") && l.contains("ESTABLISHED") && !l.contains("helper=")),
        "the new control connection has no helper:\n{ct}"
    );
    let dump = daemon.dump();
    let slot = &dump["slots"][0];
    assert_eq!(slot["state"], "revoked", "{dump}");
    assert!(slot["dropped"].as_u64().unwrap() > 0, "revoked packets were dropped: {dump}");
}

#[test]
fn delete_revokes_ipv4() {
    delete_revokes(Family::V4);
}

#[test]
fn delete_revokes_ipv6() {
    delete_revokes(Family::V6);
}

/// Moving a helper to another port revokes the flows of the old tuple.
#[test]
fn update_revokes_old_tuple() {
    let FtpRouter { topo, daemon, helper_id: id, server: _server } = FtpRouter::new(Topology::new(), Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("list passive");
    let updated = daemon.cli(&["helper", "update", &topo.router_id, &id, "--port", "2121", "-o", "json"]).ok().json();
    assert_eq!(updated["port"], 2121);
    assert_eq!(updated["id"], id.as_str());
    ftp.fails("noop");
    let mut fresh = FtpClient::login(&topo, Family::V4);
    fresh.fails("list passive");
}

/// Two routers, same port: a helper on one does not affect the other.
#[test]
fn routers_are_isolated() {
    let a = Topology::new();
    let b = Topology::new();
    let daemon = Daemon::start();
    daemon.add_router(&a.router_id);
    daemon.add_router(&b.router_id);
    daemon.create_helper(&a.router_id, "tcp", 21, "ftp");
    let _sa = FtpServer::start(&a, Family::V4);
    let _sb = FtpServer::start(&b, Family::V4);

    FtpClient::login(&a, Family::V4).ok("list passive");
    FtpClient::login(&b, Family::V4).fails("list passive");
    assert!(!b.conntrack(&["-L"]).contains("helper="));

    // The same tuple on router B is a different rule with its own slot.
    let id_b = daemon.create_helper(&b.router_id, "tcp", 21, "ftp");
    FtpClient::login(&b, Family::V4).ok("list passive");
    let mut on_a = FtpClient::login(&a, Family::V4);
    daemon.delete_helper(&b.router_id, &id_b);
    on_a.ok("list passive");
    on_a.ok("noop");
}
