//! BPF_PROG_TEST_RUN of both programs on crafted packets: the real verified
//! programs run in the kernel on bytes this test builds.

use aya::programs::{TestRun, TestRunOptions};
use enforcer::kernel::{Datapath, RevokedPolicy};
use enforcer_common::{IPPROTO_TCP, IPPROTO_UDP, MarkLayout, PROG_TAG};
use enforcer_tests::{require_root, unique};

/// TC_ACT_UNSPEC (-1): no verdict, the next filter or tcx program runs.
const NEXT: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
/// The control instance of the programs serves router index 0.
const ROUTER: u32 = 0;
const FTP: u8 = 1;
const TFTP: u8 = 2;
/// Offset of `mark` in struct __sk_buff.
const MARK: usize = 8;
const SKB_SIZE: usize = 192;
/// Quiet time of revoked flows in these tests.
const QUIET_NS: u64 = 1_000_000_000;

struct Bed {
    dp: Datapath,
    dir: std::path::PathBuf,
}

impl Bed {
    fn new(layout: MarkLayout) -> Self {
        Self::with_policy(layout, RevokedPolicy { quiet_ns: QUIET_NS, ..Default::default() })
    }

    fn with_policy(layout: MarkLayout, revoked: RevokedPolicy) -> Self {
        require_root();
        let dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique("tr"));
        let mut dp = Datapath::load(&dir, layout, 1024, revoked).expect("loading programs");
        dp.allow(ROUTER, IPPROTO_TCP, 21, FTP, 7).unwrap();
        dp.allow(ROUTER, IPPROTO_UDP, 69, TFTP, 8).unwrap();
        Self { dp, dir }
    }

    /// Runs `prog` on `packet` with `mark`; returns (verdict, mark after).
    fn run(&self, prog: &str, packet: &[u8], mark: u32) -> (u32, u32) {
        let mut ctx_in = vec![0u8; SKB_SIZE];
        ctx_in[MARK..MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = vec![0u8; SKB_SIZE];
        let opts = TestRunOptions { data_in: Some(packet), ctx_in: Some(&ctx_in), ctx_out: Some(&mut ctx_out), ..Default::default() };
        let r = self.dp.program(prog).unwrap().test_run(opts).expect("BPF_PROG_TEST_RUN");
        (r.return_value, u32::from_ne_bytes(ctx_out[MARK..MARK + 4].try_into().unwrap()))
    }

    fn tag(&self, packet: &[u8], mark: u32) -> u32 {
        let (verdict, mark) = self.run(PROG_TAG, packet, mark);
        assert_eq!(verdict, NEXT, "tag never drops, and never ends the chain");
        mark
    }

    fn counters(&self, slot: u32) -> (u64, u64) {
        let dump = enforcer::kernel::dump::read(&self.dir).unwrap();
        let s = dump.slots.iter().find(|s| s.router_index == ROUTER && s.slot == slot).expect("slot counters");
        (s.tagged, s.dropped)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn l4(proto: u8, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; if proto == IPPROTO_TCP { 20 } else { 8 }];
    h[0..2].copy_from_slice(&40000u16.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        h[12] = 0x50;
    }
    h
}

/// IPv4 with `opt_words` 4-byte option words and the given fragment field.
fn ipv4(proto: u8, dport: u16, opt_words: u8, frag: u16) -> Vec<u8> {
    let mut p = eth(0x0800);
    let l4 = l4(proto, dport);
    let ihl = 5 + opt_words;
    let total = ihl as u16 * 4 + l4.len() as u16;
    p.extend_from_slice(&[0x40 | ihl, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0, 10, 200, 1, 2, 10, 200, 2, 2]);
    for _ in 0..opt_words {
        p.extend_from_slice(&[1, 1, 1, 1]); // NOP options
    }
    p.extend_from_slice(&l4);
    p
}

/// IPv6 with the given chain of extension headers before `proto`.
/// Each is (next-header number of this header, bytes).
fn ipv6(proto: u8, dport: u16, ext: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut p = eth(0x86dd);
    let l4 = l4(proto, dport);
    let mut body = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = ext.get(i + 1).map(|e| e.0).unwrap_or(proto);
        body.extend_from_slice(&h);
    }
    body.extend_from_slice(&l4);
    let first = ext.first().map(|e| e.0).unwrap_or(proto);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(body.len() as u16).to_be_bytes());
    p.extend_from_slice(&[first, 64]);
    p.extend_from_slice(&[0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2]);
    p.extend_from_slice(&[0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2]);
    p.extend_from_slice(&body);
    p
}

