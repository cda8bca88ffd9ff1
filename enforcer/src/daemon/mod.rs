//! The daemon: owns the datapath and the store, applies requests.
//!
//! Every mutation is validated, applied to the kernel inside a store
//! transaction and committed only if the kernel step worked, so the store,
//! the maps and the glue never disagree about an acknowledged change. At
//! start the kernel is reconciled with the store; enforcement (pinned maps
//! and links, the glue) stays in place when the daemon stops.

mod follow;
mod metrics;
mod notify;
mod ops;
mod repair;
mod revoke;
mod server;
mod set;
mod slots;
mod sync;
mod verified;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Instant,
};

use anyhow::{Context, Result};
use enforcer_common::{RuleKey, RuleValue};
use slots::Slots;
use tracing::{info, warn};

pub use server::serve;

use crate::{
    api::{ApiError, GlueState, Protocol, ReconcileReport},
    audit::Audit,
    catalogue::{self, HelperKind, Offered},
    config::Config,
    kernel::{Attachment, Datapath, Desired, conntrack, glue, netns},
    store::{ApplyError, Change, HelperRecord, RouterRecord, Store},
};

/// In the state directory: which programs the routers run (see
/// `Datapath::program_identity`).
const PROGRAMS_FILE: &str = "programs-attached";

/// Project of objects created without one.
pub const DEFAULT_PROJECT: &str = "default";

/// A stored router and where it stands in the kernel.
struct RouterState {
    record: RouterRecord,
    /// None while its namespace is missing.
    attachment: Option<Attachment>,
    /// (device, inode) of the namespace file it was attached in: a namespace
    /// deleted and created again under the same name is a new one.
    netns_id: Option<NetnsId>,
    /// What the last check of its glue found.
    glue: GlueState,
    /// (missing, stale) attachments, as the last check found them.
    links: (usize, usize),
}

/// Indexes over the helpers, so that a create or delete costs the same
/// with 10 helpers or 100,000.
#[derive(Default)]
struct Index {
    /// Helper id -> router id (ids are unique across routers).
    ids: HashMap<String, String>,
    /// Router -> (protocol, port) -> helper id: found by the router's id
    /// as given, without a key made (and freed) per lookup.
    tuples: HashMap<String, HashMap<(Protocol, u16), String>>,
}

impl Index {
    fn of(helpers: &BTreeMap<(String, String), HelperRecord>) -> Self {
        let mut index = Index::default();
        for h in helpers.values() {
            index.add(h);
        }
        index
    }

    fn add(&mut self, h: &HelperRecord) {
        let r = &h.helper.router_id;
        self.ids.insert(h.helper.id.clone(), r.clone());
        // The router's name is copied only for its first helper.
        if !self.tuples.contains_key(r) {
            self.tuples.insert(r.clone(), Default::default());
        }
        if let Some(tuples) = self.tuples.get_mut(r) {
            tuples.insert((h.helper.protocol, h.helper.port), h.helper.id.clone());
        }
    }

    fn remove(&mut self, h: &HelperRecord) {
        self.ids.remove(&h.helper.id);
        if let Some(tuples) = self.tuples.get_mut(&h.helper.router_id) {
            tuples.remove(&(h.helper.protocol, h.helper.port));
        }
    }

    /// The helper of (router, protocol, port), if any.
    fn tuple(&self, router: &str, protocol: Protocol, port: u16) -> Option<&String> {
        self.tuples.get(router)?.get(&(protocol, port))
    }

    fn forget_router(&mut self, router: &str) {
        self.ids.retain(|_, r| r != router);
        self.tuples.remove(router);
    }
}

