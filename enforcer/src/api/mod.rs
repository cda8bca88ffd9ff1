//! The control API shared by the daemon and the CLI: one JSON request per
//! line on a Unix socket, one JSON response per line back.
//!
//! Field names follow Neutron's conntrack_helper resource (`id`, `router_id`,
//! `project_id`, `protocol`, `port`, `helper`). Unknown fields are refused.

use std::fmt;

use serde::{Deserialize, Serialize};

mod audit;
mod dump;

pub use audit::{AuditEntry, Caller, Event, EventKind, Record};
pub use dump::{Dump, SlotEntry};

/// Default socket path; `--socket` or `ENFORCER_SOCKET` change it.
pub const DEFAULT_SOCKET: &str = "/run/enforcer/enforcer.sock";
/// Requests larger than this are refused before parsing: room for a helper
/// set of a few tens of thousands of helpers (about 60 bytes each).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => enforcer_common::IPPROTO_TCP,
            Protocol::Udp => enforcer_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            enforcer_common::IPPROTO_TCP => Some(Protocol::Tcp),
            enforcer_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address family of the netfilter glue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];
}

/// Who decides a router's helpers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// Added through this API (`router add`); its helpers too.
    #[default]
    Local,
    /// Followed from Neutron: read-only here, changed in Neutron.
    Neutron,
}

impl Owner {
    pub fn is_local(&self) -> bool {
        *self == Owner::Local
    }
}

/// A router: a network namespace whose interfaces carry the TC programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Router {
    pub id: String,
    pub project_id: String,
    pub netns: String,
    #[serde(default, skip_serializing_if = "Owner::is_local")]
    pub owner: Owner,
    /// Interfaces the programs are attached to (runtime, not stored).
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// A conntrack helper rule of one router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Helper {
    pub id: String,
    pub router_id: String,
    pub project_id: String,
    pub protocol: Protocol,
    pub port: u16,
    pub helper: String,
}

/// Requests, tagged by `op`. Values arrive as JSON strings and numbers and are
/// validated by the daemon (`validate`), never trusted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    RouterAdd {
        router_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        project_id: Option<String>,
    },
    RouterRemove {
        router_id: String,
    },
    RouterList {},
    HelperCreate {
        router_id: String,
        protocol: String,
        port: i64,
        helper: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        project_id: Option<String>,
    },
    HelperUpdate {
        router_id: String,
        helper_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        helper: Option<String>,
    },
    HelperDelete {
        router_id: String,
        helper_id: String,
    },
    /// Makes the router's helpers exactly `helpers`, in one transaction:
    /// helpers not named go, changed ones get a new rule, new ones are
    /// created. Nothing changes unless every entry is sound.
    HelperSet {
        router_id: String,
        helpers: Vec<HelperSpec>,
    },
    HelperList {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        router_id: Option<String>,
    },
    HelperShow {
        router_id: String,
        helper_id: String,
    },
    Status {},
    /// Removes every router and all enforcement, then stops the daemon.
    Teardown {},
    /// Lets the programs describe the next `drops` packets they drop in the
    /// daemon's log (0: off). Administrators only.
    DebugDatapath {
        drops: u32,
    },
    /// The pinned maps, read by the daemon (for callers without access to
    /// bpffs), confined to the caller's project.
    MapsDump {},
    Audit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
    /// Streams events (changes, revocations, repairs, refusals) as they
    /// happen: a `done` answer, then one event per line until the client
    /// closes the connection. Administrators only, like the audit log.
    Events {},
    /// The helpers this host offers.
    Catalogue {},
}

impl Request {
    /// A change of helpers: applied in groups, one store commit each.
    pub fn is_helper_change(&self) -> bool {
        matches!(self, Request::HelperCreate { .. } | Request::HelperUpdate { .. } | Request::HelperDelete { .. } | Request::HelperSet { .. })
    }
}

/// One helper of a router's desired set. Without an id it is the helper
/// the router already has on the same protocol and port, or a new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub protocol: String,
    pub port: i64,
    pub helper: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
}

/// What setting a router's helpers changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetReport {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// The router's helpers now.
    pub helpers: Vec<Helper>,
    /// The revocations of the rules of deleted and changed helpers.
    pub revoked: Vec<RevokeReport>,
}

