//! enforcer's fixed cost measured against the router it lives in: a Neutron
//! router (the L3 agent's rules, installed by Neutron's own code, with SNAT
//! of the client through its floating IP). In the same run, rounds
//! interleaved: the bare router (no rules at all), the router with
//! Neutron's rules and no enforcer, that router with enforcer and N helpers
//! on ports the traffic does not use, and two partial routers that split
//! enforcer's cost: its nftables table alone, and an empty program at each
//! tc hook enforcer uses.

use std::{collections::BTreeMap, time::Duration};

use super::{
    Scale,
    baselines::feed,
    empty::EmptyProgram,
    forwarding::{Blaster, enforce},
    median, percentile,
};
use crate::neutron::NeutronRouter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Router {
    /// No Neutron rules, no enforcer.
    Bare,
    /// Neutron's rules, no enforcer.
    Neutron,
    /// A second router like `Neutron`: its ratio shows how finely the
    /// method resolves (ideally 1).
    NeutronAgain,
    /// Neutron's rules and enforcer's nftables table, copied from an
    /// enforced router, without the TC programs.
    GlueOnly,
    /// Neutron's rules and an empty tcx program at the hook enforcer uses
    /// on each interface: the price of being on the tc hook at all.
    EmptyPrograms,
    /// Neutron's rules and enforcer with this many helpers.
    Enforcer(usize),
}

/// Per router: forwarded packets per second (median over rounds), and its
/// ratio to the Neutron router without enforcer (quartiles of the per-round
/// ratios).
#[derive(Debug, Clone, Default)]
pub struct FixedCost {
    pub rounds: usize,
    pub rates: BTreeMap<Router, f64>,
    pub ratios: BTreeMap<Router, Quartiles>,
    /// Per router with a program: its run time per packet as the kernel
    /// counts it (BPF_ENABLE_STATS), ns, stats overhead included.
    pub program_ns: BTreeMap<Router, f64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Quartiles {
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
}

/// All routers are built first and kept, each with a UDP sender and a
/// receiver. Each round visits every router in an order that rotates from
/// round to round; each burst through a router is bracketed by bursts
/// through the Neutron router without enforcer, and its ratio is taken to
/// the mean of those two. The sender and the router's softirq work share
/// one pinned CPU, so a rate is the inverse of the per-packet cost.
///
/// Why bracketed 100 ms bursts: the speed of a shared 2-vCPU machine
/// drifts by several percent within seconds. Ratios to a reference burst
/// up to a dozen bursts away spread by ±10% (quartiles), and a router's
/// median moved by ±3% from run to run. Bracketed, the quartiles are
/// ±1 to 3%. The daemons are kept off the measuring CPU: their periodic
/// work would land in whichever burst is running.
pub fn measure(scale: Scale) -> FixedCost {
    let sizes: Vec<usize> = scale.pick(vec![0, 10], vec![0, 1, 10, 10_000]);
    let rounds = scale.pick(10, 60);
    let burst = Duration::from_millis(100);
    let bare = NeutronRouter::bare();
    let mut routers: Vec<(Router, NeutronRouter, Box<dyn std::any::Any>)> = Vec::new();
    routers.push((Router::Neutron, NeutronRouter::new(false, (None, None)), Box::new(())));
    routers.push((Router::NeutronAgain, NeutronRouter::new(false, (None, None)), Box::new(())));
    for &n in &sizes {
        let neutron = NeutronRouter::new(false, (None, None));
        let daemon = enforce(&neutron.topo, n);
        keep_off_cpu(daemon.pid(), 0);
        routers.push((Router::Enforcer(n), neutron, Box::new(daemon)));
    }
    let enforced = routers.iter().find(|(r, ..)| matches!(r, Router::Enforcer(_))).expect("an enforced router");
    let glue = enforced.1.topo.router.sh("nft", &["list", "table", "inet", "enforcer"]);
    let neutron = NeutronRouter::new(false, (None, None));
    feed(&neutron.topo.router, "nft", &["-f", "-"], &glue);
    routers.push((Router::GlueOnly, neutron, Box::new(())));
    let neutron = NeutronRouter::new(false, (None, None));
    let empty = EmptyPrograms::attach(&neutron.topo);
    routers.push((Router::EmptyPrograms, neutron, Box::new(empty)));
    let mut blasters = vec![(Router::Bare, Blaster::new(&bare))];
    blasters.extend(routers.iter().map(|(router, neutron, _)| (*router, Blaster::new(&neutron.topo))));
    let _pinned = PinnedTo::cpu(0);
    let mut samples: BTreeMap<Router, Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<Router, Vec<f64>> = BTreeMap::new();
    let reference = blasters.iter().position(|(r, _)| *r == Router::Neutron).expect("the reference router");
    let others: Vec<usize> = (0..blasters.len()).filter(|k| *k != reference).collect();
    for round in 0..rounds {
        let mut before = blasters[reference].1.burst(burst);
        samples.entry(Router::Neutron).or_default().push(before);
        ratios.entry(Router::Neutron).or_default().push(1.0);
        for j in 0..others.len() {
            let (router, blaster) = &blasters[others[(j + round) % others.len()]];
            let rate = blaster.burst(burst);
            let after = blasters[reference].1.burst(burst);
            samples.entry(*router).or_default().push(rate);
            ratios.entry(*router).or_default().push(2.0 * rate / (before + after));
            before = after;
        }
    }
    eprintln!("bench: fixed cost, {rounds} rounds done");
    let program_ns = in_situ(&routers, &blasters, burst);
    FixedCost {
        rounds,
        program_ns,
        rates: samples.into_iter().map(|(k, v)| (k, median(v))).collect(),
        ratios: ratios
            .into_iter()
            .map(|(k, v)| (k, Quartiles { p25: percentile(v.clone(), 0.25), median: median(v.clone()), p75: percentile(v, 0.75) }))
            .collect(),
    }
}

/// The run time per packet of the programs on each router's ingress hook
/// where the traffic enters, as the kernel counts it while statistics are
/// on (only here: they cost every program two clock reads per run, so the
/// rounds above run without them). Ten bursts per router.
fn in_situ(routers: &[(Router, NeutronRouter, Box<dyn std::any::Any>)], blasters: &[(Router, Blaster)], burst: Duration) -> BTreeMap<Router, f64> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let totals = |neutron: &NeutronRouter| -> (Duration, u64) {
        let iface = neutron.topo.client_if.clone();
        enforcer::kernel::netns::run_in(std::path::Path::new(&neutron.topo.router.path()), move || {
            let (_, programs) = SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)?;
            Ok(programs.iter().fold((Duration::ZERO, 0), |(t, n), p| (t + p.run_time(), n + p.run_count())))
        })
        .expect("querying the programs of the router's ingress hook")
    };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("turning on the kernel's BPF run-time statistics");
    let mut out = BTreeMap::new();
    for (router, neutron, _) in routers.iter().filter(|(r, ..)| matches!(r, Router::Enforcer(_) | Router::EmptyPrograms)) {
        let blaster = &blasters.iter().find(|(r, _)| r == router).expect("a blaster per router").1;
        let (t0, n0) = totals(neutron);
        for _ in 0..10 {
            blaster.burst(burst);
        }
        let (t1, n1) = totals(neutron);
        assert!(n1 > n0, "{router:?}: no program ran on the hook the traffic enters by");
        out.insert(*router, (t1 - t0).as_nanos() as f64 / (n1 - n0) as f64);
    }
    out
}

