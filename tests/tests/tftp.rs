//! TFTP through a router: the server answers from a new port, which the
//! router's policy admits only as RELATED, i.e. only if the tftp helper
//! expected it (real tftpd-hpa and tftp-hpa). Also inside a Neutron router,
//! where the client leaves through its floating IP (nf_nat_tftp).

use enforcer_tests::{
    Daemon, Family, Topology,
    neutron::NeutronRouter,
    peers::{TftpServer, tftp_get},
};

fn tftp(topo: &Topology, family: Family) {
    let daemon = Daemon::enforcing(topo);
    let _server = TftpServer::start(topo, family);

    assert!(!tftp_get(topo, family), "without a helper the reply from a new port is blocked");

    let id = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(topo, family), "with the helper the transfer completes");
    let ct = topo.conntrack(&["-L", "-p", "udp"]);
    assert!(ct.contains("helper=tftp"), "{ct}");

    daemon.delete_helper(&topo.router_id, &id);
    assert!(!tftp_get(topo, family), "after delete the transfer is blocked again");
}

#[test]
fn tftp_ipv4() {
    tftp(&Topology::new(), Family::V4);
}

#[test]
fn tftp_ipv6() {
    tftp(&Topology::new(), Family::V6);
}

#[test]
fn tftp_ipv4_in_a_neutron_router() {
    let router = NeutronRouter::new(true, (None, None));
    tftp(&router.topo, Family::V4);
}

#[test]
fn tftp_ipv6_in_a_neutron_router() {
    let router = NeutronRouter::new(true, (None, None));
    tftp(&router.topo, Family::V6);
}
