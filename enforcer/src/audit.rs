//! The audit trail: one JSON line per mutation and per refused request,
//! appended to `audit.jsonl` in the state directory (opened append-only,
//! never rewritten) and emitted through the daemon's log.
//!
//! Its size is bounded: past `max_bytes` the file becomes `audit.jsonl.1`
//! (replacing the one before) and a new one starts. Refused requests are
//! rate-limited per uid before they cost a write and an fsync; what the
//! limit holds back is summed up in one entry per uid and second.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::api::{ApiError, AuditEntry, Caller, Event};


const FILE: &str = "audit.jsonl";

impl AuditEntry {
    /// An entry for what the daemon did on its own (a repair, a
    /// revocation's flush, a notice to a subscriber): caller the daemon,
    /// result `ok` unless `error` says otherwise (`failed` names its result).
    pub fn by_daemon(op: &str, router_id: Option<&str>, before: Option<Value>, after: Value, error: Option<(&str, ApiError)>) -> Self {
        Self {
            time: Audit::now(),
            caller: Caller::daemon(),
            origin: crate::api::Owner::Local,
            op: op.to_string(),
            router_id: router_id.map(str::to_string),
            helper_id: None,
            before,
            after: Some(after),
            result: error.as_ref().map_or("ok", |(failed, _)| *failed).to_string(),
            error: error.map(|(_, e)| e),
        }
    }
}


/// Events a subscriber may fall behind by before it is told it lagged.
const EVENT_BACKLOG: usize = 4096;

/// Bounds of the audit trail.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditLimits {
    /// Size at which the file is rotated (two files are kept).
    pub max_bytes: u64,
    /// Refused requests written per uid and second, after a burst.
    pub refusals_per_sec: f64,
    pub refusal_burst: f64,
}

impl Default for AuditLimits {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, refusals_per_sec: 10.0, refusal_burst: 50.0 }
    }
}

/// One uid's allowance of written refusals (a token bucket), and what it
/// held back since the last summary.
struct Allowance {
    tokens: f64,
    at: Instant,
    held_back: u64,
    caller: Option<Caller>,
}

pub struct Audit {
    path: PathBuf,
    file: File,
    size: u64,
    limits: AuditLimits,
    refusals: HashMap<u32, Allowance>,
    /// Subscribers of `enforcer events`.
    events: tokio::sync::broadcast::Sender<Event>,
}

impl Audit {
    pub fn open(state_dir: &Path, limits: AuditLimits) -> Result<Self> {
        let path = state_dir.join(FILE);
        let file = Self::open_file(&path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (events, _) = tokio::sync::broadcast::channel(EVENT_BACKLOG);
        Ok(Self { path, file, size, limits, refusals: HashMap::new(), events })
    }

    fn open_file(path: &Path) -> Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening the audit log {}", path.display()))?;
        // Also a log made by an earlier version under a looser umask.
        crate::store::private(path, 0o600)?;
        Ok(file)
    }

    pub fn now() -> String {
        humantime::format_rfc3339_micros(SystemTime::now()).to_string()
    }

    /// Appends one entry and syncs. A refusal beyond its uid's allowance is
    /// only counted.
    pub fn record(&mut self, entry: &AuditEntry) -> Result<()> {
        if entry.result != "ok" && !self.allow_refusal(&entry.caller) {
            return Ok(());
        }
        self.write(entry)
    }

    /// Appends the entries of a group of requests, then syncs once: their
    /// changes were committed together.
    pub fn record_all(&mut self, entries: &[AuditEntry]) -> Result<()> {
        let mut written = Vec::with_capacity(entries.len());
        for entry in entries {
            if entry.result == "ok" || self.allow_refusal(&entry.caller) {
                self.append(entry)?;
                written.push(entry);
            }
        }
        self.sync()?;
        for entry in written {
            self.announce(Event::of(entry));
        }
        Ok(())
    }

    fn write(&mut self, entry: &AuditEntry) -> Result<()> {
        self.append(entry)?;
        self.sync()?;
        self.announce(Event::of(entry));
        Ok(())
    }

