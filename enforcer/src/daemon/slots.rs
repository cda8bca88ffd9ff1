//! The life of a rule slot. A slot is the number a rule's connections carry
//! in their ct mark, and a revoked slot is reused only once no connection
//! can carry it any more: otherwise an old connection would come back to
//! life under a new rule. Every transition goes through here.
//!
//! ```text
//!  free ──take──▶ live ──revoked, never tagged──▶ cooling ──untagged still──▶ free
//!                  │                                 └──tagged meanwhile──▶ quarantined
//!                  ├──revoked, conntrack cleaned──▶ free
//!                  └──revoked, clean-up incomplete──▶ quarantined ──nothing carries it──▶ free
//! ```
//!
//! A freed slot's counters stay in the maps until no revoked flow counts its
//! drops against them (`released`). The daemon does the kernel and store
//! steps; this module only keeps the states.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::{api::RevokeReport, store::HelperRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    /// A rule tags with it.
    Live,
    /// Revoked without a visit to conntrack (it never tagged a packet); held
    /// until its counters are read again after the cooling time.
    Cooling(Instant),
    /// Revoked; some conntrack entry may still carry it.
    Quarantined,
}

#[derive(Default)]
struct RouterSlots {
    states: BTreeMap<u16, SlotState>,
    /// The slots `states` holds, as runs of consecutive slots: a free slot
    /// is found past a run in one lookup (walking slot by slot through the
    /// cooling ones of many deletes took a quarter of the daemon's time).
    runs: Runs,
    /// Where the next search for a free slot starts.
    hint: u16,
}

impl RouterSlots {
    fn insert(&mut self, slot: u16, state: SlotState) {
        if self.states.insert(slot, state).is_none() {
            self.runs.insert(slot);
        }
        debug_assert!(self.runs_agree_at(slot), "slot runs drifted from the slots at {slot}");
    }

    fn remove(&mut self, slot: u16) {
        if self.states.remove(&slot).is_some() {
            self.runs.remove(slot);
        }
        debug_assert!(self.runs_agree_at(slot), "slot runs drifted from the slots at {slot}");
    }

    /// Whether the run around `slot` is the maximal run of held slots there
    /// (checked after every change in debug builds, so drift shows where it
    /// starts).
    fn runs_agree_at(&self, slot: u16) -> bool {
        let held = |s: Option<u16>| s.is_some_and(|s| self.states.contains_key(&s));
        match self.runs.around(slot) {
            Some((first, last)) => {
                held(Some(slot)) && held(Some(first)) && held(Some(last)) && !held(first.checked_sub(1)) && !held(last.checked_add(1))
            }
            None => !held(Some(slot)),
        }
    }
}

/// Maximal runs of held slots: first -> last.
#[derive(Default)]
struct Runs(BTreeMap<u16, u16>);

impl Runs {
    /// The run holding `slot`, if any.
    fn around(&self, slot: u16) -> Option<(u16, u16)> {
        self.0.range(..=slot).next_back().map(|(&a, &b)| (a, b)).filter(|&(_, b)| b >= slot)
    }

    /// `slot` is not held yet.
    fn insert(&mut self, slot: u16) {
        let before = slot.checked_sub(1).and_then(|s| self.around(s));
        let after = slot.checked_add(1).and_then(|s| self.0.get(&s).map(|&b| (s, b)));
        let first = before.map_or(slot, |(a, _)| a);
        let last = match after {
            Some((a, b)) => {
                self.0.remove(&a);
                b
            }
            None => slot,
        };
        self.0.insert(first, last);
    }

    /// `slot` is held.
    fn remove(&mut self, slot: u16) {
        let Some((a, b)) = self.around(slot) else { return };
        self.0.remove(&a);
        if a < slot {
            self.0.insert(a, slot - 1);
        }
        if slot < b {
            self.0.insert(slot + 1, b);
        }
    }

    /// The first slot in `from..=max`, then in `1..from`, that no run holds.
    fn free_from(&self, from: u16, max: u16) -> Option<u16> {
        let past = |s: u16| match self.around(s) {
            Some((_, b)) => b.checked_add(1).filter(|&n| n <= max),
            None => Some(s),
        };
        past(from).or_else(|| past(1).filter(|&s| s < from))
    }
}

