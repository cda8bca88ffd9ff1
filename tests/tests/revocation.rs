//! Complete revocation: after a delete nothing of the helper remains in the
//! router's kernel state, and the revoked connections stay dead.

use std::time::Duration;

use enforcer_tests::{
    Daemon, Family, Topology,
    peers::{FtpClient, FtpRouter, FtpServer, PptpCall, PptpServer, TftpServer, tftp_get},
};

fn count(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// A tftp rule on the router of `topo`, one transfer through it, and the
/// rule's delete: (conntrack entries removed, walks of the table).
fn revoke_a_transfer(daemon: &Daemon, topo: &Topology) -> (Option<u64>, Option<u64>) {
    let id = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(topo, Family::V4));
    let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
    (report["conntrack_entries_removed"].as_u64(), report["conntrack_dumps"].as_u64())
}

/// The conntrack index's links pinned for the daemon's routers.
fn index_links(daemon: &Daemon) -> usize {
    daemon.pins().into_iter().filter(|p| p.contains("/ctindex/")).count()
}

#[test]
fn delete_leaves_no_trace_and_spares_other_rules_and_routers() {
    let a = Topology::new();
    let b = Topology::new();
    let daemon = Daemon::start();
    daemon.add_router(&a.router_id);
    daemon.add_router(&b.router_id);
    let ftp_a = daemon.create_helper(&a.router_id, "tcp", 21, "ftp");
    let tftp_a = daemon.create_helper(&a.router_id, "udp", 69, "tftp");
    daemon.create_helper(&b.router_id, "tcp", 21, "ftp");
    let _fa = FtpServer::start(&a, Family::V4);
    let _ta = TftpServer::start(&a, Family::V4);
    let _fb = FtpServer::start(&b, Family::V4);

    // Router A: a finished data connection, an open expectation (PASV not
    // yet used), and a TFTP flow of the other rule. Router B: its own ftp.
    let mut old = FtpClient::login(&a, Family::V4);
    old.ok("list passive");
    old.ok("pasv");
    assert!(tftp_get(&a, Family::V4));
    let mut on_b = FtpClient::login(&b, Family::V4);
    on_b.ok("list passive");
    on_b.ok("pasv");
    assert_eq!(count(&a.conntrack(&["-L", "expect"]), "ftp"), 1, "the pending expectation:\n{}", a.conntrack(&["-L", "expect"]));
    let b_before = b.conntrack(&["-L"]);

    let report = daemon.cli(&["helper", "delete", &a.router_id, &ftp_a, "-o", "json"]).ok().json();
    assert!(report["conntrack_entries_removed"].as_u64().unwrap() >= 2, "control + data entries: {report}");
    assert_eq!(report["slot_released"], true, "{report}");
    assert!(report.get("flush_error").is_none(), "{report}");

    let ct = a.conntrack(&["-L"]);
    assert_eq!(count(&ct, "helper=ftp"), 0, "no entry with the ftp helper left:\n{ct}");
    let ftp_mark = format!("mark={}", 0x1000_1000u32); // helper ftp, slot 1
    assert_eq!(count(&ct, &ftp_mark), 0, "no entry carries the revoked slot:\n{ct}");
    let expect = a.conntrack(&["-L", "expect"]);
    assert_eq!(count(&expect, "ftp"), 0, "the expectation is gone:\n{expect}");
    assert_eq!(count(&ct, "helper=tftp"), 1, "the other rule's entry is untouched:\n{ct}");
    let b_after = b.conntrack(&["-L"]);
    assert_eq!(count(&b_after, "helper=ftp"), count(&b_before, "helper=ftp"), "router B untouched:\n{b_after}");
    assert_eq!(count(&b.conntrack(&["-L", "expect"]), "ftp"), 1, "router B's expectation untouched");
    on_b.ok("noop");

    old.fails("noop");
    let mut fresh = FtpClient::login(&a, Family::V4);
    fresh.ok("noop");
    fresh.fails("list passive");
    assert_eq!(count(&a.conntrack(&["-L"]), "helper=ftp"), 0, "a new control connection gets no helper");

    // Router A's conntrack index is complete from its add (its namespace
    // never had enforcer's chain): no revocation walks the table. It holds
    // the transfer's request and its RELATED data flow.
    assert_eq!(report["conntrack_dumps"], 0, "{report}");
    let tftp = daemon.cli(&["helper", "delete", &a.router_id, &tftp_a, "-o", "json"]).ok().json();
    assert_eq!((tftp["conntrack_entries_removed"].as_u64(), tftp["conntrack_dumps"].as_u64()), (Some(2), Some(0)), "{tftp}");
    assert_eq!(tftp["slot_released"], true, "{tftp}");
    let ct = a.conntrack(&["-L"]);
    assert_eq!(count(&ct, "helper=tftp"), 0, "the tftp entry is gone:\n{ct}");
    assert_eq!(count(&ct, "dport=69"), 0, "no entry of the transfer is left:\n{ct}");
}