pub struct Daemon {
    index: Index,
    audit: Audit,
    datapath: Datapath,
    /// What can be assigned here (probed kernel, narrowed by configuration).
    offered: Offered,
    store: Store,
    config: Config,
    routers: BTreeMap<String, RouterState>,
    /// Keyed by (router id, helper id).
    helpers: BTreeMap<(String, String), HelperRecord>,
    /// Every router's rule slots: live, cooling, quarantined.
    slots: Slots,
    life: Life,
    /// The Neutron sync's last report, and when it last completed a poll.
    sync_seen: Option<(crate::api::SyncStatus, Option<Instant>)>,
    /// The glue table as installing it leaves it (see `glue::reference`),
    /// and where each namespace's glue was last found so.
    verified: verified::Verified,
    /// Map entries the last check could not put back (status reads this
    /// instead of walking every map).
    map_drift: crate::api::MapDrift,
    /// What the daemon did since start (status and metrics).
    tally: Tally,
    /// Namespaces of routers taken down whose glue is still to be removed
    /// (by the server, without the lock).
    unglue: Vec<String>,
    /// Wakes the namespace follower when routers are added or removed, so
    /// their link watchers start or stop at once.
    routers_changed: std::sync::Arc<tokio::sync::Notify>,
}

/// Who a request acts for, handed down the one request's call chain (never
/// kept in the daemon, so no request can see another's). The default is
/// the daemon itself: all projects, local.
#[derive(Debug, Clone, Default)]
struct Acting {
    /// The project the caller is confined to (None: all).
    scope: Option<String>,
    /// On whose behalf the change is made: the local API or the Neutron sync.
    origin: crate::api::Owner,
}

impl Acting {
    /// Whether the caller may see objects of `project`.
    fn sees(&self, project: &str) -> bool {
        self.scope.as_deref().is_none_or(|p| p == project)
    }
}

/// Where the daemon is in its life: start-up, ready, stopping.
#[derive(Debug)]
struct Life {
    started: Instant,
    /// What the start-up reconciliation found and repaired.
    started_with: ReconcileReport,
    /// When the start-up reconciliation was done (None while it runs:
    /// reads are served, writes wait).
    ready: Option<std::time::Duration>,
    /// Set by teardown: the server stops after answering.
    stopping: bool,
}

/// What the daemon did since start, for status and metrics.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    /// Glue tables put back.
    glue_repairs: u64,
    /// Attachments found missing in the kernel and put back.
    link_repairs: u64,
    /// Rounds of the periodic check that had to repair maps.
    map_repairs: u64,
    /// Rounds whose check of the maps without the lock found entries
    /// changed meanwhile, and nothing else, when read again under it.
    map_rechecks: u64,
    revocations: Revocations,
    /// Rounds of the periodic check done, and how long the last took.
    check_rounds: u64,
    last_check: Option<std::time::Duration>,
    /// Helper changes handled in groups, and the groups' commits.
    changes: u64,
    commits: u64,
}

/// Revocations since start, and what they removed.
#[derive(Debug, Clone, Copy, Default)]
struct Revocations {
    rules: u64,
    conntrack_entries: u64,
    flows_kept: u64,
    /// Walks of the host's conntrack table they made (see the index).
    conntrack_dumps: u64,
}

/// The glue step of one namespace: it spawns nft, which may be slow or hang
/// until the time limit, so it runs without the daemon's lock.
pub(super) struct GlueJob {
    netns: String,
    offered: Offered,
    layout: enforcer_common::MarkLayout,
    /// Compare first and install only where the table differs (at start,
    /// where the glue is almost always in place: a check is cheaper than a
    /// rewrite).
    check: Option<GlueCheck>,
    /// A router being added: not stored, so no earlier version's glue to
    /// look for.
    new_router: bool,
}

/// A check of the glue against the reference, skipped if the ruleset is
/// still at the generation where it was last found intact.
pub(super) struct GlueCheck {
    reference: std::sync::Arc<serde_json::Value>,
    known: Option<glue::Generation>,
}

/// What a [`GlueJob`] did: whether the glue was missing, or why it failed.
pub(super) struct GlueDone {
    netns: String,
    added: Result<bool, String>,
    took: std::time::Duration,
    /// Where the glue was found intact, or left by its install (none if
    /// another commit came between).
    intact_at: Option<glue::Generation>,
    /// A router being added found no glue table in its namespace: none of
    /// the namespace's connections carries a slot (see `bring_up`).
    created: bool,
}

