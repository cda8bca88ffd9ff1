//! Test bed for enforcer's kernel tests and demo: network namespaces made
//! for one test (client — router — server, with a stateful forward policy),
//! a daemon of its own, and real protocol peers. Every guard tears down what
//! it made in `Drop`, so a failing test leaves nothing behind.
//!
//! Kernel tests need root; `require_root` fails them with a clear message
//! instead of letting them pass without running.

pub mod bench;
pub mod daemon;
pub mod neutron;
pub mod openstack;
pub mod peers;
pub mod topology;

use std::{
    path::PathBuf,
    process::{Child, Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

pub use daemon::{Daemon, Session};
pub use topology::{Family, Netns, Topology};

/// Fails the calling test unless it can use the kernel for real.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this kernel test needs root (BPF, network namespaces, netfilter); run it with `sudo -E cargo xtask test`");
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        panic!("/sys/fs/bpf is missing: run `cargo xtask setup` to mount bpffs");
    }
}

/// A name no other test or test run uses: pid and a counter.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("enf{}{:x}{}", tag, std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The enforcer binary under test: `ENFORCER_BIN`, else the release build.
pub fn enforcer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENFORCER_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("enforcer");
        if p.exists() {
            return p;
        }
    }
    panic!("enforcer binary not found: run `cargo xtask build` or set ENFORCER_BIN");
}

/// Where the peer scripts live.
pub fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Polls `f` every 100 ms until it holds; fails the test after `secs`.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen within {secs} s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// bpf(2) with the attribute block `attr` (tests that play another program
/// touching enforcer's objects); panics with the errno on failure and
/// returns the result (a new descriptor for commands that make one).
pub fn bpf<T>(cmd: i64, attr: &[T], what: &str) -> i64 {
    // SAFETY: the kernel reads at most size_of_val(attr) bytes of a block
    // we own for the whole call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), std::mem::size_of_val(attr)) };
    assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
    rc
}

/// A file or directory under the temp dir for one test, removed on drop
/// (also when the test fails).
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A file holding `contents`.
    pub fn file(tag: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    /// An empty directory.
    pub fn dir(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct Process {
    pub child: Child,
    pub what: String,
}

impl Process {
    pub fn spawn(what: &str, cmd: &mut Command) -> Self {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Self { child, what: what.to_string() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to this process only.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A small tmpfs mounted for one test (a filesystem that fills up),
/// unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("fs"));
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir));
        Self(dir)
    }

    /// Fills it up with a file `filler`; returns the file's path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("dd").args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"]).output();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
