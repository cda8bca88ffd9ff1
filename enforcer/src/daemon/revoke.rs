//! Complete revocation of a rule slot. The flows of every conntrack entry
//! carrying the slot (control and RELATED connections) are put in the
//! revoked-flows map, where the ingress program drops them, before the rule
//! leaves the maps; then the entries are deleted (their expectations go
//! with them), and the flows stay dead in the datapath so conntrack cannot
//! pick them up again mid-stream.

use std::{collections::HashSet, path::Path};

use tracing::{info, warn};

use super::Daemon;
use crate::{
    api::{Owner, RevokeReport},
    kernel::{Datapath, Remembered, conntrack, netns},
    store::{Change, HelperRecord},
};

/// Dump-and-delete rounds before a slot is left quarantined.
const FLUSH_ROUNDS: usize = 5;

/// The steps of a flush: the kernel's (ctnetlink and the revoked-flows map)
/// in the daemon; scripted in the unit tests below.
trait FlushSteps {
    /// The conntrack entries carrying the slot now.
    fn carried(&mut self) -> anyhow::Result<Vec<conntrack::Entry>>;
    /// Keeps their flows dropped in the datapath.
    fn remember(&mut self, entries: &[conntrack::Entry]) -> anyhow::Result<Remembered>;
    /// Deletes `found`, each by its tuple; or (None) every entry carrying
    /// the slot, by its mark.
    fn delete(&mut self, found: Option<&[conntrack::Entry]>) -> anyhow::Result<()>;
}

struct KernelFlush<'a> {
    datapath: &'a mut Datapath,
    index: u32,
    slot: u16,
    mark: (u32, u32),
    /// Dumps of the conntrack table made.
    dumps: usize,
}

impl<'a> KernelFlush<'a> {
    fn new(datapath: &'a mut Datapath, index: u32, slot: u16, mark: (u32, u32)) -> Self {
        Self { datapath, index, slot, mark, dumps: 0 }
    }
}

impl FlushSteps for KernelFlush<'_> {
    /// From the conntrack index where it is complete for the router; else
    /// from a dump of every entry carrying a slot, which fills the index.
    fn carried(&mut self) -> anyhow::Result<Vec<conntrack::Entry>> {
        if let Some(found) = self.datapath.ct_carrying(self.index, self.slot) {
            return Ok(found);
        }
        self.dumps += 1;
        let layout = self.datapath.layout();
        let missed_before = self.datapath.ct_index_missed().unwrap_or_default();
        let dumped: Vec<(conntrack::Entry, u16)> =
            conntrack::entries_marked_within(layout.slot_mask)?.into_iter().map(|(e, m)| (e, layout.slot(m) as u16)).collect();
        if let Err(e) = self.datapath.ct_seed(self.index, &dumped, missed_before) {
            warn!(router = self.index, "filling the conntrack index: {e:#}");
        }
        Ok(dumped.into_iter().filter(|(_, s)| *s == self.slot).map(|(e, _)| e).collect())
    }

    fn remember(&mut self, entries: &[conntrack::Entry]) -> anyhow::Result<Remembered> {
        self.datapath.remember_revoked(self.index, self.slot, entries)
    }

    fn delete(&mut self, found: Option<&[conntrack::Entry]>) -> anyhow::Result<()> {
        match found {
            Some(entries) => {
                conntrack::delete_entries(entries)?;
                // Deleted or gone already: none is in the table.
                self.datapath.ct_forget(self.index, entries);
                Ok(())
            }
            None => {
                self.dumps += 1;
                conntrack::delete_with_mark(self.mark.0, self.mark.1)?;
                // Every entry carrying the slot is gone: what the index
                // still holds of it is stale.
                self.datapath.ct_forget_slot(self.index, self.slot);
                Ok(())
            }
        }
    }
}

/// The entries whose flows a revocation keeps dropped, each remembered
/// once (a router's share of the map counts every insert).
#[derive(Default)]
struct Kept(HashSet<conntrack::Entry>);

