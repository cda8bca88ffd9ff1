//! The API socket: connections, their caps, and how a request is handled
//! (slow steps without the daemon's lock); and the periodic tasks that run
//! beside it (housekeeping, the glue and attachment checks).

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use super::{Daemon, GlueDone, GlueJob, metrics::ApiMetrics, ops::{Prepared, describe}};
use crate::{
    api::{ApiError, ErrorCode, MAX_REQUEST_BYTES, Owner, Reply, Request, Response},
    api::{AuditEntry, Caller, Event, EventKind},
};

pub(super) type Shared = Arc<Mutex<Daemon>>;

/// The daemon, also after a panic while it was held.
pub(super) fn lock(d: &Shared) -> std::sync::MutexGuard<'_, Daemon> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves the API on `socket` until SIGTERM or SIGINT (or a teardown).
/// Stopping leaves enforcement in place: maps and links stay pinned.
pub async fn serve(mut daemon: Daemon, socket: &Path) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket left by a previous daemon is ever removed.
        if !meta.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket; refusing to replace it", socket.display());
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!("another daemon is serving {}", socket.display());
        }
        std::fs::remove_file(socket)?;
    }
    // The socket is born owner-only (no window with a wider mode); the
    // group, if any, is let in below.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old_umask);
    let listener = bound.with_context(|| format!("binding {}", socket.display()))?;
    // Root only, or root and the configured group: peer credentials decide
    // the rest (SO_PEERCRED).
    let group = daemon.socket_group();
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group {
        nix::unistd::chown(socket, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("giving {} to group {gid}", socket.display()))?;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(if group.is_some() { 0o660 } else { 0o600 }))?;
    info!(socket = %socket.display(), "serving");
    let neutron = daemon.config.neutron.clone();
    let metrics_addr = daemon.config.metrics.clone();
    let limits = Limits::new(&daemon.config);
    let datapath_log = daemon.datapath.take_log().map(|log| tokio::spawn(read_datapath_log(log)));
    let daemon: Shared = Arc::new(Mutex::new(daemon));
    let api = ApiMetrics::new();
    let metrics = match metrics_addr.clone() {
        Some(addr) => match super::metrics::serve(addr, daemon.clone(), api.clone()).await {
            Ok(task) => Some(task),
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        },
        None => None,
    };
    // The API answers at once; the kernel is reconciled with the store in
    // the background. Until that is done reads are served and writes wait.
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    tokio::spawn(startup(daemon.clone(), ready_tx));
    let changes = Changes::start(daemon.clone(), ready.clone());
    let sync = neutron.map(|config| {
        info!(poll_interval = ?config.poll_interval(), "following Neutron");
        tokio::spawn(once_ready(ready.clone(), super::sync::follow(daemon.clone(), config)))
    });
    // Namespace following and housekeeping run beside the accept loop, each
    // taking the lock only for its own short steps.
    let glue_every = Duration::from_secs(lock(&daemon).config.glue_check_secs);
    let prune_every = Duration::from_secs(lock(&daemon).config.conntrack_index_prune_secs);
    let background = [
        supervise("namespace following", { let (d, r) = (daemon.clone(), ready.clone()); move || once_ready(r.clone(), super::follow::follow_namespaces(d.clone())) }),
        supervise("housekeeping", { let (d, r) = (daemon.clone(), ready.clone()); move || once_ready(r.clone(), housekeeping(d.clone())) }),
        tokio::spawn(super::notify::watchdog(daemon.clone())),
        supervise("glue and attachment checks", { let (d, r) = (daemon.clone(), ready.clone()); move || once_ready(r.clone(), verify(d.clone(), glue_every)) }),
        supervise("conntrack index pruning", { let (d, r) = (daemon.clone(), ready.clone()); move || once_ready(r.clone(), prune_index(d.clone(), prune_every)) }),
    ];
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // Out of descriptors or an aborted connection: the daemon
                // goes on serving (after a pause, so EMFILE cannot spin).
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = limits.admit(&stream) else {
                    tokio::spawn(refuse_busy(stream));
                    continue;
                };
                let (daemon, changes, stop, idle, ready, api) = (daemon.clone(), changes.clone(), stop_tx.clone(), limits.idle, ready.clone(), api.clone());
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, Served { daemon, changes, ready, api }, stop, idle).await {
                        warn!("connection: {e:#}");
                    }
                    drop(slot);
                });
            }
            _ = stop_rx.recv() => break,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    super::notify::stopping();
    for task in background.iter().chain(sync.as_ref()).chain(metrics.as_ref()).chain(datapath_log.as_ref()) {
        task.abort();
    }
    lock(&daemon).save_verified();
    info!("stopping; enforcement stays in place");
    let _ = std::fs::remove_file(socket);
    if let Some(crate::config::MetricsAddr::Unix(path)) = metrics_addr {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Passes what the programs log (`debug datapath on`) to the daemon's log
/// as it arrives.
async fn read_datapath_log(log: crate::kernel::DatapathLog) {
    // SAFETY: the logger owns the ring buffer's descriptor, and the AsyncFd
    // owns the logger: the descriptor stays open while registered.
    let mut log = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return warn!("cannot read the datapath log: {e}"),
    };
    loop {
        let Ok(mut ready) = log.readable_mut().await else { return };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Runs a background task for as long as the daemon serves; one that ends
/// (a bug: a panic in one of its steps) is logged and started again.
fn supervise<F, T>(name: &'static str, task: T) -> JoinHandle<()>
where
    T: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            if let Err(e) = tokio::spawn(task()).await {
                error!("{name} failed ({e}); starting it again");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// A step for the daemon's thread.
type Step = Box<dyn FnOnce() + Send>;

/// The daemon's steps run on one thread of their own, one at a time, in the
/// order they were asked for. A task waits for its step as a future: a burst
/// (every stored router's start step at once) parks no thread. And what the
/// steps keep (routers, helpers, the store's pages) is allocated by one
/// thread: run on whichever blocking thread was free, it was spread over
/// each thread's own pages of the allocator, and a restart with 300 routers
/// of 10 helpers ended 13 s later at 47 MiB where the daemon that had added
/// them held 40.
fn steward() -> &'static std::sync::mpsc::Sender<Step> {
    static STEWARD: std::sync::OnceLock<std::sync::mpsc::Sender<Step>> = std::sync::OnceLock::new();
    STEWARD.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Step>();
        std::thread::Builder::new()
            .name("enforcer-daemon".into())
            .spawn(move || rx.into_iter().for_each(|step| step()))
            .expect("starting the daemon's thread");
        tx
    })
}

/// A daemon step that panicked, with the panic's message (also logged
/// where it happened); None if the daemon's thread is gone.
#[derive(Debug)]
pub(super) struct StepPanicked(Option<String>);

impl StepPanicked {
    fn from_payload(payload: Box<dyn std::any::Any + Send>) -> Self {
        let message = payload.downcast_ref::<&str>().map(|m| m.to_string()).or_else(|| payload.downcast_ref::<String>().cloned());
        Self(Some(message.unwrap_or_else(|| "no message".into())))
    }
}

impl std::fmt::Display for StepPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(message) => write!(f, "the daemon's step panicked: {message}"),
            None => f.write_str("the daemon's thread is gone"),
        }
    }
}

