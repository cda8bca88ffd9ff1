//! The conntrack index: a netfilter program in each router namespace
//! (prerouting, just after enforcer's chain) records every connection whose
//! ct mark carries a rule slot, by original tuple, when it starts: control
//! connections (the chain has just saved their slot) and RELATED ones
//! (they inherit their master's mark when conntrack creates them). A
//! revocation then finds a rule's connections by reading the index,
//! instead of walking the host's whole conntrack table, which every
//! namespace shares.
//!
//! aya cannot load netfilter programs: this is an object of its own, the
//! program is marked a classifier only so that aya-obj parses it, and the
//! daemon loads it as BPF_PROG_TYPE_NETFILTER. Nothing here may use a
//! global (the daemon relocates only the maps below).
//!
//! A packet of an established connection leaves after one map read and
//! one kernel read.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{classifier, map},
    maps::{Array, HashMap},
    programs::TcContext,
    EbpfContext,
};
use enforcer_common::{CtConfig, CtNetns, CtOffsets, DEFAULT_CT_INDEX_CAPACITY, FlowKey, IndexedCt};

/// BPF_F_NO_PREALLOC: entries cost memory only when they exist.
const NO_PREALLOC: u32 = 1;

#[map(name = "ENFORCER_CT_INDEX")]
static INDEX: HashMap<FlowKey, IndexedCt> = HashMap::pinned(DEFAULT_CT_INDEX_CAPACITY, NO_PREALLOC);

#[map(name = "ENFORCER_CT_NETNS")]
static NETNS: HashMap<u32, CtNetns> = HashMap::pinned(65536, NO_PREALLOC);

#[map(name = "ENFORCER_CT_CONFIG")]
static CONFIG: Array<CtConfig> = Array::pinned(1, 0);

/// Connections that found no room, all routers: what the metrics read.
#[map(name = "ENFORCER_CT_MISSED")]
static MISSED: Array<u64> = Array::pinned(1, 0);

const NF_ACCEPT: i32 = 1;
/// `skb->_nfct` keeps ctinfo in its low three bits: IP_CT_RELATED (1) and
/// IP_CT_NEW (2) are a connection's packets in its original direction
/// before any answer, the only ones that can start one.
const NFCT_INFOMASK: u64 = 7;
const IP_CT_RELATED: u64 = 1;
const IP_CT_NEW: u64 = 2;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

#[inline(always)]
fn read<T>(base: u64, off: u32) -> Option<T> {
    // SAFETY: a checked read of kernel memory; a bad address fails.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.ok()
}

/// One direction of an entry: (family 4 or 6, protocol, source, destination,
/// source port, destination port), ports in host order.
type Direction = (u8, u8, [u32; 4], [u32; 4], u16, u16);

#[inline(always)]
fn direction(ct: u64, dir: u64, o: &CtOffsets) -> Option<Direction> {
    let t = ct + o.ct_tuple as u64 + dir * o.tuplehash_size as u64;
    let family = match read::<u16>(t, o.l3num)? {
        AF_INET => 4,
        AF_INET6 => 6,
        _ => return None,
    };
    Some((
        family,
        read::<u8>(t, o.protonum)?,
        read::<[u32; 4]>(t, o.src_addr)?,
        read::<[u32; 4]>(t, o.dst_addr)?,
        u16::from_be(read::<u16>(t, o.src_port)?),
        u16::from_be(read::<u16>(t, o.dst_port)?),
    ))
}

/// Loaded as a netfilter program: its context is `struct bpf_nf_ctx`
/// (`state`, then `skb`), never a `__sk_buff`.
#[classifier]
pub fn ct_index(ctx: TcContext) -> i32 {
    let nf = ctx.as_ptr() as *const u64;
    // SAFETY: reads of the context's two pointers, as the verifier allows.
    let (state, skb) = unsafe { (*nf, *nf.add(1)) };
    let _ = record(state, skb);
    NF_ACCEPT
}

#[inline(always)]
fn record(state: u64, skb: u64) -> Option<()> {
    let config = CONFIG.get(0)?;
    let o = &config.offsets;
    let nfct = read::<u64>(skb, o.skb_nfct)?;
    let info = nfct & NFCT_INFOMASK;
    if info != IP_CT_NEW && info != IP_CT_RELATED {
        return None;
    }
    let ct = nfct & !NFCT_INFOMASK;
    let slot = (read::<u32>(ct, o.ct_mark)? & config.slot_mask) >> config.slot_shift;
    if slot == 0 || ct == 0 {
        return None;
    }
    let net = read::<u64>(state, o.state_net)?;
    let netns = NETNS.get_ptr_mut(&read::<u32>(net, o.net_inum)?)?;
    let (family, proto, src, dst, sport, dport) = direction(ct, 0, o)?;
    // No helper makes ICMP entries, and their tuples have no ports.
    if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 {
        return None;
    }
    let (_, _, reply_src, reply_dst, reply_sport, reply_dport) = direction(ct, 1, o)?;
    // SAFETY: a map value pointer.
    let router = unsafe { (*netns).router };
    let key = FlowKey { router, sport, dport, proto, family, _pad: [0; 2], src, dst };
    let value = IndexedCt {
        // SAFETY: a helper without arguments.
        seen_ns: unsafe { bpf_ktime_get_ns() },
        slot,
        zone: read::<u16>(ct, o.ct_zone)?,
        reply_sport,
        reply_dport,
        _pad: 0,
        reply_src,
        reply_dst,
        _pad2: 0,
    };
    if INDEX.insert(&key, &value, 0).is_err() {
        // SAFETY: a map value pointer; the count is added to atomically.
        unsafe {
            (*netns).complete = 0;
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*netns).missed, 1);
        }
        if let Some(all) = MISSED.get_ptr_mut(0) {
            // SAFETY: a map value pointer, added to atomically.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(all, 1) };
        }
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
