//! enforcer: conntrack helpers per router, enforced in the kernel fast path.

pub mod api;
pub mod audit;
pub mod auth;
pub mod catalogue;
pub mod client;
pub mod config;
pub mod daemon;
pub mod kernel;
pub mod memory;
pub mod neutron;
pub mod store;
pub mod validate;
