//! TFTP through a router: the server answers from a new port, which the
//! router's policy admits only as RELATED, i.e. only if the tftp helper
//! expected it (real tftpd-hpa and tftp-hpa).

use enforcer_tests::{Daemon, Family, Topology, peers::{TftpServer, tftp_get}};

fn tftp(family: Family) {
    let topo = Topology::new();
    let daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let _server = TftpServer::start(&topo, family);

    assert!(!tftp_get(&topo, family), "without a helper the reply from a new port is blocked");

    let id = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(&topo, family), "with the helper the transfer completes");
    let ct = topo.conntrack(&["-L", "-p", "udp"]);
    assert!(ct.contains("helper=tftp"), "{ct}");

    daemon.delete_helper(&topo.router_id, &id);
    assert!(!tftp_get(&topo, family), "after delete the transfer is blocked again");
}

#[test]
fn tftp_ipv4() {
    tftp(Family::V4);
}

#[test]
fn tftp_ipv6() {
    tftp(Family::V6);
}
