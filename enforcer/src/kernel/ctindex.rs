//! The conntrack index (enforcer-ebpf's `ctindex`): a netfilter program in
//! each router namespace records the conntrack entries whose ct mark
//! carries a slot as they start. A revocation reads a rule's entries here,
//! a walk of the entries that carry slots, instead of dumping the host's
//! whole conntrack table.
//!
//! The program sees connections start, not end: the daemon drops what it
//! deletes, and `prune` drops what ended by itself. The index is trusted
//! for a router only once known complete: a router added in a namespace
//! that never had enforcer's chain is complete from its add; elsewhere
//! entries made before its program ran (an earlier release, links lost, a
//! removed router's failed flush) are brought in from one dump of the
//! router's table (`seed`). An entry that found no room makes the router
//! incomplete again, and its next revocation dumps.
//!
//! A complete router with no slot in use is parked: its program leaves the
//! namespace (its packets skip the hook) and comes back before its next
//! rule goes in (`park`, `watch`).

use std::{
    collections::HashSet,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, MapData},
};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
use btf_rs::{Btf, Type};
use enforcer_common::{CtConfig, CtNetns, CtOffsets, FlowKey, IndexedCt, MarkLayout, RouterIndex};

use super::{
    batch::sys_bpf,
    conntrack::{Entry, Tuple5},
    netns, take,
};

/// The index program's object, built by build.rs (empty with AYA_BUILD_SKIP).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ctindex.bpf.o"));

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
const NF_INET_PRE_ROUTING: u32 = 0;
/// Just after enforcer's chain (-180), which saves a new connection's slot.
const PRIORITY: i32 = super::glue::PRE_PRIORITY + 1;

/// The index's program and maps.
pub struct CtIndex {
    dir: PathBuf,
    program: OwnedFd,
    entries: HashMap<MapData, FlowKey, IndexedCt>,
    /// The same map, read in batches (see `read_all`).
    batches: MapData,
    netns: HashMap<MapData, u32, CtNetns>,
    missed: Array<MapData, u64>,
    /// Each registered router's namespace inode (the key of `netns`).
    inodes: std::collections::HashMap<RouterIndex, u32>,
    /// Each registered router's namespace (to attach a parked router).
    namespaces: std::collections::HashMap<RouterIndex, PathBuf>,
    /// Routers found incomplete with no slot in use: not parked (see
    /// `park`) until a seed makes them complete.
    unparkable: HashSet<RouterIndex>,
    /// Parked routers (their records say PARKED): what a rule's insert
    /// asks without a `bpf` call.
    parked: HashSet<RouterIndex>,
}

/// `CtNetns::complete` of a parked router: complete, and no program
/// watches, as it has no slot in use (no connection carries one, and none
/// can get one before `watch` attaches the program again).
const PARKED: u32 = 2;

/// The router of a namespace record that belongs to no router: one where
/// connections carrying slots may be left (router indexes start at 1).
const LEFTOVERS: RouterIndex = 0;

/// Where the programs find what they read, from the running kernel's BTF.
pub fn kernel_offsets() -> Result<CtOffsets> {
    let btf = Btf::from_file(VMLINUX).with_context(|| format!("reading the kernel's BTF ({VMLINUX})"))?;
    let at = |name: &str, path: &[&str]| offset(&btf, name, path);
    Ok(CtOffsets {
        state_net: at("nf_hook_state", &["net"])?,
        net_inum: at("net", &["ns", "inum"])?,
        skb_nfct: at("sk_buff", &["_nfct"])?,
        ct_mark: at("nf_conn", &["mark"])?,
        ct_zone: at("nf_conn", &["zone", "id"])?,
        ct_tuple: at("nf_conn", &["tuplehash"])? + at("nf_conntrack_tuple_hash", &["tuple"])?,
        tuplehash_size: size(&btf, "nf_conntrack_tuple_hash")?,
        src_addr: at("nf_conntrack_tuple", &["src", "u3"])?,
        src_port: at("nf_conntrack_tuple", &["src", "u"])?,
        l3num: at("nf_conntrack_tuple", &["src", "l3num"])?,
        dst_addr: at("nf_conntrack_tuple", &["dst", "u3"])?,
        dst_port: at("nf_conntrack_tuple", &["dst", "u"])?,
        protonum: at("nf_conntrack_tuple", &["dst", "protonum"])?,
    })
}

