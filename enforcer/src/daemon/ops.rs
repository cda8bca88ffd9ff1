//! The API operations. Each checks its input first, runs its kernel step
//! inside the store transaction, and on any failure puts the maps back as
//! the store has them, so an answer (ok or error) always describes what the
//! kernel enforces. Who the request acts for (`Acting`) is passed down.

use std::collections::BTreeSet;

use anyhow::Result;
use tracing::{debug, info, warn};

use super::{Acting, DEFAULT_PROJECT, Daemon, GlueDone, RouterState, kind_of, netns_id, rule_key};
use crate::{
    api::{ApiError, ErrorCode, GlueState, Helper, Owner, Protocol, Reply, Request, Router, RouterStatus, StatusReport},
    api::{AuditEntry, Caller, Event, HelperSpec, Record},
    audit::{self, Audit},
    auth,
    catalogue::HelperKind,
    kernel::{Datapath, netns},
    store::{ApplyError, Change, HelperRecord, RouterRecord},
    validate,
};

pub(super) fn allow_record(dp: &mut Datapath, index: u32, h: &HelperRecord, kind: &HelperKind) -> Result<()> {
    let (router, proto, port) = rule_key(index, h);
    dp.allow(router, proto, port, kind.id, h.slot)
}

pub(super) fn revoke_record(dp: &mut Datapath, index: u32, h: &HelperRecord) -> Result<()> {
    let (router, proto, port) = rule_key(index, h);
    dp.revoke(router, proto, port)
}

/// What [`Daemon::prepare`] found to do outside the lock.
pub(super) enum Prepared {
    Glue(super::GlueJob),
    Read(ReadJob),
}

/// A read done without the lock.
pub(super) enum ReadJob {
    /// The pinned maps, cut to the routers the caller may see.
    Dump { bpffs: std::path::PathBuf, visible: BTreeSet<String> },
    Audit { state_dir: std::path::PathBuf, since: Option<std::time::SystemTime> },
}

impl ReadJob {
    pub(super) fn run(self) -> Result<Reply, ApiError> {
        match self {
            ReadJob::Dump { bpffs, visible } => {
                let mut dump = crate::kernel::dump::read(&bpffs).map_err(ApiError::kernel)?;
                dump.slots.retain(|s| s.router_id.as_deref().is_some_and(|id| visible.contains(id)));
                dump.routers = visible.len();
                Ok(Reply::Dump(dump))
            }
            ReadJob::Audit { state_dir, since } => Ok(Reply::Audit(audit::read(&state_dir, since).map_err(ApiError::internal)?)),
        }
    }
}

/// The audit name of a request, and whether it changes anything.
pub(super) fn describe(req: &Request) -> (&'static str, bool) {
    match req {
        Request::RouterAdd { .. } => ("router_add", true),
        Request::RouterRemove { .. } => ("router_remove", true),
        Request::RouterList {} => ("router_list", false),
        Request::HelperCreate { .. } => ("helper_create", true),
        Request::HelperUpdate { .. } => ("helper_update", true),
        Request::HelperDelete { .. } => ("helper_delete", true),
        Request::HelperSet { .. } => ("helper_set", true),
        Request::HelperList { .. } => ("helper_list", false),
        Request::HelperShow { .. } => ("helper_show", false),
        Request::Status {} => ("status", false),
        Request::Teardown {} => ("teardown", true),
        Request::DebugDatapath { .. } => ("debug_datapath", true),
        Request::MapsDump {} => ("maps_dump", false),
        Request::Audit { .. } => ("audit", false),
        Request::Events {} => ("events", false),
        Request::Catalogue {} => ("catalogue", false),
    }
}

/// The router and helper a request names (as given: audited even if bad).
fn names(req: &Request) -> (Option<String>, Option<String>) {
    match req {
        Request::RouterAdd { router_id, .. } | Request::RouterRemove { router_id } | Request::HelperSet { router_id, .. } => {
            (Some(router_id.clone()), None)
        }
        Request::HelperCreate { router_id, id, .. } => (Some(router_id.clone()), id.clone()),
        Request::HelperUpdate { router_id, helper_id, .. }
        | Request::HelperDelete { router_id, helper_id }
        | Request::HelperShow { router_id, helper_id } => (Some(router_id.clone()), Some(helper_id.clone())),
        Request::HelperList { router_id } => (router_id.clone(), None),
        _ => (None, None),
    }
}

/// The id of a helper the caller did not name: time-ordered (UUIDv7), so
/// the helpers a group creates sit side by side in the store's B-tree and
/// its commit rewrites a few pages, not one page per helper (random ids
/// made creates slow down as the table grew).
pub(super) fn new_helper_id() -> String {
    validate::uuid_text(uuid::Uuid::now_v7())
}

