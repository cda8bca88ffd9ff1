//! SIP through a router with real peers (sipp's built-in UAS and UAC): the
//! sip helper reads the INVITE's SDP and opens an expectation for the media;
//! revoking the helper removes it.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use enforcer_tests::{Daemon, Process, Topology};

/// One call from a fresh local port (a new conntrack entry: a helper is
/// assigned only when an entry is created).
fn sipp_call(topo: &Topology, local_port: u16, pause_ms: u32) -> Process {
    Process::spawn(
        "sipp uac",
        topo.client
            .cmd("sipp")
            .args(["-sn", "uac", &format!("{}:5060", Topology::SERVER_V4), "-i", Topology::CLIENT_V4, "-p", &local_port.to_string()])
            .args(["-m", "1", "-d", &pause_ms.to_string(), "-timeout", "12", "-nostdin"])
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

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} did not happen within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sip_helper_opens_media_expectations_and_revocation_removes_them() {
    let topo = Topology::new();
    let daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
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
