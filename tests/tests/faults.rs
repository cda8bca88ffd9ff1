//! Faults in the daemon's external steps, against a live daemon: an `nft`
//! that hangs, a namespace deleted while its router is being attached.
//! Other routers' requests must go on being answered meanwhile.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use enforcer_tests::{
    Daemon, Family, Netns, Topology,
    peers::{FtpClient, FtpServer},
    unique,
};
use serde_json::json;

/// A directory put first on the daemon's PATH, holding an `nft` that runs
/// the real one, or hangs while `hang` exists, or takes a second longer
/// while `slow` exists; each run's arguments go to `runs`, a line each.
/// Removed on drop.
struct HangingNft {
    dir: PathBuf,
    hang: PathBuf,
    slow: PathBuf,
    runs: PathBuf,
}

impl HangingNft {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("nft"));
        std::fs::create_dir_all(&dir).unwrap();
        let real = String::from_utf8(enforcer_tests::run(std::process::Command::new("sh").args(["-c", "command -v nft"])).stdout).unwrap();
        let (hang, slow, runs) = (dir.join("hang"), dir.join("slow"), dir.join("runs"));
        let script = format!(
            "#!/bin/sh\necho \"$*\" >> {}\nif [ -e {} ]; then exec sleep 3600; fi\nif [ -e {} ]; then sleep 1; fi\nexec {} \"$@\"\n",
            runs.display(),
            hang.display(),
            slow.display(),
            real.trim()
        );
        let nft = dir.join("nft");
        std::fs::write(&nft, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir, hang, slow, runs }
    }

    /// The runs so far that listed the ruleset (a glue check's listing).
    fn listings(&self) -> usize {
        std::fs::read_to_string(&self.runs).unwrap_or_default().lines().filter(|l| l.starts_with("-j list table")).count()
    }

    fn path_env(&self) -> String {
        format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap_or_default())
    }

    fn hang(&self, on: bool) {
        switch(&self.hang, on);
    }

    fn slow(&self, on: bool) {
        switch(&self.slow, on);
    }
}

fn switch(flag: &std::path::Path, on: bool) {
    if on {
        std::fs::write(flag, b"").unwrap();
    } else {
        let _ = std::fs::remove_file(flag);
    }
}

impl Drop for HangingNft {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Times requests about router `b` while something else is stuck: each is
/// answered (ok), and the slowest and median latencies come back.
fn time_requests(daemon: &Daemon, b: &str, rounds: usize) -> (Duration, Duration) {
    static NEXT_PORT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(3000);
    let mut session = daemon.session();
    let mut took = Vec::new();
    for _ in 0..rounds {
        let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let requests = [
            json!({"op": "helper_create", "router_id": b, "protocol": "tcp", "port": port, "helper": "ftp"}),
            json!({"op": "helper_list", "router_id": b}),
            json!({"op": "router_list"}),
        ];
        for req in requests {
            let t = Instant::now();
            let answer = session.request(&req).expect("answered");
            took.push(t.elapsed());
            assert!(answer.get("ok").is_some(), "{req} -> {answer}");
        }
    }
    took.sort();
    (took[took.len() - 1], took[took.len() / 2])
}

#[test]
fn a_hanging_nft_stalls_only_its_own_router_and_fails_at_the_limit() {
    let a = Topology::new();
    let b = Topology::new();
    let nft = HangingNft::new();
    let config = enforcer_tests::Scratch::file("cfg", "command_timeout_secs = 3\n");
    let daemon = Daemon::start_with_env(None, &["--config", config.path()], &[("PATH", &nft.path_env())]);
    daemon.add_router(&b.router_id);

    nft.hang(true);
    let started = Instant::now();
    let stuck = std::thread::scope(|s| {
        let add = s.spawn(|| daemon.cli(&["router", "add", &a.router_id]));
        // Router a's add is inside its hanging nft by now.
        std::thread::sleep(Duration::from_millis(500));
        let (slowest, median) = time_requests(&daemon, &b.router_id, 5);
        assert!(started.elapsed() < Duration::from_secs(3), "the requests ran while a's nft hung");
        eprintln!("router b while router a's nft hangs: median {median:?}, slowest {slowest:?}");
        assert!(slowest < Duration::from_millis(100), "slowest {slowest:?} (median {median:?}): waited behind the hanging nft");
        add.join().unwrap()
    });
    let waited = started.elapsed();
    assert_ne!(stuck.code, 0, "the add of router a succeeded with a hanging nft");
    assert!(stuck.stderr.contains("did not finish within 3 s"), "the error says what hung: {}", stuck.stderr);
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(8), "failed at the limit: {waited:?}");
    // Nothing half-done stays: a is unknown, and has no links.
    let routers = daemon.cli(&["router", "list", "-o", "json"]).ok().json();
    assert!(!routers.to_string().contains(&a.router_id), "{routers}");
    assert_eq!(daemon.attachments(&a.router), 0);

