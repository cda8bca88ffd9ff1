//! Rule changes: latency and throughput of create and delete through the
//! daemon's API (one client, many clients), the time to load many helpers,
//! against iptables-restore of the Neutron layout and nftables set element
//! updates at the same number of helpers, in the same run.

use std::time::Instant;

use serde_json::json;

use super::{
    Scale,
    baselines::{feed, install_neutron, install_nft, neutron_chain},
    median, ms, percentile,
};
use crate::{Daemon, Netns, Topology, unique};

#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub per_sec: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Results {
    pub create_one_client: Latency,
    pub delete_one_client: Latency,
    pub create_many_clients: Latency,
    pub clients: usize,
    pub loaded: usize,
    pub load_secs: f64,
    pub daemon_rss_mib: f64,
    pub map_memory_mib: f64,
    /// Reads answered over a period with a check of the maps in it at
    /// `loaded` helpers: (how many, p50 ms, longest ms).
    pub reads_over_check: (usize, f64, f64),
    /// (helpers present, enforcer create+delete ms, Neutron delete ms, nft add ms, nft delete ms)
    pub at_n: Vec<(usize, f64, f64, f64, f64)>,
    /// Samples behind each median of `at_n`: enforcer's, the others'.
    pub at_n_samples: (usize, usize),
}

/// Creates a sip helper (sip exists for both protocols, so a router can
/// hold twice 65,535 of them... up to its 65,535 slots).
fn create(session: &mut crate::daemon::Session, router: &str, protocol: &str, port: u32) -> String {
    let r = session
        .request(&json!({"op": "helper_create", "router_id": router, "protocol": protocol, "port": port, "helper": "sip"}))
        .expect("daemon answers");
    r["ok"]["id"].as_str().unwrap_or_else(|| panic!("create refused: {r}")).to_string()
}

fn delete(session: &mut crate::daemon::Session, router: &str, id: &str) {
    let r = session.request(&json!({"op": "helper_delete", "router_id": router, "helper_id": id})).expect("daemon answers");
    assert!(r.get("ok").is_some(), "delete refused: {r}");
}

fn latency(samples: Vec<f64>, wall_secs: f64) -> Latency {
    let n = samples.len() as f64;
    Latency { p50_ms: percentile(samples.clone(), 0.5), p99_ms: percentile(samples, 0.99), per_sec: n / wall_secs }
}

fn restore(ns: &Netns, tool: &str, script: &str) {
    feed(ns, tool, &["--noflush"], script);
}

/// The agent's delete of one helper: save, diff (in process), restore.
fn neutron_delete(ns: &Netns, i: usize) -> f64 {
    let start = Instant::now();
    let saved = ns.sh("iptables-save", &["-t", "raw"]);
    let c = neutron_chain(i);
    assert!(saved.contains(&c));
    restore(ns, "iptables-restore", &format!("*raw\n-D nl3-cth -j {c}\n-F {c}\n-X {c}\nCOMMIT\n"));
    let t = ms(start.elapsed());
    // Put it back for the next round (not timed).
    restore(ns, "iptables-restore", &format!("*raw\n:{c} - [0:0]\n-A nl3-cth -j {c}\n-A {c} -p tcp -m tcp --dport {} -j CT --helper ftp\nCOMMIT\n", 10_000 + i));
    t
}

fn nft(ns: &Netns, script: &str) {
    feed(ns, "nft", &["-f", "-"], script);
}

fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    ms(start.elapsed())
}