/// Runs `f` on the daemon's thread, in its turn, without the lock.
async fn on_steward<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StepPanicked> {
    let (done, result) = tokio::sync::oneshot::channel();
    let step: Step = Box::new(move || {
        // A panic leaves the thread for the next step; the lock it held is
        // taken back as it was (`lock`).
        let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    steward().send(step).map_err(|_| StepPanicked(None))?;
    result.await.map_err(|_| StepPanicked(None))?.map_err(StepPanicked::from_payload)
}

/// Runs `f` on the daemon, off the async runtime, in its turn.
pub(super) async fn on_daemon<T: Send + 'static>(daemon: &Shared, f: impl FnOnce(&mut Daemon) -> T + Send + 'static) -> Result<T, StepPanicked> {
    let d = daemon.clone();
    on_steward(move || f(&mut lock(&d))).await
}

/// [`on_daemon`], for steps that do not panic.
pub(super) async fn with_daemon<T: Send + 'static>(daemon: &Shared, f: impl FnOnce(&mut Daemon) -> T + Send + 'static) -> T {
    on_daemon(daemon, f).await.expect("daemon step panicked")
}

/// Runs a glue step without the lock.
pub(super) async fn unlocked(job: GlueJob) -> GlueDone {
    tokio::task::spawn_blocking(move || job.run()).await.expect("glue step panicked")
}

