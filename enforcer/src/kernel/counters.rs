//! The rule slots' counters (`MAP_COUNTERS`): an array whose entry a rule
//! or a revoked flow names, so a packet adds to it without a second hash
//! lookup, mapped into the daemon as far as it is used, so a delete's
//! never-tagged check and a create's fresh counters cost no `bpf` call.
//!
//! The daemon hands the entries out. Each entry records its slot (slot 0,
//! never a rule's, while free), so the array itself says which are taken:
//! the daemon reads that at start and at every check of the maps, and
//! `maps dump` reads it without the daemon.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, MapInfo};
use enforcer_common::{COUNTERS_MAP_FLAGS, COUNTERS_PER_CHUNK, Counters, NO_COUNTER, RouterIndex, SlotKey};

/// An entry as the daemon reaches it through the mapping: `Counters`, each
/// field an atomic (the programs add to the counts at any time).
#[repr(C)]
struct Cell {
    tagged: AtomicU64,
    dropped: AtomicU64,
    router: AtomicU32,
    slot: AtomicU32,
}

const _: () = assert!(size_of::<Cell>() == size_of::<Counters>() && align_of::<Cell>() == align_of::<Counters>());
/// A chunk is whole pages, so each can be mapped at its own offset.
const _: () = assert!((COUNTERS_PER_CHUNK as usize * size_of::<Counters>()).is_multiple_of(4096));

pub struct SlotCounters {
    map: MapData,
    capacity: u32,
    /// The mapped chunks, by chunk number; mapped once an entry in it is
    /// taken, for as long as the daemon runs.
    chunks: Vec<Option<Chunk>>,
    /// Each counted slot's entry.
    index: HashMap<SlotKey, u32>,
    /// Entries given back, taken again first.
    freed: Vec<u32>,
    /// No entry from here on was ever taken.
    next: u32,
}

/// Whether a map is the counters array this build maps.
pub fn mappable(info: &MapInfo) -> bool {
    info.map_flags() & COUNTERS_MAP_FLAGS != 0 && info.value_size() == size_of::<Counters>() as u32
}

/// The taken entries of the counters array, read through a mapping of a
/// window at a time (a million entries in a few milliseconds, where
/// batched `bpf` calls took a quarter of a second, without mapping 24 MiB
/// at once).
pub fn scan(map: &MapData) -> Result<Vec<(u32, Counters)>> {
    const WINDOW: u32 = 16 * COUNTERS_PER_CHUNK;
    let capacity = map.info().context("reading the counters map's definition")?.max_entries();
    let mut taken = Vec::new();
    for first in (0..capacity).step_by(WINDOW as usize) {
        let window = Chunk::map(map, first, (capacity - first).min(WINDOW), libc::PROT_READ)?;
        for (i, cell) in window.cells().iter().enumerate() {
            let i = first + i as u32;
            if cell.slot.load(Ordering::Relaxed) != 0 && i != NO_COUNTER {
                taken.push((i, cell.read()));
            }
        }
    }
    Ok(taken)
}

/// Which entry counts each slot, of entries `scan` found.
pub fn owners(taken: &[(u32, Counters)]) -> HashMap<SlotKey, u32> {
    let mut owners = HashMap::with_capacity(taken.len());
    for (i, c) in taken {
        owners.entry(SlotKey::new(c.router, c.slot)).or_insert(*i);
    }
    owners
}

impl Cell {
    fn read(&self) -> Counters {
        Counters {
            tagged: self.tagged.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            router: self.router.load(Ordering::Relaxed),
            slot: self.slot.load(Ordering::Relaxed),
        }
    }
}

impl SlotCounters {
    /// Maps the entries the array says are taken.
    pub fn open(map: Map) -> Result<Self> {
        let Map::Array(map) = map else { bail!("the counters map is not an array map") };
        let info = map.info().context("reading the counters map's definition")?;
        if !mappable(&info) {
            bail!("the counters map is not the mappable array this daemon makes");
        }
        let capacity = info.max_entries();
        let chunks = (0..capacity.div_ceil(COUNTERS_PER_CHUNK)).map(|_| None).collect();
        let mut counters = Self { map, capacity, chunks, index: HashMap::new(), freed: Vec::new(), next: NO_COUNTER + 1 };
        let taken = scan(&counters.map)?;
        counters.adopt(&taken)?;
        Ok(counters)
    }

    pub fn map(&self) -> &MapData {
        &self.map
    }

    /// Makes the table of entries what the array holds (`scan`): it is the
    /// truth, the table its copy. A slot found twice keeps its first entry;
    /// the other is taken again in time.
    pub fn adopt(&mut self, taken: &[(u32, Counters)]) -> Result<()> {
        self.index = owners(taken);
        self.next = taken.iter().map(|(i, _)| i + 1).max().unwrap_or(0).max(NO_COUNTER + 1);
        let mut used = vec![false; self.next as usize];
        for i in self.index.values() {
            used[*i as usize] = true;
        }
        self.freed = (NO_COUNTER + 1..self.next).rev().filter(|i| !used[*i as usize]).collect();
        for i in self.index.values().copied().collect::<Vec<_>>() {
            self.ensure_mapped(i)?;
        }
        Ok(())
    }

