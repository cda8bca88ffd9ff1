//! A network node with many routers: router add latency from the first to
//! the last, where its time goes, status and restart with all of them, the
//! daemon's memory through router churn, helper changes from many clients;
//! against the Neutron way's per-router resync (iptables-save and
//! iptables-restore of each router's raw table) on the same routers.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{Scale, baselines::install_neutron, empty::EmptyProgram, median, ms};
use crate::{Daemon, Netns, daemon::Session};

#[derive(Debug, Clone, Default)]
pub struct Results {
    pub routers: usize,
    pub helpers_per_router: usize,
    /// Each router add through the API, in order (ms).
    pub add_ms: Vec<f64>,
    /// Median ms of each part of a router add, from the daemon's log.
    pub add_parts: Vec<(String, f64)>,
    /// Router adds with attach = netlink (clsact filters instead of tcx
    /// links), on as many routers of their own (ms).
    pub add_netlink_ms: Vec<f64>,
    /// Router adds with tcx while the kernel's `rcu_expedited` is 1 (empty
    /// if they could not be measured, and why).
    pub add_expedited_ms: Vec<f64>,
    pub expedited_unmeasured: Option<String>,
    /// The kernel alone: the empty program attached with tcx to both links
    /// of a fresh veth pair, without enforcer (ms per pair).
    pub bare_tcx_ms: Vec<f64>,
    /// Setting each router's helpers with one request (ms).
    pub set_ms: Vec<f64>,
    /// `status` with every router (median ms).
    pub status_ms: f64,
    /// From the restart until the API answered, and until `status` said the
    /// state was verified and repaired (ms).
    pub restart_answer_ms: f64,
    pub restart_ready_ms: f64,
    /// The same, without the record of where each router's glue was last
    /// verified (every glue listed and compared).
    pub restart_cold_answer_ms: f64,
    pub restart_cold_ready_ms: f64,
    /// The Neutron way's resync of all routers (ms).
    pub neutron_resync_ms: f64,
    /// Daemon resident memory (MiB): empty, with every router, after a
    /// restart, and after churn (every router removed and added again).
    pub rss_empty: f64,
    pub rss_full: f64,
    pub rss_restarted: f64,
    pub rss_after_churn: f64,
    /// Helper creates per second from many clients on one router, each
    /// pipelining its requests (the median of [`ROUNDS`] rounds), deletes of
    /// them the same way (the median of one round fewer), and the number of
    /// clients; deletes of rules without connections, one client.
    pub creates_per_sec: f64,
    pub deletes_per_sec: f64,
    pub clients: usize,
    pub delete_p50_ms: f64,
    pub delete_p99_ms: f64,
    /// Changes per store commit in the concurrent creates (group commit).
    pub changes_per_commit: f64,
    /// One helper set request of this many helpers on a fresh router, and
    /// how long it took (ms).
    pub bulk_set: (usize, f64),
}

/// The daemon's memory budget per router beyond its first 64 MiB, as the
/// README states it: a router of ten helpers measured 17 to 20 KiB.
pub const KIB_PER_ROUTER: f64 = 32.0;

/// A router namespace with one veth pair, as a Neutron router has ports.
fn router_ns(id: &str) -> Netns {
    let ns = Netns::create(&format!("qrouter-{id}"));
    crate::run(ns.cmd("ip").args(["link", "add", "qr-a", "type", "veth", "peer", "name", "qg-a"]));
    crate::run(ns.cmd("ip").args(["link", "set", "qr-a", "up"]));
    crate::run(ns.cmd("ip").args(["link", "set", "qg-a", "up"]));
    ns
}

fn call(s: &mut Session, req: Value) -> Value {
    let answer = s.request(&req).expect("daemon answers");
    assert!(answer.get("ok").is_some(), "{req} refused: {answer}");
    answer["ok"].clone()
}

fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    ms(start.elapsed())
}

