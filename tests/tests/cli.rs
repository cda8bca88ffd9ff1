//! The command surface against a live daemon: contract output, and invalid
//! input refused with a clear error, a non-zero exit and no change.

use enforcer_tests::{Daemon, Topology};

/// Everything the daemon and the kernel hold, to compare before and after.
fn snapshot(daemon: &Daemon) -> (String, String, String) {
    let helpers = daemon.cli(&["helper", "list", "-o", "json"]).ok().stdout;
    let routers = daemon.cli(&["router", "list", "-o", "json"]).ok().stdout;
    let maps = daemon.dump()["slots"].to_string();
    (helpers, routers, maps)
}

#[test]
fn invalid_input_is_refused_and_changes_nothing() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let r = topo.router_id.as_str();
    let id = daemon.create_helper(r, "tcp", 21, "ftp");
    let unknown_router = uuid::Uuid::new_v4().to_string();
    let unknown_helper = uuid::Uuid::new_v4().to_string();
    let before = snapshot(&daemon);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["helper", "create", r, "--protocol", "tcp", "--port", "21", "--helper", "nosuch"], "not available"),
        (vec!["helper", "create", r, "--protocol", "udp", "--port", "21", "--helper", "ftp"], "does not support protocol udp"),
        (vec!["helper", "create", r, "--protocol", "sctp", "--port", "21", "--helper", "ftp"], "must be tcp or udp"),
        (vec!["helper", "create", r, "--protocol", "tcp", "--port", "0", "--helper", "ftp"], "1-65535"),
        (vec!["helper", "create", r, "--protocol", "tcp", "--port", "65536", "--helper", "ftp"], "1-65535"),
        (vec!["helper", "create", &unknown_router, "--protocol", "tcp", "--port", "21", "--helper", "ftp"], "not found"),
        (vec!["helper", "create", "not-a-uuid", "--protocol", "tcp", "--port", "21", "--helper", "ftp"], "must be a UUID"),
        (vec!["helper", "create", r, "--protocol", "tcp", "--port", "21", "--helper", "ftp"], "already has helper"),
        (vec!["helper", "create", r, "--protocol", "tcp", "--port", "2121", "--helper", "ftp", "--id", &id], "already in use"),
        (vec!["helper", "create", r, "--protocol", "tcp", "--port", "2121", "--helper", "ftp;reboot"], "not available"),
        (vec!["helper", "update", r, &id, "--protocol", "udp"], "does not support"),
        (vec!["helper", "update", r, &unknown_helper, "--port", "22"], "not found"),
        (vec!["helper", "delete", r, &unknown_helper], "not found"),
        (vec!["helper", "delete", &unknown_router, &id], "not found"),
        (vec!["helper", "show", r, "../../etc/passwd"], "not found"),
        (vec!["router", "add", r], "already exists"),
        (vec!["router", "add", &unknown_router, "--netns", "../../tmp/x"], "netns"),
        (vec!["router", "add", &unknown_router, "--netns", "enf-no-such-ns"], "does not exist"),
        (vec!["router", "remove", &unknown_router], "not found"),
    ];
    for (args, expected) in cases {
        let out = daemon.cli(&args);
        assert_ne!(out.code, 0, "{args:?} should fail");
        assert!(out.stderr.contains(expected), "{args:?}: expected {expected:?} in {:?}", out.stderr);
        assert_eq!(snapshot(&daemon), before, "{args:?} changed something");
    }

    // -o json reports errors as JSON with a stable code.
    let out = daemon.cli(&["helper", "create", r, "--protocol", "tcp", "--port", "0", "--helper", "ftp", "-o", "json"]);
    assert_ne!(out.code, 0);
    let err = out.json();
    assert_eq!(err["error"]["code"], "invalid_argument");
    assert_eq!(err["error"]["field"], "port");
}

