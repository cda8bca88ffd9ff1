//! `cargo xtask bench`: enforcer against the iptables (Neutron) and
//! nftables ways, measured side by side in one run. See bench/README.md for
//! the method; results.md and the SVG charts are written by `report`.

pub mod baselines;
pub mod changes;
pub mod empty;
pub mod fixed_cost;
pub mod fleet;
pub mod forwarding;
pub mod packet;
pub mod report;
pub mod revocation;
pub mod sync;

use std::time::Duration;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub quick: bool,
}

impl Scale {
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick { quick } else { full }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
