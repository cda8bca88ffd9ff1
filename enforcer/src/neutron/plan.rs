//! What one poll of Neutron changes on this node, decided from plain data:
//! the router namespaces here, Neutron's router list, and the revisions
//! applied last time. No kernel and no network, so it is unit tested.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::api::Protocol;

/// A router as Neutron lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NeutronRouter {
    pub id: String,
    pub project_id: String,
    /// Bumped by Neutron on every change of the router, its helpers too.
    pub revision_number: u64,
}

/// A conntrack helper as Neutron holds it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NeutronHelper {
    pub id: String,
    pub protocol: String,
    pub port: i64,
    pub helper: String,
}

/// The kernel's name of Neutron's helper `name` over `protocol`: Neutron
/// has one `h323` where the kernel has Q.931 (tcp) and RAS (udp).
pub fn kernel_name(name: &str, protocol: Protocol) -> &str {
    match (name, protocol) {
        ("h323", Protocol::Tcp) => "Q.931",
        ("h323", Protocol::Udp) => "RAS",
        _ => name,
    }
}

/// The routers hosted here, from namespace names: `qrouter-<uuid>`, and
/// `snat-<uuid>` of a distributed router, whose centralized SNAT part is
/// where Neutron applies helpers (so it wins over `qrouter-`).
pub fn hosted(namespaces: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for prefix in ["qrouter-", "snat-"] {
        for ns in namespaces {
            if let Some(id) = ns.strip_prefix(prefix)
                && crate::validate::uuid("router_id", id).is_ok_and(|canonical| canonical == id)
            {
                out.insert(id.to_string(), ns.clone());
            }
        }
    }
    out
}

/// What to do with one router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch its helpers and apply them (new here, or changed in Neutron).
    Sync { router: NeutronRouter, netns: String },
    /// Synced before, but missing from the list: ask Neutron about this
    /// router itself; only a 404 removes it.
    Confirm { id: String },
    /// Its namespace is gone from this node.
    Remove { id: String },
}

/// The steps of one poll. `synced`: router id -> revision applied here.
/// `locals`: routers added by hand, which the sync never touches.
pub fn steps(
    hosted: &BTreeMap<String, String>,
    listed: &[NeutronRouter],
    synced: &BTreeMap<String, Option<u64>>,
    locals: &BTreeSet<String>,
) -> Vec<Step> {
    let listed_ids: BTreeSet<&str> = listed.iter().map(|r| r.id.as_str()).collect();
    let mut out = Vec::new();
    for router in listed {
        let Some(netns) = hosted.get(&router.id) else { continue };
        if locals.contains(&router.id) {
            continue;
        }
        if synced.get(&router.id).copied().flatten() != Some(router.revision_number) {
            out.push(Step::Sync { router: router.clone(), netns: netns.clone() });
        }
    }
    for id in synced.keys() {
        if !hosted.contains_key(id) {
            out.push(Step::Remove { id: id.clone() });
        } else if !listed_ids.contains(id.as_str()) {
            out.push(Step::Confirm { id: id.clone() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b0c6f7e-3c1a-4c47-9b7c-1f6a7e0d0a01";
    const B: &str = "0b0c6f7e-3c1a-4c47-9b7c-1f6a7e0d0a02";
    const C: &str = "0b0c6f7e-3c1a-4c47-9b7c-1f6a7e0d0a03";

    fn router(id: &str, revision: u64) -> NeutronRouter {
        NeutronRouter { id: id.into(), project_id: "p".into(), revision_number: revision }
    }

    #[test]
    fn namespaces_name_the_hosted_routers_and_snat_wins() {
        let hosted = hosted(&[
            format!("qrouter-{A}"),
            format!("qrouter-{B}"),
            format!("snat-{B}"),
            "qrouter-not-a-uuid".into(),
            format!("qrouter-{}", A.to_uppercase()),
            format!("fip-{C}"),
            "enf123-c".into(),
        ]);
        assert_eq!(hosted.len(), 2, "{hosted:?}");
        assert_eq!(hosted[A], format!("qrouter-{A}"));
        assert_eq!(hosted[B], format!("snat-{B}"));
    }

    #[test]
    fn h323_maps_by_protocol() {
        assert_eq!(kernel_name("h323", Protocol::Tcp), "Q.931");
        assert_eq!(kernel_name("h323", Protocol::Udp), "RAS");
        assert_eq!(kernel_name("ftp", Protocol::Tcp), "ftp");
    }

    #[test]
    fn only_changed_routers_are_fetched() {
        let hosted: BTreeMap<String, String> = [A, B].iter().map(|id| (id.to_string(), format!("qrouter-{id}"))).collect();
        let listed = vec![router(A, 5), router(B, 7), router(C, 1)];
        let synced: BTreeMap<String, Option<u64>> = [(A.to_string(), Some(5)), (B.to_string(), Some(6))].into();
        let steps = steps(&hosted, &listed, &synced, &BTreeSet::new());
        assert_eq!(steps, vec![Step::Sync { router: router(B, 7), netns: format!("qrouter-{B}") }], "C is not hosted here");
    }

    #[test]
    fn an_empty_list_never_removes_a_router_by_itself() {
        let hosted: BTreeMap<String, String> = [(A.to_string(), format!("qrouter-{A}"))].into();
        let synced: BTreeMap<String, Option<u64>> = [(A.to_string(), Some(5)), (B.to_string(), Some(1))].into();
        let steps = steps(&hosted, &[], &synced, &BTreeSet::new());
        assert_eq!(steps, vec![Step::Confirm { id: A.into() }, Step::Remove { id: B.into() }]);
    }

    #[test]
    fn local_routers_are_left_alone() {
        let hosted: BTreeMap<String, String> = [(A.to_string(), format!("qrouter-{A}"))].into();
        let steps = steps(&hosted, &[router(A, 1)], &BTreeMap::new(), &[A.to_string()].into());
        assert!(steps.is_empty());
    }
}
