//! Revocation under traffic: an FTP download and its control connection
//! are running when the helper is deleted. Counted: packets the router
//! forwards after the delete returns (the goal is zero), and the time until
//! its conntrack table has no entry of the rule. The same with the Neutron
//! way (delete the helper's raw chain), in the same run.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use super::ms;
use crate::{
    Family, Process, Topology,
    peers::{FtpClient, FtpRouter, FtpServer},
};

#[derive(Debug, Clone, Default)]
pub struct Results {
    pub enforcer_packets_after: u64,
    pub enforcer_delete_ms: f64,
    pub enforcer_conntrack_clean_ms: f64,
    pub neutron_packets_after: u64,
    pub neutron_entries_left: usize,
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

pub fn measure() -> Results {
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
    eprintln!("bench: revocation done");
    out
}
