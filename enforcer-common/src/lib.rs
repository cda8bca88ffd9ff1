//! Kernel-visible layouts shared by the TC programs and the daemon.
//!
//! Every type here is `#[repr(C)]`, padded explicitly and `Pod`, so the bytes
//! the daemon writes into a map are exactly the bytes the program reads.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// IP protocol numbers the datapath matches on.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// GRE: no rule names it, but a PPTP call's data flows are GRE
/// connections RELATED to the control connection, revoked with it.
pub const IPPROTO_GRE: u8 = 47;

/// The ports of a flow key for (protocol, source port, destination port)
/// as conntrack records a direction. An enhanced GRE packet (PPTP) carries
/// only the receiver's call ID, conntrack's destination key (it finds the
/// source key in a table of its own), so a GRE flow is keyed by that alone.
#[inline(always)]
pub const fn flow_ports(proto: u8, sport: u16, dport: u16) -> (u16, u16) {
    if proto == IPPROTO_GRE { (0, dport) } else { (sport, dport) }
}

/// Names of the pinned maps (under the bpffs directory) and programs.
pub const MAP_RULES: &str = "ENFORCER_RULES";
/// The rule slots' counters: an array the daemon maps (see [`Counters`]).
pub const MAP_COUNTERS: &str = "ENFORCER_RULE_COUNTERS";
/// The counters of earlier releases, a hash map by [`SlotKey`], removed at
/// start.
pub const MAP_SLOT_COUNTERS: &str = "ENFORCER_SLOT_COUNTERS";
/// The per-CPU counters of earlier releases, removed at start.
pub const MAP_COUNTERS_PER_CPU: &str = "ENFORCER_COUNTERS";
/// The live slots of earlier releases (a slot is live while a rule names
/// it), removed at start.
pub const MAP_SLOTS: &str = "ENFORCER_SLOTS";
pub const MAP_ROUTERS: &str = "ENFORCER_ROUTERS";
pub const MAP_REVOKED: &str = "ENFORCER_REVOKED";
pub const MAP_REVOKED_ACTIVE: &str = "ENFORCER_REVOKED_ACTIVE";
/// How many more drops the programs may describe in the datapath log
/// (`enforcer debug datapath on`); 0, the default, logs nothing.
pub const MAP_DEBUG: &str = "ENFORCER_DEBUG";
/// One bit per hash of a rule's (router, TCP or UDP, port), see
/// [`filter_bit`]: the program looks a packet's rule up only when its bit
/// is set.
pub const MAP_RULE_FILTER: &str = "ENFORCER_RULE_FILTER";
/// The ports list of earlier releases (one bit per protocol and port, for
/// all routers at once), removed at start.
pub const MAP_PORTS: &str = "ENFORCER_PORTS";
/// aya-log's ring buffer, pinned so that every router's programs write to
/// the one the daemon reads.
pub const MAP_LOGS: &str = "AYA_LOGS";
/// The program array whose one entry is the shared `classify` program,
/// which every router's `tag` program tail-calls.
pub const MAP_CLASSIFY: &str = "ENFORCER_CLASSIFY";
/// Per-CPU scratch: the router whose packet `classify` is handling, written
/// by that router's `tag` program just before its tail call.
pub const MAP_CURRENT: &str = "ENFORCER_CURRENT";
/// The program on each router interface: a few instructions, one instance
/// per router (its index is a constant of its code).
pub const PROG_TAG: &str = "tag";
/// The program that does the work for every router, verified once per
/// start; reached through `MAP_CLASSIFY`.
pub const PROG_CLASSIFY: &str = "classify";
/// The egress program of earlier releases: its attachments are removed at
/// an upgrade.
pub const PROG_LEGACY_ENFORCE: &str = "enforce";
/// Benchmark baselines in the same object (never attached).
pub const PROG_BASELINE_EMPTY: &str = "baseline_empty";
pub const PROG_BASELINE_LOOKUP: &str = "baseline_lookup";
/// The conntrack index (see [`IndexedCt`]): the conntrack entries of
/// router namespaces whose ct mark carries a slot, by original tuple, kept
/// by a netfilter program in each router namespace.
pub const MAP_CT_INDEX: &str = "ENFORCER_CT_INDEX";
/// Router namespaces whose entries the index keeps, by namespace inode.
pub const MAP_CT_NETNS: &str = "ENFORCER_CT_NETNS";
/// One entry, [`CtConfig`]: what the index program reads, written by the
/// daemon at start.
pub const MAP_CT_CONFIG: &str = "ENFORCER_CT_CONFIG";
/// One u64: connections that found no room in the index, all routers.
pub const MAP_CT_MISSED: &str = "ENFORCER_CT_MISSED";
/// The index program (in its own object, loaded as a netfilter program).
pub const PROG_CT_INDEX: &str = "ct_index";
/// Default capacity of the conntrack index, all routers together; not
/// preallocated, so entries cost memory only while they exist.
pub const DEFAULT_CT_INDEX_CAPACITY: u32 = 1 << 18;
/// Names of the load-time globals: the mark layout, and the router the
/// program instance serves.
pub const GLOBAL_MARK_LAYOUT: &str = "MARK_LAYOUT";
pub const GLOBAL_ROUTER: &str = "ROUTER";
pub const GLOBAL_QUIET_NS: &str = "QUIET_NS";