    /// Which entry counts each slot.
    pub fn owners(&self) -> &HashMap<SlotKey, u32> {
        &self.index
    }

    /// The entry counting `key`, if it has one.
    pub fn get(&self, key: &SlotKey) -> Option<u32> {
        self.index.get(key).copied()
    }

    /// Packets `key`'s rule tagged since its counters were given.
    pub fn tagged(&self, key: &SlotKey) -> Option<u64> {
        Some(self.cell(self.get(key)?)?.tagged.load(Ordering::SeqCst))
    }

    /// Gives `key` counters starting at `tagged` and no drops (its entry
    /// if it has one). Returns the entry.
    pub fn take(&mut self, key: SlotKey, tagged: u64) -> Result<u32> {
        let i = match self.get(&key) {
            Some(i) => i,
            None => {
                let i = match self.freed.pop() {
                    Some(i) => i,
                    None if self.next < self.capacity => {
                        self.next += 1;
                        self.next - 1
                    }
                    None => bail!("the counters map is full ({} slots counted; see max_rules)", self.capacity - 1),
                };
                if let Err(e) = self.ensure_mapped(i) {
                    self.freed.push(i);
                    return Err(e);
                }
                self.index.insert(key, i);
                i
            }
        };
        if let Some(cell) = self.cell(i) {
            cell.tagged.store(tagged, Ordering::SeqCst);
            cell.dropped.store(0, Ordering::SeqCst);
            cell.router.store(key.router, Ordering::SeqCst);
            cell.slot.store(key.slot, Ordering::SeqCst);
        }
        Ok(i)
    }

    /// Frees `key`'s entry: nothing counts against it any more.
    pub fn forget(&mut self, key: &SlotKey) {
        let Some(i) = self.index.remove(key) else { return };
        if let Some(cell) = self.cell(i) {
            cell.slot.store(0, Ordering::SeqCst);
            cell.router.store(0, Ordering::SeqCst);
        }
        self.freed.push(i);
    }

    /// Frees the entries of every slot of router `router`.
    pub fn forget_router(&mut self, router: RouterIndex) {
        let keys: Vec<SlotKey> = self.index.keys().filter(|k| k.router == router).copied().collect();
        for k in keys {
            self.forget(&k);
        }
    }

    /// Whether entry `i` counts `key`; None where the daemon does not map
    /// it.
    pub fn holds(&self, i: u32, key: &SlotKey) -> Option<bool> {
        let cell = self.cell(i)?;
        Some(cell.router.load(Ordering::SeqCst) == key.router && cell.slot.load(Ordering::SeqCst) == key.slot)
    }

    fn cell(&self, i: u32) -> Option<&Cell> {
        self.chunks.get((i / COUNTERS_PER_CHUNK) as usize)?.as_ref()?.cells().get((i % COUNTERS_PER_CHUNK) as usize)
    }

    fn ensure_mapped(&mut self, i: u32) -> Result<()> {
        let n = (i / COUNTERS_PER_CHUNK) as usize;
        let Some(chunk) = self.chunks.get_mut(n) else { bail!("counter {i} is beyond the counters map") };
        if chunk.is_none() {
            let first = n as u32 * COUNTERS_PER_CHUNK;
            let entries = (self.capacity - first).min(COUNTERS_PER_CHUNK);
            *chunk = Some(Chunk::map(&self.map, first, entries, libc::PROT_READ | libc::PROT_WRITE)?);
        }
        Ok(())
    }
}

/// Entries `first..first + entries` of the array, mapped shared (`first`
/// a multiple of `COUNTERS_PER_CHUNK`, so the mapping starts at a page).
struct Chunk {
    start: NonNull<Cell>,
    entries: usize,
    bytes: usize,
}

// SAFETY: the mapping belongs to this value alone, and its entries are only
// reached as atomics.
unsafe impl Send for Chunk {}

impl Chunk {
    fn map(map: &MapData, first: u32, entries: u32, prot: libc::c_int) -> Result<Self> {
        let page = 4096;
        let bytes = (entries as usize * size_of::<Counters>()).div_ceil(page) * page;
        let offset = first as usize * size_of::<Counters>();
        // SAFETY: a shared mapping within the array (the kernel refuses one
        // past its end), at a page offset; unmapped on drop.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("mapping counters {first} to {}", first + entries));
        }
        let start = NonNull::new(at.cast::<Cell>()).context("mapping the counters: no address")?;
        Ok(Self { start, entries: entries as usize, bytes })
    }

    fn cells(&self) -> &[Cell] {
        // SAFETY: `entries` aligned entries (pages, and entries of a
        // multiple of 8 bytes), mapped while `self` lives.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.entries) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer reachable.
        unsafe { libc::munmap(self.start.as_ptr().cast(), self.bytes) };
    }
}
