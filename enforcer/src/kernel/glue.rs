//! The static netfilter glue of a router namespace: enforcer's own nftables
//! table, `inet enforcer`, installed in one transaction for both families.
//!
//! Its one chain runs at a fixed hook priority, so it does not depend on
//! rule order in iptables tables that Neutron's IptablesManager rewrites:
//! `pre`, prerouting at -180 (after conntrack at -200, before Neutron's
//! mangle at -150). A packet the ingress program tagged gets its helper
//! (`ct helper` objects, one per helper and protocol) and, if it opens a
//! connection, its slot in the ct mark; then the tag is cleared from the
//! skb mark. Untagged packets leave at the first rule. One base chain is
//! all every packet pays: nothing of enforcer is needed after NAT.
//!
//! Rules are built from catalogue constants and the mark layout only, as
//! nftables JSON through the `nftables` crate: nothing a user typed.

use std::{
    borrow::Cow,
    path::Path,
    process::{Command, Output},
};

use anyhow::{Context, Result, bail};
use enforcer_common::MarkLayout;
use nftables::{
    batch::Batch,
    expr::{BinaryOperation, CT, Expression, Meta, MetaKey, NamedExpression},
    schema::{CTHelper, Chain, NfCmd, NfListObject, Nftables, Rule, Table},
    stmt::{Mangle, Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::{exec, netlink, netns};
use crate::{
    api::{GlueState, Protocol},
    catalogue::{HelperKind, Offered},
};

/// enforcer's table in every router namespace.
pub const TABLE: &str = "enforcer";
pub const PRE_CHAIN: &str = "pre";
/// After conntrack (-200), before Neutron's mangle PREROUTING (-150).
pub const PRE_PRIORITY: i32 = -180;

/// Name of the `ct helper` object for (helper, protocol): `q931_tcp`.
pub fn object_name(kind: &HelperKind, protocol: Protocol) -> String {
    let name: String = kind.name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!("{}_{}", name.to_ascii_lowercase(), protocol.as_str())
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT { key: Cow::Borrowed(key), family: None, dir: None }))
}

fn and(left: Expression<'static>, mask: u32) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(left, Expression::Number(mask))))
}

fn matches(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn set(key: Expression<'static>, value: Expression<'static>) -> Statement<'static> {
    Statement::Mangle(Mangle { key, value })
}

fn rule(chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        ..Rule::default()
    })
}

fn base_chain(name: &'static str, hook: NfHook, prio: i32) -> NfListObject<'static> {
    NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(name),
        _type: Some(NfChainType::Filter),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table { family: NfFamily::INet, name: Cow::Borrowed(TABLE), handle: None })
}

/// Every (helper, protocol) offered in some family, once.
fn helper_objects(offered: &Offered) -> Vec<(&'static HelperKind, Protocol)> {
    let mut out: Vec<(&'static HelperKind, Protocol)> = Vec::new();
    for o in &offered.offers {
        if !out.iter().any(|(k, p)| k.id == o.kind.id && *p == o.protocol) {
            out.push((o.kind, o.protocol));
        }
    }
    out
}

/// The transaction that (re)creates the table: adding, deleting and adding
/// it again makes one atomic replacement whether or not it existed.
pub fn ruleset(offered: &Offered, layout: &MarkLayout) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    batch.add(table());
    contents(batch, offered, layout)
}

/// The transaction that creates the table where there is none, and fails
/// (changing nothing) where there is one. Replacing a table costs its
/// commit a wait for the kernel to let go of the old table's hook (an RCU
/// grace period: 10 to 30 ms measured here, against 2 ms for this).
fn ruleset_fresh(offered: &Offered, layout: &MarkLayout) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add_cmd(NfCmd::Create(table()));
    contents(batch, offered, layout)
}