/// With a router that forwards everything, only the datapath can keep a
/// revoked connection dead once its conntrack entry is gone (conntrack picks
/// the connection up again mid-stream, unmarked).
#[test]
fn revoked_connection_stays_dead_a_minute_later() {
    let FtpRouter { topo, daemon, helper_id: id, server: _server } = FtpRouter::new(Topology::without_firewall(), Family::V4);
    let mut old = FtpClient::login(&topo, Family::V4);
    old.ok("list passive");

    let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
    assert!(report["flows_kept_dead"].as_u64().unwrap() >= 2, "{report}");
    old.fails("noop");
    std::thread::sleep(Duration::from_secs(60));
    old.fails("noop");
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert!(status["revoked_flows"].as_u64().unwrap() >= 2, "{status}");
    let dump = daemon.dump();
    assert!(dump["slots"].as_array().unwrap().iter().all(|s| s["state"] != "live"), "{dump}");

    // A new connection passes (this router has no firewall) with no helper.
    let mut fresh = FtpClient::login(&topo, Family::V4);
    fresh.ok("noop");
    let ct = topo.conntrack(&["-L"]);
    assert_eq!(count(&ct, "helper=ftp"), 0, "{ct}");
}

/// A PPTP call's data is a GRE connection RELATED to its control
/// connection, keyed by call IDs instead of ports: the revocation removes
/// both and keeps the GRE flow dropped, whether it finds them in the
/// conntrack index or, with the index off, in a walk of the table.
#[test]
fn a_pptp_call_s_gre_data_is_revoked_with_its_control_connection() {
    // A router of its own each way: the first call's control connection,
    // revoked, retransmits its close, which a new rule on the same port
    // would take up again.
    for (config, walks) in [("", 0), ("conntrack_index_max = 0\n", 2)] {
        let topo = Topology::without_firewall();
        let _pac = PptpServer::start(&topo);
        let config = enforcer_tests::Scratch::file("cfg", config);
        let daemon = Daemon::start_with(None, &["--config", config.path()]);
        daemon.add_router(&topo.router_id);
        let gre_entries = || count(&topo.conntrack(&["-L", "-p", "gre"]), "dstkey=");
        let id = daemon.create_helper(&topo.router_id, "tcp", 1723, "pptp");
        let mut call = PptpCall::start(&topo, 0x1101);
        assert!(call.ping(), "the call's data passes while its helper is on");
        let ct = topo.conntrack(&["-L"]);
        assert_eq!(gre_entries(), 1, "the call's GRE connection:\n{ct}");
        assert_eq!(count(&ct, "helper=pptp"), 1, "{ct}");

        let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
        assert_eq!(report["conntrack_entries_removed"], 2, "control and GRE: {report}");
        assert_eq!(report["conntrack_dumps"], walks, "{report}");
        assert_eq!(report["flows_kept_dead"], 4, "both directions of both: {report}");
        assert_eq!(gre_entries(), 0, "{}", topo.conntrack(&["-L"]));
        assert!(!call.ping(), "a GRE packet of the revoked call passed the router");
        assert_eq!(gre_entries(), 0, "the dropped packet made no entry: {}", topo.conntrack(&["-L"]));
    }
}

/// A UDP flow from port 5060 to port 5060 that never goes quiet, as SIP
/// phones keep one: the client sends every 50 ms; the server counts what
/// arrives into a file.
struct FixedPortFlow {
    _server: enforcer_tests::Process,
    _client: enforcer_tests::Process,
    count: enforcer_tests::Scratch,
}

