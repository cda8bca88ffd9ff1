//! ctnetlink (over `netlink`): the entries of a rule slot, found by their
//! mark, and their removal. Must run on a thread inside the router's
//! namespace (`netns::run_in`): the socket talks to the conntrack table of
//! the namespace it was opened in.

use std::net::IpAddr;

use anyhow::Result;
use netlink_packet_core::{DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, Nla};
use netlink_packet_netfilter::{
    NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};

use super::netlink::{netfilter, receive, send, send_in};

const CTA_MARK_MASK: u16 = 21;
const CTA_ZONE: u16 = 18;
/// An attribute's type, without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One direction of a connection, as conntrack records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple5 {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry: its zone, original and reply directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Conntrack zone; 0, the default, almost always.
    pub zone: u16,
    pub orig: Tuple5,
    pub reply: Tuple5,
}

fn mark_filter(mark: u32, mask: u32) -> Vec<ConntrackAttribute> {
    vec![
        ConntrackAttribute::CtaMark(mark),
        ConntrackAttribute::Other(DefaultNla::new(CTA_MARK_MASK, mask.to_be_bytes().to_vec())),
    ]
}

fn tuple(parts: &[Tuple]) -> Option<Tuple5> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    for part in parts {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(p) => {
                for x in p {
                    match x {
                        // ICMP entries are named by type, code and id, not
                        // ports, and never carry a slot: no rule matches
                        // them and no helper makes them.
                        ProtoTuple::Protocol(Protocol::Icmp | Protocol::Ipv6Icmp) => return None,
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => sport = *p,
                        ProtoTuple::DestinationPort(p) => dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple5 { proto: proto?, src: src?, dst: dst?, sport, dport })
}

/// The entries (TCP, UDP, GRE, ...: all but ICMP) whose mark matches
/// `mark` under `mask`.
pub fn entries_with_mark(mark: u32, mask: u32) -> Result<Vec<Entry>> {
    Ok(marked(mark, mask)?.into_iter().map(|(e, _)| e).collect())
}

/// The entries with any bit of `mask` set in their mark, and
/// their marks. The kernel cannot filter on that: every entry of the
/// namespace comes back.
pub fn entries_marked_within(mask: u32) -> Result<Vec<(Entry, u32)>> {
    Ok(marked(0, 0)?.into_iter().filter(|(_, m)| m & mask != 0).collect())
}

/// The entries whose mark matches `mark` under `mask`, with their marks.
fn marked(mark: u32, mask: u32) -> Result<Vec<(Entry, u32)>> {
    let sock = netfilter()?;
    let filter = if mask == 0 { Vec::new() } else { mark_filter(mark, mask) };
    send(&sock, ConntrackMessage::Get(filter), NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut out = Vec::new();
    receive(&sock, false, |msg| {
        if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)) = msg {
            let (mut orig, mut reply, mut entry_mark, mut zone) = (None, None, None, 0);
            for a in attrs {
                match a {
                    ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(&t),
                    ConntrackAttribute::CtaTupleReply(t) => reply = tuple(&t),
                    ConntrackAttribute::CtaMark(m) => entry_mark = Some(m),
                    ConntrackAttribute::Other(nla) if nla.kind() & NLA_TYPE_MASK == CTA_ZONE && nla.value_len() == 2 => {
                        let mut be = [0u8; 2];
                        nla.emit_value(&mut be);
                        zone = u16::from_be_bytes(be);
                    }
                    _ => {}
                }
            }
            // The kernel filters by mark; check anyway, a filter it ignored
            // must not make us revoke other rules' flows.
            if let (Some(orig), Some(reply), Some(m)) = (orig, reply, entry_mark)
                && m & mask == mark {
                    out.push((Entry { zone, orig, reply }, m));
                }
        }
    })?;
    Ok(out)
}

/// Deletes each entry by its zone and original tuple: a hash lookup each,
/// where a delete by mark walks the host's whole table (every namespace's
/// entries are in one). An entry already gone is no error. Deleting a
/// master entry also removes the expectations it opened.
pub fn delete_entries(entries: &[Entry]) -> Result<()> {
    let sock = netfilter()?;
    for e in entries {
        let (family, attrs) = by_tuple(e);
        send_in(&sock, family, ConntrackMessage::Delete(attrs), NLM_F_REQUEST | NLM_F_ACK)?;
        receive(&sock, false, |_| {})?;
    }
    Ok(())
}

/// The attributes that name entry `e` (zone and original tuple), and its
/// family.
fn by_tuple(e: &Entry) -> (NetfilterProtoFamily, Vec<ConntrackAttribute>) {
    let t = e.orig;
    let family = if t.src.is_ipv4() { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 };
    let protocol = Protocol::from(t.proto);
    let tuple = vec![
        Tuple::Ip(vec![IPTuple::SourceAddress(t.src), IPTuple::DestinationAddress(t.dst)]),
        Tuple::Proto(vec![ProtoTuple::Protocol(protocol), ProtoTuple::SourcePort(t.sport), ProtoTuple::DestinationPort(t.dport)]),
    ];
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple)];
    if e.zone != 0 {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, e.zone.to_be_bytes().to_vec())));
    }
    (family, attrs)
}

/// Whether each of `entries` is in the table: a lookup each, by zone and
/// original tuple.
pub fn alive(entries: &[Entry]) -> Result<Vec<bool>> {
    let sock = netfilter()?;
    entries
        .iter()
        .map(|e| {
            let (family, attrs) = by_tuple(e);
            send_in(&sock, family, ConntrackMessage::Get(attrs), NLM_F_REQUEST | NLM_F_ACK)?;
            let mut found = false;
            receive(&sock, true, |_| found = true)?;
            // The acknowledgement follows the answer.
            if found {
                receive(&sock, false, |_| {})?;
            }
            Ok(found)
        })
        .collect()
}

/// Deletes every entry whose mark matches, in one message. Deleting a
/// master entry also removes the expectations it opened.
pub fn delete_with_mark(mark: u32, mask: u32) -> Result<()> {
    let sock = netfilter()?;
    send(&sock, ConntrackMessage::Delete(mark_filter(mark, mask)), NLM_F_REQUEST | NLM_F_ACK)?;
    receive(&sock, false, |_| {})
}
