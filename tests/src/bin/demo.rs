//! `cargo xtask demo`: enforcement end to end on a throwaway topology.
//! `cargo xtask demo --openstack`: the same story driven from Neutron, with
//! real Keystone and neutron-server on loopback.
//! Everything it creates is torn down when it ends, also on failure.

use std::time::{Duration, Instant};

use enforcer_tests::{
    Daemon, Family, Topology,
    openstack::OpenStack,
    peers::{FtpClient, FtpServer},
};

fn step(text: &str) {
    println!("\n=== {text}");
}

fn show(daemon: &Daemon, args: &[&str]) -> String {
    println!("$ enforcer {}", args.join(" "));
    let out = daemon.cli(args).ok();
    print!("{}", out.stdout);
    out.stdout
}

fn ftp(client: &mut FtpClient, line: &str) -> serde_json::Value {
    let v = client.cmd(line);
    let summary = if v["ok"] == true {
        match (&v["lines"], &v["bytes"], &v["reply"]) {
            (serde_json::Value::Array(l), _, _) => format!("ok, {} line(s) listed", l.len()),
            (_, serde_json::Value::Number(n), _) => format!("ok, {n} bytes"),
            (_, _, serde_json::Value::String(r)) => format!("ok: {r}"),
            _ => "ok".to_string(),
        }
    } else {
        format!("FAILED: {}", v["error"].as_str().unwrap_or("?"))
    };
    println!("ftp> {line:<28} {summary}");
    v
}

fn conntrack(topo: &Topology) {
    println!("$ conntrack -L   (in the router namespace)");
    for line in topo.conntrack(&["-L", "-p", "tcp"]).lines() {
        println!("  {line}");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--openstack") {
        return openstack();
    }
    local();
}

fn local() {
    step("Topology: client (10.200.1.2) -- router -- server (10.200.2.2)");
    let topo = Topology::new();
    println!("router namespace {} forwards with a stateful policy:", topo.router.name);
    println!("  ESTABLISHED,RELATED pass; NEW only to tcp/21 (and udp/69, 5060) from the client side.");
    println!("  An FTP data connection therefore passes only if the ftp helper expected it.");
    let daemon = Daemon::start();
    let _server = FtpServer::start(&topo, Family::V4);
    println!("daemon pid {} (socket {}, maps in {})", daemon.process.pid(), daemon.socket.display(), daemon.bpffs.display());

    step("Enable ftp on tcp/21 for the router");
    show(&daemon, &["router", "add", &topo.router_id]);
    let created = show(&daemon, &["helper", "create", &topo.router_id, "--protocol", "tcp", "--port", "21", "--helper", "ftp", "-o", "json"]);
    let helper_id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"].as_str().unwrap().to_string();

    step("A real FTP session through the router (Python ftplib -> pyftpdlib)");
    let mut session = FtpClient::login(&topo, Family::V4);
    ftp(&mut session, "list passive");
    ftp(&mut session, "retr small.bin passive");
    ftp(&mut session, "list active");
    let mut transfer = FtpClient::login(&topo, Family::V4);
    ftp(&mut transfer, "retr_start big.bin passive");
    println!("(a second control connection is now downloading a 256 MiB file, slowly)");
    conntrack(&topo);
    println!("The control connection carries helper=ftp; its data connections carry the same mark (RELATED).");
    show(&daemon, &["maps", "dump"]);

    step("Delete the helper");
    show(&daemon, &["helper", "delete", &topo.router_id, &helper_id]);
    println!("The same control connection, right after the delete:");
    ftp(&mut session, "noop");
    println!("The transfer that was running:");
    ftp(&mut transfer, "retr_wait");
    println!("A new control connection gets no helper, so its data connection is blocked:");
    let mut fresh = FtpClient::login(&topo, Family::V4);
    ftp(&mut fresh, "noop");
    ftp(&mut fresh, "list passive");
    conntrack(&topo);
    println!("No entry carries the helper or its mark any more (the delete removed them and their expectations);");
    println!("the revoked connections stay dropped by the datapath, which would otherwise pick them up mid-stream.");
    show(&daemon, &["maps", "dump"]);
    println!("The revoked slot counts the packets it dropped.");

    step("Tearing down the topology, the daemon and its pins");
}