impl FixedPortFlow {
    fn start(topo: &Topology) -> Self {
        let count = enforcer_tests::Scratch::dir("count");
        // The count is replaced whole (written aside, then renamed): a
        // reader never sees the file truncated mid-write, which would read
        // as no datagrams at all.
        let server = "import os,socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],5060))\nn=0\nwhile True:\n s.recv(2048)\n n+=1\n open(sys.argv[2]+'.new','w').write(str(n))\n os.replace(sys.argv[2]+'.new',sys.argv[2])\n";
        let client = "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],5060))\nwhile True:\n s.sendto(b'hello',(sys.argv[2],5060))\n time.sleep(0.05)\n";
        let server = enforcer_tests::Process::spawn(
            "udp server",
            topo.server.cmd("python3").args(["-c", server, Topology::SERVER_V4]).arg(count.0.join("n")),
        );
        let client = enforcer_tests::Process::spawn(
            "udp client",
            topo.client.cmd("python3").args(["-c", client, Topology::CLIENT_V4, Topology::SERVER_V4]),
        );
        Self { _server: server, _client: client, count }
    }

    fn received(&self) -> u64 {
        std::fs::read_to_string(self.count.0.join("n")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Whether datagrams arrive within `wait`.
    fn passes(&self, wait: Duration) -> bool {
        let before = self.received();
        std::thread::sleep(wait);
        self.received() > before
    }
}

#[test]
fn a_revoked_flow_that_never_goes_quiet_passes_again_when_its_rule_returns() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let sip = daemon.create_helper(&topo.router_id, "udp", 5060, "sip");
    let flow = FixedPortFlow::start(&topo);
    assert!(flow.passes(Duration::from_secs(2)), "the flow passes with its rule");

    daemon.delete_helper(&topo.router_id, &sip);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!flow.passes(Duration::from_secs(1)), "revoked: dropped while it keeps talking");

    // The operator creates the rule again: the flow is wanted, and passes
    // at once, though it never went quiet.
    daemon.create_helper(&topo.router_id, "udp", 5060, "sip");
    assert!(flow.passes(Duration::from_secs(1)), "the flow passes again with its rule back");
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert_eq!(status["revoked_flows"], 0, "its revoked entries were cleared: {status}");
}

/// `debug datapath on` has the programs describe the drops of a revoked
/// connection in the daemon's log, at most the number asked for; off, they
/// describe none.
#[test]
fn debug_datapath_describes_drops_only_while_on() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let ftp = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut first = FtpClient::login(&topo, Family::V4);
    let mut second = FtpClient::login(&topo, Family::V4);
    let described = || count(&daemon.log(), "dropped: router");

    let on = daemon.cli(&["debug", "datapath", "on", "--drops", "3"]).ok();
    assert!(on.stdout.contains("on, for the next 3 drops"), "{}", on.stdout);
    daemon.delete_helper(&topo.router_id, &ftp);
    // The client's retransmissions are dropped as the rule's: more than 3.
    first.fails("noop");
    enforcer_tests::wait_for("drops described in the log", 10, || described() >= 3);
    std::thread::sleep(Duration::from_millis(500));
    let log = daemon.log();
    assert_eq!(described(), 3, "no more than asked for:\n{log}");
    assert!(log.contains("datapath") && log.contains("slot 1"), "names the router's slot:\n{log}");
    let dump = daemon.dump();
    assert!(dump["slots"].as_array().unwrap().iter().map(|s| s["dropped"].as_u64().unwrap()).sum::<u64>() > 3, "more drops than described: {dump}");

    daemon.cli(&["debug", "datapath", "on", "--drops", "50"]).ok();
    let off = daemon.cli(&["debug", "datapath", "off"]).ok();
    assert!(off.stdout.contains("off"), "{}", off.stdout);
    second.fails("noop");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(described(), 3, "off: nothing more described");
    // Administrators only; the change is audited.
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    assert_eq!(audit.as_array().unwrap().iter().filter(|e| e["op"] == "debug_datapath").count(), 3, "{audit}");
    let refused = daemon.cli(&["debug", "datapath", "on", "--drops", "0"]);
    assert!(refused.code != 0 && refused.stderr.contains("drops"), "0 drops is not `on`: {}", refused.stderr);
}