/// Glue steps of one namespace run one at a time, in order: a removal
/// (done after the lock is released) cannot overtake the install of a router
/// added there again.
pub(super) async fn netns_turn(netns: Option<&str>) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    static TURNS: std::sync::OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = std::sync::OnceLock::new();
    let netns = netns?;
    let turn = {
        let mut turns = TURNS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        turns.retain(|_, t| Arc::strong_count(t) > 1);
        turns.entry(netns.to_string()).or_default().clone()
    };
    Some(turn.lock_owned().await)
}

/// Removes the glue of routers the daemon took down, without the lock.
pub(super) async fn unglue(daemon: &Shared) {
    for netns in with_daemon(daemon, |d| d.take_unglue()).await {
        let _turn = netns_turn(Some(&netns)).await;
        let _ = tokio::task::spawn_blocking(move || super::remove_glue(&netns)).await;
    }
}

/// The wire form of a result. Done on a blocking thread, outside the lock:
/// a long answer (an audit log, a dump) takes a while to serialize.
fn wire(result: Result<Reply, ApiError>) -> Vec<u8> {
    let response: Response = result.into();
    serde_json::to_vec(&response).unwrap_or_else(|e| {
        let error = Response::Error(ApiError::internal(format!("serializing the answer: {e}")));
        serde_json::to_vec(&error).unwrap_or_default()
    })
}

/// Handles one request: its slow external steps (the glue of a router add
/// or remove) or a long read (maps dump, audit log) without the lock, the
/// rest under it. Returns the answer's wire form and whether the daemon is
/// stopping.
pub(super) async fn request(daemon: &Shared, changes: &Changes, ready: &Ready, origin: Owner, caller: Caller, req: Request) -> (Vec<u8>, bool) {
    // Router changes and teardown wait for the start-up reconciliation
    // (helper changes wait in their queue).
    if matches!(req, Request::RouterAdd { .. } | Request::RouterRemove { .. } | Request::Teardown {}) {
        wait_ready(ready).await;
    }
    if req.is_helper_change() {
        return (changes.submit(origin, caller, req).await, false);
    }
    // Only these may have work to do outside the lock; the rest (helper
    // changes above all) take it once.
    let may_prepare = matches!(req, Request::RouterAdd { .. } | Request::RouterRemove { .. } | Request::MapsDump {} | Request::Audit { .. });
    let (job, netns) = if may_prepare {
        let (c, r) = (caller.clone(), req.clone());
        with_daemon(daemon, move |d| (d.prepare(origin, &c, &r), d.netns_of(&r))).await
    } else {
        (None, None)
    };
    let turn = netns_turn(netns.as_deref()).await;
    let glue = match job {
        Some(Prepared::Glue(job)) => Some(unlocked(job).await),
        // A read needs nothing more of the daemon: done without the lock.
        Some(Prepared::Read(job)) => {
            let line = tokio::task::spawn_blocking(move || wire(job.run())).await;
            return (line.unwrap_or_else(|e| wire(Err(ApiError::internal(e)))), false);
        }
        None => None,
    };
    // A panic while handling is this request's internal error, not the
    // connection's end.
    let (line, stopping, gone) = on_daemon(daemon, move |d| (d.handle_from(origin, caller, req, glue), d.stopping(), d.take_unglue()))
        .await
        .map(|(result, stopping, gone)| (wire(result), stopping, gone))
        .unwrap_or_else(|e| (wire(Err(ApiError::internal(e))), false, Vec::new()));
    // The request's own namespace is still its turn; others take theirs.
    for ns in gone {
        let _other = if netns.as_deref() == Some(ns.as_str()) { None } else { netns_turn(Some(&ns)).await };
        let _ = tokio::task::spawn_blocking(move || super::remove_glue(&ns)).await;
    }
    drop(turn);
    (line, stopping)
}