    /// A stream of the events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Tells the subscribers, if any (costs nothing without one).
    pub fn announce(&self, event: Event) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync_data().context("syncing the audit log")
    }

    /// One write of one line, so lines never interleave.
    fn append(&mut self, entry: &AuditEntry) -> Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        tracing::info!(target: "audit", "{}", String::from_utf8_lossy(&line));
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.limits.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&line).context("writing the audit log")?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        std::fs::rename(&self.path, rotated(&self.path)).context("rotating the audit log")?;
        self.file = Self::open_file(&self.path)?;
        self.size = 0;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).context("syncing the state directory")?;
        }
        Ok(())
    }

    fn allow_refusal(&mut self, caller: &Caller) -> bool {
        let limits = self.limits;
        let a = self.refusals.entry(caller.uid).or_insert_with(|| Allowance { tokens: limits.refusal_burst, at: Instant::now(), held_back: 0, caller: None });
        let now = Instant::now();
        a.tokens = (a.tokens + now.duration_since(a.at).as_secs_f64() * limits.refusals_per_sec).min(limits.refusal_burst);
        a.at = now;
        if a.tokens >= 1.0 {
            a.tokens -= 1.0;
            return true;
        }
        a.held_back += 1;
        a.caller.get_or_insert_with(|| caller.clone());
        false
    }

    /// Writes one summary entry per uid whose refusals were held back, and
    /// forgets uids whose allowance is full again. Called every second.
    pub fn summarize_refusals(&mut self) -> Result<()> {
        let mut summaries = Vec::new();
        for a in self.refusals.values_mut() {
            if a.held_back > 0 {
                let caller = a.caller.take().unwrap_or(Caller { uid: 0, gid: 0, pid: None, groups: Vec::new() });
                summaries.push((caller, std::mem::take(&mut a.held_back)));
            }
        }
        let limits = self.limits;
        self.refusals.retain(|_, a| a.tokens + a.at.elapsed().as_secs_f64() * limits.refusals_per_sec < limits.refusal_burst);
        for (caller, n) in summaries {
            self.write(&AuditEntry {
                time: Self::now(),
                caller,
                origin: Default::default(),
                op: "refusals_held_back".to_string(),
                router_id: None,
                helper_id: None,
                before: None,
                after: Some(serde_json::json!({ "refused_requests": n })),
                result: "rate_limited".to_string(),
                error: None,
            })?;
        }
        Ok(())
    }

    /// Entries at or after `since`, oldest first (see [`read`]).
    pub fn read(&self, since: Option<SystemTime>) -> Result<Vec<AuditEntry>> {
        read(self.path.parent().unwrap_or(Path::new(".")), since)
    }
}