fn named_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .with_context(|| format!("struct {name} in the kernel's BTF"))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| anyhow!("the kernel's BTF has no struct {name}"))
}

fn size(btf: &Btf, name: &str) -> Result<u32> {
    Ok(named_struct(btf, name)?.size() as u32)
}

/// The type under typedefs and qualifiers.
fn underlying(btf: &Btf, mut t: Type) -> Result<Type> {
    loop {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x)?,
            Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => btf.resolve_chained_type(x)?,
            _ => return Ok(t),
        };
    }
}

/// Byte offset of the member at `path` in struct `name`, looking through
/// anonymous structs and unions.
fn offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u32> {
    fn find(btf: &Btf, s: &btf_rs::Struct, want: &str) -> Result<Option<(u32, Type)>> {
        for m in &s.members {
            let name = btf.resolve_name(m).unwrap_or_default();
            if name == want {
                return Ok(Some((m.bit_offset(), btf.resolve_chained_type(m)?)));
            }
            if name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = underlying(btf, btf.resolve_chained_type(m)?)?
                && let Some((bits, t)) = find(btf, &inner, want)?
            {
                return Ok(Some((m.bit_offset() + bits, t)));
            }
        }
        Ok(None)
    }
    let mut current = named_struct(btf, name)?;
    let mut bits = 0;
    for (i, part) in path.iter().enumerate() {
        let (at, t) = find(btf, &current, part)?.ok_or_else(|| anyhow!("the kernel's struct {name} has no {}", path[..=i].join(".")))?;
        bits += at;
        if i + 1 < path.len() {
            current = match underlying(btf, t)? {
                Type::Struct(s) | Type::Union(s) => s,
                other => bail!("{name}.{} is a {}, not a struct", path[..=i].join("."), other.name()),
            };
        }
    }
    if bits % 8 != 0 {
        bail!("{name}.{} is a bit field", path.join("."));
    }
    Ok(bits / 8)
}

/// The inode number of the namespace at `ns`, as the kernel names it.
fn netns_inode(ns: &Path) -> Result<u32> {
    Ok(std::fs::metadata(ns).with_context(|| format!("reading {}", ns.display()))?.ino() as u32)
}

impl CtIndex {
    /// Loads the index program and its maps (pinned in `dir`, so the
    /// index outlives the daemon), for the mark layout `layout`, with room
    /// for `capacity` connections. None with a capacity of 0: the index is
    /// off, and what an earlier start pinned of it is removed (its hook
    /// leaves every router namespace).
    pub fn load(dir: &Path, layout: MarkLayout, capacity: u32) -> Result<Option<Self>> {
        if capacity == 0 {
            if unpin(dir)? {
                tracing::info!("the conntrack index is off (conntrack_index_max = 0): its programs and maps are removed");
            }
            return Ok(None);
        }
        if OBJECT.is_empty() {
            bail!("this binary was built without its eBPF programs");
        }
        let config = CtConfig { offsets: kernel_offsets()?, slot_mask: layout.slot_mask, slot_shift: layout.slot_shift };
        drop_other_layout(dir, capacity)?;
        let mut ebpf = EbpfLoader::new()
            // Nothing in this object is relocated by the kernel's types: its
            // BTF is not parsed a second time at each start.
            .btf(None)
            .default_map_pin_directory(dir)
            .map_max_entries(enforcer_common::MAP_CT_INDEX, capacity)
            .load(OBJECT)
            .context("creating the conntrack index maps")?;
        let mut settings: Array<MapData, CtConfig> = take(&mut ebpf, enforcer_common::MAP_CT_CONFIG)?;
        settings.set(0, config, 0).context("configuring the conntrack index")?;
        let netns: HashMap<MapData, u32, CtNetns> = take(&mut ebpf, enforcer_common::MAP_CT_NETNS)?;
        let records: Vec<(u32, CtNetns)> = netns.iter().filter_map(|e| e.ok()).filter(|(_, v)| v.router != LEFTOVERS).collect();
        let inodes = records.iter().map(|(inode, v)| (v.router, *inode)).collect();
        let parked = records.iter().filter(|(_, v)| v.complete == PARKED).map(|(_, v)| v.router).collect();
        Ok(Some(Self {
            dir: dir.to_path_buf(),
            program: load_program(dir)?,
            entries: take(&mut ebpf, enforcer_common::MAP_CT_INDEX)?,
            batches: MapData::from_pin(dir.join(enforcer_common::MAP_CT_INDEX)).context("opening the conntrack index")?,
            netns,
            missed: take(&mut ebpf, enforcer_common::MAP_CT_MISSED)?,
            inodes,
            namespaces: Default::default(),
            unparkable: HashSet::new(),
            parked,
        }))
    }