impl GlueJob {
    pub(super) fn run(self) -> GlueDone {
        let start = Instant::now();
        let ns = netns::path(&self.netns);
        let install = || glue::install(&ns, &self.offered, &self.layout);
        let installed = |done: Result<glue::Installed>, added: Option<bool>| match done {
            Ok(i) => (Ok(added.unwrap_or(i.added)), i.intact_at, i.created),
            Err(e) => (Err(e), None, false),
        };
        let (added, intact_at, created) = match &self.check {
            Some(c) => match glue::check(&ns, &c.reference, c.known) {
                Ok(glue::Found { state: GlueState::Intact, intact_at }) => (Ok(false), intact_at, false),
                // Missing or altered: put back.
                Ok(_) => installed(install(), Some(true)),
                Err(e) => (Err(e), None, false),
            },
            None if self.new_router => installed(glue::install_new(&ns, &self.offered, &self.layout), None),
            None => installed(install(), None),
        };
        // Only an add can tell: at start, a missing table may have been
        // removed by hand with the connections it marked still there.
        let created = created && self.new_router;
        GlueDone { netns: self.netns, added: added.map_err(|e| format!("{e:#}")), took: start.elapsed(), intact_at, created }
    }
}

/// Removes the glue of a router taken down (without the lock); a namespace
/// already gone took its glue with it.
pub(super) fn remove_glue(netns: &str) {
    let path = netns::path(netns);
    if path.exists()
        && let Err(e) = glue::remove(&path)
    {
        warn!(netns = %netns, "removing glue: {e:#}");
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Kernel(e) => ApiError::kernel(e),
            other => ApiError::internal(other),
        }
    }
}

/// (device, inode) of a namespace file: which namespace a name stands for.
pub(super) type NetnsId = (u64, u64);

/// An attached router as the watchers follow it: id, namespace name, and
/// the namespace it was attached in.
pub(super) type Followed = (String, String, Option<NetnsId>);

/// The namespace a router's name stands for now; none while it is absent
/// or still being mounted.
fn netns_id(name: &str) -> Option<NetnsId> {
    match netns::presence(name) {
        netns::Presence::Present(dev, ino) => Some((dev, ino)),
        netns::Presence::Absent | netns::Presence::Mounting => None,
    }
}

impl Daemon {
    /// Reads the store (refusing to start, and touching nothing in the
    /// kernel, if it is unreadable), loads the datapath and reconciles.
    pub fn start(config: Config) -> Result<Self> {
        let layout = config.layout()?;
        let mode = crate::kernel::attach::resolve(config.attach)?;
        crate::kernel::features::check()?;
        crate::auth::check_rules(&config.access).map_err(anyhow::Error::msg)?;
        if let Some(neutron) = &config.neutron {
            neutron.check()?;
        }
        raise_fd_limit();
        crate::kernel::exec::set_limit(std::time::Duration::from_secs(config.command_timeout_secs));
        let unreadable =
            || format!("the store in {} is unreadable; the kernel state was left as it is", config.state_dir.display());
        let mut store = Store::open(&config.state_dir).with_context(unreadable)?;
        let state = store.load().with_context(unreadable)?;
        let journal = store.journaled().with_context(unreadable)?;
        let audit = Audit::open(&config.state_dir, config.audit_limits(), &journal)?;
        // Kept on a failure (a full disk): the log's numbers tell the next
        // start that its rows are there already.
        if !journal.is_empty()
            && let Err(e) = store.forget_journal()
        {
            warn!("audit: emptying the store's journal: {e:#}");
        }
        // The programs are verified while nft probes the helpers and lists
        // the reference glue: neither needs the other.
        let (offered, glue_reference, datapath) = std::thread::scope(|s| {
            let loading = s.spawn(|| Datapath::load_with_index(&config.bpffs, layout, config.max_rules, config.revoked_policy(), config.conntrack_index_max));
            let probing = Instant::now();
            let offered = crate::kernel::probe::probe()
                .context("probing the kernel's conntrack helpers")
                .and_then(|probed| Offered::new(probed, config.allowed_helpers.as_deref()).map_err(anyhow::Error::msg));
            if let Ok(offered) = &offered {
                info!(helpers = ?offered.names(), probe_ms = probing.elapsed().as_millis() as u64, "helpers offered");
            }
            let reference = offered.as_ref().ok().map(|o| glue::reference(o, &layout).context("listing the glue as installed"));
            let datapath = loading.join().map_err(|_| anyhow::anyhow!("loading the programs panicked"));
            (offered, reference, datapath)
        });
        let offered = offered?;
        let glue_reference = glue_reference.context("no reference glue")??;
        let mut datapath = datapath??;
        let verified = verified::Verified::load(&config.state_dir, std::sync::Arc::new(glue_reference));
        datapath.set_attach_mode(mode);
        info!(?mode, "attach mode");
        let routers = state
            .routers
            .into_values()
            .map(|record| (record.id.clone(), RouterState { record, attachment: None, netns_id: None, glue: Default::default(), links: (0, 0) }))
            .collect();
        let mut daemon = Daemon {
            index: Index::of(&state.helpers),
            slots: Slots::of(state.helpers.values(), &state.quarantine),
            audit,
            datapath,
            offered,
            store,
            config,
            routers,
            helpers: state.helpers,
            life: Life { started: Instant::now(), started_with: ReconcileReport::default(), ready: None, stopping: false },
            sync_seen: None,
            verified,
            map_drift: Default::default(),
            tally: Tally::default(),
            unglue: Vec::new(),
            routers_changed: Default::default(),
        };
        // If the programs are not those attached at the last start (an
        // upgrade, or new constants), every router gets this build's in
        // place of its old ones during the start-up reconciliation; the old
        // ones enforce until then. Later re-syncs only add what is missing.
        let identity = daemon.datapath.program_identity();
        match std::fs::read_to_string(daemon.config.state_dir.join(PROGRAMS_FILE)) {
            Ok(attached) if attached.trim() == identity => {}
            Ok(attached) => {
                info!(before = attached.trim(), now = %identity, "programs changed since the last start: replacing them in place on every router");
                daemon.datapath.set_replace_programs(true);
            }
            // A first start, or one after a version that kept no record.
            Err(_) => daemon.datapath.set_replace_programs(true),
        }
        info!(routers = daemon.routers.len(), helpers = daemon.helpers.len(), "store read; reconciling the kernel in the background");
        Ok(daemon)
    }

