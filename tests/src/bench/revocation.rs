//! Revocation under traffic: an FTP download and its control connection
//! are running when the helper is deleted. Counted: packets the router
//! forwards after the delete returns (the goal is zero), and the time until
//! its conntrack table has no entry of the rule. The same with the Neutron
//! way (delete the helper's raw chain), in the same run.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use super::{Scale, ms};
use crate::{
    Daemon, Family, Netns, Process, Topology,
    peers::{FtpClient, FtpRouter, FtpServer},
};

#[derive(Debug, Clone, Default)]
pub struct Results {
    pub enforcer_packets_after: u64,
    pub enforcer_delete_ms: f64,
    pub enforcer_conntrack_clean_ms: f64,
    pub neutron_packets_after: u64,
    pub neutron_entries_left: usize,
    /// Deletes of a rule with one connection (ms, each sample), with the
    /// host's conntrack table holding only it, and holding this many
    /// entries of another namespace besides.
    pub delete_connected_ms: Vec<f64>,
    pub delete_connected_crowded_ms: Vec<f64>,
    pub crowd: usize,
}

/// Captures the TCP packets the router transmits (taps see a packet only
/// after the TC egress program let it through).
struct Capture(Process);

impl Capture {
    fn start(topo: &Topology) -> Self {
        let p = Process::spawn(
            "tcpdump",
            topo.router
                .cmd("tcpdump")
                .args(["-i", "any", "-Q", "out", "-n", "-tt", "-l", "tcp"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        std::thread::sleep(Duration::from_millis(700));
        Self(p)
    }

    /// Packets sent after `since` (seconds since the epoch).
    fn count_after(mut self, since: f64) -> u64 {
        self.0.signal(nix::sys::signal::Signal::SIGINT);
        let mut text = String::new();
        use std::io::Read;
        let _ = self.0.child.stdout.take().unwrap().read_to_string(&mut text);
        text.lines().filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok()).filter(|t| *t > since).count() as u64
    }
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

pub fn measure(scale: Scale) -> Results {
    let mut out = Results::default();
    // enforcer
    {
        let FtpRouter { topo, daemon, helper_id: id, server: _server } = FtpRouter::new(Topology::new(), Family::V4);
        let mut ftp = FtpClient::login(&topo, Family::V4);
        ftp.ok("retr_start big.bin passive");
        let capture = Capture::start(&topo);
        let start = Instant::now();
        daemon.delete_helper(&topo.router_id, &id);
        out.enforcer_delete_ms = ms(start.elapsed());
        let returned = now();
        loop {
            let ct = topo.conntrack(&["-L"]);
            if !ct.contains("helper=ftp") && !ct.contains(&format!("mark={}", 0x1000_1000u32)) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(5));
        }
        out.enforcer_conntrack_clean_ms = ms(start.elapsed());
        std::thread::sleep(Duration::from_secs(2));
        out.enforcer_packets_after = capture.count_after(returned);
        let _ = ftp.cmd("retr_wait");
    }
    // The Neutron way: a raw chain with CT --helper, deleted.
    {
        let topo = Topology::new();
        topo.router.sh("iptables", &["-t", "raw", "-N", "nl3-cth-0000001"]);
        topo.router.sh("iptables", &["-t", "raw", "-A", "nl3-cth-0000001", "-p", "tcp", "-m", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]);
        topo.router.sh("iptables", &["-t", "raw", "-A", "PREROUTING", "-j", "nl3-cth-0000001"]);
        let _server = FtpServer::start(&topo, Family::V4);
        let mut ftp = FtpClient::login(&topo, Family::V4);
        ftp.ok("retr_start big.bin passive");
        let capture = Capture::start(&topo);
        topo.router.sh("iptables", &["-t", "raw", "-D", "PREROUTING", "-j", "nl3-cth-0000001"]);
        topo.router.sh("iptables", &["-t", "raw", "-F", "nl3-cth-0000001"]);
        topo.router.sh("iptables", &["-t", "raw", "-X", "nl3-cth-0000001"]);
        let returned = now();
        std::thread::sleep(Duration::from_secs(2));
        out.neutron_packets_after = capture.count_after(returned);
        out.neutron_entries_left = topo.conntrack(&["-L"]).lines().filter(|l| l.contains("helper=ftp")).count();
    }
    (out.delete_connected_ms, out.delete_connected_crowded_ms, out.crowd) = deletes_beside_a_crowd(scale.pick(10, 20), scale.pick(50_000, 200_000));
    eprintln!("bench: revocation done");
    out
}

/// Deletes of a rule that has one connection (a UDP flow to the tftp
/// port through the router), through the API, `samples` times, with the host's conntrack
/// table otherwise empty, then with `crowd` entries of another namespace
/// in it (the kernel keeps every namespace's entries in one table).
fn deletes_beside_a_crowd(samples: usize, crowd: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let server = Topology::server_addr(Family::V4);
    let mut session = daemon.session();
    let mut deletes = || -> Vec<f64> {
        (0..samples)
            .map(|_| {
                let id = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
                let send = format!("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{server}', 69))");
                topo.client.sh("python3", &["-c", &send]);
                assert!(topo.conntrack(&["-L", "-p", "udp", "--dport", "69"]).contains("dport=69"), "the flow made no conntrack entry");
                let delete = serde_json::json!({"op": "helper_delete", "router_id": topo.router_id, "helper_id": id});
                let start = Instant::now();
                let answer = session.request(&delete).expect("the daemon answers");
                let took = ms(start.elapsed());
                assert_eq!(answer["ok"]["conntrack_entries_removed"], 1, "the delete cleaned its connection: {answer}");
                // A new router's conntrack index is complete from its add:
                // no revocation walks the table.
                assert_eq!(answer["ok"]["conntrack_dumps"], 0, "a revocation walked the conntrack table: {answer}");
                took
            })
            .collect()
    };
    let quiet = deletes();
    let filler = Crowd::new(crowd);
    let crowded = deletes();
    let made = filler.entries();
    drop(filler);
    (quiet, crowded, made)
}

/// A namespace whose own traffic fills the host's conntrack table: one UDP
/// datagram to each of `n` (address, port) pairs out of a veth whose peer
/// drops them, each an entry kept for ten minutes (the namespace's UDP
/// timeout).
struct Crowd(Netns);

impl Crowd {
    fn new(n: usize) -> Self {
        let ns = Netns::create(&crate::unique("crowd"));
        ns.sh("ip", &["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
        ns.sh("ip", &["addr", "add", "10.200.250.1/16", "dev", "d0"]);
        ns.sh("ip", &["link", "set", "d0", "up"]);
        ns.sh("ip", &["link", "set", "d1", "up"]);
        let per_address = 60_000;
        for a in 0..n.div_ceil(per_address) {
            let addr = format!("10.200.{}.{}", 251 + a / 250, 2 + a % 250);
            ns.sh("ip", &["neigh", "add", &addr, "lladdr", "02:00:00:00:00:01", "dev", "d0", "nud", "permanent"]);
        }
        ns.sh("sysctl", &["-qw", "net.netfilter.nf_conntrack_udp_timeout=600"]);
        // Conntrack tracks a namespace's packets once a rule there needs it.
        ns.sh("nft", &["add table inet crowd; add chain inet crowd out { type filter hook output priority 0; }; add rule inet crowd out ct state new counter"]);
        let send = format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor i in range({n}):\n    a = i // {per_address}\n    s.sendto(b'x', ('10.200.%d.%d' % (251 + a // 250, 2 + a % 250), 1024 + i % {per_address}))\n"
        );
        ns.sh("python3", &["-c", &send]);
        Self(ns)
    }

    fn entries(&self) -> usize {
        self.0.sh("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"]).trim().parse().unwrap_or(0)
    }
}
