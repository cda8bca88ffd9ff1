//! Complete revocation of a rule slot: the datapath stops tagging and drops
//! the slot's packets at once; then the router's conntrack table is cleaned
//! of every entry carrying the slot (control and RELATED connections, and
//! with them their expectations), while the flows of those entries are kept
//! dead in the datapath so conntrack cannot pick them up again mid-stream.

use std::path::Path;

use tracing::{info, warn};

use super::Daemon;
use crate::{
    api::RevokeReport,
    kernel::{Datapath, conntrack, netns},
    store::Change,
};

/// Dump-and-delete rounds before a slot is left quarantined.
const FLUSH_ROUNDS: usize = 5;

/// Cleans the conntrack table of the router in `ns` of the entries marked
/// with `mark` under `mask`, keeping their flows dead in the datapath first.
/// One visit to the namespace: dump, remember, delete, check, repeated
/// while entries carrying the slot remain.
pub(super) fn flush(datapath: &mut Datapath, ns: &Path, index: u32, slot: u16, (mark, mask): (u32, u32), quiet_secs: u64) -> RevokeReport {
    let mut report = RevokeReport { quiet_secs, ..Default::default() };
    let result = netns::run_in(ns, || {
        // A connection that got the slot while this ran (its first packet
        // was tagged just before the rule went) is revoked too: repeat
        // until nothing carries the slot, a few rounds at most.
        let mut entries = conntrack::entries_with_mark(mark, mask)?;
        for _ in 0..FLUSH_ROUNDS {
            if entries.is_empty() {
                break;
            }
            report.conntrack_entries_removed += entries.len();
            // Remember the flows before their entries go: from then on a
            // packet of theirs would start a fresh, unmarked entry.
            let remembered = datapath.remember_revoked(index, slot, &entries)?;
            report.flows_kept_dead += remembered.kept;
            report.flows_not_kept += remembered.overflowed;
            conntrack::delete_with_mark(mark, mask)?;
            entries = conntrack::entries_with_mark(mark, mask)?;
        }
        Ok(entries.len())
    });
    match result {
        Ok(0) => report.slot_released = true,
        Ok(left) => report.flush_error = Some(format!("{left} conntrack entries still carry the slot")),
        Err(e) => report.flush_error = Some(format!("{e:#}")),
    }
    report
}

impl Daemon {
    /// Logs a flush, and frees or keeps the slot in memory accordingly (the
    /// store was told in the same transaction, or by the caller).
    pub(super) fn after_flush(&mut self, router_id: &str, slot: u16, report: &RevokeReport) {
        if let Some(e) = &report.flush_error {
            warn!(router = %router_id, slot, "conntrack flush incomplete, slot quarantined: {e}");
            self.quarantine.insert((router_id.to_string(), slot));
            self.index.hold(router_id, slot);
        } else {
            info!(
                router = %router_id,
                slot,
                entries = report.conntrack_entries_removed,
                flows = report.flows_kept_dead,
                "conntrack cleaned, slot released"
            );
            self.slot_released(router_id, slot);
        }
    }

    /// Cleans the conntrack table of router `router_id` of a quarantined
    /// `slot` and frees the slot if nothing carries it any more.
    pub(super) fn flush_slot(&mut self, router_id: &str, slot: u16) -> RevokeReport {
        let Some(state) = self.routers.get(router_id) else { return RevokeReport::default() };
        let (index, path) = (state.record.index, netns::path(&state.record.netns));
        let mark = self.slot_mark(slot);
        let mut report = flush(&mut self.datapath, &path, index, slot, mark, self.config.revoked_quiet_secs);
        if report.slot_released
            && let Err(e) = self.store.apply(&[Change::Release { router_id: router_id.to_string(), slot }], || Ok(())) {
                report.slot_released = false;
                report.flush_error = Some(format!("{e}"));
            }
        self.after_flush(router_id, slot, &report);
        report
    }
}
