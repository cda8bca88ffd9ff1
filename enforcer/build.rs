//! Builds the eBPF crate (nightly, build-std) and leaves the object in
//! OUT_DIR, where `kernel::programs` embeds it: the binary that ships is the
//! one that was tested. `cargo xtask setup` installs what this needs.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../enforcer-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");
    for dir in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../enforcer-common/src").display()
    );
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--bins"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        // bpf_target_arch selects the helper bindings of the host arch.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        );
    // The outer (stable) build's settings must not leak into the nightly one.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .context("running `rustup run nightly cargo build` for enforcer-ebpf (run `cargo xtask setup`)")?;
    if !status.success() {
        bail!("building enforcer-ebpf failed ({status}); `cargo xtask setup` installs the nightly rust-src link and bpf-linker");
    }
    let object = target_dir.join("bpfel-unknown-none/release/enforcer");
    std::fs::copy(&object, out_dir.join("enforcer.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}
