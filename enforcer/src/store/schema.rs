//! The store's disk format. It has record types of its own, so a change to
//! the API's wire types never changes what is on disk, and a version, so a
//! store written by an earlier release is brought up to date in one
//! transaction at open, and one written by a later release is refused
//! rather than misread.
//!
//! Versions:
//! 1. The first releases: no version recorded; a router's `owner` was left
//!    out when local, and absent altogether before the Neutron sync.
//! 2. The version is recorded; every router states its owner.

use std::borrow::Cow;

use anyhow::{Context, Result, bail};
use redb::{ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use super::{HelperRecord, RouterRecord};
use crate::api::{Helper, Owner, Protocol};

pub const VERSION: u64 = 2;

pub(super) const ROUTERS: TableDefinition<&str, &str> = TableDefinition::new("routers");
pub(super) const HELPERS: TableDefinition<&str, &str> = TableDefinition::new("helpers");
/// Revoked slots, kept out of reuse: an old connection must never come back
/// to life under a new rule.
pub(super) const QUARANTINE: TableDefinition<&str, u64> = TableDefinition::new("quarantine");
/// Audit lines (seq → JSON) committed with the changes they describe, kept
/// until the audit log holding them is synced. A table an earlier release
/// ignores, so it needs no new version.
pub(super) const AUDIT_JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_journal");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SCHEMA_KEY: &str = "schema";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredOwner {
    Local,
    Neutron,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredProtocol {
    Tcp,
    Udp,
}

/// Records borrow the daemon's strings to be written (no copy per change)
/// and own them when read.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StoredRouter<'a> {
    id: Cow<'a, str>,
    index: u32,
    project_id: Cow<'a, str>,
    netns: Cow<'a, str>,
    owner: StoredOwner,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StoredHelper<'a> {
    id: Cow<'a, str>,
    router_id: Cow<'a, str>,
    project_id: Cow<'a, str>,
    protocol: StoredProtocol,
    port: u16,
    helper: Cow<'a, str>,
    slot: u16,
}

/// A router as version 1 wrote it.
#[derive(Deserialize)]
struct RouterV1 {
    id: String,
    index: u32,
    project_id: String,
    netns: String,
    #[serde(default)]
    owner: Option<StoredOwner>,
}

impl<'a> From<&'a RouterRecord> for StoredRouter<'a> {
    fn from(r: &'a RouterRecord) -> Self {
        let owner = match r.owner {
            Owner::Local => StoredOwner::Local,
            Owner::Neutron => StoredOwner::Neutron,
        };
        Self { id: r.id.as_str().into(), index: r.index, project_id: r.project_id.as_str().into(), netns: r.netns.as_str().into(), owner }
    }
}

impl From<StoredRouter<'_>> for RouterRecord {
    fn from(r: StoredRouter<'_>) -> Self {
        let owner = match r.owner {
            StoredOwner::Local => Owner::Local,
            StoredOwner::Neutron => Owner::Neutron,
        };
        Self { id: r.id.into_owned(), index: r.index, project_id: r.project_id.into_owned(), netns: r.netns.into_owned(), owner }
    }
}

impl<'a> From<&'a HelperRecord> for StoredHelper<'a> {
    fn from(h: &'a HelperRecord) -> Self {
        let protocol = match h.helper.protocol {
            Protocol::Tcp => StoredProtocol::Tcp,
            Protocol::Udp => StoredProtocol::Udp,
        };
        let Helper { id, router_id, project_id, port, helper, .. } = &h.helper;
        Self { id: id.into(), router_id: router_id.into(), project_id: project_id.into(), protocol, port: *port, helper: helper.into(), slot: h.slot }
    }
}

impl From<StoredHelper<'_>> for HelperRecord {
    fn from(h: StoredHelper<'_>) -> Self {
        let protocol = match h.protocol {
            StoredProtocol::Tcp => Protocol::Tcp,
            StoredProtocol::Udp => Protocol::Udp,
        };
        let helper = Helper {
            id: h.id.into_owned(),
            router_id: h.router_id.into_owned(),
            project_id: h.project_id.into_owned(),
            protocol,
            port: h.port,
            helper: h.helper.into_owned(),
        };
        Self { helper, slot: h.slot }
    }
}

pub(super) fn encode(value: &impl Serialize) -> Result<String> {
    Ok(serde_json::to_string(value)?)
}

pub(super) fn router(text: &str) -> Result<RouterRecord> {
    Ok(serde_json::from_str::<StoredRouter>(text).context("corrupt router record")?.into())
}

pub(super) fn helper(text: &str) -> Result<HelperRecord> {
    Ok(serde_json::from_str::<StoredHelper>(text).context("corrupt helper record")?.into())
}

/// The version of the store `txn` sees: recorded, or 1 where a store of
/// the first releases has tables but no version, or none for a new file.
fn version(txn: &redb::WriteTransaction) -> Result<Option<u64>> {
    let tables: Vec<String> = txn.list_tables()?.map(|t| t.name().to_string()).collect();
    if tables.iter().any(|t| t == META.name()) {
        let meta = txn.open_table(META)?;
        let recorded = meta.get(SCHEMA_KEY)?.map(|v| v.value());
        return Ok(recorded);
    }
    Ok(tables.iter().any(|t| t == ROUTERS.name()).then_some(1))
}

/// Brings the store up to [`VERSION`] within `txn` (the caller commits);
/// returns the version it found. A store of a later version is refused.
pub(super) fn upgrade(txn: &redb::WriteTransaction) -> Result<Option<u64>> {
    let found = version(txn)?;
    match found {
        Some(v) if v > VERSION => {
            bail!("the store is of schema version {v}, written by a later release of enforcer; this one reads up to version {VERSION}: run the later release, or restore a backup of the store")
        }
        Some(VERSION) => return Ok(found),
        Some(1) => routers_state_their_owner(txn)?,
        _ => {}
    }
    txn.open_table(ROUTERS)?;
    txn.open_table(HELPERS)?;
    txn.open_table(QUARANTINE)?;
    txn.open_table(META)?.insert(SCHEMA_KEY, VERSION)?;
    Ok(found)
}

/// 1 to 2: every router record states its owner (local where it was left
/// out).
fn routers_state_their_owner(txn: &redb::WriteTransaction) -> Result<()> {
    let mut table = txn.open_table(ROUTERS)?;
    let mut rewritten = Vec::new();
    for row in table.iter()? {
        let (key, value) = row?;
        let old: RouterV1 = serde_json::from_str(value.value()).with_context(|| format!("corrupt router record {}", key.value()))?;
        let new = StoredRouter { id: old.id.into(), index: old.index, project_id: old.project_id.into(), netns: old.netns.into(), owner: old.owner.unwrap_or(StoredOwner::Local) };
        rewritten.push((key.value().to_string(), encode(&new)?));
    }
    for (key, value) in rewritten {
        table.insert(key.as_str(), value.as_str())?;
    }
    Ok(())
}