/// Moves every thread of process `pid` off `cpu`.
fn keep_off_cpu(pid: u32, cpu: usize) {
    let mut set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("sched_getaffinity");
    set.unset(cpu).expect("cpu number");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads").flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
        }
    }
}

/// Pins the calling thread to one CPU until dropped.
struct PinnedTo(nix::sched::CpuSet);

impl PinnedTo {
    fn cpu(cpu: usize) -> Self {
        let me = nix::unistd::Pid::from_raw(0);
        let before = nix::sched::sched_getaffinity(me).expect("sched_getaffinity");
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).expect("cpu number");
        nix::sched::sched_setaffinity(me, &set).expect("sched_setaffinity");
        Self(before)
    }
}

impl Drop for PinnedTo {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// `baseline_empty` attached with tcx at the hook enforcer uses (ingress) of
/// each router interface. The links go before the program.
struct EmptyPrograms {
    _links: Vec<aya::programs::tc::SchedClassifierLink>,
    _program: EmptyProgram,
}

impl EmptyPrograms {
    fn attach(topo: &crate::Topology) -> Self {
        let mut program = EmptyProgram::load();
        let ns = std::path::PathBuf::from(topo.router.path());
        let links = [&topo.client_if, &topo.server_if].into_iter().map(|iface| program.attach(&ns, iface)).collect();
        Self { _links: links, _program: program }
    }
}
