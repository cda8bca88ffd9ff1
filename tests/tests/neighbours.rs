//! enforcer shares the tc hooks of a router interface: a classic filter and
//! another tcx program on the same interface still see every packet.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use enforcer::kernel::Datapath;
use enforcer_common::{IPPROTO_TCP, MAP_RULES, RuleKey, RuleValue};
use enforcer_tests::{
    Daemon, Family, Netns, Topology,
    neutron::{FLOATING_V4, NeutronRouter},
    peers::{FtpClient, FtpServer},
    run, unique,
};

/// Packets counted by the classic ingress filters at `pref` under `parent`
/// on `dev` (`ingress` for clsact, `parent ffff:` for an ingress qdisc).
fn classic_count(ns: &Netns, dev: &str, parent: &[&str], pref: &str) -> u64 {
    let mut args = vec!["-s", "-j", "filter", "show", "dev", dev];
    args.extend_from_slice(parent);
    args.extend(["pref", pref]);
    let out = ns.sh("tc", &args);
    let filters: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("tc JSON ({e}): {out}"));
    filters
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["options"]["actions"][0]["stats"]["packets"].as_u64())
        .sum()
}

/// A veth in the router whose peer is down: a mirred mirror to it counts a
/// packet and the copy goes nowhere.
fn mirror_sink(ns: &Netns) {
    ns.sh("ip", &["link", "add", "m0", "type", "veth", "peer", "name", "m1"]);
    ns.sh("ip", &["link", "set", "m0", "up"]);
}

/// Another BPF user's tcx program: an instance of enforcer's own tag
/// program on maps of its own, counting tcp/21, attached after enforcer.
struct Neighbour {
    pins: PathBuf,
    _link: aya::programs::tc::SchedClassifierLink,
    _ebpf: Ebpf,
    _datapath: Datapath,
}

