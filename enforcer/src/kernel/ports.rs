//! The ports prefilter: one bit per (TCP or UDP, port) that some router has
//! a rule for. The ingress program reads it before hashing a packet's rule
//! key, so traffic to ports no helper uses (nearly all of it) costs one
//! array read.
//!
//! A bit may be set with no rule behind it (the lookup then misses, as it
//! would without the filter), but never clear while a rule exists: it is set
//! before its first rule is inserted and cleared after its last is removed.

use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use enforcer_common::{PORT_WORDS, RuleKey, port_bit};

pub struct Ports {
    map: Array<MapData, u64>,
    /// What the map holds, so a change writes one word without reading it.
    words: Vec<u64>,
    /// Rules per (protocol, port), all routers together.
    rules: HashMap<(u8, u16), u32>,
}

impl Ports {
    /// Takes the map and makes it match `rules` (the rules map as it is).
    pub fn new(map: Array<MapData, u64>, rules: impl IntoIterator<Item = RuleKey>) -> Result<Self> {
        let mut ports = Self { map, words: vec![0; PORT_WORDS as usize], rules: HashMap::new() };
        ports.read()?;
        ports.rebuild(rules)?;
        Ok(ports)
    }

    /// A rule for `key` is about to be inserted.
    pub fn add(&mut self, key: &RuleKey) -> Result<()> {
        let count = self.rules.entry((key.proto, key.port)).or_default();
        *count += 1;
        if *count == 1 { self.set(key.proto, key.port, true) } else { Ok(()) }
    }

    /// The rule for `key` was removed.
    pub fn remove(&mut self, key: &RuleKey) -> Result<()> {
        let Some(count) = self.rules.get_mut(&(key.proto, key.port)) else { return Ok(()) };
        *count -= 1;
        if *count > 0 {
            return Ok(());
        }
        self.rules.remove(&(key.proto, key.port));
        self.set(key.proto, key.port, false)
    }

    /// Words of the map (read again from the kernel, in case someone else
    /// wrote them) that differ from what `rules` need.
    pub fn drift(&mut self, rules: impl IntoIterator<Item = RuleKey>) -> Result<usize> {
        self.read()?;
        Ok(wanted(rules).1.iter().zip(&self.words).filter(|(want, have)| want != have).count())
    }

    /// Recounts from `rules` and writes the words that change.
    pub fn rebuild(&mut self, rules: impl IntoIterator<Item = RuleKey>) -> Result<()> {
        let (counts, words) = wanted(rules);
        self.rules = counts;
        for (i, w) in words.into_iter().enumerate() {
            if self.words[i] != w {
                self.write(i as u32, w)?;
            }
        }
        Ok(())
    }

    /// Takes what the kernel's map holds as the known words.
    fn read(&mut self) -> Result<()> {
        for i in 0..PORT_WORDS {
            self.words[i as usize] = self.map.get(&i, 0).context("reading the ports map")?;
        }
        Ok(())
    }

    fn set(&mut self, proto: u8, port: u16, on: bool) -> Result<()> {
        let Some((word, bit)) = port_bit(proto, port) else { return Ok(()) };
        let w = self.words[word as usize];
        self.write(word, if on { w | bit } else { w & !bit })
    }

    fn write(&mut self, word: u32, value: u64) -> Result<()> {
        self.map.set(word, value, 0).context("writing the ports map")?;
        self.words[word as usize] = value;
        Ok(())
    }
}

/// Rules per (protocol, port) and the words that list them.
fn wanted(rules: impl IntoIterator<Item = RuleKey>) -> (HashMap<(u8, u16), u32>, Vec<u64>) {
    let mut counts: HashMap<(u8, u16), u32> = HashMap::new();
    for key in rules {
        *counts.entry((key.proto, key.port)).or_default() += 1;
    }
    let mut words = vec![0u64; PORT_WORDS as usize];
    for &(proto, port) in counts.keys() {
        if let Some((word, bit)) = port_bit(proto, port) {
            words[word as usize] |= bit;
        }
    }
    (counts, words)
}