/// Whether the start-up reconciliation is done.
pub(super) type Ready = tokio::sync::watch::Receiver<bool>;

async fn wait_ready(ready: &Ready) {
    let _ = ready.clone().wait_for(|r| *r).await;
}

/// Runs `task` once the start-up reconciliation is done.
async fn once_ready(ready: Ready, task: impl std::future::Future<Output = ()>) {
    wait_ready(&ready).await;
    task.await
}

/// Most namespaces whose glue is checked at once at start (each is an nft
/// process).
const STARTUP_GLUE_JOBS: usize = 8;

/// The start-up reconciliation: every stored router brought up (its glue
/// checked without the lock, several at once; its links under the lock, one
/// router at a time, so reads are answered in between), then orphans and
/// the maps. A failure there stops the daemon, leaving the kernel as it is.
async fn startup(daemon: Shared, ready: tokio::sync::watch::Sender<bool>) {
    let jobs = with_daemon(&daemon, |d| d.startup_jobs()).await;
    let limit = Arc::new(tokio::sync::Semaphore::new(STARTUP_GLUE_JOBS));
    let mut running = tokio::task::JoinSet::new();
    for (id, job) in jobs {
        let Ok(permit) = limit.clone().acquire_owned().await else { break };
        let d = daemon.clone();
        running.spawn(async move {
            let glue = match job {
                Some(job) => Some(unlocked(job).await),
                None => None,
            };
            drop(permit);
            with_daemon(&d, move |d| d.start_router(&id, glue)).await;
        });
    }
    while running.join_next().await.is_some() {}
    if let Err(e) = with_daemon(&daemon, |d| d.finish_start()).await {
        error!("reconciling the kernel with the store: {e:#}; stopping, the kernel state is left as it is");
        std::process::exit(1);
    }
    let _ = ready.send(true);
    let (routers, took) = with_daemon(&daemon, |d| (d.routers.len(), d.life.ready)).await;
    super::notify::ready(routers, took.unwrap_or_default());
}

/// Helper changes queue here and are applied in groups: those that arrive
/// while a group is being committed make the next group, with one store
/// transaction and one sync of the audit log between them (group commit).
/// Each is answered once its group is durable. The queue is bounded by the
/// connection caps times the requests a connection may pipeline.
#[derive(Clone)]
pub(super) struct Changes(tokio::sync::mpsc::UnboundedSender<Queued>);

struct Queued {
    origin: Owner,
    caller: Caller,
    req: Request,
    answer: tokio::sync::oneshot::Sender<Result<Reply, ApiError>>,
}

/// Most changes in one group: a bound on the time the lock is held.
const MAX_GROUP: usize = 4096;

impl Changes {
    fn start(daemon: Shared, ready: Ready) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Queued>();
        tokio::spawn(async move {
            wait_ready(&ready).await;
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(q) => group.push(q),
                        Err(_) => break,
                    }
                }
                let (requests, answers): (Vec<_>, Vec<_>) = group.into_iter().map(|q| ((q.origin, q.caller, q.req), q.answer)).unzip();
                let handled = on_daemon(&daemon, move |d| d.handle_group(requests)).await;
                let (results, spent) = handled.unwrap_or_else(|e| (answers.iter().map(|_| Err(ApiError::internal(format!("applying the change: {e}")))).collect(), None));
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
                // Freed beside the next group, not before it.
                if let Some(spent) = spent {
                    tokio::spawn(async move { drop(spent) });
                }
            }
        });
        Self(tx)
    }

    /// Queues a change now and returns the wire form of its answer to come.
    fn submit(&self, origin: Owner, caller: Caller, req: Request) -> impl std::future::Future<Output = Vec<u8>> + Send + 'static {
        let (answer, done) = tokio::sync::oneshot::channel();
        let queued = self.0.send(Queued { origin, caller, req, answer }).is_ok();
        async move {
            if !queued {
                return wire(Err(ApiError::internal("the daemon is stopping")));
            }
            wire(done.await.unwrap_or_else(|_| Err(ApiError::internal("the change was dropped unanswered"))))
        }
    }
}

