//! Setting a router's whole helper set in one request: what an agent that
//! owns the desired state (the Neutron sync, a script with a file) needs,
//! instead of a create, update or delete per helper with a partial failure
//! at each step.

use std::collections::{BTreeMap, HashSet};

use tracing::info;

use super::{Acting, Daemon, kind_of, netns};
use crate::{
    api::{ApiError, ErrorCode, Helper, HelperSpec, Protocol, Reply, RevokeReport, SetReport},
    catalogue::HelperKind,
    store::{Change, HelperRecord},
    validate,
};

/// One entry of the set, checked.
struct Wanted {
    id: String,
    protocol: Protocol,
    port: u16,
    kind: &'static HelperKind,
    project: String,
}

/// Prefixes an error with the entry it is about.
fn at(i: usize, e: ApiError) -> ApiError {
    ApiError { message: format!("helpers[{i}]: {}", e.message), field: Some(format!("helpers[{i}].{}", e.field.as_deref().unwrap_or(""))), ..e }
}

/// Whether `new` is a rule of its own (a new helper, or a changed one), with
/// a slot of its own.
fn new_rule(old: &Option<HelperRecord>, new: &HelperRecord) -> bool {
    old.as_ref().is_none_or(|o| o.slot != new.slot)
}

impl Daemon {
    /// Gives back the slots held for the new rules of a set not applied.
    fn free_new_slots(&mut self, router: &str, put: &[(Option<HelperRecord>, HelperRecord)]) {
        for (_, new) in put.iter().filter(|(o, n)| new_rule(o, n)) {
            self.slots.untake(router, new.slot);
        }
    }