/// The table's objects, chain and rules, after `batch`'s table commands.
fn contents(mut batch: Batch<'static>, offered: &Offered, layout: &MarkLayout) -> Nftables<'static> {
    let objects = helper_objects(offered);
    for (kind, protocol) in &objects {
        batch.add(NfListObject::CTHelper(CTHelper {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            name: Cow::Owned(object_name(kind, *protocol)),
            handle: None,
            _type: Cow::Borrowed(kind.name),
            protocol: Some(Cow::Borrowed(protocol.as_str())),
            // Both families; the kernel uses the one it has for a packet.
            l3proto: Some(Cow::Borrowed("inet")),
        }));
    }
    batch.add(base_chain(PRE_CHAIN, NfHook::Prerouting, PRE_PRIORITY));

    let helper_bits = || and(meta(MetaKey::Mark), layout.helper_mask);
    let new = || matches(ct("state"), Operator::IN, Expression::String(Cow::Borrowed("new")));
    // Untagged packets: one comparison and out.
    batch.add(rule(PRE_CHAIN, vec![matches(helper_bits(), Operator::EQ, Expression::Number(0)), Statement::Return(None)]));
    for (kind, protocol) in &objects {
        batch.add(rule(
            PRE_CHAIN,
            vec![
                new(),
                matches(meta(MetaKey::L4proto), Operator::EQ, Expression::String(Cow::Borrowed(protocol.as_str()))),
                matches(helper_bits(), Operator::EQ, Expression::Number(layout.encode(kind.id, 0))),
                Statement::CTHelper(Cow::Owned(object_name(kind, *protocol))),
            ],
        ));
    }
    // A new connection's ct mark is still 0 here (Neutron saves its scope
    // later, in POSTROUTING), so writing the whole ct mark loses nothing.
    batch.add(rule(PRE_CHAIN, vec![new(), set(ct("mark"), and(meta(MetaKey::Mark), layout.slot_mask))]));
    batch.add(rule(PRE_CHAIN, vec![set(meta(MetaKey::Mark), and(meta(MetaKey::Mark), !layout.mask()))]));

    batch.to_nftables()
}

/// Runs `program` inside the namespace at `ns`: spawned from a thread in
/// it, the child starts there (the one way into a namespace, see `netns`).
fn run_in(ns: &Path, program: &str, args: &[&str], input: Option<&[u8]>) -> Result<Output> {
    netns::run_in(ns, || exec::run(Command::new(program).args(args), input))
}

/// Commits `ruleset` (the crate's JSON schema) in one `nft -j -f -` run,
/// under the command time limit.
fn apply(ns: &Path, ruleset: &Nftables) -> Result<()> {
    exec::succeeded("nft", commit(ns, ruleset)?).with_context(|| format!("nft in {}", ns.display()))?;
    Ok(())
}

/// One `nft -j -f -` run of `ruleset`, whatever it exits with; an error
/// only if nft could not run or hung.
fn commit(ns: &Path, ruleset: &Nftables) -> Result<Output> {
    let json = serde_json::to_vec(ruleset).context("serializing the nftables ruleset")?;
    run_in(ns, "nft", &["-j", "-f", "-"], Some(&json))
}

/// Whether enforcer's table exists in the namespace.
pub fn installed(ns: &Path) -> Result<bool> {
    let out = run_in(ns, "nft", &["list", "table", "inet", TABLE], None)
        .with_context(|| format!("nft in {} (is nftables installed?)", ns.display()))?;
    Ok(out.status.success())
}

/// The table as nft lists it, without what differs between two identical
/// tables (handles, nft's version).
fn normalized(listing: &[u8]) -> Result<serde_json::Value> {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                o.remove("handle");
                o.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(listing).context("reading nft's JSON listing")?;
    if let Some(items) = v.get_mut("nftables").and_then(|i| i.as_array_mut()) {
        items.retain(|i| i.get("metainfo").is_none());
    }
    strip(&mut v);
    Ok(v)
}

const LIST: [&str; 5] = ["-j", "list", "table", "inet", TABLE];

/// The normalized table from nft's listing, or None if there is none.
fn listing(out: Output) -> Result<Option<serde_json::Value>> {
    if !out.status.success() {
        return Ok(None);
    }
    normalized(&out.stdout).map(Some)
}

/// The table exactly as installing it leaves it, listed from a scratch
/// network namespace (of a thread that unshared one; it dies with the
/// thread) that nobody else can touch: what every router's glue is
/// checked against.
pub fn reference(offered: &Offered, layout: &MarkLayout) -> Result<serde_json::Value> {
    let json = serde_json::to_vec(&ruleset(offered, layout))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unsharing a scratch network namespace")?;
            exec::check(Command::new("nft").args(["-j", "-f", "-"]), Some(&json)).context("installing the glue in a scratch namespace")?;
            listing(exec::run(Command::new("nft").args(LIST), None)?)?.context("the glue vanished from the scratch namespace")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("glue reference thread panicked"))?
    })
}