impl Kept {
    /// Remembers the flows of the entries of `entries` not remembered yet.
    fn keep(&mut self, steps: &mut impl FlushSteps, entries: &[conntrack::Entry], report: &mut RevokeReport) -> anyhow::Result<()> {
        let new: Vec<conntrack::Entry> = entries.iter().filter(|e| self.0.insert(**e)).copied().collect();
        if new.is_empty() {
            return Ok(());
        }
        let remembered = steps.remember(&new)?;
        report.flows_kept_dead += remembered.kept;
        report.flows_not_kept += remembered.overflowed;
        Ok(())
    }
}

/// Dump, remember, delete, check; repeated while entries carrying the slot
/// remain: a connection that got the slot while this ran (its first packet
/// was tagged just before the rule went) is revoked too. Returns how many
/// entries still carry it after the last round.
///
/// A dump walks the host's whole conntrack table (every namespace's
/// entries are in one; about 12 ms for an empty one of 262,144 buckets
/// here), so there are as few as can be: the first round starts from the
/// entries `found` before the rule went, if given, and deletes them by
/// their tuples (a lookup each); its check finds what came meanwhile. The
/// later rounds, which are rare (a race, or an entry in a conntrack zone
/// the tuple did not name), delete by the mark in one walk.
fn rounds(steps: &mut impl FlushSteps, kept: &mut Kept, report: &mut RevokeReport, found: Option<Vec<conntrack::Entry>>) -> anyhow::Result<usize> {
    let mut entries = match found {
        Some(entries) => entries,
        None => steps.carried()?,
    };
    for round in 0..FLUSH_ROUNDS {
        if entries.is_empty() {
            break;
        }
        report.conntrack_entries_removed += entries.len();
        // Remember the flows before their entries go: from then on a
        // packet of theirs would start a fresh, unmarked entry.
        kept.keep(steps, &entries, report)?;
        steps.delete((round == 0).then_some(entries.as_slice()))?;
        entries = steps.carried()?;
    }
    Ok(entries.len())
}

/// Cleans the conntrack table of the router in `ns` of the entries marked
/// with `mark`, keeping their flows dead in the datapath first, in one visit
/// to the namespace. A step that fails leaves the report's `flush_error`
/// set (and the slot quarantined by the caller).
pub(super) fn flush(datapath: &mut Datapath, ns: &Path, index: u32, slot: u16, mark: (u32, u32), quiet_secs: u64) -> RevokeReport {
    let report = RevokeReport { quiet_secs, ..Default::default() };
    flush_kept(&mut KernelFlush::new(datapath, index, slot, mark), ns, report, Kept::default(), None)
}

/// `flush`, after `kept` were remembered already.
fn flush_kept(steps: &mut KernelFlush, ns: &Path, mut report: RevokeReport, mut kept: Kept, found: Option<Vec<conntrack::Entry>>) -> RevokeReport {
    let result = netns::run_in(ns, || rounds(steps, &mut kept, &mut report, found));
    settle(&mut report, result);
    report.conntrack_dumps += steps.dumps;
    report
}

