//! The static netfilter glue of a router namespace.
//!
//! One raw-table rule per (helper, protocol, family) turns the tag into the
//! helper (the CT target exists only in raw, which runs before conntrack);
//! two mangle rules save the tag into the conntrack mark of a new connection
//! and restore it onto every packet, so RELATED connections (which inherit
//! the master's ct mark) carry the slot too. The text is built from catalogue
//! constants and the mark layout only: nothing a user typed.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use enforcer_common::MarkLayout;

use crate::catalogue::{Family, Offered};

const HELPERS_CHAIN: &str = "ENFORCER-HELPERS";
const CONNMARK_CHAIN: &str = "ENFORCER-CONNMARK";

/// The iptables tool of a family.
pub fn tool(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "iptables",
        Family::Ipv6 => "ip6tables",
    }
}

/// The iptables-restore input that installs the glue (chains flushed and
/// refilled; `jumps` adds the jumps from PREROUTING).
pub fn install_script(offered: &Offered, layout: &MarkLayout, family: Family, jumps: bool) -> String {
    let mask = layout.mask();
    let mut s = String::new();
    s.push_str(&format!("*raw\n:{HELPERS_CHAIN} - [0:0]\n"));
    for offer in offered.in_family(family) {
        s.push_str(&format!(
            "-A {HELPERS_CHAIN} -p {} -m mark --mark {:#x}/{:#x} -j CT --helper {}\n",
            offer.protocol,
            layout.encode(offer.kind.id, 0),
            layout.helper_mask,
            offer.kind.name
        ));
    }
    if jumps {
        s.push_str(&format!("-I PREROUTING 1 -j {HELPERS_CHAIN}\n"));
    }
    s.push_str("COMMIT\n*mangle\n");
    s.push_str(&format!(":{CONNMARK_CHAIN} - [0:0]\n"));
    // Save before restore: restoring first would wipe the fresh tag of a new
    // connection with its still-empty ct mark.
    s.push_str(&format!(
        "-A {CONNMARK_CHAIN} -m conntrack --ctstate NEW -m mark ! --mark 0x0/{:#x} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}\n",
        layout.slot_mask
    ));
    s.push_str(&format!(
        "-A {CONNMARK_CHAIN} -j CONNMARK --restore-mark --nfmask {mask:#x} --ctmask {mask:#x}\n"
    ));
    if jumps {
        s.push_str(&format!("-I PREROUTING 1 -j {CONNMARK_CHAIN}\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// The iptables-restore input that removes the glue.
pub fn remove_script() -> String {
    let mut s = String::new();
    for (table, chain) in [("raw", HELPERS_CHAIN), ("mangle", CONNMARK_CHAIN)] {
        s.push_str(&format!("*{table}\n-D PREROUTING -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"));
    }
    s
}

fn in_netns(ns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.display())).arg(program);
    cmd
}

fn restore(ns: &Path, family: Family, script: &str) -> Result<()> {
    let tool = format!("{}-restore", tool(family));
    let mut child = in_netns(ns, &tool)
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool} (is iptables installed?)"))?;
    child.stdin.take().context("stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{tool} in {} failed: {}", ns.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether the glue is in place in both families.
pub fn installed(ns: &Path) -> Result<bool> {
    Ok(installed_in(ns, Family::Ipv4)? && installed_in(ns, Family::Ipv6)?)
}

/// Whether the glue's jump is in place in `family`.
fn installed_in(ns: &Path, family: Family) -> Result<bool> {
    let status = in_netns(ns, tool(family))
        .args(["--wait", "-t", "raw", "-C", "PREROUTING", "-j", HELPERS_CHAIN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {}", tool(family)))?;
    Ok(status.success())
}

/// Installs (or refreshes) the glue in both families, one transaction per
/// family. Idempotent: an existing glue is rewritten, never duplicated.
/// Returns whether it was missing in some family.
pub fn install(ns: &Path, offered: &Offered, layout: &MarkLayout) -> Result<bool> {
    let mut added = false;
    for family in Family::ALL {
        let jumps = !installed_in(ns, family)?;
        restore(ns, family, &install_script(offered, layout, family, jumps))?;
        added |= jumps;
    }
    Ok(added)
}

/// Removes the glue from both families; absent glue is not an error.
pub fn remove(ns: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for family in Family::ALL {
        match installed_in(ns, family) {
            Ok(true) => {
                if let Err(e) = restore(ns, family, &remove_script()) {
                    errors.push(format!("{e:#}"));
                }
            }
            Ok(false) => {}
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if errors.is_empty() { Ok(()) } else { bail!(errors.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glue_has_one_rule_per_helper_and_protocol() {
        let offered = Offered::everything();
        let v4 = install_script(&offered, &MarkLayout::DEFAULT, Family::Ipv4, true);
        assert!(v4.contains("-A ENFORCER-HELPERS -p tcp -m mark --mark 0x10000000/0xf0000000 -j CT --helper ftp\n"));
        assert!(v4.contains("-p udp -m mark --mark 0x30000000/0xf0000000 -j CT --helper sip\n"));
        assert!(v4.contains("-p tcp -m mark --mark 0x30000000/0xf0000000 -j CT --helper sip\n"));
        assert!(v4.contains("--helper irc"));
        let no_v6_irc = Offered {
            offers: offered.offers.iter().copied().filter(|o| !(o.kind.name == "irc" && o.family == Family::Ipv6)).collect(),
        };
        let v6 = install_script(&no_v6_irc, &MarkLayout::DEFAULT, Family::Ipv6, false);
        assert!(!v6.contains("--helper irc"), "only what the kernel offers");
        assert!(v6.contains("--helper ftp"));
        assert!(!v6.contains("-I PREROUTING"));
        let rules = v4.lines().filter(|l| l.contains("-j CT")).count();
        assert_eq!(rules, offered.in_family(Family::Ipv4).count());
    }

    #[test]
    fn connmark_keeps_foreign_bits_and_saves_before_restoring() {
        let layout = MarkLayout::from_masks(0x0000_f000, 0x0fff_0000);
        let s = install_script(&Offered::everything(), &layout, Family::Ipv4, true);
        let save = s.find("--save-mark --nfmask 0xffff000 --ctmask 0xffff000").expect("masked save");
        let restore = s.find("--restore-mark --nfmask 0xffff000 --ctmask 0xffff000").expect("masked restore");
        assert!(save < restore);
        assert!(s.contains("! --mark 0x0/0xfff0000"));
        assert!(s.contains("--mark 0x1000/0xf000 -j CT --helper ftp"));
    }
}
