//! The TC programs of enforcer.
//!
//! `tag` (ingress, one small instance per router) names its router and
//! tail-calls `classify` (one instance for all), which writes the helper
//! id and rule slot of an allowed (router, protocol, destination port)
//! into `skb->mark`; enforcer's nftables chain turns that into the helper
//! and keeps the slot in the conntrack mark, which RELATED connections
//! inherit, so the daemon finds every connection of a rule by its mark.
//! `classify` also drops every packet of a flow in the revoked-flows map:
//! a revocation puts there the flows of every conntrack entry carrying the
//! rule's slot before it deletes them.
//!
//! `tag` shares its hook with others (Neutron's tc filters, other tcx
//! programs): without a verdict it returns `TC_ACT_UNSPEC` (TCX_NEXT), so
//! the packet goes on to whoever is attached after it; only a drop ends
//! the chain.
#![no_std]
#![no_main]
// Atomic add: core's atomics lack read-modify-write on the BPF target.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod parse;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
    programs::TcContext,
};
use enforcer_common::{
    COUNTERS_MAP_FLAGS, Counters, DEFAULT_MAX_RULES, DEFAULT_QUIET_NS, FlowKey, MAX_REVOKED_FLOWS, MarkLayout, FILTER_WORDS,
    RevokedFlow, RouterIndex, RouterValue, RuleKey, RuleValue, counters_capacity,
};

/// BPF_F_NO_PREALLOC: entries cost memory only when they exist.
const NO_PREALLOC: u32 = 1;

#[map(name = "ENFORCER_RULES")]
static RULES: HashMap<RuleKey, RuleValue> = HashMap::pinned(DEFAULT_MAX_RULES, NO_PREALLOC);

/// Each slot's counters, at the index its rule (or revoked flow) names: an
/// array read where a hash lookup was, and the daemon maps it (reads and
/// resets a slot's counters without a system call). One entry shared by
/// all CPUs, added to atomically: a slot's packets are few (a helper's
/// control connection, or drops) so the CPUs rarely meet on one entry.
#[map(name = "ENFORCER_RULE_COUNTERS")]
static COUNTERS: Array<Counters> = Array::pinned(counters_capacity(DEFAULT_MAX_RULES), COUNTERS_MAP_FLAGS);

/// The rules' bits (set by the daemon, see `filter_bit`): a packet whose
/// bit is clear leaves after one array read, without hashing its key.
#[map(name = "ENFORCER_RULE_FILTER")]
static RULE_FILTER: Array<u64> = Array::pinned(FILTER_WORDS, enforcer_common::FILTER_MAP_FLAGS);

#[map(name = "ENFORCER_REVOKED")]
static REVOKED: HashMap<FlowKey, RevokedFlow> = HashMap::pinned(MAX_REVOKED_FLOWS, 0);

/// Non-zero while REVOKED may hold entries (set by the daemon): spares
/// every packet the hash lookup when nothing was revoked lately.
#[map(name = "ENFORCER_REVOKED_ACTIVE")]
static REVOKED_ACTIVE: Array<u32> = Array::pinned(1, 0);

/// How many more drops may be described in the datapath log (set by
/// `enforcer debug datapath`). Only a drop reads it: passing packets never
/// pay for the diagnostics, and a drop pays one array read while it is 0.
#[map(name = "ENFORCER_DEBUG")]
static DEBUG: Array<u32> = Array::pinned(1, 0);

/// Not read here: lets userspace name the router of an index from the pins.
#[map(name = "ENFORCER_ROUTERS")]
static ROUTERS: HashMap<RouterIndex, RouterValue> = HashMap::pinned(65536, NO_PREALLOC);

/// Entry 0: the `classify` program of the daemon's current start, which
/// every router's `tag` tail-calls.
#[map(name = "ENFORCER_CLASSIFY")]
static CLASSIFY: ProgramArray = ProgramArray::pinned(1, 0);

/// The router whose packet this CPU is handling: `tag` writes it, then
/// tail-calls `classify`, which reads it. Nothing runs on the CPU in
/// between (a tail call is a jump within one program run; on a PREEMPT_RT
/// kernel, where a program can be preempted, this would have to travel in
/// the packet's `cb` instead).
#[map(name = "ENFORCER_CURRENT")]
static CURRENT: PerCpuArray<RouterIndex> = PerCpuArray::pinned(1, 0);

/// Set by the loader (`EbpfLoader::override_global`); read-only, so the
/// verifier sees constants.
#[unsafe(no_mangle)]
static MARK_LAYOUT: MarkLayout = MarkLayout::DEFAULT;

/// The router this instance of `tag` serves.
#[unsafe(no_mangle)]
static ROUTER: RouterIndex = 0;

/// How long a revoked flow must be quiet before it may pass again.
#[unsafe(no_mangle)]
static QUIET_NS: u64 = DEFAULT_QUIET_NS;