/// Cut to a sane length for the audit log (inputs are attacker-controlled).
fn bounded(s: Option<String>) -> Option<String> {
    // Bytes bound the characters: a short one is kept as it is.
    s.map(|s| if s.len() <= 128 { s } else { s.chars().take(128).collect() })
}

impl Daemon {
    /// The work a request needs done outside the lock: the glue of a router
    /// about to be added, or the whole of a read that may be long (a dump
    /// of the maps, the audit log) and needs nothing of the daemon but what
    /// the caller may see. Only for a request the caller may make and that
    /// is otherwise sound; anything else is refused, and audited, under the
    /// lock as usual.
    pub(super) fn prepare(&self, origin: Owner, caller: &Caller, req: &Request) -> Option<Prepared> {
        let role = auth::role_of(&self.config.access, caller);
        auth::permits(role.as_ref(), req).ok()?;
        let scope = role.as_ref().and_then(|r| r.scope());
        match req {
            Request::RouterAdd { router_id, netns, project_id } => {
                self.check_owner(origin, Some(router_id), true).ok()?;
                let (_, netns, ..) = self.check_router_add(router_id, netns.clone(), project_id.clone()).ok()?;
                Some(Prepared::Glue(super::GlueJob { new_router: true, ..self.glue_job(&netns) }))
            }
            Request::MapsDump {} => Some(Prepared::Read(self.dump_job(scope))),
            Request::Audit { since } => self.audit_job(since.as_deref()).ok().map(Prepared::Read),
            _ => None,
        }
    }

    /// The dump of the maps, cut to the routers of `scope` (None: all).
    fn dump_job(&self, scope: Option<&str>) -> ReadJob {
        let visible = self
            .routers
            .values()
            .filter(|r| scope.is_none_or(|p| p == r.record.project_id))
            .map(|r| r.record.id.clone())
            .collect();
        ReadJob::Dump { bpffs: self.config.bpffs.clone(), visible }
    }

    fn audit_job(&self, since: Option<&str>) -> Result<ReadJob, ApiError> {
        let since = since.map(audit::parse_since).transpose()?;
        Ok(ReadJob::Audit { state_dir: self.config.state_dir.clone(), since })
    }

    /// Handles a request of `caller` made on behalf of `origin`: authorizes
    /// it, confines it to the caller's project, and audits every mutation
    /// and every refusal. The local API may not change what Neutron owns,
    /// and the sync changes only that. `glue` is the glue step already done
    /// without the lock (see [`Daemon::prepare`]).
    pub(super) fn handle_from(&mut self, origin: Owner, caller: Caller, req: Request, glue: Option<GlueDone>) -> Result<Reply, ApiError> {
        let (result, entry) = self.handle_audited(origin, caller, req, glue);
        if let Some(entry) = entry
            && let Err(e) = self.audit.record(&entry)
        {
            warn!("audit: {e:#}");
        }
        result
    }

