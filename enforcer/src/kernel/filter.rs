//! The rule filter: one bit per hash of a rule's (router, TCP or UDP, port)
//! (`enforcer_common::filter_bit`). The program reads it before hashing a
//! packet's rule key, so a packet that no rule of its router names (nearly
//! all) costs one array read, however many rules other routers have.
//!
//! A bit may be set with no rule behind it (two rules' hashes meet, or an
//! earlier run left it: the lookup then misses, as it would without the
//! filter), but never clear while a rule exists: it is set before its first
//! rule is inserted and cleared after its last is removed.

use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use enforcer_common::{RuleKey, filter_bit};

pub struct RuleFilter {
    map: Array<MapData, u64>,
    /// The words some rule needs, as written: a change writes one word
    /// without reading it. Every other word is left as it is.
    words: HashMap<u32, u64>,
    /// Rules per bit (word * 64 + bit), all routers together.
    rules: HashMap<u32, u32>,
}

/// A rule's bit: (word, mask, bit number).
fn bit_of(key: &RuleKey) -> Option<(u32, u64, u32)> {
    filter_bit(key.router, key.proto, key.port).map(|(word, mask)| (word, mask, word * 64 + mask.trailing_zeros()))
}

impl RuleFilter {
    /// Takes the map and sets the bits of `rules` (the rules map as it is).
    /// The map has 2^18 words: only the words some rule needs are written
    /// and later checked, so a start costs a write per rule at most.
    pub fn new(map: Array<MapData, u64>, rules: impl IntoIterator<Item = RuleKey>) -> Result<Self> {
        let mut filter = Self { map, words: HashMap::new(), rules: HashMap::new() };
        let (counts, words) = wanted(rules);
        for (&word, &value) in &words {
            filter.write(word, value)?;
        }
        filter.rules = counts;
        Ok(filter)
    }

    /// A rule for `key` is about to be inserted.
    pub fn add(&mut self, key: &RuleKey) -> Result<()> {
        let Some((word, mask, bit)) = bit_of(key) else { return Ok(()) };
        let count = self.rules.entry(bit).or_default();
        *count += 1;
        if *count > 1 {
            return Ok(());
        }
        let value = self.words.get(&word).copied().unwrap_or(0) | mask;
        self.write(word, value)
    }

    /// The rule for `key` was removed.
    pub fn remove(&mut self, key: &RuleKey) -> Result<()> {
        let Some((word, mask, bit)) = bit_of(key) else { return Ok(()) };
        let Some(count) = self.rules.get_mut(&bit) else { return Ok(()) };
        *count -= 1;
        if *count > 0 {
            return Ok(());
        }
        self.rules.remove(&bit);
        let value = self.words.get(&word).copied().unwrap_or(0) & !mask;
        self.write(word, value)
    }

    /// Words that `rules` need whose value in the kernel's map differs
    /// (read again, in case someone else wrote them).
    pub fn drift(&self, rules: impl IntoIterator<Item = RuleKey>) -> Result<usize> {
        let mut differ = 0;
        for (word, want) in wanted(rules).1 {
            differ += usize::from(self.map.get(&word, 0).context("reading the rule filter")? != want);
        }
        Ok(differ)
    }

    /// Recounts from `rules` and writes the words that `rules` need and the
    /// words this daemon set that they no longer need.
    pub fn rebuild(&mut self, rules: impl IntoIterator<Item = RuleKey>) -> Result<()> {
        let (counts, words) = wanted(rules);
        for word in self.words.keys().filter(|w| !words.contains_key(w)) {
            self.map.set(*word, 0, 0).context("writing the rule filter")?;
        }
        for (&word, &value) in &words {
            if self.map.get(&word, 0).context("reading the rule filter")? != value {
                self.map.set(word, value, 0).context("writing the rule filter")?;
            }
        }
        (self.rules, self.words) = (counts, words);
        Ok(())
    }

    fn write(&mut self, word: u32, value: u64) -> Result<()> {
        self.map.set(word, value, 0).context("writing the rule filter")?;
        if value == 0 {
            self.words.remove(&word);
        } else {
            self.words.insert(word, value);
        }
        Ok(())
    }
}

/// Rules per bit, and the words that hold them.
fn wanted(rules: impl IntoIterator<Item = RuleKey>) -> (HashMap<u32, u32>, HashMap<u32, u64>) {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let mut words: HashMap<u32, u64> = HashMap::new();
    for key in rules {
        if let Some((word, mask, bit)) = bit_of(&key) {
            *counts.entry(bit).or_default() += 1;
            *words.entry(word).or_default() |= mask;
        }
    }
    (counts, words)
}
