//! Shell completions and man pages, generated from the clap definitions so
//! they never drift from `--help`. `cargo xtask generate` and the package
//! call `enforcer generate`; `enforcer completions SHELL` prints one script.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// The shells a package installs completions for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes one shell's completion script to standard output.
pub fn completions(shell: Shell) {
    clap_complete::generate(shell, &mut Cli::command(), "enforcer", &mut std::io::stdout());
}

/// Writes `completions/` (bash, zsh, fish) and `man/man8/` (enforcer.8 and
/// one page per subcommand, `enforcer-router-add.8`, ...) under `out`: the
/// layout of /usr/share/man, so `out/man` can be put on MANPATH.
pub fn all(out: &Path) -> Result<()> {
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions).with_context(|| format!("creating {}", completions.display()))?;
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut Cli::command(), "enforcer", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
        println!("{}", path.display());
    }
    let man = out.join("man/man8");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    // Section 8: a daemon and its administration commands.
    pages(&Cli::command(), "enforcer", &man)
}

/// The page of `cmd` (named `name`) and of each of its subcommands.
fn pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<()> {
    let cmd = cmd.clone().display_name(name.to_string()).bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.8"));
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone()).section("8").render(&mut text).with_context(|| format!("rendering {name}"))?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
