//! Which helpers the running kernel has, per protocol and family: for each
//! candidate a `ct helper` object of that type, protocol and family is
//! committed in a scratch network namespace (on a thread that unshared one;
//! it dies with the thread), the way the glue assigns helpers. The kernel
//! refuses an object whose helper it lacks.

use std::borrow::Cow;

use anyhow::{Context, Result};
use nftables::{
    batch::Batch,
    schema::{CTHelper, NfListObject, Table},
    types::NfFamily,
};

use crate::catalogue::{Family, Offer, Offered};

const TABLE: &str = "enforcer_probe";

fn accepted(offer: &Offer, n: usize) -> Result<bool> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table { family: NfFamily::INet, name: Cow::Borrowed(TABLE), handle: None }));
    batch.add(NfListObject::CTHelper(CTHelper {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Owned(format!("probe{n}")),
        handle: None,
        _type: Cow::Borrowed(offer.kind.name),
        protocol: Some(Cow::Borrowed(offer.protocol.as_str())),
        l3proto: Some(Cow::Borrowed(match offer.family {
            Family::Ipv4 => "ip",
            Family::Ipv6 => "ip6",
        })),
    }));
    let json = serde_json::to_vec(&batch.to_nftables())?;
    // The child inherits this thread's scratch namespace.
    Ok(super::exec::run(std::process::Command::new("nft").args(["-j", "-f", "-"]), Some(&json))?.status.success())
}

/// Every (helper, protocol, family) of the catalogue the kernel accepts.
pub fn probe() -> Result<Vec<Offer>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unsharing a scratch network namespace")?;
            let mut out = Vec::new();
            for (n, offer) in Offered::everything().offers.into_iter().enumerate() {
                if accepted(&offer, n)? {
                    out.push(offer);
                }
            }
            Ok(out)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
    })
}
