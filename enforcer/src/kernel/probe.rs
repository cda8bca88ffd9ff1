//! Which helpers the running kernel has, per protocol and family: for each
//! candidate a `ct helper` object of that type, protocol and family is
//! checked by the kernel in a scratch network namespace, the way the glue
//! assigns helpers. The kernel refuses an object whose helper it lacks.

use std::borrow::Cow;

use anyhow::{Context, Result};
use nftables::{
    batch::Batch,
    schema::{CTHelper, NfListObject, Table},
    types::NfFamily,
};

use crate::{
    api::Family,
    catalogue::{Offer, Offered},
};

const TABLE: &str = "enforcer_probe";

/// Whether the kernel accepts a `ct helper` object for `offer`.
fn accepted(offer: &Offer) -> Result<bool> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(Table { family: NfFamily::INet, name: Cow::Borrowed(TABLE), handle: None }));
    batch.add(NfListObject::CTHelper(CTHelper {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed("probe"),
        handle: None,
        _type: Cow::Borrowed(offer.kind.name),
        protocol: Some(Cow::Borrowed(offer.protocol.as_str())),
        l3proto: Some(Cow::Borrowed(match offer.family {
            Family::Ipv4 => "ip",
            Family::Ipv6 => "ip6",
        })),
    }));
    let json = serde_json::to_vec(&batch.to_nftables())?;
    // The child inherits this thread's scratch namespace; `--check` has the
    // kernel validate the transaction and keep nothing, so the candidates
    // do not meet.
    Ok(super::exec::run(std::process::Command::new("nft").args(["-j", "--check", "-f", "-"]), Some(&json))?.status.success())
}

/// Every (helper, protocol, family) of the catalogue the kernel accepts.
/// The candidates are tried at once, each with one `nft --check` in a
/// scratch namespace of its own: a transaction waits for RCU grace periods
/// and holds its namespace's commit lock, so one namespace would serialize
/// them (about 16 ms each; all at once take about as long as one).
pub fn probe() -> Result<Vec<Offer>> {
    let everything = Offered::everything().offers;
    let verdicts: Vec<Result<bool>> = std::thread::scope(|s| {
        let runs: Vec<_> = everything
            .iter()
            .map(|offer| {
                s.spawn(move || {
                    // The namespace dies with the thread.
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unsharing a scratch network namespace")?;
                    accepted(offer)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked")))).collect()
    });
    let mut out = Vec::new();
    for (offer, accepted) in everything.into_iter().zip(verdicts) {
        if accepted? {
            out.push(offer);
        }
    }
    Ok(out)
}
