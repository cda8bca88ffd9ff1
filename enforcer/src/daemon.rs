//! The daemon: owns the datapath and the store, applies requests.
//!
//! Every mutation is validated, applied to the kernel inside a store
//! transaction and committed only if the kernel step worked, so the store,
//! the maps and the glue never disagree about an acknowledged change.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{info, warn};

use crate::{
    api::{ApiError, ErrorCode, Helper, Reply, Request, Response, Router, MAX_REQUEST_BYTES},
    catalogue::HelperKind,
    config::Config,
    kernel::{Attachment, Datapath, glue, netns},
    store::{ApplyError, Change, HelperRecord, RouterRecord, Store},
    validate,
};

/// Project of objects created without one.
pub const DEFAULT_PROJECT: &str = "default";

struct LiveRouter {
    record: RouterRecord,
    attachment: Attachment,
}

pub struct Daemon {
    datapath: Datapath,
    store: Store,
    config: Config,
    routers: BTreeMap<String, LiveRouter>,
    /// Stored routers whose namespace could not be entered at start.
    detached: BTreeMap<String, RouterRecord>,
    helpers: BTreeMap<(String, String), HelperRecord>,
    quarantine: BTreeSet<(String, u16)>,
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Kernel(e) => ApiError::kernel(e),
            other => ApiError::internal(other),
        }
    }
}

impl Daemon {
    /// Loads the datapath, opens the store and brings the kernel in line
    /// with it: maps are rebuilt from the stored rules, routers re-attached.
    pub fn start(config: Config) -> Result<Self> {
        let layout = config.layout()?;
        raise_fd_limit();
        let store = Store::open(&config.state_dir)?;
        let state = store.load().context("reading the store")?;
        let mut datapath = Datapath::load(&config.bpffs, layout, config.max_rules)?;
        datapath.clear().context("clearing stale map entries")?;
        let mut daemon = Daemon {
            datapath,
            store,
            config,
            routers: BTreeMap::new(),
            detached: BTreeMap::new(),
            helpers: state.helpers,
            quarantine: state.quarantine,
        };
        for record in state.routers.into_values() {
            match bring_up(&mut daemon.datapath, &record) {
                Ok(attachment) => {
                    daemon.routers.insert(record.id.clone(), LiveRouter { record, attachment });
                }
                Err(e) => {
                    warn!(router = %record.id, "router not attached: {e:#}");
                    daemon.detached.insert(record.id.clone(), record);
                }
            }
        }
        let keys: Vec<_> = daemon.helpers.keys().cloned().collect();
        for key in keys {
            let h = daemon.helpers[&key].clone();
            if let Some(r) = daemon.routers.get(&key.0) {
                let index = r.attachment.index;
                let allowed = kind_of(&h.helper).and_then(|kind| allow_record(&mut daemon.datapath, index, &h, kind));
                if let Err(e) = allowed {
                    warn!(helper = %h.helper.id, "rule not restored: {e:#}");
                }
            }
        }
        info!(routers = daemon.routers.len(), helpers = daemon.helpers.len(), "state restored");
        Ok(daemon)
    }

    pub fn handle(&mut self, req: Request) -> Result<Reply, ApiError> {
        match req {
            Request::RouterAdd { router_id, netns, project_id } => self.router_add(router_id, netns, project_id),
            Request::RouterRemove { router_id } => self.router_remove(&router_id),
            Request::RouterList {} => Ok(Reply::Routers(self.router_list())),
            Request::HelperCreate { router_id, protocol, port, helper, id, project_id } => {
                self.helper_create(&router_id, &protocol, port, &helper, id, project_id)
            }
            Request::HelperUpdate { router_id, helper_id, protocol, port, helper } => {
                self.helper_update(&router_id, &helper_id, protocol, port, helper)
            }
            Request::HelperDelete { router_id, helper_id } => self.helper_delete(&router_id, &helper_id),
            Request::HelperList { router_id } => self.helper_list(router_id),
            Request::HelperShow { router_id, helper_id } => {
                let (_, key) = self.find_helper(&router_id, &helper_id)?;
                Ok(Reply::Helper(self.helpers[&key].helper.clone()))
            }
        }
    }

    fn router_view(&self, record: &RouterRecord, interfaces: Vec<String>) -> Router {
        Router { id: record.id.clone(), project_id: record.project_id.clone(), netns: record.netns.clone(), interfaces }
    }

