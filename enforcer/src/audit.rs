//! The audit trail: one JSON line per mutation and per refused request,
//! appended to `audit.jsonl` in the state directory (opened append-only,
//! never rewritten) and emitted through the daemon's log.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{api::ApiError, auth::Caller};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// RFC 3339, UTC.
    pub time: String,
    pub caller: Caller,
    /// Who the change was made for: the local API, or the Neutron sync.
    #[serde(default, skip_serializing_if = "crate::api::Owner::is_local")]
    pub origin: crate::api::Owner,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
    /// `ok`, or the error code.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

pub struct Audit {
    path: PathBuf,
    file: File,
}

impl Audit {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("audit.jsonl");
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening the audit log {}", path.display()))?;
        // Also a log made by an earlier version under a looser umask.
        crate::store::private(&path, 0o600)?;
        Ok(Self { path, file })
    }

    pub fn now() -> String {
        humantime::format_rfc3339_micros(SystemTime::now()).to_string()
    }

    /// Appends one entry (one write of one line, so lines never interleave).
    pub fn record(&mut self, entry: &AuditEntry) -> Result<()> {
        let mut line = serde_json::to_vec(entry)?;
        tracing::info!(target: "audit", "{}", String::from_utf8_lossy(&line));
        line.push(b'\n');
        self.file.write_all(&line).context("writing the audit log")?;
        self.file.sync_data().context("syncing the audit log")
    }

    /// Entries at or after `since`.
    pub fn read(&self, since: Option<SystemTime>) -> Result<Vec<AuditEntry>> {
        let file = File::open(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        let mut out = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line?;
            let Ok(entry) = serde_json::from_str::<AuditEntry>(&line) else { continue };
            let keep = match since {
                None => true,
                Some(t) => humantime::parse_rfc3339_weak(&entry.time).is_ok_and(|at| at >= t),
            };
            if keep {
                out.push(entry);
            }
        }
        Ok(out)
    }
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
        let mut audit = Audit::open(&dir).unwrap();
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
        let audit = Audit::open(&dir).unwrap();
        assert_eq!(audit.read(None).unwrap(), vec![old, new.clone()]);
        assert_eq!(audit.read(Some(parse_since("1h").unwrap())).unwrap(), vec![new]);
        assert!(parse_since("yesterday-ish").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
