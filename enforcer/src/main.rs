mod cli;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
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
