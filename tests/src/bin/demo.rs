//! `cargo xtask demo`: enforcement end to end on a throwaway topology.
//! Everything it creates is torn down when it ends, also on failure.

use enforcer_tests::{
    Daemon, Family, Topology,
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
