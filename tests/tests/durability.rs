//! Durability: enforcement outlives the daemon, a crash loses no
//! acknowledged change, bad storage changes nothing, nothing leaks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use enforcer_tests::{
    Daemon, Family, Topology,
    peers::{FtpClient, FtpServer},
    run, wait_for,
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

#[test]
fn enforcement_continues_while_the_daemon_is_down() {
    let kept = Topology::new();
    let revoked = Topology::new();
    let mut daemon = Daemon::start();
    daemon.add_router(&kept.router_id);
    daemon.add_router(&revoked.router_id);
    daemon.create_helper(&kept.router_id, "tcp", 21, "ftp");
    let gone = daemon.create_helper(&revoked.router_id, "tcp", 21, "ftp");
    let _s1 = FtpServer::start(&kept, Family::V4);
    let _s2 = FtpServer::start(&revoked, Family::V4);
    let mut old = FtpClient::login(&revoked, Family::V4);
    old.ok("list passive");
    daemon.delete_helper(&revoked.router_id, &gone);

    daemon.stop(Signal::SIGTERM);
    // Down: the allowed helper still works, the revoked one stays revoked.
    FtpClient::login(&kept, Family::V4).ok("list passive");
    old.fails("noop");
    FtpClient::login(&revoked, Family::V4).fails("list passive");
    assert_eq!(daemon.live_ports(), vec![21], "maps dump reads the pins with the daemon down");

    daemon.restart();
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(status["started_with"]["links_attached"], 0, "nothing had to be re-attached: {status}");
    assert_eq!(status["started_with"]["maps"]["rules_added"], 0, "{status}");
    assert_eq!(status["drift"]["maps"], json!({"rules_added":0,"rules_removed":0,"counters_added":0,"counters_removed":0,"routers_added":0,"routers_removed":0,"filter_fixed":0}));
    FtpClient::login(&kept, Family::V4).ok("list passive");
    old.fails("noop");
}

#[test]
fn restart_restores_what_is_missing_and_removes_orphans() {
    let topo = Topology::new();
    let mut daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    daemon.stop(Signal::SIGTERM);
    // Damage the kernel side behind the daemon's back: glue, a link pin, a
    // rule; and plant an orphan router's pin directory. The iptables glue of
    // earlier versions, planted too, goes with the first new install.
    assert!(topo.router.ruleset().contains("table inet enforcer"));
    run(topo.router.cmd("nft").args(["delete", "table", "inet", "enforcer"]));
    for tool in ["iptables", "ip6tables"] {
        for (table, chain) in [("raw", "ENFORCER-HELPERS"), ("mangle", "ENFORCER-CONNMARK")] {
            run(topo.router.cmd(tool).args(["-t", table, "-N", chain]));
            run(topo.router.cmd(tool).args(["-t", table, "-A", chain, "-p", "tcp", "-j", "ACCEPT"]));
            run(topo.router.cmd(tool).args(["-t", table, "-I", "PREROUTING", "1", "-j", chain]));
        }
    }
    let before = daemon.attachments(&topo.router);
    match daemon.pins().into_iter().find(|p| p.contains("/routers/") && p.ends_with("_tag")) {
        Some(link) => std::fs::remove_file(&link).unwrap(),
        // netlink mode: the filter itself.
        None => {
            let pref = enforcer::kernel::attach::NETLINK_PRIORITY.to_string();
            run(topo.router.cmd("tc").args(["filter", "del", "dev", "r0", "ingress", "pref", &pref]));
        }
    }
    // A link pin's removal frees the link from a kernel work queue, a moment
    // later.
    wait_for("the unpinned link's detach", 5, || daemon.attachments(&topo.router) == before - 1);
    std::fs::create_dir_all(daemon.bpffs.join("routers/4242")).unwrap();

    daemon.restart();
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    let started = &status["started_with"];
    assert_eq!(started["glue_installed"], 1, "{status}");
    assert_eq!(started["links_attached"], 1, "{status}");
    assert_eq!(started["orphan_routers_removed"], 1, "{status}");
    assert!(status["drift"]["glue_installed"] == 0 && status["drift"]["links_attached"] == 0, "{status}");
    assert!(!daemon.bpffs.join("routers/4242").exists());
    assert_eq!(daemon.attachments(&topo.router), before, "restored, and no second copy");
    let rules = topo.router.ruleset();
    assert!(rules.contains("table inet enforcer") && !rules.contains("ENFORCER-"), "old glue removed, new in place:\n{rules}");
    let _server = FtpServer::start(&topo, Family::V4);
    FtpClient::login(&topo, Family::V4).ok("list passive");
}

