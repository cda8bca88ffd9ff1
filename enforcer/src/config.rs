//! Daemon configuration: a TOML file (`--config`), overridden by flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use enforcer_common::{DEFAULT_MAX_RULES, MarkLayout};
use serde::Deserialize;

use crate::catalogue::CATALOGUE;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/enforcer";

/// Largest conntrack index accepted (its entries cost memory only once
/// used: about 200 bytes each).
const MAX_CT_INDEX: u32 = 1 << 24;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    /// How the programs are attached: "auto", "tcx" or "netlink".
    pub attach: crate::kernel::AttachSetting,
    /// skb mark bits that carry the helper id from TC ingress to enforcer's
    /// prerouting chain, which clears them (contiguous).
    pub helper_mask: u32,
    /// ct mark bits that keep the rule slot (contiguous, 12 to 16 bits);
    /// the same bits carry it in the skb mark from TC ingress to the
    /// prerouting chain. Must be bits no one else keeps in the ct mark.
    pub slot_mask: u32,
    /// Capacity of the rules map, all routers together.
    pub max_rules: u32,
    /// Most helpers one project may have on this host (absent: no cap
    /// below `max_rules`).
    pub max_rules_per_project: Option<u32>,
    /// How long a revoked connection must be quiet before the datapath lets
    /// its packets pass again (as a new, unmarked connection).
    pub revoked_quiet_secs: u64,
    /// Longest a revoked connection is kept dropped, however it talks (a
    /// fixed-port UDP flow may never go quiet).
    pub revoked_max_secs: u64,
    /// Capacity of the revoked-flows map, all routers together, and the
    /// most one router may hold of it (absent: a quarter of the map).
    pub revoked_flows_max: u32,
    pub revoked_flows_per_router: Option<u32>,
    /// Helpers operators may enable, Neutron-style: `NAME` or
    /// `NAME:PROTOCOL`. Absent: everything the kernel has.
    pub allowed_helpers: Option<Vec<String>>,
    /// Group owning the API socket (mode 0660); absent: root only (0600).
    pub socket_group: Option<u32>,
    /// Who may do what (root is always admin).
    pub access: Vec<crate::auth::AccessRule>,
    /// Open API connections at once, all callers together and per uid.
    pub max_connections: u32,
    pub max_connections_per_uid: u32,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: u64,
    /// Longest an external step may take (nft, iptables, a netlink
    /// request) before it is stopped and reported as failed.
    pub command_timeout_secs: u64,
    /// How often each router's glue table is checked as a whole (and put
    /// back if someone removed or changed any of it).
    pub glue_check_secs: u64,
    /// How often the conntrack index drops the connections that ended by
    /// themselves (a lookup per indexed connection, without the lock).
    pub conntrack_index_prune_secs: u64,
    /// Capacity of the conntrack index, all routers together; 0 turns it
    /// off (no hook in router namespaces; every revocation with
    /// connections walks the host's conntrack table).
    pub conntrack_index_max: u32,
    /// Size at which the audit log is rotated (it and one rotated file are
    /// kept, so at most twice this on disk).
    pub audit_max_bytes: u64,
    /// Refused requests audited per uid and second (after a burst of five
    /// times as many); the rest are counted in one entry per second.
    pub audit_refusals_per_sec: u32,
    /// Follow Neutron (absent: local routers only).
    pub neutron: Option<crate::neutron::NeutronConfig>,
    /// Where Prometheus scrapes `/metrics`: `"127.0.0.1:9617"`, or
    /// `"unix:/run/enforcer/metrics.sock"` (absent: no metrics endpoint).
    pub metrics: Option<MetricsAddr>,
    /// Packet counters per rule as well as per router (a series per rule:
    /// up to ten times as many at ten helpers per router).
    pub metrics_per_rule: bool,
}

