//! The glue, checked as a whole and put back: someone may flush the router's
//! ruleset, delete one rule of enforcer's table or change it. And the
//! attachments, checked against what the kernel runs. The checks and the
//! glue repair spawn nft or tc, so they run without the daemon's lock; only
//! the bookkeeping (state, counter, audit) and re-attaching take it.

use tracing::{info, warn};

use super::{Daemon, GlueCheck, GlueJob, NetnsId, netns_id};
use crate::{
    api::{ApiError, AuditEntry, GlueState, MapDrift},
    kernel::{LinkCheck, MapCheck, MapFindings, glue, netns},
};

/// One router's check of its glue and attachments, to run without the lock.
pub(super) struct Check {
    id: String,
    netns_id: Option<NetnsId>,
    glue: GlueCheck,
    repair: GlueJob,
    links: LinkCheck,
    /// The router's glue and links were last found intact.
    was_intact: bool,
}

/// What a check found, and what putting it back did.
pub(super) struct Checked {
    id: String,
    netns: String,
    netns_id: Option<NetnsId>,
    found: Result<glue::Found, String>,
    repaired: Option<Result<(), String>>,
    /// (missing, stale) attachments.
    links: Result<(usize, usize), String>,
    /// Something the daemon does not know yet: without it the daemon is
    /// not asked to take note (a check of a thousand routers waited for
    /// its turn at the daemon a thousand times, behind every group of
    /// changes: 0.4 s idle, 5 to 8 s during changes).
    pub(super) news: bool,
}

impl Check {
    pub(super) fn netns(&self) -> &str {
        &self.repair.netns
    }

    pub(super) fn run(self) -> Checked {
        let netns = self.repair.netns.clone();
        let found = glue::check(&netns::path(&netns), &self.glue.reference, self.glue.known).map_err(|e| format!("{e:#}"));
        let repaired = match found {
            Ok(glue::Found { state: GlueState::Missing | GlueState::Altered, .. }) => Some(self.repair.run().added.map(|_| ())),
            _ => None,
        };
        let links = self.links.drift().map_err(|e| format!("{e:#}"));
        let same = self.was_intact && repaired.is_none() && as_recorded(&found, &links, self.glue.known);
        Checked { id: self.id, netns, netns_id: self.netns_id, found, repaired, links, news: !same }
    }
}

/// Whether a check found the glue intact at the very generation last
/// recorded, and every link in place.
fn as_recorded(found: &Result<glue::Found, String>, links: &Result<(usize, usize), String>, known: Option<glue::Generation>) -> bool {
    links.as_ref().is_ok_and(|drift| *drift == (0, 0))
        && found.as_ref().is_ok_and(|f| f.state == GlueState::Intact && f.intact_at.is_some() && f.intact_at == known)
}

impl Daemon {
    /// The checks of every attached router.
    pub(super) fn checks(&self) -> Vec<Check> {
        self.routers
            .values()
            .filter(|r| r.attachment.is_some())
            .map(|r| Check {
                id: r.record.id.clone(),
                netns_id: r.netns_id,
                glue: self.glue_check(&r.record.netns),
                repair: self.glue_job(&r.record.netns),
                links: self.datapath.link_check(&netns::path(&r.record.netns), r.record.index),
                was_intact: r.glue == GlueState::Intact && r.links == (0, 0),
            })
            .collect()
    }

    /// Re-syncs the attachments of a router whose check found some missing
    /// or stale in the kernel: what someone removed is put back, counted
    /// and audited.
    fn repair_links(&mut self, id: &str) {
        let changes = match self.bring_up(id, None) {
            Ok(Some((_, changes))) => changes,
            Ok(None) => return,
            Err(e) => return warn!(router = %id, "checking attachments: {e:#}"),
        };
        if let Some(state) = self.routers.get_mut(id) {
            state.links = (0, 0);
        }
        if changes.attached == 0 {
            return;
        }
        self.tally.link_repairs += changes.attached as u64;
        warn!(router = %id, attached = changes.attached, "attachments missing in the kernel: put back");
        self.record_repair(Some(id), "link_repair", serde_json::json!({ "links_missing": changes.attached }), serde_json::json!({ "links_missing": 0 }), Ok(()));
    }

