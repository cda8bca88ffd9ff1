//! The rule filter: one bit per hash of a rule's (router, TCP or UDP, port)
//! (`enforcer_common::filter_bit`). The program reads it before hashing a
//! packet's rule key, so a packet that no rule of its router names (nearly
//! all) costs one array read, however many rules other routers have.
//!
//! A bit may be set with no rule behind it (two rules' hashes meet: the
//! lookup then misses, as it would without the filter), but never clear
//! while a rule exists: it is set before its first rule is inserted and
//! cleared after its last is removed.
//!
//! The map is made mappable (`FILTER_MAP_FLAGS`) and its words are mapped
//! into the daemon: a bit is set or cleared with an atomic store instead of
//! a `bpf` call (about 6% of a delete's time, `perf`).

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, MapInfo};
use enforcer_common::{FILTER_MAP_FLAGS, FILTER_WORDS, RuleKey, filter_bit};

pub struct RuleFilter {
    words: Mapped,
    /// Rules per bit (word * 64 + bit), all routers together.
    rules: HashMap<u32, u32>,
}

/// A rule's bit: (word, mask, bit number).
fn bit_of(key: &RuleKey) -> Option<(u32, u64, u32)> {
    filter_bit(key.router, key.proto, key.port).map(|(word, mask)| (word, mask, word * 64 + mask.trailing_zeros()))
}

impl RuleFilter {
    /// Maps the filter and makes it hold the bits of `rules` (the rules map
    /// as it is) and no other.
    pub fn new(map: Map, rules: impl IntoIterator<Item = RuleKey>) -> Result<Self> {
        let Map::Array(map) = map else { bail!("the rule filter is not an array map") };
        let mut filter = Self { words: Mapped::new(map, libc::PROT_READ | libc::PROT_WRITE)?, rules: HashMap::new() };
        filter.rebuild(rules);
        Ok(filter)
    }

    /// A rule for `key` is about to be inserted.
    pub fn add(&mut self, key: &RuleKey) {
        let Some((word, mask, bit)) = bit_of(key) else { return };
        let count = self.rules.entry(bit).or_default();
        *count += 1;
        if *count == 1 {
            self.words.word(word).fetch_or(mask, Ordering::SeqCst);
        }
    }

    /// The rule for `key` was removed.
    pub fn remove(&mut self, key: &RuleKey) {
        let Some((word, mask, bit)) = bit_of(key) else { return };
        let Some(count) = self.rules.get_mut(&bit) else { return };
        *count -= 1;
        if *count == 0 {
            self.rules.remove(&bit);
            self.words.word(word).fetch_and(!mask, Ordering::SeqCst);
        }
    }

    /// The value of word `word` of the map.
    pub fn word(&self, word: u32) -> u64 {
        self.words.word(word).load(Ordering::SeqCst)
    }

    /// Recounts from `rules` and makes every word of the map hold their
    /// bits and no other (a walk of every mapped word).
    pub fn rebuild(&mut self, rules: impl IntoIterator<Item = RuleKey>) {
        let Wanted { counts, words } = Wanted::of(rules);
        for (i, word) in self.words.all().iter().enumerate() {
            let want = words.get(&(i as u32)).copied().unwrap_or(0);
            if word.load(Ordering::SeqCst) != want {
                word.store(want, Ordering::SeqCst);
            }
        }
        self.rules = counts;
    }

    /// Takes the counts of `wanted`, whose bits the map's words hold
    /// already (no drift): what a rebuild does then, without walking every
    /// word (at 100,000 rules two rebuilds were a fifth of a check of the
    /// maps).
    pub fn recount(&mut self, wanted: Wanted) {
        self.rules = wanted.counts;
    }
}

/// The bits a set of rules needs: rules per bit, and the words that hold
/// them.
pub struct Wanted {
    counts: HashMap<u32, u32>,
    words: HashMap<u32, u64>,
}

impl Wanted {
    /// Words needed whose value (`word` reads it) differs.
    pub fn differing(&self, word: impl Fn(u32) -> u64) -> Vec<u32> {
        self.words.iter().filter(|&(&w, &want)| word(w) != want).map(|(&w, _)| w).collect()
    }

    /// The value word `word` needs.
    pub fn word(&self, word: u32) -> u64 {
        self.words.get(&word).copied().unwrap_or(0)
    }

    pub fn of(rules: impl IntoIterator<Item = RuleKey>) -> Self {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        let mut words: HashMap<u32, u64> = HashMap::new();
        for key in rules {
            if let Some((word, mask, bit)) = bit_of(&key) {
                *counts.entry(bit).or_default() += 1;
                *words.entry(word).or_default() |= mask;
            }
        }
        Self { counts, words }
    }
}

/// Whether a map is the filter this build maps: made mappable, with
/// FILTER_WORDS words.
pub fn mappable(info: &MapInfo) -> bool {
    info.map_flags() & FILTER_MAP_FLAGS != 0 && info.max_entries() == FILTER_WORDS && info.value_size() == size_of::<u64>() as u32
}

/// The words of a pinned filter, mapped read-only, for a check that runs
/// without the daemon's `RuleFilter` (read with `bpf` calls, they filled a
/// table of 12 MiB, whatever the rules, that stayed with the daemon).
pub struct Words(Mapped);

impl Words {
    pub fn open(map: MapData) -> Result<Self> {
        Ok(Self(Mapped::new(map, libc::PROT_READ)?))
    }

    pub fn word(&self, word: u32) -> u64 {
        self.0.word(word).load(Ordering::SeqCst)
    }
}

/// The filter map's words, mapped into the daemon for as long as it runs.
struct Mapped {
    start: NonNull<AtomicU64>,
    /// Held while its words are mapped.
    _map: MapData,
}

// SAFETY: the mapping belongs to this value alone, and its words are only
// reached as atomics.
unsafe impl Send for Mapped {}

impl Mapped {
    const BYTES: usize = FILTER_WORDS as usize * size_of::<u64>();

    fn new(map: MapData, prot: libc::c_int) -> Result<Self> {
        if !mappable(&map.info().context("reading the rule filter's definition")?) {
            bail!("the rule filter map is not the mappable array of {FILTER_WORDS} words this daemon makes");
        }
        // SAFETY: a shared mapping of the whole map (its size checked
        // above), at offset 0 as the kernel requires; unmapped on drop.
        let at = unsafe { libc::mmap(std::ptr::null_mut(), Self::BYTES, prot, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), 0) };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the rule filter");
        }
        let start = NonNull::new(at.cast::<AtomicU64>()).context("mapping the rule filter: no address")?;
        Ok(Self { start, _map: map })
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: FILTER_WORDS aligned u64s, mapped while `self` lives.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), FILTER_WORDS as usize) }
    }

    fn word(&self, word: u32) -> &AtomicU64 {
        &self.all()[word as usize]
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer reachable.
        unsafe { libc::munmap(self.start.as_ptr().cast(), Self::BYTES) };
    }
}

