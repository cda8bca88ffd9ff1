//! The daemon as a host service: a real Prometheus server scraping its
//! metrics, the systemd notify protocol and watchdog, the unit file
//! checked by systemd-analyze, completions and man pages.

use std::{
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use enforcer_tests::{
    Daemon, Family, Process, Scratch, Topology, enforcer_bin,
    peers::{FtpClient, FtpServer},
    run, unique, wait_for,
};
use serde_json::Value;

/// A port on loopback nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn curl(args: &[&str]) -> String {
    String::from_utf8(run(Command::new("curl").args(["-sS", "--max-time", "10"]).args(args)).stdout).unwrap()
}

/// A Prometheus server of this test, on loopback, scraping `target` every
/// second; its data in a scratch directory.
struct Prometheus {
    _process: Process,
    _dir: Scratch,
    port: u16,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = Scratch::dir("prom");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: enforcer\n    static_configs:\n      - targets: ['{target}']\n"),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.0.join("prometheus.log")).unwrap();
        let process = Process::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(std::process::Stdio::null())
                .stderr(log),
        );
        let p = Self { _process: process, _dir: dir, port };
        wait_for("prometheus to answer", 30, || Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{port}/-/ready")]).output().is_ok_and(|o| o.status.success()));
        p
    }

    /// The value of the one series `query` selects, read through
    /// Prometheus's HTTP API (None while it has no such series).
    fn value(&self, query: &str) -> Option<f64> {
        let body = curl(&[&format!("http://127.0.0.1:{}/api/v1/query", self.port), "--data-urlencode", &format!("query={query}")]);
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("prometheus answered {body}: {e}"));
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        let result = answer["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{query} selects one series: {answer}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query`'s value satisfies `ok`; returns it.
    fn eventually(&self, query: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.value(query);
            if let Some(v) = v.filter(|v| ok(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "{query} is {v:?} after 30 s of scrapes");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn prometheus_reads_packets_revocations_and_requests_back() {
    let topo = Topology::new();
    let port = free_port();
    let config = Scratch::file("cfg", &format!("metrics = \"127.0.0.1:{port}\"\nmetrics_per_rule = true\n"));
    let daemon = Daemon::start_with(None, &["--config", config.path()]);
    daemon.add_router(&topo.router_id);
    let helper = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("retr small.bin passive");

    let prometheus = Prometheus::start(&format!("127.0.0.1:{port}"));
    let router = &topo.router_id;
    assert_eq!(prometheus.eventually("up{job=\"enforcer\"}", |v| v == 1.0), 1.0);
    let tagged = prometheus.eventually(&format!("enforcer_router_tagged_packets_total{{router=\"{router}\"}}"), |v| v > 0.0);
    // The per-rule series agree with the router's.
    let rule = prometheus.eventually(&format!("enforcer_rule_tagged_packets_total{{router=\"{router}\",protocol=\"tcp\",port=\"21\",helper=\"ftp\"}}"), |v| v > 0.0);
    assert!(rule <= tagged, "rule {rule} within router {tagged}");
    assert_eq!(prometheus.eventually("enforcer_routers", |_| true), 1.0);
    assert_eq!(prometheus.eventually("enforcer_helpers", |_| true), 1.0);
    assert_eq!(prometheus.eventually("enforcer_api_requests_total{op=\"helper_create\",result=\"ok\"}", |_| true), 1.0);
    assert!(prometheus.eventually("enforcer_api_request_duration_seconds_count{op=\"router_add\"}", |_| true) >= 1.0);
    assert_eq!(prometheus.eventually("enforcer_catalogue_helper_info{helper=\"ftp\",protocol=\"tcp\",family=\"ipv4\"}", |_| true), 1.0);
    assert_eq!(prometheus.eventually("enforcer_build_info", |_| true), 1.0);
    assert_eq!(prometheus.eventually("enforcer_revocations_total", |_| true), 0.0);

    // A refused request is counted by its error code.
    daemon.cli(&["helper", "delete", router, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"]);
    assert_eq!(prometheus.eventually("enforcer_api_requests_total{op=\"helper_delete\",result=\"not_found\"}", |_| true), 1.0);

    // Revoking with the control connection open removes its conntrack entry.
    daemon.delete_helper(router, &helper);
    assert_eq!(prometheus.eventually("enforcer_revocations_total", |v| v > 0.0), 1.0);
    assert!(prometheus.eventually("enforcer_revoked_conntrack_entries_total", |v| v > 0.0) >= 1.0);
    assert_eq!(prometheus.eventually("enforcer_helpers", |v| v == 0.0), 0.0);
    drop(ftp);
}

#[test]
fn metrics_on_a_unix_socket() {
    let dir = Scratch::dir("m");
    let socket = dir.0.join("metrics.sock");
    let config = Scratch::file("cfg", &format!("metrics = \"unix:{}\"\n", socket.display()));
    let mut daemon = Daemon::start_with(None, &["--config", config.path()]);
    let sock = socket.to_str().unwrap();
    let text = curl(&["--unix-socket", sock, "http://localhost/metrics"]);
    assert!(text.lines().any(|l| l == "enforcer_ready 1.0"), "{text}");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    let code = curl(&["--unix-socket", sock, "-o", "/dev/null", "-w", "%{http_code}", "http://localhost/other"]);
    assert_eq!(code, "404");
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(!socket.exists(), "the metrics socket goes with the daemon");
}

#[test]
fn a_metrics_port_in_use_stops_the_start_with_the_reason() {
    enforcer_tests::require_root();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = Scratch::dir("m");
    let config = Scratch::file("cfg", &format!("metrics = \"127.0.0.1:{port}\"\n"));
    let bpffs = format!("/sys/fs/bpf/{}", unique("m"));
    let out = Command::new(enforcer_bin())
        .arg("--socket")
        .arg(dir.0.join("s.sock"))
        .args(["daemon", "--config", config.path(), "--state-dir"])
        .arg(dir.0.join("state"))
        .arg("--bpffs")
        .arg(&bpffs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("binding the metrics address 127.0.0.1:{port}")), "{err}");
    assert!(!dir.0.join("s.sock").exists(), "the API socket is not left behind");
    let _ = std::fs::remove_dir_all(&bpffs);
}

/// What the daemon told the service manager, as datagrams on `socket`.
fn notifications(socket: &UnixDatagram, within: Duration) -> Vec<String> {
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[test]
fn systemd_hears_ready_once_reconciled_and_the_watchdog_is_fed() {
    let topo = Topology::new();
    let dir = Scratch::dir("sd");
    let path = dir.0.join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "400000")];
    let mut daemon = Daemon::start_with_env(None, &[], &env);
    let first = notifications(&socket, Duration::from_millis(1500));
    let ready: Vec<_> = first.iter().filter(|m| m.lines().any(|l| l == "READY=1")).collect();
    assert_eq!(ready.len(), 1, "one READY=1: {first:?}");
    // Sent with the reconciliation's figures: only once it is done.
    assert!(ready[0].contains("STATUS=enforcing 0 routers (reconciled in "), "{first:?}");
    let fed = first.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    assert!(fed >= 4, "the 400 ms watchdog is fed every 200 ms: {first:?}");

    // A restart with a router: READY=1 again, after its reconciliation.
    daemon.add_router(&topo.router_id);
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    let stopped = notifications(&socket, Duration::from_millis(200));
    assert!(stopped.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")), "{stopped:?}");
    daemon.restart();
    let again = notifications(&socket, Duration::from_millis(500));
    assert!(again.iter().any(|m| m.contains("READY=1\nSTATUS=enforcing 1 routers (reconciled in ")), "{again:?}");
}

#[test]
fn no_watchdog_and_no_notifications_outside_systemd() {
    let daemon = Daemon::start();
    // Nothing to assert on a socket that does not exist; the daemon runs
    // and logs no complaint about the service manager.
    assert!(daemon.cli(&["status", "-o", "json"]).ok().json()["ready"] == true);
    let log = daemon.log();
    assert!(!log.contains("service manager") && !log.contains("watchdog"), "{log}");
}

/// Completions and man pages, generated from the clap definitions.
fn generated() -> Scratch {
    let out = Scratch::dir("gen");
    run(Command::new(enforcer_bin()).args(["generate", "--out", out.path()]));
    out
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let pages = generated();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/enforcer.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/enforcer daemon"), "the package installs the binary there");
    // The same unit, pointing at the binary under test (verify checks that
    // ExecStart is executable) with the generated man pages on MANPATH
    // (verify runs `man` for each Documentation= page).
    let dir = Scratch::dir("unit");
    let path = dir.0.join("enforcer.service");
    std::fs::write(&path, unit.replace("/usr/sbin/enforcer", enforcer_bin().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).env("MANPATH", pages.0.join("man")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify:\n{err}");
    // A unit that names a page nobody wrote fails the same check: the
    // check above can fail.
    std::fs::write(&path, unit.replace("/usr/sbin/enforcer", enforcer_bin().to_str().unwrap()).replace("man:enforcer(8)", "man:enforcer-nope(8)")).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).env("MANPATH", pages.0.join("man")).output().unwrap();
    assert!(!out.status.success() || !out.stderr.is_empty(), "a missing page is reported");
    let tmpfiles = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/enforcer.tmpfiles")).unwrap();
    for dir in ["/run/enforcer", "/var/lib/enforcer"] {
        assert!(unit.contains(dir) && tmpfiles.contains(dir), "{dir} in the unit and the tmpfiles entry");
    }
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    let out = generated();
    let bash = out.0.join("completions/enforcer.bash");
    run(Command::new("bash").arg("-n").arg(&bash));
    let script = std::fs::read_to_string(&bash).unwrap();
    for word in ["router", "helper", "catalogue", "--protocol"] {
        assert!(script.contains(word), "bash completion knows {word}");
    }
    assert!(out.0.join("completions/_enforcer").exists() && out.0.join("completions/enforcer.fish").exists());
    let page = Command::new("man").arg("-l").arg(out.0.join("man/man8/enforcer-helper-create.8")).env("MANWIDTH", "100").output().unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("--protocol") && page.contains("Destination port of the control connection"), "{page}");
    let printed = run(Command::new(enforcer_bin()).args(["completions", "fish"]));
    assert!(String::from_utf8_lossy(&printed.stdout).contains("complete -c enforcer"));
}

/// Events until one satisfies `want`; returns it and those before it.
fn event_where(session: &mut enforcer_tests::Session, what: &str, want: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} event within 20 s; saw {before:?}");
        let event = session.next_line(left).unwrap_or_else(|e| panic!("waiting for {what}: {e}; saw {before:?}"));
        if want(&event) {
            return (event, before);
        }
        before.push(event);
    }
}

#[test]
fn events_stream_changes_revocations_repairs_and_refusals() {
    let topo = Topology::new();
    let config = Scratch::file("cfg", "glue_check_secs = 1\n");
    let daemon = Daemon::start_with(None, &["--config", config.path()]);
    let mut events = daemon.session();
    assert_eq!(events.request(&serde_json::json!({"op": "events"})).unwrap(), serde_json::json!({"ok": {}}));
    let router = topo.router_id.as_str();

    daemon.add_router(router);
    let (added, _) = event_where(&mut events, "router_add", |e| e["op"] == "router_add");
    assert_eq!((added["kind"].as_str(), added["router_id"].as_str(), added["result"].as_str()), (Some("change"), Some(router), Some("ok")), "{added}");
    let helper = daemon.create_helper(router, "tcp", 21, "ftp");
    let (created, _) = event_where(&mut events, "helper_create", |e| e["op"] == "helper_create");
    assert_eq!(created["helper_id"], helper.as_str(), "{created}");
    assert_eq!(created["after"]["port"], 21, "{created}");

    // A refusal, with its error code and message.
    let refused = daemon.cli(&["helper", "create", router, "--protocol", "tcp", "--port", "70000", "--helper", "ftp"]);
    assert_ne!(refused.code, 0);
    let (refusal, _) = event_where(&mut events, "refusal", |e| e["kind"] == "refusal");
    assert_eq!((refusal["op"].as_str(), refusal["result"].as_str()), (Some("helper_create"), Some("invalid_argument")), "{refusal}");

    // A revocation with what it removed: the open control connection.
    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);
    ftp.ok("retr small.bin passive");
    daemon.delete_helper(router, &helper);
    let (revocation, _) = event_where(&mut events, "revocation", |e| e["kind"] == "revocation");
    assert_eq!(revocation["router_id"], router, "{revocation}");
    assert!(revocation["after"]["conntrack_entries_removed"].as_u64().unwrap() >= 1, "{revocation}");
    let (deleted, _) = event_where(&mut events, "helper_delete", |e| e["op"] == "helper_delete");
    assert_eq!(deleted["kind"], "change");

    // A repair: someone removes enforcer's glue table.
    topo.router.sh("nft", &["delete", "table", "inet", "enforcer"]);
    let (repair, _) = event_where(&mut events, "glue_repair", |e| e["op"] == "glue_repair");
    assert_eq!((repair["kind"].as_str(), repair["router_id"].as_str()), (Some("repair"), Some(router)), "{repair}");

    // The CLI: one JSON object per line, and a readable line per event.
    let json = Command::new(enforcer_bin()).arg("--socket").arg(&daemon.socket).args(["events", "-o", "json", "--count", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let table = Command::new(enforcer_bin()).arg("--socket").arg(&daemon.socket).args(["events", "--count", "1"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let (json, table) = (Process { child: json, what: "events -o json".into() }, Process { child: table, what: "events".into() });
    // Both subscribe in their own time: refusals until both have one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let done = |p: &mut Process| matches!(p.child.try_wait(), Ok(Some(_)));
    let (mut json, mut table) = (json, table);
    while !(done(&mut json) && done(&mut table)) {
        assert!(Instant::now() < deadline, "the CLI streams got no event");
        daemon.cli(&["router", "remove", "not-a-uuid"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let read = |p: &mut Process| std::io::read_to_string(p.child.stdout.take().unwrap()).unwrap();
    let (json, table) = (read(&mut json), read(&mut table));
    let event: Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{json}: {e}"));
    assert_eq!((event["kind"].as_str(), event["op"].as_str()), (Some("refusal"), Some("router_remove")), "{event}");
    assert!(table.contains("refusal") && table.contains("router_remove") && table.contains("invalid_argument"), "{table}");
    drop(ftp);
}

/// A tmux server of this test (its own socket), killed on drop.
struct Tmux(String);

impl Tmux {
    fn start(width: u16, height: u16, command: &str) -> Self {
        let t = Self(unique("tmux"));
        run(Command::new("tmux").args(["-L", &t.0, "new-session", "-d", "-s", "top", "-x", &width.to_string(), "-y", &height.to_string(), command]));
        t
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux").args(["-L", &self.0, "capture-pane", "-p", "-t", "top"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        run(Command::new("tmux").args(["-L", &self.0, "send-keys", "-t", "top", keys]));
    }

    /// Waits until the screen shows every one of `texts`; returns it.
    fn shows(&self, texts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.screen();
            if texts.iter().all(|t| screen.contains(t)) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the screen never showed {texts:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn running(&self) -> bool {
        Command::new("tmux").args(["-L", &self.0, "has-session", "-t", "top"]).output().is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.0, "kill-server"]).output();
    }
}

#[test]
fn top_shows_rates_drops_and_rules_and_goes_on_with_the_daemon_down() {
    let topo = Topology::new();
    let mut daemon = Daemon::start();
    let router = topo.router_id.as_str();
    daemon.add_router(router);
    let helper = daemon.create_helper(router, "tcp", 21, "ftp");
    daemon.create_helper(router, "udp", 69, "tftp");
    let _server = FtpServer::start(&topo, Family::V4);
    let mut ftp = FtpClient::login(&topo, Family::V4);

    let command = format!("{} --socket {} top --bpffs {}", enforcer_bin().display(), daemon.socket.display(), daemon.bpffs.display());
    let tmux = Tmux::start(150, 30, &command);
    tmux.shows(&[router, "daemon running", "1 routers  2 live rules  0 revoked", "routers, by tagged/s"]);
    // Traffic shows as a rate on the router's line.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        ftp.ok("retr small.bin passive");
        let screen = tmux.screen();
        let line = screen.lines().find(|l| l.contains(router)).unwrap_or_default().to_string();
        let rate: f64 = line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        if rate > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no tagged/s on the router's line:\n{screen}");
        std::thread::sleep(Duration::from_millis(300));
    }
    tmux.keys("s");
    tmux.shows(&["routers, by dropped/s"]);
    tmux.keys("Tab");
    let rules = tmux.shows(&[&format!("rules of router {router}"), "ftp", "tftp"]);
    assert!(rules.lines().any(|l| l.contains("tcp") && l.contains("21") && l.contains("live")), "{rules}");

    // A revoked rule shows as revoked, with its drops counted.
    daemon.delete_helper(router, &helper);
    tmux.keys("Tab");
    tmux.shows(&["1 live rules  1 revoked"]);

    // The daemon stops; enforcement and the view go on.
    daemon.stop(nix::sys::signal::Signal::SIGTERM);
    tmux.shows(&["daemon DOWN", router, "1 live rules  1 revoked"]);
    tmux.keys("q");
    wait_for("top to quit on q", 10, || !tmux.running());
    drop(ftp);
}

/// Under systemd (stderr is the journal's stream, JOURNAL_STREAM says so)
/// the daemon logs to journald with its identifier, priorities and fields.
/// A real systemd-journald runs in a private mount namespace with its own
/// /run, so nothing of the host's is touched; `systemd-cat` plays the
/// service manager's part of connecting stderr to the journal.
#[test]
fn under_systemd_the_daemon_logs_to_journald() {
    enforcer_tests::require_root();
    let dir = Scratch::dir("journal");
    let bpffs = format!("/sys/fs/bpf/{}", unique("j"));
    let script = format!(
        r#"set -e
mount -t tmpfs tmpfs /run
/lib/systemd/systemd-journald &
journald=$!
trap 'kill $journald' EXIT
for i in $(seq 100); do [ -S /run/systemd/journal/stdout ] && break; sleep 0.05; done
systemd-cat -t enforcer-stderr sh -c 'export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); exec {bin} --socket {dir}/s.sock daemon --bpffs {bpffs} --state-dir {dir}/state' &
daemon=$!
for i in $(seq 200); do [ -S {dir}/s.sock ] && break; sleep 0.05; done
{bin} --socket {dir}/s.sock status > /dev/null
kill $daemon
wait $daemon || true
journalctl -D /run/log/journal -o json --no-pager
"#,
        bin = enforcer_bin().display(),
        dir = dir.path(),
    );
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let _ = std::fs::remove_dir_all(&bpffs);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let entries: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let ours: Vec<&Value> = entries.iter().filter(|e| e["SYSLOG_IDENTIFIER"] == "enforcer").collect();
    assert!(ours.iter().any(|e| e["MESSAGE"] == "serving" && e["TARGET"] == "enforcer::daemon::server"), "journald entries with fields: {ours:?}");
    assert!(ours.iter().all(|e| e["PRIORITY"].as_str().is_some()), "{ours:?}");
    // Native entries, not text lines through the stderr stream.
    assert!(!entries.iter().any(|e| e["SYSLOG_IDENTIFIER"] == "enforcer-stderr" && e["MESSAGE"].as_str().is_some_and(|m| m.contains("serving"))), "{entries:?}");
}
