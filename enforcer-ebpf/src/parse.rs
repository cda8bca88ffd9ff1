//! The packet parser of the program.
//!
//! It reads the skb's linear data directly where the bytes are there (the
//! common case, and several times cheaper than a helper call), and through
//! `bpf_skb_load_bytes` (`TcContext::load`) where they are not, so it works
//! on non-linear skbs too. Anything it does not fully understand yields
//! `None`: the packet is then left untouched, never mis-tagged.
//!
//! The header layouts are network-types'. Their protocol fields are enums
//! that do not list every value a packet may carry, and a value an enum
//! does not list must never be made into one: headers are copied out as
//! `MaybeUninit` and those fields read as the bytes they are.

use core::mem::{MaybeUninit, offset_of};

use aya_ebpf::programs::TcContext;
use enforcer_common::{IPPROTO_GRE, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// The payload type of enhanced GRE (version 1), as PPTP carries it.
const GRE_PROTO_PPP: u16 = 0x880b;

// TCP and UDP keep their ports at the same offsets: one read serves both.
const _: () = assert!(offset_of!(TcpHdr, source) == 0 && offset_of!(UdpHdr, src) == 0);
const _: () = assert!(offset_of!(TcpHdr, dest) == 2 && offset_of!(UdpHdr, dst) == 2);

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (the verifier needs a bound).
const MAX_EXT_HEADERS: usize = 6;

/// What the lookups need from a packet: the rule key and the flow.
pub struct Flow {
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// Ports in host byte order.
    pub sport: u16,
    pub dport: u16,
    /// Addresses as on the wire; IPv4 in the first word.
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// A `T` at `off`: from the linear data when it is all there, else copied
/// out by the kernel.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: within the linear data, as checked just above (and again
        // by the verifier).
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        ctx.load::<T>(off).ok()
    }
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Option<u16> {
    read::<u16>(ctx, off).map(u16::from_be)
}

/// Parses Ethernet (with up to two VLAN tags), IPv4 or IPv6, TCP or UDP,
/// or the enhanced GRE of a PPTP call (no rule matches it; it is parsed so
/// that a revoked call's data flow is dropped).
#[inline(always)]
pub fn flow(ctx: &TcContext) -> Option<Flow> {
    let mut off = EthHdr::LEN;
    let mut proto = be16(ctx, offset_of!(EthHdr, ether_type))?;
    // In-band VLAN tags (most drivers strip them into skb->vlan_tci, but a
    // frame may still carry them, e.g. stacked QinQ).
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = be16(ctx, off + offset_of!(VlanHdr, eth_type))?;
            off += VlanHdr::LEN;
        }
    }
    let (family, (l4proto, l4off, src, dst)) = match proto {
        ETH_P_IP => (4, ipv4(ctx, off)?),
        ETH_P_IPV6 => (6, ipv6(ctx, off)?),
        _ => return None,
    };
    if l4proto == IPPROTO_GRE {
        return gre(ctx, l4off, family, src, dst);
    }
    if l4proto != IPPROTO_TCP && l4proto != IPPROTO_UDP {
        return None;
    }
    // Reading both ports at once proves the header is not truncated there.
    let ports = read::<u32>(ctx, l4off)?;
    let dport = u16::from_be((ports >> 16) as u16);
    let sport = u16::from_be(ports as u16);
    Some(Flow { proto: l4proto, family, sport, dport, src, dst })
}

/// An enhanced GRE header (flags and version, payload type, payload length,
/// call ID), as conntrack reads it: version 1 carrying PPP. Its only port is
/// the receiver's call ID (see `enforcer_common::flow_ports`).
#[inline(always)]
fn gre(ctx: &TcContext, off: usize, family: u8, src: [u32; 4], dst: [u32; 4]) -> Option<Flow> {
    let h = read::<[u8; 8]>(ctx, off)?;
    if h[1] & 0x07 != 1 || u16::from_be_bytes([h[2], h[3]]) != GRE_PROTO_PPP {
        return None;
    }
    let (sport, dport) = enforcer_common::flow_ports(IPPROTO_GRE, 0, u16::from_be_bytes([h[6], h[7]]));
    Some(Flow { proto: IPPROTO_GRE, family, sport, dport, src, dst })
}

