//! Idempotent machine set-up: says what it installs, is quick when all is
//! there, and fails with a clear message when it cannot proceed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::status;

#[path = "../../enforcer-ebpf/toolchain.rs"]
mod toolchain;

/// Debian packages: tools the daemon calls, and the real protocol peers the
/// tests and the demo use.
const PACKAGES: &[(&str, &str)] = &[
    ("rust-web-src", "standard library source for build-std of the eBPF crate"),
    ("gcc", "compiles mimalloc, the daemon's allocator"),
    ("iproute2", "ip netns, veth"),
    ("util-linux", "nsenter"),
    ("iptables", "removing the iptables glue of earlier versions; Neutron's rules in tests"),
    ("conntrack", "conntrack -L in tests and demo"),
    ("python3-pyftpdlib", "FTP server"),
    ("tftpd-hpa", "TFTP server"),
    ("tftp-hpa", "TFTP client"),
    ("sip-tester", "sipp, SIP peer"),
    ("iperf3", "traffic for the forwarding benchmark"),
    ("nftables", "the netfilter glue (nft), and the nftables baseline of the benchmark"),
    ("tcpdump", "counting packets after revocation in the benchmark"),
    ("python3-venv", "the venv of the pinned neutron release the tests run"),
    ("prometheus", "a real Prometheus server scrapes the daemon's metrics in a test"),
    ("curl", "HTTP requests to the metrics endpoint and to Prometheus in tests"),
    ("tmux", "runs `enforcer top` in a terminal the tests read back"),
    ("systemd", "systemd-analyze verify of the unit, and a journald the logging test reads back"),
];

/// Debian's way to keep a package's service from being started on install
/// (`invoke-rc.d` asks this script): the servers above are run by the tests
/// that need them, on loopback, and nothing is left listening on the host.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// 0.10.2 and later name Rust generic unions (aya-log's `Global<u8>`) in BTF the
/// way the kernel accepts; with 0.10.0 the kernel refused the object's BTF.
const BPF_LINKER: &str = "bpf-linker@0.10.2";
/// Builds the Debian package (`cargo xtask package`).
const CARGO_DEB: &str = "cargo-deb@3.8.0";

/// The OpenStack releases the tests run: Neutron's L3 agent code beside
/// enforcer, and neutron-server with Keystone for the Neutron sync. One venv:
/// the two resolve to the same oslo libraries.
const OPENSTACK: [&str; 2] = ["neutron==29.0.0", "keystone==30.0.0"];
/// Their venv (the tests know this path too).
const OPENSTACK_VENV: &str = "/var/cache/enforcer/openstack-n29.0.0-k30.0.0";