pub fn measure(scale: Scale) -> Results {
    let mut out = Results { clients: 8, ..Default::default() };
    let topo = Topology::new();
    let daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let r = topo.router_id.clone();

    // One client, sequential.
    let k = scale.pick(300, 3000);
    let mut s = daemon.session();
    let start = Instant::now();
    let mut ids = Vec::new();
    let mut samples = Vec::new();
    for i in 0..k {
        let t = Instant::now();
        ids.push(create(&mut s, &r, "udp", 20_000 + i));
        samples.push(ms(t.elapsed()));
    }
    out.create_one_client = latency(samples, start.elapsed().as_secs_f64());
    let start = Instant::now();
    let mut samples = Vec::new();
    for id in &ids {
        let t = Instant::now();
        delete(&mut s, &r, id);
        samples.push(ms(t.elapsed()));
    }
    out.delete_one_client = latency(samples, start.elapsed().as_secs_f64());

    // Many clients at once.
    let per = k / out.clients as u32;
    let start = Instant::now();
    let router = r.clone();
    let answers = daemon.concurrent(out.clients as u64, per as u64, move |c, i| {
        json!({"op": "helper_create", "router_id": router, "protocol": "tcp", "port": 1 + c * per as u64 + i, "helper": "sip"})
    });
    let samples: Vec<f64> = answers
        .iter()
        .map(|(req, answer, took)| {
            assert!(answer.get("ok").is_some(), "{req} refused: {answer}");
            ms(*took)
        })
        .collect();
    out.create_many_clients = latency(samples, start.elapsed().as_secs_f64());
    eprintln!("bench: API latency done");

    // Load many helpers (two routers: a router has 65,535 slots), 8 clients.
    let second = Topology::new();
    daemon.add_router(&second.router_id);
    let target = scale.pick(5_000, 100_000);
    let already = (per * out.clients as u32) as usize;
    let start = Instant::now();
    let routers = [r.clone(), second.router_id.clone()];
    let todo = target - already;
    let threads: Vec<_> = (0..out.clients)
        .map(|c| {
            let mut s = daemon.session();
            let routers = routers.clone();
            std::thread::spawn(move || {
                for j in (c..todo).step_by(8) {
                    // Router 0 takes udp ports, router 1 tcp then udp.
                    let (router, proto, port) = if j < 60_000 {
                        (&routers[1], if j < 30_000 { "tcp" } else { "udp" }, 1 + (j % 30_000) as u32)
                    } else {
                        (&routers[0], "udp", 1 + (j - 60_000) as u32)
                    };
                    create(&mut s, router, proto, port);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    out.loaded = target;
    out.load_secs = start.elapsed().as_secs_f64();
    out.daemon_rss_mib = daemon.rss_kib() as f64 / 1024.0;
    out.map_memory_mib = enforcer::kernel::map_memory(&daemon.bpffs).unwrap_or(0) as f64 / (1024.0 * 1024.0);
    eprintln!("bench: loaded {target} helpers in {:.1} s", out.load_secs);
    // The daemon compares the maps with the store every glue_check_secs
    // (10 s): reads for longer than that see one check at least.
    let mut s = daemon.session();
    let until = Instant::now() + std::time::Duration::from_secs(11);
    let mut reads = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        s.request(&json!({"op": "router_list"})).expect("daemon answers");
        reads.push(ms(t.elapsed()));
    }
    reads.sort_by(f64::total_cmp);
    out.reads_over_check = (reads.len(), reads[reads.len() / 2], reads[reads.len() - 1]);
    drop(daemon);

    // One change with N helpers present, each way.
    let rounds = scale.pick(3, 7);
    // enforcer's change takes about a millisecond: many more samples, so a
    // housekeeping tick or a check landing on one does not move the median.
    let samples = scale.pick(11, 101);
    out.at_n_samples = (samples, rounds);
    for n in scale.pick(vec![10, 100, 1000], vec![10, 100, 1000, 5000]) {
        let topo = Topology::new();
        let daemon = Daemon::start();
        daemon.add_router(&topo.router_id);
        let mut s = daemon.session();
        for i in 0..n {
            create(&mut s, &topo.router_id, "udp", 10_000 + i as u32);
        }
        let enforcer = median(
            (0..samples)
                .map(|_| {
                    timed(|| {
                        let id = create(&mut s, &topo.router_id, "tcp", 21);
                        delete(&mut s, &topo.router_id, &id);
                    })
                })
                .collect(),
        );
        drop(daemon);
        let neutron_ns = Netns::create(&unique("nn"));
        install_neutron(&neutron_ns, n);
        let neutron = median((0..rounds).map(|i| neutron_delete(&neutron_ns, i % n)).collect());
        let nft_ns = Netns::create(&unique("nf"));
        install_nft(&nft_ns, n);
        let add = median((0..rounds).map(|_| timed(|| nft(&nft_ns, "add element ip enfbench ftp_ports { 21 }\n"))).collect());
        let del = median(
            (0..rounds)
                .map(|_| {
                    nft(&nft_ns, "add element ip enfbench ftp_ports { 21 }\n");
                    timed(|| nft(&nft_ns, "delete element ip enfbench ftp_ports { 21 }\n"))
                })
                .collect(),
        );
        out.at_n.push((n, enforcer, neutron, add, del));
        eprintln!("bench: changes with {n} helpers done");
    }
    out
}