/// The daemon's resident memory once the step before has settled: what the
/// step freed is handed back within a second (housekeeping), and a reading
/// taken at once counted a restart's passing garbage as its state.
fn rss(daemon: &Daemon) -> f64 {
    std::thread::sleep(SETTLE);
    daemon.rss_kib() as f64 / 1024.0
}

const SETTLE: Duration = Duration::from_secs(3);

/// Ten helpers, as a router with many might have.
fn ten_helpers() -> Value {
    json!((0..10).map(|i| json!({"protocol": "tcp", "port": 2100 + i, "helper": "ftp"})).collect::<Vec<_>>())
}

/// `name=value` of a log line (escape codes stripped).
fn field(line: &str, name: &str) -> Option<f64> {
    let plain: String = line.split('\u{1b}').map(|part| part.split_once('m').map_or(part, |(_, rest)| rest)).collect();
    plain.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))?.parse().ok())
}

pub fn measure(scale: Scale) -> Results {
    let n = scale.pick(50, 1000);
    let mut out = Results { routers: n, helpers_per_router: 10, clients: 16, ..Default::default() };
    out.bare_tcx_ms = bare_tcx_pairs(scale.pick(20, 200));
    out.add_netlink_ms = netlink_adds(n);
    match expedited_adds(n) {
        Ok(adds) => out.add_expedited_ms = adds,
        Err(e) => out.expedited_unmeasured = Some(e),
    }
    let mut daemon = Daemon::start();
    out.rss_empty = rss(&daemon);
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let namespaces: Vec<Netns> = ids.iter().map(|id| router_ns(id)).collect();
    eprintln!("bench: {n} router namespaces made");
    let mut s = daemon.session();
    for id in &ids {
        out.add_ms.push(timed(|| {
            call(&mut s, json!({"op": "router_add", "router_id": id}));
        }));
    }
    let log = daemon.log();
    let added: Vec<&str> = log.lines().filter(|l| l.contains("router added")).collect();
    for part in ["glue_ms", "attach_ms", "store_ms"] {
        out.add_parts.push((part.to_string(), median(added.iter().filter_map(|l| field(l, part)).collect())));
    }
    for id in &ids {
        out.set_ms.push(timed(|| {
            call(&mut s, json!({"op": "helper_set", "router_id": id, "helpers": ten_helpers()}));
        }));
    }
    eprintln!("bench: {n} routers added with 10 helpers each");
    out.status_ms = median((0..5).map(|_| timed(|| drop(call(&mut s, json!({"op": "status"}))))).collect());
    out.rss_full = rss(&daemon);

    // Restart, cold: without the record of where each router's glue was
    // last verified (the first start after an upgrade from a version
    // without it), so every router's glue is listed and compared.
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    let _ = std::fs::remove_file(daemon.state.join("glue-verified.json"));
    (out.restart_cold_answer_ms, out.restart_cold_ready_ms) = restart(&mut daemon);
    // Restart, warm: the usual case; a router whose ruleset generation has
    // not moved since its last check needs no listing.
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.state.join("glue-verified.json").exists(), "the daemon kept no record of the verified glue");
    (out.restart_answer_ms, out.restart_ready_ms) = restart(&mut daemon);
    let mut s = daemon.session();
    out.rss_restarted = rss(&daemon);

    // Churn: every router removed and added again.
    for id in &ids {
        call(&mut s, json!({"op": "router_remove", "router_id": id}));
        call(&mut s, json!({"op": "router_add", "router_id": id}));
    }
    out.rss_after_churn = rss(&daemon);

    changes(&daemon, &ids[..ROUNDS.min(ids.len())], &mut out);
    let bulk = scale.pick(2000, 20_000);
    let specs: Vec<Value> = (0..bulk).map(|i| json!({"protocol": if i % 2 == 0 { "tcp" } else { "udp" }, "port": 1 + i / 2, "helper": "sip"})).collect();
    let took = timed(|| drop(call(&mut daemon.session(), json!({"op": "helper_set", "router_id": ids[1], "helpers": specs}))));
    out.bulk_set = (bulk, took);
    drop(daemon);

    // The Neutron way: each router's raw table with its helper chains, saved
    // and restored as the L3 agent does for every router when it resyncs.
    for ns in &namespaces {
        install_neutron(ns, 10);
    }
    out.neutron_resync_ms = timed(|| {
        for ns in &namespaces {
            let saved = ns.sh("iptables-save", &["-t", "raw"]);
            super::baselines::feed(ns, "iptables-restore", &[], &saved);
        }
    });
    eprintln!("bench: fleet done");
    drop(namespaces);
    out
}

