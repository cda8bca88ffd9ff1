//! Forwarding through a router namespace with N helper rules, each way:
//! enforcer (TC programs, rules in maps), the Neutron layout (one raw chain
//! per helper, iptables-nft) and an nftables set with one `ct helper set`
//! rule. 64-byte UDP from iperf3 on a port no helper matches; the packets
//! the router forwarded are counted on its egress interface. Rounds are
//! interleaved so the backends see the same machine state.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use serde_json::json;

use super::{
    Scale,
    baselines::{install_neutron, install_nft},
    median,
};
use crate::{Daemon, Process, Topology};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    Enforcer,
    Neutron,
    Nft,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Enforcer => "enforcer",
            Backend::Neutron => "Neutron chains (iptables-nft)",
            Backend::Nft => "nftables set",
        }
    }
}

/// Forwarded packets per second, median over rounds, by (backend, N).
pub type Rates = BTreeMap<(Backend, usize), f64>;

fn tx_packets(topo: &Topology, iface: &str) -> u64 {
    let out = topo.router.sh("ip", &["-s", "-j", "link", "show", iface]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    v[0]["stats64"]["tx"]["packets"].as_u64().expect("tx packets")
}

/// 64-byte UDP from the client to the server for `secs`; packets per second
/// the router sent out of its server-side interface.
pub fn blast(topo: &Topology, secs: u64) -> f64 {
    let _server = Process::spawn(
        "iperf3 server",
        topo.server.cmd("taskset").args(["-c", "1", "iperf3", "-s", "-1", "-p", "5201"]).stdout(Stdio::null()).stderr(Stdio::null()),
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = tx_packets(topo, &topo.server_if);
    let out = topo
        .client
        .cmd("taskset")
        .args(["-c", "0", "iperf3", "-c", Topology::SERVER_V4, "-u", "-b", "0", "-l", "64", "-t", &secs.to_string(), "-p", "5201"])
        .output()
        .expect("iperf3");
    assert!(out.status.success(), "iperf3: {}", String::from_utf8_lossy(&out.stderr));
    let after = tx_packets(topo, &topo.server_if);
    (after - before) as f64 / secs as f64
}

/// A UDP sender in a router's client namespace and a receiver in its
/// server namespace that never reads (its full buffer drops what arrives,
/// which costs less than an ICMP error). Made once, used for many short
/// bursts, so that bursts of different routers can alternate closely.
pub struct Blaster {
    tx: std::net::UdpSocket,
    _rx: std::net::UdpSocket,
}

impl Blaster {
    pub fn new(topo: &Topology) -> Self {
        let bind = |ns: &crate::Netns, addr: &str| {
            let addr = addr.to_string();
            enforcer::kernel::netns::run_in(std::path::Path::new(&ns.path()), move || Ok(std::net::UdpSocket::bind(addr)?)).expect("socket in namespace")
        };
        let rx = bind(&topo.server, &format!("{}:5201", Topology::SERVER_V4));
        let tx = bind(&topo.client, &format!("{}:0", Topology::CLIENT_V4));
        tx.connect(format!("{}:5201", Topology::SERVER_V4)).expect("connect");
        Self { tx, _rx: rx }
    }

    /// Sends 64-byte datagrams for `dur` on the calling thread; the
    /// router's softirq work runs on this CPU too. Returns datagrams sent
    /// per second.
    pub fn burst(&self, dur: Duration) -> f64 {
        let payload = [0u8; 64];
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < dur {
            for _ in 0..64 {
                if self.tx.send(&payload).is_ok() {
                    sent += 1;
                }
            }
        }
        sent as f64 / start.elapsed().as_secs_f64()
    }
}

/// A daemon enforcing the router with `n` ftp helpers on ports 10,000 and
/// up, which the benchmark traffic never uses.
pub fn enforce(topo: &Topology, n: usize) -> Daemon {
    let daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let mut s = daemon.session();
    for i in 0..n {
        let r = s
            .request(&json!({"op": "helper_create", "router_id": topo.router_id, "protocol": "tcp", "port": 10_000 + i, "helper": "ftp"}))
            .unwrap();
        assert!(r.get("ok").is_some(), "{r}");
    }
    daemon
}

/// Installs `n` rules of `backend` on a fresh router; returns what keeps
/// them alive.
fn install(backend: Backend, topo: &Topology, n: usize) -> Option<Daemon> {
    match backend {
        Backend::Enforcer => Some(enforce(topo, n)),
        Backend::Neutron => {
            install_neutron(&topo.router, n);
            None
        }
        Backend::Nft => {
            install_nft(&topo.router, n);
            None
        }
    }
}

pub fn measure(scale: Scale) -> Rates {
    let sizes = scale.pick(vec![0, 1000], vec![0, 100, 1000, 10_000]);
    let rounds = scale.pick(1, 5);
    let secs = scale.pick(1, 3);
    let mut samples: BTreeMap<(Backend, usize), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for &n in &sizes {
            for backend in [Backend::Enforcer, Backend::Neutron, Backend::Nft] {
                let topo = Topology::without_firewall();
                let _keep = install(backend, &topo, n);
                let rate = blast(&topo, secs);
                samples.entry((backend, n)).or_default().push(rate);
            }
        }
        eprintln!("bench: forwarding round {} of {rounds} done", round + 1);
    }
    samples.into_iter().map(|(k, v)| (k, median(v))).collect()
}