impl Neighbour {
    fn attach(ns: &Netns, iface: &str) -> Self {
        let pins = PathBuf::from("/sys/fs/bpf").join(unique("other"));
        let mut datapath = Datapath::load(&pins, enforcer_common::MarkLayout::DEFAULT, enforcer_common::DEFAULT_MAX_RULES, Default::default()).unwrap();
        datapath.allow(0, IPPROTO_TCP, 21, 1, 1).unwrap();
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&pins).load(enforcer::kernel::PROGRAMS).unwrap();
        let rules: aya::maps::HashMap<_, RuleKey, RuleValue> = ebpf.map(MAP_RULES).unwrap().try_into().unwrap();
        assert_eq!(rules.keys().count(), 1, "the neighbour shares its own maps, not enforcer's");
        let prog: &mut SchedClassifier = ebpf.program_mut("tag").unwrap().try_into().unwrap();
        prog.load().unwrap();
        let link = enforcer::kernel::netns::run_in(Path::new(&ns.path()), || {
            let id = prog.attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::last()))?;
            Ok(prog.take_link(id)?)
        })
        .expect("attaching the neighbour with tcx");
        Self { pins, _link: link, _ebpf: ebpf, _datapath: datapath }
    }

    /// Packets the neighbour tagged.
    fn tagged(&self) -> u64 {
        enforcer::kernel::dump::read(&self.pins).unwrap().slots.iter().map(|s| s.tagged).sum()
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

#[test]
fn a_classic_filter_and_a_second_tcx_program_see_every_packet() {
    let topo = Topology::new();
    // Someone else's classic filter on the client side of the router: every
    // TCP packet to port 21, counted by a mirror; then a verdict, which
    // ends the hook.
    mirror_sink(&topo.router);
    topo.router.sh("tc", &["qdisc", "add", "dev", "r0", "clsact"]);
    topo.router.sh(
        "tc",
        &["filter", "add", "dev", "r0", "ingress", "pref", "10", "protocol", "ip", "u32", "match", "ip", "protocol", "6", "0xff", "match",
          "ip", "dport", "21", "0xffff", "action", "mirred", "egress", "mirror", "dev", "m0"],
    );

    let daemon = Daemon::enforcing(&topo);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let neighbour = Neighbour::attach(&topo.router, "r0");

    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("list passive");
    ftp.ok("list active");
    drop(ftp);

    let ours = daemon.dump()["slots"][0]["tagged"].as_u64().unwrap();
    let classic = classic_count(&topo.router, "r0", &["ingress"], "10");
    assert!(ours > 5, "enforcer tagged the control connection: {ours}");
    assert_eq!(neighbour.tagged(), ours, "the second tcx program saw every packet enforcer saw");
    assert_eq!(classic, ours, "the classic filter saw every packet enforcer saw");
    drop(neighbour);
    let _ = run(topo.router.cmd("tc").args(["qdisc", "del", "dev", "r0", "clsact"]));
}

#[test]
fn in_a_neutron_router_the_floating_ip_qos_filter_and_a_second_tcx_program_see_every_packet() {
    let n = NeutronRouter::new(true, (None, None));
    n.open_inbound_ftp();
    let topo = &n.topo;
    let qg = topo.server_if.as_str();
    // Neutron's floating IP QoS (l3_tc_lib) on the gateway: an `ingress`
    // qdisc with a u32 filter at prio 1 on the floating IP. Neutron's
    // action is `police`, which this kernel does not build; a mirror
    // counts instead.
    mirror_sink(&topo.router);
    topo.router.sh("tc", &["qdisc", "add", "dev", qg, "ingress"]);
    topo.router.sh(
        "tc",
        &["filter", "add", "dev", qg, "parent", "ffff:", "protocol", "ip", "prio", "1", "u32", "match", "ip", "dst", FLOATING_V4,
          "action", "mirred", "egress", "mirror", "dev", "m0"],
    );
    let _server = FtpServer::start_in(&topo.client, Topology::CLIENT_V4);
    let daemon = Daemon::start();
    let qdisc = || topo.router.sh("tc", &["qdisc", "show", "dev", qg]);

    if daemon.cli(&["status", "-o", "json"]).ok().json()["attach"] == "netlink" {
        // Netlink attach needs clsact, which cannot sit beside an ingress
        // qdisc: the router is refused, with the reason, and nothing of
        // Neutron's changes.
        let out = daemon.cli(&["router", "add", &topo.router_id]);
        assert_ne!(out.code, 0, "{}", out.stdout);
        assert!(out.stderr.contains(qg) && out.stderr.contains("`ingress` qdisc"), "{}", out.stderr);
        assert!(qdisc().contains("qdisc ingress ffff:"), "{}", qdisc());
        let qr = topo.router.sh("tc", &["qdisc", "show", "dev", &topo.client_if]);
        assert!(!qr.contains("clsact"), "nothing left behind on the other interface: {qr}");
        let mut ftp = FtpClient::login_from(&topo.server, FLOATING_V4);
        ftp.ok("noop");
        assert!(classic_count(&topo.router, qg, &["parent", "ffff:"], "1") > 0, "Neutron's filter still counts");
        return;
    }

    daemon.add_router(&topo.router_id);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let neighbour = Neighbour::attach(&topo.router, qg);
    let before = classic_count(&topo.router, qg, &["parent", "ffff:"], "1");
    // Only control traffic to the floating IP: every packet the filter
    // matches is one enforcer tags.
    let mut ftp = FtpClient::login_from(&topo.server, FLOATING_V4);
    for _ in 0..3 {
        ftp.ok("noop");
    }
    drop(ftp);

    // The three counts, read once the connection's last packets (its close)
    // have passed: a packet between two reads would count in one only.
    let counts = || (daemon.dump()["slots"][0]["tagged"].as_u64().unwrap(), neighbour.tagged(), classic_count(&topo.router, qg, &["parent", "ffff:"], "1") - before);
    let mut last = counts();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = counts();
        if now == last {
            break;
        }
        last = now;
    }
    let (ours, theirs, neutron) = last;
    assert!(ours > 5, "enforcer tagged the control connection: {ours}");
    assert_eq!(theirs, ours, "the second tcx program saw every packet enforcer saw");
    assert_eq!(neutron, ours, "Neutron's QoS filter saw every packet");
    assert!(qdisc().contains("qdisc ingress ffff:"), "Neutron's qdisc untouched: {}", qdisc());
}
