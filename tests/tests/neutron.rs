//! enforcer inside a real Neutron router: the L3 agent's rules, installed
//! by Neutron's own code, mark every packet (address scope in the upper
//! half, metadata and external-ingress marks in the lower half), NAT the
//! client behind its floating IP, and filter by scope.

use enforcer_tests::{
    Daemon, Family, Topology,
    neutron::{DEFAULT_SCOPE_MARK, FLOATING_V4, GATEWAY_V4, NeutronRouter},
    peers::{FtpClient, FtpServer},
};

/// The conntrack line of the FTP control connection from `src` that has
/// the ftp helper.
fn control_entry(topo: &Topology, src: &str) -> String {
    let table = topo.conntrack(&["-L", "-p", "tcp"]);
    table
        .lines()
        .find(|l| l.contains(&format!("src={src} ")) && l.contains("dport=21 ") && l.contains("helper=ftp"))
        .unwrap_or_else(|| panic!("no control connection from {src} with the ftp helper:\n{table}"))
        .to_string()
}

#[test]
fn unrelated_traffic_passes_and_ftp_works_through_nat_in_both_families() {
    let n = NeutronRouter::new(true, (None, None));
    let topo = &n.topo;
    let daemon = Daemon::start();
    let _v4 = FtpServer::start(topo, Family::V4);
    let _v6 = FtpServer::start(topo, Family::V6);
    // A plain TCP connection (FTP control, no helper configured) must keep
    // working once the router is added.
    daemon.add_router(&topo.router_id);
    let mut plain = FtpClient::login(topo, Family::V4);
    plain.ok("noop");
    plain.fails("list passive");

    let helper = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    for family in [Family::V4, Family::V6] {
        let mut ftp = FtpClient::login(topo, family);
        ftp.ok("list passive");
        // Active through the floating IP's SNAT: nf_nat_ftp rewrites PORT.
        ftp.ok("list active");
        ftp.ok("noop");
    }
    // Both marks live side by side in the connection: Neutron's scope in
    // the upper half (saved on the gateway, IPv4 only), enforcer's slot in
    // the lower.
    let table = topo.conntrack(&["-L"]);
    let control = table
        .lines()
        .find(|l| l.contains("src=10.200.1.2") && l.contains("dport=21") && l.contains("helper=ftp"))
        .unwrap_or_else(|| panic!("{table}"));
    let mark: u32 = control.split("mark=").nth(1).and_then(|m| m.split_whitespace().next()?.parse().ok()).unwrap();
    assert_eq!(mark & 0xffff_0000, DEFAULT_SCOPE_MARK, "Neutron's scope kept: {control}");
    assert_ne!(mark & 0xffff, 0, "enforcer's slot kept: {control}");
    assert!(table.contains("src=10.200.1.2") && table.contains("dst=10.200.2.50"), "the client went out through its floating IP:\n{table}");

    // Revocation cuts the helper's connections, Neutron rules or not.
    let mut open = FtpClient::login(topo, Family::V4);
    open.ok("list passive");
    daemon.cli(&["helper", "delete", &topo.router_id, &helper]).ok();
    open.fails("noop");
    assert!(!topo.conntrack(&["-L"]).contains("helper=ftp"), "conntrack clean after the delete");
    // And the plain connection from before is still fine.
    plain.ok("noop");
}

#[test]
fn neutron_reapplying_its_rules_mid_session_changes_nothing() {
    let n = NeutronRouter::new(true, (None, None));
    let topo = &n.topo;
    let daemon = Daemon::start();
    let _server = FtpServer::start(topo, Family::V4);
    daemon.add_router(&topo.router_id);
    let helper = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let mut ftp = FtpClient::login(topo, Family::V4);
    ftp.ok("list passive");
    let glue = topo.router.sh("nft", &["list", "table", "inet", "enforcer"]);
    // The agent's resync: a full iptables-save/restore of its tables.
    n.apply();
    ftp.ok("list passive");
    ftp.ok("list active");
    assert_eq!(topo.router.sh("nft", &["list", "table", "inet", "enforcer"]), glue, "enforcer's table untouched");
    daemon.cli(&["helper", "delete", &topo.router_id, &helper]).ok();
    ftp.fails("noop");
    n.apply();
    let mut again = FtpClient::login(topo, Family::V4);
    again.fails("list passive");
}

