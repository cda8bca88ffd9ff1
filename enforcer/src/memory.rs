//! The daemon's allocator: mimalloc, with memory handed back to the system
//! once a burst of changes is over.
//!
//! A change is parsed on a runtime worker and applied on the thread that
//! holds the daemon, so memory is freed on another thread than the one that
//! took it. glibc's malloc serialized those frees on its arena lock (about
//! a quarter of the daemon's time in malloc, free and the lock's futex
//! under 16 pipelining clients, `perf`); mimalloc frees them to the owning
//! page without a lock. It keeps freed pages with the thread that used
//! them, though, until that thread collects: the runtime's workers collect
//! when they go idle, and housekeeping forces the rest back every second.

use std::{cell::Cell, time::{Duration, Instant}};

use libmimalloc_sys::{mi_collect, mi_option_set, mi_option_t};

/// mimalloc v3's `mi_option_purge_delay` (the crate names no constant for
/// it; `the_purge_delay_option_is_the_one_set` checks the index).
const PURGE_DELAY: mi_option_t = 15;

/// Freed memory goes back to the system after this long (mimalloc's default,
/// a second, kept a burst's pages long after it, tens of MiB).
const PURGE_DELAY_MS: i64 = 10;

/// How often an idle worker collects what it freed.
const IDLE_COLLECT: Duration = Duration::from_secs(1);

/// Sets the allocator's options; called before the daemon starts threads.
pub fn configure() {
    // SAFETY: sets an option value; no other thread runs yet.
    unsafe { mi_option_set(PURGE_DELAY, PURGE_DELAY_MS as _) };
}

/// For a runtime worker about to park: frees the pages of what this thread
/// freed, at most once per `IDLE_COLLECT`.
pub fn idle() {
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    LAST.with(|last| {
        if last.get().is_none_or(|at| at.elapsed() >= IDLE_COLLECT) {
            last.set(Some(Instant::now()));
            // SAFETY: collects the calling thread's own heap.
            unsafe { mi_collect(false) };
        }
    });
}

/// Frees this thread's unused pages and hands every free page back to the
/// system now (housekeeping, once a second).
pub fn release() {
    // SAFETY: collects the calling thread's own heap and purges the arenas.
    unsafe { mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use libmimalloc_sys::mi_option_get;

    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads an option value.
        let get = || unsafe { mi_option_get(PURGE_DELAY) } as i64;
        // mimalloc v3's default purge delay is 1000 ms, and no other option
        // has that default: the index names the purge delay.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(get(), 1000);
        }
        configure();
        assert_eq!(get(), PURGE_DELAY_MS);
    }
}
