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

/// The cookie of the calling thread's network namespace: the key the
/// datapath finds its router by (`bpf_get_netns_cookie`).
pub fn current_cookie() -> Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .context("socket for SO_NETNS_COOKIE")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length of a u64.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE) (needs Linux 5.14+)");
    }
    Ok(cookie)
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
