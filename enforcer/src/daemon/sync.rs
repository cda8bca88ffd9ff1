//! The Neutron sync: a task that polls Neutron and applies what changed
//! through the same requests as the local API (`router_add`,
//! `helper_set`, ...), made on Neutron's behalf, so they are validated,
//! stored and audited alike. Neutron and Keystone failures leave
//! enforcement as last applied; the task retries with backoff.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    Daemon, GlueDone, GlueJob,
    server::{Shared, netns_turn, unglue, unlocked, with_daemon},
};
use crate::{
    api::{ApiError, ErrorCode, HelperError, HelperSpec, Owner, Reply, Request, SyncStatus},
    api::Caller,
    neutron::{
        NeutronConfig,
        client::{Neutron, NeutronError},
        plan::{self, NeutronHelper, NeutronRouter, Step},
    },
};

/// The sync acts as root of this host, on Neutron's behalf.
const SYNC_CALLER: Caller = Caller { uid: 0, gid: 0, pid: None, groups: Vec::new() };

/// Longest wait between two attempts while Neutron fails.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What applying one router's helpers left undone.
#[derive(Debug, Default)]
pub struct Applied {
    /// Helpers refused for good (not offered here, bad values).
    pub refused: Vec<HelperError>,
    /// Whether a step failed for a reason that may pass (kernel, store,
    /// a conflict within one change): the revision is fetched again.
    pub retry: bool,
}

impl Daemon {
    /// Routers that follow Neutron, and routers added by hand.
    fn owners(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let (mut neutron, mut local) = (BTreeSet::new(), BTreeSet::new());
        for (id, state) in &self.routers {
            match state.record.owner {
                Owner::Neutron => neutron.insert(id.clone()),
                Owner::Local => local.insert(id.clone()),
            };
        }
        (neutron, local)
    }

    fn on_behalf_of_neutron(&mut self, req: Request) -> Result<Reply, ApiError> {
        self.handle_from(Owner::Neutron, SYNC_CALLER.clone(), req, None)
    }

    /// The request that adds a Neutron router hosted in `netns`.
    fn add_request(router: &NeutronRouter, netns: &str) -> Request {
        Request::RouterAdd { router_id: router.id.clone(), netns: Some(netns.to_string()), project_id: Some(router.project_id.clone()) }
    }

    /// The glue step of a router the sync is about to add, to run without
    /// the lock (None if there is nothing to add).
    fn sync_glue_job(&self, router: &NeutronRouter, netns: &str) -> Option<GlueJob> {
        if self.routers.get(&router.id).is_some_and(|r| r.record.netns == netns) {
            return None;
        }
        // As if the router were not there yet: a move re-adds it.
        Some(self.glue_job(netns))
    }

    /// Makes the router's helpers exactly Neutron's, with one helper set
    /// request (one transaction; a port handed from one helper to another
    /// within one change is free when it is needed).
    /// `glue` is the glue step of an added router, done without the lock.
    pub(super) fn sync_router(&mut self, router: &NeutronRouter, netns: &str, helpers: &[NeutronHelper], glue: Option<GlueDone>) -> Applied {
        let mut applied = Applied::default();
        let id = router.id.clone();
        if self.routers.get(&id).is_some_and(|r| r.record.netns != netns) {
            // The router moved between its qrouter- and snat- namespaces.
            if let Err(e) = self.on_behalf_of_neutron(Request::RouterRemove { router_id: id.clone() }) {
                warn!(router = %id, "moving to {netns}: {e}");
                applied.retry = true;
                return applied;
            }
        }
        if !self.routers.contains_key(&id)
            && let Err(e) = self.handle_from(Owner::Neutron, SYNC_CALLER.clone(), Self::add_request(router, netns), glue)
        {
            warn!(router = %id, "adding: {e}");
            applied.retry = true;
            return applied;
        }
        let mut specs: Vec<HelperSpec> = helpers
            .iter()
            .map(|h| HelperSpec {
                id: Some(h.id.clone()),
                protocol: h.protocol.clone(),
                port: h.port,
                helper: match crate::validate::protocol(&h.protocol) {
                    Ok(p) => plan::kernel_name(&h.helper, p).to_string(),
                    Err(_) => h.helper.clone(),
                },
                project_id: Some(router.project_id.clone()),
            })
            .collect();
        // One request sets the whole set. A helper refused for good (not
        // offered here, bad values) is left out and the rest set again: the
        // old version of a refused helper must not stay enforced either.
        loop {
            let set = Request::HelperSet { router_id: id.clone(), helpers: specs.clone() };
            let e = match self.on_behalf_of_neutron(set) {
                Ok(_) => break,
                Err(e) => e,
            };
            let entry = entry_of(&e).filter(|i| *i < specs.len());
            match entry {
                Some(i) if matches!(e.code, ErrorCode::InvalidArgument | ErrorCode::Conflict) => {
                    let gone = specs.remove(i);
                    let error = e.message.split_once(": ").map_or(e.message.as_str(), |(_, m)| m).to_string();
                    applied.refused.push(HelperError { router_id: id.clone(), helper_id: gone.id.unwrap_or_default(), error });
                }
                _ => {
                    warn!(router = %id, "setting helpers: {e}");
                    applied.retry = true;
                    break;
                }
            }
        }
        applied
    }

    /// Removes a router that followed Neutron (gone from Neutron, or its
    /// namespace gone from this node).
    pub fn sync_remove(&mut self, id: &str) -> Result<(), ApiError> {
        self.on_behalf_of_neutron(Request::RouterRemove { router_id: id.to_string() }).map(|_| ())
    }