/// The rule filter has 2^24 bits (2 MiB): with a million rules about 6%
/// of them are set, so a packet no rule of its router names is looked up
/// in the rules map about once in 16.
pub const FILTER_BITS_LOG2: u32 = 24;
/// Words of `MAP_RULE_FILTER`.
pub const FILTER_WORDS: u32 = 1 << (FILTER_BITS_LOG2 - 6);
/// `MAP_RULE_FILTER` is made with this flag (the kernel's
/// `BPF_F_MMAPABLE`): the daemon maps its words and changes a bit with a
/// store instead of a system call.
pub const FILTER_MAP_FLAGS: u32 = 1 << 10;
/// `MAP_COUNTERS` is mappable too: the daemon reads a rule's counters (a
/// delete's never-tagged check) and gives a slot its counters with loads
/// and stores instead of system calls.
pub const COUNTERS_MAP_FLAGS: u32 = FILTER_MAP_FLAGS;
/// The daemon maps `MAP_COUNTERS` this many counters at a time (96 KiB,
/// whole pages), as far as it uses them: all of it at a million rules would
/// add 24 MiB to its resident memory.
pub const COUNTERS_PER_CHUNK: u32 = 4096;
/// Entries of `MAP_COUNTERS` for a rules map of `max_rules`: one per rule
/// and counter 0. Slots revoked but still counted share the room.
pub const fn counters_capacity(max_rules: u32) -> u32 {
    max_rules.saturating_add(1)
}
/// Counter 0 is no slot's: rules an earlier release wrote name it until the
/// daemon gives them their own.
pub const NO_COUNTER: u32 = 0;

/// Where a rule for (router, TCP or UDP, `port`) is in `MAP_RULE_FILTER`:
/// (word, bit mask), by Fibonacci hashing of the three. Other protocols
/// have no rules, so no bit.
#[inline(always)]
pub const fn filter_bit(router: RouterIndex, proto: u8, port: u16) -> Option<(u32, u64)> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let key = ((router as u64) << 24) | ((proto as u64) << 16) | port as u64;
    let n = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - FILTER_BITS_LOG2);
    Some(((n >> 6) as u32, 1 << (n & 63)))
}

/// Default capacity of the revoked-flows map. A plain hash map: when it is
/// full a new entry is refused (and counted), never another one evicted.
pub const MAX_REVOKED_FLOWS: u32 = 65536;
/// Default longest time a revoked flow is kept dropped, however it talks.
pub const DEFAULT_REVOKED_LIFETIME_NS: u64 = 3600 * 1_000_000_000;
/// Default quiet time after which a revoked flow may come back as new.
pub const DEFAULT_QUIET_NS: u64 = 600 * 1_000_000_000;

/// Default capacity of the rules map (all routers together). The map is not
/// preallocated, so capacity costs only its bucket array until used.
pub const DEFAULT_MAX_RULES: u32 = 1 << 20;
/// Slot 0 means "no slot" in a mark, so a router has `u16::MAX` usable slots.
pub const MAX_SLOT: u32 = u16::MAX as u32;

/// A router is identified in the kernel by a small index the daemon assigns.
/// Each router gets its own instance of the programs with the index as a
/// load-time constant (all instances share the pinned maps): a TC program
/// cannot tell a forwarded packet's namespace, because
/// `bpf_get_netns_cookie` answers from `skb->sk`, which forwarded packets
/// lack. Index 0 is never a router.
pub type RouterIndex = u32;