#[test]
fn kill_9_during_bulk_create_loses_nothing_acknowledged() {
    let topo = Topology::new();
    let mut daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let acked = Arc::new(AtomicUsize::new(0));
    let mut session = daemon.session();
    let router = topo.router_id.clone();
    let counter = acked.clone();
    let writer = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for port in 1000..2000 {
            let req = json!({"op": "helper_create", "router_id": router, "protocol": "tcp", "port": port, "helper": "ftp"});
            match session.request(&req) {
                Ok(Value::Object(m)) if m.contains_key("ok") => {
                    ids.push((m["ok"]["id"].as_str().unwrap().to_string(), port as u64));
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                Ok(other) => panic!("refused: {other}"),
                Err(_) => break, // the daemon died
            }
        }
        ids
    });
    while acked.load(Ordering::SeqCst) < 300 {
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon.stop(Signal::SIGKILL);
    let acknowledged = writer.join().unwrap();
    assert!(acknowledged.len() >= 300 && acknowledged.len() < 1000, "killed mid-way: {}", acknowledged.len());
    // A power loss on top: the audit log's last line, written after its
    // group's one sync (the store's), reached the disk only in part.
    let log = daemon.state.join("audit.jsonl");
    let text = std::fs::read(&log).unwrap();
    let last = text[..text.len() - 1].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    std::fs::write(&log, &text[..last + (text.len() - last) / 2]).unwrap();

    daemon.restart();
    let listed: Vec<Value> = daemon.cli(&["helper", "list", "-o", "json"]).ok().json().as_array().unwrap().clone();
    for (id, port) in &acknowledged {
        assert!(listed.iter().any(|h| h["id"] == id.as_str() && h["port"] == *port), "acknowledged helper {id} on {port} lost");
    }
    // At most the one request in flight may have committed unacknowledged.
    assert!(listed.len() - acknowledged.len() <= 1);
    // Every acknowledged change is audited once, the cut entry included
    // (from the store's journal), numbered without a gap.
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    let creates: Vec<&Value> = audit.as_array().unwrap().iter().filter(|e| e["op"] == "helper_create" && e["result"] == "ok").collect();
    for (id, _) in &acknowledged {
        assert_eq!(creates.iter().filter(|e| e["helper_id"] == id.as_str()).count(), 1, "acknowledged create of {id} audited once");
    }
    assert_eq!(creates.len(), listed.len(), "an entry for each create kept, and only those");
    let seqs: Vec<u64> = audit.as_array().unwrap().iter().map(|e| e["seq"].as_u64().expect("numbered")).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "numbered without gap or repeat: {seqs:?}");
    // None half-applied: store and kernel agree rule by rule.
    assert_eq!(daemon.helper_ports(), daemon.live_ports());
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(status["drift"]["maps"]["rules_added"], 0, "{status}");
}

#[test]
fn corrupt_store_refuses_to_start_and_leaves_the_kernel_alone() {
    let topo = Topology::new();
    let mut daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    daemon.stop(Signal::SIGTERM);
    let before = (daemon.dump(), daemon.pins(), topo.router.ruleset().lines().count());

    let db = daemon.state.join("enforcer.redb");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b ^= 0x5a;
    }
    std::fs::write(&db, bytes).unwrap();

    let (status, log) = daemon.restart_refused();
    assert!(!status.success());
    assert!(log.contains("store") && log.contains("left as it is"), "a clear message:\n{log}");
    let after = (daemon.dump(), daemon.pins(), topo.router.ruleset().lines().count());
    assert_eq!(before, after, "kernel state unchanged");
}

#[test]
fn full_state_filesystem_is_a_clear_error_with_no_partial_change() {
    let topo = Topology::new();
    let fs = enforcer_tests::Tmpfs::mount("2m");
    let state = fs.0.join("state");
    let daemon = Daemon::start_with(Some(state), &[]);
    daemon.add_router(&topo.router_id);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let filler = fs.fill();

    let mut refused = None;
    for port in 2000..2400 {
        let out = daemon.cli(&["helper", "create", &topo.router_id, "--protocol", "tcp", "--port", &port.to_string(), "--helper", "ftp"]);
        if out.code != 0 {
            refused = Some((port, out.stderr));
            break;
        }
    }
    let (port, message) = refused.expect("a full filesystem refuses a change");
    assert!(message.contains("No space left") || message.contains("space"), "clear error: {message}");
    assert!(!daemon.helper_ports().contains(&port), "the refused helper is not stored");
    assert_eq!(daemon.helper_ports(), daemon.live_ports(), "store and kernel agree");
    std::fs::remove_file(&filler).unwrap();
    drop(daemon);
}