    /// Where router `router`'s links are pinned: one per family.
    fn link_pins(&self, router: RouterIndex) -> PathBuf {
        self.dir.join("ctindex").join(router.to_string())
    }

    /// Indexes the entries of router `router`'s namespace at `ns` from now
    /// on: registers the namespace and attaches the program there, unless
    /// both are in place already (with `replace`, this start's program is
    /// attached anyway, before the earlier one goes, so nothing is missed).
    /// A namespace the program did not watch all along is incomplete,
    /// unless `unmarked` says none of its connections carries a slot yet
    /// and no router left any there (see `leftovers`): such a router is
    /// parked from the start, as is one parked before.
    pub fn register(&mut self, ns: &Path, router: RouterIndex, replace: bool, unmarked: bool) -> Result<()> {
        let inode = netns_inode(ns)?;
        let known = self.netns.get(&inode, 0).ok();
        let same = known.is_some_and(|v| v.router == router);
        if !same {
            // Another namespace, or none yet: what the index held goes.
            self.forget_router(router);
        }
        self.namespaces.insert(router, ns.to_path_buf());
        let linked = self.watched(router);
        let parked = same && known.is_some_and(|v| v.complete == PARKED);
        if parked && !linked {
            self.parked.insert(router);
            return Ok(());
        }
        if linked && same && !replace {
            return Ok(());
        }
        if !same {
            self.inodes.insert(router, inode);
            let fresh = unmarked && known.is_none();
            let complete = if fresh { PARKED } else { 0 };
            self.netns.insert(inode, CtNetns { router, complete, missed: 0 }, 0).context("registering the router's namespace in the conntrack index")?;
            if fresh {
                self.parked.insert(router);
                return Ok(());
            }
        } else if !linked {
            let v = self.netns.get(&inode, 0)?;
            self.netns.insert(inode, CtNetns { complete: 0, ..v }, 0)?;
        } else if parked {
            // Links left by a park cut short: watched, and still complete.
            let v = self.netns.get(&inode, 0)?;
            self.netns.insert(inode, CtNetns { complete: 1, ..v }, 0)?;
        }
        self.unparkable.remove(&router);
        self.parked.remove(&router);
        self.attach(ns, router)
    }

    /// Attaches the program in `ns` for router `router`, one link per
    /// family, pinned (the pin is the link's only holder).
    fn attach(&self, ns: &Path, router: RouterIndex) -> Result<()> {
        let pins = self.link_pins(router);
        std::fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
        let program = self.program.as_fd();
        let links = netns::run_in(ns, || [NFPROTO_IPV4, NFPROTO_IPV6].map(|pf| link_create(program, pf).map(|l| (pf, l))).into_iter().collect::<Result<Vec<_>>>())?;
        for (pf, link) in links {
            let (pin, next) = (pins.join(pin_name(pf)), pins.join(format!("{}_next", pin_name(pf))));
            let _ = std::fs::remove_file(&next);
            obj_pin(link.as_fd(), &next)?;
            // Replacing an earlier pin detaches the earlier link.
            std::fs::rename(&next, &pin).with_context(|| format!("pinning {}", pin.display()))?;
        }
        Ok(())
    }

    /// Attaches the program again for parked router `router`, which is
    /// about to get a rule: its index stays complete. Nothing to do for a
    /// router that is not parked. A failed attach leaves it incomplete (the
    /// router's revocations dump, and its next sync attaches again).
    pub fn watch(&mut self, router: RouterIndex) -> Result<()> {
        if !self.parked.remove(&router) {
            return Ok(());
        }
        let Some((inode, v)) = self.state(router).filter(|(_, v)| v.complete == PARKED) else { return Ok(()) };
        let ns = self.namespaces.get(&router).cloned().ok_or_else(|| anyhow!("router {router} has no namespace known to the conntrack index"))?;
        let missed_before = self.missed();
        if let Err(e) = self.attach(&ns, router) {
            let _ = std::fs::remove_dir_all(self.link_pins(router));
            self.set_incomplete(inode, v)?;
            return Err(e);
        }
        // A miss since the attach leaves it incomplete.
        self.set_complete(inode, missed_before)?;
        Ok(())
    }

