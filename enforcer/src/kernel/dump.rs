//! Reading the pinned maps directly: works while the daemon is down.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use enforcer_common::{MAP_COUNTERS, MAP_ROUTERS, MAP_RULES, RouterIndex, RouterValue, RuleKey, RuleValue, SlotKey};

use crate::{api::Protocol, catalogue};

use crate::api::{Dump, SlotEntry};

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is the daemon set up with this --bpffs?)", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

pub fn read(dir: &Path) -> Result<Dump> {
    let rules: HashMap<_, RuleKey, RuleValue> = HashMap::try_from(open(dir, MAP_RULES)?)?;
    let counters = MapData::from_pin(dir.join(MAP_COUNTERS)).with_context(|| format!("opening pinned map {MAP_COUNTERS}"))?;
    let routers: HashMap<_, RouterIndex, RouterValue> = HashMap::try_from(open(dir, MAP_ROUTERS)?)?;

    let router_ids: std::collections::HashMap<RouterIndex, String> = routers
        .iter()
        .filter_map(|r| r.ok())
        .map(|(index, v)| (index, uuid::Uuid::from_bytes(v.id).hyphenated().to_string()))
        .collect();
    let rule_of: std::collections::HashMap<SlotKey, (RuleKey, RuleValue)> = rules
        .iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| (SlotKey::new(k.router, v.slot as u32), (k, v)))
        .collect();

    let mut out = Vec::new();
    for (_, counts) in super::counters::scan(&counters)? {
        let key = SlotKey::new(counts.router, counts.slot);
        // A slot is live while a rule names it.
        let rule = rule_of.get(&key);
        let helper_id = rule.map(|(_, v)| v.helper);
        out.push(SlotEntry {
            router_id: router_ids.get(&key.router).cloned(),
            router_index: key.router,
            slot: key.slot,
            protocol: rule.and_then(|(k, _)| Protocol::from_number(k.proto)),
            port: rule.map(|(k, _)| k.port),
            helper: helper_id.and_then(catalogue::by_id).map(|h| h.name.to_string()),
            state: if rule.is_some() { "live" } else { "revoked" }.to_string(),
            tagged: counts.tagged,
            dropped: counts.dropped,
        });
    }
    out.sort_by(|a, b| (&a.router_id, a.router_index, a.slot).cmp(&(&b.router_id, b.router_index, b.slot)));
    Ok(Dump { bpffs: dir.display().to_string(), routers: router_ids.len(), slots: out })
}
