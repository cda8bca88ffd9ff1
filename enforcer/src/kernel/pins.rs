//! Maps pinned by an earlier run are reused as they are (the loader opens a
//! pin by its name whatever its definition), so before loading, each pin is
//! checked against the definition this build and configuration need. A map
//! made by another version, or with another capacity, is refused with a
//! clear error instead of being used with the wrong layout.

use std::path::Path;

use anyhow::{Result, bail};
use aya::maps::{MapData, MapType};
use enforcer_common::{
    Counters, FlowKey, MAP_COUNTERS, MAP_COUNTERS_PER_CPU, MAP_DEBUG, MAP_LOGS, MAP_PORTS, MAP_REVOKED, MAP_RULE_FILTER, MAP_REVOKED_ACTIVE, MAP_ROUTERS, MAP_RULES, MAP_SLOTS,
    MAP_SLOT_COUNTERS, RevokedFlow, RouterIndex, RouterValue, RuleKey, RuleValue, counters_capacity,
};

/// What a pinned map must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Definition {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for Definition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}, key {} B, value {} B, {} entries", self.map_type, self.key_size, self.value_size, self.max_entries)
    }
}

fn def<K, V>(map_type: MapType, max_entries: u32) -> Definition {
    Definition { map_type, key_size: size_of::<K>() as u32, value_size: size_of::<V>() as u32, max_entries }
}

/// Every pinned map, as this build needs it with these capacities.
/// (Not the rule filter: it holds nothing the rules map does not, so one
/// made otherwise is replaced, see `remove_legacy`.)
pub fn expected(max_rules: u32, revoked_capacity: u32) -> [(&'static str, Definition); 7] {
    [
        (MAP_RULES, def::<RuleKey, RuleValue>(MapType::Hash, max_rules)),
        (MAP_COUNTERS, def::<u32, Counters>(MapType::Array, counters_capacity(max_rules))),
        (MAP_ROUTERS, def::<RouterIndex, RouterValue>(MapType::Hash, 65536)),
        (MAP_REVOKED, def::<FlowKey, RevokedFlow>(MapType::Hash, revoked_capacity)),
        (MAP_REVOKED_ACTIVE, def::<u32, u32>(MapType::Array, 1)),
        (MAP_DEBUG, def::<u32, u32>(MapType::Array, 1)),
        // aya-log-ebpf 0.2's ring buffer: 128 KiB.
        (MAP_LOGS, def::<(), ()>(MapType::RingBuf, 1 << 17)),
    ]
}

/// Refuses pins in `dir` whose definition differs from what is needed.
pub fn check(dir: &Path, max_rules: u32, revoked_capacity: u32) -> Result<()> {
    for (name, want) in expected(max_rules, revoked_capacity) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| anyhow::anyhow!("reading the pinned map {}: {e}", path.display()))?;
        let found = Definition {
            map_type: info.map_type().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if found != want {
            let capacity_only = Definition { max_entries: want.max_entries, ..found } == want;
            let why = if capacity_only {
                "its capacity differs from the configuration (max_rules or revoked_flows_max changed)"
            } else {
                "it was made by another version of enforcer, with another layout"
            };
            bail!(
                "the pinned map {} is {found}, but this daemon needs {want}: {why}. \
                 Enforcement was left as it is. Either start with the configuration (or version) that made it, \
                 or remove all enforcement first (`enforcer teardown` with the daemon that made it, or remove {}) and start again",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Removes the pins of maps that earlier releases made and this one does
/// not use (the per-CPU counters, the counters by slot key, the live slots
/// and the ports list), and a
/// rule filter that is not the mappable array this build maps (an earlier
/// build's, with the flags 0): the loader then makes it again, and the
/// daemon fills it from the rules map before any program of this start
/// runs. Programs that still use one keep it until they are replaced; the
/// counts of live slots start again (see `Datapath::reconcile`).
pub fn remove_legacy(dir: &Path) -> Result<()> {
    let filter = dir.join(MAP_RULE_FILTER);
    let stale_filter = filter.exists()
        && !MapData::from_pin(&filter).and_then(|m| m.info()).is_ok_and(|info| super::filter::mappable(&info));
    let stale = [MAP_COUNTERS_PER_CPU, MAP_SLOT_COUNTERS, MAP_SLOTS, MAP_PORTS].map(|name| dir.join(name));
    for path in stale.iter().chain(stale_filter.then_some(&filter)) {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => bail!("removing the pinned map {}: {e}", path.display()),
            _ => {}
        }
    }
    Ok(())
}
