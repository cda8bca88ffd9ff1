//! enforcer following Neutron: real Keystone and neutron-server on
//! loopback, routers and conntrack helpers created through Neutron's REST
//! API, router namespaces on this host.

use std::time::{Duration, Instant};

use enforcer_tests::{
    Daemon, Family, Topology,
    openstack::OpenStack,
    peers::{FtpClient, FtpServer},
};
use serde_json::Value;

#[test]
fn a_helper_change_bumps_the_routers_revision_number() {
    let os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let revision = |os: &OpenStack| {
        let (status, body) = os.neutron("admin", "GET", &format!("/routers/{router}?fields=revision_number"), None);
        assert_eq!(status, 200, "{body}");
        body["router"]["revision_number"].as_u64().unwrap()
    };
    let before = revision(&os);
    let helper = os.create_helper("u1", &router, "tcp", 21, "ftp");
    let created = revision(&os);
    assert!(created > before, "create: {before} -> {created}");
    os.delete("u1", &format!("/routers/{router}/conntrack_helpers/{helper}"));
    assert!(revision(&os) > created, "delete bumps it too");
}

/// Polls `f` until it returns Some, for at most `secs` seconds.
fn within<T>(secs: f64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(daemon: &Daemon) -> Value {
    daemon.cli(&["status", "-o", "json"]).ok().json()
}

/// The helpers the daemon enforces on `router`.
fn helpers(daemon: &Daemon, router: &str) -> Vec<Value> {
    let out = daemon.cli(&["helper", "list", router, "-o", "json"]);
    if out.code != 0 {
        return Vec::new();
    }
    out.json().as_array().cloned().unwrap_or_default()
}

/// A daemon that follows `os` through the application credential of its
/// clouds.yaml, polling every `poll` seconds.
fn following(os: &OpenStack, poll: f64) -> Daemon {
    let config = os.daemon_config("enforcer", poll);
    let (key, value) = os.daemon_env();
    Daemon::start_with_env(None, &["--config", config.to_str().unwrap()], &[(key, &value)])
}

#[test]
fn a_helper_created_in_neutron_is_enforced_and_its_delete_revokes() {
    const POLL: f64 = 1.0;
    let os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let topo = Topology::for_router(&router);
    let _server = FtpServer::start(&topo, Family::V4);
    let daemon = following(&os, POLL);
    // The namespace exists, the router has no helper yet: followed, empty.
    within(10.0, "router followed", || status(&daemon)["routers"].as_array()?.iter().find(|r| r["id"] == router.as_str()).cloned());
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.fails("list passive");

    let helper = os.create_helper("u1", &router, "tcp", 21, "ftp");
    let applied = within(10.0, "helper applied", || helpers(&daemon, &router).into_iter().find(|h| h["id"] == helper.as_str()));
    assert_eq!(applied["project_id"], os.seed["u1"]["project_id"], "the project is the router's: {applied}");
    assert_eq!((applied["protocol"].as_str(), applied["port"].as_u64(), applied["helper"].as_str()), (Some("tcp"), Some(21), Some("ftp")));
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("list passive");
    let mut transfer = FtpClient::login(&topo, Family::V4);
    transfer.ok("retr_start big.bin passive");

    // Read-only through the local API: Neutron owns this router's helpers.
    let refused = daemon.cli(&["helper", "delete", &router, &helper]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("Neutron"), "{}", refused.stderr);

    let deleted = Instant::now();
    os.delete("u1", &format!("/routers/{router}/conntrack_helpers/{helper}"));
    within(POLL + 1.0, "delete revoked on the host", || helpers(&daemon, &router).is_empty().then_some(()));
    eprintln!("delete in Neutron to revoked here: {:?}", deleted.elapsed());
    let cut = transfer.cmd("retr_wait");
    assert_eq!(cut["ok"], false, "the transfer in progress is cut: {cut}");
    ftp.fails("noop");
    let ct = topo.conntrack(&["-L"]);
    assert!(!ct.contains("helper=ftp"), "conntrack is clean:\n{ct}");
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["origin"] == "neutron" && e["op"] == "helper_delete" && e["result"] == "ok"),
        "the sync's changes are audited: {audit}"
    );
}