    nft.hang(false);
    daemon.add_router(&a.router_id);
    assert!(a.router.ruleset().contains("table inet enforcer"), "the glue is in once nft works");

    // Removing a router runs nft too (its glue goes), also without the lock.
    nft.hang(true);
    let started = Instant::now();
    let removed = std::thread::scope(|s| {
        let remove = s.spawn(|| daemon.cli(&["router", "remove", &a.router_id]));
        std::thread::sleep(Duration::from_millis(500));
        let (slowest, median) = time_requests(&daemon, &b.router_id, 2);
        assert!(started.elapsed() < Duration::from_secs(3), "the requests ran while a's nft hung");
        assert!(slowest < Duration::from_millis(100), "slowest {slowest:?} (median {median:?}) during a remove");
        remove.join().unwrap()
    });
    nft.hang(false);
    removed.ok();
    assert_eq!(daemon.attachments(&a.router), 0, "enforcement of a is gone even though its glue could not be removed");
    assert!(daemon.log().contains("did not finish"), "the failed glue removal is reported");
}

#[test]
fn a_namespace_deleted_during_its_attach_leaves_nothing_behind() {
    let b = Topology::new();
    let doomed = Netns::create(&unique("gone"));
    let id = uuid::Uuid::new_v4().to_string();
    let nft = HangingNft::new();
    let config = enforcer_tests::Scratch::file("cfg", "command_timeout_secs = 2\n");
    let daemon = Daemon::start_with_env(None, &["--config", config.path()], &[("PATH", &nft.path_env())]);
    daemon.add_router(&b.router_id);
    let pins_before = daemon.pins();

    nft.hang(true);
    let out = std::thread::scope(|s| {
        let add = s.spawn(|| daemon.cli(&["router", "add", &id, "--netns", &doomed.name]));
        std::thread::sleep(Duration::from_millis(500));
        enforcer_tests::run(std::process::Command::new("ip").args(["netns", "del", &doomed.name]));
        let (slowest, median) = time_requests(&daemon, &b.router_id, 3);
        eprintln!("router b during the attach: median {median:?}, slowest {slowest:?}");
        assert!(slowest < Duration::from_millis(100), "slowest {slowest:?} (median {median:?})");
        add.join().unwrap()
    });
    nft.hang(false);
    assert_ne!(out.code, 0, "added a router whose namespace is gone: {}", out.stdout);
    let routers = daemon.cli(&["router", "list", "-o", "json"]).ok().json();
    assert!(!routers.to_string().contains(&id), "{routers}");
    // Router b's conntrack index program came with its first rule.
    let dump = daemon.dump();
    let b_index = dump["slots"].as_array().unwrap().iter().find(|s| s["router_id"] == b.router_id.as_str()).expect("router b's rules")["router_index"].to_string();
    let new: Vec<String> = daemon.pins().into_iter().filter(|p| !pins_before.contains(p)).collect();
    assert!(new.iter().all(|p| p.contains(&format!("/ctindex/{b_index}/"))), "no pins of the failed router: {new:?}");
    // And the daemon is fine: b still takes changes.
    daemon.create_helper(&b.router_id, "udp", 69, "tftp");
}

/// Polls `f` for up to 10 s.
fn eventually(what: &str, f: impl FnMut() -> bool) {
    enforcer_tests::wait_for(what, 10, f);
}