    /// Handles a group of changes in one store transaction (group commit):
    /// each is applied to the kernel and to memory in turn, as if alone, and
    /// all are committed at once. If the commit fails (a full disk may only
    /// show here), none is kept: memory and the maps go back to what the
    /// store holds, and every change of the group fails with the reason.
    /// Also returns the group's audit entries, written and journaled, for
    /// the caller to free without the lock (their freeing was a twentieth
    /// of a group's time under it, `perf`).
    pub(super) fn handle_group(&mut self, group: Vec<(Owner, Caller, Request)>) -> (Vec<Result<Reply, ApiError>>, Option<crate::audit::Staged>) {
        if self.store.abandon_group() {
            // The last group panicked halfway: nothing of it was kept.
            self.back_to_store();
        }
        if let Err(e) = self.store.begin_group() {
            let error = ApiError::from(e);
            return (group.iter().map(|_| Err(error.clone())).collect(), None);
        }
        let (mut results, entries): (Vec<Result<Reply, ApiError>>, Vec<Option<AuditEntry>>) =
            group.into_iter().map(|(origin, caller, req)| self.handle_audited(origin, caller, req, None)).unzip();
        self.tally.changes += results.len() as u64;
        self.tally.commits += 1;
        // The entries are journaled with the changes: one sync for both.
        let mut staged = self.audit.stage(entries.into_iter().flatten().collect());
        let journaled = match &staged {
            Ok(s) => self.store.journal(s.journal(), self.audit.synced()),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        if let Err(e) = &journaled {
            warn!("audit: journaling the group's entries: {e:#}");
        }
        let committed = self.store.commit_group();
        if let Err(e) = &committed {
            warn!("group commit of {} changes failed: {e}", results.len());
            let error = ApiError::internal(format!("{e}; the change was not kept (nothing of it is enforced)"));
            self.back_to_store();
            for result in results.iter_mut().filter(|r| r.is_ok()) {
                *result = Err(error.clone());
            }
            if let Ok(s) = &mut staged {
                s.failed(&error);
            }
        }
        let staged = staged.and_then(|s| self.audit.append(&s, journaled.is_ok() && committed.is_ok()).map(|()| s));
        if let Err(e) = &staged {
            warn!("audit: {e:#}");
        }
        (results, staged.ok())
    }

    /// Handles a request as [`Daemon::handle_from`] does; returns the audit
    /// entry to write instead of writing it.
    fn handle_audited(&mut self, origin: Owner, caller: Caller, req: Request, glue: Option<GlueDone>) -> (Result<Reply, ApiError>, Option<AuditEntry>) {
        let role = auth::role_of(&self.config.access, &caller);
        let (op, mutation) = describe(&req);
        let (router_id, helper_id) = names(&req);
        let before = match &req {
            // A new helper had no state before; a retry of a create names the
            // helper it made.
            Request::HelperCreate { id: None, .. } => None,
            _ if mutation => self.snapshot(router_id.as_deref(), helper_id.as_deref()),
            _ => None,
        };
        let result = auth::permits(role.as_ref(), &req).and_then(|()| self.check_owner(origin, router_id.as_deref(), mutation)).and_then(|()| {
            let by = Acting { scope: role.as_ref().and_then(|r| r.scope()).map(str::to_string), origin };
            self.handle(req, glue, &by)
        });
        // Reads, and a helper set that changed nothing, leave no entry.
        let unchanged = matches!(&result, Ok(Reply::HelperSet(r)) if r.created + r.updated + r.deleted == 0);
        if (!mutation || unchanged) && result.is_ok() {
            return (result, None);
        }
        let helper_id = match &result {
            Ok(Reply::Helper(h)) => Some(h.id.clone()),
            _ => helper_id,
        };
        let after = match &result {
            Ok(Reply::Revoked(r)) => Some(Record::Revoked(r.clone())),
            Ok(Reply::HelperSet(r)) => Some(Record::HelperSet(r.clone())),
            // The helper as stored, without looking it up again.
            Ok(Reply::Helper(h)) => Some(Record::Helper(h.clone())),
            Ok(_) => self.snapshot(router_id.as_deref(), helper_id.as_deref()),
            Err(_) => None,
        };
        let entry = AuditEntry {
            time: Audit::now(),
            seq: None,
            caller,
            origin,
            op: op.to_string(),
            router_id: bounded(router_id),
            helper_id: bounded(helper_id),
            before,
            after,
            result: match &result {
                Ok(_) => "ok".to_string(),
                Err(e) => serde_json::to_value(e.code).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            },
            error: result.as_ref().err().cloned(),
        };
        (result, Some(entry))
    }

    /// One owner per router: a change through the local API to a router
    /// that follows Neutron is refused, and the sync touches nothing else.
    /// `router` is the one the request names.
    /// (Teardown names no router: it removes every router, whoever owns it.)
    fn check_owner(&self, origin: Owner, router: Option<&str>, mutation: bool) -> Result<(), ApiError> {
        let (Some(router), true) = (router, mutation) else { return Ok(()) };
        let Some(owner) = self.routers.get(router).map(|r| r.record.owner) else { return Ok(()) };
        match (origin, owner) {
            (Owner::Local, Owner::Neutron) => Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("router {router} follows Neutron, which owns its helpers: change them in Neutron (openstack network l3 conntrack helper ...)"),
            )),
            (Owner::Neutron, Owner::Local) => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("router {router} was added by hand here; the Neutron sync leaves it alone"),
            )),
            _ => Ok(()),
        }
    }

    /// Audits a request refused before it could be read.
    pub fn audit_refused(&mut self, caller: Caller, error: ApiError) {
        let entry = AuditEntry {
            time: Audit::now(),
            seq: None,
            caller,
            origin: Owner::Local,
            op: "unparsed".to_string(),
            router_id: None,
            helper_id: None,
            before: None,
            after: None,
            result: "bad_request".to_string(),
            error: Some(ApiError { message: error.message.chars().take(256).collect(), ..error }),
        };
        if let Err(e) = self.audit.record(&entry) {
            warn!("audit: {e:#}");
        }
    }

    pub fn socket_group(&self) -> Option<u32> {
        self.config.socket_group
    }

    /// The helper (or else the router) a request is about, as it stands.
    fn snapshot(&self, router: Option<&str>, helper: Option<&str>) -> Option<Record> {
        let router = router?;
        if let Some(helper) = helper {
            let h = self.helpers.get(&(router.to_string(), helper.to_string()))?;
            return Some(Record::Helper(h.helper.clone()));
        }
        Some(Record::Router(Self::router_view(self.routers.get(router)?)))
    }

    /// Handles an authorized request; `glue` is the glue step already done
    /// for a router add (see [`Daemon::prepare`]).
    fn handle(&mut self, req: Request, glue: Option<GlueDone>, by: &Acting) -> Result<Reply, ApiError> {
        match req {
            Request::RouterAdd { router_id, netns, project_id } => self.router_add(router_id, netns, project_id, glue, by.origin),
            Request::RouterRemove { router_id } => {
                let id = validate::uuid("router_id", &router_id)?;
                self.router_remove(&id, by.origin)
            }
            Request::RouterList {} => Ok(Reply::Routers(self.router_list(by))),
            Request::HelperCreate { router_id, protocol, port, helper, id, project_id } => {
                self.helper_create(&router_id, HelperSpec { id, protocol, port, helper, project_id }, by)
            }
            Request::HelperUpdate { router_id, helper_id, protocol, port, helper } => {
                self.helper_update(&router_id, &helper_id, protocol, port, helper, by)
            }
            Request::HelperDelete { router_id, helper_id } => self.helper_delete(&router_id, &helper_id, by),
            Request::HelperSet { router_id, helpers } => self.helper_set(&router_id, helpers, by),
            Request::HelperList { router_id } => self.helper_list(router_id, by),
            Request::HelperShow { router_id, helper_id } => {
                let (_, key) = self.find_helper(&router_id, &helper_id, by)?;
                Ok(Reply::Helper(self.helpers[&key].helper.clone()))
            }
            Request::Status {} => Ok(Reply::Status(Box::new(self.status().map_err(ApiError::kernel)?))),
            Request::Teardown {} => self.teardown(by.origin),
            Request::DebugDatapath { drops } => self.debug_datapath(drops),
            // Without a prepared read (see `prepare`): the same, under the lock.
            Request::MapsDump {} => self.dump_job(by.scope.as_deref()).run(),
            Request::Audit { since } => self.audit_job(since.as_deref())?.run(),
            Request::Catalogue {} => Ok(Reply::Catalogue(self.offered.describe())),
            // Permitted: the connection streams events after this answer.
            Request::Events {} => Ok(Reply::Done {}),
        }
    }

    /// Sets how many drops the programs describe in the log from now on.
    fn debug_datapath(&mut self, drops: u32) -> Result<Reply, ApiError> {
        if drops > crate::api::MAX_DEBUG_DROPS {
            return Err(ApiError::invalid("drops", format!("at most {} drops can be logged at a time", crate::api::MAX_DEBUG_DROPS)));
        }
        self.datapath.set_debug(drops).map_err(ApiError::kernel)?;
        info!(drops, "datapath log of drops {}", if drops == 0 { "off" } else { "on" });
        Ok(Reply::Debug(crate::api::DebugReport { datapath_log_drops: drops }))
    }

    /// Subscribes `caller` to the event stream, if it may read it.
    pub(super) fn subscribe(&mut self, caller: Caller) -> Result<tokio::sync::broadcast::Receiver<Event>, ApiError> {
        self.handle_from(Owner::Local, caller, Request::Events {}, None).map(|_| self.audit.subscribe())
    }

    fn router_view(state: &RouterState) -> Router {
        let r = &state.record;
        Router {
            id: r.id.clone(),
            project_id: r.project_id.clone(),
            netns: r.netns.clone(),
            owner: r.owner,
            interfaces: state.attachment.as_ref().map(|a| a.interfaces.clone()).unwrap_or_default(),
        }
    }

    fn router_list(&self, by: &Acting) -> Vec<Router> {
        self.routers.values().filter(|r| by.sees(&r.record.project_id)).map(Self::router_view).collect()
    }

    /// The checks of a router add that need no kernel step: (id, netns,
    /// project), normalized.
    fn check_router_add(&self, id: &str, netns: Option<String>, project: Option<String>) -> Result<(String, String, String), ApiError> {
        let id = validate::uuid("router_id", id)?;
        let netns = validate::netns(&netns.unwrap_or_else(|| format!("qrouter-{id}")))?;
        let project = validate::project(project.as_deref().unwrap_or(DEFAULT_PROJECT))?;
        if self.routers.contains_key(&id) {
            return Err(ApiError::new(ErrorCode::Conflict, format!("router {id} already exists")));
        }
        if let Some(other) = self.routers.values().find(|r| r.record.netns == netns) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("network namespace {netns} already belongs to router {}", other.record.id),
            ));
        }
        let Some(ns_id) = netns_id(&netns) else {
            return Err(ApiError::invalid("netns", format!("network namespace {netns:?} does not exist (/run/netns/{netns})")));
        };
        // Another name for a namespace a router already has (a second bind
        // mount of it) would attach the same interfaces twice.
        if let Some(other) = self.routers.values().find(|r| r.netns_id == Some(ns_id)) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("network namespace {netns} is the namespace {} of router {} under another name", other.record.netns, other.record.id),
            ));
        }
        Ok((id, netns, project))
    }

    fn router_add(&mut self, id: String, netns: Option<String>, project: Option<String>, glue: Option<GlueDone>, owner: Owner) -> Result<Reply, ApiError> {
        let (id, netns, project) = self.check_router_add(&id, netns, project)?;
        let used: BTreeSet<u32> = self.routers.values().map(|r| r.record.index).collect();
        let index = (1..=u32::MAX)
            .find(|i| !used.contains(i))
            .ok_or_else(|| ApiError::new(ErrorCode::Exhausted, "no free router index"))?;
        let record = RouterRecord { id: id.clone(), index, project_id: project, netns, owner };
        self.routers.insert(id.clone(), RouterState { record: record.clone(), attachment: None, netns_id: None, glue: Default::default(), links: (0, 0) });
        // Kernel first, then the store; a change the store cannot keep is
        // taken out of the kernel again, so nothing half-applied remains.
        let glue_ms = glue.as_ref().map_or(0.0, |g| g.took.as_secs_f64() * 1e3);
        let start = std::time::Instant::now();
        let attached = match self.bring_up(&id, glue) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ApiError::kernel(format!("network namespace {} vanished", record.netns))),
            Err(e) => Err(ApiError::kernel(e)),
        };
        let attach_ms = start.elapsed().as_secs_f64() * 1e3;
        let stored = attached.and_then(|()| self.store.apply(&[Change::PutRouter(&record)], || Ok(())).map_err(ApiError::from));
        let store_ms = start.elapsed().as_secs_f64() * 1e3 - attach_ms;
        if let Err(e) = stored {
            self.take_down(&id);
            self.routers.remove(&id);
            return Err(e);
        }
        let view = Self::router_view(&self.routers[&id]);
        self.routers_changed.notify_one();
        // Where the time went (nft for the glue, attaching, the store).
        info!(router = %id, netns = %record.netns, interfaces = ?view.interfaces, glue_ms, attach_ms, store_ms, "router added");
        Ok(Reply::Router(view))
    }

    /// Removes a router's enforcement from the kernel: links, map entries
    /// of its index, and the glue (also after a half-done attach).
    fn take_down(&mut self, id: &str) {
        let Some(state) = self.routers.get(id) else { return };
        let index = state.record.index;
        let path = netns::path(&state.record.netns);
        if let Err(e) = self.datapath.detach_router(index, Some(&path)) {
            warn!(router = %id, "detaching: {e:#}");
        }
        self.datapath.forget_router_state(index);
        // nft may be slow: the glue goes after the lock is released.
        self.verified.set(&state.record.netns, None);
        self.unglue.push(state.record.netns.clone());
    }

    /// What wakes the namespace follower when routers come and go.
    pub(super) fn routers_changed(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.routers_changed.clone()
    }

    /// Namespaces whose glue is to be removed, now without the lock.
    pub(super) fn take_unglue(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unglue)
    }

    /// The namespace a request adds or removes a router in, if any: its glue
    /// steps are serialized with those of other requests on it.
    pub(super) fn netns_of(&self, req: &Request) -> Option<String> {
        match req {
            Request::RouterAdd { router_id, netns, .. } => Some(netns.clone().unwrap_or_else(|| format!("qrouter-{router_id}"))),
            Request::RouterRemove { router_id } => self.routers.get(router_id).map(|r| r.record.netns.clone()),
            _ => None,
        }
    }

    pub(super) fn router_remove(&mut self, id: &str, origin: Owner) -> Result<Reply, ApiError> {
        let Some(state) = self.routers.get(id) else {
            return Err(ApiError::not_found("router", id));
        };
        let index = state.record.index;
        let attached = state.attachment.is_some();
        let helpers: Vec<HelperRecord> = self.helpers_of(id).cloned().collect();
        let quarantined: Vec<u16> = self.slots.quarantined().filter(|(r, _)| *r == id).map(|(_, s)| s).collect();
        let mut changes = vec![Change::DeleteRouter(id)];
        changes.extend(helpers.iter().map(|h| Change::DeleteHelper { router_id: id, helper_id: &h.helper.id }));
        changes.extend(quarantined.iter().map(|s| Change::Release { router_id: id, slot: *s }));
        // Revoke first: flows stop the moment the maps change.
        for h in &helpers {
            let _ = revoke_record(&mut self.datapath, index, h);
        }
        self.store.apply(&changes, || Ok(()))?;
        if attached {
            for slot in helpers.iter().map(|h| h.slot).chain(quarantined) {
                let report = self.flush_slot(id, slot, origin);
                if let Some(e) = report.flush_error {
                    warn!(router = %id, slot, "{e}");
                    self.datapath.ct_leftovers(index);
                }
            }
        }
        self.take_down(id);
        self.routers.remove(id);
        self.helpers.retain(|(r, _), _| r != id);
        self.slots.forget_router(id, index);
        self.index.forget_router(id);
        self.routers_changed.notify_one();
        info!(router = %id, "router removed");
        Ok(Reply::Done {})
    }

    fn teardown(&mut self, origin: Owner) -> Result<Reply, ApiError> {
        let ids: Vec<String> = self.routers.keys().cloned().collect();
        for id in ids {
            self.router_remove(&id, origin)?;
        }
        self.datapath.unpin_all().map_err(ApiError::kernel)?;
        self.life.stopping = true;
        info!("teardown: all enforcement removed; stopping");
        Ok(Reply::Done {})
    }

    pub(super) fn helpers_of<'a>(&'a self, router: &'a str) -> impl Iterator<Item = &'a HelperRecord> + 'a {
        self.helpers.range((router.to_string(), String::new())..).take_while(move |((r, _), _)| r == router).map(|(_, h)| h)
    }

    pub(super) fn live_router(&self, id: &str, by: &Acting) -> Result<(String, u32), ApiError> {
        let id = validate::uuid("router_id", id)?;
        match self.routers.get(&id).filter(|r| by.sees(&r.record.project_id)) {
            Some(r) if r.attachment.is_some() => Ok((id, r.record.index)),
            Some(_) => Err(ApiError::new(ErrorCode::Kernel, format!("router {id} is not attached (its namespace is missing)"))),
            None => Err(ApiError::not_found("router", &id)),
        }
    }

    /// Helpers are addressed by (router, id): a helper of another router is
    /// "not found", exactly like an id that does not exist.
    fn find_helper(&self, router: &str, helper: &str, by: &Acting) -> Result<(u32, (String, String)), ApiError> {
        let (router, index) = self.live_router(router, by)?;
        let helper = validate::uuid("helper_id", helper).map_err(|_| ApiError::not_found("helper", helper))?;
        let key = (router, helper);
        if !self.helpers.get(&key).is_some_and(|h| by.sees(&h.helper.project_id)) {
            return Err(ApiError::not_found("helper", &key.1));
        }
        Ok((index, key))
    }

    fn check_tuple_free(&self, router: &str, protocol: Protocol, port: u16, except: Option<&str>) -> Result<(), ApiError> {
        match self.index.tuple(router, protocol, port) {
            Some(id) if Some(id.as_str()) != except => {
                let name = self.helpers.get(&(router.to_string(), id.clone())).map(|h| h.helper.helper.as_str()).unwrap_or("?");
                Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("router {router} already has helper {id} on {protocol}/{port} ({name})"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Takes a free slot of this router for a new rule (given back with
    /// `slots.untake` if the rule is not applied).
    pub(super) fn take_slot(&mut self, router: &str) -> Result<u16, ApiError> {
        let max = self.config.max_slot();
        self.slots
            .take(router, max)
            .ok_or_else(|| ApiError::new(ErrorCode::Exhausted, format!("router {router} has no free rule slot")))
    }

    fn helper_create(&mut self, router: &str, spec: HelperSpec, by: &Acting) -> Result<Reply, ApiError> {
        let HelperSpec { id, protocol, port, helper, project_id: project } = spec;
        let (router, index) = self.live_router(router, by)?;
        let protocol = validate::protocol(&protocol)?;
        let port = validate::port(port)?;
        let kind = validate::helper(&self.offered, &helper, protocol)?;
        let id = match id {
            Some(id) => validate::uuid("id", &id)?,
            None => new_helper_id(),
        };
        let project = match project {
            Some(p) => validate::project(&p)?,
            None => self.routers[&router].record.project_id.clone(),
        };
        if let Some(owner) = self.index.ids.get(&id) {
            // A retry of a create whose answer was lost finds its helper.
            let same = self
                .helpers
                .get(&(owner.clone(), id.clone()))
                .filter(|h| *owner == router && (h.helper.protocol, h.helper.port, h.helper.helper.as_str(), h.helper.project_id.as_str()) == (protocol, port, kind.name, project.as_str()));
            return match same {
                Some(h) => Ok(Reply::Helper(h.helper.clone())),
                None => Err(ApiError::new(ErrorCode::Conflict, format!("helper id {id} is already in use by another helper"))),
            };
        }
        if let Some(cap) = self.config.max_rules_per_project {
            let used = self.helpers.values().filter(|h| h.helper.project_id == project).count();
            if used >= cap as usize {
                return Err(ApiError::new(ErrorCode::Exhausted, format!("project {project} already has {used} helpers, the most this host allows per project (max_rules_per_project)")));
            }
        }
        self.check_tuple_free(&router, protocol, port, None)?;
        let slot = self.take_slot(&router)?;
        let record = HelperRecord {
            helper: Helper { id: id.clone(), router_id: router.clone(), project_id: project, protocol, port, helper: kind.name.to_string() },
            slot,
        };
        let datapath = &mut self.datapath;
        let result = self.store.apply(&[Change::PutHelper(&record)], || allow_record(datapath, index, &record, kind));
        if let Err(e) = result {
            if matches!(e, ApplyError::Commit(_) | ApplyError::Kernel(_)) {
                let _ = revoke_record(&mut self.datapath, index, &record);
                self.datapath.forget_slot(index, slot);
            }
            self.slots.untake(&router, slot);
            return Err(e.into());
        }
        // Flows of this tuple revoked earlier are wanted again.
        let cleared = self.datapath.clear_revoked(index, protocol.number(), port);
        debug!(router = %router, helper = %id, cleared, "{protocol}/{port} -> {} (slot {slot})", kind.name);
        self.index.add(&record);
        self.helpers.insert((router, id), record.clone());
        Ok(Reply::Helper(record.helper))
    }

    fn helper_update(
        &mut self,
        router: &str,
        helper: &str,
        protocol: Option<String>,
        port: Option<i64>,
        name: Option<String>,
        by: &Acting,
    ) -> Result<Reply, ApiError> {
        let (index, key) = self.find_helper(router, helper, by)?;
        let old = self.helpers[&key].clone();
        let protocol = match protocol {
            Some(p) => validate::protocol(&p)?,
            None => old.helper.protocol,
        };
        let port = match port {
            Some(p) => validate::port(p)?,
            None => old.helper.port,
        };
        let kind = validate::helper(&self.offered, name.as_deref().unwrap_or(&old.helper.helper), protocol)?;
        if (protocol, port, kind.name) == (old.helper.protocol, old.helper.port, old.helper.helper.as_str()) {
            return Ok(Reply::Helper(old.helper));
        }
        self.check_tuple_free(&key.0, protocol, port, Some(&key.1))?;
        // A new slot: the old tuple's flows are revoked, not carried over.
        let slot = self.take_slot(&key.0)?;
        let new = HelperRecord { helper: Helper { protocol, port, helper: kind.name.to_string(), ..old.helper.clone() }, slot };
        let ns = netns::path(&self.routers[&key.0].record.netns);
        let mark = self.slot_mark(old.slot);
        let quiet = self.config.revoked_quiet_secs;
        let datapath = &mut self.datapath;
        // As for a delete: one transaction, the old slot quarantined only if
        // the conntrack clean-up left something carrying it.
        let result = self.store.apply_then(&[Change::PutHelper(&new)], || {
            let revoked = super::revoke::revoke_rule(datapath, &ns, index, &old, mark, quiet)?;
            allow_record(datapath, index, &new, kind)?;
            Ok(revoked)
        });
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                // Put the old rule back as it was.
                let _ = revoke_record(&mut self.datapath, index, &new);
                self.datapath.forget_slot(index, new.slot);
                self.slots.untake(&key.0, new.slot);
                if let Ok(old_kind) = kind_of(&old.helper) {
                    let _ = allow_record(&mut self.datapath, index, &old, old_kind);
                }
                return Err(e.into());
            }
        };
        if (protocol, port) != (old.helper.protocol, old.helper.port) {
            // Flows of the new tuple revoked earlier are wanted again.
            self.datapath.clear_revoked(index, protocol.number(), port);
        }
        debug!(router = %key.0, helper = %key.1, "updated to {protocol}/{port} -> {} (slot {slot}, slot {} revoked)", kind.name, old.slot);
        self.index.remove(&old);
        self.index.add(&new);
        self.helpers.insert(key.clone(), new.clone());
        self.revoked_slot(&key.0, old.slot, &report, by.origin);
        Ok(Reply::Helper(new.helper))
    }

    fn helper_delete(&mut self, router: &str, helper: &str, by: &Acting) -> Result<Reply, ApiError> {
        let (index, key) = self.find_helper(router, helper, by)?;
        // Taken out, and put back if the delete fails.
        let old = self.helpers.remove(&key).ok_or_else(|| ApiError::not_found("helper", &key.1))?;
        let ns = netns::path(&self.routers[&key.0].record.netns);
        let mark = self.slot_mark(old.slot);
        let quiet = self.config.revoked_quiet_secs;
        let datapath = &mut self.datapath;
        // One transaction: the helper goes, and its slot is quarantined only
        // if the conntrack clean-up left something carrying it.
        let result = self.store.apply_then(&[Change::DeleteHelper { router_id: &key.0, helper_id: &key.1 }], || {
            super::revoke::revoke_rule(datapath, &ns, index, &old, mark, quiet)
        });
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                if let Ok(kind) = kind_of(&old.helper) {
                    let _ = allow_record(&mut self.datapath, index, &old, kind);
                }
                self.helpers.insert(key, old);
                return Err(e.into());
            }
        };
        debug!(router = %key.0, helper = %key.1, "deleted; slot {} revoked", old.slot);
        self.index.remove(&old);
        self.revoked_slot(&key.0, old.slot, &report, by.origin);
        Ok(Reply::Revoked(report))
    }

    fn helper_list(&self, router: Option<String>, by: &Acting) -> Result<Reply, ApiError> {
        let router = match router {
            Some(r) => {
                let id = validate::uuid("router_id", &r)?;
                if !self.routers.get(&id).is_some_and(|r| by.sees(&r.record.project_id)) {
                    return Err(ApiError::not_found("router", &id));
                }
                Some(id)
            }
            None => None,
        };
        Ok(Reply::Helpers(
            self.helpers
                .iter()
                .filter(|((r, _), h)| router.as_ref().is_none_or(|want| want == r) && by.sees(&h.helper.project_id))
                .map(|(_, h)| h.helper.clone())
                .collect(),
        ))
    }

    /// The Neutron sync's last report, with its age now.
    pub(super) fn sync_report(&self) -> Option<crate::api::SyncStatus> {
        self.sync_seen.clone().map(|(mut s, last)| {
            s.age_secs = last.map(|t| t.elapsed().as_secs_f64());
            s
        })
    }

    fn status(&mut self) -> Result<StatusReport> {
        // Everything as the last check found it: status spawns no process
        // and walks no map, whatever the number of routers.
        let mut drift = crate::api::ReconcileReport { maps: self.map_drift, ..Default::default() };
        let mut routers = Vec::new();
        for state in self.routers.values() {
            let r = &state.record;
            match &state.attachment {
                Some(_) => {
                    // The glue as last checked (no nft run per router here).
                    if matches!(state.glue, GlueState::Missing | GlueState::Altered) {
                        drift.glue_installed += 1;
                    }
                    // As last checked, like the glue: no process per router.
                    drift.links_attached += state.links.0;
                    drift.links_detached += state.links.1;
                }
                None => drift.routers_detached += 1,
            }
            routers.push(RouterStatus {
                id: r.id.clone(),
                netns: r.netns.clone(),
                owner: r.owner,
                attached: state.attachment.is_some(),
                glue: state.glue,
                interfaces: state.attachment.as_ref().map(|a| a.interfaces.clone()).unwrap_or_default(),
                helpers: self.helpers_of(&r.id).count(),
            });
        }
        let known: BTreeSet<u32> = self.routers.values().filter(|r| r.attachment.is_some()).map(|r| r.record.index).collect();
        drift.orphan_routers_removed = self.datapath.pinned_routers().iter().filter(|i| !known.contains(i)).count();
        Ok(StatusReport {
            pid: std::process::id(),
            bpffs: self.config.bpffs.display().to_string(),
            state_dir: self.config.state_dir.display().to_string(),
            attach: match self.datapath.attach_mode() {
                crate::kernel::AttachMode::Tcx => "tcx",
                crate::kernel::AttachMode::Netlink => "netlink",
            }
            .to_string(),
            uptime_secs: self.life.started.elapsed().as_secs(),
            routers,
            helpers: self.helpers.len(),
            quarantined_slots: self.slots.quarantined().count(),
            revoked_flows: self.datapath.revoked_flows_swept(),
            revoked_flows_overflowed: self.datapath.revoked_overflows(),
            started_with: self.life.started_with,
            drift,
            neutron: self.sync_report(),
            glue_repairs: self.tally.glue_repairs,
            map_repairs: self.tally.map_repairs,
            map_rechecks: self.tally.map_rechecks,
            link_repairs: self.tally.link_repairs,
            ready: self.life.ready.is_some(),
            ready_after_ms: self.life.ready.map(|d| d.as_millis() as u64),
            changes: self.tally.changes,
            commits: self.tally.commits,
            check_rounds: self.tally.check_rounds,
            last_check_ms: self.tally.last_check.map(|d| d.as_millis() as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn new_helper_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..1000).map(|_| super::new_helper_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
}