/// Key of the rules map: which (router, protocol, destination port) is allowed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct RuleKey {
    pub router: RouterIndex,
    /// Destination port in host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl RuleKey {
    pub const fn new(router: RouterIndex, proto: u8, port: u16) -> Self {
        Self { router, port, proto, _pad: 0 }
    }
}

/// Value of the rules map: what the tag carries, and where it is counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RuleValue {
    /// Rule slot, unique per router, 1..=MAX_SLOT.
    pub slot: u16,
    /// Catalogue id of the helper (1..=15).
    pub helper: u8,
    pub _pad: u8,
    /// The slot's entry in `MAP_COUNTERS` (the daemon fills it in).
    pub counter: u32,
}

impl RuleValue {
    pub const fn new(slot: u16, helper: u8) -> Self {
        Self { slot, helper, _pad: 0, counter: NO_COUNTER }
    }
}

/// One rule slot of one router.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SlotKey {
    pub router: RouterIndex,
    pub slot: u32,
}

impl SlotKey {
    pub const fn new(router: RouterIndex, slot: u32) -> Self {
        Self { router, slot }
    }
}

/// An entry of `MAP_COUNTERS`: the counters of one rule slot, shared by
/// all CPUs, and whose they are. A rule and a revoked flow name their
/// entry, so a packet reaches it by index, not by a second hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    /// Packets the ingress program tagged for this rule.
    pub tagged: u64,
    /// Packets of the slot's revoked flows the ingress program dropped.
    pub dropped: u64,
    pub router: RouterIndex,
    /// 0 (never a rule's slot) while the entry is free.
    pub slot: u32,
}

/// One direction of a connection at a router, as the ingress program sees
/// its packets. IPv4 addresses sit in the first word, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub router: RouterIndex,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// Value of the revoked-flows map: a connection whose conntrack entry was
/// removed on revocation. Conntrack would pick it up again mid-stream as a
/// fresh, unmarked entry; the ingress program drops its packets instead
/// until it has been quiet for `QUIET_NS`, or its lifetime ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevokedFlow {
    /// bpf_ktime_get_ns of the last packet seen (or of the revocation).
    pub last_seen_ns: u64,
    /// bpf_ktime_get_ns after which the flow passes again even if it never
    /// went quiet (a fixed-port UDP flow that talks forever).
    pub expires_ns: u64,
    /// The revoked rule's slot, whose counters count these drops.
    pub slot: u32,
    /// That slot's entry in `MAP_COUNTERS`.
    pub counter: u32,
}

/// Value of the routers map: which router an index belongs to.
/// The datapath does not read it; it lets `maps dump` name routers while
/// the daemon is down.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RouterValue {
    /// The router's UUID, big-endian bytes.
    pub id: [u8; 16],
}

/// Byte offsets into the running kernel's structures, read from its BTF
/// when the daemon starts (they change between kernel builds). The tuple
/// offsets are within `struct nf_conntrack_tuple`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtOffsets {
    /// `nf_hook_state.net`, a `struct net *`.
    pub state_net: u32,
    /// `net.ns.inum`: the namespace's inode number.
    pub net_inum: u32,
    /// `sk_buff._nfct`: the entry's address, with ctinfo in the low bits.
    pub skb_nfct: u32,
    pub ct_mark: u32,
    /// `nf_conn.zone.id`.
    pub ct_zone: u32,
    /// `nf_conn.tuplehash[0].tuple`, and the step to `tuplehash[1]`.
    pub ct_tuple: u32,
    pub tuplehash_size: u32,
    pub src_addr: u32,
    pub src_port: u32,
    pub l3num: u32,
    pub dst_addr: u32,
    pub dst_port: u32,
    pub protonum: u32,
}

/// What the index program reads: the kernel's offsets and where the slot
/// is in the ct mark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtConfig {
    pub offsets: CtOffsets,
    pub slot_mask: u32,
    pub slot_shift: u32,
}

/// Value of the conntrack-netns map: the router a namespace is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtNetns {
    pub router: RouterIndex,
    /// Non-zero once the index holds every entry of the namespace that
    /// carries a slot (set by the daemon after it filled the index from a
    /// dump, cleared by the program when an entry found no room).
    pub complete: u32,
    /// Entries that found no room in the index.
    pub missed: u64,
}