fn opts_header() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0] // next, len 0 (8 bytes), PadN
}

fn frag_header(offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | more as u16;
    let mut h = vec![0, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 9]);
    h
}

fn vlan(inner: Vec<u8>, tpids: &[u16]) -> Vec<u8> {
    let mut p = inner[..12].to_vec();
    for tpid in tpids {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&100u16.to_be_bytes());
    }
    p.extend_from_slice(&inner[12..]);
    p
}

/// The object's BTF is accepted by the kernel: a name it refuses (a Rust
/// generic such as aya-log's `Global<u8>`, left as it is by an older
/// bpf-linker) makes aya load the programs without their BTF, and log a
/// warning with the whole type dump at every router add.
#[test]
fn the_programs_load_with_their_btf() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    let info = bed.dp.program(PROG_TAG).unwrap().info().expect("program info");
    assert!(info.btf_id().is_some_and(|id| id != 0), "{PROG_TAG} was loaded without BTF");
}

#[test]
fn tags_allowed_ipv4_and_ipv6_flows() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    let l = MarkLayout::DEFAULT;
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), 0), l.encode(FTP, 7));
    assert_eq!(bed.tag(&ipv4(IPPROTO_UDP, 69, 0, 0), 0), l.encode(TFTP, 8));
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &[]), 0), l.encode(FTP, 7));
    assert_eq!(bed.tag(&ipv6(IPPROTO_UDP, 69, &[]), 0), l.encode(TFTP, 8));
    assert_eq!(bed.counters(7).0, 2, "tagged packets are counted per rule");
}

#[test]
fn leaves_other_flows_untouched() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    for packet in [
        ipv4(IPPROTO_TCP, 22, 0, 0),
        ipv4(IPPROTO_UDP, 21, 0, 0), // right port, wrong protocol
        ipv4(IPPROTO_TCP, 69, 0, 0),
        ipv6(IPPROTO_TCP, 2121, &[]),
        ipv4(47, 21, 0, 0), // GRE
    ] {
        assert_eq!(bed.tag(&packet, 0x1234), 0x1234);
    }
}

#[test]
fn ipv4_options_are_skipped() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    for words in [1, 3, 10] {
        assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, words, 0), 0), MarkLayout::DEFAULT.encode(FTP, 7), "{words} option words");
    }
    // A header length below 20 bytes is malformed: untouched.
    let mut bad = ipv4(IPPROTO_TCP, 21, 0, 0);
    bad[14] = 0x44;
    assert_eq!(bed.tag(&bad, 0), 0);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    let tagged = MarkLayout::DEFAULT.encode(FTP, 7);
    let hop_dst = [(0u8, opts_header()), (60u8, opts_header())];
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &hop_dst), 0), tagged);
    let routing = vec![0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &[(0, opts_header()), (43, routing)]), 0), tagged);
    // More extension headers than the parser walks: left alone, not guessed.
    let many: Vec<_> = (0..7).map(|_| (60u8, opts_header())).collect();
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &many), 0), 0);
    // ESP hides the ports.
    let esp = ipv6(50, 21, &[]);
    assert_eq!(bed.tag(&esp, 0), 0);
}

#[test]
fn only_first_fragments_are_tagged() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    let tagged = MarkLayout::DEFAULT.encode(FTP, 7);
    // IPv4: MF set, offset 0 is the first fragment; offset 185 is not.
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0x2000), 0), tagged);
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 185), 0), 0);
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0x2000 | 185), 0), 0);
    // IPv6 fragment header.
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &[(44, frag_header(0, true))]), 0), tagged);
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &[(44, frag_header(100, false))]), 0), 0);
}

