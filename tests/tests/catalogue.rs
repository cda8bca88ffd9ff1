//! The helper catalogue comes from what the running kernel accepts.

use enforcer::{
    api::Protocol::{Tcp, Udp},
    catalogue::Family::{Ipv4, Ipv6},
    kernel::probe,
};
use enforcer_tests::require_root;

#[test]
fn probe_finds_what_this_kernel_has() {
    require_root();
    let offers = probe::probe().expect("probing");
    let has = |name: &str, p, f| offers.iter().any(|o| o.kind.name == name && o.protocol == p && o.family == f);
    // Verified on this kind of machine (DESIGN.md, "Helper names").
    for (name, p) in [("ftp", Tcp), ("tftp", Udp), ("sip", Udp), ("sip", Tcp), ("sane", Tcp), ("amanda", Udp), ("Q.931", Tcp), ("RAS", Udp)] {
        assert!(has(name, p, Ipv4) && has(name, p, Ipv6), "{name}/{p:?} in both families");
    }
    for (name, p) in [("irc", Tcp), ("pptp", Tcp), ("snmp", Udp), ("netbios-ns", Udp)] {
        assert!(has(name, p, Ipv4) && !has(name, p, Ipv6), "{name}/{p:?} IPv4 only");
    }
}
