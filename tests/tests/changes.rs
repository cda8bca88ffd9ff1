//! Helper changes at scale: group commit under concurrent clients, a full
//! disk at the commit, idempotent creates, the helper set request, and
//! deletes of rules that never tagged a packet.

use std::collections::BTreeSet;

use enforcer_tests::{
    Daemon, Family, Tmpfs, Topology,
    peers::{FtpClient, FtpServer},
};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn create(router: &str, port: u64) -> Value {
    json!({"op": "helper_create", "router_id": router, "protocol": "udp", "port": port, "helper": "sip"})
}

/// `clients` sessions creating helpers on ports from `first`, `each` per
/// client, at once. Returns (acknowledged ports, refused ports with their
/// errors).
fn concurrent_creates(daemon: &Daemon, router: &str, clients: u64, each: u64, first: u64) -> (Vec<u64>, Vec<(u64, Value)>) {
    let router = router.to_string();
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for (req, answer, _) in daemon.concurrent(clients, each, move |c, i| create(&router, first + c * each + i)) {
        let port = req["port"].as_u64().unwrap();
        match answer.get("ok") {
            Some(_) => acked.push(port),
            None => refused.push((port, answer["error"].clone())),
        }
    }
    acked.sort();
    (acked, refused)
}

fn status(daemon: &Daemon) -> Value {
    daemon.cli(&["status", "-o", "json"]).ok().json()
}

#[test]
fn concurrent_creates_share_commits_and_every_acknowledged_one_survives_a_kill() {
    let topo = Topology::new();
    let mut daemon = Daemon::start();
    daemon.add_router(&topo.router_id);
    let (acked, refused) = concurrent_creates(&daemon, &topo.router_id, 16, 100, 10_000);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(acked.len(), 1600);
    let s = status(&daemon);
    let (changes, commits) = (s["changes"].as_u64().unwrap(), s["commits"].as_u64().unwrap());
    assert_eq!(changes, 1600, "{s}");
    assert!(commits < changes, "16 clients at once share commits: {commits} commits for {changes} changes");
    eprintln!("{changes} changes in {commits} commits");
    // Every change is in the audit log, one entry each.
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    let created: Vec<&Value> = audit.as_array().unwrap().iter().filter(|e| e["op"] == "helper_create" && e["result"] == "ok").collect();
    assert_eq!(created.len(), 1600);
    // A new helper had no state before; after, the entry holds it.
    for e in &created {
        assert!(e["before"].is_null() && e["after"]["id"] == e["helper_id"], "{e}");
    }

    daemon.stop(Signal::SIGKILL);
    daemon.restart();
    assert_eq!(daemon.helper_ports(), acked, "every acknowledged create is durable");
    assert_eq!(daemon.live_ports(), acked, "and enforced");
}

#[test]
fn a_full_disk_at_the_commit_fails_the_whole_group_and_keeps_nothing_of_it() {
    let topo = Topology::new();
    let fs = Tmpfs::mount("2m");
    let mut daemon = Daemon::start_with(Some(fs.0.join("state")), &[]);
    daemon.add_router(&topo.router_id);
    daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let filler = fs.fill();
    // redb writes its pages at the commit: the disk fills up there, for a
    // whole group of concurrent changes at once.
    let (acked, refused) = concurrent_creates(&daemon, &topo.router_id, 8, 300, 10_000);
    assert!(!refused.is_empty(), "a full filesystem refuses changes ({} acknowledged)", acked.len());
    for (port, error) in &refused {
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains("No space left") && message.contains("not kept"), "helper on {port}: clear error: {error}");
    }
    let mut want: Vec<u64> = acked.clone();
    want.push(21);
    want.sort();
    assert_eq!(daemon.helper_ports(), want, "exactly the acknowledged changes are stored");
    assert_eq!(daemon.live_ports(), want, "and enforced: nothing of a failed group stays in the kernel");

    std::fs::remove_file(&filler).unwrap();
    let again = daemon.session().request(&create(&topo.router_id, refused[0].0)).unwrap();
    assert!(again.get("ok").is_some(), "with space again, a refused change goes through: {again}");
    want.push(refused[0].0);
    want.sort();
    daemon.restart();
    assert_eq!(daemon.helper_ports(), want);
    assert_eq!(daemon.live_ports(), want);
}