#[test]
fn cycles_leave_nothing_behind() {
    let topo = Topology::new();
    let daemon = Daemon::start();
    let r = topo.router_id.as_str();
    daemon.add_router(r);
    let netfilter = || {
        topo.router.ruleset().lines().count()
    };
    let measure = || {
        let status = daemon.cli(&["status", "-o", "json"]).ok().json();
        (
            daemon.programs(),
            daemon.pins(),
            daemon.dump()["slots"].as_array().unwrap().len(),
            status["revoked_flows"].as_u64().unwrap(),
            status["quarantined_slots"].as_u64().unwrap(),
            netfilter(),
            topo.conntrack(&["-L"]).lines().count(),
        )
    };
    let mut session = daemon.session();
    let mut cycle = |port: u64| {
        let created = session.request(&json!({"op": "helper_create", "router_id": r, "protocol": "tcp", "port": port, "helper": "ftp"})).unwrap();
        let id = created["ok"]["id"].as_str().unwrap_or_else(|| panic!("{created}")).to_string();
        let deleted = session.request(&json!({"op": "helper_delete", "router_id": r, "helper_id": id})).unwrap();
        assert_eq!(deleted["ok"]["slot_released"], true, "{deleted}");
    };
    // Everything the kernel holds before the cycles: after them, once the
    // daemon's housekeeping ran, it must be the same.
    let baseline = measure();
    let settled = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = measure();
            if now == baseline {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what} did not return to the baseline:\n{now:?}\n{baseline:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    for i in 0..500 {
        cycle(1000 + i % 60000);
    }
    let rss_start = daemon.rss_kib();
    for i in 0..10_000 {
        cycle(1000 + i % 60000);
    }
    settled("helper cycles");
    let rss_end = daemon.rss_kib();
    assert!(rss_end < rss_start + 4096, "daemon memory flat: {rss_start} KiB -> {rss_end} KiB");

    let programs_with_router = daemon.programs();
    for _ in 0..100 {
        daemon.cli(&["router", "remove", r]).ok();
        daemon.add_router(r);
    }
    settled("router cycles");
    assert_eq!(daemon.programs(), programs_with_router, "router cycles leave no program behind");
    daemon.cli(&["router", "remove", r]).ok();
    let rules = topo.router.ruleset();
    assert!(!rules.to_lowercase().contains("enforcer"), "no glue left:\n{rules}");
    // The kernel frees programs after an RCU grace period.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while daemon.programs() != 2 {
        assert!(std::time::Instant::now() < deadline, "only the control instance's tag and classify are left: {}", daemon.programs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn teardown_removes_all_enforcement_and_stops() {
    let topo = Topology::new();
    let mut daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut old = FtpClient::login(&topo, Family::V4);
    old.ok("list passive");
    let programs = daemon.programs();
    assert!(programs >= 2, "router instance and control instance");

    daemon.cli(&["teardown"]).ok();
    let exited = daemon.process.child.wait().unwrap();
    assert!(exited.success(), "the daemon stops after a teardown");
    assert!(!daemon.bpffs.exists(), "every pin is gone");
    let rules = topo.router.sh("iptables-save", &[]) + &topo.router.sh("ip6tables-save", &[]);
    assert!(!rules.contains("ENFORCER"), "glue removed:\n{rules}");
    assert!(!topo.conntrack(&["-L"]).contains("helper=ftp"), "helper state flushed");
    // Nothing enforces any more: a new connection gets no helper.
    FtpClient::login(&topo, Family::V4).fails("list passive");
}

/// Pins a new, empty BPF map at `path` (raw bpf(2): the test plays an
/// earlier version that made its maps differently).
fn pin_map(path: &std::path::Path, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) {
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[map_type, key_size, value_size, max_entries]);
    let fd = enforcer_tests::bpf(0, &attr, "creating a map (BPF_MAP_CREATE)");
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    enforcer_tests::bpf(6, &[name.as_ptr() as u64, fd as u64], "pinning the map (BPF_OBJ_PIN)");
    // SAFETY: our descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn pinned_maps_of_another_layout_or_capacity_are_refused_not_reused() {
    let topo = Topology::new();
    let config = enforcer_tests::Scratch::file("cfg", "revoked_flows_max = 65536\n");
    let mut daemon = Daemon::start_with(None, &["--config", config.path()]);
    daemon.add_router(&topo.router_id);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    let before = daemon.dump();

    // Another capacity than the pinned map has.
    std::fs::write(&config.0, "revoked_flows_max = 1024\n").unwrap();
    let (status, log) = daemon.restart_refused();
    assert!(!status.success());
    assert!(log.contains("ENFORCER_REVOKED") && log.contains("capacity") && log.contains("left as it is"), "a clear message:\n{log}");

    // The map an earlier version made: LRU, with a 16-byte value.
    std::fs::write(&config.0, "revoked_flows_max = 65536\n").unwrap();
    let pinned = daemon.bpffs.join(enforcer_common::MAP_REVOKED);
    std::fs::remove_file(&pinned).unwrap();
    pin_map(&pinned, 9, std::mem::size_of::<enforcer_common::FlowKey>() as u32, 16, 65536);
    let (status, log) = daemon.restart_refused();
    assert!(!status.success());
    assert!(log.contains("another version"), "a clear message:\n{log}");
    assert_eq!(daemon.dump(), before, "enforcement left as it was");

    // Without the foreign map the daemon starts and makes its own.
    std::fs::remove_file(&pinned).unwrap();
    daemon.restart();
    let helpers = daemon.cli(&["helper", "list", "-o", "json"]).ok().json();
    assert_eq!(helpers.as_array().map(Vec::len), Some(1), "{helpers}");
}

/// An upgrade (programs other than those attached at the last start, here
/// the record of them changed by hand) replaces every router's programs in
/// place: the hooks are never without one, a connection made before goes
/// on, new ones get their helper. A plain restart replaces nothing.
#[test]
fn an_upgrade_replaces_the_programs_in_place_without_a_gap() {
    let topo = Topology::new();
    let mut daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("retr small.bin passive");
    let first = daemon.attached_programs(&topo.router);
    assert_eq!(first.len(), 2, "tag on both interfaces");

    // A plain restart: same programs, nothing replaced.
    daemon.restart();
    assert_eq!(daemon.attached_programs(&topo.router), first, "a restart keeps the programs");
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(status["started_with"]["programs_replaced"], 0, "{status}");

    // The upgrade, watched: the hooks never run fewer than two programs.
    let record = daemon.state.join("programs-attached");
    assert!(record.exists(), "the programs attached are recorded in the state directory");
    std::fs::write(&record, "an older build\n").unwrap();
    daemon.stop(Signal::SIGTERM);
    let fewest = Arc::new(AtomicUsize::new(usize::MAX));
    let watching = Arc::new(AtomicUsize::new(1));
    let watcher = {
        let (fewest, watching, ns, maps) = (fewest.clone(), watching.clone(), std::path::PathBuf::from(topo.router.path()), daemon.bpffs.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) == 1 {
                fewest.fetch_min(enforcer_tests::daemon::attached_programs(&maps, &ns).len(), Ordering::SeqCst);
            }
        })
    };
    daemon.restart();
    watching.store(0, Ordering::SeqCst);
    watcher.join().unwrap();
    assert_eq!(fewest.load(Ordering::SeqCst), 2, "the hooks always ran enforcer's programs");
    let upgraded = daemon.attached_programs(&topo.router);
    assert_eq!(upgraded.len(), 2, "no second copy");
    assert!(upgraded.iter().all(|id| !first.contains(id)), "every program replaced: {first:?} -> {upgraded:?}");
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(status["started_with"]["programs_replaced"], 2, "{status}");
    assert_ne!(std::fs::read_to_string(&record).unwrap(), "an older build\n", "the new programs are recorded");

    // The control connection made before the upgrade goes on, with its
    // helper, and so does a new one.
    ftp.ok("retr small.bin passive");
    FtpClient::login(&topo, Family::V4).ok("retr small.bin active");
}

