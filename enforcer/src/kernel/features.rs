//! What enforcer needs of the running kernel and of the host, checked at
//! start before anything is changed, so that a host lacking a piece gets
//! one error naming every missing piece instead of a failure halfway
//! through loading or attaching.

use std::{path::Path, process::Command};

use aya::{maps::MapType, programs::ProgramType};

/// One requirement: what it is, and whether the host meets it.
struct Need {
    what: &'static str,
    met: bool,
}

/// Checks every requirement; the error lists all that are missing. Both
/// attach modes need the same: netlink mode asks rtnetlink itself, with no
/// `tc` command.
pub fn check() -> anyhow::Result<()> {
    let missing = missing(&needs());
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!("this host lacks what enforcer needs:\n  - {}", missing.join("\n  - "))
}

fn missing(needs: &[Need]) -> Vec<&'static str> {
    needs.iter().filter(|n| !n.met).map(|n| n.what).collect()
}

fn needs() -> Vec<Need> {
    let program = |t| aya::sys::is_program_supported(t).unwrap_or(false);
    let map = |t| aya::sys::is_map_supported(t).unwrap_or(false);
    vec![
        Need { what: "BPF programs of type sched_cls (CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF, CONFIG_NET_CLS_ACT)", met: program(ProgramType::SchedClassifier) },
        Need { what: "BPF hash maps (CONFIG_BPF_SYSCALL)", met: map(MapType::Hash) },
        Need { what: "BPF array maps (CONFIG_BPF_SYSCALL)", met: map(MapType::Array) },
        Need { what: "connection tracking (CONFIG_NF_CONNTRACK; module nf_conntrack)", met: conntrack() },
        Need { what: "the `nft` command (package nftables): enforcer's netfilter glue is an nftables table", met: runs("nft", &["--version"]) },
    ]
}

/// Conntrack is there, or its module loads (as nftables would load it).
fn conntrack() -> bool {
    let present = || Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists();
    present() || (runs("modprobe", &["nf_conntrack"]) && present())
}

fn runs(program: &str, args: &[&str]) -> bool {
    super::exec::run(Command::new(program).args(args), None).is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_piece_is_named_once_in_order() {
        let needs = [Need { what: "a", met: false }, Need { what: "b", met: true }, Need { what: "c", met: false }];
        assert_eq!(missing(&needs), ["a", "c"]);
    }
}