/// A byte of a header copied out as `MaybeUninit`, at `field`'s offset:
/// every byte of it came from the packet.
#[inline(always)]
fn byte<T>(h: &MaybeUninit<T>, field: usize) -> u8 {
    // SAFETY: `field` is an offset within T (from offset_of!), and all of
    // T's bytes were written by the copy.
    unsafe { h.as_ptr().cast::<u8>().add(field).read() }
}

/// `N` bytes of a header copied out as `MaybeUninit`, from `field`.
#[inline(always)]
fn bytes<T, const N: usize>(h: &MaybeUninit<T>, field: usize) -> [u8; N] {
    // SAFETY: as for `byte`; the callers' fields are N bytes long.
    unsafe { h.as_ptr().cast::<u8>().add(field).cast::<[u8; N]>().read_unaligned() }
}

/// (protocol, L4 offset, source, destination) of an IPv4 packet.
#[inline(always)]
fn ipv4(ctx: &TcContext, off: usize) -> Option<(u8, usize, [u32; 4], [u32; 4])> {
    let ip = read::<MaybeUninit<Ipv4Hdr>>(ctx, off)?;
    let vihl = byte(&ip, offset_of!(Ipv4Hdr, vihl));
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < Ipv4Hdr::LEN {
        return None;
    }
    // Non-first fragments carry no L4 header: never tag them.
    if u16::from_be_bytes(bytes(&ip, offset_of!(Ipv4Hdr, frags))) & 0x1fff != 0 {
        return None;
    }
    let src = u32::from_ne_bytes(bytes(&ip, offset_of!(Ipv4Hdr, src_addr)));
    let dst = u32::from_ne_bytes(bytes(&ip, offset_of!(Ipv4Hdr, dst_addr)));
    Some((byte(&ip, offset_of!(Ipv4Hdr, proto)), off + ihl, [src, 0, 0, 0], [dst, 0, 0, 0]))
}

/// (protocol, L4 offset, source, destination) of an IPv6 packet, after
/// its extension headers.
#[inline(always)]
fn ipv6(ctx: &TcContext, off: usize) -> Option<(u8, usize, [u32; 4], [u32; 4])> {
    let ip = read::<MaybeUninit<Ipv6Hdr>>(ctx, off)?;
    // The version is the top nibble of the first byte.
    if byte(&ip, offset_of!(Ipv6Hdr, vcf)) >> 4 != 6 {
        return None;
    }
    let words = |field: usize| [0, 1, 2, 3].map(|k| u32::from_ne_bytes(bytes(&ip, field + 4 * k)));
    let (src, dst) = (words(offset_of!(Ipv6Hdr, src_addr)), words(offset_of!(Ipv6Hdr, dst_addr)));
    let mut next = byte(&ip, offset_of!(Ipv6Hdr, next_hdr));
    let mut off = off + Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [nh, len] = ctx.load::<[u8; 2]>(off).ok()?;
                next = nh;
                off += (len as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let [nh, _, hi, lo] = ctx.load::<[u8; 4]>(off).ok()?;
                // Offset in the upper 13 bits: only the first fragment has ports.
                if u16::from_be_bytes([hi, lo]) & 0xfff8 != 0 {
                    return None;
                }
                next = nh;
                off += 8;
            }
            NEXTHDR_AUTH => {
                let [nh, len] = ctx.load::<[u8; 2]>(off).ok()?;
                next = nh;
                off += (len as usize + 2) * 4;
            }
            _ => return Some((next, off, src, dst)),
        }
    }
    // Too many extension headers: do not guess.
    None
}
