//! The audit trail: one JSON line per mutation and per refused request,
//! appended to `audit.jsonl` in the state directory (opened append-only,
//! never rewritten) and emitted through the daemon's log.
//!
//! Its size is bounded: past `max_bytes` the file becomes `audit.jsonl.1`
//! (replacing the one before) and a new one starts. Refused requests are
//! rate-limited per uid before they cost a write and an fsync; what the
//! limit holds back is summed up in one entry per uid and second.
//!
//! Entries are numbered (`seq`). The entries of a group of changes are
//! journaled in the store's transaction with the changes (see `Staged`)
//! and appended here without a sync of their own: a group costs one sync of
//! the disk, not two. The log is synced every second (`sync_journal`), and
//! at open, whatever the journal holds past the log's last entry (a power
//! loss ate the unsynced tail) is appended again.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::api::{ApiError, AuditEntry, Caller, Event, Record};


/// Groups of up to this many entries are named in the log entry by entry.
const NAMED_IN_LOG: usize = 8;

/// Names entries in the daemon's log; the lines themselves (before, after,
/// error) are in the file. A bigger group (bulk or pipelining clients) is
/// one line, its entries at debug level: a line each, at 50,000 changes a
/// second, cost 6.5% of the daemon's time (perf) and flooded the journal.
fn log(entries: &[AuditEntry]) {
    let named = entries.len() <= NAMED_IN_LOG;
    for e in entries {
        let (seq, op, router, helper, result) = (e.seq, e.op.as_str(), e.router_id.as_deref(), e.helper_id.as_deref(), e.result.as_str());
        if named {
            tracing::info!(target: "audit", seq, op, router, helper, result, "audited");
        } else {
            tracing::debug!(target: "audit", seq, op, router, helper, result, "audited");
        }
    }
    if !named {
        let refused = entries.iter().filter(|e| e.result != "ok").count();
        let (first, last) = (entries.first().and_then(|e| e.seq), entries.last().and_then(|e| e.seq));
        tracing::info!(target: "audit", entries = entries.len(), first, last, refused, "audited a group (entries at debug level)");
    }
}

const FILE: &str = "audit.jsonl";