#[test]
fn truncated_and_non_ip_packets_pass_untouched() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    let full = ipv4(IPPROTO_TCP, 21, 0, 0);
    // Cut inside the ports, and right after the fixed IP header. (The
    // kernel's test harness itself refuses a packet shorter than a fixed IP
    // header, so a cut inside the options stands for that case.)
    for len in [14 + 20 + 3, 14 + 20] {
        assert_eq!(bed.tag(&full[..len], 0x77), 0x77, "cut at {len}");
    }
    let with_options = ipv4(IPPROTO_TCP, 21, 10, 0);
    assert_eq!(bed.tag(&with_options[..14 + 30], 0x77), 0x77, "cut inside the options");
    let v6 = ipv6(IPPROTO_TCP, 21, &[(0, opts_header())]);
    assert_eq!(bed.tag(&v6[..14 + 40 + 4], 0), 0, "cut inside an extension header");
    let mut arp = eth(0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(bed.tag(&arp, 0x77), 0x77);
    // Says IPv4 in the ethertype, but version 6 inside.
    let mut liar = ipv6(IPPROTO_TCP, 21, &[]);
    liar[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    assert_eq!(bed.tag(&liar, 0), 0);
}

#[test]
fn vlan_tags_are_looked_through() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    let tagged = MarkLayout::DEFAULT.encode(FTP, 7);
    assert_eq!(bed.tag(&vlan(ipv4(IPPROTO_TCP, 21, 0, 0), &[0x8100]), 0), tagged);
    assert_eq!(bed.tag(&vlan(ipv6(IPPROTO_TCP, 21, &[]), &[0x88a8, 0x8100]), 0), tagged);
    assert_eq!(bed.tag(&vlan(ipv4(IPPROTO_TCP, 22, 0, 0), &[0x8100]), 0), 0);
}

#[test]
fn foreign_mark_bits_are_kept() {
    // Our bits in the middle of the mark, others' bits on both sides.
    let layout = MarkLayout::from_masks(0x00f0_0000, 0x000f_ff00);
    let bed = Bed::new(layout);
    let foreign = 0xab00_00cc;
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), foreign), foreign | layout.encode(FTP, 7));
    // A stale tag in our bits is replaced, not OR-ed.
    let stale = foreign | layout.encode(0xf, 0xfff);
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), stale), foreign | layout.encode(FTP, 7));
    // A miss leaves everything as it was.
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 22, 0, 0), stale), stale);
}

#[test]
fn neutron_marks_are_left_alone() {
    // The marks a Neutron router puts on packets (address scope in the upper
    // half, metadata 0x1 and external ingress 0x2 in the lower half) pass a
    // packet that no rule names untouched, even with its rule revoked; a
    // tag keeps the address scope.
    let mut bed = Bed::new(MarkLayout::DEFAULT);
    let l = MarkLayout::DEFAULT;
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), 0x0400_0000), 0x0400_0000 | l.encode(FTP, 7));
    bed.dp.revoke(ROUTER, IPPROTO_TCP, 21).unwrap();
    for mark in [0x0400_0000, 0x0400_0001, 0x0400_0002, 0x1, 0x2, 0xffff_0000, 0x0400_0007] {
        for port in [21, 40000] {
            assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, port, 0, 0), mark), (NEXT, mark), "{mark:#x} port {port}");
        }
    }
}

#[test]
fn a_revoked_rule_no_longer_tags_and_others_still_do() {
    let mut bed = Bed::new(MarkLayout::DEFAULT);
    let l = MarkLayout::DEFAULT;
    bed.dp.revoke(ROUTER, IPPROTO_TCP, 21).unwrap();
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), 0), 0);
    assert_eq!(bed.tag(&ipv6(IPPROTO_TCP, 21, &[]), 0), 0);
    assert_eq!(bed.tag(&ipv4(IPPROTO_UDP, 69, 0, 0), 0), l.encode(TFTP, 8), "other rules unaffected");
    // Its connections are dropped through the flows a revocation keeps (see
    // below), never by the slot alone: nothing was kept here.
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 40000, 0, 0), l.encode(0, 7)).0, NEXT);
    assert_eq!(bed.counters(7).1, 0, "nothing dropped");
}

fn tuple(src: &str, dst: &str, sport: u16, dport: u16) -> enforcer::kernel::conntrack::Tuple5 {
    enforcer::kernel::conntrack::Tuple5 { proto: IPPROTO_TCP, src: src.parse().unwrap(), dst: dst.parse().unwrap(), sport, dport }
}

