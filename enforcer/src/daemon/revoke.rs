//! Complete revocation of a rule slot: the datapath stops tagging and drops
//! the slot's packets at once; then the router's conntrack table is cleaned
//! of every entry carrying the slot (control and RELATED connections, and
//! with them their expectations), while the flows of those entries are kept
//! dead in the datapath so conntrack cannot pick them up again mid-stream.

use anyhow::Result;
use tracing::{info, warn};

use super::Daemon;
use crate::{
    api::RevokeReport,
    kernel::{conntrack, netns},
    store::Change,
};

impl Daemon {
    /// Cleans the conntrack table of router `router_id` of `slot` and frees
    /// the slot if nothing carries it any more (else it stays quarantined
    /// until a later check finds it free).
    pub(super) fn flush_slot(&mut self, router_id: &str, slot: u16) -> RevokeReport {
        let mut report = RevokeReport { quiet_secs: self.config.revoked_quiet_secs, ..Default::default() };
        let Some(state) = self.routers.get(router_id) else { return report };
        let index = state.record.index;
        let path = netns::path(&state.record.netns);
        let (mark, mask) = self.slot_mark(slot);
        let result = (|| -> Result<usize> {
            let entries = netns::run_in(&path, || conntrack::entries_with_mark(mark, mask))?;
            report.conntrack_entries_removed = entries.len();
            // Remember the flows before their entries go: from then on a
            // packet of theirs would start a fresh, unmarked entry.
            report.flows_kept_dead = self.datapath.remember_revoked(index, slot, &entries)?;
            netns::run_in(&path, || {
                conntrack::delete_with_mark(mark, mask)?;
                Ok(conntrack::entries_with_mark(mark, mask)?.len())
            })
        })();
        match result {
            Ok(0) => match self.store.apply(&[Change::Release { router_id: router_id.to_string(), slot }], || Ok(())) {
                Ok(()) => {
                    self.slot_released(router_id, slot);
                    report.slot_released = true;
                }
                Err(e) => report.flush_error = Some(format!("{e}")),
            },
            Ok(left) => report.flush_error = Some(format!("{left} conntrack entries still carry the slot")),
            Err(e) => report.flush_error = Some(format!("{e:#}")),
        }
        if let Some(e) = &report.flush_error {
            warn!(router = %router_id, slot, "conntrack flush incomplete: {e}");
        } else {
            info!(
                router = %router_id,
                slot,
                entries = report.conntrack_entries_removed,
                flows = report.flows_kept_dead,
                "conntrack cleaned, slot released"
            );
        }
        report
    }
}
