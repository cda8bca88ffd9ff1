//! Reads the nightly pinned in this directory's rust-toolchain.toml: the
//! one place it is pinned. Included by path in enforcer's build script and
//! in xtask's setup, so both read the file the same way.

/// The `toolchain.channel` of the rust-toolchain.toml at `file`.
pub fn pinned(file: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let table: toml::Table = text.parse().with_context(|| format!("parsing {}", file.display()))?;
    table
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_string)
        .with_context(|| format!("no toolchain.channel in {}", file.display()))
}
