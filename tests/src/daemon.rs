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
        crate::require_root();
        let name = unique("d");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
        let socket = dir.join("enforcer.sock");
        let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
        let process = Process::spawn(
            "enforcer daemon",
            Command::new(enforcer_bin())
                .arg("--socket")
                .arg(&socket)
                .arg("daemon")
                .arg("--bpffs")
                .arg(&bpffs)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .stdout(Stdio::null())
                .stderr(log),
        );
        let mut daemon = Self { process, dir, socket, bpffs };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.socket.exists() {
            if let Ok(Some(status)) = daemon.process.child.try_wait() {
                panic!("daemon exited ({status}):\n{}", daemon.log());
            }
            assert!(Instant::now() < deadline, "daemon did not come up:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
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