/// Revokes the live rule `h` of the router in `ns` completely. The flows
/// of the connections it has are dropped first, then it leaves the maps,
/// then its slot is cleaned from conntrack: nothing of its connections
/// passes from the first step on. Returns the report, and the quarantine
/// of the slot if something still carries it, to be written in the same
/// transaction as the change.
///
/// A rule that never tagged a packet since it was allowed (its counters
/// start at zero then) cannot have marked a connection: the table is not
/// visited, so such a delete costs no more with a big conntrack table. A
/// packet tagged in the instant before the rule went is caught by the
/// re-check after the cooling time (see `cooled`).
pub(super) fn revoke_rule<'a>(
    datapath: &mut Datapath,
    ns: &Path,
    index: u32,
    h: &'a HelperRecord,
    mark: (u32, u32),
    quiet_secs: u64,
) -> anyhow::Result<(RevokeReport, Vec<Change<'a>>)> {
    let mut report = RevokeReport { quiet_secs, ..Default::default() };
    let mut kept = Kept::default();
    // The entries found before the rule went: the flush starts from them.
    let mut found = None;
    if datapath.tagged(index, h.slot).is_ok_and(|n| n == 0) {
        super::ops::revoke_record(datapath, index, h)?;
        if datapath.tagged(index, h.slot).is_ok_and(|n| n == 0) {
            return Ok((RevokeReport { slot_released: true, never_tagged: true, ..report }, Vec::new()));
        }
    } else {
        let mut steps = KernelFlush::new(datapath, index, h.slot, mark);
        let before = netns::run_in(ns, || {
            let now = steps.carried()?;
            kept.keep(&mut steps, &now, &mut report)?;
            Ok(now)
        });
        report.conntrack_dumps += steps.dumps;
        match before {
            Ok(now) => found = Some(now),
            // The rounds below try again, once the rule is out.
            Err(e) => warn!(slot = h.slot, "keeping the rule's connections dropped before it goes: {e:#}"),
        }
        if let Err(e) = super::ops::revoke_record(datapath, index, h) {
            // The rule stays: its connections must not stay dropped.
            datapath.forget_revoked(index, kept.0.iter());
            return Err(e);
        }
    }
    let report = flush_kept(&mut KernelFlush::new(datapath, index, h.slot, mark), ns, report, kept, found);
    let more = if report.slot_released { Vec::new() } else { vec![Change::Quarantine { router_id: &h.helper.router_id, slot: h.slot }] };
    Ok((report, more))
}

fn settle(report: &mut RevokeReport, result: anyhow::Result<usize>) {
    match result {
        Ok(0) => report.slot_released = true,
        Ok(left) => report.flush_error = Some(format!("{left} conntrack entries still carry the slot")),
        Err(e) => report.flush_error = Some(format!("{e:#}")),
    }
}

/// How long a slot released without a visit to the conntrack table stays
/// out of reuse before its counters are read again: far longer than any run
/// of the ingress program that may have read the rule before it went.
pub(super) const COOLING: std::time::Duration = std::time::Duration::from_secs(1);

impl Daemon {
    /// After a rule was revoked: a slot that never tagged a packet cools
    /// down before it is free; any other is settled by its flush.
    pub(super) fn revoked_slot(&mut self, router_id: &str, slot: u16, report: &RevokeReport, origin: Owner) {
        self.tally.revocations.rules += 1;
        if report.never_tagged {
            self.announce_revocation(router_id, slot, report, origin);
            if let Some(state) = self.routers.get(router_id) {
                self.slots.revoked(router_id, state.record.index, slot, report);
            }
        } else {
            self.after_flush(router_id, slot, report, origin);
        }
    }

    /// Settles slots whose cooling time is over: free if they still never
    /// tagged a packet; else a packet was tagged just before the rule went,
    /// and the slot is quarantined and flushed like any revoked slot.
    pub(super) fn cooled(&mut self) {
        for (router, slot) in self.slots.cooled(COOLING) {
            let Some(index) = self.routers.get(&router).map(|r| r.record.index) else { continue };
            if self.datapath.tagged(index, slot).is_ok_and(|n| n == 0) {
                self.slot_released(&router, slot);
                continue;
            }
            warn!(router = %router, slot, "a packet was tagged as the rule went: cleaning conntrack of its slot");
            if let Err(e) = self.store.apply(&[Change::Quarantine { router_id: &router, slot }], || Ok(())) {
                warn!(router = %router, slot, "quarantining: {e}");
            }
            self.slots.quarantine(&router, slot);
            // Settled by the daemon itself, on no one's request.
            self.flush_slot(&router, slot, Owner::Local);
        }
    }