/// The conntrack index outlives the daemon (its program and maps are
/// pinned): after a restart a revocation still finds the rule's
/// connections without walking the conntrack table. Connections that ended
/// by themselves leave the index at its next pruning.
#[test]
fn the_conntrack_index_outlives_a_restart_and_forgets_connections_that_ended() {
    let topo = Topology::new();
    let config = enforcer_tests::Scratch::file("cfg", "conntrack_index_prune_secs = 1\n");
    let mut daemon = Daemon::start_with(None, &["--config", config.path()]);
    daemon.add_router(&topo.router_id);
    // A rule that stays: the router always has a slot in use, so its
    // index is never parked.
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _tftp = TftpServer::start(&topo, Family::V4);
    let delete = |daemon: &Daemon, id: &str| daemon.cli(&["helper", "delete", &topo.router_id, id, "-o", "json"]).ok().json();
    let transfers = || count(&topo.conntrack(&["-L"]), "dport=69");

    let second = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(&topo, Family::V4));
    assert_eq!(transfers(), 1, "{}", topo.conntrack(&["-L"]));
    daemon.restart();
    let report = delete(&daemon, &second);
    assert_eq!((report["conntrack_entries_removed"].as_u64(), report["conntrack_dumps"].as_u64()), (Some(2), Some(0)), "{report}");
    assert_eq!(transfers(), 0, "{}", topo.conntrack(&["-L"]));

    // Connections that end without enforcer's doing: after a pruning the
    // index no longer names them, so the revocation has nothing to remove.
    let third = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(&topo, Family::V4));
    topo.conntrack(&["-D", "-p", "udp"]);
    assert_eq!(transfers(), 0, "{}", topo.conntrack(&["-L"]));
    std::thread::sleep(Duration::from_secs(4));
    let report = delete(&daemon, &third);
    assert_eq!((report["conntrack_entries_removed"].as_u64(), report["conntrack_dumps"].as_u64()), (Some(0), Some(0)), "{report}");
    let log = daemon.log();
    assert!(!log.contains("pruning the conntrack index"), "{log}");

    // An index no program watches any more (its links unpinned behind the
    // daemon's back) is not trusted: the revocation walks the table, as
    // without an index, for the rule's entries and again for the check.
    let links: Vec<String> = daemon.pins().into_iter().filter(|p| p.contains("/ctindex/")).collect();
    assert_eq!(links.len(), 2, "one link per family: {links:?}");
    links.iter().for_each(|l| std::fs::remove_file(l).unwrap());
    let fourth = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(&topo, Family::V4));
    let report = delete(&daemon, &fourth);
    assert_eq!((report["conntrack_entries_removed"].as_u64(), report["conntrack_dumps"].as_u64()), (Some(2), Some(2)), "{report}");
    assert_eq!(transfers(), 0, "{}", topo.conntrack(&["-L"]));
}

/// An index an earlier version pinned with other layouts, or one of
/// another capacity, is not read as this start's: it starts again empty,
/// and the router's next revocation fills it from one walk. A capacity of
/// 0 turns the index off: its links leave the namespace and every
/// revocation walks.
#[test]
fn the_conntrack_index_starts_again_empty_when_its_layout_or_capacity_changes_and_0_turns_it_off() {
    let topo = Topology::new();
    let config = enforcer_tests::Scratch::file("cfg", "");
    let mut daemon = Daemon::start_with(None, &["--config", config.path()]);
    daemon.add_router(&topo.router_id);
    let _tftp = TftpServer::start(&topo, Family::V4);
    let revoke = |daemon: &Daemon| revoke_a_transfer(daemon, &topo);
    assert_eq!(revoke(&daemon), (Some(2), Some(0)));

    // The namespaces map as another version made it: other key and value sizes.
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    let pin = daemon.bpffs.join(enforcer_common::MAP_CT_NETNS);
    std::fs::remove_file(&pin).unwrap();
    aya::maps::MapData::from_pin(daemon.bpffs.join(enforcer_common::MAP_COUNTERS)).unwrap().pin(&pin).unwrap();
    daemon.restart();
    let log = daemon.log();
    assert!(log.contains("made by another version or with another capacity: starting it again empty"), "{log}");
    assert_eq!(revoke(&daemon), (Some(2), Some(1)), "filled again:\n{}", daemon.log());
    assert_eq!(revoke(&daemon), (Some(2), Some(0)));

    // Off: the links go, and a revocation walks for the entries and the check.
    std::fs::write(config.path(), "conntrack_index_max = 0\n").unwrap();
    daemon.restart();
    assert_eq!(index_links(&daemon), 0, "{:?}", daemon.pins());
    assert!(!daemon.bpffs.join(enforcer_common::MAP_CT_INDEX).exists());
    assert_eq!(revoke(&daemon), (Some(2), Some(2)));

    // On again with another capacity: a new index, filled by one walk.
    std::fs::write(config.path(), "conntrack_index_max = 4096\n").unwrap();
    daemon.restart();
    assert_eq!(index_links(&daemon), 2, "{:?}", daemon.pins());
    let index = aya::maps::MapData::from_pin(daemon.bpffs.join(enforcer_common::MAP_CT_INDEX)).unwrap();
    assert_eq!(index.info().unwrap().max_entries(), 4096);
    assert_eq!(revoke(&daemon), (Some(2), Some(1)));
    assert_eq!(revoke(&daemon), (Some(2), Some(0)));
}

