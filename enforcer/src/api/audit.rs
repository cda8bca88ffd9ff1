//! The audit trail's entries and the event stream, as they cross the API
//! (`audit`, `events`) and as the trail stores them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ApiError, Helper, RevokeReport, Router, SetReport};

/// The peer of an API connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups at connect time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
}

impl Caller {
    /// The daemon itself, for what it does on its own (repairs, flushes).
    pub fn daemon() -> Self {
        Self { uid: 0, gid: 0, pid: Some(std::process::id() as i32), groups: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// RFC 3339, UTC.
    pub time: String,
    /// Its place in the trail, given when it is written: one more than the
    /// entry before (a gap is an entry lost). None in entries of releases
    /// that did not number them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub caller: Caller,
    /// Who the change was made for: the local API, or the Neutron sync.
    #[serde(default, skip_serializing_if = "super::Owner::is_local")]
    pub origin: super::Owner,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Record>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Record>,
    /// `ok`, or the error code.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// What an entry records of an object before or after a change. The
/// daemon keeps the typed value it has and serializes it once, when the
/// entry is written: a JSON tree built, serialized and dropped per change
/// was a sixth of a delete's time. What is read back from the trail is
/// JSON, and two records are equal when their JSON is.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Record {
    Helper(Helper),
    Router(Router),
    Revoked(RevokeReport),
    HelperSet(SetReport),
    Json(Value),
}

impl Record {
    pub fn to_value(&self) -> Value {
        match self {
            Record::Json(v) => v.clone(),
            other => serde_json::to_value(other).unwrap_or_default(),
        }
    }
}

impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Record::Json)
    }
}

impl From<Value> for Record {
    fn from(v: Value) -> Self {
        Record::Json(v)
    }
}

/// What `enforcer events` streams: each audit entry once it is durable,
/// and each revocation with what it removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A change made through the API or by the Neutron sync.
    Change,
    /// A rule's flows cut and its conntrack entries removed.
    Revocation,
    /// Kernel state someone else changed, put back by the daemon.
    Repair,
    /// A request refused (or failed), as audited.
    Refusal,
    /// The subscriber fell behind; `after.missed` events were dropped.
    Lagged,
}

impl Event {
    /// The event of an audit entry.
    pub fn of(entry: &AuditEntry) -> Self {
        let kind = if entry.op.ends_with("_repair") {
            EventKind::Repair
        } else if entry.result != "ok" {
            EventKind::Refusal
        } else {
            EventKind::Change
        };
        Self { kind, entry: entry.clone() }
    }
}