    /// Logs a flush, and frees or keeps the slot in memory accordingly (the
    /// store was told in the same transaction, or by the caller).
    pub(super) fn after_flush(&mut self, router_id: &str, slot: u16, report: &RevokeReport, origin: Owner) {
        self.tally.revocations.conntrack_entries += report.conntrack_entries_removed as u64;
        self.tally.revocations.flows_kept += report.flows_kept_dead as u64;
        self.tally.revocations.conntrack_dumps += report.conntrack_dumps as u64;
        self.announce_revocation(router_id, slot, report, origin);
        if let Some(e) = &report.flush_error {
            warn!(router = %router_id, slot, "conntrack flush incomplete, slot quarantined: {e}");
        } else {
            info!(
                router = %router_id,
                slot,
                entries = report.conntrack_entries_removed,
                flows = report.flows_kept_dead,
                "conntrack cleaned, slot released"
            );
        }
        if let Some(state) = self.routers.get(router_id) {
            self.slots.revoked(router_id, state.record.index, slot, report);
        }
    }

    /// Tells event subscribers what a revocation (or a later flush of its
    /// slot) removed.
    fn announce_revocation(&self, router_id: &str, slot: u16, report: &RevokeReport, origin: Owner) {
        self.audit.announce(|| {
            let mut after = serde_json::to_value(report).unwrap_or_default();
            after["slot"] = slot.into();
            let error = report.flush_error.clone().map(|e| ("incomplete", crate::api::ApiError::kernel(e)));
            let mut entry = crate::api::AuditEntry::by_daemon("revocation", Some(router_id), None, after, error);
            // Made for the request (or the sync) whose change revoked the rule.
            entry.origin = origin;
            crate::api::Event { kind: crate::api::EventKind::Revocation, entry }
        });
    }

    /// Cleans the conntrack table of router `router_id` of a quarantined
    /// `slot` and frees the slot if nothing carries it any more.
    pub(super) fn flush_slot(&mut self, router_id: &str, slot: u16, origin: Owner) -> RevokeReport {
        let Some(state) = self.routers.get(router_id) else { return RevokeReport::default() };
        let (index, path) = (state.record.index, netns::path(&state.record.netns));
        let mark = self.slot_mark(slot);
        let mut report = flush(&mut self.datapath, &path, index, slot, mark, self.config.revoked_quiet_secs);
        if report.slot_released
            && let Err(e) = self.store.apply(&[Change::Release { router_id, slot }], || Ok(())) {
                report.slot_released = false;
                report.flush_error = Some(format!("{e}"));
            }
        self.after_flush(router_id, slot, &report, origin);
        report
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, net::IpAddr};

    use super::*;

    fn entry(port: u16) -> conntrack::Entry {
        let (a, b): (IpAddr, IpAddr) = ("10.200.1.2".parse().unwrap(), "10.200.2.2".parse().unwrap());
        conntrack::Entry {
            zone: 0,
            orig: conntrack::Tuple5 { proto: 6, src: a, dst: b, sport: 40000, dport: port },
            reply: conntrack::Tuple5 { proto: 6, src: b, dst: a, sport: port, dport: 40000 },
        }
    }

    /// A conntrack table that answers each dump from a script, and a delete
    /// that may fail.
    struct Scripted {
        dumps: VecDeque<Vec<conntrack::Entry>>,
        remembered: Vec<conntrack::Entry>,
        deletes: usize,
        /// Of them, deletes of the entries found, by their tuples.
        by_tuple: usize,
        delete_fails: bool,
    }

    impl FlushSteps for Scripted {
        fn carried(&mut self) -> anyhow::Result<Vec<conntrack::Entry>> {
            Ok(self.dumps.pop_front().unwrap_or_default())
        }
        fn remember(&mut self, entries: &[conntrack::Entry]) -> anyhow::Result<Remembered> {
            self.remembered.extend_from_slice(entries);
            Ok(Remembered { kept: entries.len() * 2, overflowed: 0 })
        }
        fn delete(&mut self, found: Option<&[conntrack::Entry]>) -> anyhow::Result<()> {
            self.deletes += 1;
            self.by_tuple += usize::from(found.is_some());
            if self.delete_fails { anyhow::bail!("ctnetlink: Device or resource busy") } else { Ok(()) }
        }
    }