    /// Checks every entry before anything changes; an entry without an id
    /// is the router's helper on its protocol and port, or a new one.
    fn check_set(&self, router: &str, specs: Vec<HelperSpec>) -> Result<Vec<Wanted>, ApiError> {
        let default_project = &self.routers[router].record.project_id;
        let (mut ids, mut tuples) = (HashSet::new(), BTreeMap::new());
        let mut wanted = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            let protocol = validate::protocol(&spec.protocol).map_err(|e| at(i, e))?;
            let port = validate::port(spec.port).map_err(|e| at(i, e))?;
            let kind = validate::helper(&self.offered, &spec.helper, protocol).map_err(|e| at(i, e))?;
            let project = match spec.project_id {
                Some(p) => validate::project(&p).map_err(|e| at(i, e))?,
                None => default_project.clone(),
            };
            if let Some(j) = tuples.insert((protocol, port), i) {
                return Err(at(i, ApiError::invalid("port", format!("{protocol}/{port} is also in helpers[{j}]"))));
            }
            let id = match spec.id {
                Some(id) => validate::uuid("id", &id).map_err(|e| at(i, e))?,
                None => match self.index.tuple(router, protocol, port) {
                    Some(id) => id.clone(),
                    None => super::ops::new_helper_id(),
                },
            };
            if !ids.insert(id.clone()) {
                return Err(at(i, ApiError::invalid("id", format!("helper id {id} is named twice"))));
            }
            if self.index.ids.get(&id).is_some_and(|r| r != router) {
                return Err(at(i, ApiError::new(ErrorCode::Conflict, format!("helper id {id} is already in use by another router's helper"))));
            }
            wanted.push(Wanted { id, protocol, port, kind, project });
        }
        if let Some(cap) = self.config.max_rules_per_project {
            let mut used: BTreeMap<&str, usize> = BTreeMap::new();
            for h in self.helpers.values().filter(|h| h.helper.router_id != router) {
                *used.entry(h.helper.project_id.as_str()).or_default() += 1;
            }
            for w in &wanted {
                let n = used.entry(w.project.as_str()).or_default();
                *n += 1;
                if *n > cap as usize {
                    return Err(ApiError::new(ErrorCode::Exhausted, format!("project {} would have more than {cap} helpers, the most this host allows per project (max_rules_per_project)", w.project)));
                }
            }
        }
        Ok(wanted)
    }

    /// Makes the helpers of `router` exactly `specs`, in one store
    /// transaction. The rules of deleted and changed helpers are revoked
    /// before any new one is allowed, so a port handed from one helper to
    /// another is free when it is needed. Either all of it is applied, or
    /// nothing: the maps are put back if a kernel step fails.
    pub(super) fn helper_set(&mut self, router: &str, specs: Vec<HelperSpec>, by: &Acting) -> Result<Reply, ApiError> {
        let (router, index) = self.live_router(router, by)?;
        let wanted = self.check_set(&router, specs)?;
        let current: BTreeMap<String, HelperRecord> = self.helpers_of(&router).map(|h| (h.helper.id.clone(), h.clone())).collect();
        let mut report = SetReport::default();
        let keep: HashSet<&str> = wanted.iter().map(|w| w.id.as_str()).collect();
        let gone: Vec<HelperRecord> = current.values().filter(|h| !keep.contains(h.helper.id.as_str())).cloned().collect();
        // (old record if any, new record): a changed rule gets a new slot.
        let mut put: Vec<(Option<HelperRecord>, HelperRecord)> = Vec::new();
        for w in &wanted {
            let helper = Helper {
                id: w.id.clone(),
                router_id: router.clone(),
                project_id: w.project.clone(),
                protocol: w.protocol,
                port: w.port,
                helper: w.kind.name.to_string(),
            };
            let old = current.get(&w.id);
            let slot = match old {
                Some(o) if o.helper == helper => {
                    report.unchanged += 1;
                    continue;
                }
                // Only the project changed: same rule, same slot.
                Some(o) if (o.helper.protocol, o.helper.port, o.helper.helper.as_str()) == (w.protocol, w.port, w.kind.name) => o.slot,
                _ => match self.take_slot(&router) {
                    Ok(slot) => slot,
                    Err(e) => {
                        self.free_new_slots(&router, &put);
                        return Err(e);
                    }
                },
            };
            put.push((old.cloned(), HelperRecord { helper, slot }));
        }
        let revoked: Vec<HelperRecord> = gone.iter().cloned().chain(put.iter().filter(|(o, n)| new_rule(o, n)).filter_map(|(o, _)| o.clone())).collect();
        let mut changes: Vec<Change> =
            gone.iter().map(|h| Change::DeleteHelper { router_id: &router, helper_id: &h.helper.id }).collect();
        changes.extend(put.iter().map(|(_, new)| Change::PutHelper(new)));
        if changes.is_empty() {
            report.helpers = self.helpers_of(&router).map(|h| h.helper.clone()).collect();
            return Ok(Reply::HelperSet(report));
        }
        let ns = netns::path(&self.routers[&router].record.netns);
        let quiet = self.config.revoked_quiet_secs;
        let marks: Vec<(u32, u32)> = revoked.iter().map(|h| self.slot_mark(h.slot)).collect();
        let datapath = &mut self.datapath;
        let result = self.store.apply_then(&changes, || {
            let (mut reports, mut more) = (Vec::new(), Vec::new());
            for (h, mark) in revoked.iter().zip(&marks) {
                let (report, quarantine) = super::revoke::revoke_rule(datapath, &ns, index, h, *mark, quiet)?;
                reports.push(report);
                more.extend(quarantine);
            }
            for (_, new) in put.iter().filter(|(o, n)| new_rule(o, n)) {
                super::ops::allow_record(datapath, index, new, kind_of(&new.helper)?)?;
            }
            Ok((reports, more))
        });
        let reports: Vec<RevokeReport> = match result {
            Ok(r) => r,
            Err(e) => {
                // Memory still holds the set as it was: the maps follow it.
                if let Err(e) = self.desired().and_then(|want| self.datapath.reconcile(&want, true)) {
                    tracing::error!(router = %router, "putting the maps back: {e:#}");
                }
                self.free_new_slots(&router, &put);
                return Err(e.into());
            }
        };
        // All removals before any addition: a tuple may pass between helpers.
        for h in gone.iter().chain(put.iter().filter_map(|(old, _)| old.as_ref())) {
            self.index.remove(h);
            self.helpers.remove(&(router.clone(), h.helper.id.clone()));
        }
        for (old, new) in &put {
            self.index.add(new);
            self.helpers.insert((router.clone(), new.helper.id.clone()), new.clone());
            if old.is_none() {
                report.created += 1;
            } else {
                report.updated += 1;
            }
            self.datapath.clear_revoked(index, new.helper.protocol.number(), new.helper.port);
        }
        for (h, r) in revoked.iter().zip(&reports) {
            self.revoked_slot(&router, h.slot, r, by.origin);
        }
        report.deleted = gone.len();
        report.revoked = reports;
        report.helpers = self.helpers_of(&router).map(|h| h.helper.clone()).collect();
        info!(router = %router, created = report.created, updated = report.updated, deleted = report.deleted, unchanged = report.unchanged, "helper set applied");
        Ok(Reply::HelperSet(report))
    }
}
