//! enforcer's fixed cost measured against the router it lives in: a Neutron
//! router (the L3 agent's rules, installed by Neutron's own code, with SNAT
//! of the client through its floating IP). Three ways in the same run,
//! rounds interleaved: the bare router (no rules at all), the router with
//! Neutron's rules and no enforcer, and that router with enforcer and N
//! helpers on ports the traffic does not use.

use std::collections::BTreeMap;

use super::{
    Scale,
    forwarding::{blast, enforce},
    median,
};
use crate::neutron::NeutronRouter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Router {
    /// No Neutron rules, no enforcer.
    Bare,
    /// Neutron's rules, no enforcer.
    Neutron,
    /// Neutron's rules and enforcer with this many helpers.
    Enforcer(usize),
}

/// Forwarded packets per second, median over rounds.
pub type Rates = BTreeMap<Router, f64>;

pub fn measure(scale: Scale) -> Rates {
    let sizes: Vec<usize> = scale.pick(vec![0, 10], vec![0, 1, 10, 10_000]);
    let rounds = scale.pick(1, 5);
    let secs = scale.pick(1, 3);
    let mut routers = vec![Router::Bare, Router::Neutron];
    routers.extend(sizes.iter().map(|n| Router::Enforcer(*n)));
    let mut samples: BTreeMap<Router, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for &router in &routers {
            let rate = match router {
                Router::Bare => blast(&NeutronRouter::bare(), secs),
                Router::Neutron => blast(&NeutronRouter::new(false, (None, None)).topo, secs),
                Router::Enforcer(n) => {
                    let neutron = NeutronRouter::new(false, (None, None));
                    let _daemon = enforce(&neutron.topo, n);
                    blast(&neutron.topo, secs)
                }
            };
            samples.entry(router).or_default().push(rate);
        }
        eprintln!("bench: fixed cost round {} of {rounds} done", round + 1);
    }
    samples.into_iter().map(|(k, v)| (k, median(v))).collect()
}