#[derive(Default)]
pub(super) struct Slots {
    routers: HashMap<String, RouterSlots>,
    /// Cooling slots, oldest first (an entry whose slot left cooling since
    /// is skipped when due).
    cooling: VecDeque<(String, u16, Instant)>,
    /// Freed slots (router index, slot) whose counters go once no revoked
    /// flow counts against them.
    released: BTreeSet<(u32, u16)>,
}

impl Slots {
    /// The slots of the stored helpers (live) and quarantine.
    pub(super) fn of<'a>(helpers: impl IntoIterator<Item = &'a HelperRecord>, quarantine: &BTreeSet<(String, u16)>) -> Self {
        let mut slots = Slots::default();
        for h in helpers {
            slots.set(&h.helper.router_id, h.slot, SlotState::Live);
        }
        for (router, slot) in quarantine {
            slots.set(router, *slot, SlotState::Quarantined);
        }
        slots
    }

    /// After a failed group commit: the states of the store again, but
    /// slots cooling that the store does not have live keep cooling, and
    /// counters awaiting their sweep still await it.
    pub(super) fn reload<'a>(&mut self, helpers: impl IntoIterator<Item = &'a HelperRecord>, quarantine: &BTreeSet<(String, u16)>) {
        let mut fresh = Slots::of(helpers, quarantine);
        for (router, slot, at) in std::mem::take(&mut self.cooling) {
            if self.state(&router, slot) == Some(SlotState::Cooling(at)) && fresh.state(&router, slot).is_none() {
                fresh.cool(&router, slot, at);
            }
        }
        fresh.released = std::mem::take(&mut self.released);
        *self = fresh;
    }

    /// Whether any slot of `router` is not free: a rule has it, or some
    /// connection may still carry it.
    pub(super) fn in_use(&self, router: &str) -> bool {
        self.routers.get(router).is_some_and(|r| !r.states.is_empty())
    }

    pub(super) fn state(&self, router: &str, slot: u16) -> Option<SlotState> {
        self.routers.get(router)?.states.get(&slot).copied()
    }

    fn set(&mut self, router: &str, slot: u16, state: SlotState) {
        self.routers.entry(router.to_string()).or_default().insert(slot, state);
    }

    fn cool(&mut self, router: &str, slot: u16, at: Instant) {
        self.set(router, slot, SlotState::Cooling(at));
        self.cooling.push_back((router.to_string(), slot, at));
    }

    /// Takes a free slot of `router` in 1..=max (live from now on),
    /// searching on from the last one taken and skipping each run of held
    /// slots in one lookup. A router's name is copied for its first slot only.
    pub(super) fn take(&mut self, router: &str, max: u16) -> Option<u16> {
        let r = self.routers.get_mut(router);
        let r = match r {
            Some(r) => r,
            None => self.routers.entry(router.to_string()).or_default(),
        };
        let free = r.runs.free_from(r.hint.clamp(1, max), max)?;
        r.hint = if free == max { 1 } else { free + 1 };
        r.insert(free, SlotState::Live);
        Some(free)
    }

    /// Gives back a slot taken for a rule that was not applied after all:
    /// nothing ever tagged with it.
    pub(super) fn untake(&mut self, router: &str, slot: u16) {
        if self.state(router, slot) == Some(SlotState::Live) {
            self.forget(router, slot);
        }
    }

    fn forget(&mut self, router: &str, slot: u16) {
        if let Some(r) = self.routers.get_mut(router) {
            r.remove(slot);
        }
    }

    /// A live slot's rule was revoked; where it goes depends on what the
    /// revocation found (see the module's diagram).
    pub(super) fn revoked(&mut self, router: &str, index: u32, slot: u16, report: &RevokeReport) {
        if report.never_tagged {
            self.cool(router, slot, Instant::now());
        } else if report.flush_error.is_some() {
            self.quarantine(router, slot);
        } else {
            self.free(router, index, slot);
        }
    }

    /// Some conntrack entry may carry the slot: it stays out of reuse.
    pub(super) fn quarantine(&mut self, router: &str, slot: u16) {
        self.set(router, slot, SlotState::Quarantined);
    }

    /// Nothing carries the slot any more: free for a new rule, its counters
    /// kept until swept.
    pub(super) fn free(&mut self, router: &str, index: u32, slot: u16) {
        self.forget(router, slot);
        self.released.insert((index, slot));
    }

    /// Cooling slots whose cooling time is over, oldest first. They stay
    /// cooling until the caller frees or quarantines them.
    pub(super) fn cooled(&mut self, cooling: Duration) -> Vec<(String, u16)> {
        let mut due = Vec::new();
        while let Some((router, slot, at)) = self.cooling.front().cloned() {
            if at.elapsed() < cooling {
                break;
            }
            self.cooling.pop_front();
            if self.state(&router, slot) == Some(SlotState::Cooling(at)) {
                due.push((router, slot));
            }
        }
        due
    }

    /// The quarantined slots, per router.
    pub(super) fn quarantined(&self) -> impl Iterator<Item = (&str, u16)> {
        self.held(|s| s == SlotState::Quarantined)
    }

    /// Slots revoked but not free (quarantined or cooling): their counters
    /// stay in the maps (a cooling slot's are read once more).
    pub(super) fn revoked_not_free(&self) -> impl Iterator<Item = (&str, u16)> {
        self.held(|s| s != SlotState::Live)
    }

    fn held(&self, which: fn(SlotState) -> bool) -> impl Iterator<Item = (&str, u16)> {
        self.routers
            .iter()
            .flat_map(move |(r, rs)| rs.states.iter().filter(move |(_, s)| which(**s)).map(move |(slot, _)| (r.as_str(), *slot)))
    }

    /// Freed slots whose counters await the sweep.
    pub(super) fn released(&self) -> &BTreeSet<(u32, u16)> {
        &self.released
    }

    /// The sweep removed (or kept, for a live slot) those counters.
    pub(super) fn swept(&mut self, index: u32, slot: u16) {
        self.released.remove(&(index, slot));
    }

    /// A removed router (`index` in the maps): its slots go with it, and so
    /// do its counters awaiting the sweep (the maps lost them with the
    /// router; a new router given the index must not have its own swept).
    pub(super) fn forget_router(&mut self, router: &str, index: u32) {
        self.routers.remove(router);
        self.cooling.retain(|(r, ..)| r != router);
        self.released.retain(|(i, _)| *i != index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(never_tagged: bool, flush_error: bool) -> RevokeReport {
        RevokeReport { never_tagged, flush_error: flush_error.then(|| "left".to_string()), ..Default::default() }
    }

    #[test]
    fn take_hands_out_free_slots_only_and_wraps_around() {
        let mut s = Slots::default();
        assert_eq!((s.take("r", 3), s.take("r", 3), s.take("r", 3)), (Some(1), Some(2), Some(3)));
        assert_eq!(s.take("r", 3), None, "all live");
        s.free("r", 7, 2);
        assert_eq!(s.take("r", 3), Some(2));
        assert_eq!(s.take("other", 3), Some(1), "per router");
    }

    #[test]
    fn a_take_finds_the_slot_a_walk_from_the_hint_would() {
        // Takes and frees in a fixed pseudo-random order, against a walk
        // over a plain set of the held slots.
        let (mut s, max) = (Slots::default(), 40u16);
        let mut held = BTreeSet::new();
        let mut x = 7u32;
        for _ in 0..20_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            if !(x >> 16).is_multiple_of(3) {
                let hint = s.routers.get("r").map_or(1, |r| r.hint.clamp(1, max));
                let walk = (hint..=max).chain(1..hint).find(|slot| !held.contains(slot));
                assert_eq!(s.take("r", max), walk, "held {held:?}");
                held.extend(walk);
            } else if let Some(&slot) = held.iter().nth((x >> 8) as usize % held.len().max(1)) {
                s.free("r", 1, slot);
                held.remove(&slot);
            }
            let Some(runs) = s.routers.get("r").map(|r| &r.runs.0) else { continue };
            assert!(runs.iter().zip(runs.iter().skip(1)).all(|((_, b), (a, _))| b + 1 < *a), "runs apart: {runs:?}");
            assert_eq!(runs.iter().map(|(a, b)| (b - a + 1) as usize).sum::<usize>(), held.len());
        }
    }

    #[test]
    fn a_cleaned_revocation_frees_the_slot_and_keeps_its_counters_until_swept() {
        let mut s = Slots::default();
        let slot = s.take("r", 10).unwrap();
        s.revoked("r", 7, slot, &report(false, false));
        assert_eq!(s.state("r", slot), None);
        assert!(s.released().contains(&(7, slot)));
        s.swept(7, slot);
        assert!(s.released().is_empty());
    }

    #[test]
    fn an_incomplete_clean_up_quarantines_until_freed() {
        let mut s = Slots::default();
        let slot = s.take("r", 10).unwrap();
        s.revoked("r", 7, slot, &report(false, true));
        assert_eq!(s.state("r", slot), Some(SlotState::Quarantined));
        assert_ne!(s.take("r", 10), Some(slot), "never handed out while quarantined");
        assert_eq!(s.quarantined().collect::<Vec<_>>(), [("r", slot)]);
        s.free("r", 7, slot);
        assert_eq!(s.quarantined().count(), 0);
    }

    #[test]
    fn a_never_tagged_slot_cools_and_is_due_only_after_the_cooling_time() {
        let mut s = Slots::default();
        let slot = s.take("r", 10).unwrap();
        s.revoked("r", 7, slot, &report(true, false));
        assert!(matches!(s.state("r", slot), Some(SlotState::Cooling(_))));
        assert_eq!(s.revoked_not_free().collect::<Vec<_>>(), [("r", slot)], "its counters stay");
        assert!(s.cooled(Duration::from_secs(60)).is_empty());
        assert_eq!(s.cooled(Duration::ZERO), [("r".to_string(), slot)]);
        // Still cooling until the caller decides; then quarantined if tagged.
        s.quarantine("r", slot);
        assert_eq!(s.state("r", slot), Some(SlotState::Quarantined));
    }

    #[test]
    fn a_cooling_slot_that_left_cooling_is_not_due() {
        let mut s = Slots::default();
        let a = s.take("r", 10).unwrap();
        let b = s.take("gone", 10).unwrap();
        s.revoked("r", 1, a, &report(true, false));
        s.revoked("gone", 2, b, &report(true, false));
        s.free("r", 1, a);
        s.forget_router("gone", 2);
        assert!(s.cooled(Duration::ZERO).is_empty());
    }

    #[test]
    fn untake_gives_back_only_a_live_slot() {
        let mut s = Slots::default();
        let a = s.take("r", 10).unwrap();
        let b = s.take("r", 10).unwrap();
        s.quarantine("r", b);
        s.untake("r", a);
        s.untake("r", b);
        assert_eq!((s.state("r", a), s.state("r", b)), (None, Some(SlotState::Quarantined)));
    }

    #[test]
    fn reload_keeps_cooling_slots_the_store_has_not_live_and_pending_sweeps() {
        let mut s = Slots::default();
        let (a, b) = (s.take("r", 10).unwrap(), s.take("r", 10).unwrap());
        s.revoked("r", 1, a, &report(true, false));
        s.revoked("r", 1, b, &report(true, false));
        s.free("r", 1, 9);
        // The store has b live again (its delete was not kept).
        let helper = HelperRecord {
            helper: crate::api::Helper { id: "h".into(), router_id: "r".into(), project_id: "p".into(), protocol: crate::api::Protocol::Tcp, port: 21, helper: "ftp".into() },
            slot: b,
        };
        s.reload([&helper], &BTreeSet::new());
        assert!(matches!(s.state("r", a), Some(SlotState::Cooling(_))));
        assert_eq!(s.state("r", b), Some(SlotState::Live));
        assert!(s.released().contains(&(1, 9)));
        assert_eq!(s.cooled(Duration::ZERO), [("r".to_string(), a)]);
    }

    #[test]
    fn a_forgotten_router_leaves_no_counters_to_sweep_under_its_index() {
        let mut s = Slots::default();
        let slot = s.take("old", 10).unwrap();
        s.free("old", 4, slot);
        s.free("other", 5, 1);
        s.forget_router("old", 4);
        assert_eq!(s.released().iter().copied().collect::<Vec<_>>(), vec![(5, 1)]);
        assert_eq!(s.take("old", 10), Some(1), "a router added again under the name starts afresh");
    }
}