    fn set_sync_status(&mut self, status: SyncStatus, completed: bool) {
        let last = if completed { Some(Instant::now()) } else { self.sync_seen.as_ref().and_then(|(_, t)| *t) };
        self.sync_seen = Some((status, last));
    }
}

/// The names in /run/netns.
fn namespaces() -> Vec<String> {
    std::fs::read_dir(crate::kernel::netns::path(""))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// What the poller keeps between polls.
struct Poller {
    neutron: Neutron,
    /// Router id -> the revision applied here (None: to be fetched again).
    revisions: BTreeMap<String, Option<u64>>,
    refused: BTreeMap<String, Vec<HelperError>>,
    status: SyncStatus,
}

impl Poller {
    async fn poll(&mut self, daemon: &Shared) -> Result<(), NeutronError> {
        let listed = self.neutron.routers().await?;
        let hosted = plan::hosted(&namespaces());
        let (followed, locals) = with_daemon(daemon, |d| d.owners()).await;
        self.revisions.retain(|id, _| followed.contains(id));
        let synced: BTreeMap<String, Option<u64>> =
            followed.iter().map(|id| (id.clone(), self.revisions.get(id).copied().flatten())).collect();
        for step in plan::steps(&hosted, &listed, &synced, &locals) {
            match step {
                Step::Sync { router, netns } => {
                    // None: deleted between the list and now; confirmed next poll.
                    if let Some(helpers) = self.neutron.helpers(&router.id).await? {
                        let turn = netns_turn(Some(&netns)).await;
                        let (r, ns) = (router.clone(), netns.clone());
                        let job = with_daemon(daemon, move |d| d.sync_glue_job(&r, &ns)).await;
                        let glue = match job {
                            Some(job) => Some(unlocked(job).await),
                            None => None,
                        };
                        let r = router.clone();
                        let applied = with_daemon(daemon, move |d| d.sync_router(&r, &netns, &helpers, glue)).await;
                        drop(turn);
                        // A router moved away from a namespace leaves glue there.
                        unglue(daemon).await;
                        let new_errors = applied.refused.iter().filter(|e| !self.refused.get(&router.id).is_some_and(|old| old.contains(e))).count();
                        self.status.helper_errors_total += new_errors as u64;
                        for e in &applied.refused {
                            warn!(router = %e.router_id, helper = %e.helper_id, "Neutron helper not applied: {}", e.error);
                        }
                        self.refused.insert(router.id.clone(), applied.refused);
                        self.revisions.insert(router.id.clone(), (!applied.retry).then_some(router.revision_number));
                    }
                }
                Step::Confirm { id } => {
                    if !self.neutron.router_exists(&id).await? {
                        info!(router = %id, "gone from Neutron: removing");
                        self.remove(daemon, id).await;
                    }
                }
                Step::Remove { id } => {
                    info!(router = %id, "namespace gone from this node: removing");
                    self.remove(daemon, id).await;
                }
            }
        }
        Ok(())
    }

    async fn remove(&mut self, daemon: &Shared, id: String) {
        let key = id.clone();
        let removed = with_daemon(daemon, move |d| d.sync_remove(&key)).await;
        unglue(daemon).await;
        if let Err(e) = removed {
            warn!(router = %id, "removing: {e}");
            return;
        }
        self.revisions.remove(&id);
        self.refused.remove(&id);
    }
}

/// The entry of a helper set an error is about (its field `helpers[i].…`).
fn entry_of(e: &ApiError) -> Option<usize> {
    e.field.as_deref()?.strip_prefix("helpers[")?.split_once(']')?.0.parse().ok()
}

/// Follows Neutron until the daemon stops.
pub async fn follow(daemon: Shared, config: NeutronConfig) {
    let interval = config.poll_interval();
    let mut poller = Poller {
        neutron: Neutron::new(config),
        revisions: BTreeMap::new(),
        refused: BTreeMap::new(),
        status: SyncStatus { state: "starting".into(), ..SyncStatus::default() },
    };
    with_daemon(&daemon, {
        let status = poller.status.clone();
        move |d| d.set_sync_status(status, false)
    })
    .await;
    loop {
        let before = poller.neutron.requests;
        let started = Instant::now();
        let result = poller.poll(&daemon).await;
        poller.status.polls += 1;
        let wait = match &result {
            Ok(()) => {
                if poller.status.failed_polls_in_a_row > 0 {
                    info!("Neutron sync recovered");
                }
                poller.status.state = "ok".into();
                poller.status.last_error = None;
                poller.status.failed_polls_in_a_row = 0;
                poller.status.requests_last_poll = poller.neutron.requests - before;
                poller.status.last_poll_ms = started.elapsed().as_secs_f64() * 1000.0;
                // Polls start every interval, however long one takes.
                interval.saturating_sub(started.elapsed())
            }
            Err(e) => {
                poller.status.state = "stale".into();
                poller.status.last_error = Some(e.to_string());
                poller.status.failed_polls_in_a_row += 1;
                poller.status.failed_polls += 1;
                warn!(failures = poller.status.failed_polls_in_a_row, "Neutron sync: {e}; enforcement stays as last applied");
                if matches!(e, NeutronError::Credentials(_)) {
                    poller.neutron.logout();
                }
                let shift = poller.status.failed_polls_in_a_row.min(6) as u32;
                (interval * 2u32.pow(shift)).min(MAX_BACKOFF)
            }
        };
        poller.status.routers_synced = poller.revisions.len();
        poller.status.helper_errors = poller.refused.values().flatten().cloned().collect();
        let status = poller.status.clone();
        let completed = result.is_ok();
        with_daemon(&daemon, move |d| d.set_sync_status(status, completed)).await;
        tokio::time::sleep(wait).await;
    }
}