/// Periodic clean-up of revoked flows and released slots.
async fn housekeeping(daemon: Shared) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        with_daemon(&daemon, |d| d.housekeeping()).await;
        // Memory follows the state, not the busiest moment so far: the
        // daemon's thread gives back its free pages (and the purge is
        // process-wide), without the lock.
        let _ = on_steward(crate::memory::release).await;
    }
}

/// Drops from the conntrack index, every `every`, the connections that
/// ended by themselves, without the lock (a lookup per entry).
async fn prune_index(daemon: Shared, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some((dir, namespaces)) = with_daemon(&daemon, |d| d.indexed_namespaces()).await else { continue };
        match tokio::task::spawn_blocking(move || crate::kernel::ctindex::prune(&dir, &namespaces)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(dropped = n, "conntrack index pruned"),
            Ok(Err(e)) => warn!("pruning the conntrack index: {e:#}"),
            _ => {}
        }
    }
}

/// Checks every router's glue as a whole and its attachments against the
/// kernel every `every`, putting back what someone removed or changed.
async fn verify(daemon: Shared, every: Duration) {
    // The first check comes one period after start: the start-up
    // reconciliation has just installed every router's glue and links.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let start = std::time::Instant::now();
        for check in with_daemon(&daemon, |d| d.checks()).await {
            let _turn = netns_turn(Some(check.netns())).await;
            let Ok(checked) = tokio::task::spawn_blocking(move || check.run()).await else { continue };
            if checked.news {
                with_daemon(&daemon, move |d| d.checked(checked)).await;
            }
        }
        let maps = match with_daemon(&daemon, |d| d.map_check()).await {
            Some(check) => tokio::task::spawn_blocking(move || check.run()).await.ok(),
            None => None,
        };
        with_daemon(&daemon, move |d| d.checks_done(start.elapsed(), maps)).await;
    }
}

/// Caps on connections, in total and per uid, so that one local user
/// cannot take every descriptor or task of the daemon.
#[derive(Clone)]
struct Limits {
    total: usize,
    per_uid: usize,
    idle: Duration,
    open: Arc<Mutex<HashMap<u32, usize>>>,
}

/// A connection's place under the caps, given back on drop.
struct Admitted {
    uid: u32,
    open: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

impl Limits {
    fn new(config: &crate::config::Config) -> Self {
        Self {
            total: config.max_connections as usize,
            per_uid: config.max_connections_per_uid as usize,
            idle: Duration::from_secs(config.idle_timeout_secs),
            open: Arc::default(),
        }
    }

    fn admit(&self, stream: &UnixStream) -> Option<Admitted> {
        let uid = stream.peer_cred().ok()?.uid();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = open.values().sum();
        let mine = open.get(&uid).copied().unwrap_or(0);
        if total >= self.total || mine >= self.per_uid {
            warn!(uid, open = mine, total, "connection refused: too many connections");
            return None;
        }
        *open.entry(uid).or_default() += 1;
        Some(Admitted { uid, open: self.open.clone() })
    }
}

/// Tells a caller over the caps why, then closes.
async fn refuse_busy(mut stream: UnixStream) {
    let error = ApiError::new(ErrorCode::Exhausted, "too many connections to the daemon (max_connections, max_connections_per_uid); close some and retry");
    if let Ok(mut line) = serde_json::to_vec(&Response::Error(error)) {
        line.push(b'\n');
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&line)).await;
    }
}

/// The peer's supplementary groups at connect time (SO_PEERGROUPS, Linux
/// 4.13+); none if the kernel cannot tell.
fn peer_groups(fd: std::os::fd::RawFd) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer and its length describe writable memory.
        let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len) };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return groups;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            break;
        }
        groups.resize(n, 0);
    }
    Vec::new()
}

/// Requests one connection may have in flight (pipelined: sent before the
/// answers to earlier ones came back).
const PIPELINE: usize = 64;

/// An answer to come: its wire form, and whether the daemon is to stop.
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = (Vec<u8>, bool)> + Send>>;

/// What a connection serves requests with.
struct Served {
    daemon: Shared,
    changes: Changes,
    ready: Ready,
    api: ApiMetrics,
}

