//! Prometheus metrics on the `metrics` address (TCP or a unix socket).
//!
//! Two kinds of series. API requests are counted as they are answered
//! (live families, outside the daemon's lock). Everything else is read at
//! scrape time: the daemon's counters under its lock for a moment (no walk
//! over routers), then the packet counters from the pinned maps without
//! the lock, so a scrape never holds up the API.
//!
//! Cardinality: per-router series carry a `router` label (two per router);
//! per-rule series only with `metrics_per_rule`; everything else is one
//! series per host, or per operation, result or repair kind.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};
use tracing::{info, warn};

use super::server::{Shared, lock};
use crate::{config::MetricsAddr, kernel::dump};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

/// The API's live series: requests by operation and result, and latency.
#[derive(Clone)]
pub(super) struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<OpLabels, Histogram>,
}

impl ApiMetrics {
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            // 100 µs to about 26 s, by fours.
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 4.0, 10))),
        }
    }

    /// One answered request: `op` as the audit names it, `result` `ok` or
    /// the error code.
    pub fn answered(&self, op: &'static str, result: &'static str, took: Duration) {
        self.requests.get_or_create(&RequestLabels { op, result }).inc();
        self.latency.get_or_create(&OpLabels { op }).observe(took.as_secs_f64());
    }
}