    /// Takes the program off router `router`'s namespace while it has no
    /// slot in use (the caller knows), so its packets no longer cross the
    /// hook. Only a complete index is parked: an incomplete one may lack
    /// connections a router left there before, whose slots a later rule of
    /// this one may take. Returns whether it was parked now.
    pub fn park(&mut self, router: RouterIndex) -> bool {
        if self.parked.contains(&router) || self.unparkable.contains(&router) {
            return false;
        }
        let Some((inode, v)) = self.state(router) else { return false };
        match v.complete {
            PARKED => false,
            1 if self.watched(router) => {
                // Unpinned first: a park cut short leaves the router
                // complete and unwatched, which is trusted by nothing.
                if std::fs::remove_dir_all(self.link_pins(router)).is_err() {
                    return false;
                }
                let parked = self.netns.insert(inode, CtNetns { complete: PARKED, ..v }, 0).is_ok();
                if parked {
                    self.parked.insert(router);
                }
                parked
            }
            _ => {
                self.unparkable.insert(router);
                false
            }
        }
    }

    /// Stops indexing router `router`'s namespace (its links go) and
    /// drops its entries.
    pub fn forget_router(&mut self, router: RouterIndex) {
        let _ = std::fs::remove_dir_all(self.link_pins(router));
        self.namespaces.remove(&router);
        self.unparkable.remove(&router);
        self.parked.remove(&router);
        // Entries exist only for a registered namespace.
        let Some(inode) = self.inodes.remove(&router) else { return };
        if self.netns.get(&inode, 0).is_ok_and(|v| v.router == router) {
            let _ = self.netns.remove(&inode);
        }
        self.remove_where(|k, _| k.router == router);
    }

    /// Keeps router `router`'s namespace known as one where connections
    /// carrying its slots may outlive it (its record stays, for no router;
    /// the next router registered there replaces it).
    pub fn leftovers(&mut self, router: RouterIndex) {
        if let Some((inode, _)) = self.state(router) {
            let _ = self.netns.insert(inode, CtNetns { router: LEFTOVERS, complete: 0, missed: 0 }, 0);
        }
    }

    fn remove_where(&mut self, drop: impl Fn(&FlowKey, &IndexedCt) -> bool) {
        let Ok(all) = read_all(&self.batches) else { return };
        for (k, _) in all.iter().filter(|(k, v)| drop(k, v)) {
            let _ = self.entries.remove(k);
        }
    }

    /// Whether router `router`'s program runs (its links are pinned): an
    /// index of a router no program watches is never trusted.
    fn watched(&self, router: RouterIndex) -> bool {
        let pins = self.link_pins(router);
        [NFPROTO_IPV4, NFPROTO_IPV6].iter().all(|pf| pins.join(pin_name(*pf)).exists())
    }

    fn state(&self, router: RouterIndex) -> Option<(u32, CtNetns)> {
        let inode = *self.inodes.get(&router)?;
        self.netns.get(&inode, 0).ok().filter(|v| v.router == router).map(|v| (inode, v))
    }

    /// The entries of router `router` carrying `slot`, if its index is
    /// complete (None: dump instead, and `seed`).
    pub fn carrying(&self, router: RouterIndex, slot: u16) -> Option<Vec<Entry>> {
        if self.state(router)?.1.complete == 0 || !self.watched(router) {
            return None;
        }
        let all = read_all(&self.batches).ok()?;
        Some(all.iter().filter(|(k, v)| k.router == router && v.slot == slot as u32).map(|(k, v)| entry(k, v)).collect())
    }