/// Where a namespace's nftables ruleset stands: the namespace's cookie
/// (never reused) and its ruleset generation, which every commit in that
/// namespace bumps, whoever makes it (nft, iptables-nft, Neutron). The same
/// generation seen again means nothing changed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    pub netns: u64,
    pub id: u32,
}

/// The generation of the calling thread's namespace (NFT_MSG_GETGEN).
fn generation_here() -> Result<Generation> {
    use netlink_packet_netfilter::{
        NetfilterMessageInner,
        nftables::{GenAttribute, GenMessage, NfTablesMessage},
    };
    let sock = netlink::netfilter()?;
    netlink::send(&sock, NfTablesMessage::GetGen(GenMessage { attributes: Vec::new() }), netlink_packet_core::NLM_F_REQUEST)?;
    let mut id = None;
    netlink::receive(&sock, true, |m| {
        if let NetfilterMessageInner::NfTables(NfTablesMessage::NewGen(g)) = m {
            id = g.attributes.iter().find_map(|a| if let GenAttribute::Id(id) = a { Some(*id) } else { None });
        }
    })?;
    Ok(Generation { netns: netlink::netns_cookie(&sock)?, id: id.context("nftables sent no generation id")? })
}

/// What a check found, and the generation it found it at if the glue was
/// intact (for the next check to skip the listing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub state: GlueState,
    pub intact_at: Option<Generation>,
}

/// Checks the whole table in the namespace at `ns` against `reference`.
/// If the ruleset is still at `known`, a generation at which the glue was
/// found intact, nothing changed since and nft is not run at all.
pub fn check(ns: &Path, reference: &serde_json::Value, known: Option<Generation>) -> Result<Found> {
    // The generation is read before the listing: a change racing the
    // listing then shows as a new generation next time. Without it (a
    // kernel that refuses the query) the table is listed every time.
    let (generation, out) = netns::run_in(ns, || {
        let generation = generation_here().ok();
        if generation.is_some() && generation == known {
            return Ok((generation, None));
        }
        Ok((generation, Some(exec::run(Command::new("nft").args(LIST), None)?)))
    })
    .with_context(|| format!("checking the glue in {}", ns.display()))?;
    let Some(out) = out else {
        return Ok(Found { state: GlueState::Intact, intact_at: generation });
    };
    let state = match listing(out).with_context(|| format!("listing the glue in {}", ns.display()))? {
        None => GlueState::Missing,
        Some(table) if &table == reference => GlueState::Intact,
        Some(_) => GlueState::Altered,
    };
    Ok(Found { state, intact_at: generation.filter(|_| state == GlueState::Intact) })
}

/// What installing the glue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The glue was missing.
    pub added: bool,
    /// Its table did not exist before: no connection of the namespace
    /// went through enforcer's chain yet, so none carries a slot.
    pub created: bool,
    /// The generation its transaction made, if no other commit came
    /// between (see [`commit_at`]): the glue is known intact there, and the
    /// next check needs no listing while the ruleset stays at it.
    pub intact_at: Option<Generation>,
}

/// Installs (or rewrites) the glue in one transaction. Idempotent. A
/// namespace that lacked it is also cleared of the iptables glue of
/// earlier versions, so an upgraded host is clean.
pub fn install(ns: &Path, offered: &Offered, layout: &MarkLayout) -> Result<Installed> {
    let missing = !installed(ns)?;
    if missing {
        legacy::remove(ns).context("removing the iptables glue of an earlier version")?;
    }
    Ok(Installed { added: missing, created: missing, intact_at: apply_at(ns, &ruleset(offered, layout))? })
}

