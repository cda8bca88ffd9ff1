//! What `maps dump` shows: the kernel's rule slots, read from the pinned maps.

use serde::{Deserialize, Serialize};

use super::Protocol;

/// One rule slot as the kernel sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotEntry {
    /// The router's id, if the routers map knows the index.
    pub router_id: Option<String>,
    pub router_index: enforcer_common::RouterIndex,
    pub slot: u32,
    /// Protocol and port of the rule that tags this slot (none once revoked).
    pub protocol: Option<Protocol>,
    pub port: Option<u16>,
    pub helper: Option<String>,
    /// `live`, or `revoked`: packets carrying it are dropped.
    pub state: String,
    /// Summed over CPUs.
    pub tagged: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dump {
    pub bpffs: String,
    pub routers: usize,
    pub slots: Vec<SlotEntry>,
}