    /// The routers to bring up at start, with the glue step of those whose
    /// namespace is there (run without the lock, several at once).
    pub(super) fn startup_jobs(&self) -> Vec<(String, Option<GlueJob>)> {
        self.routers
            .values()
            .map(|r| {
                let job = netns_id(&r.record.netns).map(|_| GlueJob { check: Some(self.glue_check(&r.record.netns)), ..self.glue_job(&r.record.netns) });
                (r.record.id.clone(), job)
            })
            .collect()
    }

    /// Brings up one stored router at start (see [`Daemon::startup_jobs`]).
    pub(super) fn start_router(&mut self, id: &str, glue: Option<GlueDone>) {
        let brought = self.bring_up(id, glue);
        let report = &mut self.life.started_with;
        match brought {
            Ok(Some((glue_added, links))) => {
                report.glue_installed += glue_added as usize;
                report.links_attached += links.attached;
                report.links_detached += links.detached;
                report.programs_replaced += links.replaced;
            }
            Ok(None) => report.routers_detached += 1,
            Err(e) => {
                warn!(router = %id, "not attached: {e:#}");
                report.routers_detached += 1;
            }
        }
    }

    /// Ends the start-up reconciliation once every router was brought up:
    /// removes orphans, brings the maps in line, frees quarantined slots no
    /// entry carries any more. From then on writes are served.
    pub(super) fn finish_start(&mut self) -> Result<()> {
        let known: BTreeSet<u32> = self.routers.values().filter(|r| r.attachment.is_some()).map(|r| r.record.index).collect();
        for index in self.datapath.pinned_routers() {
            if !known.contains(&index) {
                // Removed while the daemon was down, perhaps before its
                // connections were flushed.
                self.datapath.ct_leftovers(index);
                self.datapath.detach_router(index, None)?;
                self.life.started_with.orphan_routers_removed += 1;
            }
        }
        self.life.started_with.maps = self.datapath.reconcile(&self.desired()?, true)?;
        self.life.started_with.slots_released = self.release_quarantine();
        self.datapath.set_replace_programs(false);
        if let Err(e) = crate::store::write_atomic(&self.config.state_dir.join(PROGRAMS_FILE), self.datapath.program_identity().as_bytes()) {
            // Costs a replacement of every program at the next start.
            warn!("recording the programs attached: {e:#}");
        }
        self.save_verified();
        self.life.ready = Some(self.life.started.elapsed());
        let r = &self.life.started_with;
        info!(
            routers = self.routers.len(),
            helpers = self.helpers.len(),
            took_ms = self.life.started.elapsed().as_millis() as u64,
            glue_installed = r.glue_installed,
            links_attached = r.links_attached,
            links_detached = r.links_detached,
            orphans_removed = r.orphan_routers_removed,
            routers_detached = r.routers_detached,
            slots_released = r.slots_released,
            maps = ?r.maps,
            "reconciled kernel with store"
        );
        Ok(())
    }