/// The glue of a router enforcer does not know yet, in one transaction
/// (replacing any table of that name), without looking for the iptables
/// glue of earlier versions first: that costs four iptables runs, and only
/// a router an earlier version managed can have it, which start-up (for
/// the stored routers) and [`remove`] clear.
pub fn install_new(ns: &Path, offered: &Offered, layout: &MarkLayout) -> Result<Installed> {
    // A stale table (of a router removed while enforcer was down) makes nft
    // fail the creation; the replacing transaction then reports any real
    // error. An nft that hangs or cannot start is not run twice.
    let (out, intact_at) = commit_at(ns, &ruleset_fresh(offered, layout))?;
    if out.status.success() {
        return Ok(Installed { added: true, created: true, intact_at });
    }
    Ok(Installed { added: true, created: false, intact_at: apply_at(ns, &ruleset(offered, layout))? })
}

/// [`apply`], and where it left the ruleset (see [`commit_at`]).
fn apply_at(ns: &Path, ruleset: &Nftables) -> Result<Option<Generation>> {
    let (out, intact_at) = commit_at(ns, ruleset)?;
    exec::succeeded("nft", out).with_context(|| format!("nft in {}", ns.display()))?;
    Ok(intact_at)
}

/// [`commit`], and the generation the transaction made if it succeeded and
/// the ruleset moved by exactly one commit meanwhile (every commit bumps
/// the generation by one, whoever makes it): then the ruleset is the one
/// this transaction left. Else None, and the next check lists the table.
fn commit_at(ns: &Path, ruleset: &Nftables) -> Result<(Output, Option<Generation>)> {
    let before = netns::run_in(ns, generation_here).ok();
    let out = commit(ns, ruleset)?;
    if !out.status.success() {
        return Ok((out, None));
    }
    let after = netns::run_in(ns, generation_here).ok();
    let intact_at = match (before, after) {
        (Some(b), Some(a)) if a.netns == b.netns && a.id == b.id.wrapping_add(1) => Some(a),
        _ => None,
    };
    Ok((out, intact_at))
}

/// Removes the glue (and any earlier iptables glue); absent glue is not an
/// error. Every step is tried; errors are reported together.
pub fn remove(ns: &Path) -> Result<()> {
    let mut errors = Vec::new();
    match installed(ns) {
        Ok(true) => {
            let mut batch = Batch::new();
            batch.delete(table());
            if let Err(e) = apply(ns, &batch.to_nftables()) {
                errors.push(format!("{e:#}"));
            }
        }
        Ok(false) => {}
        Err(e) => errors.push(format!("{e:#}")),
    }
    if let Err(e) = legacy::remove(ns) {
        errors.push(format!("{e:#}"));
    }
    if errors.is_empty() { Ok(()) } else { bail!(errors.join("; ")) }
}

/// The iptables glue of versions before the nftables table (raw-table
/// `CT --helper` chain and mangle CONNMARK chain, jumped to from
/// PREROUTING). Only ever removed.
pub mod legacy {
    use std::path::Path;

    use anyhow::Result;

    use super::run_in;
    use crate::kernel::exec;

    pub const CHAINS: [(&str, &str); 2] = [("raw", "ENFORCER-HELPERS"), ("mangle", "ENFORCER-CONNMARK")];

    /// Whether `table` has `chain` in the family of `tool`.
    fn has_chain(ns: &Path, tool: &str, table: &str, chain: &str) -> Result<bool> {
        Ok(run_in(ns, tool, &["--wait", "-t", table, "-n", "-L", chain], None)?.status.success())
    }