#[test]
fn contract_output() {
    let topo = Topology::new();
    let mut daemon = Daemon::start();
    let r = topo.router_id.as_str();
    let added = daemon.cli(&["router", "add", r, "-o", "json"]).ok().json();
    assert_eq!(added["netns"], format!("qrouter-{r}"), "default netns name");
    assert_eq!(added["interfaces"], serde_json::json!(["r0", "r1"]));

    let wanted = uuid::Uuid::new_v4().to_string();
    let created = daemon
        .cli(&["helper", "create", r, "--protocol", "udp", "--port", "5060", "--helper", "sip", "--id", &wanted, "--project", "p1", "-o", "json"])
        .ok()
        .json();
    for field in ["id", "router_id", "project_id", "protocol", "port", "helper"] {
        assert!(created.get(field).is_some(), "{field} missing in {created}");
    }
    assert_eq!(created["id"], wanted.as_str());
    assert_eq!(created["project_id"], "p1");
    let shown = daemon.cli(&["helper", "show", r, &wanted, "-o", "json"]).ok().json();
    assert_eq!(shown, created);
    let listed = daemon.cli(&["helper", "list", r, "-o", "json"]).ok().json();
    assert_eq!(listed, serde_json::json!([created]));
    let table = daemon.cli(&["helper", "list"]).ok().stdout;
    assert!(table.starts_with("ID") && table.contains("sip") && table.contains("5060"), "{table}");
    // A reader that goes away first (`| head`) ends the command quietly:
    // killed by SIGPIPE (141 under pipefail) or done, never a panic.
    let piped = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; '{}' --socket '{}' status | true", enforcer_tests::enforcer_bin().display(), daemon.socket.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(matches!(piped.status.code(), Some(0 | 141)) && !stderr.contains("panicked"), "{:?}: {stderr}", piped.status);

    let dump = daemon.dump();
    assert_eq!(dump["slots"][0]["router_id"], r);
    assert_eq!(dump["slots"][0]["helper"], "sip");
    assert_eq!(dump["slots"][0]["state"], "live");

    // maps dump reads the pins directly: it works with the daemon gone.
    let bpffs = daemon.bpffs.clone();
    let socket = daemon.socket.clone();
    daemon.process.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.process.child.wait().unwrap();
    let out = std::process::Command::new(enforcer_tests::enforcer_bin())
        .args(["maps", "dump", "-o", "json", "--bpffs"])
        .arg(&bpffs)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sip\""));
    // And the client says clearly when the daemon is not there.
    let out = std::process::Command::new(enforcer_tests::enforcer_bin()).arg("--socket").arg(&socket).args(["router", "list"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `enforcer daemon` running?"));
}

#[test]
fn router_remove_takes_everything_away() {
    let topo = Topology::new();
    let daemon = Daemon::start();
    let r = topo.router_id.as_str();
    daemon.add_router(r);
    daemon.create_helper(r, "tcp", 21, "ftp");
    assert!(topo.router.ruleset().contains("table inet enforcer"));
    assert_eq!(daemon.attachments(&topo.router), 2, "tag on r0 and r1");
    let mode = daemon.cli(&["status", "-o", "json"]).ok().json()["attach"].clone();
    let expected = if std::env::var("ENFORCER_ATTACH").as_deref() == Ok("netlink") { "netlink" } else { "tcx" };
    assert_eq!(mode, expected, "status says how the programs are attached");
    daemon.cli(&["router", "remove", r]).ok();
    assert_eq!(daemon.attachments(&topo.router), 0, "programs detached");
    let rules = topo.router.ruleset();
    assert!(!rules.to_lowercase().contains("enforcer"), "glue removed:\n{rules}");
    assert_eq!(daemon.dump()["slots"], serde_json::json!([]));
    assert_eq!(daemon.cli(&["router", "list", "-o", "json"]).ok().json(), serde_json::json!([]));
    // The router can come back.
    daemon.add_router(r);
    daemon.create_helper(r, "tcp", 21, "ftp");
}