impl AuditEntry {
    /// An entry for what the daemon did on its own (a repair, a
    /// revocation's flush, a notice to a subscriber): caller the daemon,
    /// result `ok` unless `error` says otherwise (`failed` names its result).
    pub fn by_daemon(op: &str, router_id: Option<&str>, before: Option<Value>, after: Value, error: Option<(&str, ApiError)>) -> Self {
        Self {
            time: Audit::now(),
            seq: None,
            caller: Caller::daemon(),
            origin: crate::api::Owner::Local,
            op: op.to_string(),
            router_id: router_id.map(str::to_string),
            helper_id: None,
            before: before.map(Record::Json),
            after: Some(Record::Json(after)),
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
    /// The number the next entry gets.
    next_seq: u64,
    /// Entries up to this one are synced to the log: the store may forget
    /// their journal rows.
    synced: u64,
    limits: AuditLimits,
    refusals: HashMap<u32, Allowance>,
    /// Subscribers of `enforcer events`.
    events: tokio::sync::broadcast::Sender<Event>,
}

impl Audit {
    /// Opens the log in `state_dir`, first appending the rows of the
    /// store's `journal` (seq, line) that the log lacks.
    pub fn open(state_dir: &Path, limits: AuditLimits, journal: &[(u64, Vec<u8>)]) -> Result<Self> {
        let path = state_dir.join(FILE);
        let mut file = Self::open_file(&path)?;
        let last = match last_seq(&path)? {
            Some(last) => last,
            None => last_seq(&rotated(&path))?.unwrap_or(Some(0)),
        };
        // An unnumbered last entry: a release without the journal wrote
        // after it, so the journal's rows are not the log's lost tail.
        let missing: Vec<&(u64, Vec<u8>)> = match last {
            Some(last) => journal.iter().filter(|(seq, _)| *seq > last).collect(),
            None => Vec::new(),
        };
        let last = last.unwrap_or(0);
        // A line cut by a power loss is ended, so the next one is whole.
        let cut = !ends_a_line(&path)?;
        if cut {
            file.write_all(b"\n").context("writing the audit log")?;
        }
        for (_, line) in &missing {
            file.write_all(&[line.as_slice(), b"\n"].concat()).context("writing the audit log")?;
        }
        // Synced before the daemon empties the journal: rows the log has
        // may still be only in the page cache (a crash, not a power loss).
        if cut || !journal.is_empty() {
            file.sync_data().context("syncing the audit log")?;
        }
        if cut || !missing.is_empty() {
            tracing::warn!(entries = missing.len(), cut, "audit: the log's unsynced tail was lost; appended again from the store's journal");
        }
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let newest = journal.iter().map(|(seq, _)| *seq).max().unwrap_or(0).max(last);
        let (events, _) = tokio::sync::broadcast::channel(EVENT_BACKLOG);
        Ok(Self { path, file, size, next_seq: newest + 1, synced: newest, limits, refusals: HashMap::new(), events })
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
        use std::fmt::Write;
        // Its final size at once ("2026-01-02T03:04:05.123456Z").
        let mut now = String::with_capacity(27);
        let _ = write!(now, "{}", humantime::format_rfc3339_micros(SystemTime::now()));
        now
    }

    /// Appends one entry and syncs. A refusal beyond its uid's allowance is
    /// only counted.
    pub fn record(&mut self, entry: &AuditEntry) -> Result<()> {
        if entry.result != "ok" && !self.allow_refusal(&entry.caller) {
            return Ok(());
        }
        self.write(entry)
    }

    /// Numbers the entries of a group of requests (refusals past their
    /// uid's allowance only counted), for the store to journal with the
    /// group's changes; [`Audit::append`] writes them after the commit.
    pub fn stage(&mut self, entries: Vec<AuditEntry>) -> Result<Staged> {
        let mut seq = self.next_seq;
        let entries: Vec<AuditEntry> = entries
            .into_iter()
            .filter(|e| e.result == "ok" || self.allow_refusal(&e.caller))
            .map(|e| {
                seq += 1;
                AuditEntry { seq: Some(seq - 1), ..e }
            })
            .collect();
        Staged::of(entries)
    }

    /// Appends staged entries. `journaled`: the store holds them (the
    /// group committed), so the log is synced later; else now.
    pub fn append(&mut self, staged: &Staged, journaled: bool) -> Result<()> {
        // The group's lines go out in one write (one more per rotation): a
        // write per line cost each change a system call.
        log(&staged.entries);
        self.write_lines(staged)?;
        if !journaled {
            self.sync()?;
        }
        for entry in &staged.entries {
            self.announce(|| Event::of(entry));
        }
        Ok(())
    }

    fn write(&mut self, entry: &AuditEntry) -> Result<()> {
        let entry = AuditEntry { seq: Some(self.next_seq), ..entry.clone() };
        log(std::slice::from_ref(&entry));
        let staged = Staged::of(vec![entry])?;
        self.write_lines(&staged)?;
        self.sync()?;
        let entry = &staged.entries[0];
        self.announce(|| Event::of(entry));
        Ok(())
    }

    /// Syncs the entries appended without a sync, if any.
    pub fn sync_journal(&mut self) -> Result<()> {
        if self.unsynced() {
            self.sync()?;
        }
        Ok(())
    }

    /// Whether entries were appended since the last sync.
    fn unsynced(&self) -> bool {
        self.synced + 1 < self.next_seq
    }

    /// The last entry synced to the log: the store may forget its journal
    /// up to there.
    pub fn synced(&self) -> u64 {
        self.synced
    }

    /// A stream of the events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Tells the subscribers, if any; the event is made only for them (a
    /// create paid for an event nobody read).
    pub fn announce(&self, event: impl FnOnce() -> Event) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event());
        }
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync_data().context("syncing the audit log")?;
        self.synced = self.next_seq - 1;
        Ok(())
    }

    /// Writes staged lines in one write (whole lines, so they never
    /// interleave), and one more per rotation: the file is rotated before a
    /// line that would cross the limit, with the lines before it written.
    fn write_lines(&mut self, staged: &Staged) -> Result<()> {
        let mut from = 0;
        for (i, entry) in staged.entries.iter().enumerate() {
            let (start, end) = staged.span(i);
            let len = (end - start) as u64;
            if self.size > 0 && self.size + len > self.limits.max_bytes {
                self.write_out(&staged.text[from..start])?;
                from = start;
                self.rotate()?;
            }
            self.size += len;
            if let Some(seq) = entry.seq {
                self.next_seq = self.next_seq.max(seq + 1);
            }
        }
        self.write_out(&staged.text[from..])
    }

    fn write_out(&mut self, text: &[u8]) -> Result<()> {
        if !text.is_empty() {
            self.file.write_all(text).context("writing the audit log")?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        // What the journal still holds goes into the rotated file durably:
        // the replay at open looks no further back than that file.
        if self.unsynced() {
            self.sync()?;
        }
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
                seq: None,
                caller,
                origin: Default::default(),
                op: "refusals_held_back".to_string(),
                router_id: None,
                helper_id: None,
                before: None,
                after: Some(serde_json::json!({ "refused_requests": n }).into()),
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

/// The log's last entry at `path`: None if it has none, Some(None) if
/// that entry is not numbered (written by an earlier release).
fn last_seq(path: &Path) -> Result<Option<Option<u64>>> {
    let mut last = None;
    if path.exists() {
        read_back_while(path, |e| {
            last = Some(e.seq);
            false
        })?;
    }
    Ok(last)
}

/// Whether the log at `path` is empty or ends with a whole line.
fn ends_a_line(path: &Path) -> Result<bool> {
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// The entries a group of changes is audited with, numbered; see
/// [`Audit::stage`].
pub struct Staged {
    entries: Vec<AuditEntry>,
    /// The entries as JSON lines, serialized once for the journal and the
    /// log, into one buffer (a buffer per line cost each change allocations).
    text: Vec<u8>,
    /// Where each line ends, past its newline.
    ends: Vec<usize>,
}

impl Staged {
    fn of(entries: Vec<AuditEntry>) -> Result<Self> {
        let (text, ends) = Self::lines(&entries)?;
        Ok(Self { entries, text, ends })
    }

    fn lines(entries: &[AuditEntry]) -> Result<(Vec<u8>, Vec<usize>)> {
        let mut text = Vec::with_capacity(entries.len() * 1024);
        let mut ends = Vec::with_capacity(entries.len());
        for entry in entries {
            serde_json::to_writer(&mut text, entry)?;
            text.push(b'\n');
            ends.push(text.len());
        }
        Ok((text, ends))
    }

    /// Line `i`'s place in `text`, its newline included.
    fn span(&self, i: usize) -> (usize, usize) {
        (if i == 0 { 0 } else { self.ends[i - 1] }, self.ends[i])
    }

    /// (seq, line) for the store's journal, without the newlines.
    pub fn journal(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.entries.iter().enumerate().map(|(i, e)| {
            let (start, end) = self.span(i);
            (e.seq.unwrap_or_default(), &self.text[start..end - 1])
        })
    }

    /// The group's commit failed: what was to be done is recorded as not
    /// done, with the reason.
    pub fn failed(&mut self, error: &ApiError) {
        for entry in self.entries.iter_mut().filter(|e| e.result == "ok") {
            entry.result = "internal".to_string();
            entry.after = None;
            entry.error = Some(error.clone());
        }
        match Self::lines(&self.entries) {
            Ok((text, ends)) => (self.text, self.ends) = (text, ends),
            Err(e) => tracing::warn!("audit: serializing the failed group's entries again: {e}"),
        }
    }
}

/// Adds the entries of `path` at or after `since` to `out`, newest first,
/// reading the file backwards in chunks. Returns whether every entry of
/// the file was that recent (older files may hold more).
fn read_back(path: &Path, since: SystemTime, out: &mut Vec<AuditEntry>) -> Result<bool> {
    read_back_while(path, |entry| {
        if humantime::parse_rfc3339_weak(&entry.time).is_ok_and(|at| at < since) {
            return false;
        }
        out.push(entry);
        true
    })
}

/// Hands the entries of `path` to `more`, newest first, reading the file
/// backwards in chunks, while `more` asks for more. Returns whether every
/// entry was handed.
fn read_back_while(path: &Path, mut more: impl FnMut(AuditEntry) -> bool) -> Result<bool> {
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
            if !more(entry) {
                return Ok(false);
            }
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
        let mut audit = Audit::open(&dir, AuditLimits::default(), &[]).unwrap();
        let caller = Caller { uid: 1, gid: 2, pid: Some(3), groups: vec![4] };
        let old = AuditEntry {
            time: "2020-01-01T00:00:00Z".into(),
            seq: None,
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
        let audit = Audit::open(&dir, AuditLimits::default(), &[]).unwrap();
        let (old, new) = (AuditEntry { seq: Some(1), ..old }, AuditEntry { seq: Some(2), ..new });
        assert_eq!(audit.read(None).unwrap(), vec![old, new.clone()], "numbered in the order written");
        assert_eq!(audit.read(Some(parse_since("1h").unwrap())).unwrap(), vec![new]);
        assert!(parse_since("yesterday-ish").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn entry(time: &str, result: &str, uid: u32) -> AuditEntry {
        AuditEntry {
            time: time.into(),
            seq: None,
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
        let mut audit = Audit::open(&dir, limits, &[]).unwrap();
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
        let mut audit = Audit::open(&dir, limits, &[]).unwrap();
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
        assert_eq!(summary[0].after.as_ref().unwrap().to_value()["refused_requests"], 995);
        // Nothing more held back: no further summary.
        audit.summarize_refusals().unwrap();
        assert_eq!(audit.read(None).unwrap().len(), all.len());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_tail_lost_before_its_sync_comes_back_from_the_journal_once() {
        let dir = scratch();
        let path = dir.join(FILE);
        let mut audit = Audit::open(&dir, AuditLimits::default(), &[]).unwrap();
        audit.record(&entry(&Audit::now(), "ok", 1)).unwrap();
        let staged = audit.stage((0..3).map(|_| entry(&Audit::now(), "ok", 2)).collect()).unwrap();
        let journal: Vec<(u64, Vec<u8>)> = staged.journal().map(|(seq, line)| (seq, line.to_vec())).collect();
        assert_eq!(journal.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [2, 3, 4]);
        audit.append(&staged, true).unwrap();
        assert_eq!(audit.synced(), 1, "the group's entries wait for the periodic sync");
        drop(audit);
        // A power loss: the last two lines never reached the disk, the one
        // before only in part.
        let text = std::fs::read(&path).unwrap();
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        let kept = [lines[0], lines[1], &lines[2][..20]].concat();
        std::fs::write(&path, &kept).unwrap();

        let mut audit = Audit::open(&dir, AuditLimits::default(), &journal).unwrap();
        let seqs = |a: &Audit| a.read(None).unwrap().iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>();
        assert_eq!(seqs(&audit), [1, 2, 3, 4], "the cut line is skipped, the lost entries are back");
        audit.record(&entry(&Audit::now(), "ok", 1)).unwrap();
        assert_eq!(seqs(&audit), [1, 2, 3, 4, 5], "numbering goes on");
        drop(audit);
        // Opened again with the same journal: nothing twice.
        let audit = Audit::open(&dir, AuditLimits::default(), &journal).unwrap();
        assert_eq!(seqs(&audit), [1, 2, 3, 4, 5]);
        assert_eq!(audit.synced(), 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_journal_older_than_an_unnumbered_last_entry_is_not_replayed() {
        let dir = scratch();
        let mut audit = Audit::open(&dir, AuditLimits::default(), &[]).unwrap();
        let staged = audit.stage(vec![entry(&Audit::now(), "ok", 2)]).unwrap();
        let journal: Vec<(u64, Vec<u8>)> = staged.journal().map(|(seq, line)| (seq, line.to_vec())).collect();
        drop(audit);
        // A release without numbers wrote last.
        let old = serde_json::to_vec(&entry(&Audit::now(), "ok", 3)).unwrap();
        std::fs::write(dir.join(FILE), [old.as_slice(), b"\n"].concat()).unwrap();
        let audit = Audit::open(&dir, AuditLimits::default(), &journal).unwrap();
        assert_eq!(audit.read(None).unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