/// The result label of an answer in its wire form: `ok`, or its error code.
fn result_of(line: &[u8]) -> &'static str {
    let Some(rest) = line.strip_prefix(br#"{"error":{"code":""#) else { return "ok" };
    ErrorCode::ALL.iter().map(|c| c.as_str()).find(|c| rest.strip_prefix(c.as_bytes()).is_some_and(|r| r.first() == Some(&b'"'))).unwrap_or("error")
}

/// One client connection. Requests may be pipelined: answers come back in
/// the order of the requests. Helper changes are queued the moment they are
/// read, so a client's changes keep their order and join a group commit
/// together; any other request runs once every earlier one is done (it sees
/// their effects), and the next request is read only once it is done. An
/// `events` request ends the requests: the connection streams events.
async fn connection(stream: UnixStream, served: Served, stop: tokio::sync::mpsc::Sender<()>, idle: Duration) -> Result<()> {
    let Served { daemon, changes, ready, api } = served;
    let cred = stream.peer_cred().context("reading the peer's credentials")?;
    let caller = Caller { uid: cred.uid(), gid: cred.gid(), pid: cred.pid(), groups: peer_groups(stream.as_raw_fd()) };
    let (read, write) = stream.into_split();
    let (answers, pending) = tokio::sync::mpsc::channel::<Answer>(PIPELINE);
    // Answers not yet written.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn(write_answers(write, pending, stop, in_flight.clone()));
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(MAX_REQUEST_BYTES as u64 + 1);
        // A connection that sends nothing for `idle`, with no answer still
        // to come, is closed. (Cancelling read_until keeps what it read in
        // `line`, so calling it again goes on where it stopped.)
        let read = loop {
            match tokio::time::timeout(idle, reader.read_until(b'\n', &mut line)).await {
                Err(_) if in_flight.load(SeqCst) > 0 => continue,
                Err(_) => break 0,
                Ok(read) => break read?,
            }
        };
        if read == 0 {
            break;
        }
        let oversized = line.len() > MAX_REQUEST_BYTES;
        let parsed = if oversized {
            Err(ApiError::new(ErrorCode::BadRequest, format!("request larger than {MAX_REQUEST_BYTES} bytes")))
        } else {
            serde_json::from_slice::<Request>(&line).map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}")))
        };
        let mut finished = None;
        let mut stream = None;
        let (op, start) = (parsed.as_ref().map(|r| describe(r).0).unwrap_or("unparsed"), std::time::Instant::now());
        let answer: Answer = match parsed {
            Ok(Request::Events {}) => {
                let c = caller.clone();
                let line = match with_daemon(&daemon, move |d| d.subscribe(c)).await {
                    Ok(events) => {
                        stream = Some(events);
                        wire(Ok(Reply::Done {}))
                    }
                    Err(e) => wire(Err(e)),
                };
                Box::pin(async move { (line, false) })
            }
            Ok(req) if req.is_helper_change() => {
                let done = changes.submit(Owner::Local, caller.clone(), req);
                Box::pin(async move { (done.await, false) })
            }
            // Runs when the writer comes to it, after every earlier answer;
            // nothing after it is read before it is done.
            Ok(req) => {
                let (daemon, changes, ready, caller) = (daemon.clone(), changes.clone(), ready.clone(), caller.clone());
                let (tx, rx) = tokio::sync::oneshot::channel();
                finished = Some(rx);
                Box::pin(async move {
                    let answer = request(&daemon, &changes, &ready, Owner::Local, caller, req).await;
                    let _ = tx.send(());
                    answer
                })
            }
            Err(e) => {
                let (c, audited) = (caller.clone(), e.clone());
                with_daemon(&daemon, move |d| d.audit_refused(c, audited)).await;
                let line = wire(Err(e));
                Box::pin(async move { (line, false) })
            }
        };
        let api = api.clone();
        let answer: Answer = Box::pin(async move {
            let (line, stopping) = answer.await;
            api.answered(op, result_of(&line), start.elapsed());
            (line, stopping)
        });
        in_flight.fetch_add(1, SeqCst);
        if answers.send(answer).await.is_err() || oversized {
            break;
        }
        if let Some(events) = stream {
            // Every earlier answer and the `done` are written first.
            drop(answers);
            let write = writer.await.context("answer writer")??;
            reader.set_limit(u64::MAX);
            return stream_events(reader, write, events).await;
        }
        if let Some(finished) = finished
            && finished.await.is_err()
        {
            break;
        }
    }
    // The answers still to come are written before the connection closes.
    drop(answers);
    writer.await.context("answer writer")?.map(drop)
}