/// The reply direction of the packets `ipv4()`/`ipv6()` build.
fn reply_packet(v6: bool, dport: u16) -> Vec<u8> {
    let mut p = if v6 { ipv6(IPPROTO_TCP, dport, &[]) } else { ipv4(IPPROTO_TCP, dport, 0, 0) };
    let (l3, alen) = if v6 { (14 + 8, 16) } else { (14 + 12, 4) };
    let (src, dst) = (p[l3..l3 + alen].to_vec(), p[l3 + alen..l3 + 2 * alen].to_vec());
    p[l3..l3 + alen].copy_from_slice(&dst);
    p[l3 + alen..l3 + 2 * alen].copy_from_slice(&src);
    let l4 = if v6 { 14 + 40 } else { 14 + 20 };
    p[l4..l4 + 2].copy_from_slice(&dport.to_be_bytes());
    p[l4 + 2..l4 + 4].copy_from_slice(&40000u16.to_be_bytes());
    p
}

#[test]
fn revoked_flows_stay_dropped_until_quiet() {
    let mut bed = Bed::new(MarkLayout::DEFAULT);
    let entries = [
        enforcer::kernel::conntrack::Entry {
            zone: 0,
            orig: tuple("10.200.1.2", "10.200.2.2", 40000, 21),
            reply: tuple("10.200.2.2", "10.200.1.2", 21, 40000),
        },
        enforcer::kernel::conntrack::Entry {
            zone: 0,
            orig: tuple("fd00:200::1:2", "fd00:200::2:2", 40000, 2121),
            reply: tuple("fd00:200::2:2", "fd00:200::1:2", 2121, 40000),
        },
    ];
    assert_eq!(bed.dp.remember_revoked(ROUTER, 7, &entries).unwrap().kept, 4);
    // Both directions of both flows are dropped at ingress, even unmarked.
    for packet in [ipv4(IPPROTO_TCP, 21, 0, 0), reply_packet(false, 21), ipv6(IPPROTO_TCP, 2121, &[]), reply_packet(true, 2121)] {
        assert_eq!(bed.run(PROG_TAG, &packet, 0).0, TC_ACT_SHOT);
    }
    // Other flows pass: another port, the same port over IPv6.
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 22, 0, 0), 0).0, NEXT);
    assert_eq!(bed.run(PROG_TAG, &ipv6(IPPROTO_TCP, 21, &[]), 0).0, NEXT);
    assert_eq!(bed.counters(7).1, 4, "drops of revoked flows count for the revoked slot");

    // Keep one flow talking; let the other go quiet past the quiet time.
    for _ in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 21, 0, 0), 0).0, TC_ACT_SHOT, "still talking: still dropped");
    }
    assert_eq!(bed.run(PROG_TAG, &ipv6(IPPROTO_TCP, 2121, &[]), 0).0, NEXT, "quiet long enough: passes again");
    assert_eq!(bed.dp.revoked_flows(), 3, "the quiet direction was forgotten");
}

/// Both directions of a TCP connection from the client to `dport`.
fn tcp_entry(dport: u16) -> enforcer::kernel::conntrack::Entry {
    enforcer::kernel::conntrack::Entry {
        zone: 0,
        orig: tuple("10.200.1.2", "10.200.2.2", 40000, dport),
        reply: tuple("10.200.2.2", "10.200.1.2", dport, 40000),
    }
}

#[test]
fn a_revoked_flow_that_never_goes_quiet_passes_at_the_end_of_its_lifetime() {
    let mut bed = Bed::with_policy(MarkLayout::DEFAULT, RevokedPolicy { quiet_ns: 60_000_000_000, lifetime_ns: 1_000_000_000, ..Default::default() });
    assert_eq!(bed.dp.remember_revoked(ROUTER, 7, &[tcp_entry(21)]).unwrap().kept, 2);
    // Talking all the time, so never quiet for 60 s.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(800) {
        assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 21, 0, 0), 0).0, TC_ACT_SHOT, "within its lifetime: dropped");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 21, 0, 0), 0).0, NEXT, "past its lifetime: passes, and is tagged again");
    // The sweep forgets the other direction too, though it never sent again.
    bed.dp.sweep_revoked().unwrap();
    assert_eq!(bed.dp.revoked_flows(), 0);
}

