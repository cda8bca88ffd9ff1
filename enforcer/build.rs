//! Builds the eBPF crate with the nightly that `enforcer-ebpf/rust-toolchain.toml`
//! pins (build-std, bpf-linker) and leaves the object in OUT_DIR, where
//! `kernel::PROGRAMS` embeds it: the binary that ships is the one that was
//! tested. `cargo xtask setup` installs what this needs.
//!
//! `AYA_BUILD_SKIP=1` (the variable aya-build honours) embeds an empty
//! object instead, so `cargo check`, clippy and rust-analyzer work on the
//! userspace crates with the stable toolchain alone; such a binary refuses
//! to load programs and says why.
use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, bail};

const SKIP: &str = "AYA_BUILD_SKIP";

#[path = "../enforcer-ebpf/toolchain.rs"]
mod toolchain;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../enforcer-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("enforcer.bpf.o");
    println!("cargo:rerun-if-env-changed={SKIP}");
    if env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning={SKIP} is set: the eBPF programs are not built and this binary cannot load them");
        std::fs::write(&object, [])?;
        std::fs::write(out_dir.join("ctindex.bpf.o"), [])?;
        return Ok(());
    }
    for dir in ["src", "Cargo.toml", "rust-toolchain.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", manifest.join("../enforcer-common/src").display());
    let toolchain = toolchain::pinned(&ebpf_dir.join("rust-toolchain.toml"))?;
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain, "cargo", "build", "--release", "--bins"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        // bpf_target_arch selects the helper bindings of the host arch.
        .env("CARGO_ENCODED_RUSTFLAGS", format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"));
    // The outer (stable) build's settings must not leak into the nightly one.
    for key in ["RUSTC", "RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "RUSTFLAGS", "CARGO"] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .with_context(|| format!("running `rustup run {toolchain} cargo build` for enforcer-ebpf (run `cargo xtask setup`, or set {SKIP}=1 to check the userspace crates only)"))?;
    if !status.success() {
        bail!("building enforcer-ebpf with {toolchain} failed ({status}); `cargo xtask setup` installs that nightly, its rust-src and bpf-linker");
    }
    for (bin, object) in [("enforcer", object), ("ctindex", out_dir.join("ctindex.bpf.o"))] {
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&built, &object).with_context(|| format!("copying {}", built.display()))?;
    }
    Ok(())
}