/// The kernel's own time for the links a router add makes with tcx: the
/// empty program attached to both links of each of `n` fresh veth pairs,
/// without enforcer (ms per pair). Each attach waits for an RCU grace
/// period under the RTNL lock, and so does each detach: the links are let
/// go while the kernel expedites grace periods, so that the teardown does
/// not hold the lock through the next section.
fn bare_tcx_pairs(n: usize) -> Vec<f64> {
    let mut program = EmptyProgram::load();
    let namespaces: Vec<Netns> = (0..n).map(|_| router_ns(&uuid::Uuid::new_v4().to_string())).collect();
    let mut links = Vec::new();
    let pairs = namespaces
        .iter()
        .map(|ns| timed(|| links.extend(["qr-a", "qg-a"].map(|iface| program.attach(Path::new(&ns.path()), iface)))))
        .collect();
    let expedited = Expedited::on();
    if let Err(e) = &expedited {
        eprintln!("bench: tearing down {} tcx links without expedited grace periods ({e})", links.len());
    }
    drop(links);
    pairs
}

/// Router adds with netlink filters (ms), on `n` routers of their own. Run
/// first: tearing down a thousand tcx links takes the kernel tens of
/// seconds (a grace period each, under the RTNL lock), and a daemon
/// started meanwhile waits for that lock.
fn netlink_adds(n: usize) -> Vec<f64> {
    let daemon = Daemon::start_with(None, &["--attach", "netlink"]);
    let mut s = daemon.session();
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let _namespaces: Vec<Netns> = ids.iter().map(|id| router_ns(id)).collect();
    ids.iter().map(|id| timed(|| drop(call(&mut s, json!({"op": "router_add", "router_id": id}))))).collect()
}

/// The kernel's `rcu_expedited` switch, set to 1 for as long as this lives
/// and put back as it was (also when the bench panics).
struct Expedited(String);

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

impl Expedited {
    fn on() -> Result<Self, String> {
        let was = std::fs::read_to_string(RCU_EXPEDITED).map_err(|e| format!("reading {RCU_EXPEDITED}: {e}"))?;
        std::fs::write(RCU_EXPEDITED, "1").map_err(|e| format!("writing {RCU_EXPEDITED}: {e}"))?;
        Ok(Self(was.trim().to_string()))
    }
}

impl Drop for Expedited {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(RCU_EXPEDITED, &self.0) {
            eprintln!("bench: could not put {RCU_EXPEDITED} back to {}: {e}", self.0);
        }
    }
}

/// Router adds with tcx (the default) while the kernel expedites RCU grace
/// periods: a host-wide setting an operator may choose (it interrupts
/// every CPU to end a grace period early), set here for these routers only
/// to show what of an add is the grace period. They are removed again
/// while it is on: links left to the namespaces' teardown would go in the
/// background at a grace period each, holding the RTNL lock while the
/// next section adds its routers.
fn expedited_adds(n: usize) -> Result<Vec<f64>, String> {
    let _expedited = Expedited::on()?;
    let daemon = Daemon::start();
    let mut s = daemon.session();
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let _namespaces: Vec<Netns> = ids.iter().map(|id| router_ns(id)).collect();
    let adds = ids.iter().map(|id| timed(|| drop(call(&mut s, json!({"op": "router_add", "router_id": id}))))).collect();
    for id in &ids {
        call(&mut s, json!({"op": "router_remove", "router_id": id}));
    }
    drop(daemon);
    Ok(adds)
}