#[test]
fn a_create_retried_with_its_id_after_a_lost_answer_succeeds() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let id = uuid::Uuid::new_v4().to_string();
    let args = |port: &str, helper: &str| {
        vec!["helper", "create", &topo.router_id, "--protocol", "tcp", "--port", port, "--helper", helper, "--id", &id, "-o", "json"]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<String>>()
    };
    let call = |a: Vec<String>| daemon.cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let first = call(args("21", "ftp")).ok().json();
    let retry = call(args("21", "ftp")).ok().json();
    assert_eq!(first, retry, "the retry finds the helper the first attempt made");
    assert_eq!(daemon.helper_ports(), vec![21], "one helper, not two");
    // The same id for something else is a conflict.
    let other = call(args("2121", "ftp"));
    assert_eq!(other.code, 1, "{}", other.stdout);
    assert!(other.stdout.contains("conflict") && other.stdout.contains(&id), "{}", other.stdout);
    assert_eq!(daemon.helper_ports(), vec![21]);
}

#[test]
fn a_helper_set_is_applied_whole_or_not_at_all_and_revokes_what_it_drops() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let router = topo.router_id.as_str();
    let set = |helpers: Value| {
        let file = enforcer_tests::Scratch::file("set", &helpers.to_string());
        daemon.cli(&["helper", "set", router, "--file", file.path(), "-o", "json"])
    };
    let first = set(json!([
        {"protocol": "tcp", "port": 21, "helper": "ftp"},
        {"protocol": "udp", "port": 69, "helper": "tftp"},
        {"protocol": "udp", "port": 5060, "helper": "sip"},
    ]))
    .ok()
    .json();
    assert_eq!((first["created"].as_u64(), first["deleted"].as_u64()), (Some(3), Some(0)), "{first}");
    assert_eq!(daemon.live_ports(), vec![21, 69, 5060]);
    let ftp_id = first["helpers"].as_array().unwrap().iter().find(|h| h["port"] == 21).unwrap()["id"].clone();

    // A bad entry: nothing changes, and the error names the entry.
    let bad = set(json!([
        {"protocol": "tcp", "port": 21, "helper": "ftp"},
        {"protocol": "udp", "port": 70000, "helper": "tftp"},
    ]));
    assert_eq!(bad.code, 1);
    assert!(bad.stdout.contains("helpers[1]"), "{}", bad.stdout);
    assert_eq!(daemon.live_ports(), vec![21, 69, 5060], "nothing of a refused set is applied");
    let dup = set(json!([{"protocol": "tcp", "port": 21, "helper": "ftp"}, {"protocol": "tcp", "port": 21, "helper": "ftp"}]));
    assert!(dup.stdout.contains("helpers[1]") && dup.stdout.contains("also in helpers[0]"), "{}", dup.stdout);

    // An FTP session through the helper on 21; then a set that keeps ftp
    // on 21 (same id: untouched) and drops tftp and sip.
    let _server = FtpServer::start(&topo, Family::V4);
    let mut kept = FtpClient::login(&topo, Family::V4);
    kept.ok("list passive");
    let second = set(json!([{"protocol": "tcp", "port": 21, "helper": "ftp"}])).ok().json();
    assert_eq!((second["unchanged"].as_u64(), second["deleted"].as_u64()), (Some(1), Some(2)), "{second}");
    assert_eq!(second["helpers"][0]["id"], ftp_id, "an entry without an id keeps the helper on its port");
    assert!(second["revoked"].as_array().unwrap().iter().all(|r| r["never_tagged"] == true), "no traffic went through tftp or sip: {second}");
    kept.ok("list passive");
    assert_eq!(daemon.live_ports(), vec![21]);

    // Moving ftp to 2121 revokes the session on 21, in the same call that
    // gives 21 to another helper entry.
    let third = set(json!([{"protocol": "tcp", "port": 2121, "helper": "ftp", "id": ftp_id}, {"protocol": "udp", "port": 21, "helper": "tftp"}])).ok().json();
    assert_eq!((third["updated"].as_u64(), third["created"].as_u64()), (Some(1), Some(1)), "{third}");
    let revoked = &third["revoked"][0];
    assert_eq!(revoked["never_tagged"], Value::Null, "the ftp rule tagged packets: {third}");
    assert!(revoked["conntrack_entries_removed"].as_u64().unwrap() >= 1, "{third}");
    kept.fails("noop");
    assert_eq!(daemon.live_ports(), vec![21, 2121]);
    let audit = daemon.cli(&["audit", "-o", "json"]).ok().json();
    let sets: BTreeSet<&str> = audit.as_array().unwrap().iter().filter(|e| e["op"] == "helper_set").filter_map(|e| e["result"].as_str()).collect();
    assert_eq!(sets, BTreeSet::from(["ok", "invalid_argument"]), "every set is audited");
}

