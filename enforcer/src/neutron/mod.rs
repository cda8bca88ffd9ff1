//! Following Neutron: the routers hosted on this node (their `qrouter-` or
//! `snat-` namespaces) get exactly the conntrack helpers Neutron holds for
//! them. Neutron is the source of truth; an outage of Neutron or Keystone
//! leaves enforcement as last applied.
//!
//! * [`config`]: the `[neutron]` section, credentials in keystoneauth's
//!   names or a cloud of `clouds.yaml`;
//! * [`client`]: Keystone v3 login, the service catalog and Neutron's API;
//! * [`plan`]: what a poll changes, decided without touching the kernel.

pub mod client;
pub mod config;
pub mod plan;

pub use config::NeutronConfig;
