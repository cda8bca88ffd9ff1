//! The desired state, in an embedded ACID store (redb) in the state
//! directory. A change is written in one transaction that commits only after
//! the kernel step succeeded. The records on disk are `schema`'s, not the
//! API's.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Context, Result};
use redb::{Database, ReadableTable};

use crate::api::{Helper, Owner};

mod schema;

use schema::{AUDIT_JOURNAL, HELPERS, QUARANTINE, ROUTERS, StoredHelper, StoredRouter};
pub use schema::VERSION as SCHEMA_VERSION;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterRecord {
    pub id: String,
    /// The router's index in the kernel maps (`RuleKey::router`).
    pub index: u32,
    pub project_id: String,
    pub netns: String,
    pub owner: Owner,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperRecord {
    pub helper: Helper,
    pub slot: u16,
}

/// A change to the store, naming the daemon's own records: it is encoded
/// when applied, never copied.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    PutRouter(&'a RouterRecord),
    DeleteRouter(&'a str),
    PutHelper(&'a HelperRecord),
    DeleteHelper { router_id: &'a str, helper_id: &'a str },
    Quarantine { router_id: &'a str, slot: u16 },
    Release { router_id: &'a str, slot: u16 },
}

#[derive(Debug, Default, Clone)]
pub struct State {
    pub routers: BTreeMap<String, RouterRecord>,
    /// Keyed by (router id, helper id).
    pub helpers: BTreeMap<(String, String), HelperRecord>,
    pub quarantine: BTreeSet<(String, u16)>,
}

pub struct Store {
    /// None after a failed commit, until opened again: redb refuses all
    /// further use of a database after an I/O error (a full disk, say).
    db: Option<Database>,
    path: std::path::PathBuf,
    /// The open group transaction, if any (see [`Store::begin_group`]).
    group: Option<Group>,
}

/// A transaction shared by many changes, committed once. The changes are
/// written into it at the commit, all at once (each table opened once).
struct Group {
    txn: redb::WriteTransaction,
    pending: Vec<Row>,
    /// Audit lines to journal with the changes (see `Store::journal`),
    /// framed as their row holds them, and the last seq among them.
    journal: Vec<u8>,
    last: Option<u64>,
    /// Journal rows up to this seq are in the synced audit log.
    synced: u64,
}

/// Sets `mode` on `path` (the daemon's own files: never wider).
pub fn private(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

/// Replaces the file at `path` with `bytes` (mode 0600): written aside and
/// renamed over it, so a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("new");
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// redb's page cache: everything is read once at start and kept in the
/// daemon's own memory, so the cache serves only writes; redb's default
/// (1 GiB) would let it grow with every page a long run touches.
const CACHE_BYTES: usize = 16 << 20;

fn open_db(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

fn helper_key(router: &str, helper: &str) -> String {
    format!("{router}/{helper}")
}

fn slot_key(router: &str, slot: u16) -> String {
    format!("{router}/{slot}")
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
        // Whatever the umask: the state is the daemon's alone.
        private(dir, 0o700)?;
        let path = dir.join("enforcer.redb");
        let db = open_db(&path).with_context(|| format!("opening store {}", path.display()))?;
        private(&path, 0o600)?;
        let txn = db.begin_write()?;
        let found = schema::upgrade(&txn)?;
        txn.commit()?;
        if let Some(from) = found.filter(|v| *v < SCHEMA_VERSION) {
            tracing::info!(from, to = SCHEMA_VERSION, "store schema upgraded");
        }
        Ok(Self { db: Some(db), path, group: None })
    }

    /// The database, opened again first if a commit failed.
    fn db(&mut self) -> Result<&Database> {
        if self.db.is_none() {
            self.group = None;
            let db = open_db(&self.path).with_context(|| format!("opening store {} again after a failed commit", self.path.display()))?;
            self.db = Some(db);
        }
        self.db.as_ref().context("store not open")
    }

    pub fn load(&mut self) -> Result<State> {
        let txn = self.db()?.begin_read()?;
        let mut state = State::default();
        for row in txn.open_table(ROUTERS)?.iter()? {
            let (_, v) = row?;
            let r = schema::router(v.value())?;
            state.routers.insert(r.id.clone(), r);
        }
        for row in txn.open_table(HELPERS)?.iter()? {
            let (_, v) = row?;
            let h = schema::helper(v.value())?;
            state.helpers.insert((h.helper.router_id.clone(), h.helper.id.clone()), h);
        }
        for row in txn.open_table(QUARANTINE)?.iter()? {
            let (k, _) = row?;
            let (router, slot) = k.value().rsplit_once('/').context("corrupt quarantine key")?;
            state.quarantine.insert((router.to_string(), slot.parse().context("corrupt quarantine slot")?));
        }
        Ok(state)
    }

    /// Runs `kernel` and, if it succeeded, writes `changes` and commits
    /// them in one transaction (or adds them to the open group). Whatever
    /// the error, the caller undoes the kernel step: it may have run.
    pub fn apply<T>(&mut self, changes: &[Change<'_>], kernel: impl FnOnce() -> Result<T>) -> Result<T, ApplyError> {
        self.apply_then(changes, || Ok((kernel()?, Vec::new())))
    }

    /// Like `apply`, where the kernel step also says what else to write in
    /// the same transaction (what it found out, e.g. a slot still carried).
    pub fn apply_then<'a, T>(&mut self, changes: &[Change<'_>], kernel: impl FnOnce() -> Result<(T, Vec<Change<'a>>)>) -> Result<T, ApplyError> {
        let (out, more) = kernel().map_err(ApplyError::Kernel)?;
        if let Some(group) = &mut self.group {
            let before = group.pending.len();
            if let Err(e) = encode(&mut group.pending, changes.iter().chain(&more)) {
                group.pending.truncate(before);
                return Err(ApplyError::Store(e));
            }
            return Ok(out);
        }
        let mut rows = Vec::new();
        encode(&mut rows, changes.iter().chain(&more)).map_err(ApplyError::Store)?;
        let txn = self.db().map_err(ApplyError::Store)?.begin_write().map_err(|e| ApplyError::Store(e.into()))?;
        write(&txn, &rows).map_err(ApplyError::Store)?;
        if let Err(e) = txn.commit() {
            self.db = None;
            return Err(ApplyError::Commit(e.into()));
        }
        Ok(out)
    }

    /// Opens a group: until [`Store::commit_group`], changes go into one
    /// transaction and none of them is durable. Many concurrent requests
    /// then cost one commit (one sync of the disk) between them.
    pub fn begin_group(&mut self) -> Result<(), ApplyError> {
        // One writer at a time: a group left open (a panic) would block.
        self.abandon_group();
        let txn = self.db().map_err(ApplyError::Store)?.begin_write().map_err(|e| ApplyError::Store(e.into()))?;
        self.group = Some(Group { txn, pending: Vec::new(), journal: Vec::new(), last: None, synced: 0 });
        Ok(())
    }

    /// Drops the open group, if any, keeping nothing of it. Returns whether
    /// there was one.
    pub fn abandon_group(&mut self) -> bool {
        self.group.take().is_some()
    }

    /// Journals audit lines (seq, JSON) in the open group, to be durable
    /// with its changes; rows up to `synced` (in the synced audit log) go.
    pub fn journal<'a>(&mut self, lines: impl IntoIterator<Item = (u64, &'a [u8])>, synced: u64) -> Result<()> {
        let group = self.group.as_mut().context("no group open to journal the audit lines in")?;
        for (seq, line) in lines {
            frame(&mut group.journal, seq, line)?;
            group.last = group.last.max(Some(seq));
        }
        group.synced = synced;
        Ok(())
    }

    /// The journal's rows, oldest first (for the audit log to catch up).
    pub fn journaled(&mut self) -> Result<Vec<(u64, Vec<u8>)>> {
        let txn = self.db()?.begin_read()?;
        let rows = match txn.open_table(AUDIT_JOURNAL) {
            Ok(table) => {
                let mut rows = Vec::new();
                for row in table.iter()? {
                    rows.extend(unframe(row?.1.value())?);
                }
                rows
            }
            Err(redb::TableError::TableDoesNotExist(_)) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(rows)
    }

    /// Empties the journal (the audit log has every row, synced).
    pub fn forget_journal(&mut self) -> Result<()> {
        let txn = self.db()?.begin_write()?;
        txn.delete_table(AUDIT_JOURNAL)?;
        txn.commit()?;
        Ok(())
    }

    /// Commits the open group: all of its changes are durable, or (an error,
    /// such as a full disk that only shows at the sync) none is.
    pub fn commit_group(&mut self) -> Result<(), ApplyError> {
        let Some(group) = self.group.take() else { return Ok(()) };
        if let Err(e) = write(&group.txn, &group.pending).and_then(|()| journal(&group.txn, &group.journal, group.last, group.synced)) {
            let _ = group.txn.abort();
            return Err(ApplyError::Store(e));
        }
        group.txn.commit().map_err(|e| {
            self.db = None;
            ApplyError::Commit(e.into())
        })
    }

}

/// A change as the row it writes, encoded when the change is applied: a
/// group keeps these until its commit, not a copy of each change, and the
/// records are encoded from the daemon's own strings (copying a helper's
/// strings twice per create was a fifth of its allocations, `perf`).
enum Row {
    Router { key: String, value: Option<String> },
    Helper { key: String, value: Option<String> },
    Quarantine { key: String, held: bool },
}

fn encode<'a, 'b: 'a>(rows: &mut Vec<Row>, changes: impl IntoIterator<Item = &'a Change<'b>>) -> Result<()> {
    for change in changes {
        rows.push(match *change {
            Change::PutRouter(r) => Row::Router { key: r.id.clone(), value: Some(schema::encode(&StoredRouter::from(r))?) },
            Change::DeleteRouter(id) => Row::Router { key: id.to_string(), value: None },
            Change::PutHelper(h) => {
                Row::Helper { key: helper_key(&h.helper.router_id, &h.helper.id), value: Some(schema::encode(&StoredHelper::from(h))?) }
            }
            Change::DeleteHelper { router_id, helper_id } => Row::Helper { key: helper_key(router_id, helper_id), value: None },
            Change::Quarantine { router_id, slot } => Row::Quarantine { key: slot_key(router_id, slot), held: true },
            Change::Release { router_id, slot } => Row::Quarantine { key: slot_key(router_id, slot), held: false },
        });
    }
    Ok(())
}

fn write(txn: &redb::WriteTransaction, rows: &[Row]) -> Result<()> {
    let mut routers = txn.open_table(ROUTERS)?;
    let mut helpers = txn.open_table(HELPERS)?;
    let mut quarantine = txn.open_table(QUARANTINE)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for row in rows {
        match row {
            Row::Router { key, value: Some(v) } => {
                routers.insert(key.as_str(), v.as_str())?;
            }
            Row::Router { key, value: None } => {
                routers.remove(key.as_str())?;
            }
            Row::Helper { key, value: Some(v) } => {
                helpers.insert(key.as_str(), v.as_str())?;
            }
            Row::Helper { key, value: None } => {
                helpers.remove(key.as_str())?;
            }
            Row::Quarantine { key, held: true } => {
                quarantine.insert(key.as_str(), now)?;
            }
            Row::Quarantine { key, held: false } => {
                quarantine.remove(key.as_str())?;
            }
        }
    }
    Ok(())
}

/// A group's audit lines are one row, keyed by the group's last seq: one
/// insert per commit, not one per line (each row of a B-tree costs its
/// pages again at every commit that touches them). The value frames each
/// line as seq (u64), length (u32), bytes, all little-endian.
fn journal(txn: &redb::WriteTransaction, row: &[u8], last: Option<u64>, synced: u64) -> Result<()> {
    let mut table = txn.open_table(AUDIT_JOURNAL)?;
    // Rows the synced log holds, oldest first.
    while table.first()?.is_some_and(|(k, _)| k.value() <= synced) {
        table.pop_first()?;
    }
    let Some(last) = last else { return Ok(()) };
    table.insert(last, row)?;
    Ok(())
}

/// Appends one line to a journal row.
fn frame(row: &mut Vec<u8>, seq: u64, line: &[u8]) -> Result<()> {
    row.extend_from_slice(&seq.to_le_bytes());
    row.extend_from_slice(&u32::try_from(line.len())?.to_le_bytes());
    row.extend_from_slice(line);
    Ok(())
}

/// The (seq, line) pairs of a journal row.
fn unframe(mut row: &[u8]) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    while !row.is_empty() {
        let (head, rest) = row.split_at_checked(12).context("corrupt audit journal row")?;
        let seq = u64::from_le_bytes(head[..8].try_into()?);
        let len = u32::from_le_bytes(head[8..].try_into()?) as usize;
        let (line, rest) = rest.split_at_checked(len).context("corrupt audit journal row")?;
        out.push((seq, line.to_vec()));
        row = rest;
    }
    Ok(out)
}

/// Why a change was not applied (its kernel step may have run).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("store: {0:#}")]
    Store(anyhow::Error),
    #[error("{0:#}")]
    Kernel(anyhow::Error),
    #[error("store commit: {0:#}")]
    Commit(anyhow::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Protocol;

    fn helper(router: &str, id: &str, slot: u16) -> HelperRecord {
        HelperRecord {
            helper: Helper {
                id: id.into(),
                router_id: router.into(),
                project_id: "p".into(),
                protocol: Protocol::Tcp,
                port: 21,
                helper: "ftp".into(),
            },
            slot,
        }
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("enforcer-store-{}-{}", std::process::id(), uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn changes_survive_reopen() {
        let dir = tempdir();
        {
            let mut store = Store::open(&dir).unwrap();
            let r = RouterRecord { id: "r".into(), index: 1, project_id: "p".into(), netns: "n".into(), owner: Default::default() };
            store
                .apply(&[Change::PutRouter(&r), Change::PutHelper(&helper("r", "h", 3)), Change::Quarantine { router_id: "r", slot: 2 }], || Ok(()))
                .unwrap();
        }
        let state = Store::open(&dir).unwrap().load().unwrap();
        assert_eq!(state.routers.len(), 1);
        assert_eq!(state.helpers[&("r".to_string(), "h".to_string())].slot, 3);
        assert!(state.quarantine.contains(&("r".to_string(), 2)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A store as the release before schema versions wrote it, through its
    /// CLI: router 0b7c2a5e-… (local, so its record has no `owner`) with
    /// ftp on tcp/21, sip on udp/5060 and tftp on udp/69 (project
    /// other-project).
    fn store_of_version_1() -> std::path::PathBuf {
        let dir = tempdir();
        let packed = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/store-v1.redb.gz")).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&packed[..]), &mut bytes).unwrap();
        std::fs::write(dir.join("enforcer.redb"), bytes).unwrap();
        dir
    }

    fn recorded_version(dir: &Path) -> Option<u64> {
        let db = Database::open(dir.join("enforcer.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        txn.open_table(meta).ok()?.get("schema").unwrap().map(|v| v.value())
    }

    #[test]
    fn a_store_of_the_previous_release_is_upgraded_and_keeps_everything() {
        let dir = store_of_version_1();
        assert_eq!(recorded_version(&dir), None);
        let state = Store::open(&dir).unwrap().load().unwrap();
        assert_eq!(recorded_version(&dir), Some(SCHEMA_VERSION));
        let router = &state.routers["0b7c2a5e-5d7e-4b8e-9d0a-3f1e2d4c5b6a"];
        assert_eq!((router.index, router.netns.as_str(), router.owner), (1, "qrouter-fx-11111111", Owner::Local));
        let mut helpers: Vec<_> = state.helpers.values().map(|h| (h.helper.port, h.helper.protocol, h.helper.helper.as_str(), h.helper.project_id.as_str(), h.slot)).collect();
        helpers.sort();
        assert_eq!(helpers, [(21, Protocol::Tcp, "ftp", "default", 1), (69, Protocol::Udp, "tftp", "other-project", 2), (5060, Protocol::Udp, "sip", "default", 3)]);
        // Opened again: already current, the same state.
        let again = Store::open(&dir).unwrap().load().unwrap();
        assert_eq!((again.routers, again.helpers), (state.routers, state.helpers));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_store_of_a_later_release_is_refused_and_left_as_it_is() {
        let dir = tempdir();
        Store::open(&dir).unwrap();
        {
            let db = Database::open(dir.join("enforcer.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(redb::TableDefinition::<&str, u64>::new("meta")).unwrap().insert("schema", SCHEMA_VERSION + 1).unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(err.contains(&format!("schema version {}", SCHEMA_VERSION + 1)) && err.contains("later release"), "{err}");
        assert_eq!(recorded_version(&dir), Some(SCHEMA_VERSION + 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn failed_kernel_step_changes_nothing() {
        let dir = tempdir();
        let mut store = Store::open(&dir).unwrap();
        let err = store
            .apply(&[Change::PutHelper(&helper("r", "h", 1))], || -> Result<()> { anyhow::bail!("no") })
            .unwrap_err();
        assert!(matches!(err, ApplyError::Kernel(_)));
        assert!(store.load().unwrap().helpers.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_group_is_durable_only_once_committed_and_all_or_nothing() {
        let dir = tempdir();
        let mut store = Store::open(&dir).unwrap();
        store.begin_group().unwrap();
        store.apply(&[Change::PutHelper(&helper("r", "a", 1))], || Ok(())).unwrap();
        store.apply(&[Change::PutHelper(&helper("r", "b", 2))], || Ok(())).unwrap();
        // A change whose kernel step failed is not in the group.
        store.apply(&[Change::PutHelper(&helper("r", "c", 3))], || -> Result<()> { anyhow::bail!("no") }).unwrap_err();
        assert!(store.load().unwrap().helpers.is_empty(), "nothing is visible before the commit");
        store.commit_group().unwrap();
        let helpers = store.load().unwrap().helpers;
        assert_eq!(helpers.keys().map(|(_, h)| h.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        // An abandoned group keeps nothing.
        store.begin_group().unwrap();
        store.apply(&[Change::DeleteHelper { router_id: "r", helper_id: "a" }], || Ok(())).unwrap();
        store.apply(&[Change::PutHelper(&helper("r", "d", 4))], || Ok(())).unwrap();
        assert!(store.abandon_group());
        assert_eq!(store.load().unwrap().helpers.len(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn audit_lines_are_journaled_with_their_group_and_go_once_synced() {
        let dir = tempdir();
        let mut store = Store::open(&dir).unwrap();
        assert!(store.journal([(1, &b"x"[..])], 0).is_err(), "only inside a group");
        assert!(store.journaled().unwrap().is_empty());
        store.begin_group().unwrap();
        store.apply(&[Change::PutHelper(&helper("r", "a", 1))], || Ok(())).unwrap();
        store.journal([(1, &b"one"[..]), (2, &b"two"[..])], 0).unwrap();
        store.commit_group().unwrap();
        assert_eq!(store.journaled().unwrap(), [(1, b"one".to_vec()), (2, b"two".to_vec())]);
        // A failed group journals nothing.
        store.begin_group().unwrap();
        store.journal([(3, &b"three"[..])], 2).unwrap();
        assert!(store.abandon_group());
        assert_eq!(store.journaled().unwrap().len(), 2);
        // A group's row goes once the synced log holds all of its lines.
        store.begin_group().unwrap();
        store.journal([(3, &b"three"[..])], 1).unwrap();
        store.commit_group().unwrap();
        assert_eq!(store.journaled().unwrap().len(), 3, "line 2 is not synced yet");
        store.begin_group().unwrap();
        store.journal([(4, &b"four"[..])], 2).unwrap();
        store.commit_group().unwrap();
        assert_eq!(store.journaled().unwrap(), [(3, b"three".to_vec()), (4, b"four".to_vec())]);
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.journaled().unwrap().len(), 2, "durable");
        store.forget_journal().unwrap();
        assert!(store.journaled().unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