/// A router removed while the daemon was down (an orphan of its pins at
/// the next start) may leave connections carrying its slots. A router
/// added in that namespace later fills its conntrack index from a walk, so
/// its revocation also removes what the orphan left with the same slot,
/// even with the orphan's glue table gone.
#[test]
fn a_router_added_where_an_orphan_left_connections_walks_once() {
    let topo = Topology::new();
    let mut daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let _tftp = TftpServer::start(&topo, Family::V4);
    let transfers = || count(&topo.conntrack(&["-L"]), "dport=69");
    daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(&topo, Family::V4));

    // The router is forgotten with the daemon down: a store without it.
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    std::fs::remove_dir_all(&daemon.state).unwrap();
    topo.router.sh("nft", &["delete", "table", "inet", "enforcer"]);
    daemon.restart();
    assert!(daemon.log().contains("orphans_removed=1"), "{}", daemon.log());

    daemon.add_router(&topo.router_id);
    let id = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
    assert!(tftp_get(&topo, Family::V4));
    assert_eq!(transfers(), 2, "the orphan's transfer and the new one:\n{}", topo.conntrack(&["-L"]));
    let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
    assert_eq!((report["conntrack_entries_removed"].as_u64(), report["conntrack_dumps"].as_u64()), (Some(4), Some(1)), "{report}");
    assert_eq!(transfers(), 0, "{}", topo.conntrack(&["-L"]));
}

/// A router with no slot in use has no connection carrying one: its
/// conntrack index program is taken off its namespace (parked), so its
/// packets do not cross the hook, and attached again before its next rule
/// goes in. The index stays complete throughout, also across a restart.
#[test]
fn the_conntrack_index_hook_leaves_a_router_without_rules_and_returns_before_its_next_rule() {
    let topo = Topology::new();
    let mut daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let _tftp = TftpServer::start(&topo, Family::V4);
    let parked = |daemon: &Daemon| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while index_links(daemon) != 0 {
            assert!(std::time::Instant::now() < deadline, "still attached: {:?}", daemon.pins());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let revoke = |daemon: &Daemon| {
        let id = daemon.create_helper(&topo.router_id, "udp", 69, "tftp");
        assert_eq!(index_links(daemon), 2, "attached before the rule went in: {:?}", daemon.pins());
        assert!(tftp_get(&topo, Family::V4));
        let report = daemon.cli(&["helper", "delete", &topo.router_id, &id, "-o", "json"]).ok().json();
        (report["conntrack_entries_removed"].as_u64(), report["conntrack_dumps"].as_u64())
    };
    assert_eq!(index_links(&daemon), 0, "a new router has no rule yet: {:?}", daemon.pins());
    assert_eq!(revoke(&daemon), (Some(2), Some(0)));
    parked(&daemon);
    assert_eq!(revoke(&daemon), (Some(2), Some(0)));
    parked(&daemon);
    daemon.restart();
    assert_eq!(index_links(&daemon), 0, "parked across the restart: {:?}", daemon.pins());
    assert_eq!(revoke(&daemon), (Some(2), Some(0)));
    assert_eq!(count(&topo.conntrack(&["-L"]), "dport=69"), 0, "{}", topo.conntrack(&["-L"]));
}