/// Value of the conntrack index, keyed by the entry's original direction
/// as a [`FlowKey`] (router, ports in host order). An entry stays until
/// the daemon finds its connection gone: the program sees connections
/// start, not end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IndexedCt {
    /// CLOCK_MONOTONIC when the entry was last written: one that looks
    /// ended is dropped only if it was not written again meanwhile.
    pub seen_ns: u64,
    pub slot: u32,
    pub zone: u16,
    pub reply_sport: u16,
    pub reply_dport: u16,
    pub _pad: u16,
    pub reply_src: [u32; 4],
    pub reply_dst: [u32; 4],
    pub _pad2: u32,
}

/// Where enforcer's bits live, and when.
///
/// A Neutron router uses every bit of `skb->mark` somewhere between
/// PREROUTING and POSTROUTING, and the upper half of the ct mark. So:
/// * the ingress program writes the helper id (`helper_mask`) and the rule
///   slot (`slot_mask`) into the skb mark; enforcer's own prerouting chain
///   (after conntrack, before Neutron's mangle) assigns the helper, saves the
///   slot into the same bits of the ct mark and clears both from the skb mark;
/// * the ct mark keeps the slot for the life of the connection and is
///   inherited by its RELATED connections (Neutron leaves those bits alone),
///   so a revocation finds every connection of the rule by its mark.
///
/// Nothing of enforcer is in the skb mark after the prerouting chain, so no
/// Neutron mark set later can be mistaken for one of enforcer's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MarkLayout {
    pub helper_mask: u32,
    pub helper_shift: u32,
    pub slot_mask: u32,
    pub slot_shift: u32,
}

impl MarkLayout {
    /// Helper id in skb mark bits 16-19 (only between TC ingress and the
    /// prerouting chain), slot in bits 0-15 of the ct mark, which Neutron
    /// does not use.
    pub const DEFAULT: MarkLayout = MarkLayout::from_masks(0x000f_0000, 0x0000_ffff);

    pub const fn from_masks(helper_mask: u32, slot_mask: u32) -> Self {
        Self {
            helper_mask,
            helper_shift: helper_mask.trailing_zeros() % 32,
            slot_mask,
            slot_shift: slot_mask.trailing_zeros() % 32,
        }
    }

    /// Both masks together: the bits the tag writes.
    #[inline(always)]
    pub const fn mask(&self) -> u32 {
        self.helper_mask | self.slot_mask
    }

    /// The mark value for (helper, slot), within `mask()`.
    #[inline(always)]
    pub const fn encode(&self, helper: u8, slot: u32) -> u32 {
        (((helper as u32) << self.helper_shift) & self.helper_mask)
            | ((slot << self.slot_shift) & self.slot_mask)
    }

    /// `mark` with our bits replaced by the tag, every other bit kept.
    #[inline(always)]
    pub const fn tag(&self, mark: u32, helper: u8, slot: u32) -> u32 {
        (mark & !self.mask()) | self.encode(helper, slot)
    }

    #[inline(always)]
    pub const fn slot(&self, mark: u32) -> u32 {
        (mark & self.slot_mask) >> self.slot_shift
    }

    #[inline(always)]
    pub const fn helper(&self, mark: u32) -> u8 {
        ((mark & self.helper_mask) >> self.helper_shift) as u8
    }
}

impl Default for MarkLayout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), explicitly padded plain data.
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for RouterValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for RevokedFlow {}
    unsafe impl aya::Pod for MarkLayout {}
    unsafe impl aya::Pod for CtOffsets {}
    unsafe impl aya::Pod for CtConfig {}
    unsafe impl aya::Pod for CtNetns {}
    unsafe impl aya::Pod for IndexedCt {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rules_filter_bit_is_in_the_map_and_its_own() {
        assert_eq!(filter_bit(0, 1, 21), None, "no rules for other protocols");
        let keys = [(0, IPPROTO_TCP, 21), (1, IPPROTO_TCP, 21), (0, IPPROTO_UDP, 21), (0, IPPROTO_TCP, 22)];
        let bits = keys.map(|(router, proto, port)| {
            let (word, mask) = filter_bit(router, proto, port).unwrap();
            assert!(word < FILTER_WORDS && mask.count_ones() == 1);
            (word as u64) << 6 | mask.trailing_zeros() as u64
        });
        for i in 0..bits.len() {
            for j in 0..i {
                assert_ne!(bits[i], bits[j], "router, protocol and port each move the bit: {:?} {:?}", keys[i], keys[j]);
            }
        }
    }
}