#[test]
fn a_rule_that_never_tagged_a_packet_is_deleted_without_visiting_conntrack() {
    let topo = Topology::new();
    let daemon = Daemon::enforcing(&topo);
    let quiet = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let report = daemon.cli(&["helper", "delete", &topo.router_id, &quiet, "-o", "json"]).ok().json();
    assert_eq!(report["never_tagged"], true, "{report}");
    assert_eq!(report["slot_released"], true, "{report}");

    let used = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut session = FtpClient::login(&topo, Family::V4);
    session.ok("list passive");
    let report = daemon.cli(&["helper", "delete", &topo.router_id, &used, "-o", "json"]).ok().json();
    assert_eq!(report["never_tagged"], Value::Null, "{report}");
    assert!(report["conntrack_entries_removed"].as_u64().unwrap() >= 1, "{report}");
    session.fails("noop");
}

#[test]
fn pipelined_requests_are_answered_in_order_and_each_sees_those_before_it() {
    let topo = Topology::new();
    let daemon = Daemon::start();
    let router = topo.router_id.as_str();
    let tcp = |port: u16| json!({"op": "helper_create", "router_id": router, "protocol": "tcp", "port": port, "helper": "ftp"});
    let mut reqs = vec![
        // The creates after it wait for the router to exist.
        json!({"op": "router_add", "router_id": router}),
        tcp(21),
        tcp(21),
        json!({"op": "helper_list", "router_id": router}),
    ];
    reqs.extend((0..200).map(|i| create(router, 5000 + i)));
    reqs.push(json!({"op": "helper_list", "router_id": router}));
    let answers = daemon.session().pipeline(&reqs).unwrap();
    assert_eq!(answers.len(), reqs.len());
    assert!(answers[0].get("ok").is_some(), "{}", answers[0]);
    assert_eq!(answers[1]["ok"]["port"], 21, "{}", answers[1]);
    assert_eq!(answers[2]["error"]["code"], "conflict", "the same tuple again, after the first: {}", answers[2]);
    assert_eq!(answers[3]["ok"].as_array().map(Vec::len), Some(1), "the list sees the create before it: {}", answers[3]);
    for (req, answer) in reqs.iter().zip(&answers).skip(4).take(200) {
        assert_eq!(answer["ok"]["port"], req["port"], "answers in the order of the requests");
    }
    assert_eq!(answers.last().unwrap()["ok"].as_array().map(Vec::len), Some(201));
    assert_eq!(daemon.live_ports().len(), 201);
    // Pipelined changes share commits.
    let status = daemon.cli(&["status", "-o", "json"]).ok().json();
    assert!(status["commits"].as_u64().unwrap() < 100, "{status}");
}