#[inline(always)]
fn layout() -> MarkLayout {
    // Volatile: keep the compiler from folding the default in.
    unsafe { core::ptr::read_volatile(&MARK_LAYOUT) }
}

#[inline(always)]
fn own_router() -> RouterIndex {
    unsafe { core::ptr::read_volatile(&ROUTER) }
}

#[inline(always)]
fn mark(ctx: &TcContext) -> u32 {
    unsafe { (*ctx.skb.skb).mark }
}

/// Which counter of a slot a packet adds to.
#[derive(Clone, Copy)]
enum Count {
    Tagged,
    Dropped,
}

#[inline(always)]
fn count(counter: u32, what: Count) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter) {
        // SAFETY: a map value pointer, aligned for u64; every writer adds
        // atomically (BPF_ATOMIC_ADD; its result is not used).
        unsafe {
            let field = match what {
                Count::Tagged => &raw mut (*c).tagged,
                Count::Dropped => &raw mut (*c).dropped,
            };
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, 1);
        }
    }
}

/// No verdict: continue with the next filter or program on this hook.
const NEXT: i32 = TC_ACT_UNSPEC;

/// A router's program: names its router, then runs `classify`. Each router
/// has its own instance, and so the verifier runs on these few
/// instructions at a router add, not on `classify`'s thousand and more.
/// Without a `classify` to run (never, once the daemon started) the packet
/// passes as if no rule named it.
#[classifier]
pub fn tag(ctx: TcContext) -> i32 {
    if let Some(current) = CURRENT.get_ptr_mut(0) {
        // SAFETY: a map value pointer of this CPU's entry.
        unsafe { *current = own_router() };
        unsafe { CLASSIFY.tail_call(&ctx, 0) };
    }
    NEXT
}

/// Tags a packet of an allowed flow, drops one of a revoked flow, for the
/// router `tag` named.
#[classifier]
pub fn classify(ctx: TcContext) -> i32 {
    let Some(flow) = parse::flow(&ctx) else {
        return NEXT;
    };
    let Some(&router) = CURRENT.get(0) else {
        return NEXT;
    };
    if revoked(&ctx, router, &flow) {
        return TC_ACT_SHOT;
    }
    if !filtered_in(router, flow.proto, flow.dport) {
        return NEXT;
    }
    let key = RuleKey::new(router, flow.proto, flow.dport);
    if let Some(rule) = unsafe { RULES.get(&key) } {
        let layout = layout();
        ctx.set_mark(layout.tag(mark(&ctx), rule.helper, rule.slot as u32));
        count(rule.counter, Count::Tagged);
    }
    NEXT
}

/// Whether the router may have a rule for (protocol, port): its bit in the
/// rule filter is set.
#[inline(always)]
fn filtered_in(router: RouterIndex, proto: u8, port: u16) -> bool {
    let Some((word, bit)) = enforcer_common::filter_bit(router, proto, port) else {
        return false;
    };
    RULE_FILTER.get(word).is_some_and(|w| *w & bit != 0)
}

/// Whether the packet belongs to a revoked connection that is still
/// talking; refreshes its quiet timer if so.
#[inline(always)]
fn revoked(ctx: &TcContext, router: RouterIndex, flow: &parse::Flow) -> bool {
    if REVOKED_ACTIVE.get(0).is_none_or(|active| *active == 0) {
        return false;
    }
    let key = FlowKey {
        router,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
        src: flow.src,
        dst: flow.dst,
    };
    let Some(entry) = REVOKED.get_ptr_mut(&key) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let quiet = unsafe { core::ptr::read_volatile(&QUIET_NS) };
    // SAFETY: a map value pointer; a racing update only moves the timer.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_seen_ns) > quiet || now > entry.expires_ns {
        let _ = REVOKED.remove(&key);
        return false;
    }
    entry.last_seen_ns = now;
    count(entry.counter, Count::Dropped);
    if debugging() {
        aya_log_ebpf::info!(
            ctx,
            "dropped: router {} slot {}: a flow of a revoked rule (proto {} port {} -> {}, family {})",
            router,
            entry.slot,
            flow.proto,
            flow.sport,
            flow.dport,
            flow.family
        );
    }
    true
}

/// Whether a drop is to be described in the log: while the budget the
/// daemon set lasts (decremented without a lock: CPUs racing may log a few
/// more).
#[inline(always)]
fn debugging() -> bool {
    let Some(budget) = DEBUG.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a map value pointer.
    let budget = unsafe { &mut *budget };
    if *budget == 0 {
        return false;
    }
    *budget -= 1;
    true
}

/// Benchmark baseline: the cheapest possible TC program.
#[classifier]
pub fn baseline_empty(_ctx: TcContext) -> i32 {
    NEXT
}

/// Benchmark baseline: one hash lookup of a fixed key, no parsing.
#[classifier]
pub fn baseline_lookup(_ctx: TcContext) -> i32 {
    let key = RuleKey::new(own_router(), 6, 21);
    if unsafe { RULES.get(&key) }.is_some() {
        return NEXT;
    }
    NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