    /// Removes the old chains and their jumps, where they exist.
    pub fn remove(ns: &Path) -> Result<()> {
        for tool in ["iptables", "ip6tables"] {
            let mut script = String::new();
            for (table, chain) in CHAINS {
                if has_chain(ns, tool, table, chain)? {
                    // Jumps may be there once or not at all; -D of a missing
                    // one would fail the whole restore, so each goes alone.
                    while run_in(ns, tool, &["--wait", "-t", table, "-D", "PREROUTING", "-j", chain], None)?
                        .status
                        .success()
                    {}
                    script.push_str(&format!("*{table}\n-F {chain}\n-X {chain}\nCOMMIT\n"));
                }
            }
            if !script.is_empty() {
                let restore = format!("{tool}-restore");
                exec::succeeded(&restore, run_in(ns, &restore, &["--noflush", "--wait"], Some(script.as_bytes()))?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{api::Family, catalogue::Offer};

    fn json(offered: &Offered, layout: &MarkLayout) -> serde_json::Value {
        serde_json::to_value(ruleset(offered, layout)).unwrap()
    }

    fn adds(v: &serde_json::Value, kind: &str) -> Vec<serde_json::Value> {
        v["nftables"].as_array().unwrap().iter().filter_map(|o| o.get("add")?.get(kind).cloned()).collect()
    }

    #[test]
    fn one_helper_object_per_helper_and_protocol_in_both_families() {
        let offered = Offered::everything();
        let v = json(&offered, &MarkLayout::DEFAULT);
        let objects = adds(&v, "ct helper");
        let sip: Vec<_> = objects.iter().filter(|o| o["type"] == "sip").collect();
        assert_eq!(sip.len(), 2, "sip over udp and tcp");
        assert!(objects.iter().all(|o| o["l3proto"] == "inet" && o["table"] == TABLE));
        let q931 = objects.iter().find(|o| o["type"] == "Q.931").unwrap();
        assert_eq!(q931["name"], "q931_tcp");
        // An IPv4-only offer still gets its object; nothing not offered does.
        let only_irc_v4 = Offered {
            offers: offered.offers.iter().copied().filter(|o| o.kind.name == "irc" && o.family == Family::Ipv4).collect(),
        };
        let v = json(&only_irc_v4, &MarkLayout::DEFAULT);
        assert_eq!(adds(&v, "ct helper").len(), 1);
        assert_eq!(adds(&v, "rule").iter().filter(|r| r.to_string().contains("\"ct helper\"")).count(), 1);
    }

    #[test]
    fn replaces_the_table_atomically_and_chains_sit_at_fixed_priorities() {
        let v = json(&Offered::everything(), &MarkLayout::DEFAULT);
        let cmds = v["nftables"].as_array().unwrap();
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        assert!(cmds[2]["add"]["table"].is_object());
        let chains = adds(&v, "chain");
        let pre = chains.iter().find(|c| c["name"] == PRE_CHAIN).unwrap();
        assert_eq!((pre["hook"].as_str(), pre["prio"].as_i64()), (Some("prerouting"), Some(-180)));
        assert_eq!(chains.len(), 1, "one base chain: every packet crosses each");
    }

    #[test]
    fn a_fresh_table_is_created_not_replaced_with_the_same_contents() {
        let offered = Offered::everything();
        let fresh = serde_json::to_value(ruleset_fresh(&offered, &MarkLayout::DEFAULT)).unwrap();
        let replacing = json(&offered, &MarkLayout::DEFAULT);
        let (fresh, replacing) = (fresh["nftables"].as_array().unwrap(), replacing["nftables"].as_array().unwrap());
        assert!(fresh[0]["create"]["table"].is_object(), "fails where a table exists: {}", fresh[0]);
        assert!(!fresh.iter().any(|c| c.get("delete").is_some()));
        assert_eq!(fresh[1..], replacing[3..]);
    }

    #[test]
    fn marks_use_only_the_layout() {
        let layout = MarkLayout::from_masks(0x00f0_0000, 0x0000_0fff);
        let v = json(&Offered { offers: vec![Offer { kind: crate::catalogue::by_name("ftp").unwrap(), protocol: Protocol::Tcp, family: Family::Ipv4 }] }, &layout);
        let rules: Vec<String> = adds(&v, "rule").iter().map(|r| r["expr"].to_string()).collect();
        // Untagged packets leave first.
        assert!(rules[0].contains(&format!("{{\"&\":[{{\"meta\":{{\"key\":\"mark\"}}}},{}]}}", 0x00f0_0000u32)), "{}", rules[0]);
        assert!(rules[0].contains("\"return\""));
        // The helper rule compares the helper bits with the helper's id.
        assert!(rules[1].contains(&(1u32 << 20).to_string()) && rules[1].contains("ftp_tcp"));
        // Slot into the ct mark, tag cleared, keeping every other bit.
        assert!(rules[2].contains("\"ct\":{\"key\":\"mark\"}") && rules[2].contains(&0xfffu32.to_string()));
        assert!(rules[3].contains(&(!0x00f0_0fffu32).to_string()));
        assert_eq!(rules.len(), 4);
    }
}
