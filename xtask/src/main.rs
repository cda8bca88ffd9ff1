//! `cargo xtask`: set-up, build, run, demo and tests of enforcer.

mod install;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, build, run, demo and test enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (Debian packages, bpf-linker, the nightly
    /// rust-src link) and mount bpffs. Idempotent; needs root.
    Setup,
    /// Build the eBPF object and the enforcer binary (release).
    Build,
    /// Build, then run the enforcer binary with ARGS (as root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and show enforcement end to end on a throwaway topology.
    Demo {
        /// The same story driven from Neutron: real Keystone and
        /// neutron-server on loopback, a router and its helper created
        /// through Neutron's API.
        #[arg(long)]
        openstack: bool,
    },
    /// Set up, build, and measure enforcer against the iptables and nftables
    /// ways; writes bench/results.md and SVG charts.
    Bench {
        /// A reduced set, under two minutes (CI runs it so the harness keeps working).
        #[arg(long)]
        quick: bool,
        /// Where to write the results [default: bench/ for a full run, where
        /// the committed results live; target/bench-quick/ for --quick, so a
        /// quick run never overwrites them].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build, then install the binary, systemd unit, tmpfiles entry,
    /// default configuration (an existing one is kept), man pages and shell
    /// completions (as root).
    Install {
        /// Install under this directory instead of / (staging, packaging).
        #[arg(long)]
        destdir: Option<PathBuf>,
    },
    /// Build the Debian package (cargo-deb) into target/debian/, and check
    /// it against the install list.
    Package,
    /// Set up, build, and run every test (unit, datapath, integration; the
    /// integration tests in both attach modes, tcx and netlink), then the
    /// quick benchmark (into a scratch directory, no thresholds).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build() -> Result<PathBuf> {
    status(cargo().args(["build", "--release", "--locked", "-p", "enforcer"]))?;
    Ok(root().join("target/release/enforcer"))
}

fn bench(bin: &Path, quick: bool, out: &Path) -> Result<()> {
    let out = if out.is_absolute() { out.to_path_buf() } else { root().join(out) };
    let mut cmd = cargo();
    cmd.args(["run", "--release", "--locked", "-p", "enforcer-tests", "--bin", "bench", "--"]).arg("--out").arg(&out).env("ENFORCER_BIN", bin);
    if quick {
        cmd.arg("--quick");
    }
    status(&mut cmd)
}

/// `cargo check` of the workspace as a contributor without the eBPF
/// toolchain runs it: the stable toolchain's own cargo, a PATH with neither
/// rustup nor bpf-linker, and AYA_BUILD_SKIP=1. Its own target directory
/// leaves the real build as it is.
fn userspace_check() -> Result<()> {
    let out = Command::new("rustc").args(["+stable", "--print", "sysroot"]).output().context("finding the stable toolchain")?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin");
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    status(
        Command::new(bin.join("cargo"))
            .current_dir(root())
            .args(["check", "--locked", "--workspace", "--target-dir", "target/userspace-check"])
            .env_clear()
            .env("HOME", home)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("AYA_BUILD_SKIP", "1"),
    )
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build().map(|bin| println!("built {}", bin.display())),
        Cmd::Run { args } => {
            let bin = build()?;
            status(Command::new(bin).args(args))
        }
        Cmd::Demo { openstack } => {
            setup::run()?;
            let bin = build()?;
            let mut cmd = cargo();
            cmd.args(["run", "--release", "--locked", "-p", "enforcer-tests", "--bin", "demo", "--"]).env("ENFORCER_BIN", bin);
            if openstack {
                cmd.arg("--openstack");
            }
            status(&mut cmd)
        }
        Cmd::Bench { quick, out } => {
            setup::run()?;
            let bin = build()?;
            let out = out.unwrap_or_else(|| PathBuf::from(if quick { "target/bench-quick" } else { "bench" }));
            bench(&bin, quick, &out)
        }
        Cmd::Install { destdir } => install::install(&build()?, destdir.as_deref()),
        Cmd::Package => {
            setup::run()?;
            install::check_package(&install::package(&build()?)?)
        }
        Cmd::Test { args } => {
            setup::run()?;
            let bin = build()?;
            let filtered = !args.is_empty();
            status(
                cargo()
                    .args(["test", "--release", "--locked", "--workspace"])
                    .args(&args)
                    .env("ENFORCER_BIN", &bin)
                    .env("RUST_TEST_THREADS", "2"),
            )?;
            // The kernel tests once more with the attach mode of kernels
            // older than 6.6 (this kernel has both).
            println!("xtask: the integration tests again, with attach = netlink");
            status(
                cargo()
                    .args(["test", "--release", "--locked", "-p", "enforcer-tests", "--tests"])
                    .args(&args)
                    .env("ENFORCER_BIN", &bin)
                    .env("ENFORCER_ATTACH", "netlink")
                    .env("RUST_TEST_THREADS", "2"),
            )?;
            if !filtered {
                println!("xtask: the Debian package, checked against the install list");
                install::check_package(&install::package(&bin)?)?;
                println!("xtask: the userspace crates checked with the stable toolchain alone (AYA_BUILD_SKIP=1)");
                userspace_check()?;
                let scratch = std::env::temp_dir().join(format!("enforcer-bench-{}", std::process::id()));
                let result = bench(&bin, true, &scratch);
                let _ = std::fs::remove_dir_all(&scratch);
                result?;
            }
            Ok(())
        }
    }
}
