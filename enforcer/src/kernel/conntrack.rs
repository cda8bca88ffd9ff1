//! ctnetlink, spoken through netlink-packet-netfilter: the entries of a rule
//! slot (found by their mark) and their removal. Must run on a thread inside
//! the router's namespace (`netns::run_in`): the socket talks to the
//! conntrack table of the namespace it was opened in.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple},
};
use netlink_packet_core::DefaultNla;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const CTA_MARK_MASK: u16 = 21;

/// One direction of a connection, as conntrack records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple5 {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// A conntrack entry: its original and reply directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub orig: Tuple5,
    pub reply: Tuple5,
}

fn socket() -> Result<Socket> {
    let mut s = Socket::new(NETLINK_NETFILTER).context("opening a ctnetlink socket")?;
    s.bind_auto().context("binding the ctnetlink socket")?;
    s.connect(&SocketAddr::new(0, 0)).context("connecting the ctnetlink socket")?;
    // A dump or delete that stalls fails at the command time limit instead
    // of holding the namespace thread forever.
    let limit = nix::sys::time::TimeVal::new(super::exec::limit().as_secs() as _, super::exec::limit().subsec_micros() as _);
    // SAFETY: the descriptor belongs to `s`, alive for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&s)) };
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&fd, sockopt::ReceiveTimeout, &limit).context("setting the ctnetlink time limit")?;
    setsockopt(&fd, sockopt::SendTimeout, &limit).context("setting the ctnetlink time limit")?;
    Ok(s)
}

fn mark_filter(mark: u32, mask: u32) -> Vec<ConntrackAttribute> {
    vec![
        ConntrackAttribute::CtaMark(mark),
        ConntrackAttribute::Other(DefaultNla::new(CTA_MARK_MASK, mask.to_be_bytes().to_vec())),
    ]
}

fn send(sock: &Socket, message: ConntrackMessage, flags: u16) -> Result<()> {
    let mut msg = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
        message,
    ));
    msg.header.flags = flags;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf);
    sock.send(&buf, 0).context("sending to ctnetlink")?;
    Ok(())
}

/// Reads replies until the dump is done or the request is acknowledged.
fn receive(sock: &Socket, mut each: impl FnMut(ConntrackMessage)) -> Result<()> {
    loop {
        let (buf, _) = sock.recv_from_full().map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                anyhow::anyhow!("ctnetlink did not answer within {} s (command_timeout_secs)", super::exec::limit().as_secs_f64())
            }
            _ => anyhow::Error::new(e).context("reading from ctnetlink"),
        })?;
        let mut off = 0;
        while off < buf.len() {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..])
                .context("parsing a ctnetlink message")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(()), // ACK
                    Some(code) if code.get() == -libc::ENOENT => return Ok(()),
                    Some(code) => bail!("ctnetlink: {}", std::io::Error::from_raw_os_error(-code.get())),
                },
                NetlinkPayload::InnerMessage(NetfilterMessage { inner: NetfilterMessageInner::Conntrack(ct), .. }) => each(ct),
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
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
                        ProtoTuple::Protocol(Protocol::Tcp) => proto = Some(libc::IPPROTO_TCP as u8),
                        ProtoTuple::Protocol(Protocol::Udp) => proto = Some(libc::IPPROTO_UDP as u8),
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

/// The TCP and UDP entries whose mark matches `mark` under `mask`.
pub fn entries_with_mark(mark: u32, mask: u32) -> Result<Vec<Entry>> {
    let sock = socket()?;
    send(&sock, ConntrackMessage::Get(mark_filter(mark, mask)), NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut out = Vec::new();
    receive(&sock, |msg| {
        if let ConntrackMessage::New(attrs) = msg {
            let (mut orig, mut reply, mut entry_mark) = (None, None, None);
            for a in attrs {
                match a {
                    ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(&t),
                    ConntrackAttribute::CtaTupleReply(t) => reply = tuple(&t),
                    ConntrackAttribute::CtaMark(m) => entry_mark = Some(m),
                    _ => {}
                }
            }
            // The kernel filters by mark; check anyway, a filter it ignored
            // must not make us revoke other rules' flows.
            if let (Some(orig), Some(reply), Some(m)) = (orig, reply, entry_mark)
                && m & mask == mark {
                    out.push(Entry { orig, reply });
                }
        }
    })?;
    Ok(out)
}

/// Deletes every entry whose mark matches, in one message. Deleting a
/// master entry also removes the expectations it opened.
pub fn delete_with_mark(mark: u32, mask: u32) -> Result<()> {
    let sock = socket()?;
    send(&sock, ConntrackMessage::Delete(mark_filter(mark, mask)), NLM_F_REQUEST | NLM_F_ACK)?;
    receive(&sock, |_| {})
}
