//! Where each namespace's glue was last found intact: the nftables
//! generation of that check, kept in memory and in a file in the state
//! directory, so that a check (the periodic one, or the one at start) of a
//! namespace whose ruleset did not change since needs no nft run.
//!
//! Losing the file costs only speed: without a record the glue is listed
//! and compared in full. A record counts only for the reference it was
//! made against (a new layout or helper set makes every record stale), and
//! namespace cookies are never reused, so a stale record cannot pass a
//! changed ruleset.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::kernel::glue::Generation;

const FILE: &str = "glue-verified.json";

#[derive(Serialize, Deserialize)]
struct OnDisk<R, N> {
    reference: R,
    /// Namespace name -> generation at which its glue was found intact.
    namespaces: N,
}

pub(super) struct Verified {
    path: PathBuf,
    reference: std::sync::Arc<serde_json::Value>,
    namespaces: BTreeMap<String, Generation>,
    dirty: bool,
}

impl Verified {
    /// The records in `state_dir` that were made against `reference`.
    pub(super) fn load(state_dir: &Path, reference: std::sync::Arc<serde_json::Value>) -> Self {
        let path = state_dir.join(FILE);
        let namespaces = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<OnDisk<serde_json::Value, BTreeMap<String, Generation>>>(&bytes).ok())
            .filter(|d| d.reference == *reference)
            .map(|d| d.namespaces)
            .unwrap_or_default();
        Self { path, reference, namespaces, dirty: false }
    }

    pub(super) fn reference(&self) -> std::sync::Arc<serde_json::Value> {
        self.reference.clone()
    }

    pub(super) fn get(&self, netns: &str) -> Option<Generation> {
        self.namespaces.get(netns).copied()
    }

    /// Records what a check found: the generation if intact, else nothing
    /// (the next check lists the table again).
    pub(super) fn set(&mut self, netns: &str, intact_at: Option<Generation>) {
        let changed = match intact_at {
            Some(g) => self.namespaces.insert(netns.to_string(), g) != Some(g),
            None => self.namespaces.remove(netns).is_some(),
        };
        self.dirty |= changed;
    }

    /// Writes the records if they changed (a new file renamed over the old:
    /// a crash leaves one or the other).
    pub(super) fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let on_disk = OnDisk { reference: &*self.reference, namespaces: &self.namespaces };
        let written = serde_json::to_vec(&on_disk).map_err(std::io::Error::other).and_then(|bytes| crate::store::write_atomic(&self.path, &bytes));
        match written {
            Ok(()) => self.dirty = false,
            Err(e) => warn!(path = %self.path.display(), "saving where the glue was verified: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn records_come_back_only_for_the_reference_they_were_made_against() {
        let dir = std::env::temp_dir().join(format!("enforcer-verified-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let reference = Arc::new(serde_json::json!({"table": "a"}));
        let at = Generation { netns: 7, id: 3 };
        let mut v = Verified::load(&dir, reference.clone());
        v.set("qrouter-1", Some(at));
        v.set("qrouter-2", Some(at));
        v.set("qrouter-2", None);
        v.save();
        let again = Verified::load(&dir, reference);
        assert_eq!((again.get("qrouter-1"), again.get("qrouter-2")), (Some(at), None));
        let other = Verified::load(&dir, Arc::new(serde_json::json!({"table": "b"})));
        assert_eq!(other.get("qrouter-1"), None, "a record against another reference is stale");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