/// Stable error codes: scripts match on these, not on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    Conflict,
    BadRequest,
    Exhausted,
    Kernel,
    Internal,
    PermissionDenied,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::Conflict,
        Self::BadRequest,
        Self::Exhausted,
        Self::Kernel,
        Self::Internal,
        Self::PermissionDenied,
    ];

    /// The wire name (as serialized).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::BadRequest => "bad_request",
            Self::Exhausted => "exhausted",
            Self::Kernel => "kernel",
            Self::Internal => "internal",
            Self::PermissionDenied => "permission_denied",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The field the error is about, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self { code: ErrorCode::InvalidArgument, message: message.into(), field: Some(field.into()) }
    }

    /// The id is the caller's, unchecked: it is cut short.
    pub fn not_found(what: &str, id: &str) -> Self {
        let cut: String = id.chars().take(64).collect();
        let more = if cut.len() < id.len() { "..." } else { "" };
        Self::new(ErrorCode::NotFound, format!("{what} {cut:?}{more} not found"))
    }

    pub fn kernel(err: impl fmt::Display) -> Self {
        Self::new(ErrorCode::Kernel, format!("kernel: {err:#}"))
    }

    pub fn internal(err: impl fmt::Display) -> Self {
        Self::new(ErrorCode::Internal, format!("internal: {err:#}"))
    }
}

/// The most drops one `debug datapath on` may have described: the log
/// stays readable, and a flood of drops cannot fill it.
pub const MAX_DEBUG_DROPS: u32 = 10_000;

/// Where the datapath log stands after a `debug_datapath` request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugReport {
    /// Drops the programs will still describe (0: off).
    pub datapath_log_drops: u32,
}

/// What a revocation removed from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeReport {
    /// Conntrack entries that carried the rule (control connections and the
    /// RELATED connections they spawned); deleting them also removed their
    /// expectations.
    pub conntrack_entries_removed: usize,
    /// Connection directions the datapath keeps dropping until quiet.
    pub flows_kept_dead: usize,
    /// Connection directions that could not be kept dropped: the router's
    /// share of the revoked-flows map (or the map) was full.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flows_not_kept: usize,
    pub quiet_secs: u64,
    /// Whether the rule slot is free again (no entry carries it any more).
    pub slot_released: bool,
    /// Why cleaning the conntrack table failed, if it did (the rule is
    /// revoked in the datapath regardless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_error: Option<String>,
    /// The rule never tagged a packet, so no conntrack entry can carry it:
    /// the table was not visited.
    #[serde(default, skip_serializing_if = "is_false")]
    pub never_tagged: bool,
    /// Dumps of the conntrack table this revocation made. Each walks the
    /// host's whole table (every namespace's entries are in one); 0 when
    /// the conntrack index knew the rule's entries.
    #[serde(default)]
    pub conntrack_dumps: usize,
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Differences between the kernel maps and the desired state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapDrift {
    pub rules_added: usize,
    pub rules_removed: usize,
    pub counters_added: usize,
    pub counters_removed: usize,
    pub routers_added: usize,
    pub routers_removed: usize,
    /// Words of the rule filter that differed.
    #[serde(default)]
    pub filter_fixed: usize,
}