    fn router_list(&self) -> Vec<Router> {
        let mut out: Vec<Router> = self
            .routers
            .values()
            .map(|r| self.router_view(&r.record, r.attachment.interfaces.clone()))
            .chain(self.detached.values().map(|r| self.router_view(r, Vec::new())))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    fn router_add(&mut self, id: String, netns: Option<String>, project: Option<String>) -> Result<Reply, ApiError> {
        let id = validate::uuid("router_id", &id)?;
        let netns = validate::netns(&netns.unwrap_or_else(|| format!("qrouter-{id}")))?;
        let project = validate::project(project.as_deref().unwrap_or(DEFAULT_PROJECT))?;
        if self.routers.contains_key(&id) || self.detached.contains_key(&id) {
            return Err(ApiError::new(ErrorCode::Conflict, format!("router {id} already exists")));
        }
        if let Some(other) = self.routers.values().find(|r| r.record.netns == netns) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("network namespace {netns} already belongs to router {}", other.record.id),
            ));
        }
        if !netns::path(&netns).exists() {
            return Err(ApiError::invalid("netns", format!("network namespace {netns:?} does not exist (/run/netns/{netns})")));
        }
        let index = (1..=u32::MAX)
            .find(|i| !self.routers.values().any(|r| r.record.index == *i) && !self.detached.values().any(|r| r.index == *i))
            .ok_or_else(|| ApiError::new(ErrorCode::Exhausted, "no free router index"))?;
        let record = RouterRecord { id: id.clone(), index, project_id: project, netns };
        let mut attachment = None;
        let datapath = &mut self.datapath;
        let result = self.store.apply(&[Change::PutRouter(record.clone())], || {
            attachment = Some(bring_up(datapath, &record)?);
            Ok(())
        });
        if let Err(e) = result {
            if let Some(a) = attachment.take() {
                self.take_down(&record, a);
            }
            return Err(e.into());
        }
        let attachment = attachment.ok_or_else(|| ApiError::internal("attachment missing"))?;
        info!(router = %id, netns = %record.netns, interfaces = ?attachment.interfaces, "router added");
        let view = self.router_view(&record, attachment.interfaces.clone());
        self.routers.insert(id, LiveRouter { record, attachment });
        Ok(Reply::Router(view))
    }

    fn take_down(&mut self, record: &RouterRecord, attachment: Attachment) {
        self.datapath.forget_router(attachment.index);
        drop(attachment);
        if let Err(e) = glue::remove(&netns::path(&record.netns)) {
            warn!(router = %record.id, "removing glue: {e:#}");
        }
    }

    fn router_remove(&mut self, id: &str) -> Result<Reply, ApiError> {
        let id = validate::uuid("router_id", id)?;
        let helpers: Vec<HelperRecord> =
            self.helpers.range((id.clone(), String::new())..).take_while(|((r, _), _)| *r == id).map(|(_, h)| h.clone()).collect();
        let slots: Vec<u16> = self.quarantine.iter().filter(|(r, _)| *r == id).map(|(_, s)| *s).collect();
        let mut changes = vec![Change::DeleteRouter(id.clone())];
        changes.extend(helpers.iter().map(|h| Change::DeleteHelper { router_id: id.clone(), helper_id: h.helper.id.clone() }));
        changes.extend(slots.iter().map(|s| Change::Release { router_id: id.clone(), slot: *s }));
        if let Some(record) = self.detached.remove(&id) {
            self.store.apply(&changes, || Ok(()))?;
            self.forget(&id);
            info!(router = %record.id, "detached router removed");
            return Ok(Reply::Done {});
        }
        let Some(live) = self.routers.remove(&id) else {
            return Err(ApiError::not_found("router", &id));
        };
        let index = live.attachment.index;
        // Revoke first: flows stop the moment the maps change, before the
        // programs and glue go away.
        for h in &helpers {
            let _ = revoke_record(&mut self.datapath, index, h);
        }
        let result = self.store.apply(&changes, || Ok(()));
        for slot in helpers.iter().map(|h| h.slot).chain(slots) {
            self.datapath.forget_slot(index, slot);
        }
        self.take_down(&live.record, live.attachment);
        self.forget(&id);
        result?;
        info!(router = %id, "router removed");
        Ok(Reply::Done {})
    }

    fn forget(&mut self, router: &str) {
        self.helpers.retain(|(r, _), _| r != router);
        self.quarantine.retain(|(r, _)| r != router);
    }

    fn live_router(&self, id: &str) -> Result<(String, u32), ApiError> {
        let id = validate::uuid("router_id", id)?;
        match self.routers.get(&id) {
            Some(r) => Ok((id, r.attachment.index)),
            None if self.detached.contains_key(&id) => {
                Err(ApiError::new(ErrorCode::Kernel, format!("router {id} is not attached (its namespace is missing)")))
            }
            None => Err(ApiError::not_found("router", &id)),
        }
    }

    /// Helpers are addressed by (router, id): a helper of another router is
    /// "not found", exactly like an id that does not exist.
    fn find_helper(&self, router: &str, helper: &str) -> Result<(u32, (String, String)), ApiError> {
        let (router, index) = self.live_router(router)?;
        let helper = validate::uuid("helper_id", helper).map_err(|_| ApiError::not_found("helper", helper))?;
        let key = (router, helper);
        if !self.helpers.contains_key(&key) {
            return Err(ApiError::not_found("helper", &key.1));
        }
        Ok((index, key))
    }

    fn check_tuple_free(&self, router: &str, protocol: crate::api::Protocol, port: u16, except: Option<&str>) -> Result<(), ApiError> {
        let clash = self
            .helpers
            .range((router.to_string(), String::new())..)
            .take_while(|((r, _), _)| r == router)
            .find(|((_, id), h)| Some(id.as_str()) != except && h.helper.protocol == protocol && h.helper.port == port);
        match clash {
            Some((_, h)) => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("router {router} already has helper {} on {protocol}/{port} ({})", h.helper.id, h.helper.helper),
            )),
            None => Ok(()),
        }
    }

    /// The lowest slot neither in use nor quarantined on this router.
    fn free_slot(&self, router: &str) -> Result<u16, ApiError> {
        let used: BTreeSet<u16> = self
            .helpers
            .range((router.to_string(), String::new())..)
            .take_while(|((r, _), _)| r == router)
            .map(|(_, h)| h.slot)
            .chain(self.quarantine.iter().filter(|(r, _)| r == router).map(|(_, s)| *s))
            .collect();
        (1..=self.config.max_slot())
            .find(|s| !used.contains(s))
            .ok_or_else(|| ApiError::new(ErrorCode::Exhausted, format!("router {router} has no free rule slot")))
    }

    fn helper_create(
        &mut self,
        router: &str,
        protocol: &str,
        port: i64,
        helper: &str,
        id: Option<String>,
        project: Option<String>,
    ) -> Result<Reply, ApiError> {
        let (router, index) = self.live_router(router)?;
        let protocol = validate::protocol(protocol)?;
        let port = validate::port(port)?;
        let kind = validate::helper(helper, protocol)?;
        let id = match id {
            Some(id) => validate::uuid("id", &id)?,
            None => uuid::Uuid::new_v4().to_string(),
        };
        let project = match project {
            Some(p) => validate::project(&p)?,
            None => self.routers[&router].record.project_id.clone(),
        };
        if self.helpers.keys().any(|(_, h)| *h == id) {
            return Err(ApiError::new(ErrorCode::Conflict, format!("helper id {id} is already in use")));
        }
        self.check_tuple_free(&router, protocol, port, None)?;
        let slot = self.free_slot(&router)?;
        let record = HelperRecord {
            helper: Helper { id: id.clone(), router_id: router.clone(), project_id: project, protocol, port, helper: kind.name.to_string() },
            slot,
        };
        let datapath = &mut self.datapath;
        let result = self.store.apply(&[Change::PutHelper(record.clone())], || {
            datapath.allow(index, protocol.number(), port, kind.id, slot)
        });
        if let Err(e) = result {
            if matches!(e, ApplyError::Commit(_) | ApplyError::Kernel(_)) {
                let _ = self.datapath.revoke(index, protocol.number(), port, slot);
                self.datapath.forget_slot(index, slot);
            }
            return Err(e.into());
        }
        info!(router = %router, helper = %id, "{protocol}/{port} -> {} (slot {slot})", kind.name);
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
    ) -> Result<Reply, ApiError> {
        let (index, key) = self.find_helper(router, helper)?;
        let old = self.helpers[&key].clone();
        let protocol = match protocol {
            Some(p) => validate::protocol(&p)?,
            None => old.helper.protocol,
        };
        let port = match port {
            Some(p) => validate::port(p)?,
            None => old.helper.port,
        };
        let kind = validate::helper(name.as_deref().unwrap_or(&old.helper.helper), protocol)?;
        if (protocol, port, kind.name) == (old.helper.protocol, old.helper.port, old.helper.helper.as_str()) {
            return Ok(Reply::Helper(old.helper));
        }
        self.check_tuple_free(&key.0, protocol, port, Some(&key.1))?;
        // A new slot: the old tuple's flows are revoked, not carried over.
        let slot = self.free_slot(&key.0)?;
        let new = HelperRecord {
            helper: Helper { protocol, port, helper: kind.name.to_string(), ..old.helper.clone() },
            slot,
        };
        let changes = [Change::PutHelper(new.clone()), Change::Quarantine { router_id: key.0.clone(), slot: old.slot }];
        let datapath = &mut self.datapath;
        let result = self.store.apply(&changes, || {
            revoke_record(datapath, index, &old)?;
            allow_record(datapath, index, &new, kind)
        });
        if let Err(e) = result {
            // Put the old rule back as it was.
            let _ = revoke_record(&mut self.datapath, index, &new);
            self.datapath.forget_slot(index, new.slot);
            if let Ok(old_kind) = kind_of(&old.helper) {
                let _ = allow_record(&mut self.datapath, index, &old, old_kind);
            }
            return Err(e.into());
        }
        info!(router = %key.0, helper = %key.1, "updated to {protocol}/{port} -> {} (slot {slot}, slot {} revoked)", kind.name, old.slot);
        self.quarantine.insert((key.0.clone(), old.slot));
        self.helpers.insert(key, new.clone());
        Ok(Reply::Helper(new.helper))
    }

    fn helper_delete(&mut self, router: &str, helper: &str) -> Result<Reply, ApiError> {
        let (index, key) = self.find_helper(router, helper)?;
        let old = self.helpers[&key].clone();
        let changes = [
            Change::DeleteHelper { router_id: key.0.clone(), helper_id: key.1.clone() },
            Change::Quarantine { router_id: key.0.clone(), slot: old.slot },
        ];
        let datapath = &mut self.datapath;
        let result = self.store.apply(&changes, || revoke_record(datapath, index, &old));
        if let Err(e) = result {
            if let Ok(kind) = kind_of(&old.helper) {
                let _ = allow_record(&mut self.datapath, index, &old, kind);
            }
            return Err(e.into());
        }
        info!(router = %key.0, helper = %key.1, "deleted; slot {} revoked", old.slot);
        self.quarantine.insert((key.0.clone(), old.slot));
        self.helpers.remove(&key);
        Ok(Reply::Done {})
    }

    fn helper_list(&self, router: Option<String>) -> Result<Reply, ApiError> {
        let router = match router {
            Some(r) => {
                let id = validate::uuid("router_id", &r)?;
                if !self.routers.contains_key(&id) && !self.detached.contains_key(&id) {
                    return Err(ApiError::not_found("router", &id));
                }
                Some(id)
            }
            None => None,
        };
        Ok(Reply::Helpers(
            self.helpers
                .iter()
                .filter(|((r, _), _)| router.as_ref().is_none_or(|want| want == r))
                .map(|(_, h)| h.helper.clone())
                .collect(),
        ))
    }
}

