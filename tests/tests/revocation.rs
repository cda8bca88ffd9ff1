//! Complete revocation: after a delete nothing of the helper remains in the
//! router's kernel state, and the revoked connections stay dead.

use std::time::Duration;

use enforcer_tests::{
    Daemon, Family, Topology,
    peers::{FtpClient, FtpRouter, FtpServer, TftpServer, tftp_get},
};

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn delete_leaves_no_trace_and_spares_other_rules_and_routers() {
    let a = Topology::new();
    let b = Topology::new();
    let daemon = Daemon::start();
    daemon.add_router(&a.router_id);
    daemon.add_router(&b.router_id);
    let ftp_a = daemon.create_helper(&a.router_id, "tcp", 21, "ftp");
    daemon.create_helper(&a.router_id, "udp", 69, "tftp");
    daemon.create_helper(&b.router_id, "tcp", 21, "ftp");
    let _fa = FtpServer::start(&a, Family::V4);
    let _ta = TftpServer::start(&a, Family::V4);
    let _fb = FtpServer::start(&b, Family::V4);

    // Router A: a finished data connection, an open expectation (PASV not
    // yet used), and a TFTP flow of the other rule. Router B: its own ftp.
    let mut old = FtpClient::login(&a, Family::V4);
    old.ok("list passive");
    old.ok("pasv");
    assert!(tftp_get(&a, Family::V4));
    let mut on_b = FtpClient::login(&b, Family::V4);
    on_b.ok("list passive");
    on_b.ok("pasv");
    assert_eq!(count(&a.conntrack(&["-L", "expect"]), "ftp"), 1, "the pending expectation:\n{}", a.conntrack(&["-L", "expect"]));
    let b_before = b.conntrack(&["-L"]);

    let report = daemon.cli(&["helper", "delete", &a.router_id, &ftp_a, "-o", "json"]).ok().json();
    assert!(report["conntrack_entries_removed"].as_u64().unwrap() >= 2, "control + data entries: {report}");
    assert_eq!(report["slot_released"], true, "{report}");
    assert!(report.get("flush_error").is_none(), "{report}");

    let ct = a.conntrack(&["-L"]);
    assert_eq!(count(&ct, "helper=ftp"), 0, "no entry with the ftp helper left:\n{ct}");
    let ftp_mark = format!("mark={}", 0x1000_1000u32); // helper ftp, slot 1
    assert_eq!(count(&ct, &ftp_mark), 0, "no entry carries the revoked slot:\n{ct}");
    let expect = a.conntrack(&["-L", "expect"]);
    assert_eq!(count(&expect, "ftp"), 0, "the expectation is gone:\n{expect}");
    assert_eq!(count(&ct, "helper=tftp"), 1, "the other rule's entry is untouched:\n{ct}");
    let b_after = b.conntrack(&["-L"]);
    assert_eq!(count(&b_after, "helper=ftp"), count(&b_before, "helper=ftp"), "router B untouched:\n{b_after}");
    assert_eq!(count(&b.conntrack(&["-L", "expect"]), "ftp"), 1, "router B's expectation untouched");
    on_b.ok("noop");

    old.fails("noop");
    let mut fresh = FtpClient::login(&a, Family::V4);
    fresh.ok("noop");
    fresh.fails("list passive");
    assert_eq!(count(&a.conntrack(&["-L"]), "helper=ftp"), 0, "a new control connection gets no helper");
}

/// With a router that forwards everything, only the datapath can keep a
/// revoked connection dead once its conntrack entry is gone (conntrack picks
/// the connection up again mid-stream, unmarked).
#[test]
fn revoked_connection_stays_dead_a_minute_later() {
    let FtpRouter { topo, daemon, helper_id: id, server: _server } = FtpRouter::new(Topology::without_firewall(), Family::V4);
    let mut old = FtpClient::login(&topo, Family::V4);
    old.ok("list passive");

    let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
    assert!(report["flows_kept_dead"].as_u64().unwrap() >= 2, "{report}");
    old.fails("noop");
    std::thread::sleep(Duration::from_secs(60));
    old.fails("noop");
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert!(status["revoked_flows"].as_u64().unwrap() >= 2, "{status}");
    let dump = daemon.dump();
    assert!(dump["slots"].as_array().unwrap().iter().all(|s| s["state"] != "live"), "{dump}");

    // A new connection passes (this router has no firewall) with no helper.
    let mut fresh = FtpClient::login(&topo, Family::V4);
    fresh.ok("noop");
    let ct = topo.conntrack(&["-L"]);
    assert_eq!(count(&ct, "helper=ftp"), 0, "{ct}");
}
