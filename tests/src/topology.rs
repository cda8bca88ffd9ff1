//! client — router — server in three network namespaces of this test.
//!
//! The router forwards with a stateful policy, as a real virtual router
//! does: replies and RELATED connections pass, NEW connections only to the
//! control ports (tcp/21, udp/69, udp+tcp/5060) from the client side. A data
//! connection therefore passes only if a conntrack helper expected it.

use std::process::Command;

use crate::{run, unique};

/// An address family of the test bed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Self {
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Self { name: name.to_string() };
        run(ns.cmd("ip").args(["link", "set", "lo", "up"]));
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command run inside this namespace (nsenter, so /sys stays the
    /// host's and bpffs stays visible).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }

    /// The namespace's whole netfilter ruleset (nftables, and iptables-nft
    /// tables as nft shows them).
    pub fn ruleset(&self) -> String {
        self.sh("nft", &["list", "ruleset"])
    }

    /// Runs a command inside; panics on failure; returns stdout.
    pub fn sh(&self, program: &str, args: &[&str]) -> String {
        String::from_utf8_lossy(&run(self.cmd(program).args(args)).stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Already gone is fine (a test may delete it itself).
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(std::process::Stdio::null()).status();
    }
}

pub struct Topology {
    pub router_id: String,
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    /// The router's interfaces towards the client and the server.
    pub client_if: String,
    pub server_if: String,
}

/// Policy of the router's FORWARD chain (same text for both families):
/// replies and RELATED pass, NEW only from the client side to control ports.
fn forward_policy(client_if: &str) -> String {
    format!(
        "*filter
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i {client_if} -p tcp --dport 21 -m conntrack --ctstate NEW -j ACCEPT
-A FORWARD -i {client_if} -p udp --dport 69 -m conntrack --ctstate NEW -j ACCEPT
-A FORWARD -i {client_if} -p udp --dport 5060 -m conntrack --ctstate NEW -j ACCEPT
-A FORWARD -i {client_if} -p tcp --dport 5060 -m conntrack --ctstate NEW -j ACCEPT
COMMIT
"
    )
}

impl Topology {
    pub const CLIENT_V4: &str = "10.200.1.2";
    pub const SERVER_V4: &str = "10.200.2.2";
    pub const CLIENT_V6: &str = "fd00:200::1:2";
    pub const SERVER_V6: &str = "fd00:200::2:2";

    /// The test bed with the router's stateful forward policy.
    pub fn new() -> Self {
        Self::build(true)
    }

    /// The test bed with a router that forwards everything: only enforcer
    /// stands between a revoked connection and the server.
    pub fn without_firewall() -> Self {
        Self::build(false)
    }

    fn build(firewall: bool) -> Self {
        Self::build_named(firewall, "r0", "r1")
    }

    /// The test bed with the router's interfaces named `client_if` (towards
    /// 10.200.1.0/24) and `server_if` (towards 10.200.2.0/24).
    pub fn build_named(firewall: bool, client_if: &str, server_if: &str) -> Self {
        Self::build_for(&uuid::Uuid::new_v4().to_string(), firewall, client_if, server_if)
    }

    /// The test bed of a router that exists elsewhere (in Neutron): its
    /// namespace is `qrouter-<router_id>`, as the L3 agent names it.
    pub fn for_router(router_id: &str) -> Self {
        Self::build_for(router_id, true, "r0", "r1")
    }

    fn build_for(router_id: &str, firewall: bool, client_if: &str, server_if: &str) -> Self {
        crate::require_root();
        let router_id = router_id.to_string();
        let tag = unique("");
        let client = Netns::create(&format!("{tag}-c"));
        let server = Netns::create(&format!("{tag}-s"));
        let router = Netns::create(&format!("qrouter-{router_id}"));
        let topo = Self { router_id, client, router, server, client_if: client_if.into(), server_if: server_if.into() };
        topo.wire(&topo.client, "c0", client_if, "1");
        topo.wire(&topo.server, "s0", server_if, "2");
        topo.router.sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        topo.router.sh("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        for tool in ["iptables-restore", "ip6tables-restore"].into_iter().filter(|_| firewall) {
            let mut child = topo
                .router
                .cmd(tool)
                .arg("--noflush")
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("iptables-restore");
            use std::io::Write;
            child.stdin.take().unwrap().write_all(forward_policy(client_if).as_bytes()).unwrap();
            assert!(child.wait().unwrap().success(), "{tool} of the forward policy failed");
        }
        topo
    }

    /// A veth between `host` and the router, subnet number `n`.
    fn wire(&self, host: &Netns, host_if: &str, router_if: &str, n: &str) {
        run(Command::new("ip").args([
            "link", "add", host_if, "netns", &host.name, "type", "veth", "peer", "name", router_if, "netns", &self.router.name,
        ]));
        host.sh("ip", &["addr", "add", &format!("10.200.{n}.2/24"), "dev", host_if]);
        host.sh("ip", &["-6", "addr", "add", &format!("fd00:200::{n}:2/112"), "dev", host_if, "nodad"]);
        self.router.sh("ip", &["addr", "add", &format!("10.200.{n}.1/24"), "dev", router_if]);
        self.router.sh("ip", &["-6", "addr", "add", &format!("fd00:200::{n}:1/112"), "dev", router_if, "nodad"]);
        host.sh("ip", &["link", "set", host_if, "up"]);
        self.router.sh("ip", &["link", "set", router_if, "up"]);
        host.sh("ip", &["route", "add", "default", "via", &format!("10.200.{n}.1")]);
        host.sh("ip", &["-6", "route", "add", "default", "via", &format!("fd00:200::{n}:1")]);
    }

    pub fn server_addr(family: Family) -> &'static str {
        match family {
            Family::V4 => Self::SERVER_V4,
            Family::V6 => Self::SERVER_V6,
        }
    }

    /// `conntrack ARGS` in the router (stdout; the tool's summary line goes to stderr).
    pub fn conntrack(&self, args: &[&str]) -> String {
        let out = self.router.cmd("conntrack").args(args).output().expect("conntrack");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
