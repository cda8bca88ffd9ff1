//! How the TC programs are attached to a router's interfaces.
//!
//! * `tcx` (kernel 6.6 and later): bpf links, pinned under the bpffs
//!   directory, so they outlive the daemon and a restart finds them.
//! * `netlink` (older kernels): a `bpf` filter on each interface's `clsact`
//!   qdisc, at a fixed priority and handle. The filter lives as long as the
//!   qdisc, not the daemon; a restart finds it at that priority and replaces
//!   the program in place, so a second copy is never attached.
//!
//! In both modes other filters and tcx programs on the interface keep
//! running: the programs pass the packet on unless they drop it.

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::{
    Link, SchedClassifier, TcAttachType,
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle as RtTcHandle, TcMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use serde::{Deserialize, Serialize};

/// The `attach` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachSetting {
    /// tcx where the kernel has it (6.6+), netlink otherwise.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

/// The attach mode in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Netlink,
}

/// Priority of enforcer's filters on the clsact hooks (netlink mode): the
/// first, because a classic filter that returns a verdict ends the hook and
/// enforcer must see every packet; ours never returns one except a drop.
/// A foreign filter of another kind at this priority makes attach fail.
pub const NETLINK_PRIORITY: u16 = 1;
pub const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 1);

fn kernel_has_tcx() -> Result<bool> {
    let v = aya::util::KernelVersion::current().context("reading the kernel version")?;
    Ok(v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Resolves the setting against this kernel.
pub fn resolve(setting: AttachSetting) -> Result<AttachMode> {
    let tcx = kernel_has_tcx()?;
    let mode = match setting {
        AttachSetting::Auto if tcx => AttachMode::Tcx,
        AttachSetting::Auto | AttachSetting::Netlink => AttachMode::Netlink,
        AttachSetting::Tcx if tcx => AttachMode::Tcx,
        AttachSetting::Tcx => {
            let v = aya::util::KernelVersion::current().map(|v| format!("{v:?}")).unwrap_or_default();
            bail!("attach = \"tcx\" needs kernel 6.6 or later (tcx links); this kernel is {v}: use attach = \"netlink\" or \"auto\"")
        }
    };
    Ok(mode)
}

/// A router interface: its name (for aya and messages) and its index (for
/// rtnetlink).
pub type Iface<'a> = (&'a str, u32);

/// The tc hooks of the calling thread's namespace, asked over rtnetlink
/// (netlink mode): no `tc` run per interface.
pub struct Hooks(Socket);

impl Hooks {
    pub fn open() -> Result<Self> {
        Ok(Self(super::netlink::open(NETLINK_ROUTE, "route")?))
    }

    fn dump(&self, request: RouteNetlinkMessage) -> Result<Vec<TcMessage>> {
        super::netlink::send_message(&self.0, request, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut found = Vec::new();
        super::netlink::receive_messages(&self.0, false, |m: RouteNetlinkMessage| match m {
            RouteNetlinkMessage::NewQueueDiscipline(tc) | RouteNetlinkMessage::NewTrafficFilter(tc) => found.push(tc),
            _ => {}
        })?;
        Ok(found)
    }

    /// The kind of qdisc on each interface's ingress/clsact hook (handle
    /// ffff:), by interface index: one dump, as the kernel lists every
    /// interface's qdiscs whatever the index asked.
    fn hook_qdiscs(&self) -> Result<std::collections::HashMap<i32, String>> {
        let qdiscs = self.dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))?;
        Ok(qdiscs
            .into_iter()
            .filter(|q| q.header.handle == RtTcHandle { major: 0xffff, minor: 0 })
            .filter_map(|q| {
                let index = q.header.index;
                q.attributes.into_iter().find_map(|a| if let TcAttribute::Kind(k) = a { Some((index, k)) } else { None })
            })
            .collect())
    }

    /// Whether enforcer's filter (a `bpf` filter at its priority) is on
    /// interface `ifindex`'s `kind` hook.
    fn filter_present(&self, ifindex: u32, kind: TcAttachType) -> Result<bool> {
        let mut request = TcMessage::with_index(ifindex as i32);
        let minor = if kind == TcAttachType::Egress { RtTcHandle::MIN_EGRESS } else { RtTcHandle::MIN_INGRESS };
        request.header.parent = RtTcHandle { major: 0xffff, minor };
        let filters = self.dump(RouteNetlinkMessage::GetTrafficFilter(request))?;
        Ok(filters.iter().any(|f| {
            // tcm_info holds the priority in its upper half.
            f.header.index == ifindex as i32
                && (f.header.info >> 16) as u16 == NETLINK_PRIORITY
                && f.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"))
        }))
    }

    /// Which of `ifaces` still need a clsact qdisc. An `ingress` qdisc
    /// (Neutron's floating IP QoS uses one) is refused: it belongs to
    /// Neutron, whose filter takes the priority enforcer's needs.
    pub fn clsact_missing(&self, ifaces: &[(String, u32)]) -> Result<Vec<bool>> {
        let hooks = self.hook_qdiscs()?;
        ifaces
            .iter()
            .map(|(iface, ifindex)| match hooks.get(&(*ifindex as i32)).map(String::as_str) {
                Some("clsact") => Ok(false),
                Some(other) => bail!(
                    "{iface} has an `{other}` qdisc; netlink attach needs its own clsact qdisc and will not replace \
                     another qdisc (and its filters). Use attach = \"tcx\" (kernel 6.6+), or move those filters to clsact"
                ),
                None => Ok(true),
            })
            .collect()
    }

    /// Attaches `prog` to `iface` in netlink mode (after `add_clsact`), or
    /// swaps it in for the one already there. Returns whether it was
    /// missing. Runs in the router's namespace. The link is forgotten:
    /// dropping it would detach the filter.
    pub fn attach(&self, prog: &mut SchedClassifier, (iface, ifindex): Iface, kind: TcAttachType) -> Result<bool> {
        let missing = !self.filter_present(ifindex, kind)?;
        let id = if missing {
            let options = NlOptions { priority: NETLINK_PRIORITY, handle: NETLINK_HANDLE, classid: None };
            prog.attach_with_options(iface, kind, TcAttachOptions::Netlink(options))
        } else {
            let existing = SchedClassifierLink::attached(iface, kind, NETLINK_PRIORITY, NETLINK_HANDLE, None)?;
            prog.attach_to_link(existing)
        }
        .with_context(|| format!("attaching to {iface} ({kind:?}, netlink)"))?;
        std::mem::forget(prog.take_link(id)?);
        Ok(missing)
    }

    /// Removes enforcer's filter from `iface`'s `kind` hook if it is there.
    /// Returns whether it was.
    fn detach_hook(&self, (iface, ifindex): Iface, kind: TcAttachType) -> Result<bool> {
        if !self.filter_present(ifindex, kind)? {
            return Ok(false);
        }
        SchedClassifierLink::attached(iface, kind, NETLINK_PRIORITY, NETLINK_HANDLE, None)?
            .detach()
            .map_err(|e| anyhow!("detaching from {iface} ({kind:?}): {e}"))?;
        Ok(true)
    }

    /// Removes enforcer's filters from `iface`, an earlier release's egress
    /// filter too; absent ones are not an error.
    pub fn detach(&self, iface: Iface) -> Result<()> {
        for kind in [TcAttachType::Ingress, TcAttachType::Egress] {
            self.detach_hook(iface, kind)?;
        }
        Ok(())
    }

    /// Removes the egress filter an earlier release put on `iface` (at an
    /// upgrade; this release attaches on ingress only). Returns whether
    /// there was one.
    pub fn detach_legacy(&self, iface: Iface) -> Result<bool> {
        self.detach_hook(iface, TcAttachType::Egress)
    }

    /// How many of enforcer's filters `iface` lacks: its one, on ingress.
    pub fn missing(&self, (_, ifindex): Iface) -> Result<usize> {
        Ok(usize::from(!self.filter_present(ifindex, TcAttachType::Ingress)?))
    }
}

pub fn add_clsact(iface: &str) -> Result<()> {
    aya::programs::tc::qdisc_add_clsact(iface).with_context(|| format!("adding a clsact qdisc to {iface}"))
}