#[test]
fn neutron_address_scope_isolation_still_drops() {
    // Client and gateway in different address scopes, no firewall of the
    // test bed: only Neutron's scope filter stands between them.
    let n = NeutronRouter::new(false, (Some("scope-a"), Some("scope-b")));
    let topo = &n.topo;
    let daemon = Daemon::start();
    let _server = FtpServer::start(topo, Family::V4);
    let into_client = || {
        // A connection from the gateway side to the client's fixed address
        // crosses scopes: Neutron drops it.
        let out = topo
            .server
            .cmd("python3")
            .args(["-c", "import socket; socket.create_connection(('10.200.1.2', 22), timeout=1)"])
            .output()
            .unwrap();
        out.status.success()
    };
    let before = n.scope_drops();
    assert!(!into_client());
    let dropped = n.scope_drops() - before;
    assert!(dropped > 0, "Neutron's scope filter dropped the crossing");

    daemon.add_router(&topo.router_id);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    daemon.create_helper(&topo.router_id, "tcp", 22, "ftp");
    let before = n.scope_drops();
    assert!(!into_client());
    assert!(n.scope_drops() > before, "still dropped by Neutron's scope filter with enforcer in place");
    // Within the client's own connections, everything works.
    let mut ftp = FtpClient::login(topo, Family::V4);
    ftp.ok("list passive");
}

#[test]
fn ftp_into_the_floating_ip_works_with_the_helper_and_is_revoked() {
    // The FTP server is the instance behind the floating IP; the client is
    // outside and knows only the floating IP (DNAT on the way in).
    let n = NeutronRouter::new(true, (None, None));
    n.open_inbound_ftp();
    let topo = &n.topo;
    let daemon = Daemon::start();
    let _server = FtpServer::start_in(&topo.client, Topology::CLIENT_V4);
    daemon.add_router(&topo.router_id);
    let mut plain = FtpClient::login_from(&topo.server, FLOATING_V4);
    plain.ok("noop");
    // No helper: the server's 227 names its fixed address, which the client
    // cannot reach, and its active data connection is not RELATED. (A
    // failed transfer spoils its control connection: one client each.)
    FtpClient::login_from(&topo.server, FLOATING_V4).fails("list passive");
    FtpClient::login_from(&topo.server, FLOATING_V4).fails("list active");

    let helper = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let mut ftp = FtpClient::login_from(&topo.server, FLOATING_V4);
    // nf_nat_ftp rewrites the 227 reply to the floating IP.
    ftp.ok("list passive");
    // The server's data connection goes out through the floating IP's SNAT.
    ftp.ok("list active");
    let control = control_entry(topo, Topology::SERVER_V4);
    assert!(control.contains(&format!("dst={FLOATING_V4} ")), "{control}");
    assert!(control.contains(&format!("src={} ", Topology::CLIENT_V4)), "DNAT to the fixed address: {control}");

    daemon.cli(&["helper", "delete", &topo.router_id, &helper]).ok();
    ftp.fails("noop");
    assert!(!topo.conntrack(&["-L"]).contains("helper=ftp"), "conntrack clean after the delete");
    plain.ok("noop");
}

#[test]
fn ftp_through_the_gateway_snat_without_a_floating_ip() {
    let n = NeutronRouter::snat_only();
    let topo = &n.topo;
    let daemon = Daemon::start();
    let _server = FtpServer::start(topo, Family::V4);
    daemon.add_router(&topo.router_id);
    let mut plain = FtpClient::login(topo, Family::V4);
    plain.ok("noop");
    // No helper: PORT names the client's fixed address, behind the SNAT.
    plain.fails("list active");

    let helper = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let mut ftp = FtpClient::login(topo, Family::V4);
    ftp.ok("list passive");
    // nf_nat_ftp rewrites PORT to the gateway's address.
    ftp.ok("list active");
    let control = control_entry(topo, Topology::CLIENT_V4);
    assert!(control.contains(&format!("dst={GATEWAY_V4} ")), "SNAT to the gateway: {control}");

    daemon.cli(&["helper", "delete", &topo.router_id, &helper]).ok();
    ftp.fails("noop");
    assert!(!topo.conntrack(&["-L"]).contains("helper=ftp"), "conntrack clean after the delete");
    plain.ok("noop");
}