pub fn run() -> Result<()> {
    if !nix_is_root() {
        bail!("`cargo xtask setup` needs root (apt-get, bpffs mount); run it with sudo -E");
    }
    let nightly = nightly()?;
    packages()?;
    cargo_tool(BPF_LINKER, &["bpf-linker", "--version"], "links the eBPF programs; a few minutes")?;
    cargo_tool(CARGO_DEB, &["cargo", "deb", "--version"], "builds the Debian package; about a minute")?;
    rust_src(&nightly)?;
    bpffs()?;
    openstack_venv()?;
    println!("setup: ready");
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The eBPF crate's pinned nightly (its rust-toolchain.toml), installed by
/// rustup where its servers answer. Where they do not, a `nightly` already
/// installed is used if it is that very build (its manifest's date): it is
/// then linked under the pinned name, which rustup takes as installed.
fn nightly() -> Result<String> {
    let pinned = pinned_nightly()?;
    let list = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if list.lines().any(|l| l.starts_with(&format!("{pinned}-"))) {
        return Ok(pinned);
    }
    println!("setup: installing the Rust toolchain {pinned} (build-std of the eBPF crate)");
    if status(Command::new("rustup").args(["toolchain", "install", &pinned, "--profile", "minimal", "--component", "rust-src"])).is_ok() {
        return Ok(pinned);
    }
    let date = pinned.strip_prefix("nightly-").context("the pinned channel is not a dated nightly")?;
    let home = PathBuf::from(output(Command::new("rustc").arg("+nightly").args(["--print", "sysroot"])).with_context(|| {
        format!("rustup could not install {pinned} and there is no `nightly` either; install {pinned} and run `cargo xtask setup` again")
    })?);
    let manifest = std::fs::read_to_string(home.join("lib/rustlib/multirust-channel-manifest.toml")).unwrap_or_default();
    if !manifest.lines().any(|l| l.trim() == format!("date = \"{date}\"")) {
        bail!(
            "rustup could not install {pinned}, and the installed `nightly` ({}) is another build.\n\
             Install {pinned} (`rustup toolchain install {pinned}`) and run `cargo xtask setup` again.",
            output(Command::new("rustc").args(["+nightly", "--version"])).unwrap_or_default()
        );
    }
    let name = home.file_name().context("nightly sysroot")?.to_string_lossy().replacen("nightly", &pinned, 1);
    let alias = home.with_file_name(&name);
    println!("setup: the installed nightly is the {date} build; linking it as {}", alias.display());
    std::os::unix::fs::symlink(&home, &alias).with_context(|| format!("linking {}", alias.display()))?;
    Ok(pinned)
}

/// The channel pinned in enforcer-ebpf/rust-toolchain.toml.
fn pinned_nightly() -> Result<String> {
    toolchain::pinned(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../enforcer-ebpf/rust-toolchain.toml"))
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg])).is_some_and(|s| s.ends_with("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().filter(|(p, _)| !installed(p)).map(|(p, _)| *p).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        println!("setup: installing {p} ({why})");
    }
    status(Command::new("apt-get").arg("update").arg("-q"))?;
    // Our own policy only if the host has none, and removed afterwards.
    let policy = !Path::new(POLICY_RC_D).exists();
    if policy {
        std::fs::write(POLICY_RC_D, "#!/bin/sh\n# cargo xtask setup: no service starts while it installs packages\nexit 101\n")?;
        std::fs::set_permissions(POLICY_RC_D, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if policy {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    result
}

/// A cargo-installed tool at the version `spec` (`name@version`) pins,
/// checked by what `version` (a command line) prints; another version is
/// replaced.
fn cargo_tool(spec: &str, version: &[&str], why: &str) -> Result<()> {
    let want = spec.split_once('@').context("tool spec without a version")?.1;
    let found = output(Command::new(version[0]).args(&version[1..]));
    if found.as_deref().is_some_and(|v| v.split_whitespace().any(|w| w == want)) {
        return Ok(());
    }
    match found {
        Some(other) => println!("setup: {other} found, {want} wanted; installing {spec} ({why})"),
        None => println!("setup: installing {spec} ({why})"),
    }
    status(Command::new("cargo").args(["+stable", "install", spec, "--locked", "--force"]))
}

fn version_of(text: &str) -> Option<(u32, u32)> {
    let v = text.split(|c: char| !(c.is_ascii_digit() || c == '.')).find(|w| w.matches('.').count() >= 2)?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The standard library source that build-std of the pinned nightly needs.
/// A rust-src that rustup installed (a real directory) is used as it is.
/// Otherwise (rustup cannot download it here) Debian's source, the
/// rust-web-src package, is linked in; when the nightly is newer than that
/// source, a copy is patched for the few lang items the compiler renamed.
fn rust_src(nightly: &str) -> Result<()> {
    let sysroot = PathBuf::from(output(Command::new("rustc").arg(format!("+{nightly}")).args(["--print", "sysroot"])).context("nightly sysroot")?);
    let link = sysroot.join("lib/rustlib/src/rust");
    let is_link = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link && link.join("library/core/src/lib.rs").exists() {
        return Ok(());
    }
    let files = output(Command::new("dpkg").args(["-L", "rust-web-src"])).context("listing rust-web-src")?;
    let source = files
        .lines()
        .find(|l| Path::new(l).parent() == Some(Path::new("/usr/src")) && l.contains("rustc-"))
        .map(PathBuf::from)
        .context("rust-web-src has no /usr/src/rustc-* directory")?;
    let source_version = version_of(&source.to_string_lossy()).context("version of rust-web-src")?;
    let nightly_version = version_of(&output(Command::new("rustc").arg(format!("+{nightly}")).arg("--version")).unwrap_or_default()).context("nightly version")?;

    let target = if nightly_version > source_version {
        let copy = PathBuf::from("/var/cache/enforcer").join(format!(
            "rust-src-{}.{}-for-{}.{}",
            source_version.0, source_version.1, nightly_version.0, nightly_version.1
        ));
        let marker = copy.join(".enforcer-patched");
        if !marker.exists() {
            println!("setup: patching a copy of {} for nightly {}.{} in {}", source.display(), nightly_version.0, nightly_version.1, copy.display());
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&copy)?;
            status(Command::new("cp").arg("-a").arg(format!("{}/.", source.display())).arg(&copy))?;
            patch_core(&copy.join("library/core/src"))?;
            std::fs::write(&marker, "patched by cargo xtask setup\n")?;
        }
        copy
    } else {
        source
    };
    if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        println!("setup: linking {} -> {}", link.display(), target.display());
        std::fs::create_dir_all(link.parent().context("link parent")?)?;
        // An empty or partial directory left by an interrupted install, or
        // an older link: replaced.
        if is_link {
            std::fs::remove_file(&link)?;
        } else if link.exists() {
            std::fs::remove_dir_all(&link).with_context(|| format!("removing the incomplete {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&target, &link)?;
    }
    Ok(())
}

/// The compiler-facing differences between Debian's 1.96 core and the 1.97
/// nightly, found by building core: each edit applies only where the old
/// text is present.
fn patch_core(core: &Path) -> Result<()> {
    let edits: &[(&str, &str, &str)] = &[
        // The compiler now wants one generic parameter on this lang item.
        (
            "ops/reborrow.rs",
            "pub trait CoerceShared: Reborrow {\n    /// The type of this value when reborrowed as shared.\n    type Target: Copy;\n}",
            "pub trait CoerceShared<T: Copy>: Reborrow {}",
        ),
        // The lang item was renamed.
        ("ptr/mod.rs", "#[lang = \"drop_in_place\"]", "#[lang = \"drop_glue\"]"),
        // The attribute is gone (only a niche optimisation, unused by eBPF).
        ("ptr/non_null.rs", "#[rustc_layout_scalar_valid_range_start(1)]\n", ""),
    ];
    for (file, old, new) in edits {
        let path = core.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        if text.contains(old) {
            std::fs::write(&path, text.replace(old, new))?;
        }
    }
    Ok(())
}

/// A venv with the pinned OpenStack releases from PyPI, made once (about
/// 90 s) and kept; a marker says the install finished.
fn openstack_venv() -> Result<()> {
    let venv = Path::new(OPENSTACK_VENV);
    let marker = venv.join(".enforcer-complete");
    if marker.exists() {
        return Ok(());
    }
    let list = OPENSTACK.join(" ");
    println!("setup: installing {list} into {OPENSTACK_VENV} (Neutron's code and servers for the tests; about 90 s)");
    let _ = std::fs::remove_dir_all(venv);
    status(Command::new("python3").args(["-m", "venv"]).arg(venv)).context("creating the venv (python3 with the venv module is needed)")?;
    status(Command::new(venv.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check"]).args(OPENSTACK))?;
    std::fs::write(&marker, format!("{list}\n"))?;
    Ok(())
}

fn bpffs() -> Result<()> {
    let fs = output(Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"])).unwrap_or_default();
    if fs != "bpf_fs" {
        println!("setup: mounting bpffs at /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf")?;
        status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}
