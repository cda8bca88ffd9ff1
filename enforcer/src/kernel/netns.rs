//! Entering a router's network namespace.
//!
//! The daemon stays in the host namespaces (bpffs is visible there) and runs
//! the few steps that must happen inside a router on a short-lived thread
//! that `setns`es into it, so no other work ever runs in the wrong namespace.

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

/// Where `ip netns add NAME` puts the namespace's handle.
pub fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// What `ip netns add` has at `path` so far: nothing, the file it mounts
/// the namespace on (for a moment, and with no event when the mount
/// follows), or the namespace itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Absent,
    Mounting,
    /// The namespace's (device, inode): a namespace made again under the
    /// same name has another.
    Present(u64, u64),
}

pub fn presence(name: &str) -> Presence {
    use std::os::unix::fs::MetadataExt;
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let path = path(name);
    match std::fs::metadata(&path) {
        Err(_) => Presence::Absent,
        Ok(m) if nix::sys::statfs::statfs(&path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC) => Presence::Present(m.dev(), m.ino()),
        Ok(_) => Presence::Mounting,
    }
}

/// Runs `f` on a thread inside the network namespace at `ns`.
pub fn run_in<T: Send>(ns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let handle = File::open(ns).with_context(|| format!("opening network namespace {}", ns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(handle.as_fd(), CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {}", ns.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in network namespace {} panicked", ns.display()))?
    })
}

/// (name, ifindex) of the calling thread's namespace's interfaces, loopback
/// excepted (routed traffic never crosses it), sorted by name.
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = nix::net::if_::if_nameindex()
        .context("listing interfaces")?
        .iter()
        .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
        .filter(|(n, _)| n != "lo")
        .collect();
    out.sort();
    Ok(out)
}