/// Writes the answers of a connection in the order of its requests. The
/// answers of a pipelining client that are ready together go out in one
/// write; none waits in the buffer for an answer that is not ready.
async fn write_answers(
    write: tokio::net::unix::OwnedWriteHalf,
    mut pending: tokio::sync::mpsc::Receiver<Answer>,
    stop: tokio::sync::mpsc::Sender<()>,
    in_flight: Arc<AtomicUsize>,
) -> Result<tokio::net::unix::OwnedWriteHalf> {
    use tokio::sync::mpsc::error::TryRecvError;
    let mut out = Buffered { out: tokio::io::BufWriter::with_capacity(ANSWER_BUFFER, write), answers: 0, in_flight };
    loop {
        let mut answer = match pending.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                out.flush().await?;
                match pending.recv().await {
                    Some(answer) => answer,
                    None => break,
                }
            }
        };
        let (mut text, stopping) = match std::future::poll_fn(|cx| std::task::Poll::Ready(answer.as_mut().poll(cx))).await {
            std::task::Poll::Ready(done) => done,
            std::task::Poll::Pending => {
                out.flush().await?;
                answer.await
            }
        };
        text.push(b'\n');
        out.write(&text).await?;
        if stopping {
            out.flush().await?;
            let _ = stop.send(()).await;
        }
    }
    out.flush().await?;
    Ok(out.out.into_inner())
}

/// A connection's answers held for one write (16 pipelining clients: one
/// `send` per answer took a sixth of the daemon's time, perf).
const ANSWER_BUFFER: usize = 64 << 10;

/// The answers written to the buffer and not yet sent, still counted in
/// flight (the connection stays open for them).
struct Buffered {
    out: tokio::io::BufWriter<tokio::net::unix::OwnedWriteHalf>,
    answers: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Buffered {
    async fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.out.write_all(line).await?;
        self.answers += 1;
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush().await?;
        self.in_flight.fetch_sub(std::mem::take(&mut self.answers), SeqCst);
        Ok(())
    }
}

/// After an `events` request: one line per event until the client closes
/// the connection (what it sends from then on is ignored). A subscriber
/// that falls behind is told how many events it missed.
async fn stream_events(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut events: tokio::sync::broadcast::Receiver<Event>,
) -> Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut ignored = [0u8; 512];
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Ok(event) => event,
                Err(RecvError::Lagged(missed)) => Event {
                    kind: EventKind::Lagged,
                    entry: AuditEntry::by_daemon("lagged", None, None, serde_json::json!({ "missed": missed }), None),
                },
                Err(RecvError::Closed) => return Ok(()),
            },
            read = reader.read(&mut ignored) => match read? {
                0 => return Ok(()),
                _ => continue,
            },
        };
        let mut line = serde_json::to_vec(&event)?;
        line.push(b'\n');
        write.write_all(&line).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_label_is_read_from_the_wire_form() {
        assert_eq!(result_of(&wire(Ok(Reply::Done {}))), "ok");
        for code in ErrorCode::ALL {
            assert_eq!(result_of(&wire(Err(ApiError::new(code, "x")))), code.as_str());
        }
    }

    #[tokio::test]
    async fn steps_run_on_one_thread_and_a_panic_fails_only_its_own() {
        let first = on_steward(|| std::thread::current().id()).await.expect("a step runs");
        let panicked = on_steward(|| -> u32 { panic!("a step's bug {}", 7) }).await.expect_err("a panic is an error");
        assert_eq!(panicked.to_string(), "the daemon's step panicked: a step's bug 7");
        let steps: Vec<_> = (0..8).map(|_| tokio::spawn(on_steward(|| std::thread::current().id()))).collect();
        for step in steps {
            assert_eq!(step.await.expect("a task").expect("the thread outlives a panic"), first);
        }
        assert_ne!(first, std::thread::current().id());
    }
}