    /// Fills router `router`'s index from `dumped` (every entry of its
    /// namespace carrying a slot, dumped after [`CtIndex::missed`] said
    /// `missed_before`) and records it complete, unless a connection (of
    /// any router: the count is the one the program never loses) found no
    /// room since.
    pub fn seed(&mut self, router: RouterIndex, dumped: &[(Entry, u16)], missed_before: u64) -> Result<()> {
        let (inode, _) = self.state(router).ok_or_else(|| anyhow!("router {router} is not in the conntrack index"))?;
        for (e, slot) in dumped {
            let (key, value) = indexed(router, e, *slot);
            // Where the program indexed the entry too, its entry stays.
            match self.entries.insert(key, value, 1) {
                Err(aya::maps::MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                other => other.context("seeding the conntrack index")?,
            }
        }
        if self.missed() != missed_before || !self.watched(router) {
            return Ok(());
        }
        if self.set_complete(inode, missed_before)? {
            self.unparkable.remove(&router);
        }
        Ok(())
    }

    /// Records the namespace at `inode` complete, unless a connection (of
    /// any router: the count is the one the program never loses) found no
    /// room since the count was `missed_before`: then incomplete. Returns
    /// whether it is complete.
    fn set_complete(&mut self, inode: u32, missed_before: u64) -> Result<bool> {
        let now = self.netns.get(&inode, 0)?;
        if self.missed() != missed_before {
            self.set_incomplete(inode, now)?;
            return Ok(false);
        }
        self.netns.insert(inode, CtNetns { complete: 1, ..now }, 0)?;
        // A miss between the read and the write was overwritten: undone.
        if self.missed() != missed_before {
            self.set_incomplete(inode, now)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Records the namespace at `inode` incomplete, the rest of its record
    /// as it is now (as `known` where it cannot be read).
    fn set_incomplete(&mut self, inode: u32, known: CtNetns) -> Result<()> {
        let now = self.netns.get(&inode, 0).unwrap_or(known);
        Ok(self.netns.insert(inode, CtNetns { complete: 0, ..now }, 0)?)
    }

    /// Drops the index entries of `slot` of router `router`: after a
    /// delete by mark, what the index still holds of it is gone.
    pub fn forget_slot(&mut self, router: RouterIndex, slot: u16) {
        self.remove_where(|k, v| k.router == router && v.slot == slot as u32);
    }

    /// Drops `entries` of router `router` (deleted, or found gone).
    pub fn forget(&mut self, router: RouterIndex, entries: &[Entry]) {
        for e in entries {
            let _ = self.entries.remove(&super::flow_key(router, &e.orig));
        }
    }

    /// Connections that found no room, all routers, since the map was made.
    pub fn missed(&self) -> u64 {
        self.missed.get(&0, 0).unwrap_or_default()
    }
}

fn ip(family: u8, words: &[u32; 4]) -> std::net::IpAddr {
    if family == 4 {
        std::net::IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        std::net::IpAddr::from(b)
    }
}

fn entry(k: &FlowKey, v: &IndexedCt) -> Entry {
    Entry {
        zone: v.zone,
        orig: Tuple5 { proto: k.proto, src: ip(k.family, &k.src), dst: ip(k.family, &k.dst), sport: k.sport, dport: k.dport },
        reply: Tuple5 { proto: k.proto, src: ip(k.family, &v.reply_src), dst: ip(k.family, &v.reply_dst), sport: v.reply_sport, dport: v.reply_dport },
    }
}

fn indexed(router: RouterIndex, e: &Entry, slot: u16) -> (FlowKey, IndexedCt) {
    let key = super::flow_key(router, &e.orig);
    let reply = super::flow_key(router, &e.reply);
    let seen_ns = super::monotonic_ns().unwrap_or_default();
    (key, IndexedCt { seen_ns, slot: slot as u32, zone: e.zone, reply_sport: reply.sport, reply_dport: reply.dport, _pad: 0, reply_src: reply.src, reply_dst: reply.dst, _pad2: 0 })
}

/// How long an entry must go unwritten before `prune` may drop it: far
/// longer than a packet takes from the program to conntrack's confirmation
/// (an entry is indexed just before its connection is in the table).
const PRUNE_AFTER_NS: u64 = 1_000_000_000;

/// Drops the entries of connections that ended by themselves, for the
/// routers of `namespaces` (index, namespace): the program sees
/// connections start, not end. Runs without the daemon's lock, on the
/// pinned maps in `dir`: a dropped entry is one whose connection conntrack
/// no longer has and that was not written again since it was read. Returns
/// how many were dropped.
pub fn prune(dir: &Path, namespaces: &[(RouterIndex, PathBuf)]) -> Result<usize> {
    let map = MapData::from_pin(dir.join(enforcer_common::MAP_CT_INDEX)).context("opening the conntrack index")?;
    let all = read_all(&map)?;
    let mut index: HashMap<MapData, FlowKey, IndexedCt> = HashMap::try_from(aya::maps::Map::HashMap(map))?;
    let now = super::monotonic_ns()?;
    let mut by_router: std::collections::HashMap<RouterIndex, Vec<(FlowKey, IndexedCt)>> = Default::default();
    for (k, v) in all {
        if now.saturating_sub(v.seen_ns) > PRUNE_AFTER_NS {
            by_router.entry(k.router).or_default().push((k, v));
        }
    }
    let mut dropped = 0;
    for (router, ns) in namespaces {
        let Some(held) = by_router.remove(router) else { continue };
        let entries: Vec<Entry> = held.iter().map(|(k, v)| entry(k, v)).collect();
        let alive = netns::run_in(ns, || super::conntrack::alive(&entries))?;
        for ((k, v), alive) in held.iter().zip(alive) {
            if !alive && index.get(k, 0).is_ok_and(|now| now.seen_ns == v.seen_ns) && index.remove(k).is_ok() {
                dropped += 1;
            }
        }
    }
    Ok(dropped)
}

/// The index's maps: name, key and value sizes.
const MAPS: [(&str, usize, usize); 4] = [
    (enforcer_common::MAP_CT_INDEX, size_of::<FlowKey>(), size_of::<IndexedCt>()),
    (enforcer_common::MAP_CT_NETNS, size_of::<u32>(), size_of::<CtNetns>()),
    (enforcer_common::MAP_CT_CONFIG, size_of::<u32>(), size_of::<CtConfig>()),
    (enforcer_common::MAP_CT_MISSED, size_of::<u32>(), size_of::<u64>()),
];

/// Unpins the index (maps and links) if another version made it with
/// other layouts, or with a capacity other than `capacity`: the index is
/// only a cache of the conntrack table, so it starts again empty, and each
/// router's next revocation fills it.
fn drop_other_layout(dir: &Path, capacity: u32) -> Result<()> {
    let other = MAPS.iter().any(|(name, key, value)| {
        let path = dir.join(name);
        path.exists()
            && MapData::from_pin(&path).and_then(|m| m.info()).is_ok_and(|i| {
                (i.key_size() as usize, i.value_size() as usize) != (*key, *value)
                    || (*name == enforcer_common::MAP_CT_INDEX && i.max_entries() != capacity)
            })
    });
    if other {
        tracing::info!("the conntrack index was made by another version or with another capacity: starting it again empty");
        unpin(dir)?;
    }
    Ok(())
}

/// Removes the index's pins, maps and links (each link's pin is its only
/// holder: its hook goes with it). Returns whether there were any.
fn unpin(dir: &Path) -> Result<bool> {
    let mut found = false;
    for (name, _, _) in MAPS {
        found |= std::fs::remove_file(dir.join(name)).is_ok();
    }
    let links = dir.join("ctindex");
    if links.exists() {
        std::fs::remove_dir_all(&links).with_context(|| format!("removing {}", links.display()))?;
        found = true;
    }
    Ok(found)
}

/// Every entry of the index.
fn read_all(map: &MapData) -> Result<Vec<(FlowKey, IndexedCt)>> {
    super::batch::read_all(map).context("reading the conntrack index")
}

fn pin_name(pf: u32) -> &'static str {
    if pf == NFPROTO_IPV4 { "ipv4" } else { "ipv6" }
}

/// The index program, relocated against the pinned maps and loaded as a
/// netfilter program (aya loads no such programs).
fn load_program(dir: &Path) -> Result<OwnedFd> {
    let mut obj = aya_obj::Object::parse(OBJECT).context("parsing the conntrack index object")?;
    let text: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let defs = obj.maps.clone();
    let maps: Vec<(&str, MapData)> = defs
        .keys()
        .map(|name| Ok((name.as_str(), MapData::from_pin(dir.join(name)).with_context(|| format!("opening map {name}"))?)))
        .collect::<Result<_>>()?;
    obj.relocate_maps(maps.iter().map(|(name, m)| (*name, m.fd().as_fd().as_raw_fd(), &defs[*name])), &text)?;
    obj.relocate_calls(&text)?;
    let program = obj.programs.get(enforcer_common::PROG_CT_INDEX).ok_or_else(|| anyhow!("no program {}", enforcer_common::PROG_CT_INDEX))?;
    let insns = &obj.functions[&program.function_key()].instructions;
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let load = |log: Option<&mut Vec<u8>>| {
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writes of the BPF_PROG_LOAD member, whose pointers outlive the call.
        let a = unsafe { &mut attr.__bindgen_anon_3 };
        a.prog_type = bpf_prog_type::BPF_PROG_TYPE_NETFILTER as u32;
        a.expected_attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        a.insn_cnt = insns.len() as u32;
        a.insns = insns.as_ptr() as u64;
        a.license = license.as_ptr() as u64;
        for (d, c) in a.prog_name.iter_mut().zip(b"ct_index") {
            *d = *c as libc::c_char;
        }
        if let Some(log) = log {
            a.log_level = 1;
            a.log_size = log.len() as u32;
            a.log_buf = log.as_mut_ptr() as u64;
        }
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match load(None) {
        Ok(fd) => Ok(fd),
        // Again with the verifier's log, to say why.
        Err(e) => {
            let _ = load(Some(&mut log));
            let text = String::from_utf8_lossy(&log);
            Err(anyhow!("verifying the conntrack index program: {e}: {}", text.trim_end_matches('\0').lines().rev().take(5).collect::<Vec<_>>().join(" / ")))
        }
    }
}

/// A netfilter link of `program` at prerouting for family `pf`, in the
/// namespace of the calling thread.
fn link_create(program: std::os::fd::BorrowedFd, pf: u32) -> Result<OwnedFd> {
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writes of the BPF_LINK_CREATE member.
    unsafe {
        let l = &mut attr.link_create;
        l.__bindgen_anon_1.prog_fd = program.as_raw_fd() as u32;
        l.attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        l.__bindgen_anon_3.netfilter.pf = pf;
        l.__bindgen_anon_3.netfilter.hooknum = NF_INET_PRE_ROUTING;
        l.__bindgen_anon_3.netfilter.priority = PRIORITY;
    }
    bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching the conntrack index program (family {pf})"))
}

fn obj_pin(fd: std::os::fd::BorrowedFd, path: &Path) -> Result<()> {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).context("pin path")?;
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // The name outlives the call.
    attr.__bindgen_anon_4.pathname = name.as_ptr() as u64;
    attr.__bindgen_anon_4.bpf_fd = fd.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(|_| ()).with_context(|| format!("pinning {}", path.display()))
}

/// A bpf command that answers with a new descriptor.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: a descriptor the kernel just made, owned by no one else.
    sys_bpf(cmd, attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offsets_are_found_in_the_running_kernels_btf() {
        let o = kernel_offsets().expect("this kernel's BTF names every field the index reads");
        // The tuple's layout has not changed in years: source first.
        assert_eq!((o.src_addr, o.src_port, o.l3num, o.dst_addr), (0, 16, 18, 20), "{o:?}");
        assert!(o.tuplehash_size >= 40 && o.ct_tuple > 0 && o.ct_mark > o.ct_tuple && o.skb_nfct > 0, "{o:?}");
    }

    #[test]
    fn an_entry_reads_back_from_its_index_key_and_value() {
        for (a, b) in [("10.200.1.2", "10.200.2.2"), ("fd00:200::1", "fd00:200::2")] {
            let (a, b): (std::net::IpAddr, std::net::IpAddr) = (a.parse().unwrap(), b.parse().unwrap());
            let e = Entry {
                zone: 3,
                orig: Tuple5 { proto: 17, src: a, dst: b, sport: 40000, dport: 69 },
                reply: Tuple5 { proto: 17, src: b, dst: a, sport: 69, dport: 40000 },
            };
            let (k, v) = indexed(7, &e, 3);
            assert_eq!((k.router, v.slot), (7, 3));
            assert_eq!(entry(&k, &v), e);
        }
    }
}
