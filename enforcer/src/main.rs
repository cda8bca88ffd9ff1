mod cli;

use clap::Parser;

/// See `enforcer::memory`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Whether standard error is the journal's stream: systemd sets
/// JOURNAL_STREAM to its device and inode, so a stderr redirected elsewhere
/// under systemd still gets text.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_raw_fd()) else { return false };
    is_journal_stream(std::env::var("JOURNAL_STREAM").ok().as_deref(), (st.st_dev, st.st_ino))
}

/// `JOURNAL_STREAM` ("DEVICE:INODE") names the file `(dev, ino)`.
fn is_journal_stream(var: Option<&str>, (dev, ino): (u64, u64)) -> bool {
    var.and_then(|v| v.split_once(':')).is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// Logs go to journald, with fields and priorities, when the daemon runs
/// under systemd; otherwise to standard error as text. ENFORCER_LOG filters.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = || tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG").unwrap_or_else(|_| "info".into());
    if stderr_is_journal()
        && let Ok(journal) = tracing_journald::layer()
    {
        tracing_subscriber::registry().with(journal.with_syslog_identifier("enforcer".into())).with(filter()).init();
        return;
    }
    // Colours only for a person at a terminal: a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter()).with_ansi(ansi).with_writer(std::io::stderr).init();
}

fn main() {
    init_logging();
    let args = cli::Cli::parse();
    if !args.is_daemon() {
        // A reader that goes away (`enforcer status | head`) ends the
        // command quietly, as for any Unix tool; the daemon keeps SIGPIPE
        // ignored and sees EPIPE on a client's closed socket instead.
        // SAFETY: restores the default action before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            cli::EXIT_FAILED
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::is_journal_stream;

    #[test]
    fn journal_stream_is_matched_by_device_and_inode() {
        assert!(is_journal_stream(Some("8:1234"), (8, 1234)));
        assert!(!is_journal_stream(Some("8:1234"), (8, 1235)), "stderr redirected elsewhere");
        assert!(!is_journal_stream(Some("9:1234"), (8, 1234)));
        assert!(!is_journal_stream(None, (8, 1234)), "not under systemd");
        assert!(!is_journal_stream(Some("garbage"), (8, 1234)));
    }
}