    /// Keeps where each namespace's glue was found intact for the next
    /// start (see `verified`).
    pub(super) fn save_verified(&mut self) {
        self.verified.save();
    }

    /// The glue step for namespace `netns`, to run without the lock.
    pub(super) fn glue_job(&self, netns: &str) -> GlueJob {
        GlueJob { netns: netns.to_string(), offered: self.offered.clone(), layout: self.datapath.layout(), check: None, new_router: false }
    }

    /// The check of namespace `netns`'s glue, from where it was last found
    /// intact.
    pub(super) fn glue_check(&self, netns: &str) -> GlueCheck {
        GlueCheck { reference: self.verified.reference(), known: self.verified.get(netns) }
    }

    /// Attaches a stored router if its namespace exists. Returns whether the
    /// glue had to be installed and what changed in the links, or None if
    /// the namespace is missing (the router is then detached everywhere).
    /// The glue comes from `glue` (done without the lock) when given; else,
    /// for a namespace attached for the first time, it is installed here.
    fn bring_up(&mut self, id: &str, glue: Option<GlueDone>) -> Result<Option<(bool, crate::kernel::LinkChanges)>> {
        let (datapath, offered, verified) = (&mut self.datapath, &self.offered, &mut self.verified);
        let layout = datapath.layout();
        let state = self.routers.get_mut(id).context("unknown router")?;
        let Some(ns_id) = netns_id(&state.record.netns) else {
            state.attachment = None;
            state.netns_id = None;
            datapath.detach_router(state.record.index, None)?;
            return Ok(None);
        };
        let fresh = state.netns_id != Some(ns_id);
        if state.netns_id.is_some() && fresh {
            // A new namespace under the old name: the pinned links belong to
            // interfaces of the old one.
            datapath.detach_router(state.record.index, None)?;
        }
        let path = netns::path(&state.record.netns);
        let (glue_added, created) = match glue {
            Some(done) if done.netns == state.record.netns => {
                verified.set(&done.netns, done.intact_at);
                (done.added.map_err(anyhow::Error::msg)?, done.created)
            }
            _ if fresh => {
                let installed = glue::install(&path, offered, &layout);
                verified.set(&state.record.netns, installed.as_ref().ok().and_then(|i| i.intact_at));
                (installed?.added, false)
            }
            // Same namespace, glue in place (the glue check repairs it).
            _ => (false, false),
        };
        let uuid = uuid::Uuid::parse_str(&state.record.id)?;
        // A namespace that never had enforcer's chain needs no walk of the
        // conntrack table to know its index complete (the index is attached
        // before the router has a rule that could tag a connection).
        let (attachment, changes) = datapath.sync_router(&path, state.record.index, uuid, created)?;
        state.attachment = Some(attachment);
        state.netns_id = Some(ns_id);
        if fresh {
            state.glue = Default::default();
        }
        state.links = (0, 0);
        Ok(Some((glue_added, changes)))
    }

    /// The rules the maps should hold: those of attached routers.
    fn desired(&self) -> Result<Desired> {
        let mut want = Desired { rules: std::collections::HashMap::with_capacity(self.helpers.len()), ..Default::default() };
        // Router by router, each one's helpers in one range of the map: a
        // lookup of its router per helper was a tenth of a periodic check
        // at 100,000 rules.
        for state in self.routers.values().filter(|r| r.attachment.is_some()) {
            want.routers.insert(state.record.index, uuid::Uuid::parse_str(&state.record.id)?);
            for h in self.helpers_of(&state.record.id) {
                let kind = kind_of(&h.helper)?;
                want.rules.insert(
                    RuleKey::new(state.record.index, h.helper.protocol.number(), h.helper.port),
                    RuleValue::new(h.slot, kind.id),
                );
            }
        }
        for (router, slot) in self.slots.revoked_not_free() {
            if let Some(state) = self.routers.get(router) {
                want.quarantined.push((state.record.index, slot));
            }
        }
        Ok(want)
    }