    fn run(script: Vec<Vec<conntrack::Entry>>, delete_fails: bool) -> (RevokeReport, Scripted) {
        let mut steps = Scripted { dumps: script.into(), remembered: Vec::new(), deletes: 0, by_tuple: 0, delete_fails };
        let mut report = RevokeReport::default();
        let result = rounds(&mut steps, &mut Kept::default(), &mut report, None);
        settle(&mut report, result);
        (report, steps)
    }

    #[test]
    fn connections_that_got_the_slot_during_the_revocation_are_revoked_too() {
        // The first delete leaves a connection made meanwhile; the second
        // round takes it.
        let (report, steps) = run(vec![vec![entry(21), entry(2121)], vec![entry(21_000)], vec![]], false);
        assert!(report.slot_released, "{report:?}");
        assert_eq!((report.conntrack_entries_removed, report.flows_kept_dead), (3, 6));
        assert_eq!(steps.remembered, vec![entry(21), entry(2121), entry(21_000)]);
        assert_eq!(steps.deletes, 2);
        assert_eq!(steps.by_tuple, 1, "the entries found first by their tuples, what came meanwhile by the mark");
    }

    #[test]
    fn a_table_that_keeps_refilling_leaves_the_slot_quarantined_after_a_few_rounds() {
        let (report, steps) = run(vec![vec![entry(21)]; 20], false);
        assert!(!report.slot_released);
        assert!(report.flush_error.as_deref().is_some_and(|e| e.contains("1 conntrack entries still carry the slot")), "{report:?}");
        assert_eq!(steps.deletes, FLUSH_ROUNDS);
    }

    #[test]
    fn a_delete_that_fails_halfway_keeps_the_flows_dropped_and_reports_it() {
        let (report, steps) = run(vec![vec![entry(21)], vec![]], true);
        assert!(!report.slot_released, "the slot stays quarantined");
        assert!(report.flush_error.as_deref().is_some_and(|e| e.contains("busy")), "{report:?}");
        assert_eq!(steps.remembered, vec![entry(21)], "the flows were remembered before the delete");
        assert_eq!(report.flows_kept_dead, 2);
    }

    #[test]
    fn an_entry_seen_in_several_rounds_is_remembered_once() {
        // Kept before the rule went, then found again by each round: one
        // insert per direction, so the router's share counts it once.
        let mut steps = Scripted { dumps: vec![vec![entry(21)], vec![entry(21), entry(2121)], vec![]].into(), remembered: Vec::new(), deletes: 0, by_tuple: 0, delete_fails: false };
        let (mut report, mut kept) = (RevokeReport::default(), Kept::default());
        let before = steps.carried().unwrap();
        kept.keep(&mut steps, &before, &mut report).unwrap();
        let result = rounds(&mut steps, &mut kept, &mut report, None);
        settle(&mut report, result);
        assert!(report.slot_released, "{report:?}");
        assert_eq!(steps.remembered, vec![entry(21), entry(2121)]);
        assert_eq!(report.flows_kept_dead, 4);
    }

    #[test]
    fn the_entries_found_before_the_rule_went_start_the_flush_without_another_dump() {
        // Each dump walks the host's whole table: the one made before the
        // rule went is the first round's, and the check is the only other.
        let mut steps = Scripted { dumps: vec![vec![], vec![entry(99)]].into(), remembered: Vec::new(), deletes: 0, by_tuple: 0, delete_fails: false };
        let mut report = RevokeReport::default();
        let result = rounds(&mut steps, &mut Kept::default(), &mut report, Some(vec![entry(21)]));
        settle(&mut report, result);
        assert!(report.slot_released, "{report:?}");
        assert_eq!((report.conntrack_entries_removed, steps.by_tuple), (1, 1));
        assert_eq!(steps.dumps.len(), 1, "one dump made: the check");
    }

    #[test]
    fn nothing_to_clean_releases_the_slot_at_once() {
        let (report, steps) = run(vec![vec![]], false);
        assert!(report.slot_released);
        assert_eq!(steps.deletes, 0);
    }
}