/// The metrics endpoint's address.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum MetricsAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl TryFrom<String> for MetricsAddr {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => Ok(Self::Unix(PathBuf::from(path))),
            Some(_) => Err(format!("metrics = {text:?}: a unix socket needs an absolute path (unix:/run/enforcer/metrics.sock)")),
            None => text
                .parse()
                .map(Self::Tcp)
                .map_err(|_| format!("metrics = {text:?}: expected ADDRESS:PORT (127.0.0.1:9617, [::1]:9617) or unix:/PATH")),
        }
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
            bpffs: PathBuf::from(crate::kernel::DEFAULT_BPFFS),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            attach: crate::kernel::AttachSetting::Auto,
            helper_mask: MarkLayout::DEFAULT.helper_mask,
            slot_mask: MarkLayout::DEFAULT.slot_mask,
            max_rules: DEFAULT_MAX_RULES,
            max_rules_per_project: None,
            revoked_quiet_secs: enforcer_common::DEFAULT_QUIET_NS / 1_000_000_000,
            revoked_max_secs: enforcer_common::DEFAULT_REVOKED_LIFETIME_NS / 1_000_000_000,
            revoked_flows_max: enforcer_common::MAX_REVOKED_FLOWS,
            revoked_flows_per_router: None,
            allowed_helpers: None,
            socket_group: None,
            access: Vec::new(),
            max_connections: 256,
            max_connections_per_uid: 32,
            idle_timeout_secs: 60,
            command_timeout_secs: 10,
            glue_check_secs: 10,
            conntrack_index_prune_secs: 60,
            conntrack_index_max: enforcer_common::DEFAULT_CT_INDEX_CAPACITY,
            audit_max_bytes: 64 << 20,
            audit_refusals_per_sec: 10,
            neutron: None,
            metrics: None,
            metrics_per_rule: false,
        }
    }
}

