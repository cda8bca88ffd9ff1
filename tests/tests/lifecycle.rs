//! Router lifecycle: interfaces come and go, namespaces vanish.

use enforcer_tests::{
    Daemon, Family, Topology,
    peers::{FtpClient, FtpServer},
    run,
};

/// Polls `f` for up to 10 s.
fn eventually(what: &str, f: impl FnMut() -> bool) {
    enforcer_tests::wait_for(what, 10, f);
}

fn interfaces(daemon: &Daemon) -> Vec<String> {
    let routers = daemon.cli(&["router", "list", "-o", "json"]).ok().json();
    routers[0]["interfaces"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_string()).collect()
}

#[test]
fn interfaces_added_later_are_enforced_and_removed_ones_forgotten() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    // Move the server behind a new interface pair, added after router add.
    run(std::process::Command::new("ip").args([
        "link", "add", "s9", "netns", &topo.server.name, "type", "veth", "peer", "name", "r9", "netns", &topo.router.name,
    ]));
    eventually("r9 attached", || interfaces(&daemon).contains(&"r9".to_string()));
    assert_eq!(daemon.attachments(&topo.router), 3, "the program on each of r0, r1, r9");

    // Carry the server traffic over r9 only: its enforcement must work.
    topo.server.sh("ip", &["link", "del", "s0"]);
    eventually("r1 forgotten", || !interfaces(&daemon).contains(&"r1".to_string()));
    topo.server.sh("ip", &["addr", "add", "10.200.2.2/24", "dev", "s9"]);
    topo.server.sh("ip", &["link", "set", "s9", "up"]);
    topo.server.sh("ip", &["route", "add", "default", "via", "10.200.2.1"]);
    topo.router.sh("ip", &["addr", "add", "10.200.2.1/24", "dev", "r9"]);
    topo.router.sh("ip", &["link", "set", "r9", "up"]);
    assert_eq!(daemon.attachments(&topo.router), 2);
    assert!(daemon.pins().iter().filter(|p| p.contains("/routers/")).count() <= 2, "no pin of a removed interface left");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("list passive");
    let dump = daemon.dump();
    assert!(dump["slots"][0]["tagged"].as_u64().unwrap() > 0, "{dump}");
}

#[test]
fn a_namespace_deleted_from_outside_is_cleaned_up() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    assert_eq!(daemon.dump()["routers"], 1);

    run(std::process::Command::new("ip").args(["netns", "del", &topo.router.name]));
    eventually("router detached", || {
        let status = daemon.cli(&["status", "-o", "json"]).ok().json();
        status["routers"][0]["attached"] == false
    });
    let dump = daemon.dump();
    assert_eq!(dump["routers"], 0, "{dump}");
    assert_eq!(dump["slots"], serde_json::json!([]), "no map entries left: {dump}");
    assert!(daemon.pins().iter().all(|p| !p.contains("/routers/")), "links unpinned: {:?}", daemon.pins());
    // The desired state is kept: the helper is still listed, the router is
    // reported detached, and it can be removed.
    let helpers = daemon.cli(&["helper", "list", "-o", "json"]).ok().json();
    assert_eq!(helpers.as_array().unwrap().len(), 1);
    daemon.cli(&["router", "remove", &topo.router_id]).ok();
}

#[test]
fn namespaces_are_followed_by_events_and_one_made_again_gets_fresh_attachments() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    // The safety-net check runs every 10 s (and a poll ran every second
    // before): within half a second means an event.
    let within = |limit_ms: u64, what: &str, f: &dyn Fn() -> bool| {
        let started = std::time::Instant::now();
        while !f() {
            assert!(started.elapsed() < std::time::Duration::from_millis(limit_ms), "{what} took longer than {limit_ms} ms:\n{}", daemon.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("{what}: {:?}", started.elapsed());
    };
    run(std::process::Command::new("ip").args(["netns", "del", &topo.router.name]));
    within(500, "noticing the deletion", &|| status()["routers"][0]["attached"] == false);

    // Made again under the same name: a new namespace, new interfaces.
    let again = enforcer_tests::Netns::create(&topo.router.name);
    run(again.cmd("ip").args(["link", "add", "n0", "type", "veth", "peer", "name", "n1"]));
    // Interfaces follow by link events (and settle 100 ms): a second.
    within(1000, "attaching the new namespace", &|| status()["routers"][0]["interfaces"] == serde_json::json!(["n0", "n1"]));
    assert_eq!(daemon.attachments(&again), 2, "tag on n0 and n1");
    assert!(again.ruleset().contains("table inet enforcer"), "glue in the new namespace");
    // Its link watcher is the new namespace's.
    run(again.cmd("ip").args(["link", "add", "n2", "type", "veth", "peer", "name", "n3"]));
    within(1000, "attaching interfaces added to the new namespace", &|| daemon.attachments(&again) == 4);
}

#[test]
fn a_stale_glue_table_in_a_new_routers_namespace_is_replaced() {
    let topo = Topology::new();
    // Left behind by a router removed while enforcer was down: the add's
    // creating transaction fails on it, the replacing one takes over.
    topo.router.sh("nft", &["add table inet enforcer"]);
    topo.router.sh("nft", &["add chain inet enforcer stale { type filter hook prerouting priority 0 ; }"]);
    let daemon = Daemon::enforcing(&topo);
    let rules = topo.router.ruleset();
    assert!(rules.contains("table inet enforcer") && !rules.contains("stale"), "stale table replaced:\n{rules}");
    eventually("the glue checked intact", || daemon.cli(&["status", "-o", "json"]).ok().json()["routers"][0]["glue"] == "intact");
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("list passive");
    assert!(daemon.dump()["slots"][0]["tagged"].as_u64().unwrap() > 0);
}

/// What a router add loads is its own `tag`, a few instructions that
/// tail-call the one `classify` the daemon verified at start: every router
/// runs that same `classify`, and none gets a copy of it.
#[test]
fn every_router_runs_the_one_classify_through_its_own_small_tag() {
    let a = Topology::new();
    let b = Topology::new();
    let daemon = Daemon::enforcing(&a);
    daemon.add_router(&b.router_id);
    let loaded: Vec<aya::programs::ProgramInfo> = aya::programs::loaded_programs().filter_map(|p| p.ok()).collect();
    let info = |id: &u32| loaded.iter().find(|p| p.id() == *id).unwrap_or_else(|| panic!("program {id} not loaded"));
    for topo in [&a, &b] {
        let attached = daemon.attached_programs(&topo.router);
        assert_eq!(attached.len(), 2, "tag on both interfaces");
        for id in &attached {
            let p = info(id);
            assert_eq!(p.name_as_str(), Some("tag"));
            let size = p.size_translated().unwrap_or(u32::MAX);
            assert!(size < 512, "a router's tag is a few instructions, not the whole program: {size} bytes");
        }
    }
    // One classify for both routers (programs using the daemon's maps).
    let uses = daemon.uses_maps();
    let classify = loaded.iter().filter(|p| p.name_as_str() == Some("classify")).filter(|p| uses(p)).count();
    assert_eq!(classify, 1, "one classify, verified once");
    // And it does the work: a helper on router a tags its FTP.
    daemon.create_helper(&a.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&a, Family::V4);
    FtpClient::login(&a, Family::V4).ok("list passive");
    assert!(daemon.dump()["slots"][0]["tagged"].as_u64().unwrap() > 0);
}