impl MapDrift {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What a reconciliation changed (or, as drift, would change).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileReport {
    pub glue_installed: usize,
    pub links_attached: usize,
    pub links_detached: usize,
    pub orphan_routers_removed: usize,
    /// Stored routers whose namespace is missing.
    pub routers_detached: usize,
    pub slots_released: usize,
    pub maps: MapDrift,
    /// Attachments whose program was replaced in place at start (after an
    /// upgrade or a change of the constants the programs are built with).
    #[serde(default)]
    pub programs_replaced: usize,
}

impl ReconcileReport {
    /// Nothing to change (a router whose namespace is missing is a fact,
    /// not drift).
    pub fn is_empty(&self) -> bool {
        *self == Self { routers_detached: self.routers_detached, ..Self::default() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterStatus {
    pub id: String,
    pub netns: String,
    #[serde(default, skip_serializing_if = "Owner::is_local")]
    pub owner: Owner,
    pub attached: bool,
    /// What the last whole-table check of its glue found (after repair).
    #[serde(default)]
    pub glue: GlueState,
    pub interfaces: Vec<String>,
    pub helpers: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub pid: u32,
    pub bpffs: String,
    pub state_dir: String,
    /// How the programs are attached: "tcx" or "netlink".
    pub attach: String,
    pub uptime_secs: u64,
    pub routers: Vec<RouterStatus>,
    pub helpers: usize,
    pub quarantined_slots: usize,
    pub revoked_flows: usize,
    /// Revoked flows refused since start because a router's share of the
    /// revoked-flows map, or the map, was full.
    #[serde(default)]
    pub revoked_flows_overflowed: u64,
    /// What the start-up reconciliation changed.
    pub started_with: ReconcileReport,
    /// What differs between the kernel and the store and could not be put
    /// back, as the last check found it (every `glue_check_secs`; the glue
    /// and links of a router at once, the maps at the end of the round).
    pub drift: ReconcileReport,
    /// The Neutron sync, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neutron: Option<SyncStatus>,
    /// Glue tables found missing or altered and put back since start.
    #[serde(default)]
    pub glue_repairs: u64,
    /// Checks that found map entries differing from the store and put
    /// them back.
    #[serde(default)]
    pub map_repairs: u64,
    /// Checks whose look at the maps without the daemon's lock met changes
    /// made meanwhile, and found nothing else when it read those entries
    /// again under the lock.
    #[serde(default)]
    pub map_rechecks: u64,
    /// Attachments found missing in the kernel and put back since start.
    #[serde(default)]
    pub link_repairs: u64,
    /// Whether the start-up reconciliation is done (until then writes
    /// wait), and how long it took.
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_after_ms: Option<u64>,
    /// Helper changes applied since start, and the store transactions they
    /// took (group commit: many concurrent changes share one).
    #[serde(default)]
    pub changes: u64,
    #[serde(default)]
    pub commits: u64,
    /// Rounds of the periodic glue and attachment check done since start,
    /// and how long the last one took.
    #[serde(default)]
    pub check_rounds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check_ms: Option<u64>,
}

/// A router's netfilter glue, as its last whole-table check found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlueState {
    /// Not checked yet since it was installed.
    #[default]
    Unchecked,
    Intact,
    /// No table (`nft flush ruleset`, or deleted), and not put back.
    Missing,
    /// A chain, rule or helper object removed, added or changed, and not
    /// put back.
    Altered,
}

/// A Neutron helper that is not applied here, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperError {
    pub router_id: String,
    pub helper_id: String,
    pub error: String,
}

/// How the Neutron sync stands. Never holds a secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncStatus {
    /// "ok", or "stale" while Neutron or Keystone fails (enforcement stays
    /// as last applied).
    pub state: String,
    /// Seconds since the last complete poll; None before the first.
    pub age_secs: Option<f64>,
    /// Why the last poll failed, if it did.
    pub last_error: Option<String>,
    pub polls: u64,
    pub failed_polls_in_a_row: u64,
    /// Failed polls since start.
    #[serde(default)]
    pub failed_polls: u64,
    /// HTTP requests of the last complete poll (logins included).
    pub requests_last_poll: u64,
    /// How long the last complete poll took, in milliseconds.
    pub last_poll_ms: f64,
    pub routers_synced: usize,
    /// Neutron helpers not applied (helper or protocol not offered here).
    pub helper_errors: Vec<HelperError>,
    /// Helper errors seen since start.
    pub helper_errors_total: u64,
}

/// One helper this host offers: probed from the kernel, narrowed by
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferedHelper {
    pub helper: String,
    pub protocols: Vec<Protocol>,
    pub families: Vec<Family>,
    pub usual_port: u16,
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Router(Router),
    Routers(Vec<Router>),
    Helper(Helper),
    Helpers(Vec<Helper>),
    Revoked(RevokeReport),
    HelperSet(SetReport),
    Status(Box<StatusReport>),
    Dump(Dump),
    Audit(Vec<AuditEntry>),
    Catalogue(Vec<OfferedHelper>),
    Debug(DebugReport),
    Done {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(ApiError),
}

impl From<Result<Reply, ApiError>> for Response {
    fn from(r: Result<Reply, ApiError>) -> Self {
        match r {
            Ok(v) => Response::Ok(v),
            Err(e) => Response::Error(e),
        }
    }
}

impl From<Response> for Result<Reply, ApiError> {
    fn from(r: Response) -> Self {
        match r {
            Response::Ok(v) => Ok(v),
            Response::Error(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_names_are_their_wire_names() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn requests_round_trip_with_neutron_field_names() {
        let req = Request::HelperCreate {
            router_id: "r".into(),
            protocol: "tcp".into(),
            port: 21,
            helper: "ftp".into(),
            id: None,
            project_id: Some("p".into()),
        };
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"op":"helper_create","router_id":"r","protocol":"tcp","port":21,"helper":"ftp","project_id":"p"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"router_list","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"drop_tables"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"helper_delete","router_id":"r","helper_id":"h","slot":3}"#)
                .is_err(),
            "slots are internal and never accepted"
        );
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::Ok(Reply::Done {});
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ok":{}}"#);
        let err = Response::Error(ApiError::invalid("port", "bad"));
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), err);
        let helper = Helper {
            id: "i".into(),
            router_id: "r".into(),
            project_id: "p".into(),
            protocol: Protocol::Udp,
            port: 69,
            helper: "tftp".into(),
        };
        let text = serde_json::to_string(&Response::Ok(Reply::Helper(helper.clone()))).unwrap();
        assert_eq!(
            serde_json::from_str::<Response>(&text).unwrap(),
            Response::Ok(Reply::Helper(helper))
        );
    }
}