fn contiguous(mask: u32) -> bool {
    let run = (mask as u64) >> mask.trailing_zeros();
    mask != 0 && run & (run + 1) == 0
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Config = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(config)
    }

    /// The mark layout, checked: contiguous, disjoint, wide enough.
    pub fn layout(&self) -> Result<MarkLayout> {
        let (h, s) = (self.helper_mask, self.slot_mask);
        if !contiguous(h) || !contiguous(s) {
            bail!("helper_mask {h:#x} and slot_mask {s:#x} must each be one contiguous run of bits");
        }
        if h & s != 0 {
            bail!("helper_mask {h:#x} and slot_mask {s:#x} overlap");
        }
        let max_id = CATALOGUE.iter().map(|k| k.id as u32).max().unwrap_or(1);
        if (h >> h.trailing_zeros()) < max_id {
            bail!("helper_mask {h:#x} is too narrow for helper id {max_id}");
        }
        if !(12..=16).contains(&s.count_ones()) {
            bail!("slot_mask {s:#x} must have 12 to 16 bits (4,096 to 65,535 rules per router)");
        }
        if self.revoked_quiet_secs == 0 || self.revoked_max_secs == 0 {
            bail!("revoked_quiet_secs and revoked_max_secs must be positive");
        }
        let share = self.revoked_policy().per_router;
        if self.revoked_flows_max == 0 || share == 0 || share > self.revoked_flows_max {
            bail!("revoked_flows_per_router ({share}) must be positive and at most revoked_flows_max ({})", self.revoked_flows_max);
        }
        if self.max_rules == 0 {
            bail!("max_rules must be positive");
        }
        if self.conntrack_index_max > MAX_CT_INDEX {
            bail!("conntrack_index_max ({}) must be at most {MAX_CT_INDEX} (0 turns the index off)", self.conntrack_index_max);
        }
        if self.max_connections == 0 || self.max_connections_per_uid == 0 || self.idle_timeout_secs == 0 || self.command_timeout_secs == 0
            || self.glue_check_secs == 0
            || self.conntrack_index_prune_secs == 0
            || self.audit_refusals_per_sec == 0
            || self.audit_max_bytes < 4096
        {
            bail!(
                "max_connections, max_connections_per_uid, idle_timeout_secs, command_timeout_secs, glue_check_secs, conntrack_index_prune_secs and audit_refusals_per_sec must be positive, audit_max_bytes at least 4096"
            );
        }
        Ok(MarkLayout::from_masks(h, s))
    }

    pub fn audit_limits(&self) -> crate::audit::AuditLimits {
        let rate = self.audit_refusals_per_sec as f64;
        crate::audit::AuditLimits { max_bytes: self.audit_max_bytes, refusals_per_sec: rate, refusal_burst: rate * 5.0 }
    }

    pub fn revoked_policy(&self) -> crate::kernel::RevokedPolicy {
        crate::kernel::RevokedPolicy {
            quiet_ns: self.revoked_quiet_secs.saturating_mul(1_000_000_000),
            lifetime_ns: self.revoked_max_secs.saturating_mul(1_000_000_000),
            capacity: self.revoked_flows_max,
            per_router: self.revoked_flows_per_router.unwrap_or((self.revoked_flows_max / 4).max(1)),
        }
    }

    /// Highest usable slot with this layout.
    pub fn max_slot(&self) -> u16 {
        let width = self.slot_mask.count_ones().min(16);
        ((1u32 << width) - 1) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_valid_and_stays_clear_of_neutron() {
        let c = Config::default();
        let layout = c.layout().unwrap();
        assert_eq!(layout, MarkLayout::DEFAULT);
        assert_eq!(c.max_slot(), u16::MAX);
        // Neutron keeps its address scope in the upper half of the ct mark.
        assert_eq!(layout.slot_mask & 0xffff_0000, 0);
    }

    #[test]
    fn bad_masks_are_refused() {
        for (h, s) in [(0, 0xffff), (0xf0000000, 0xf0000000), (0x0000_0003, 0xffff_0000), (0xf000_000f, 0x00ff_ff00), (0xf000_0000, 0xff)] {
            let c = Config { helper_mask: h, slot_mask: s, ..Config::default() };
            assert!(c.layout().is_err(), "{h:#x} {s:#x}");
        }
    }

    #[test]
    fn the_conntrack_index_capacity_is_bounded_and_0_turns_it_off() {
        for (max, ok) in [(0, true), (1, true), (MAX_CT_INDEX, true), (MAX_CT_INDEX + 1, false)] {
            let c: Config = toml::from_str(&format!("conntrack_index_max = {max}\n")).unwrap();
            assert_eq!(c.layout().is_ok(), ok, "{max}");
        }
        assert_eq!(Config::default().conntrack_index_max, enforcer_common::DEFAULT_CT_INDEX_CAPACITY);
    }

    #[test]
    fn parses_access_rules() {
        let c: Config = toml::from_str(
            "socket_group = 2000\nallowed_helpers = [\"ftp\", \"sip:udp\"]\n[[access]]\nuid = 1001\nrole = \"operator\"\nproject = \"p1\"\n[[access]]\ngid = 2000\nrole = \"reader\"\n",
        )
        .unwrap();
        assert_eq!(c.access.len(), 2);
        assert_eq!(c.socket_group, Some(2000));
        assert!(toml::from_str::<Config>("[[access]]\nuid = 1\nrole = \"god\"\n").is_err());
    }

    #[test]
    fn parses_toml() {
        let c: Config = toml::from_str("helper_mask = 0x0000f000\nslot_mask = 0x0fff0000\n").unwrap();
        assert_eq!(c.layout().unwrap().slot_shift, 16);
        let wide = Config { slot_mask: 0x0001_ffff, ..Config::default() };
        assert!(wide.layout().is_err(), "more than 16 slot bits");
        assert_eq!(c.max_slot(), 4095);
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
        let c: Config = toml::from_str("attach = \"netlink\"\n").unwrap();
        assert_eq!(c.attach, crate::kernel::AttachSetting::Netlink);
        assert!(toml::from_str::<Config>("attach = \"clsact\"\n").is_err());
    }

    #[test]
    fn parses_the_metrics_address() {
        let c: Config = toml::from_str("metrics = \"127.0.0.1:9617\"\n").unwrap();
        assert_eq!(c.metrics, Some(MetricsAddr::Tcp("127.0.0.1:9617".parse().unwrap())));
        let c: Config = toml::from_str("metrics = \"unix:/run/enforcer/metrics.sock\"\n").unwrap();
        assert_eq!(c.metrics, Some(MetricsAddr::Unix(PathBuf::from("/run/enforcer/metrics.sock"))));
        for bad in ["localhost", "9617", "unix:metrics.sock", ""] {
            let e = toml::from_str::<Config>(&format!("metrics = {bad:?}\n")).unwrap_err();
            assert!(e.to_string().contains("metrics ="), "{bad}: {e}");
        }
        assert_eq!(Config::default().metrics, None, "off unless asked for");
    }
}
