//! enforcer following Neutron: real Keystone and neutron-server on
//! loopback, routers and conntrack helpers created through Neutron's REST
//! API, router namespaces on this host.

use enforcer_tests::openstack::OpenStack;

#[test]
fn a_helper_change_bumps_the_routers_revision_number() {
    let os = OpenStack::start(3600);
    let router = os.create_router("u1", "r1");
    let revision = |os: &OpenStack| {
        let (status, body) = os.neutron("admin", "GET", &format!("/routers/{router}?fields=revision_number"), None);
        assert_eq!(status, 200, "{body}");
        body["router"]["revision_number"].as_u64().unwrap()
    };
    let before = revision(&os);
    let helper = os.create_helper("u1", &router, "tcp", 21, "ftp");
    let created = revision(&os);
    assert!(created > before, "create: {before} -> {created}");
    os.delete("u1", &format!("/routers/{router}/conntrack_helpers/{helper}"));
    assert!(revision(&os) > created, "delete bumps it too");
}
