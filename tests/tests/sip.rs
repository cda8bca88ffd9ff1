//! SIP through a router with real peers (sipp's built-in UAS and UAC): the
//! sip helper reads the INVITE's SDP and opens an expectation for the media;
//! revoking the helper removes it.

use std::{
    process::Stdio,
    time::Duration,
};

use enforcer_tests::{
    Daemon, Process, Topology,
    neutron::{FLOATING_V4, NeutronRouter},
    wait_for,
};

/// One call from a fresh local port (a new conntrack entry: a helper is
/// assigned only when an entry is created).
fn sipp_call(topo: &Topology, local_port: u16, pause_ms: u32) -> Process {
    sipp_call_within(topo, local_port, pause_ms, 12)
}

/// A call that gives up after `timeout_s`.
fn sipp_call_within(topo: &Topology, local_port: u16, pause_ms: u32, timeout_s: u32) -> Process {
    Process::spawn(
        "sipp uac",
        topo.client
            .cmd("sipp")
            .args(["-sn", "uac", &format!("{}:5060", Topology::SERVER_V4), "-i", Topology::CLIENT_V4, "-p", &local_port.to_string()])
            .args(["-m", "1", "-d", &pause_ms.to_string(), "-timeout", &timeout_s.to_string(), "-nostdin"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

fn uas(topo: &Topology) -> Process {
    Process::spawn(
        "sipp uas",
        topo.server
            .cmd("sipp")
            .args(["-sn", "uas", "-i", Topology::SERVER_V4, "-p", "5060", "-nostdin"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

#[test]
fn sip_helper_opens_media_expectations_and_revocation_removes_them() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let _uas = uas(&topo);
    std::thread::sleep(Duration::from_millis(500));

    // Without a helper the call itself works (udp/5060 is allowed) but no
    // media expectation is opened.
    let mut call = sipp_call(&topo, 5061, 2000);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!topo.conntrack(&["-L", "expect"]).contains("sip"), "no helper, no expectation");
    assert!(call.child.wait().unwrap().success(), "a call without the helper completes");

    let id = daemon.create_helper(&topo.router_id, "udp", 5060, "sip");
    let mut call = sipp_call(&topo, 5062, 4000);
    wait_for("the sip helper's media expectation", 3, || topo.conntrack(&["-L", "expect"]).contains("sip"));
    let ct = topo.conntrack(&["-L", "-p", "udp"]);
    assert!(ct.contains("helper=sip"), "{ct}");

    let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
    assert!(report["conntrack_entries_removed"].as_u64().unwrap() >= 1, "{report}");
    let expect = topo.conntrack(&["-L", "expect"]);
    assert!(!expect.contains("sip"), "expectations gone with the revocation:\n{expect}");
    assert!(!topo.conntrack(&["-L"]).contains("helper=sip"));
    // The revoked dialog cannot finish: its BYE is dropped.
    assert!(!call.child.wait().unwrap().success(), "the revoked call does not complete");
}

#[test]
fn sip_through_a_neutron_routers_floating_ip() {
    // The phone is behind its floating IP: Neutron's SNAT rewrites the
    // packets, and only the sip helper (nf_nat_sip) rewrites the addresses
    // inside the SIP messages and the SDP, so that the media can come back.
    let n = NeutronRouter::new(true, (None, None));
    let topo = &n.topo;
    let daemon = Daemon::enforcing(topo);
    let _uas = uas(topo);
    std::thread::sleep(Duration::from_millis(500));
    let mut call = sipp_call(topo, 5061, 1000);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!topo.conntrack(&["-L", "expect"]).contains("sip"), "no helper, no expectation");
    assert!(call.child.wait().unwrap().success(), "a call without the helper completes");

    let id = daemon.create_helper(&topo.router_id, "udp", 5060, "sip");
    let mut call = sipp_call(topo, 5062, 0);
    assert!(call.child.wait().unwrap().success(), "with the helper the call through the floating IP completes");
    let ct = topo.conntrack(&["-L", "-p", "udp"]);
    let dialog = ct.lines().find(|l| l.contains("sport=5062") && l.contains("helper=sip")).unwrap_or_else(|| panic!("{ct}"));
    assert!(dialog.contains(&format!("dst={FLOATING_V4} ")), "the dialog went out through the floating IP: {dialog}");

    let mut call = sipp_call(topo, 5063, 4000);
    wait_for("the sip helper's media expectation", 3, || topo.conntrack(&["-L", "expect"]).contains("sip"));
    // nf_nat_sip rewrote the SDP: the media is expected at the floating IP.
    let expect = topo.conntrack(&["-L", "expect"]);
    assert!(expect.lines().any(|l| l.contains(&format!("dst={FLOATING_V4} ")) && l.contains("helper=sip")), "{expect}");
    daemon.cli(&["helper", "delete", &topo.router_id, &id]).ok();
    assert!(!topo.conntrack(&["-L", "expect"]).contains("sip"), "expectations gone with the revocation");
    assert!(!topo.conntrack(&["-L"]).contains("helper=sip"), "conntrack clean after the delete");
    assert!(!call.child.wait().unwrap().success(), "the revoked call does not complete");
}
