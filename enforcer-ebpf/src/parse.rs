//! The one packet parser both programs share.
//!
//! It reads the skb's linear data directly where the bytes are there (the
//! common case, and several times cheaper than a helper call), and through
//! `bpf_skb_load_bytes` (`TcContext::load`) where they are not, so it works
//! on non-linear skbs too. Anything it does not fully understand yields
//! `None`: the packet is then left untouched, never mis-tagged.

use aya_ebpf::programs::TcContext;
use enforcer_common::{IPPROTO_TCP, IPPROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;

const IPV6_HLEN: usize = 40;
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

/// Parses Ethernet (with up to two VLAN tags), IPv4 or IPv6, TCP or UDP.
#[inline(always)]
pub fn flow(ctx: &TcContext) -> Option<Flow> {
    let mut off = ETH_HLEN;
    let mut proto = be16(ctx, 12)?;
    // In-band VLAN tags (most drivers strip them into skb->vlan_tci, but a
    // frame may still carry them, e.g. stacked QinQ).
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = be16(ctx, off + 2)?;
            off += VLAN_HLEN;
        }
    }
    let (family, (l4proto, l4off, src, dst)) = match proto {
        ETH_P_IP => (4, ipv4(ctx, off)?),
        ETH_P_IPV6 => (6, ipv6(ctx, off)?),
        _ => return None,
    };
    if l4proto != IPPROTO_TCP && l4proto != IPPROTO_UDP {
        return None;
    }
    // Destination port sits at offset 2 for both TCP and UDP; reading the full
    // 4 bytes of ports proves the header is not truncated there.
    let ports = read::<u32>(ctx, l4off)?;
    let dport = u16::from_be((ports >> 16) as u16);
    let sport = u16::from_be(ports as u16);
    Some(Flow { proto: l4proto, family, sport, dport, src, dst })
}

/// The fixed IPv4 header, read in one helper call.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    vihl: u8,
    _tos: u8,
    _len: u16,
    _id: u16,
    frag: u16,
    _ttl: u8,
    proto: u8,
    _csum: u16,
    src: u32,
    dst: u32,
}

/// The fixed IPv6 header, read in one helper call.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    vtcfl: u32,
    _len: u16,
    next: u8,
    _hop: u8,
    src: [u32; 4],
    dst: [u32; 4],
}

/// (protocol, L4 offset, source, destination) of an IPv4 packet.
#[inline(always)]
fn ipv4(ctx: &TcContext, off: usize) -> Option<(u8, usize, [u32; 4], [u32; 4])> {
    let ip = read::<Ipv4Hdr>(ctx, off)?;
    if ip.vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // Non-first fragments carry no L4 header: never tag them.
    if u16::from_be(ip.frag) & 0x1fff != 0 {
        return None;
    }
    Some((ip.proto, off + ihl, [ip.src, 0, 0, 0], [ip.dst, 0, 0, 0]))
}

/// (protocol, L4 offset, source, destination) of an IPv6 packet, after
/// its extension headers.
#[inline(always)]
fn ipv6(ctx: &TcContext, off: usize) -> Option<(u8, usize, [u32; 4], [u32; 4])> {
    let ip = read::<Ipv6Hdr>(ctx, off)?;
    // The version is the top nibble of the first byte (network order).
    if (ip.vtcfl as u8) >> 4 != 6 {
        return None;
    }
    let mut next = ip.next;
    let mut off = off + IPV6_HLEN;
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
            _ => return Some((next, off, ip.src, ip.dst)),
        }
    }
    // Too many extension headers: do not guess.
    None
}
