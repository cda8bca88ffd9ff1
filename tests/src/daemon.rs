//! A daemon of this test: its own socket, state directory and bpffs
//! directory, stopped by PID and cleaned up on drop.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{Process, enforcer_bin, unique};

pub struct Daemon {
    pub process: Process,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    pub state: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// A connection to the daemon's API.
pub struct Session {
    stream: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Session {
    /// Sends a request; returns the response, or an error if the daemon
    /// went away before answering.
    pub fn request(&mut self, req: &serde_json::Value) -> std::io::Result<serde_json::Value> {
        use std::io::{BufRead, Write};
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.stream.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(serde_json::from_str(&answer)?)
    }

    /// The next line the daemon sends (after an `events` request: the next
    /// event), waiting at most `within`.
    pub fn next_line(&mut self, within: Duration) -> std::io::Result<serde_json::Value> {
        use std::io::BufRead;
        self.stream.set_read_timeout(Some(within))?;
        let mut line = String::new();
        let read = self.reader.read_line(&mut line);
        self.stream.set_read_timeout(None)?;
        if read? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Sends every request without waiting for answers (pipelined; a
    /// thread writes while this one reads) and returns the answers, in
    /// order.
    pub fn pipeline(&mut self, reqs: &[serde_json::Value]) -> std::io::Result<Vec<serde_json::Value>> {
        use std::io::{BufRead, Write};
        let mut lines = Vec::new();
        for req in reqs {
            lines.extend(serde_json::to_vec(req)?);
            lines.push(b'\n');
        }
        let mut stream = self.stream.try_clone()?;
        let writer = std::thread::spawn(move || stream.write_all(&lines));
        let mut answers = Vec::with_capacity(reqs.len());
        for _ in reqs {
            let mut answer = String::new();
            if self.reader.read_line(&mut answer)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            answers.push(serde_json::from_str(&answer)?);
        }
        writer.join().map_err(|_| std::io::Error::other("writer panicked"))??;
        Ok(answers)
    }
}

/// What a CLI call printed.
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "enforcer failed:\n{}{}", self.stdout, self.stderr);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

impl From<Output> for CliOutput {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(None, &[])
    }

    /// A daemon enforcing the router of `topo`, as most tests begin.
    pub fn enforcing(topo: &crate::Topology) -> Self {
        let daemon = Self::start();
        daemon.add_router(&topo.router_id);
        daemon
    }

    /// Starts a daemon with its store in `state` (default: its own
    /// directory) and extra `daemon` arguments.
    pub fn start_with(state: Option<PathBuf>, extra: &[&str]) -> Self {
        Self::start_with_env(state, extra, &[])
    }

    /// As [`Daemon::start_with`], with extra environment variables.
    pub fn start_with_env(state: Option<PathBuf>, extra: &[&str], env: &[(&str, &str)]) -> Self {
        crate::require_root();
        let name = unique("d");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
        let socket = dir.join("enforcer.sock");
        let state = state.unwrap_or_else(|| dir.join("state"));
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let process = Self::spawn_daemon(&dir, &bpffs, &socket, &state, extra, &env);
        let mut daemon = Self { process, dir, socket, bpffs, state, extra: extra.iter().map(|s| s.to_string()).collect(), env };
        daemon.wait_up();
        daemon
    }

    fn spawn_daemon(
        dir: &std::path::Path,
        bpffs: &std::path::Path,
        socket: &std::path::Path,
        state: &std::path::Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Process {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("daemon.log")).unwrap();
        Process::spawn(
            "enforcer daemon",
            Command::new(enforcer_bin())
                .arg("--socket")
                .arg(socket)
                .arg("daemon")
                .arg("--bpffs")
                .arg(bpffs)
                .arg("--state-dir")
                .arg(state)
                .args(extra)
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(log),
        )
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = self.process.child.try_wait() {
                panic!("daemon exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The API answers at once; the kernel is reconciled in the background.
        let mut session = self.session();
        loop {
            let status = session.request(&serde_json::json!({"op": "status"})).unwrap_or_default();
            if status["ok"]["ready"] == true {
                break;
            }
            if let Ok(Some(status)) = self.process.child.try_wait() {
                panic!("daemon exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "daemon did not finish its start-up reconciliation:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the daemon with `signal` and waits for it to exit.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) {
        self.process.signal(signal);
        let _ = self.process.child.wait();
    }

    /// Starts the daemon again on the same socket, pins and store.
    pub fn restart(&mut self) {
        if matches!(self.process.child.try_wait(), Ok(None)) {
            self.stop(nix::sys::signal::Signal::SIGTERM);
        }
        self.spawn();
        self.wait_up();
    }

    /// Starts the daemon process again on the same socket, pins and store,
    /// without waiting for it.
    pub fn spawn(&mut self) {
        self.process = Self::spawn_daemon(&self.dir, &self.bpffs, &self.socket, &self.state, &self.extra.iter().map(String::as_str).collect::<Vec<_>>(), &self.env);
    }

    /// Starts the daemon again and expects it to refuse: returns its exit
    /// status and log.
    pub fn restart_refused(&mut self) -> (std::process::ExitStatus, String) {
        self.process = Self::spawn_daemon(&self.dir, &self.bpffs, &self.socket, &self.state, &self.extra.iter().map(String::as_str).collect::<Vec<_>>(), &self.env);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.process.child.try_wait() {
                return (status, self.log());
            }
            assert!(std::os::unix::net::UnixStream::connect(&self.socket).is_err(), "the daemon started and serves:\n{}", self.log());
            assert!(Instant::now() < deadline, "the daemon neither started nor exited");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident memory of the daemon, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Kernel programs that use this daemon's maps (loaded instances): a
    /// `tag` per router and the control instance's `tag` and `classify`.
    pub fn programs(&self) -> usize {
        let uses = self.uses_maps();
        aya::programs::loaded_programs().filter_map(|p| p.ok()).filter(|p| uses(p)).count()
    }

    /// Whether a program uses this daemon's maps (their ids read once).
    pub fn uses_maps(&self) -> impl Fn(&aya::programs::ProgramInfo) -> bool + use<> {
        uses_maps(&self.bpffs, &["ENFORCER_RULES", "ENFORCER_CURRENT"])
    }

    /// enforcer's programs attached to the interfaces of `ns`, in either
    /// attach mode: tcx programs that use this daemon's maps, and bpf
    /// filters at enforcer's netlink priority.
    pub fn attachments(&self, ns: &crate::Netns) -> usize {
        self.attached_programs(ns).len()
    }

    /// The ids of enforcer's programs attached to the interfaces of `ns`
    /// (see [`Daemon::attachments`]), sorted.
    pub fn attached_programs(&self, ns: &crate::Netns) -> Vec<u32> {
        attached_programs(&self.bpffs, std::path::Path::new(&ns.path()))
    }
}

/// Whether a program uses one of the maps `names` pinned in `bpffs` (a
/// name an earlier release pinned may be missing).
fn uses_maps(bpffs: &std::path::Path, names: &[&str]) -> impl Fn(&aya::programs::ProgramInfo) -> bool + use<> {
    let ids: Vec<u32> = names
        .iter()
        .filter(|m| bpffs.join(m).exists())
        .map(|m| aya::maps::MapData::from_pin(bpffs.join(m)).expect("map pin").info().expect("map info").id())
        .collect();
    move |p| p.map_ids().ok().flatten().is_some_and(|m| m.iter().any(|id| ids.contains(id)))
}

/// The ids of the programs using the maps pinned in `bpffs` that are
/// attached to the interfaces of the namespace at `ns` (tcx programs, and
/// bpf filters at enforcer's netlink priority), sorted. Usable from any
/// thread, also while the daemon restarts.
pub fn attached_programs(bpffs: &std::path::Path, ns: &std::path::Path) -> Vec<u32> {
        use aya::programs::{SchedClassifier, TcAttachType};
        // tag writes the current-router map (tag of earlier releases read
        // the rules map, their egress program the slots map).
        let uses = uses_maps(bpffs, &["ENFORCER_CURRENT", "ENFORCER_RULES", "ENFORCER_SLOTS"]);
        enforcer::kernel::netns::run_in(ns, || {
            let mut found = Vec::new();
            for (iface, _) in enforcer::kernel::netns::interfaces()? {
                for (kind, dir) in [(TcAttachType::Ingress, "ingress"), (TcAttachType::Egress, "egress")] {
                    if let Ok((_, programs)) = SchedClassifier::query_tcx(&iface, kind) {
                        found.extend(
                            programs.iter().filter(|p| uses(p)).map(|p| p.id()),
                        );
                    }
                    let out = Command::new("tc").args(["-j", "filter", "show", "dev", &iface, dir]).output()?;
                    let filters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                    found.extend(
                        filters
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|f| f["pref"].as_u64() == Some(enforcer::kernel::attach::NETLINK_PRIORITY.into()))
                            .filter_map(|f| f["options"]["prog"]["id"].as_u64())
                            .map(|id| id as u32),
                    );
                }
            }
            found.sort();
            Ok(found)
        })
        .expect("counting attachments")
}

impl Daemon {
    /// Every pin under this daemon's bpffs directory (maps and links).
    pub fn pins(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bpffs, &mut out);
        out.sort();
        out
    }

    /// One connection for many requests (bulk operations).
    pub fn session(&self) -> Session {
        let stream = std::os::unix::net::UnixStream::connect(&self.socket).expect("connecting to the daemon");
        Session { reader: std::io::BufReader::new(stream.try_clone().unwrap()), stream }
    }

    /// PID of the daemon process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends one raw request line on the socket; returns the raw answer.
    pub fn raw(&self, line: &[u8]) -> String {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).expect("connecting to the daemon");
        // The daemon may answer and close before an oversized line is all
        // written (EPIPE); its answer is still there to read.
        let _ = s.write_all(line).and_then(|()| s.write_all(b"\n"));
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).unwrap();
        answer
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs `enforcer ARGS` against this daemon.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(enforcer_bin());
        cmd.arg("--socket").arg(&self.socket).args(args);
        if args.first() == Some(&"maps") {
            cmd.arg("--bpffs").arg(&self.bpffs);
        }
        cmd.output().expect("running enforcer").into()
    }

    pub fn add_router(&self, router_id: &str) {
        self.cli(&["router", "add", router_id]).ok();
    }

    /// Creates a helper and returns its id.
    pub fn create_helper(&self, router_id: &str, protocol: &str, port: u16, helper: &str) -> String {
        let out = self
            .cli(&["helper", "create", router_id, "--protocol", protocol, "--port", &port.to_string(), "--helper", helper, "-o", "json"])
            .ok();
        out.json()["id"].as_str().expect("id in create output").to_string()
    }

    pub fn delete_helper(&self, router_id: &str, helper_id: &str) {
        self.cli(&["helper", "delete", router_id, helper_id]).ok();
    }

    /// Ports of the live rules in the maps, sorted.
    pub fn live_ports(&self) -> Vec<u64> {
        let mut ports: Vec<u64> = self.dump()["slots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "live")
            .map(|s| s["port"].as_u64().expect("a live slot has its rule"))
            .collect();
        ports.sort();
        ports
    }

    /// Ports of the stored helpers, sorted.
    pub fn helper_ports(&self) -> Vec<u64> {
        let listed = self.cli(&["helper", "list", "-o", "json"]).ok().json();
        let mut ports: Vec<u64> = listed.as_array().unwrap().iter().map(|h| h["port"].as_u64().unwrap()).collect();
        ports.sort();
        ports
    }

    /// `clients` sessions at once, each sending `each` requests, where
    /// `request(c, i)` is request i of client c. Returns every request
    /// with its answer and how long it took.
    pub fn concurrent<F>(&self, clients: u64, each: u64, request: F) -> Vec<(serde_json::Value, serde_json::Value, Duration)>
    where
        F: Fn(u64, u64) -> serde_json::Value + Send + Sync + 'static,
    {
        self.fan_out(clients, move |mut session, c| {
            (0..each)
                .map(|i| {
                    let req = request(c, i);
                    let t = Instant::now();
                    let answer = session.request(&req).expect("the daemon answers");
                    (req, answer, t.elapsed())
                })
                .collect()
        })
    }

    /// As [`Daemon::concurrent`], each client sending all its requests at
    /// once on its connection (pipelined) and then reading the answers.
    pub fn pipelined<F>(&self, clients: u64, each: u64, request: F) -> Vec<(serde_json::Value, serde_json::Value)>
    where
        F: Fn(u64, u64) -> serde_json::Value + Send + Sync + 'static,
    {
        self.fan_out(clients, move |mut session, c| {
            let reqs: Vec<_> = (0..each).map(|i| request(c, i)).collect();
            let answers = session.pipeline(&reqs).expect("the daemon answers");
            reqs.into_iter().zip(answers).collect()
        })
    }

    /// Runs `client(session, c)` for `clients` sessions at once, each on
    /// its own thread; what they return, client after client.
    fn fan_out<T, F>(&self, clients: u64, client: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(Session, u64) -> Vec<T> + Send + Sync + 'static,
    {
        let client = std::sync::Arc::new(client);
        let threads: Vec<_> = (0..clients)
            .map(|c| {
                let (session, client) = (self.session(), client.clone());
                std::thread::spawn(move || client(session, c))
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().expect("a client thread")).collect()
    }

    /// `maps dump -o json`, parsed.
    pub fn dump(&self) -> serde_json::Value {
        self.cli(&["maps", "dump", "-o", "json"]).ok().json()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.process.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.process.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