/// Starts the stopped daemon; returns when the API answered and when
/// `status` said the state was verified and repaired (ms after the start).
fn restart(daemon: &mut Daemon) -> (f64, f64) {
    let start = Instant::now();
    daemon.spawn();
    while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "the daemon did not answer");
        std::thread::sleep(Duration::from_millis(1));
    }
    let answered = ms(start.elapsed());
    let mut s = daemon.session();
    while call(&mut s, json!({"op": "status"}))["ready"] != true {
        assert!(start.elapsed() < Duration::from_secs(600), "not ready after 10 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready = ms(start.elapsed());
    eprintln!("bench: restart answered in {answered:.0} ms, ready in {ready:.0} ms");
    (answered, ready)
}

/// Rounds of creates from many clients (each under a second): the rate
/// moves by about 20% from round to round on two cores shared with the
/// clients, so the median of several.
pub const ROUNDS: usize = 5;

/// Creates from many clients at once, each pipelining its requests (group
/// commit), and deletes of them the same way, in rounds (the machine's noise
/// is about 20% between runs); then deletes of rules that never tagged a
/// packet, one at a time.
fn changes(daemon: &Daemon, routers: &[String], out: &mut Results) {
    let per = 1000u64;
    let (mut creates, mut deletes, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    // Each round on a router of its own: 16,000 deletes leave their slots
    // cooling for a second, and four fast rounds on one router used up its
    // 65,535 slots before they came back ("no free rule slot").
    let on = |round: usize| routers[round % routers.len()].as_str();
    for round in 0..ROUNDS {
        let router = on(round);
        let router_id = router.to_string();
        let start = Instant::now();
        let answers = daemon.pipelined(out.clients as u64, per, move |c, i| {
            json!({"op": "helper_create", "router_id": router_id, "protocol": "udp", "port": 10_000 + c * per + i, "helper": "sip"})
        });
        creates.push(answers.len() as f64 / start.elapsed().as_secs_f64());
        ids = answers.iter().map(|(req, answer)| answer["ok"]["id"].as_str().unwrap_or_else(|| panic!("{req} refused: {answer}")).to_string()).collect();
        if round + 1 == ROUNDS {
            break;
        }
        let (router_id, gone) = (router.to_string(), std::sync::Arc::new(std::mem::take(&mut ids)));
        let start = Instant::now();
        let answers = daemon.pipelined(out.clients as u64, per, move |c, i| {
            json!({"op": "helper_delete", "router_id": router_id, "helper_id": gone[(c * per + i) as usize]})
        });
        deletes.push(answers.len() as f64 / start.elapsed().as_secs_f64());
        for (req, answer) in &answers {
            assert!(answer.get("ok").is_some(), "{req} refused: {answer}");
        }
    }
    out.creates_per_sec = median(creates);
    out.deletes_per_sec = median(deletes);
    // The last round's helpers are left.
    let router = on(ROUNDS - 1);
    let mut s = daemon.session();
    let status = call(&mut s, json!({"op": "status"}));
    out.changes_per_commit = status["changes"].as_f64().unwrap_or(0.0) / status["commits"].as_f64().unwrap_or(1.0).max(1.0);
    let samples: Vec<f64> = ids
        .iter()
        .take(2000)
        .map(|id| timed(|| drop(call(&mut s, json!({"op": "helper_delete", "router_id": router, "helper_id": id})))))
        .collect();
    out.delete_p50_ms = super::percentile(samples.clone(), 0.5);
    out.delete_p99_ms = super::percentile(samples, 0.99);
}