/// A daemon that checks glue, attachments and maps every second, with the
/// router of `topo` added; the config file lives as long as the guard.
fn checked_every_second(topo: &Topology) -> (Daemon, enforcer_tests::Scratch) {
    let config = enforcer_tests::Scratch::file("cfg", "glue_check_secs = 1\n");
    let daemon = Daemon::start_with(None, &["--config", config.path()]);
    daemon.add_router(&topo.router_id);
    (daemon, config)
}

/// The glue a router add installs is known intact at the generation its
/// transaction made: the checks after it list nothing (with a thousand
/// routers added, the first round of checks ran a thousand `nft` listings
/// alongside the changes). A change by someone else is still listed.
#[test]
fn the_checks_after_a_router_add_list_nothing_until_the_ruleset_moves() {
    let topo = Topology::new();
    let nft = HangingNft::new();
    let config = enforcer_tests::Scratch::file("cfg", "glue_check_secs = 1\n");
    let daemon = Daemon::start_with_env(None, &["--config", config.path()], &[("PATH", &nft.path_env())]);
    // (The reference table made at start, in a scratch namespace, was
    // listed once.)
    daemon.add_router(&topo.router_id);
    let listed = nft.listings();
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    let rounds = status()["check_rounds"].as_u64().unwrap();
    eventually("two more check rounds", || status()["check_rounds"].as_u64().unwrap() >= rounds + 2);
    assert_eq!(status()["routers"][0]["glue"], "intact");
    assert_eq!(nft.listings(), listed, "nft runs:\n{}", std::fs::read_to_string(&nft.runs).unwrap_or_default());

    // Someone else's commit (a table of their own) moves the generation:
    // the next check lists the glue, finds it intact, and the one after
    // that lists nothing again.
    topo.router.sh("nft", &["add", "table", "inet", "someone-else"]);
    eventually("a listing", || nft.listings() == listed + 1);
    let rounds = status()["check_rounds"].as_u64().unwrap();
    eventually("two more check rounds", || status()["check_rounds"].as_u64().unwrap() >= rounds + 2);
    assert_eq!(nft.listings(), listed + 1);
    assert_eq!(status()["routers"][0]["glue"], "intact");
}

#[test]
fn glue_removed_or_changed_in_part_is_put_back_and_reported() {
    let topo = Topology::new();
    let (daemon, _config) = checked_every_second(&topo);
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    eventually("the first check", || status()["routers"][0]["glue"] == "intact");
    let glue = || topo.router.sh("nft", &["list", "table", "inet", "enforcer"]);
    let installed = glue();

    // Everything gone.
    topo.router.sh("nft", &["flush", "ruleset"]);
    eventually("the repair of a flushed ruleset", || status()["glue_repairs"] == 1);
    assert_eq!(glue(), installed, "put back exactly as installed");

    // One rule gone: the table is still there, only the whole check sees it.
    let listed = topo.router.sh("nft", &["-a", "list", "chain", "inet", "enforcer", "pre"]);
    let handle = listed.lines().rev().find_map(|l| l.rsplit_once("# handle ")).expect("a rule with a handle").1.trim().to_string();
    topo.router.sh("nft", &["delete", "rule", "inet", "enforcer", "pre", "handle", &handle]);
    assert_ne!(glue(), installed);
    eventually("the repair of a deleted rule", || status()["glue_repairs"] == 2);
    assert_eq!(glue(), installed);
    assert_eq!(status()["routers"][0]["glue"], "intact");
    assert_eq!(status()["drift"]["glue_installed"], 0);

    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    let repairs: Vec<&serde_json::Value> = audit.as_array().unwrap().iter().filter(|e| e["op"] == "glue_repair").collect();
    assert_eq!(repairs.len(), 2, "{audit}");
    assert_eq!(repairs[0]["before"]["glue"], "missing");
    assert_eq!(repairs[1]["before"]["glue"], "altered");
    assert!(repairs.iter().all(|e| e["router_id"] == topo.router_id.as_str() && e["result"] == "ok"));
}

