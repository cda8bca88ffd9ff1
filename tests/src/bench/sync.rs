//! The Neutron sync: how long a helper created or deleted in Neutron takes
//! to be enforced or revoked on the host, with 1 and with many routers
//! hosted and followed, against real Keystone and neutron-server; and how
//! many API requests an unchanged poll costs.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{Scale, percentile};
use crate::{Daemon, Netns, openstack::OpenStack};

/// The poll interval of the measured daemons (the default).
pub const POLL_SECS: f64 = 2.0;

#[derive(Debug, Clone, Default)]
pub struct AtSize {
    pub routers: usize,
    /// From daemon start until every router is followed.
    pub initial_sync_s: f64,
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    pub delete_p50_ms: f64,
    pub delete_p99_ms: f64,
    /// HTTP requests of an unchanged poll, and how long it took.
    pub requests_per_poll: u64,
    pub poll_ms: f64,
    pub samples: usize,
}

pub fn measure(scale: Scale) -> Vec<AtSize> {
    scale.pick(vec![1, 20], vec![1, 1000]).into_iter().map(|n| at(n, scale.pick(4, 12))).collect()
}

/// Waits until the daemon's helper list of `router` has (or lacks) `id`.
fn until(daemon: &Daemon, router: &str, id: &str, present: bool) -> Duration {
    let started = Instant::now();
    let mut s = daemon.session();
    loop {
        let r = s.request(&json!({"op": "helper_list", "router_id": router})).expect("helper_list");
        let has = r["ok"].as_array().is_some_and(|l| l.iter().any(|h| h["id"] == id));
        if has == present {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "helper {id} not {} on the host", if present { "applied" } else { "revoked" });
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn at(n: usize, samples: usize) -> AtSize {
    let os = OpenStack::start(3600);
    let admin = os.token("admin");
    let project = os.seed["admin_project_id"].as_str().unwrap().to_string();
    let (code, body) = os.neutron_with(&admin, "PUT", &format!("/quotas/{project}"), Some(json!({"quota": {"router": -1}})));
    assert_eq!(code, 200, "lifting the router quota: {body}");
    let mut routers = Vec::with_capacity(n);
    let mut namespaces = Vec::with_capacity(n);
    for i in 0..n {
        let (code, body) = os.neutron_with(&admin, "POST", "/routers", Some(json!({"router": {"name": format!("bench-{i}")}})));
        assert_eq!(code, 201, "{body}");
        let id = body["router"]["id"].as_str().unwrap().to_string();
        namespaces.push(Netns::create(&format!("qrouter-{id}")));
        routers.push(id);
    }
    eprintln!("bench: sync, {n} routers in Neutron and namespaces");
    let config = os.daemon_config("enforcer", POLL_SECS, "");
    let (key, value) = os.daemon_env();
    let started = Instant::now();
    let daemon = Daemon::start_with_env(None, &["--config", config.to_str().unwrap()], &[(key, &value)]);
    let mut s = daemon.session();
    loop {
        let r = s.request(&json!({"op": "router_list"})).expect("router_list");
        if r["ok"].as_array().is_some_and(|l| l.len() >= n) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "initial sync of {n} routers took too long");
        std::thread::sleep(Duration::from_millis(100));
    }
    let initial_sync_s = started.elapsed().as_secs_f64();
    eprintln!("bench: sync, {n} routers followed in {initial_sync_s:.1} s");
    let (mut created, mut deleted) = (Vec::new(), Vec::new());
    for i in 0..samples {
        // Changes land at spread-out phases of the poll cycle.
        std::thread::sleep(Duration::from_secs_f64(POLL_SECS * i as f64 / samples as f64));
        let router = &routers[i * n / samples];
        let (code, body) = os.neutron_with(
            &admin,
            "POST",
            &format!("/routers/{router}/conntrack_helpers"),
            Some(json!({"conntrack_helper": {"protocol": "tcp", "port": 2000 + i, "helper": "ftp"}})),
        );
        assert_eq!(code, 201, "{body}");
        let id = body["conntrack_helper"]["id"].as_str().unwrap().to_string();
        created.push(until(&daemon, router, &id, true).as_secs_f64() * 1000.0);
        let (code, body) = os.neutron_with(&admin, "DELETE", &format!("/routers/{router}/conntrack_helpers/{id}"), None);
        assert_eq!(code, 204, "{body}");
        deleted.push(until(&daemon, router, &id, false).as_secs_f64() * 1000.0);
    }
    // A poll with nothing changed (two intervals after the last change).
    std::thread::sleep(Duration::from_secs_f64(POLL_SECS * 2.5));
    // A fresh connection: the first one sat idle longer than the daemon keeps one.
    let status = daemon.session().request(&json!({"op": "status"})).expect("status");
    let requests_per_poll = status["ok"]["neutron"]["requests_last_poll"].as_u64().unwrap_or(u64::MAX);
    let poll_ms = status["ok"]["neutron"]["last_poll_ms"].as_f64().unwrap_or(f64::NAN);
    drop(daemon);
    drop(namespaces);
    AtSize {
        routers: n,
        initial_sync_s,
        create_p50_ms: percentile(created.clone(), 0.5),
        create_p99_ms: percentile(created, 0.99),
        delete_p50_ms: percentile(deleted.clone(), 0.5),
        delete_p99_ms: percentile(deleted, 0.99),
        requests_per_poll,
        poll_ms,
        samples,
    }
}
