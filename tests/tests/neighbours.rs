//! enforcer shares the tc hooks of a router interface: a classic filter and
//! another tcx program on the same interface still see every packet.

use std::path::PathBuf;

use aya::{
    EbpfLoader,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use enforcer_common::{IPPROTO_TCP, MAP_RULES, RuleKey, RuleValue};
use enforcer_tests::{
    Daemon, Family, Topology,
    peers::{FtpClient, FtpServer},
    run, unique,
};

/// Packets counted by the classic ingress filter at `pref` on `dev`.
fn classic_count(topo: &Topology, dev: &str, pref: &str) -> u64 {
    let out = topo.router.sh("tc", &["-s", "-j", "filter", "show", "dev", dev, "ingress", "pref", pref]);
    let filters: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("tc JSON ({e}): {out}"));
    filters
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["options"]["actions"][0]["stats"]["packets"].as_u64())
        .sum()
}

#[test]
fn a_classic_filter_and_a_second_tcx_program_see_every_packet() {
    let topo = Topology::new();
    // Someone else's classic filter on the client side of the router: every
    // TCP packet to port 21, counted by a mirred action that mirrors it to a
    // veth whose peer is down (so the copy goes nowhere); then a verdict,
    // which ends the hook.
    topo.router.sh("ip", &["link", "add", "m0", "type", "veth", "peer", "name", "m1"]);
    topo.router.sh("ip", &["link", "set", "m0", "up"]);
    topo.router.sh("tc", &["qdisc", "add", "dev", "r0", "clsact"]);
    topo.router.sh(
        "tc",
        &["filter", "add", "dev", "r0", "ingress", "pref", "10", "protocol", "ip", "u32", "match", "ip", "protocol", "6", "0xff", "match",
          "ip", "dport", "21", "0xffff", "action", "mirred", "egress", "mirror", "dev", "m0"],
    );
    // Another BPF user's tcx program, attached after enforcer: an instance
    // of enforcer's own tag program on maps of its own, counting port 21.
    let other = PathBuf::from("/sys/fs/bpf").join(unique("other"));
    let mut neighbour = enforcer::kernel::Datapath::load(&other, enforcer_common::MarkLayout::DEFAULT, enforcer_common::DEFAULT_MAX_RULES, 1_000_000_000).unwrap();
    neighbour.allow(0, IPPROTO_TCP, 21, 1, 1).unwrap();
    let mut ebpf = EbpfLoader::new().default_map_pin_directory(&other).load(enforcer::kernel::PROGRAMS).unwrap();
    let rules: aya::maps::HashMap<_, RuleKey, RuleValue> = ebpf.map(MAP_RULES).unwrap().try_into().unwrap();
    assert_eq!(rules.keys().count(), 1, "the neighbour shares its own maps, not enforcer's");

    let daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let prog: &mut SchedClassifier = ebpf.program_mut("tag").unwrap().try_into().unwrap();
    prog.load().unwrap();
    let link = enforcer::kernel::netns::run_in(std::path::Path::new(&topo.router.path()), || {
        let id = prog.attach_with_options("r0", TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::last()))?;
        Ok(prog.take_link(id)?)
    })
    .expect("attaching the neighbour with tcx");

    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("list passive");
    ftp.ok("list active");
    drop(ftp);

    let ours = daemon.dump()["slots"][0]["tagged"].as_u64().unwrap();
    let theirs: u64 = enforcer::kernel::dump::read(&other).unwrap().slots.iter().map(|s| s.tagged).sum();
    let classic = classic_count(&topo, "r0", "10");
    assert!(ours > 5, "enforcer tagged the control connection: {ours}");
    assert_eq!(theirs, ours, "the second tcx program saw every packet enforcer saw");
    assert_eq!(classic, ours, "the classic filter saw every packet enforcer saw");
    drop(link);
    drop(neighbour);
    let _ = std::fs::remove_dir_all(&other);
    let _ = run(topo.router.cmd("tc").args(["qdisc", "del", "dev", "r0", "clsact"]));
}