/// Detaches the tcx link pinned at `pin` from outside (bpf(2)
/// BPF_LINK_DETACH), leaving the pin in place: what a stray `bpftool link
/// detach` does.
fn detach_pinned_link(pin: &std::path::Path) {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let fd = enforcer_tests::bpf(7, &[path.as_ptr() as u64, 0u64], "opening the pinned link (BPF_OBJ_GET)");
    enforcer_tests::bpf(34, &[fd as u32, 0u32, 0, 0], "detaching it (BPF_LINK_DETACH)");
    // SAFETY: our descriptor.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn an_attachment_removed_behind_the_pins_is_found_in_the_kernel_and_put_back() {
    let topo = Topology::new();
    let (daemon, _config) = checked_every_second(&topo);
    // Let the router's link watcher start (its first re-sync would put the
    // attachment back before the periodic check could notice).
    std::thread::sleep(Duration::from_millis(1500));
    let full = daemon.attachments(&topo.router);
    let pins = daemon.pins();
    match pins.iter().find(|p| p.contains("/routers/") && p.ends_with("_tag")) {
        // tcx: the pin stays, so only the kernel can tell.
        Some(pin) => detach_pinned_link(std::path::Path::new(pin)),
        // netlink: the filter itself.
        None => {
            let pref = enforcer::kernel::attach::NETLINK_PRIORITY.to_string();
            enforcer_tests::run(topo.router.cmd("tc").args(["filter", "del", "dev", &topo.client_if, "ingress", "pref", &pref]));
        }
    }
    assert_eq!(daemon.attachments(&topo.router), full - 1);
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status()["link_repairs"] != 1 {
        assert!(Instant::now() < deadline, "no repair:\n{}\n{}", status(), daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(daemon.attachments(&topo.router), full, "put back, and no second copy");
    assert_eq!(status()["drift"]["links_attached"], 0);
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    assert!(audit.as_array().unwrap().iter().any(|e| e["op"] == "link_repair" && e["router_id"] == topo.router_id.as_str()), "{audit}");
}

#[test]
fn a_rule_removed_from_the_maps_is_put_back_by_the_check() {
    let topo = Topology::new();
    let (daemon, _config) = checked_every_second(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    FtpClient::login(&topo, Family::V4).ok("list passive");

    // What a stray `bpftool map delete` does: the rule goes, behind the
    // daemon's back.
    let pin = aya::maps::MapData::from_pin(daemon.bpffs.join(enforcer_common::MAP_RULES)).unwrap();
    let mut rules: aya::maps::HashMap<_, enforcer_common::RuleKey, enforcer_common::RuleValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pin)).unwrap();
    let key = rules.keys().map(Result::unwrap).find(|k| k.port == 21).expect("the FTP rule in the map");
    rules.remove(&key).unwrap();
    let dumped = daemon.dump();
    assert!(dumped["slots"].as_array().unwrap().iter().all(|s| s["port"].is_null()), "no slot has its rule: {dumped}");

    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    eventually("the repair of the maps", || status()["map_repairs"] == 1);
    assert_eq!(daemon.live_ports(), vec![21], "put back");
    assert_eq!(status()["drift"]["maps"]["rules_added"], 0);
    FtpClient::login(&topo, Family::V4).ok("list passive");
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    let repair = audit.as_array().unwrap().iter().find(|e| e["op"] == "map_repair").unwrap_or_else(|| panic!("no map_repair in {audit}"));
    assert_eq!(repair["before"]["maps"]["rules_added"], 1, "{repair}");
}

/// Helpers created and deleted while a check reads the maps without the
/// lock show there as drift: the check reads those entries again under the
/// lock and finds them in line, without checking (or repairing) the whole
/// maps there.
#[test]
fn changes_made_while_the_maps_are_checked_are_read_again_not_repaired() {
    let topo = Topology::new();
    let (daemon, _config) = checked_every_second(&topo);
    // Enough rules that a check without the lock reads for a while.
    let helpers: Vec<_> = (0..2000).map(|i| json!({"protocol": "udp", "port": 20_000 + i, "helper": "tftp"})).collect();
    let set = daemon.session().request(&json!({"op": "helper_set", "router_id": topo.router_id, "helpers": helpers})).unwrap();
    assert!(set.get("ok").is_some(), "{set}");
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status()["map_rechecks"].as_u64().expect("map_rechecks in status") == 0 {
        assert!(Instant::now() < deadline, "no check met a change in 60 s:\n{}\n{}", status(), daemon.log());
        let router = topo.router_id.clone();
        let created = daemon.pipelined(4, 250, move |c, i| {
            json!({"op": "helper_create", "router_id": router, "protocol": "tcp", "port": 30_000 + c * 250 + i, "helper": "ftp"})
        });
        let ids: Vec<String> = created.iter().map(|(req, a)| a["ok"]["id"].as_str().unwrap_or_else(|| panic!("{req}: {a}")).to_string()).collect();
        let (router, ids) = (topo.router_id.clone(), std::sync::Arc::new(ids));
        for (req, a) in daemon.pipelined(4, 250, move |c, i| json!({"op": "helper_delete", "router_id": router, "helper_id": ids[(c * 250 + i) as usize]})) {
            assert!(a.get("ok").is_some(), "{req}: {a}");
        }
    }
    let now = status();
    assert_eq!(now["map_repairs"], 0, "nothing differed from the store:\n{}", daemon.log());
    assert!(now["drift"]["maps"].as_object().unwrap().values().all(|n| n == 0), "no drift left: {now}");
    assert_eq!(daemon.live_ports().len(), 2000, "the set's rules, and no other");
}

/// A daemon checking every second and an FTP helper on port 21 that a
/// session is using: (daemon, its configuration, helper id, server, session).
fn ftp_in_use(topo: &Topology) -> (Daemon, enforcer_tests::Scratch, String, FtpServer, FtpClient) {
    let (daemon, config) = checked_every_second(topo);
    let id = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let server = FtpServer::start(topo, Family::V4);
    let mut ftp = FtpClient::login(topo, Family::V4);
    ftp.ok("list passive");
    (daemon, config, id, server, ftp)
}

#[test]
fn a_live_slot_whose_counters_were_lost_is_counted_as_having_tagged() {
    let topo = Topology::new();
    let (daemon, _config, id, _server, mut ftp) = ftp_in_use(&topo);

    // The counters go behind the daemon's back (their entry freed): how
    // many packets the slot tagged is unknown now.
    let pin = aya::maps::MapData::from_pin(daemon.bpffs.join(enforcer_common::MAP_COUNTERS)).unwrap();
    let taken = enforcer::kernel::counters::scan(&pin).unwrap();
    assert_eq!(taken.len(), 1, "one slot counted");
    assert!(taken[0].1.tagged > 0, "{taken:?}");
    let mut counters = aya::maps::Array::<_, enforcer_common::Counters>::try_from(aya::maps::Map::Array(pin)).unwrap();
    counters.set(taken[0].0, enforcer_common::Counters::default(), 0).unwrap();
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    eventually("the repair of the maps", || status()["map_repairs"] == 1);

    // So its delete cleans conntrack instead of trusting a zero.
    let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
    assert_eq!(report["never_tagged"], json!(null), "{report}");
    assert!(report["conntrack_entries_removed"].as_u64().unwrap() >= 1, "{report}");
    ftp.fails("noop");
}

#[test]
fn the_maps_of_an_earlier_release_are_unpinned_at_start() {
    let topo = Topology::new();
    let mut daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    // Any map pinned under an old name stands for the old one: the per-CPU
    // counters, the counters by slot, the live slots and the ports list.
    let legacy = [enforcer_common::MAP_COUNTERS_PER_CPU, enforcer_common::MAP_SLOT_COUNTERS, enforcer_common::MAP_SLOTS, enforcer_common::MAP_PORTS]
        .map(|name| daemon.bpffs.join(name));
    for pin in &legacy {
        aya::maps::MapData::from_pin(daemon.bpffs.join(enforcer_common::MAP_COUNTERS)).unwrap().pin(pin).unwrap();
    }
    // And the rules as those releases wrote them: naming no counters, which
    // this build's array does not hold yet.
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    std::fs::remove_file(daemon.bpffs.join(enforcer_common::MAP_COUNTERS)).unwrap();
    let pin = aya::maps::MapData::from_pin(daemon.bpffs.join(enforcer_common::MAP_RULES)).unwrap();
    let mut rules = aya::maps::HashMap::<_, enforcer_common::RuleKey, enforcer_common::RuleValue>::try_from(aya::maps::Map::HashMap(pin)).unwrap();
    let old: Vec<_> = rules.iter().map(Result::unwrap).collect();
    for (k, v) in &old {
        rules.insert(k, enforcer_common::RuleValue::new(v.slot, v.helper), 0).unwrap();
    }
    daemon.restart();
    for pin in &legacy {
        assert!(!pin.exists(), "the old pin {} is gone", pin.display());
    }
    assert_eq!(daemon.live_ports(), vec![21], "enforcement goes on");
    let slot = &daemon.dump()["slots"][0];
    assert_eq!(slot["state"], "live", "a slot is live while its rule is there: {slot}");
    // What the slot tagged before is unknown: counted as having tagged, so
    // that its delete cleans conntrack.
    assert_eq!(slot["tagged"], 1, "{slot}");
    let new: Vec<_> = rules.iter().map(Result::unwrap).collect();
    assert!(new.iter().all(|(_, v)| v.counter != enforcer_common::NO_COUNTER), "each rule names its counters: {new:?}");
}

#[test]
fn the_check_leaves_alone_what_revoked_slots_still_count() {
    let topo = Topology::new();
    let (daemon, _config, id, _server, mut ftp) = ftp_in_use(&topo);
    // Its flows are kept dropped, counted on the revoked slot.
    daemon.delete_helper(&topo.router_id, &id);
    ftp.fails("noop");
    let status = || daemon.cli(&["status", "-o", "json"]).ok().json();
    let rounds = status()["check_rounds"].as_u64().unwrap();
    eventually("two more check rounds", || status()["check_rounds"].as_u64().unwrap() >= rounds + 2);
    assert_eq!(status()["map_repairs"], 0, "nothing differed from the store:\n{}", daemon.log());
    let dump = daemon.dump();
    assert_eq!(dump["slots"][0]["state"], "revoked", "{dump}");
    assert!(dump["slots"][0]["dropped"].as_u64().unwrap() > 0, "{dump}");
}

#[test]
fn long_reads_do_not_hold_up_writers() {
    let topo = Topology::new();
    let scratch = enforcer_tests::Scratch::dir("state");
    let state = scratch.0.clone();
    // An audit log of some 20 MB, as a busy node accumulates (reading it
    // takes far longer than the 100 ms a write may wait).
    let line = format!(
        "{{\"time\":\"2026-01-01T00:00:00Z\",\"caller\":{{\"uid\":0,\"gid\":0,\"pid\":1,\"groups\":[]}},\"op\":\"helper_create\",\"router_id\":\"{}\",\"result\":\"ok\"}}\n",
        topo.router_id
    );
    let mut log = Vec::with_capacity(20 << 20);
    while log.len() < 20 << 20 {
        log.extend_from_slice(line.as_bytes());
    }
    std::fs::write(state.join("audit.jsonl"), &log).unwrap();
    drop(log);
    let daemon = Daemon::start_with(Some(state.clone()), &[]);
    daemon.add_router(&topo.router_id);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let reads = std::sync::atomic::AtomicUsize::new(0);
    let took = std::thread::scope(|s| {
        s.spawn(|| {
            let mut session = daemon.session();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for req in [json!({"op": "audit"}), json!({"op": "maps_dump"})] {
                    assert!(session.request(&req).expect("answered").get("ok").is_some());
                }
                reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut session = daemon.session();
        let mut took = Vec::new();
        for port in 4000..4030 {
            let req = json!({"op": "helper_create", "router_id": topo.router_id, "protocol": "tcp", "port": port, "helper": "ftp"});
            let t = Instant::now();
            assert!(session.request(&req).expect("answered").get("ok").is_some());
            took.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(30));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        took
    });
    let slowest = took.iter().max().copied().unwrap_or_default();
    let reads = reads.into_inner();
    eprintln!("writes while {reads} full audit reads ran: slowest {slowest:?}");
    assert!(reads >= 1, "the reads ran alongside");
    assert!(slowest < Duration::from_millis(100), "a write waited {slowest:?} behind a read");
}

#[test]
fn after_a_restart_reads_are_answered_at_once_and_writes_wait_for_the_reconciliation() {
    let a = Topology::new();
    let nft = HangingNft::new();
    let path = nft.path_env();
    let mut daemon = Daemon::start_with_env(None, &[], &[("PATH", &path)]);
    daemon.add_router(&a.router_id);
    let helper = daemon.create_helper(&a.router_id, "tcp", 21, "ftp");
    // Every nft run takes a second longer, and a change by someone else in
    // the router's ruleset means the glue check at start lists the table:
    // it takes a few seconds.
    nft.slow(true);
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    a.router.sh("nft", &["add", "table", "inet", "someone-else"]);
    daemon.spawn();
    enforcer_tests::wait_for("the API to answer", 30, || std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok());
    let mut session = daemon.session();
    let status = session.request(&json!({"op": "status"})).unwrap();
    assert_eq!(status["ok"]["ready"], false, "still reconciling: {status}");
    let t = Instant::now();
    let listed = session.request(&json!({"op": "helper_list", "router_id": a.router_id})).unwrap();
    assert!(t.elapsed() < Duration::from_millis(500), "a read is answered at once: {:?}", t.elapsed());
    assert_eq!(listed["ok"][0]["id"], helper.as_str(), "from the store: {listed}");
    // A write waits for the reconciliation, then goes through.
    let created = session.request(&json!({"op": "helper_create", "router_id": a.router_id, "protocol": "tcp", "port": 2121, "helper": "ftp"})).unwrap();
    assert!(created.get("ok").is_some(), "{created}");
    let status = session.request(&json!({"op": "status"})).unwrap();
    assert_eq!(status["ok"]["ready"], true, "the write was applied after the reconciliation: {status}");
    assert!(status["ok"]["ready_after_ms"].as_u64().unwrap() >= 1000, "{status}");
    nft.slow(false);
    assert_eq!(daemon.live_ports(), vec![21, 2121]);
}

#[test]
fn a_host_without_nft_is_refused_naming_it_before_anything_changes() {
    enforcer_tests::require_root();
    let dir = std::env::temp_dir().join(unique("nofeat"));
    let empty = dir.join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let bpffs = PathBuf::from("/sys/fs/bpf").join(unique("nofeat"));
    let out = std::process::Command::new(enforcer_tests::enforcer_bin())
        .arg("--socket")
        .arg(dir.join("enforcer.sock"))
        .args(["daemon", "--attach", "netlink", "--bpffs"])
        .arg(&bpffs)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("PATH", &empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let made = (bpffs.exists(), dir.join("state").exists(), dir.join("enforcer.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir(&bpffs);
    assert!(!out.status.success(), "started without nft:\n{stderr}");
    assert!(stderr.contains("lacks what enforcer needs"), "{stderr}");
    assert!(stderr.contains("`nft` command"), "the missing tool is named:\n{stderr}");
    // Netlink attach asks rtnetlink itself: it needs no `tc` command.
    assert!(!stderr.contains("`tc`"), "tc is not needed:\n{stderr}");
    assert!(!stderr.contains("BPF hash maps") && !stderr.contains("connection tracking"), "only what is missing is named:\n{stderr}");
    assert_eq!(made, (false, false, false), "nothing was made: bpffs directory, store, socket");
}

#[test]
fn netlink_mode_attaches_on_a_host_without_tc() {
    enforcer_tests::require_root();
    // A PATH with the tools the daemon runs, and no `tc`.
    let bin = enforcer_tests::Scratch::dir("notc");
    let path = &bin.0;
    for tool in ["nft", "iptables", "ip6tables"] {
        let found = enforcer_tests::run(std::process::Command::new("sh").args(["-c", &format!("command -v {tool} || true")])).stdout;
        let found = String::from_utf8(found).unwrap();
        if !found.trim().is_empty() {
            std::os::unix::fs::symlink(found.trim(), path.join(tool)).unwrap();
        }
    }
    let topo = Topology::new();
    let daemon = Daemon::start_with_env(None, &["--attach", "netlink"], &[("PATH", bin.path())]);
    daemon.add_router(&topo.router_id);
    let attached = daemon.attachments(&topo.router);
    daemon.cli(&["router", "remove", &topo.router_id]).ok();
    let detached = daemon.attachments(&topo.router);
    assert_eq!(attached, 2, "tag on r0 and r1, found and attached with no `tc` to run");
    assert_eq!(detached, 0, "and detached");
}