#[test]
fn creating_the_rule_again_lets_its_revoked_flows_pass_and_no_others() {
    let mut bed = Bed::new(MarkLayout::DEFAULT);
    bed.dp.remember_revoked(ROUTER, 7, &[tcp_entry(21), tcp_entry(2121)]).unwrap();
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 21, 0, 0), 0).0, TC_ACT_SHOT);
    // tcp/21 again: both of its directions are forgotten, tcp/2121's stay.
    assert_eq!(bed.dp.clear_revoked(ROUTER, IPPROTO_TCP, 21), 2);
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 21, 0, 0), 0).0, NEXT);
    assert_eq!(bed.run(PROG_TAG, &reply_packet(false, 21), 0).0, NEXT);
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 2121, 0, 0), 0).0, TC_ACT_SHOT);
    assert_eq!(bed.dp.clear_revoked(ROUTER, IPPROTO_UDP, 2121), 0, "another protocol is another tuple");
}

#[test]
fn one_routers_mass_revocation_cannot_take_anothers_room() {
    let mut bed = Bed::with_policy(MarkLayout::DEFAULT, RevokedPolicy { quiet_ns: QUIET_NS, capacity: 8, per_router: 4, ..Default::default() });
    // Router 0 (the one these programs serve) revokes one connection.
    assert_eq!(bed.dp.remember_revoked(ROUTER, 7, &[tcp_entry(21)]).unwrap().kept, 2);
    // Router 5 revokes many: it gets its share, the rest is refused.
    let many: Vec<_> = (3000..3010).map(tcp_entry).collect();
    let r = bed.dp.remember_revoked(5, 9, &many).unwrap();
    assert_eq!((r.kept, r.overflowed), (4, 16));
    // Router 6 finds the map full (2 + 4 + 2 of 8), then refused.
    let r = bed.dp.remember_revoked(6, 9, &many[..3]).unwrap();
    assert_eq!((r.kept, r.overflowed), (2, 4));
    assert_eq!(bed.dp.revoked_overflows(), 20, "every refusal is counted");
    // Router 0's entries were not evicted: still dropped.
    assert_eq!(bed.run(PROG_TAG, &ipv4(IPPROTO_TCP, 21, 0, 0), 0).0, TC_ACT_SHOT);
    assert_eq!(bed.dp.revoked_flows(), 8);
}

/// The rule filter's bit for (router, protocol, port), read from the pinned map.
fn filtered_in(bed: &Bed, router: u32, proto: u8, port: u16) -> bool {
    let map = aya::maps::MapData::from_pin(bed.dir.join(enforcer_common::MAP_RULE_FILTER)).expect("the rule filter is pinned");
    let filter = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(map)).unwrap();
    let (word, bit) = enforcer_common::filter_bit(router, proto, port).unwrap();
    filter.get(&word, 0).unwrap() & bit != 0
}

#[test]
fn a_rule_has_its_bit_in_the_filter_and_the_filter_is_repaired() {
    let mut bed = Bed::new(MarkLayout::DEFAULT);
    let l = MarkLayout::DEFAULT;
    assert!(filtered_in(&bed, ROUTER, IPPROTO_TCP, 21) && filtered_in(&bed, ROUTER, IPPROTO_UDP, 69));
    assert!(!filtered_in(&bed, ROUTER, IPPROTO_TCP, 22) && !filtered_in(&bed, ROUTER, IPPROTO_UDP, 21));
    // Another router's rule on the same port has a bit of its own.
    bed.dp.allow(ROUTER + 1, IPPROTO_TCP, 21, FTP, 3).unwrap();
    assert!(filtered_in(&bed, ROUTER + 1, IPPROTO_TCP, 21));
    bed.dp.revoke(ROUTER, IPPROTO_TCP, 21).unwrap();
    assert!(!filtered_in(&bed, ROUTER, IPPROTO_TCP, 21), "router 0's rule on tcp/21 went");
    assert!(filtered_in(&bed, ROUTER + 1, IPPROTO_TCP, 21), "router 1 still has its rule on tcp/21");
    bed.dp.revoke(ROUTER + 1, IPPROTO_TCP, 21).unwrap();
    assert!(!filtered_in(&bed, ROUTER + 1, IPPROTO_TCP, 21), "the last rule on tcp/21 went");
    bed.dp.allow(ROUTER, IPPROTO_TCP, 21, FTP, 9).unwrap();
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), 0), l.encode(FTP, 9));

    // The program trusts the filter: a word cleared behind the daemon's
    // back stops tagging, and the next reconciliation puts it back.
    let map = aya::maps::MapData::from_pin(bed.dir.join(enforcer_common::MAP_RULE_FILTER)).unwrap();
    let mut filter = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(map)).unwrap();
    let (word, _) = enforcer_common::filter_bit(ROUTER, IPPROTO_UDP, 69).unwrap();
    filter.set(word, 0, 0).unwrap();
    assert_eq!(bed.tag(&ipv4(IPPROTO_UDP, 69, 0, 0), 0), 0);
    let mut want = enforcer::kernel::Desired::default();
    for (proto, port, helper, slot) in [(IPPROTO_TCP, 21, FTP, 9u16), (IPPROTO_UDP, 69, TFTP, 8)] {
        want.rules.insert(enforcer_common::RuleKey::new(ROUTER, proto, port), enforcer_common::RuleValue::new(slot, helper));
    }
    let drift = bed.dp.reconcile(&want, true).unwrap();
    assert_eq!(drift.filter_fixed, 1, "{drift:?}");
    assert_eq!(bed.tag(&ipv4(IPPROTO_UDP, 69, 0, 0), 0), l.encode(TFTP, 8));
    assert!(bed.dp.reconcile(&want, false).unwrap().is_empty());
}