/// Every router interface holds two link descriptors: lift the soft limit
/// to the hard one so thousands of routers fit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            warn!("raising the open files limit: {e}");
        }
    }
}

/// Installs the glue and attaches the programs of a router.
fn bring_up(datapath: &mut Datapath, record: &RouterRecord) -> Result<Attachment> {
    let path = netns::path(&record.netns);
    glue::install(&path, &datapath.layout())?;
    let id = uuid::Uuid::parse_str(&record.id)?;
    datapath.attach_router(&path, record.index, id).inspect_err(|_| {
        let _ = glue::remove(&path);
    })
}

fn kind_of(h: &Helper) -> Result<&'static HelperKind> {
    crate::catalogue::by_name(&h.helper).with_context(|| format!("helper {} is not in the catalogue", h.helper))
}

fn allow_record(dp: &mut Datapath, router: u32, h: &HelperRecord, kind: &HelperKind) -> Result<()> {
    dp.allow(router, h.helper.protocol.number(), h.helper.port, kind.id, h.slot)
}

fn revoke_record(dp: &mut Datapath, router: u32, h: &HelperRecord) -> Result<()> {
    dp.revoke(router, h.helper.protocol.number(), h.helper.port, h.slot)
}

/// Serves the API on `socket` until SIGTERM or SIGINT.
pub async fn serve(daemon: Daemon, socket: &Path) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        // A socket left by a previous daemon; refuse if one still answers.
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            anyhow::bail!("another daemon is serving {}", socket.display());
        }
        std::fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    info!(socket = %socket.display(), "serving");
    let daemon = Arc::new(Mutex::new(daemon));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, daemon).await {
                        warn!("connection: {e:#}");
                    }
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("stopping");
    let _ = std::fs::remove_file(socket);
    Ok(())
}

async fn connection(stream: UnixStream, daemon: Arc<Mutex<Daemon>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(MAX_REQUEST_BYTES as u64 + 1);
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_REQUEST_BYTES {
            Response::Error(ApiError::new(ErrorCode::BadRequest, format!("request larger than {MAX_REQUEST_BYTES} bytes")))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let daemon = daemon.clone();
                    tokio::task::spawn_blocking(move || {
                        let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
                        d.handle(req)
                    })
                    .await
                    .map_err(|e| ApiError::internal(e))
                    .and_then(|r| r)
                    .into()
                }
                Err(e) => Response::Error(ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}"))),
            }
        };
        let mut text = serde_json::to_vec(&response)?;
        text.push(b'\n');
        write.write_all(&text).await?;
        if line.len() > MAX_REQUEST_BYTES {
            return Ok(());
        }
    }
}