    /// Frees quarantined slots that no conntrack entry carries any more.
    /// Returns how many were freed.
    fn release_quarantine(&mut self) -> usize {
        let mut free = Vec::new();
        for (router, slot) in self.slots.quarantined() {
            let Some(state) = self.routers.get(router) else { continue };
            let carried = match &state.attachment {
                // The namespace is gone, and its conntrack table with it.
                None => Ok(0),
                Some(_) => {
                    let (mark, mask) = self.slot_mark(slot);
                    netns::run_in(&netns::path(&state.record.netns), || Ok(conntrack::entries_with_mark(mark, mask)?.len()))
                }
            };
            match carried {
                Ok(0) => free.push((router.to_string(), slot)),
                Ok(_) => {}
                Err(e) => warn!(router = %router, slot, "checking a quarantined slot: {e:#}"),
            }
        }
        let changes: Vec<Change> =
            free.iter().map(|(router_id, slot)| Change::Release { router_id, slot: *slot }).collect();
        if changes.is_empty() {
            return 0;
        }
        if let Err(e) = self.store.apply(&changes, || Ok(())) {
            warn!("releasing slots: {e}");
            return 0;
        }
        for (router, slot) in &free {
            self.slot_released(router, *slot);
        }
        free.len()
    }

    /// After a group commit failed: helpers, slots and the maps as the store
    /// has them.
    pub(super) fn back_to_store(&mut self) {
        match self.store.load() {
            Ok(state) => {
                self.index = Index::of(&state.helpers);
                self.slots.reload(state.helpers.values(), &state.quarantine);
                self.helpers = state.helpers;
            }
            Err(e) => tracing::error!("reading the store back after a failed commit: {e:#}"),
        }
        if let Err(e) = self.desired().and_then(|want| self.datapath.reconcile(&want, true)) {
            tracing::error!("putting the maps back after a failed commit: {e:#}");
        }
    }

    /// Bookkeeping of a slot nothing carries any more.
    pub(super) fn slot_released(&mut self, router: &str, slot: u16) {
        if let Some(state) = self.routers.get(router) {
            self.slots.free(router, state.record.index, slot);
        }
    }

    /// Periodic clean-up: refusals the audit held back summed up, revoked
    /// flows quiet for long enough, and the counters of released slots
    /// nothing counts against any more.
    pub fn housekeeping(&mut self) {
        if let Err(e) = self.audit.summarize_refusals() {
            warn!("audit: {e:#}");
        }
        // The groups' entries, journaled by the store, reach the disk here
        // too (their journal rows go with the next group).
        if let Err(e) = self.audit.sync_journal() {
            warn!("audit: {e:#}");
        }
        self.cooled();
        // A router without a slot in use needs no conntrack index meanwhile:
        // its packets stop crossing the hook.
        for state in self.routers.values().filter(|r| r.attachment.is_some() && !self.slots.in_use(&r.record.id)) {
            if self.datapath.ct_park(state.record.index) {
                tracing::debug!(router = %state.record.id, "conntrack index parked (no slot in use)");
            }
        }
        let referenced = match self.datapath.sweep_revoked() {
            Ok(r) => r,
            Err(e) => return warn!("sweeping revoked flows: {e:#}"),
        };
        if self.slots.released().is_empty() {
            return;
        }
        // A slot taken again since keeps its counters (its new rule's): asked
        // of the slots, by router, not of every helper.
        let routers: HashMap<u32, &str> = self.routers.values().map(|r| (r.record.index, r.record.id.as_str())).collect();
        let done: Vec<(u32, u16, bool)> = self
            .slots
            .released()
            .iter()
            .filter(|(index, slot)| !referenced.contains(&enforcer_common::SlotKey::new(*index, *slot as u32)))
            .map(|&(index, slot)| (index, slot, routers.get(&index).is_some_and(|id| self.slots.state(id, slot) == Some(slots::SlotState::Live))))
            .collect();
        for (index, slot, live) in done {
            self.slots.swept(index, slot);
            if !live {
                self.datapath.forget_slot(index, slot);
            }
        }
    }

