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

/// One sample's value in the daemon's metrics endpoint on `port`.
fn metric(port: u16, name: &str) -> f64 {
    let out = enforcer_tests::run(std::process::Command::new("curl").args(["-sS", &format!("http://127.0.0.1:{port}/metrics")]));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// A daemon that follows `os` through the application credential of its
/// clouds.yaml, polling every `poll` seconds.
fn following(os: &OpenStack, poll: f64) -> Daemon {
    following_with(os, poll, "")
}

/// A daemon that logs in with a password given inline, in keystoneauth's
/// names (no clouds.yaml).
fn following_by_password(os: &OpenStack) -> Daemon {
    let config = os.dir.join("inline.toml");
    std::fs::write(
        &config,
        format!(
            "[neutron]\nauth_url = \"{}/v3\"\nusername = \"ctdaemon\"\npassword = \"{}\"\nproject_name = \"service\"\n\
             user_domain_name = \"Default\"\nproject_domain_name = \"Default\"\nregion_name = \"RegionOne\"\ninterface = \"public\"\npoll_interval = 1\n",
            os.keystone_url,
            OpenStack::USER_PASSWORD
        ),
    )
    .unwrap();
    Daemon::start_with(None, &["--config", config.to_str().unwrap()])
}

/// As [`following`], with more settings.
fn following_with(os: &OpenStack, poll: f64, settings: &str) -> Daemon {
    let config = os.daemon_config("enforcer", poll, settings);
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
        audit.as_array().unwrap().iter().any(|e| e["origin"] == "neutron" && e["op"] == "helper_set" && e["result"] == "ok" && e["after"]["deleted"] == 1),
        "the sync's changes are audited: {audit}"
    );

    // The L3 agent moves the router off this node: its namespace goes, and
    // so does the router here, through `router remove`.
    drop((ftp, transfer, _server));
    drop(topo);
    within(5.0, "router removed with its namespace", || router_status(&daemon, &router).is_none().then_some(()));
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    assert!(audit.as_array().unwrap().iter().any(|e| e["origin"] == "neutron" && e["op"] == "router_remove" && e["result"] == "ok"), "{audit}");
}

/// The router as `status` shows it.
fn router_status(daemon: &Daemon, router: &str) -> Option<Value> {
    status(daemon)["routers"].as_array()?.iter().find(|r| r["id"] == router).cloned()
}

#[test]
fn an_update_in_neutron_moves_the_helper_and_projects_stay_apart() {
    let os = OpenStack::start(3600);
    let r1 = os.create_router("u1", "r1");
    let r2 = os.create_router("u2", "r2");
    let (t1, t2) = (Topology::for_router(&r1), Topology::for_router(&r2));
    let _s1 = FtpServer::start(&t1, Family::V4);
    let _s2 = FtpServer::start(&t2, Family::V4);
    // A router added by hand beside them, with a helper of its own.
    let local = Topology::new();
    let daemon = following_by_password(&os);
    daemon.add_router(&local.router_id);
    let local_helper = daemon.create_helper(&local.router_id, "tcp", 21, "ftp");

    let h1 = os.create_helper("u1", &r1, "tcp", 2121, "ftp");
    let h2 = os.create_helper("u2", &r2, "udp", 69, "tftp");
    within(10.0, "both applied", || (helpers(&daemon, &r1).len() == 1 && helpers(&daemon, &r2).len() == 1).then_some(()));
    let (a, b) = (&helpers(&daemon, &r1)[0], &helpers(&daemon, &r2)[0]);
    assert_eq!((a["id"].as_str(), a["project_id"].clone()), (Some(h1.as_str()), os.seed["u1"]["project_id"].clone()));
    assert_eq!((b["id"].as_str(), b["project_id"].clone()), (Some(h2.as_str()), os.seed["u2"]["project_id"].clone()));
    assert_eq!(router_status(&daemon, &r1).unwrap()["owner"], "neutron");
    // Port 2121 is not FTP's: the data connection cannot open.
    FtpClient::login(&t1, Family::V4).fails("list passive");

    let (code, body) = os.neutron("u1", "PUT", &format!("/routers/{r1}/conntrack_helpers/{h1}"), Some(serde_json::json!({"conntrack_helper": {"port": 21}})));
    assert_eq!(code, 200, "{body}");
    within(3.0, "update applied", || helpers(&daemon, &r1).first().filter(|h| h["port"] == 21).cloned());
    FtpClient::login(&t1, Family::V4).ok("list passive");
    // The other project's router got nothing of it.
    FtpClient::login(&t2, Family::V4).fails("list passive");
    assert_eq!(helpers(&daemon, &r2)[0]["port"], 69);
    // The hand-made router is untouched and still enforced.
    assert!(router_status(&daemon, &local.router_id).unwrap().get("owner").is_none());
    assert_eq!(helpers(&daemon, &local.router_id)[0]["id"], local_helper.as_str());
    let _local_server = FtpServer::start(&local, Family::V4);
    FtpClient::login(&local, Family::V4).ok("list passive");

    // A router deleted in Neutron is removed here (after its namespace,
    // which the L3 agent deletes too, but even with it still present).
    os.delete("u2", &format!("/routers/{r2}/conntrack_helpers/{h2}"));
    os.delete("u2", &format!("/routers/{r2}"));
    within(5.0, "deleted router removed", || router_status(&daemon, &r2).is_none().then_some(()));
    assert!(router_status(&daemon, &r1).is_some());
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().stdout;
    for (what, text) in [("log", daemon.log()), ("status", status(&daemon).to_string()), ("audit", audit)] {
        assert!(!text.contains(OpenStack::USER_PASSWORD), "the password is in the {what}");
    }
}

