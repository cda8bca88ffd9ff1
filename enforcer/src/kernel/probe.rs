//! Which helpers the running kernel has, per protocol and family: each
//! candidate rule `-p PROTO -j CT --helper NAME` is committed in a scratch
//! network namespace (on a thread that unshared one; it dies with the
//! thread). The kernel refuses a helper it lacks when the rule is committed.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, Result};

use crate::catalogue::{Offer, Offered};

fn accepted(offer: &Offer) -> Result<bool> {
    let tool = format!("{}-restore", super::glue::tool(offer.family));
    let mut child = Command::new(&tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    let rule = format!(
        "*raw\n:ENFORCER-PROBE - [0:0]\n-A ENFORCER-PROBE -p {} -j CT --helper {}\nCOMMIT\n",
        offer.protocol, offer.kind.name
    );
    child.stdin.take().context("stdin")?.write_all(rule.as_bytes())?;
    Ok(child.wait()?.success())
}

/// Every (helper, protocol, family) of the catalogue the kernel accepts.
pub fn probe() -> Result<Vec<Offer>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unsharing a scratch network namespace")?;
            let mut out = Vec::new();
            for offer in Offered::everything().offers {
                if accepted(&offer)? {
                    out.push(offer);
                }
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    })
}