/// Programs on the egress hook of `iface` in the namespace at `ns`: tcx
/// programs and classic bpf filters.
fn on_egress(ns: &std::path::Path, iface: &str) -> usize {
    use aya::programs::{SchedClassifier, TcAttachType};
    enforcer::kernel::netns::run_in(ns, || {
        let tcx = SchedClassifier::query_tcx(iface, TcAttachType::Egress)?.1.len();
        let out = std::process::Command::new("tc").args(["-j", "filter", "show", "dev", iface, "egress"]).output()?;
        let filters: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        // tc lists each filter under a line for its priority: only entries
        // with options are filters.
        let classic = filters.as_array().into_iter().flatten().filter(|f| f["kind"] == "bpf" && f["options"].is_object()).count();
        Ok(tcx + classic)
    })
    .expect("listing the egress hook")
}

/// Earlier releases also ran a program on egress. An upgrade detaches it
/// (tcx: its pinned link; netlink: its filter at enforcer's priority and
/// handle) and enforcement goes on with the one program on ingress.
#[test]
fn an_upgrade_detaches_the_egress_program_of_an_earlier_release() {
    use aya::programs::{SchedClassifier, TcAttachType, tc::{NlOptions, TcAttachOptions}};
    let topo = Topology::new();
    let mut daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let netlink = daemon.cli(&["status", "-o", "json"]).ok().json()["attach"] == "netlink";
    let ns = std::path::PathBuf::from(topo.router.path());
    // The upgrade happens with the daemon down: a running daemon that
    // re-syncs the router (on a late interface event) would take the
    // earlier release's pin away before the restart.
    daemon.stop(Signal::SIGTERM);

    // What the earlier release left on r0's egress hook, as it left it.
    let maps = std::path::PathBuf::from("/sys/fs/bpf").join(enforcer_tests::unique("legacy"));
    let _unpin = Unpin(maps.clone());
    let _datapath = enforcer::kernel::Datapath::load(&maps, enforcer_common::MarkLayout::DEFAULT, 1_000, Default::default()).expect("maps");
    let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&maps).load(enforcer::kernel::PROGRAMS).expect("programs");
    let prog: &mut SchedClassifier = ebpf.program_mut(enforcer_common::PROG_BASELINE_EMPTY).unwrap().try_into().unwrap();
    prog.load().unwrap();
    let (_, ifindex) = enforcer::kernel::netns::run_in(&ns, enforcer::kernel::netns::interfaces)
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == "r0")
        .expect("r0");
    enforcer::kernel::netns::run_in(&ns, || {
        if netlink {
            let options = NlOptions { priority: enforcer::kernel::attach::NETLINK_PRIORITY, handle: enforcer::kernel::attach::NETLINK_HANDLE, classid: None };
            let id = prog.attach_with_options("r0", TcAttachType::Egress, TcAttachOptions::Netlink(options))?;
            std::mem::forget(prog.take_link(id)?);
        } else {
            let id = prog.attach("r0", TcAttachType::Egress)?;
            let link: aya::programs::links::FdLink = prog.take_link(id)?.try_into()?;
            let dir = daemon.pins().into_iter().find_map(|p| p.split_once("/routers/").map(|(_, r)| r.split('/').next().unwrap_or_default().to_string())).expect("the router's pins");
            link.pin(daemon.bpffs.join("routers").join(dir).join(format!("if{ifindex}_{}", enforcer_common::PROG_LEGACY_ENFORCE)))?;
        }
        Ok(())
    })
    .expect("attaching the earlier release's egress program");
    assert_eq!(on_egress(&ns, "r0"), 1);
    // And its glue's postrouting chain.
    topo.router.sh("nft", &["add", "chain", "inet", "enforcer", "post", "{ type filter hook postrouting priority 300; }"]);

    // The upgrade.
    std::fs::write(daemon.state.join("programs-attached"), "an older build\n").unwrap();
    daemon.restart();
    assert_eq!(on_egress(&ns, "r0"), 0, "the earlier release's egress program is gone");
    assert_eq!(daemon.attachments(&topo.router), 2, "tag on both interfaces");
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(status["started_with"]["links_detached"], 1, "{status}");
    assert!(!topo.router.ruleset().contains("chain post"), "{}", topo.router.ruleset());
    let _server = FtpServer::start(&topo, Family::V4);
    FtpClient::login(&topo, Family::V4).ok("retr small.bin passive");
}

/// Removes a bpffs directory of the test's own when dropped, even on failure.
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