#[test]
fn an_outage_keeps_enforcement_and_changes_made_meanwhile_apply_on_return() {
    let mut os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let topo = Topology::for_router(&router);
    let _server = FtpServer::start(&topo, Family::V4);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let daemon = following_with(&os, 1.0, &format!("metrics = \"127.0.0.1:{port}\""));
    let helper = os.create_helper("u1", &router, "tcp", 21, "ftp");
    within(10.0, "applied", || helpers(&daemon, &router).first().cloned());
    let metric = |name: &str| metric(port, name);
    assert!(metric("enforcer_neutron_sync_polls_total") >= 1.0);
    assert_eq!(metric("enforcer_neutron_sync_errors_total"), 0.0);
    let last_success = metric("enforcer_neutron_sync_last_success_timestamp_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - last_success).abs() < 10.0, "last success {last_success}, now {now}");
    let polls = status(&daemon)["neutron"]["polls"].as_u64().unwrap();
    let sync = within(5.0, "a later poll", || Some(status(&daemon)["neutron"].clone()).filter(|s| s["polls"].as_u64() > Some(polls + 1)));
    assert_eq!(sync["state"], "ok", "{sync}");
    assert_eq!(sync["requests_last_poll"], 1, "an unchanged poll is one list request: {sync}");

    os.stop_neutron();
    let stale = within(10.0, "outage reported", || Some(status(&daemon)["neutron"].clone()).filter(|s| s["state"] == "stale"));
    assert!(stale["last_error"].as_str().unwrap().contains("unavailable"), "{stale}");
    std::thread::sleep(Duration::from_secs(3));
    let stale = status(&daemon)["neutron"].clone();
    assert!(stale["age_secs"].as_f64().unwrap() >= 3.0, "status shows how stale the view is: {stale}");
    assert_eq!(helpers(&daemon, &router).len(), 1, "enforcement stays as last applied");
    FtpClient::login(&topo, Family::V4).ok("list passive");
    // What an alert would watch: errors counted, the lag growing.
    assert!(metric("enforcer_neutron_sync_errors_total") >= 1.0);
    assert!(metric("enforcer_neutron_sync_failed_polls_in_a_row") >= 1.0);
    assert!(metric("enforcer_neutron_sync_lag_seconds") >= 3.0);

    os.start_neutron();
    os.delete("u1", &format!("/routers/{router}/conntrack_helpers/{helper}"));
    // Back-off after failures is at most 60 s; here it has grown to a few.
    within(40.0, "change applied after the outage", || helpers(&daemon, &router).is_empty().then_some(()));
    within(5.0, "sync ok again", || Some(status(&daemon)["neutron"].clone()).filter(|s| s["state"] == "ok"));
    FtpClient::login(&topo, Family::V4).fails("list passive");
}

#[test]
fn a_deleted_application_credential_is_a_clear_error_and_state_is_kept() {
    let os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let topo = Topology::for_router(&router);
    let _server = FtpServer::start(&topo, Family::V4);
    let daemon = following(&os, 1.0);
    os.create_helper("u1", &router, "tcp", 21, "ftp");
    within(10.0, "applied", || helpers(&daemon, &router).first().cloned());

    os.delete_daemon_credential();
    let failed = within(15.0, "credential error reported", || Some(status(&daemon)["neutron"].clone()).filter(|s| s["state"] == "stale"));
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.starts_with("credentials:"), "the error names the cause: {error}");
    assert_eq!(helpers(&daemon, &router).len(), 1, "state kept");
    FtpClient::login(&topo, Family::V4).ok("list passive");
    // No secret anywhere the daemon writes.
    let secret = os.seed["ctdaemon"]["app_cred_secret"].as_str().unwrap();
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().stdout;
    for (what, text) in [("log", daemon.log()), ("status", status(&daemon).to_string()), ("audit", audit)] {
        assert!(!text.contains(secret), "the secret is in the {what}");
    }
}

