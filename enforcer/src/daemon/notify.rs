//! The service manager's side of the daemon (systemd `Type=notify`):
//! READY=1 only once the kernel is reconciled with the store, a watchdog
//! that a stuck daemon stops feeding, and STOPPING=1. Outside systemd
//! (no `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{info, warn};

use super::server::{Shared, with_daemon};

/// Outside systemd (no NOTIFY_SOCKET) sd_notify sends nothing.
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("telling the service manager {states:?}: {e}");
    }
}

/// Start-up reconciliation is done: the daemon enforces what the store says.
pub(super) fn ready(routers: usize, took: Duration) {
    let status = format!("enforcing {routers} routers (reconciled in {} ms)", took.as_millis());
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

pub(super) fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping; enforcement stays in place")]);
}

/// Feeds the watchdog (`WatchdogSec=`) at half its period, each time after
/// taking the daemon's lock: a daemon wedged on its lock is restarted by
/// systemd instead of answering nothing forever. Returns at once when no
/// watchdog is configured.
pub(super) async fn watchdog(daemon: Shared) {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let every = (period / 2).max(Duration::from_millis(100));
    info!(?period, "feeding the systemd watchdog");
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        with_daemon(&daemon, |_| ()).await;
        send(&[NotifyState::Watchdog]);
    }
}