/// The entries of the audit log in `state_dir` at or after `since`, oldest
/// first. With `since`, files are read from their end and only as far back
/// as needed. Needs no [`Audit`]: readers do not wait for the writer.
pub fn read(state_dir: &Path, since: Option<SystemTime>) -> Result<Vec<AuditEntry>> {
    let path = state_dir.join(FILE);
    let files = [rotated(&path), path];
    {
        let Some(since) = since else {
            let mut out = Vec::new();
            for path in files.iter().filter(|p| p.exists()) {
                let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
                for line in BufReader::new(file).lines() {
                    if let Ok(entry) = serde_json::from_str::<AuditEntry>(&line?) {
                        out.push(entry);
                    }
                }
            }
            return Ok(out);
        };
        let mut newest_first = Vec::new();
        for path in files.iter().rev().filter(|p| p.exists()) {
            if !read_back(path, since, &mut newest_first)? {
                break;
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }
}

fn rotated(path: &Path) -> PathBuf {
    path.with_extension("jsonl.1")
}

/// Adds the entries of `path` at or after `since` to `out`, newest first,
/// reading the file backwards in chunks. Returns whether every entry of
/// the file was that recent (older files may hold more).
fn read_back(path: &Path, since: SystemTime, out: &mut Vec<AuditEntry>) -> Result<bool> {
    const CHUNK: u64 = 64 * 1024;
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut pos = file.metadata()?.len();
    // The start of a line cut by the chunk before (read later in the file).
    let mut tail: Vec<u8> = Vec::new();
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        buf.extend_from_slice(&tail);
        // Unless at the file's start, the first line may be cut.
        let cut = if start > 0 { buf.iter().position(|b| *b == b'\n').map_or(buf.len(), |i| i + 1) } else { 0 };
        tail = buf[..cut].to_vec();
        for line in buf[cut..].split(|b| *b == b'\n').rev().filter(|l| !l.is_empty()) {
            let Ok(entry) = serde_json::from_slice::<AuditEntry>(line) else { continue };
            if humantime::parse_rfc3339_weak(&entry.time).is_ok_and(|at| at < since) {
                return Ok(false);
            }
            out.push(entry);
        }
        pos = start;
    }
    Ok(true)
}

/// `--since`: an RFC 3339 time, or a duration ago (`90s`, `15m`, `2h`, `1d`).
pub fn parse_since(value: &str) -> Result<SystemTime, ApiError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(value) {
        return Ok(t);
    }
    humantime::parse_duration(value)
        .ok()
        .and_then(|d| SystemTime::now().checked_sub(d))
        .ok_or_else(|| ApiError::invalid("since", format!("since {value:?}: give an RFC 3339 time (2026-11-24T10:00:00Z) or a duration ago (15m, 2h)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_append_and_filter_by_time() {
        let dir = std::env::temp_dir().join(format!("enforcer-audit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut audit = Audit::open(&dir, AuditLimits::default()).unwrap();
        let caller = Caller { uid: 1, gid: 2, pid: Some(3), groups: vec![4] };
        let old = AuditEntry {
            time: "2020-01-01T00:00:00Z".into(),
            caller,
            origin: Default::default(),
            op: "helper_delete".into(),
            router_id: None,
            helper_id: None,
            before: None,
            after: None,
            result: "ok".into(),
            error: None,
        };
        audit.record(&old).unwrap();
        let new = AuditEntry { time: Audit::now(), ..old.clone() };
        audit.record(&new).unwrap();
        drop(audit);
        let audit = Audit::open(&dir, AuditLimits::default()).unwrap();
        assert_eq!(audit.read(None).unwrap(), vec![old, new.clone()]);
        assert_eq!(audit.read(Some(parse_since("1h").unwrap())).unwrap(), vec![new]);
        assert!(parse_since("yesterday-ish").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn entry(time: &str, result: &str, uid: u32) -> AuditEntry {
        AuditEntry {
            time: time.into(),
            caller: Caller { uid, gid: 0, pid: None, groups: vec![] },
            origin: Default::default(),
            op: "helper_create".into(),
            router_id: Some("r".repeat(100)),
            helper_id: None,
            before: None,
            after: None,
            result: result.into(),
            error: None,
        }
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("enforcer-audit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_log_rotates_at_its_bound_and_since_reads_back_across_files() {
        let dir = scratch();
        let limits = AuditLimits { max_bytes: 8192, ..AuditLimits::default() };
        let mut audit = Audit::open(&dir, limits).unwrap();
        // 200 entries of about 230 bytes, one second apart.
        let base = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let at = |i: u64| humantime::format_rfc3339(base + std::time::Duration::from_secs(i)).to_string();
        for i in 0..200 {
            audit.record(&entry(&at(i), "ok", 0)).unwrap();
        }
        let on_disk: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(on_disk <= 2 * 8192, "{on_disk} bytes kept");
        assert!(dir.join("audit.jsonl.1").exists());
        // What is kept: the newest entries, in order.
        let all = audit.read(None).unwrap();
        assert!(all.len() > 30 && all.len() < 80, "{}", all.len());
        assert_eq!(all.last().unwrap().time, at(199));
        // Since a time inside the rotated file: read back across both.
        let first_kept = humantime::parse_rfc3339(&all[0].time).unwrap();
        let since = first_kept + std::time::Duration::from_secs(3);
        let recent = audit.read(Some(since)).unwrap();
        assert_eq!(recent.len(), all.len() - 3);
        assert_eq!(recent, all[3..]);
        // Since the newest: one entry, without reading the rest.
        assert_eq!(audit.read(Some(humantime::parse_rfc3339(&at(199)).unwrap())).unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refusals_past_their_uids_allowance_are_summed_up_not_written() {
        let dir = scratch();
        let limits = AuditLimits { refusals_per_sec: 1.0, refusal_burst: 5.0, ..AuditLimits::default() };
        let mut audit = Audit::open(&dir, limits).unwrap();
        for _ in 0..1000 {
            audit.record(&entry(&Audit::now(), "permission_denied", 2009)).unwrap();
        }
        // Another uid has its own allowance, and changes are never held back.
        audit.record(&entry(&Audit::now(), "permission_denied", 2001)).unwrap();
        for _ in 0..10 {
            audit.record(&entry(&Audit::now(), "ok", 2009)).unwrap();
        }
        audit.summarize_refusals().unwrap();
        let all = audit.read(None).unwrap();
        let refused = all.iter().filter(|e| e.result == "permission_denied").count();
        assert_eq!(refused, 6, "five of uid 2009 (burst), one of uid 2001");
        assert_eq!(all.iter().filter(|e| e.result == "ok").count(), 10);
        let summary: Vec<_> = all.iter().filter(|e| e.op == "refusals_held_back").collect();
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].caller.uid, 2009);
        assert_eq!(summary[0].after.as_ref().unwrap()["refused_requests"], 995);
        // Nothing more held back: no further summary.
        audit.summarize_refusals().unwrap();
        assert_eq!(audit.read(None).unwrap().len(), all.len());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