    /// Records a check: the router's glue and attachment state, and for a
    /// repair the counter and an audit entry; attachments found missing
    /// are put back.
    pub(super) fn checked(&mut self, checked: Checked) {
        let Checked { id, netns, netns_id: checked_ns, found, repaired, links, .. } = checked;
        let Some(state) = self.routers.get_mut(&id).filter(|r| r.attachment.is_some() && r.netns_id == checked_ns) else {
            // Removed while the check ran: glue put back in a namespace no
            // router enforces any more goes again.
            let enforced = self.routers.values().any(|r| r.record.netns == netns);
            if repaired.is_some() && !enforced && netns_id(&netns) == checked_ns
                && let Err(e) = glue::remove(&netns::path(&netns)) {
                    warn!(netns = %netns, "removing glue put back after its router went: {e:#}");
                }
            return;
        };
        match links {
            Ok(drift) => state.links = drift,
            Err(e) => warn!(router = %id, "checking attachments: {e}"),
        }
        if state.links != (0, 0) {
            self.repair_links(&id);
        }
        let Some(state) = self.routers.get_mut(&id) else { return };
        let found = match found {
            Ok(found) => {
                self.verified.set(&netns, found.intact_at);
                found.state
            }
            Err(e) => return warn!(router = %id, "checking the glue: {e}"),
        };
        state.glue = match &repaired {
            Some(Ok(())) => GlueState::Intact,
            Some(Err(_)) => found,
            None => found,
        };
        let Some(repaired) = repaired else { return };
        let what = serde_json::to_value(found).unwrap_or_default();
        match &repaired {
            Ok(()) => {
                self.tally.glue_repairs += 1;
                info!(router = %id, found = %what, "glue repaired");
            }
            Err(e) => warn!(router = %id, found = %what, "glue could not be repaired: {e}"),
        }
        let now = if repaired.is_ok() { serde_json::json!("intact") } else { what.clone() };
        self.record_repair(Some(&id), "glue_repair", serde_json::json!({ "glue": what }), serde_json::json!({ "glue": now }), repaired);
    }

    /// The round's check of the maps, to run without the lock.
    pub(super) fn map_check(&self) -> Option<MapCheck> {
        match self.desired() {
            Ok(want) => Some(self.datapath.map_check(want)),
            Err(e) => {
                warn!("checking the maps: {e:#}");
                None
            }
        }
    }

    /// Ends a round of checks: counted, and where the glue was found intact
    /// kept for the next start. Where the check of the maps without the
    /// lock (`maps`) found them different, those entries are read again
    /// under it (changes made meanwhile show as drift); the maps are
    /// checked whole, and repaired, under the lock only where a difference
    /// is still there or that check could not run.
    pub(super) fn checks_done(&mut self, took: std::time::Duration, maps: Option<anyhow::Result<MapFindings>>) {
        match maps {
            Some(Ok(found)) if found.drift.is_empty() => self.map_drift = found.drift,
            Some(Ok(found)) => match self.desired().and_then(|want| self.datapath.still_drifts(&want, &found)) {
                Ok(false) => {
                    self.tally.map_rechecks += 1;
                    self.map_drift = MapDrift::default();
                }
                Ok(true) => self.check_maps(),
                Err(e) => {
                    warn!("checking the maps again: {e:#}; checking them whole");
                    self.check_maps();
                }
            },
            Some(Err(e)) => {
                warn!("checking the maps without the lock: {e:#}; checking under it");
                self.check_maps();
            }
            None => self.check_maps(),
        }
        self.tally.check_rounds += 1;
        self.tally.last_check = Some(took);
        self.save_verified();
    }

    /// Brings the maps back in line with the store where someone changed
    /// them (a stray `bpftool map delete`): counted and audited like a glue
    /// repair. What could not be put back stays in `map_drift` for status.
    fn check_maps(&mut self) {
        let found = self.desired().and_then(|want| self.datapath.reconcile(&want, true));
        self.map_drift = match found {
            Ok(found) if found.is_empty() => found,
            Ok(found) => {
                self.tally.map_repairs += 1;
                warn!(?found, "map entries differed from the store: put back");
                self.record_repair(None, "map_repair", serde_json::json!({ "maps": found }), serde_json::json!({ "maps": "as stored" }), Ok(()));
                Default::default()
            }
            Err(e) => {
                warn!("checking the maps: {e:#}");
                self.desired().and_then(|want| self.datapath.reconcile(&want, false)).unwrap_or_default()
            }
        };
    }

    /// Audits a repair the daemon made on its own.
    fn record_repair(&mut self, id: Option<&str>, op: &str, before: serde_json::Value, after: serde_json::Value, result: Result<(), String>) {
        let entry = AuditEntry::by_daemon(op, id, Some(before), after, result.err().map(|e| ("kernel", ApiError::kernel(e))));
        if let Err(e) = self.audit.record(&entry) {
            warn!("audit: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_router_found_as_recorded_is_left_unnoted() {
        let at = |id| glue::Generation { netns: 7, id };
        let found = |state, intact_at| Ok(glue::Found { state, intact_at });
        let whole = Ok((0, 0));
        assert!(as_recorded(&found(GlueState::Intact, Some(at(3))), &whole, Some(at(3))));
        // The ruleset moved on, though the glue is still intact: recorded anew.
        assert!(!as_recorded(&found(GlueState::Intact, Some(at(4))), &whole, Some(at(3))));
        // No generation to compare (a kernel that refuses the query).
        assert!(!as_recorded(&found(GlueState::Intact, None), &whole, None));
        assert!(!as_recorded(&found(GlueState::Missing, None), &whole, Some(at(3))));
        assert!(!as_recorded(&found(GlueState::Altered, None), &whole, Some(at(3))));
        assert!(!as_recorded(&Err("nft failed".into()), &whole, Some(at(3))));
        assert!(!as_recorded(&found(GlueState::Intact, Some(at(3))), &Ok((1, 0)), Some(at(3))));
        assert!(!as_recorded(&found(GlueState::Intact, Some(at(3))), &Ok((0, 1)), Some(at(3))));
        assert!(!as_recorded(&found(GlueState::Intact, Some(at(3))), &Err("no netns".into()), Some(at(3))));
    }
}