#[test]
fn a_token_that_expires_is_renewed() {
    // Keystone's tokens live 20 s here; the sync goes on across several.
    let os = OpenStack::start(20);
    let router = os.create_router("u1", "r1");
    let _topo = Topology::for_router(&router);
    let daemon = following(&os, 1.0);
    within(10.0, "followed", || router_status(&daemon, &router));
    let logins = os.logins();
    std::thread::sleep(Duration::from_secs(25));
    let helper = os.create_helper("u1", &router, "tcp", 21, "ftp");
    within(5.0, "applied with a renewed token", || helpers(&daemon, &router).into_iter().find(|h| h["id"] == helper.as_str()));
    assert!(os.logins() > logins, "the daemon logged in again");
    assert_eq!(status(&daemon)["neutron"]["state"], "ok");
}

#[test]
fn helpers_this_host_does_not_offer_are_errors_and_the_rest_applies() {
    let os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let _topo = Topology::for_router(&router);
    // sip is not allowed here; the kernel has amanda over udp only.
    let daemon = following_with(&os, 1.0, "allowed_helpers = [\"ftp\", \"Q.931\", \"amanda\"]");
    let ftp = os.create_helper("u1", &router, "tcp", 21, "ftp");
    let h323 = os.create_helper("u1", &router, "tcp", 1720, "h323");
    let sip = os.create_helper("u1", &router, "udp", 5060, "sip");
    let amanda = os.create_helper("u1", &router, "tcp", 10080, "amanda");
    let sync = within(10.0, "errors reported", || {
        Some(status(&daemon)["neutron"].clone()).filter(|s| s["helper_errors"].as_array().is_some_and(|e| e.len() == 2))
    });
    let applied: Vec<(String, String)> = helpers(&daemon, &router)
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_string(), h["helper"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(applied.len(), 2, "{applied:?}");
    assert!(applied.contains(&(ftp.clone(), "ftp".into())), "{applied:?}");
    assert!(applied.contains(&(h323, "Q.931".into())), "h323 over tcp is the kernel's Q.931: {applied:?}");
    let errors = sync["helper_errors"].as_array().unwrap();
    for id in [&sip, &amanda] {
        let e = errors.iter().find(|e| e["helper_id"] == id.as_str()).unwrap_or_else(|| panic!("{id} in {sync}"));
        assert_eq!(e["router_id"], router.as_str());
    }
    assert_eq!(sync["helper_errors_total"], 2, "{sync}");
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    let refused = audit.as_array().unwrap().iter().filter(|e| e["origin"] == "neutron" && e["result"] == "invalid_argument").count();
    assert_eq!(refused, 2, "each refusal is audited: {audit}");
    // Unchanged revisions are not fetched again, so errors are not counted twice.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(status(&daemon)["neutron"]["helper_errors_total"], 2);

    // Moved in Neutron to a helper this host does not offer: the old
    // version must not stay enforced.
    let (code, body) = os.neutron(
        "u1",
        "PUT",
        &format!("/routers/{router}/conntrack_helpers/{ftp}"),
        Some(serde_json::json!({"conntrack_helper": {"protocol": "udp", "port": 5061, "helper": "sip"}})),
    );
    assert_eq!(code, 200, "{body}");
    within(5.0, "old version gone", || (!helpers(&daemon, &router).iter().any(|h| h["id"] == ftp.as_str())).then_some(()));
    let sync = within(5.0, "error shown", || {
        Some(status(&daemon)["neutron"].clone()).filter(|s| s["helper_errors"].as_array().is_some_and(|e| e.iter().any(|e| e["helper_id"] == ftp.as_str())))
    });
    assert_eq!(sync["helper_errors_total"], 3, "{sync}");
}

#[test]
fn a_token_that_cannot_see_every_router_never_wipes_enforcement() {
    let os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let topo = Topology::for_router(&router);
    let _server = FtpServer::start(&topo, Family::V4);
    let mut daemon = following(&os, 1.0);
    os.create_helper("u1", &router, "tcp", 21, "ftp");
    within(10.0, "applied", || helpers(&daemon, &router).first().cloned());

    // The operator points the daemon at a tenant's cloud by mistake: u2 is
    // a member of p2 and would get an empty router list, and 404 for r1.
    let config = os.daemon_config("enforcer", 1.0, "");
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace("\"enforcer\"", "\"u2\"")).unwrap();
    daemon.restart();
    let sync = within(10.0, "refused", || Some(status(&daemon)["neutron"].clone()).filter(|s| s["state"] == "stale"));
    assert!(sync["last_error"].as_str().unwrap().contains("no admin role"), "{sync}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(helpers(&daemon, &router).len(), 1, "enforcement kept");
    assert_eq!(router_status(&daemon, &router).unwrap()["owner"], "neutron");
    FtpClient::login(&topo, Family::V4).ok("list passive");
}
