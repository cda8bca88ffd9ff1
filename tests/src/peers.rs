//! Real protocol peers: pyftpdlib and ftplib for FTP, tftpd-hpa and tftp-hpa
//! for TFTP (Debian packages that `cargo xtask setup` installs), and the two
//! ends of a PPTP call written for the tests (peers/pptp.py: this kernel has
//! no PPP, so pptpd cannot run).

use std::{
    io::{BufRead, BufReader, Write},
    process::{ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Family, Netns, Process, Topology, peers_dir, unique};

/// Size of the file a transfer in progress reads slowly (sparse on disk).
pub const BIG_FILE: u64 = 256 << 20;
pub const SMALL_FILE: usize = 200_000;

/// A directory of files to serve, removed on drop.
pub struct Files {
    pub dir: std::path::PathBuf,
}

impl Files {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("files"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("small.bin"), vec![0x5a; SMALL_FILE]).unwrap();
        std::fs::File::create(dir.join("big.bin")).unwrap().set_len(BIG_FILE).unwrap();
        // tftpd runs as nobody.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }
}

impl Default for Files {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until something listens on `port` in `ns`.
fn wait_listening(ns: &Netns, proto: &str, port: u16) {
    let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.cmd("ss").args([flag, &format!("sport = :{port}")]).output().expect("ss");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {proto}/{port} in {}", ns.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct FtpServer {
    _process: Process,
    pub files: Files,
}

impl FtpServer {
    /// pyftpdlib, anonymous, on the server's address of `family`, port 21.
    pub fn start(topo: &Topology, family: Family) -> Self {
        Self::start_in(&topo.server, Topology::server_addr(family))
    }

    /// pyftpdlib, anonymous, in `ns` on `addr`, port 21.
    pub fn start_in(ns: &Netns, addr: &str) -> Self {
        let files = Files::new();
        let process = Process::spawn(
            "pyftpdlib",
            ns.cmd("/usr/bin/python3")
                .args(["-m", "pyftpdlib", "-i", addr, "-p", "21", "-d"])
                .arg(&files.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_listening(ns, "tcp", 21);
        Self { _process: process, files }
    }
}

/// One FTP control connection, driven command by command (peers/ftp_client.py).
pub struct FtpClient {
    _process: Process,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl FtpClient {
    pub fn start(topo: &Topology) -> Self {
        Self::start_in(&topo.client)
    }

    /// A client in `ns`.
    pub fn start_in(ns: &Netns) -> Self {
        let mut process = Process::spawn(
            "ftp client",
            ns.cmd("/usr/bin/python3")
                .arg(peers_dir().join("ftp_client.py"))
                .arg("3")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let stdin = process.child.stdin.take().unwrap();
        let stdout = BufReader::new(process.child.stdout.take().unwrap());
        Self { _process: process, stdin, stdout }
    }

    /// Connects and logs in to the server of `family`.
    pub fn login(topo: &Topology, family: Family) -> Self {
        Self::login_from(&topo.client, Topology::server_addr(family))
    }

    /// Connects from `ns` to the server at `addr` and logs in.
    pub fn login_from(ns: &Netns, addr: &str) -> Self {
        let mut c = Self::start_in(ns);
        c.ok(&format!("connect {addr} 21"));
        c.ok("login");
        c
    }

    /// Sends one command; returns its JSON result.
    pub fn cmd(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("ftp client said {answer:?}: {e}"))
    }

    /// Sends a command that must succeed.
    pub fn ok(&mut self, line: &str) -> Value {
        let v = self.cmd(line);
        assert_eq!(v["ok"], true, "ftp `{line}` failed: {v}");
        v
    }

    /// Sends a command that must fail.
    pub fn fails(&mut self, line: &str) -> Value {
        let v = self.cmd(line);
        assert_eq!(v["ok"], false, "ftp `{line}` should have failed: {v}");
        v
    }
}

pub struct TftpServer {
    _process: Process,
    pub files: Files,
}

impl TftpServer {
    pub fn start(topo: &Topology, family: Family) -> Self {
        let files = Files::new();
        let addr = match family {
            Family::V4 => format!("{}:69", Topology::SERVER_V4),
            Family::V6 => format!("[{}]:69", Topology::SERVER_V6),
        };
        let process = Process::spawn(
            "in.tftpd",
            topo.server
                .cmd("/usr/sbin/in.tftpd")
                .args(["--foreground", "--listen", "--secure", "--address", &addr, "--user", "nobody"])
                .arg(&files.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_listening(&topo.server, "udp", 69);
        Self { _process: process, files }
    }
}

/// The server end of a PPTP call (peers/pptp.py `pac`), IPv4, port 1723.
pub struct PptpServer {
    _process: Process,
}

impl PptpServer {
    pub fn start(topo: &Topology) -> Self {
        let process = Process::spawn(
            "pptp pac",
            topo.server.cmd("/usr/bin/python3").arg(peers_dir().join("pptp.py")).args(["pac", Topology::SERVER_V4]),
        );
        wait_listening(&topo.server, "tcp", 1723);
        Self { _process: process }
    }
}

/// A PPTP call from the client (peers/pptp.py `pns`): its control
/// connection set up, and its GRE data flow pinged on demand.
pub struct PptpCall {
    _process: Process,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PptpCall {
    /// Sets up a call to the server with the client's `call_id` (the
    /// server's is that with the top bit flipped); panics if it fails.
    pub fn start(topo: &Topology, call_id: u16) -> Self {
        let mut process = Process::spawn(
            "pptp pns",
            topo.client
                .cmd("/usr/bin/python3")
                .arg(peers_dir().join("pptp.py"))
                .args(["pns", Topology::SERVER_V4, "1", &call_id.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let stdin = process.child.stdin.take().unwrap();
        let mut stdout = BufReader::new(process.child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("peer_call_id"), "the PPTP call was not set up: {line:?}");
        Self { _process: process, stdin, stdout }
    }

    /// Whether one GRE packet of the call reached the server and its echo
    /// came back (within a second).
    pub fn ping(&mut self) -> bool {
        writeln!(self.stdin, "ping").unwrap();
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        let v: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("pptp client said {answer:?}: {e}"));
        v["echo"] == true
    }
}

/// Fetches small.bin over TFTP from the client; true if it arrived whole.
pub fn tftp_get(topo: &Topology, family: Family) -> bool {
    let out = std::env::temp_dir().join(unique("tftp"));
    let mut child = topo
        .client
        .cmd("timeout")
        .args(["10", "tftp", if family == Family::V6 { "-6" } else { "-4" }, Topology::server_addr(family)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tftp");
    let script = format!("mode octet\nrexmt 1\ntimeout 4\nget small.bin {}\nquit\n", out.display());
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let _ = child.wait();
    let got = std::fs::metadata(&out).map(|m| m.len() as usize == SMALL_FILE).unwrap_or(false);
    let _ = std::fs::remove_file(&out);
    got
}

/// The common FTP set-up: a router enforced by its own daemon with an ftp
/// helper on tcp/21, and an FTP server behind it.
pub struct FtpRouter {
    pub server: FtpServer,
    pub helper_id: String,
    pub daemon: crate::Daemon,
    pub topo: Topology,
}

impl FtpRouter {
    pub fn new(topo: Topology, family: Family) -> Self {
        let daemon = crate::Daemon::start();
        daemon.add_router(&topo.router_id);
        let helper_id = daemon.create_helper(&topo.router_id, "tcp", 21, "ftp");
        let server = FtpServer::start(&topo, family);
        Self { server, helper_id, daemon, topo }
    }
}
