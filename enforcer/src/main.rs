mod cli;

use clap::Parser;

/// Whether standard error is the journal's stream: systemd sets
/// JOURNAL_STREAM to its device and inode (what sd_journal_stream_fd's
/// users check), so a redirected stderr under systemd still gets text.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
        let (d, i) = v.split_once(':')?;
        Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_raw_fd()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
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
    tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init();
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