/// What a scrape reads of the daemon under its lock: counters only.
struct Snapshot {
    ready: bool,
    routers: usize,
    helpers: usize,
    quarantined: usize,
    revocations: super::Revocations,
    revoked_flows: usize,
    revoked_capacity: u32,
    revoked_overflows: u64,
    ct_index_missed: Option<u64>,
    ct_index_capacity: u32,
    repairs: [(&'static str, u64); 3],
    check_rounds: u64,
    changes: u64,
    commits: u64,
    sync: Option<crate::api::SyncStatus>,
    offered: Vec<(&'static str, String, String)>,
}

impl super::Daemon {
    fn metrics_snapshot(&self) -> Snapshot {
        Snapshot {
            ready: self.life.ready.is_some(),
            routers: self.routers.len(),
            helpers: self.helpers.len(),
            quarantined: self.slots.quarantined().count(),
            revocations: self.tally.revocations,
            revoked_flows: self.datapath.revoked_flows_swept(),
            revoked_capacity: self.config.revoked_flows_max,
            revoked_overflows: self.datapath.revoked_overflows(),
            ct_index_missed: self.datapath.ct_index_missed(),
            ct_index_capacity: self.config.conntrack_index_max,
            repairs: [("glue", self.tally.glue_repairs), ("link", self.tally.link_repairs), ("map", self.tally.map_repairs)],
            check_rounds: self.tally.check_rounds,
            changes: self.tally.changes,
            commits: self.tally.commits,
            sync: self.sync_report(),
            offered: self.offered.offers.iter().map(|o| (o.kind.name, o.protocol.to_string(), format!("{:?}", o.family).to_lowercase())).collect(),
        }
    }
}

/// The series read at scrape time.
struct Scrape {
    daemon: Shared,
    bpffs: PathBuf,
    per_rule: bool,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").field("bpffs", &self.bpffs).field("per_rule", &self.per_rule).finish()
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family from (labels, value) pairs.
fn counters<L: EncodeLabelSet>(e: &mut DescriptorEncoder, name: &str, help: &str, rows: impl IntoIterator<Item = (L, u64)>) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = lock(&self.daemon).metrics_snapshot();
        gauge(&mut e, "ready", "1 once the start-up reconciliation is done (READY=1 to systemd)", if s.ready { 1.0 } else { 0.0 })?;
        gauge(&mut e, "routers", "Routers enforced", s.routers as f64)?;
        gauge(&mut e, "helpers", "Helper rules in force", s.helpers as f64)?;
        gauge(&mut e, "quarantined_slots", "Revoked rule slots whose conntrack entries could not all be removed yet", s.quarantined as f64)?;
        counter(&mut e, "revocations", "Rules revoked (deleted, changed, or removed with their router)", s.revocations.rules)?;
        counter(&mut e, "revoked_conntrack_entries", "Conntrack entries removed by revocations", s.revocations.conntrack_entries)?;
        counter(&mut e, "revoked_flows_kept", "Connection directions kept dropped after a revocation", s.revocations.flows_kept)?;
        counter(&mut e, "revocation_conntrack_dumps", "Walks of the host's whole conntrack table made by revocations (0 for each the conntrack index answered)", s.revocations.conntrack_dumps)?;
        gauge(&mut e, "conntrack_index", "1 if the conntrack index runs (revocations find connections without walking the conntrack table)", if s.ct_index_missed.is_some() { 1.0 } else { 0.0 })?;
        counter(&mut e, "conntrack_index_missed", "Connections that found no room in the conntrack index (their router's next revocation walks the table)", s.ct_index_missed.unwrap_or(0))?;
        gauge(&mut e, "conntrack_index_capacity", "Capacity of the conntrack index, all routers together (conntrack_index_max)", s.ct_index_capacity as f64)?;
        gauge(&mut e, "revoked_flows", "Revoked flows the datapath keeps dropped now", s.revoked_flows as f64)?;
        gauge(&mut e, "revoked_flows_capacity", "Capacity of the revoked-flows map", s.revoked_capacity as f64)?;
        counter(&mut e, "revoked_flows_overflows", "Revoked flows that found no room in the revoked-flows map", s.revoked_overflows)?;
        counters(&mut e, "repairs", "Kernel state found changed by someone else and put back, by kind", s.repairs.map(|(kind, n)| ([("kind", kind)], n)))?;
        counter(&mut e, "check_rounds", "Rounds of the periodic check of glue, links and maps", s.check_rounds)?;
        counter(&mut e, "helper_changes", "Helper changes applied", s.changes)?;
        counter(&mut e, "commits", "Store commits of helper changes (group commit: many changes each)", s.commits)?;
        if let Some(sync) = &s.sync {
            let age = sync.age_secs.unwrap_or(f64::INFINITY);
            gauge(&mut e, "neutron_sync_lag_seconds", "Seconds since the last complete poll of Neutron", age)?;
            let last = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0) - age;
            gauge(&mut e, "neutron_sync_last_success_timestamp_seconds", "When the last poll of Neutron completed (Unix time)", if age.is_finite() { last } else { 0.0 })?;
            counter(&mut e, "neutron_sync_polls", "Complete polls of Neutron", sync.polls)?;
            gauge(&mut e, "neutron_sync_failed_polls_in_a_row", "Polls failed in a row (0 when the last succeeded)", sync.failed_polls_in_a_row as f64)?;
            counter(&mut e, "neutron_sync_errors", "Polls of Neutron that failed", sync.failed_polls)?;
            counter(&mut e, "neutron_sync_helper_errors", "Neutron helpers that could not be applied here", sync.helper_errors_total)?;
        }
        let mut catalogue = e.encode_descriptor("catalogue_helper", "A helper this host offers, by protocol and family", None, MetricType::Info)?;
        for (helper, protocol, family) in &s.offered {
            let labels = [("helper", helper.to_string()), ("protocol", protocol.clone()), ("family", family.clone())];
            Info::new(Vec::<(String, String)>::new()).encode(catalogue.encode_family(&labels)?)?;
        }
        Info::new([("version", env!("CARGO_PKG_VERSION"))]).encode(e.encode_descriptor("build", "The enforcer build", None, MetricType::Info)?)?;
        // The packet counters, without the lock.
        match dump::read(&self.bpffs) {
            Ok(d) => self.packets(&mut e, &d)?,
            Err(err) => warn!("metrics: reading the pinned maps: {err:#}"),
        }
        Ok(())
    }
}

impl Scrape {
    fn packets(&self, e: &mut DescriptorEncoder, d: &crate::api::Dump) -> Result<(), std::fmt::Error> {
        let mut per_router: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for s in &d.slots {
            let t = per_router.entry(s.router_id.as_deref().unwrap_or("unknown")).or_default();
            t.0 += s.tagged;
            t.1 += s.dropped;
        }
        counters(e, "router_tagged_packets", "Packets tagged for their helper, per router", per_router.iter().map(|(r, t)| ([("router", *r)], t.0)))?;
        counters(e, "router_dropped_packets", "Packets of revoked rules dropped, per router", per_router.iter().map(|(r, t)| ([("router", *r)], t.1)))?;
        if self.per_rule {
            let rule = |s: &crate::api::SlotEntry| {
                [
                    ("router", s.router_id.clone().unwrap_or_default()),
                    ("slot", s.slot.to_string()),
                    ("protocol", s.protocol.map(|p| p.to_string()).unwrap_or_default()),
                    ("port", s.port.map(|p| p.to_string()).unwrap_or_default()),
                    ("helper", s.helper.clone().unwrap_or_default()),
                ]
            };
            counters(e, "rule_tagged_packets", "Packets tagged, per rule slot", d.slots.iter().map(|s| (rule(s), s.tagged)))?;
            counters(e, "rule_dropped_packets", "Packets dropped, per rule slot", d.slots.iter().map(|s| (rule(s), s.dropped)))?;
        }
        Ok(())
    }
}

/// Binds the endpoint (so a taken port stops the start with a clear
/// error) and serves it until the daemon stops.
pub(super) async fn serve(addr: MetricsAddr, daemon: Shared, api: ApiMetrics) -> Result<tokio::task::JoinHandle<()>> {
    let (bpffs, per_rule) = {
        let d = lock(&daemon);
        (d.config.bpffs.clone(), d.config.metrics_per_rule)
    };
    let mut registry = Registry::with_prefix("enforcer");
    registry.register("api_requests", "API requests answered, by operation and result", api.requests);
    registry.register("api_request_duration_seconds", "Time to answer an API request, by operation", api.latency);
    registry.register_collector(Box::new(Scrape { daemon, bpffs, per_rule }));
    let registry = Arc::new(registry);
    let listener = Listener::bind(&addr).await?;
    info!(%addr, "serving metrics");
    Ok(tokio::spawn(async move {
        loop {
            let io = match listener.accept().await {
                Ok(io) => io,
                Err(e) => {
                    warn!("metrics: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| answer(req, registry.clone()));
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    warn!("metrics: connection: {e}");
                }
            });
        }
    }))
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

type Io = hyper_util::rt::TokioIo<Box<dyn AsyncStream>>;
trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> AsyncStream for T {}

impl Listener {
    async fn bind(addr: &MetricsAddr) -> Result<Self> {
        Ok(match addr {
            MetricsAddr::Tcp(a) => Self::Tcp(tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding the metrics address {a}"))?),
            MetricsAddr::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                // Only a socket is ever replaced.
                if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
                    std::fs::remove_file(path)?;
                }
                Self::Unix(tokio::net::UnixListener::bind(path).with_context(|| format!("binding the metrics socket {}", path.display()))?)
            }
        })
    }

    async fn accept(&self) -> std::io::Result<Io> {
        let stream: Box<dyn AsyncStream> = match self {
            Self::Tcp(l) => Box::new(l.accept().await?.0),
            Self::Unix(l) => Box::new(l.accept().await?.0),
        };
        Ok(hyper_util::rt::TokioIo::new(stream))
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn answer(req: Request<hyper::body::Incoming>, registry: Arc<Registry>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
        r
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // Encoding reads maps and takes the lock: off the runtime.
            let text = tokio::task::spawn_blocking(move || {
                let mut text = String::new();
                prometheus_client::encoding::text::encode(&mut text, &registry).map(|()| text)
            })
            .await;
            match text {
                Ok(Ok(text)) => reply(StatusCode::OK, OPENMETRICS, text),
                _ => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding the metrics failed\n".into()),
            }
        }
        (&Method::GET, "/") => reply(StatusCode::OK, "text/html", "<html><body><h1>enforcer</h1><a href=\"/metrics\">metrics</a></body></html>\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found; try /metrics\n".into()),
    })
}
