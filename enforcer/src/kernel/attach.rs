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

use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::{
    Link, SchedClassifier, TcAttachType,
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};
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

/// Resolves the setting against this kernel (what else the mode needs is
/// checked by `features::check`).
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

fn tc_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = super::exec::check(Command::new("tc").arg("-j").args(args), None).context("running tc (is iproute2 installed?)")?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout).context("reading tc's JSON")
}

fn direction(kind: TcAttachType) -> &'static str {
    match kind {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// Whether `iface` still needs a clsact qdisc (calling thread's namespace).
/// An `ingress` qdisc (Neutron's floating IP QoS uses one) is refused: it
/// belongs to Neutron, whose filter takes the priority enforcer's needs.
pub fn clsact_missing(iface: &str) -> Result<bool> {
    let qdiscs = tc_json(&["qdisc", "show", "dev", iface])?;
    let hook = qdiscs.as_array().into_iter().flatten().find(|q| q["handle"] == "ffff:");
    match hook.and_then(|q| q["kind"].as_str()) {
        Some("clsact") => Ok(false),
        Some(other) => bail!(
            "{iface} has an `{other}` qdisc; netlink attach needs its own clsact qdisc and will not replace \
             another qdisc (and its filters). Use attach = \"tcx\" (kernel 6.6+), or move those filters to clsact"
        ),
        None => Ok(true),
    }
}

pub fn add_clsact(iface: &str) -> Result<()> {
    aya::programs::tc::qdisc_add_clsact(iface).with_context(|| format!("adding a clsact qdisc to {iface}"))
}

/// Whether enforcer's filter is on `iface`'s hook (netlink mode).
fn filter_present(iface: &str, kind: TcAttachType) -> Result<bool> {
    let filters = tc_json(&["filter", "show", "dev", iface, direction(kind)])?;
    Ok(filters
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f["pref"].as_u64() == Some(NETLINK_PRIORITY.into()) && f["kind"] == "bpf"))
}

/// Attaches `prog` to `iface` in netlink mode (after `add_clsact`), or
/// swaps it in for the one already there. Returns whether it was missing.
/// Runs in the router's namespace. The link is forgotten: dropping it would
/// detach the filter.
pub fn netlink_attach(prog: &mut SchedClassifier, iface: &str, kind: TcAttachType) -> Result<bool> {
    let missing = !filter_present(iface, kind)?;
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
fn netlink_detach_hook(iface: &str, kind: TcAttachType) -> Result<bool> {
    if !filter_present(iface, kind)? {
        return Ok(false);
    }
    SchedClassifierLink::attached(iface, kind, NETLINK_PRIORITY, NETLINK_HANDLE, None)?
        .detach()
        .map_err(|e| anyhow!("detaching from {iface} ({kind:?}): {e}"))?;
    Ok(true)
}

/// Removes enforcer's filters from `iface` (calling thread's namespace),
/// an earlier release's egress filter too; absent ones are not an error.
pub fn netlink_detach(iface: &str) -> Result<()> {
    for kind in [TcAttachType::Ingress, TcAttachType::Egress] {
        netlink_detach_hook(iface, kind)?;
    }
    Ok(())
}

/// Removes the egress filter an earlier release put on `iface` (at an
/// upgrade; this release attaches on ingress only). Returns whether there
/// was one.
pub fn netlink_detach_legacy(iface: &str) -> Result<bool> {
    netlink_detach_hook(iface, TcAttachType::Egress)
}

/// How many of enforcer's filters `iface` lacks (netlink mode): its one,
/// on ingress.
pub fn netlink_missing(iface: &str) -> Result<usize> {
    Ok(usize::from(!filter_present(iface, TcAttachType::Ingress)?))
}
