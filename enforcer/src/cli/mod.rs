//! The `enforcer` command line: the daemon, and a client for its API.

mod generate;
mod table;
mod top;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use enforcer::{
    api::{ApiError, DEFAULT_SOCKET, Request},
    client,
    config::Config,
    daemon::{self, Daemon},
    kernel::{self, dump},
};

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "Conntrack helpers per router, enforced by eBPF in the kernel fast path",
    long_about = "Enables netfilter conntrack helpers (ftp, tftp, sip, ...) per router, protocol and port. \
A TC program on every router interface tags allowed flows; deleting a helper revokes it at once, \
including the data connections it opened. Run `enforcer daemon` as root; the other commands talk to it."
)]
pub struct Cli {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "ENFORCER_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (as root): load the programs, serve the API.
    Daemon(DaemonArgs),
    /// Manage routers (network namespaces whose interfaces are enforced).
    #[command(subcommand)]
    Router(RouterCmd),
    /// Manage conntrack helper rules of routers.
    #[command(subcommand)]
    Helper(HelperCmd),
    /// Inspect the kernel maps directly (works while the daemon is down).
    #[command(subcommand)]
    Maps(MapsCmd),
    /// Show the daemon, routers, attachments, helpers and drift between the
    /// kernel and the store.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// The helpers this host offers (probed from the kernel, narrowed by
    /// allowed_helpers), with their protocols and usual ports.
    Catalogue {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Read the audit log: every change and every refused request.
    Audit {
        /// Only entries since this RFC 3339 time, or this long ago (15m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// A live view of routers and rules: packet rates, drops and revoked
    /// rules, refreshed every second. Reads the pinned maps (root), so it
    /// works while the daemon is down. Keys: q quit, s sort, tab rules.
    Top {
        /// bpffs directory of the pinned maps.
        #[arg(long, default_value = kernel::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Stream changes, revocations, repairs and refusals as they happen (one
    /// line each; `-o json` gives one JSON object per line, for SIEM
    /// pipelines). Runs until interrupted. Administrators only.
    Events {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Remove every router and all enforcement (links, glue, maps, the
    /// helpers' conntrack entries), then stop the daemon. Stopping the daemon otherwise (SIGTERM)
    /// leaves enforcement in place.
    Teardown,
    /// Diagnostics, off by default.
    #[command(subcommand)]
    Debug(DebugCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// For bash: `enforcer completions bash > /etc/bash_completion.d/enforcer`.
    Completions { shell: clap_complete::Shell },
    /// Write completions and man pages under a directory (used by packaging).
    #[command(hide = true)]
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct DaemonArgs {
    /// bpffs directory of the pinned maps [default: /sys/fs/bpf/enforcer].
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Directory of the store [default: /var/lib/enforcer].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// TOML configuration file (socket, bpffs, state_dir, attach, helper_mask, slot_mask, max_rules, ...).
    /// A `[neutron]` section (`cloud = "NAME"` of clouds.yaml, or keystoneauth's keys) makes the
    /// daemon follow Neutron: the routers of this node's qrouter-/snat- namespaces get exactly
    /// their Neutron helpers (see the README).
    #[arg(long)]
    config: Option<PathBuf>,
    /// How programs are attached: tcx links (kernel 6.6+), netlink filters
    /// on a clsact qdisc (older kernels), or auto [default: the file's
    /// `attach`, else auto].
    #[arg(long, env = "ENFORCER_ATTACH", value_enum)]
    attach: Option<enforcer::kernel::AttachSetting>,
}

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
enum RouterCmd {
    /// Start enforcing a router: install the glue, attach the programs.
    Add {
        /// Router UUID.
        router_id: String,
        /// Network namespace of the router [default: qrouter-ROUTER_ID].
        #[arg(long)]
        netns: Option<String>,
        /// Project owning the router [default: default].
        #[arg(long = "project")]
        project_id: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Stop enforcing a router: revoke its helpers, detach, remove the glue.
    Remove { router_id: String },
    /// List routers.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum HelperCmd {
    /// Enable a helper for (protocol, port) on a router.
    Create {
        /// Router UUID.
        router_id: String,
        /// tcp or udp.
        #[arg(long)]
        protocol: String,
        /// Destination port of the control connection, 1-65535.
        #[arg(long)]
        port: i64,
        /// Kernel helper name: ftp, tftp, sip, sane, amanda, Q.931, RAS, irc, pptp, snmp, netbios-ns
        /// (`enforcer catalogue` shows what this host offers).
        #[arg(long)]
        helper: String,
        /// Helper UUID (administrators only; generated when absent).
        #[arg(long)]
        id: Option<String>,
        /// Project [default: the router's].
        #[arg(long = "project")]
        project_id: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change a helper; the old tuple's flows are revoked.
    Update {
        /// Router UUID.
        router_id: String,
        /// Helper UUID.
        helper_id: String,
        #[arg(long)]
        protocol: Option<String>,
        #[arg(long)]
        port: Option<i64>,
        #[arg(long)]
        helper: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a helper; returns once the kernel no longer forwards its flows,
    /// and reports what it removed from the router's conntrack table.
    Delete {
        /// Router UUID.
        router_id: String,
        /// Helper UUID.
        helper_id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Make a router's helpers exactly those in a file, in one transaction:
    /// helpers not in it are deleted (their flows revoked), changed ones get
    /// a new rule, new ones are created. Nothing changes if any entry is bad.
    ///
    /// The file is a JSON array of {"protocol", "port", "helper"} objects,
    /// each with an optional "id" (administrators) and "project_id"; an
    /// entry without an id keeps the helper already on its protocol and port.
    Set {
        /// Router UUID.
        router_id: String,
        /// The JSON file, or - for standard input.
        #[arg(long)]
        file: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List helpers, of one router or of all.
    List {
        router_id: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one helper.
    Show {
        router_id: String,
        helper_id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum MapsCmd {
    /// Print every rule slot with its state and counters.
    Dump {
        /// bpffs directory of the pinned maps.
        #[arg(long, default_value = kernel::DEFAULT_BPFFS)]
        bpffs: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Describe packets the programs drop (router index, slot, why) in the
    /// daemon's log (target `datapath`, e.g. `journalctl -u enforcer`).
    /// Only drops are described, and only the next `--drops` of them:
    /// passing packets never pay for it, and while it is off a drop pays one
    /// map read. Administrators only.
    Datapath {
        #[arg(value_enum)]
        state: Switch,
        /// How many drops to describe before it turns itself off.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=enforcer::api::MAX_DEBUG_DROPS as i64))]
        drops: u32,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Switch {
    On,
    Off,
}

/// Exit status of a refused request.
pub const EXIT_REFUSED: i32 = 1;
/// Exit status of a failure to reach the daemon or the kernel.
pub const EXIT_FAILED: i32 = 2;

impl Cli {
    pub fn is_daemon(&self) -> bool {
        matches!(self.command, Command::Daemon(_))
    }
}

pub fn run(cli: Cli) -> Result<i32> {
    let (request, output) = match cli.command {
        Command::Daemon(args) => return run_daemon(args, cli.socket).map(|_| 0),
        Command::Completions { shell } => {
            generate::completions(shell);
            return Ok(0);
        }
        Command::Generate { out } => return generate::all(&out).map(|_| 0),
        Command::Top { bpffs } => return top::run(&bpffs, &cli.socket).map(|_| 0),
        Command::Events { output, count } => return events(&cli.socket, output, count),
        // Root reads the pins directly (works with the daemon down); other
        // callers ask the daemon, which confines the dump to their project.
        Command::Maps(MapsCmd::Dump { bpffs, output }) if nix::unistd::geteuid().is_root() => {
            let dump = dump::read(&bpffs)?;
            table::print_dump(&dump, output)?;
            return Ok(0);
        }
        Command::Maps(MapsCmd::Dump { output, .. }) => (Request::MapsDump {}, output),
        Command::Audit { since, output } => (Request::Audit { since }, output),
        Command::Catalogue { output } => (Request::Catalogue {}, output),
        Command::Status { output } => (Request::Status {}, output),
        Command::Teardown => (Request::Teardown {}, Output::Table),
        Command::Debug(DebugCmd::Datapath { state, drops, output }) => {
            let drops = match state {
                Switch::On => drops,
                Switch::Off => 0,
            };
            (Request::DebugDatapath { drops }, output)
        }
        Command::Router(cmd) => match cmd {
            RouterCmd::Add { router_id, netns, project_id, output } => {
                (Request::RouterAdd { router_id, netns, project_id }, output)
            }
            RouterCmd::Remove { router_id } => (Request::RouterRemove { router_id }, Output::Table),
            RouterCmd::List { output } => (Request::RouterList {}, output),
        },
        Command::Helper(cmd) => match cmd {
            HelperCmd::Create { router_id, protocol, port, helper, id, project_id, output } => {
                (Request::HelperCreate { router_id, protocol, port, helper, id, project_id }, output)
            }
            HelperCmd::Update { router_id, helper_id, protocol, port, helper, output } => {
                (Request::HelperUpdate { router_id, helper_id, protocol, port, helper }, output)
            }
            HelperCmd::Delete { router_id, helper_id, output } => (Request::HelperDelete { router_id, helper_id }, output),
            HelperCmd::Set { router_id, file, output } => (Request::HelperSet { router_id, helpers: read_set(&file)? }, output),
            HelperCmd::List { router_id, output } => (Request::HelperList { router_id }, output),
            HelperCmd::Show { router_id, helper_id, output } => (Request::HelperShow { router_id, helper_id }, output),
        },
    };
    match client::call(&cli.socket, &request)? {
        Ok(reply) => {
            table::print_reply(&reply, output)?;
            Ok(0)
        }
        Err(err) => {
            print_error(&err, output);
            Ok(EXIT_REFUSED)
        }
    }
}

fn events(socket: &std::path::Path, output: Output, count: Option<u64>) -> Result<i32> {
    use std::io::Write;
    let mut left = count.unwrap_or(u64::MAX);
    if left == 0 {
        return Ok(0);
    }
    let streamed = client::stream(socket, &Request::Events {}, |line| {
        let event: enforcer::api::Event = serde_json::from_str(line).with_context(|| format!("bad event from the daemon: {line:?}"))?;
        match output {
            Output::Json => println!("{line}"),
            Output::Table => table::print_event(&event),
        }
        // Each event as it comes, also into a pipe.
        std::io::stdout().flush()?;
        left -= 1;
        Ok(left > 0)
    })?;
    match streamed {
        Ok(()) => Ok(0),
        Err(err) => {
            print_error(&err, output);
            Ok(EXIT_REFUSED)
        }
    }
}

/// The helper set in `path` (- for standard input).
fn read_set(path: &std::path::Path) -> Result<Vec<enforcer::api::HelperSpec>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the helper set from standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array of helpers ({{\"protocol\", \"port\", \"helper\"}})", path.display()))
}

fn print_error(err: &ApiError, output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ "error": err })),
        Output::Table => eprintln!("error ({}): {}", serde_json::to_value(err.code).unwrap_or_default().as_str().unwrap_or("error"), err.message),
    }
}

fn run_daemon(args: DaemonArgs, socket: PathBuf) -> Result<()> {
    enforcer::memory::configure();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    // Flags win over the file; the socket flag always has a value.
    config.socket = socket;
    if let Some(b) = args.bpffs {
        config.bpffs = b;
    }
    if let Some(s) = args.state_dir {
        config.state_dir = s;
    }
    if let Some(a) = args.attach {
        config.attach = a;
    }
    let socket = config.socket.clone();
    let daemon = Daemon::start(config).context("starting the daemon")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).on_thread_park(enforcer::memory::idle).enable_all().build()?;
    rt.block_on(daemon::serve(daemon, &socket))
}
