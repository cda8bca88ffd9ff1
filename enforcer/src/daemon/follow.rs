//! Following router namespaces: inotify events in /run/netns tell when one
//! appears or goes (a slow check stays as a safety net), and an rtnetlink
//! watcher per attached router re-syncs its attachments when its
//! interfaces change.

use std::{collections::HashMap, os::fd::AsRawFd, time::Duration};

use anyhow::{Context, Result};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::warn;

use super::server::{Shared, unlocked, with_daemon};
use crate::kernel::netns;

/// Follows namespaces: one that vanished is detached and its kernel state
/// cleaned up; one that (re)appeared is attached, its glue installed without
/// the lock. Then link watchers follow the attached ones. Driven by events
/// in /run/netns (inotify) and by routers added or removed, with a slow
/// check as a safety net.
pub(super) async fn follow_namespaces(daemon: Shared) {
    let mut watchers: HashMap<String, Watcher> = HashMap::new();
    let events = netns_events().map_err(|e| warn!("cannot watch /run/netns, checking it every second instead: {e:#}")).ok();
    let mut tick = tokio::time::interval(if events.is_some() { Duration::from_secs(10) } else { Duration::from_secs(1) });
    let routers_changed = with_daemon(&daemon, |d| d.routers_changed()).await;
    // Since when a namespace file has been there without its namespace.
    let mut mounting: Option<std::time::Instant> = None;
    loop {
        // Whether namespaces may have come or gone. Not when only routers
        // were added or removed: an add records its namespace, and looking
        // at every router's on each add made adds slower as routers grew.
        let mut namespaces = true;
        match &events {
            // Look again soon, for a while (a file left by a failed
            // `ip netns add` waits for the regular check).
            _ if mounting.is_some_and(|t| t.elapsed() < Duration::from_secs(2)) => tokio::time::sleep(Duration::from_millis(20)).await,
            Some(events) => tokio::select! {
                _ = tick.tick() => {}
                _ = routers_changed.notified() => namespaces = false,
                ready = events.readable() => {
                    if let Ok(mut guard) = ready {
                        // Drain; `ip netns add` creates the file, then mounts
                        // the namespace on it: let that finish.
                        let _ = events.get_ref().0.read_events();
                        guard.clear_ready();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = events.get_ref().0.read_events();
                    }
                }
            },
            None => tokio::select! {
                _ = tick.tick() => {}
                _ = routers_changed.notified() => namespaces = false,
            },
        }
        let changed = if namespaces { with_daemon(&daemon, |d| d.changed_namespaces()).await } else { Vec::new() };
        for (id, job) in changed {
            let glue = match job {
                Some(job) => Some(unlocked(job).await),
                None => None,
            };
            let rid = id.clone();
            if let Err(e) = with_daemon(&daemon, move |d| d.refresh_router(&rid, glue)).await {
                warn!(router = %id, "{e:#}");
            }
        }
        let (attached, now_mounting) = with_daemon(&daemon, |d| (d.attached(), d.namespaces_mounting())).await;
        mounting = if now_mounting { mounting.or_else(|| Some(std::time::Instant::now())) } else { None };
        follow(&daemon, &mut watchers, attached);
    }
}

/// A link watcher, and the namespace it watches.
struct Watcher {
    netns_id: Option<super::NetnsId>,
    task: JoinHandle<()>,
}

/// Starts a link watcher for each newly attached router (or router whose
/// namespace was made again), stops those of routers that went away.
fn follow(daemon: &Shared, watchers: &mut HashMap<String, Watcher>, attached: Vec<super::Followed>) {
    let now: HashMap<&str, Option<super::NetnsId>> = attached.iter().map(|(id, _, ns)| (id.as_str(), *ns)).collect();
    watchers.retain(|id, w| {
        let keep = now.get(id.as_str()) == Some(&w.netns_id) && !w.task.is_finished();
        if !keep {
            w.task.abort();
        }
        keep
    });
    for (id, ns, netns_id) in attached {
        if watchers.contains_key(&id) {
            continue;
        }
        match link_events(&ns) {
            Ok(sock) => {
                let d = daemon.clone();
                let rid = id.clone();
                watchers.insert(id, Watcher { netns_id, task: tokio::spawn(async move { watch_links(sock, d, rid).await }) });
            }
            Err(e) => warn!(router = %id, "cannot follow link events: {e:#}"),
        }
    }
}

/// An inotify instance, as tokio registers it.
struct Watch(nix::sys::inotify::Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Events of namespace files appearing and going in /run/netns.
fn netns_events() -> Result<AsyncFd<Watch>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let dir = netns::path("");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("inotify")?;
    inotify
        .add_watch(&dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVED_TO)
        .with_context(|| format!("watching {}", dir.display()))?;
    // SAFETY: the AsyncFd owns the inotify instance, so the descriptor stays
    // valid for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(Watch(inotify), tokio::io::Interest::READABLE) }.map_err(|e| anyhow::anyhow!("registering the inotify watch: {e}"))
}

/// An rtnetlink socket of the router's namespace, subscribed to link events.
fn link_events(ns: &str) -> Result<AsyncFd<Socket>> {
    const RTMGRP_LINK: u32 = 1;
    let sock = netns::run_in(&netns::path(ns), || {
        let mut s = Socket::new(NETLINK_ROUTE).context("rtnetlink socket")?;
        s.bind(&SocketAddr::new(0, RTMGRP_LINK)).context("subscribing to link events")?;
        s.set_non_blocking(true)?;
        Ok(s)
    })?;
    // SAFETY: the AsyncFd owns the socket, so the descriptor stays valid
    // for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }.map_err(|e| anyhow::anyhow!("{e}"))
}

async fn watch_links(sock: AsyncFd<Socket>, daemon: Shared, id: String) {
    loop {
        // Re-sync first: events before the subscription are not lost.
        let (d, rid) = (daemon.clone(), id.clone());
        if let Err(e) = with_daemon(&d, move |d| d.refresh_router(&rid, None)).await {
            warn!(router = %id, "re-sync after link event: {e:#}");
        }
        let Ok(mut guard) = sock.readable().await else { return };
        drain(sock.get_ref().as_raw_fd());
        guard.clear_ready();
        // Let a burst of events (a veth pair coming up) settle.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Discards every message queued on a netlink socket: the content does not
/// matter, a re-sync compares the namespace's interfaces with the pins. A
/// netlink message is a datagram: one longer than the buffer is read cut,
/// and its rest discarded with it. So no watcher holds a buffer of its own
/// between events (16 KiB each was 16 MiB of heap with 1,000 routers).
fn drain(fd: std::os::fd::RawFd) {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading into a local buffer, of its length, from a valid socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if n <= 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsRawFd, unix::net::UnixDatagram};

    #[test]
    fn draining_discards_every_queued_message_whatever_its_length() {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        tx.send(&[7u8; 20_000]).unwrap();
        tx.send(b"short").unwrap();
        super::drain(rx.as_raw_fd());
        let mut buf = [0u8; 64];
        let left = rx.recv(&mut buf);
        assert!(left.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "nothing is left: {left:?}");
        // Later messages are read whole.
        tx.send(b"next").unwrap();
        assert_eq!(rx.recv(&mut buf).unwrap(), 4);
    }
}
