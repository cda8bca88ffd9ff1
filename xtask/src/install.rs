//! `cargo xtask install` and `cargo xtask package`: the binary, the unit,
//! the tmpfiles entry, the default configuration, man pages and shell
//! completions, laid out as a Debian system expects them. The package is
//! built by cargo-deb from the same list (enforcer's Cargo.toml,
//! `[package.metadata.deb]`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{root, status};

/// Where generated completions and man pages go (the package's assets).
pub fn generated() -> PathBuf {
    root().join("target/generated")
}

/// Runs `enforcer generate` (completions and man pages from clap).
pub fn generate(bin: &Path) -> Result<()> {
    status(Command::new(bin).arg("generate").arg("--out").arg(generated()))
}

/// (source under the repository, destination, mode). Also in enforcer's
/// Cargo.toml for cargo-deb; `cargo xtask test` checks the two agree.
fn files() -> Vec<(PathBuf, String, u32)> {
    let r = root();
    let g = generated();
    let mut list: Vec<(PathBuf, String, u32)> = [
        (r.join("target/release/enforcer"), "usr/sbin/enforcer", 0o755),
        (r.join("packaging/enforcer.service"), "usr/lib/systemd/system/enforcer.service", 0o644),
        (r.join("packaging/enforcer.tmpfiles"), "usr/lib/tmpfiles.d/enforcer.conf", 0o644),
        (g.join("completions/enforcer.bash"), "usr/share/bash-completion/completions/enforcer", 0o644),
        (g.join("completions/_enforcer"), "usr/share/zsh/vendor-completions/_enforcer", 0o644),
        (g.join("completions/enforcer.fish"), "usr/share/fish/vendor_completions.d/enforcer.fish", 0o644),
    ]
    .into_iter()
    .map(|(src, dst, mode)| (src, dst.to_string(), mode))
    .collect();
    if let Ok(pages) = std::fs::read_dir(g.join("man/man8")) {
        let mut pages: Vec<PathBuf> = pages.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        pages.sort();
        for page in pages {
            let name = page.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            list.push((page, format!("usr/share/man/man8/{name}"), 0o644));
        }
    }
    list
}

const CONFIG: &str = "etc/enforcer/enforcer.toml";

/// Installs under `destdir` (absent: the running system). An existing
/// configuration file is kept; on the running system, systemd is told.
pub fn install(bin: &Path, destdir: Option<&Path>) -> Result<()> {
    generate(bin)?;
    let base = destdir.unwrap_or(Path::new("/"));
    for (src, dst, mode) in files() {
        copy(&src, &base.join(dst), mode)?;
    }
    let config = base.join(CONFIG);
    if config.exists() {
        println!("install: keeping {}", config.display());
    } else {
        copy(&root().join("packaging/enforcer.toml"), &config, 0o644)?;
    }
    if destdir.is_none() && Path::new("/run/systemd/system").exists() {
        status(Command::new("systemctl").arg("daemon-reload"))?;
        status(Command::new("systemd-tmpfiles").args(["--create", "enforcer.conf"]))?;
        println!("install: done; start it with `systemctl enable --now enforcer`");
    } else {
        println!("install: done under {}", base.display());
    }
    Ok(())
}

fn copy(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir_all(dst.parent().context("destination has a parent")?)?;
    // A new file renamed into place: a running binary is replaced, not
    // rewritten under the daemon.
    let tmp = dst.with_extension("xtask-new");
    std::fs::copy(src, &tmp).with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    std::fs::rename(&tmp, dst).with_context(|| format!("installing {}", dst.display()))?;
    println!("install: {}", dst.display());
    Ok(())
}

/// Builds the .deb with cargo-deb from the release build; returns its path.
pub fn package(bin: &Path) -> Result<PathBuf> {
    generate(bin)?;
    let out = root().join("target/debian");
    let _ = std::fs::remove_dir_all(&out);
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root()).args(["deb", "-p", "enforcer", "--no-build", "--no-strip", "--output"]).arg(&out);
    status(&mut cmd)?;
    let deb = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb made no .deb")?;
    println!("package: {}", deb.display());
    Ok(deb)
}

/// The install list, as destination paths (for the test that compares it
/// with the package's).
pub fn destinations() -> Vec<String> {
    let mut d: Vec<String> = files().into_iter().map(|(_, dst, _)| format!("/{dst}")).collect();
    d.push(format!("/{CONFIG}"));
    d.sort();
    d
}

/// Checks the package against the install list: the same files, the
/// binary runs from it, and its scripts start no service.
pub fn check_package(deb: &Path) -> Result<()> {
    let out = Command::new("dpkg-deb").arg("--contents").arg(deb).output().context("dpkg-deb")?;
    let mut packaged: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').trim_end_matches(".gz").to_string())
        .filter(|p| !p.starts_with("/usr/share/doc/"))
        .collect();
    packaged.sort();
    let installed = destinations();
    anyhow::ensure!(packaged == installed, "the package and `cargo xtask install` differ:\npackage: {packaged:?}\ninstall: {installed:?}");
    let scratch = std::env::temp_dir().join(format!("enforcer-deb-{}", std::process::id()));
    let result = (|| {
        status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&scratch))?;
        let version = Command::new(scratch.join("usr/sbin/enforcer")).arg("--version").output()?;
        anyhow::ensure!(version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("enforcer "), "the packaged binary does not run");
        status(Command::new("dpkg-deb").arg("-e").arg(deb).arg(scratch.join("DEBIAN")))?;
        let conffiles = std::fs::read_to_string(scratch.join("DEBIAN/conffiles")).unwrap_or_default();
        anyhow::ensure!(conffiles.contains("/etc/enforcer/enforcer.toml"), "the configuration is a conffile (kept on upgrade)");
        let control = std::fs::read_to_string(scratch.join("DEBIAN/control")).context("reading the package's control file")?;
        let depends = control.lines().find_map(|l| l.strip_prefix("Depends:")).unwrap_or_default();
        anyhow::ensure!(depends.contains("nftables") && !depends.contains("iproute2"), "the package depends on what the daemon runs (nft), no more: {depends}");
        let postinst = std::fs::read_to_string(scratch.join("DEBIAN/postinst")).unwrap_or_default();
        anyhow::ensure!(!postinst.contains("systemctl start") && !postinst.contains("--no-block start"), "installing the package starts no service:\n{postinst}");
        println!("package: {} files, as `cargo xtask install` lays them out; binary runs; depends on nftables only; configuration is a conffile; nothing started", packaged.len());
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
