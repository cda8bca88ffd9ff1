//! A test bed router that is a Neutron router: `qr-`/`qg-` interfaces and
//! the L3 agent's iptables rules installed by Neutron's own code (the
//! pinned `neutron` release in the venv `cargo xtask setup` makes): SNAT on
//! the gateway, a floating IP for the client, address scope marks and
//! filters, the metadata and external-ingress marks.

use std::path::PathBuf;

use serde_json::json;

use crate::{Topology, peers_dir, run};

/// The venv with the pinned neutron release (made by `cargo xtask setup`).
pub const VENV: &str = "/var/cache/enforcer/openstack-n29.0.0-k30.0.0";
/// The client's floating IP on the gateway network.
pub const FLOATING_V4: &str = "10.200.2.50";
/// The gateway port's address: the router's SNAT address.
pub const GATEWAY_V4: &str = "10.200.2.1";
/// Neutron's mark of the default address scope (upper half of the marks).
pub const DEFAULT_SCOPE_MARK: u32 = 0x0400_0000;

const INTERNAL_PORT: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const GATEWAY_PORT: &str = "bbbbbbbb-0000-4000-8000-000000000002";

pub struct NeutronRouter {
    pub topo: Topology,
    spec: serde_json::Value,
}

fn python() -> PathBuf {
    let python = PathBuf::from(VENV).join("bin/python");
    assert!(python.exists(), "{} is missing: run `cargo xtask setup` (it installs the pinned neutron release)", python.display());
    python
}

impl NeutronRouter {
    /// Client behind `qr-`, server behind `qg-`, the test bed's stateful
    /// forward policy, and Neutron's rules. `scopes`: address scopes of the
    /// internal and the gateway port (None: Neutron's default scope).
    pub fn new(firewall: bool, scopes: (Option<&str>, Option<&str>)) -> Self {
        Self::build(firewall, scopes, true)
    }

    /// The router without a floating IP: the client goes out through the
    /// gateway's SNAT address ([`GATEWAY_V4`]).
    pub fn snat_only() -> Self {
        Self::build(true, (None, None), false)
    }

    fn build(firewall: bool, scopes: (Option<&str>, Option<&str>), floating_ip: bool) -> Self {
        let internal = format!("qr-{}", &INTERNAL_PORT[..11]);
        let gateway = format!("qg-{}", &GATEWAY_PORT[..11]);
        let topo = Topology::build_named(firewall, &internal, &gateway);
        // The floating IP lives on the gateway device, as the agent puts it.
        if floating_ip {
            topo.router.sh("ip", &["addr", "add", &format!("{FLOATING_V4}/32"), "dev", &gateway]);
        }
        let floating_ips = match floating_ip {
            true => json!([{"floating": FLOATING_V4, "fixed": Topology::CLIENT_V4, "scope": scopes.0}]),
            false => json!([]),
        };
        let lock_path = std::env::temp_dir().join(crate::unique("nlock"));
        std::fs::create_dir_all(&lock_path).unwrap();
        let spec = json!({
            "router_id": topo.router_id,
            "lock_path": lock_path,
            "internal": [{"id": INTERNAL_PORT, "cidrs": ["10.200.1.1/24", "fd00:200::1:1/112"], "scope": scopes.0}],
            "gateway": {"id": GATEWAY_PORT, "cidrs": [format!("{GATEWAY_V4}/24"), "fd00:200::2:1/112"], "scope": scopes.1},
            "floating_ips": floating_ips,
        });
        let router = Self { topo, spec };
        let devices = router.apply();
        assert_eq!(devices, json!({"internal": [internal], "gateway": gateway}), "Neutron names the devices as the test bed did");
        router
    }

    /// The same router with no rules at all: the bare baseline.
    pub fn bare() -> Topology {
        let topo = Topology::build_named(false, &format!("qr-{}", &INTERNAL_PORT[..11]), &format!("qg-{}", &GATEWAY_PORT[..11]));
        topo.router.sh("ip", &["addr", "add", &format!("{FLOATING_V4}/32"), "dev", &topo.server_if]);
        topo
    }

    /// Runs Neutron's rule processing for the router (again): what the L3
    /// agent does on every router update or resync. Returns the device
    /// names Neutron used.
    pub fn apply(&self) -> serde_json::Value {
        let out = run(std::process::Command::new(python())
            .arg("-W")
            .arg("ignore")
            .arg(peers_dir().join("neutron_router.py"))
            .arg(self.spec.to_string()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("neutron_router.py said {stdout:?}: {e}"))
    }

    /// Lets new FTP control connections in from the gateway side to the
    /// client's fixed address (after the floating IP's DNAT), as a security
    /// group rule would; data connections still need the helper (RELATED).
    pub fn open_inbound_ftp(&self) {
        let gateway = &self.topo.server_if;
        self.topo.router.sh(
            "iptables",
            &["-I", "FORWARD", "-i", gateway, "-d", Topology::CLIENT_V4, "-p", "tcp", "--dport", "21", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"],
        );
    }

    /// Packets Neutron's address scope filter dropped (IPv4).
    pub fn scope_drops(&self) -> u64 {
        let out = self.topo.router.sh("iptables", &["-t", "filter", "-L", "neutron-l3-agent-scope", "-v", "-x", "-n"]);
        out.lines().filter(|l| l.contains("DROP")).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum()
    }
}

impl Drop for NeutronRouter {
    fn drop(&mut self) {
        if let Some(dir) = self.spec["lock_path"].as_str() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