#[test]
fn a_restart_sets_the_bits_of_the_rules_it_finds() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    // A filter that lost the rules' bits (an earlier version had none):
    // their words emptied, then the maps loaded again.
    let map = aya::maps::MapData::from_pin(bed.dir.join(enforcer_common::MAP_RULE_FILTER)).unwrap();
    let mut filter = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(map)).unwrap();
    for (proto, port) in [(IPPROTO_TCP, 21), (IPPROTO_UDP, 69)] {
        filter.set(enforcer_common::filter_bit(ROUTER, proto, port).unwrap().0, 0, 0).unwrap();
    }
    assert!(!filtered_in(&bed, ROUTER, IPPROTO_TCP, 21));
    // And a bit no rule stands for (left by an earlier run) is cleared.
    let (stray_word, stray) = enforcer_common::filter_bit(ROUTER, IPPROTO_TCP, 22).unwrap();
    filter.set(stray_word, stray, 0).unwrap();
    let again = Datapath::load(&bed.dir, MarkLayout::DEFAULT, 1024, RevokedPolicy { quiet_ns: QUIET_NS, ..Default::default() }).unwrap();
    assert!(filtered_in(&bed, ROUTER, IPPROTO_TCP, 21) && filtered_in(&bed, ROUTER, IPPROTO_UDP, 69));
    assert!(!filtered_in(&bed, ROUTER, IPPROTO_TCP, 22), "the stray bit was cleared");
    drop(again);
}

#[test]
fn a_filter_that_cannot_be_mapped_is_made_again_at_start() {
    let bed = Bed::new(MarkLayout::DEFAULT);
    // An earlier build's filter was a plain array: a pin in its place that
    // is not the mappable one (here the debug switch, another plain array).
    let pin = bed.dir.join(enforcer_common::MAP_RULE_FILTER);
    std::fs::remove_file(&pin).unwrap();
    aya::maps::MapData::from_pin(bed.dir.join(enforcer_common::MAP_DEBUG)).unwrap().pin(&pin).unwrap();
    let again = Datapath::load(&bed.dir, MarkLayout::DEFAULT, 1024, RevokedPolicy { quiet_ns: QUIET_NS, ..Default::default() }).unwrap();
    let info = aya::maps::MapData::from_pin(&pin).unwrap().info().unwrap();
    assert_ne!(info.map_flags() & enforcer_common::FILTER_MAP_FLAGS, 0, "the pin is the mappable filter now");
    assert_eq!(info.max_entries(), enforcer_common::FILTER_WORDS);
    assert!(filtered_in(&bed, ROUTER, IPPROTO_TCP, 21) && filtered_in(&bed, ROUTER, IPPROTO_UDP, 69));
    // The programs of this start read it: the rules' packets are tagged.
    assert_eq!(bed.tag(&ipv4(IPPROTO_TCP, 21, 0, 0), 0), MarkLayout::DEFAULT.encode(FTP, 7));
    drop(again);
}