    /// The bpffs directory and the attached routers' (index, namespace),
    /// for pruning the conntrack index, if it runs.
    pub(super) fn indexed_namespaces(&self) -> Option<(std::path::PathBuf, Vec<(u32, std::path::PathBuf)>)> {
        if !self.datapath.ct_index_runs() {
            return None;
        }
        let namespaces = self.routers.values().filter(|r| r.attachment.is_some()).map(|r| (r.record.index, netns::path(&r.record.netns))).collect();
        Some((self.config.bpffs.clone(), namespaces))
    }

    /// The mark and mask that select the conntrack entries of a slot.
    fn slot_mark(&self, slot: u16) -> (u32, u32) {
        let layout = self.datapath.layout();
        (layout.encode(0, slot as u32), layout.slot_mask)
    }

    /// Whether a teardown asked the server to stop.
    pub fn stopping(&self) -> bool {
        self.life.stopping
    }

    /// Routers attached now, with their namespace and its identity: what
    /// the watchers follow (a namespace made again is a new one to watch).
    pub(super) fn attached(&self) -> Vec<Followed> {
        self.routers
            .values()
            .filter(|r| r.attachment.is_some())
            .map(|r| (r.record.id.clone(), r.record.netns.clone(), r.netns_id))
            .collect()
    }

    /// Routers whose namespace vanished or (re)appeared since they were
    /// last brought up, with the glue step of those whose namespace is
    /// there. Cheap when nothing changed: one stat per router.
    pub(super) fn changed_namespaces(&self) -> Vec<(String, Option<GlueJob>)> {
        self.routers
            .values()
            .filter_map(|state| {
                let now = netns_id(&state.record.netns);
                if now == state.netns_id {
                    return None;
                }
                if now.is_none() {
                    warn!(router = %state.record.id, netns = %state.record.netns, "namespace deleted from outside: detaching the router");
                } else {
                    info!(router = %state.record.id, netns = %state.record.netns, "namespace appeared: attaching the router");
                }
                Some((state.record.id.clone(), now.map(|_| self.glue_job(&state.record.netns))))
            })
            .collect()
    }

    /// Whether a router's namespace is being made (its file is there, the
    /// namespace not yet mounted on it): its mount brings no event, so the
    /// follower looks again shortly.
    pub(super) fn namespaces_mounting(&self) -> bool {
        // An attached router's namespace is mounted: no stat for it.
        self.routers.values().filter(|r| r.attachment.is_none()).any(|r| netns::presence(&r.record.netns) == netns::Presence::Mounting)
    }

    /// Re-syncs one router with its namespace (after a link event or a
    /// namespace change) and its rules with the maps.
    pub(super) fn refresh_router(&mut self, id: &str, glue: Option<GlueDone>) -> Result<()> {
        let was_attached = self.routers.get(id).is_some_and(|r| r.attachment.is_some());
        let now_attached = match self.bring_up(id, glue)? {
            Some((_, links)) => {
                if links != Default::default() {
                    info!(router = %id, attached = links.attached, detached = links.detached, "interfaces changed");
                }
                true
            }
            None => false,
        };
        // The rules of a router enter or leave the maps with its namespace.
        if was_attached != now_attached {
            self.datapath.reconcile(&self.desired()?, true)?;
            self.release_quarantine();
        }
        Ok(())
    }
}

/// Every router interface holds two pinned links, and attaching opens a few
/// descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            warn!("raising the open files limit: {e}");
        }
}

fn kind_of(h: &crate::api::Helper) -> Result<&'static HelperKind> {
    catalogue::by_name(&h.helper).with_context(|| format!("helper {} is not in the catalogue", h.helper))
}

fn rule_key(index: u32, h: &HelperRecord) -> (u32, u8, u16) {
    (index, h.helper.protocol.number(), h.helper.port)
}

