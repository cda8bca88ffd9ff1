//! The helper catalogue comes from what the running kernel accepts.

use enforcer::{
    api::Protocol::{Tcp, Udp},
    api::Family::{Ipv4, Ipv6},
    kernel::probe,
};
use enforcer_tests::require_root;

#[test]
fn probe_finds_what_this_kernel_has() {
    require_root();
    let offers = probe::probe().expect("probing");
    let has = |name: &str, p, f| offers.iter().any(|o| o.kind.name == name && o.protocol == p && o.family == f);
    // The helpers a stock Debian kernel builds in, by family (the kernel has
    // no IPv6 irc, pptp, snmp or netbios-ns helper).
    for (name, p) in [("ftp", Tcp), ("tftp", Udp), ("sip", Udp), ("sip", Tcp), ("sane", Tcp), ("amanda", Udp), ("Q.931", Tcp), ("RAS", Udp)] {
        assert!(has(name, p, Ipv4) && has(name, p, Ipv6), "{name}/{p:?} in both families");
    }
    for (name, p) in [("irc", Tcp), ("pptp", Tcp), ("snmp", Udp), ("netbios-ns", Udp)] {
        assert!(has(name, p, Ipv4) && !has(name, p, Ipv6), "{name}/{p:?} IPv4 only");
    }
}

#[test]
fn allowed_helpers_narrow_what_is_offered_and_installed() {
    use enforcer_tests::{Daemon, Topology};
    let topo = Topology::new();
    let config = std::env::temp_dir().join(enforcer_tests::unique("cfg"));
    std::fs::write(&config, "allowed_helpers = [\"ftp\", \"sip:udp\", \"irc\"]\n").unwrap();
    let daemon = Daemon::start_with(None, &["--config", config.to_str().unwrap()]);
    std::fs::remove_file(&config).unwrap();
    let offered = daemon.cli(&["catalogue", "-o", "json"]).ok().json();
    assert_eq!(
        offered,
        serde_json::json!([
            {"helper": "ftp", "protocols": ["tcp"], "families": ["ipv4", "ipv6"], "usual_port": 21},
            {"helper": "sip", "protocols": ["udp"], "families": ["ipv4", "ipv6"], "usual_port": 5060},
            {"helper": "irc", "protocols": ["tcp"], "families": ["ipv4"], "usual_port": 6667},
        ])
    );
    daemon.add_router(&topo.router_id);
    let r = topo.router_id.as_str();
    let out = daemon.cli(&["helper", "create", r, "--protocol", "udp", "--port", "69", "--helper", "tftp"]);
    assert!(out.code != 0 && out.stderr.contains("not available here"), "{}", out.stderr);
    let out = daemon.cli(&["helper", "create", r, "--protocol", "tcp", "--port", "5060", "--helper", "sip"]);
    assert!(out.code != 0 && out.stderr.contains("supports udp"), "{}", out.stderr);
    daemon.create_helper(r, "udp", 5060, "sip");
    // The glue has a ct helper object for exactly what is offered.
    let glue: serde_json::Value = serde_json::from_str(&topo.router.sh("nft", &["-j", "list", "table", "inet", "enforcer"])).unwrap();
    let mut objects: Vec<String> = glue["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| Some(format!("{}/{}", o.get("ct helper")?["type"].as_str()?, o["ct helper"]["protocol"].as_str()?)))
        .collect();
    objects.sort();
    assert_eq!(objects, ["ftp/tcp", "irc/tcp", "sip/udp"], "{glue}");
}