/// Waits until the daemon follows `router` and its helper list satisfies `f`.
fn wait_helpers(daemon: &Daemon, router: &str, what: &str, f: impl Fn(&[serde_json::Value]) -> bool) {
    let started = Instant::now();
    loop {
        let out = daemon.cli(&["helper", "list", router, "-o", "json"]);
        if out.code == 0 && f(out.json().as_array().map(Vec::as_slice).unwrap_or_default()) {
            println!("(on the host after {:.1} s: {what})", started.elapsed().as_secs_f64());
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not within 30 s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn neutron(os: &OpenStack, who: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
    println!("$ {method} /v2.0{path}   (as {who}{})", body.as_ref().map(|b| format!(", {b}")).unwrap_or_default());
    let (code, answer) = os.neutron(who, method, path, body);
    println!("  -> {code}");
    assert!((200..300).contains(&code), "{answer}");
    answer
}

fn openstack() {
    step("Keystone and neutron-server on 127.0.0.1 (pinned releases, SQLite)");
    let os = OpenStack::start(3600);
    println!("Keystone {}  Neutron {}", os.keystone_url, os.neutron_url);
    println!("Tenant u1 (project p1) creates a router through Neutron's API:");
    let router = neutron(&os, "u1", "POST", "/routers", Some(serde_json::json!({"router": {"name": "demo"}})))["router"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    step("This host hosts the router: namespace qrouter-<id>, client -- router -- server");
    let topo = Topology::for_router(&router);
    let _server = FtpServer::start(&topo, Family::V4);
    let config = os.daemon_config("enforcer", 1.0, "");
    println!("daemon configuration {}:\n{}", config.display(), std::fs::read_to_string(&config).unwrap());
    println!("(cloud `enforcer` is an application credential with admin on project `service`, in clouds.yaml)");
    let (key, value) = os.daemon_env();
    let daemon = Daemon::start_with_env(None, &["--config", config.to_str().unwrap()], &[(key, &value)]);
    wait_helpers(&daemon, &router, "router followed", |_| true);
    show(&daemon, &["router", "list"]);

    step("u1 enables ftp on tcp/21 in Neutron");
    let helper = neutron(
        &os,
        "u1",
        "POST",
        &format!("/routers/{router}/conntrack_helpers"),
        Some(serde_json::json!({"conntrack_helper": {"protocol": "tcp", "port": 21, "helper": "ftp"}})),
    )["conntrack_helper"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_helpers(&daemon, &router, "helper enforced", |l| l.iter().any(|h| h["id"] == helper.as_str()));
    show(&daemon, &["helper", "list", &router]);
    let mut session = FtpClient::login(&topo, Family::V4);
    ftp(&mut session, "list passive");
    let mut transfer = FtpClient::login(&topo, Family::V4);
    ftp(&mut transfer, "retr_start big.bin passive");
    conntrack(&topo);

    step("The local API cannot change what Neutron owns");
    println!("$ enforcer helper delete {router} {helper}");
    let refused = daemon.cli(&["helper", "delete", &router, &helper]);
    print!("{}", refused.stderr);

    step("u1 deletes the helper in Neutron");
    neutron(&os, "u1", "DELETE", &format!("/routers/{router}/conntrack_helpers/{helper}"), None);
    wait_helpers(&daemon, &router, "helper revoked", |l| l.is_empty());
    ftp(&mut session, "noop");
    ftp(&mut transfer, "retr_wait");
    conntrack(&topo);
    println!("The sync's changes are in the audit log, made on Neutron's behalf:");
    show(&daemon, &["audit"]);
    show(&daemon, &["status"]);

    step("Tearing down the daemon, the topology, Neutron and Keystone");
}
