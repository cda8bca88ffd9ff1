//! Netlink sockets with the command time limit, and the two families
//! enforcer speaks over them: nfnetlink (ctnetlink and the nftables
//! generation, through netlink-packet-netfilter) and rtnetlink (the tc
//! hooks of netlink mode, through netlink-packet-route).
//! A socket talks to the namespace it was opened in, so callers open it on
//! a thread inside the router's namespace (`netns::run_in`).

use anyhow::{Context, Result, anyhow, bail};
use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// A `protocol` socket with the command time limit on both directions: a
/// request that stalls fails instead of holding the namespace thread
/// forever.
pub fn open(protocol: isize, family: &str) -> Result<Socket> {
    let mut s = Socket::new(protocol).with_context(|| format!("opening a {family} netlink socket"))?;
    s.bind_auto().with_context(|| format!("binding the {family} netlink socket"))?;
    s.connect(&SocketAddr::new(0, 0)).with_context(|| format!("connecting the {family} netlink socket"))?;
    let limit = nix::sys::time::TimeVal::new(super::exec::limit().as_secs() as _, super::exec::limit().subsec_micros() as _);
    // SAFETY: the descriptor belongs to `s`, alive for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&s)) };
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(&fd, sockopt::ReceiveTimeout, &limit).context("setting the netlink time limit")?;
    setsockopt(&fd, sockopt::SendTimeout, &limit).context("setting the netlink time limit")?;
    Ok(s)
}

/// A netfilter netlink socket.
pub fn netfilter() -> Result<Socket> {
    open(NETLINK_NETFILTER, "netfilter")
}

/// The cookie of the namespace `sock` lives in: unique for the host's
/// uptime, never reused, unlike the namespace file's inode.
pub fn netns_cookie(sock: &Socket) -> Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 buffer and its length, for an option the kernel writes
    // as a u64 (SO_NETNS_COOKIE, Linux 5.14+).
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the namespace cookie (SO_NETNS_COOKIE, Linux 5.14+)");
    }
    Ok(cookie)
}

/// Sends one request of any netlink family.
pub fn send_message<I: NetlinkSerializable>(sock: &Socket, message: I, flags: u16) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    msg.finalize();
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf);
    sock.send(&buf, 0).context("sending to netlink")?;
    Ok(())
}

/// Sends one netfilter request.
pub fn send(sock: &Socket, message: impl Into<NetfilterMessageInner>, flags: u16) -> Result<()> {
    send_in(sock, NetfilterProtoFamily::Unspec, message, flags)
}

/// Sends one netfilter request about an address family (a request naming
/// a conntrack tuple must say whose addresses it holds).
pub fn send_in(sock: &Socket, family: NetfilterProtoFamily, message: impl Into<NetfilterMessageInner>, flags: u16) -> Result<()> {
    send_message(sock, NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message), flags)
}

/// Reads replies of any netlink family until a dump is done, the request is
/// acknowledged, or (`until_one`) the first message came. ENOENT counts as
/// done: nothing matched.
pub fn receive_messages<I: NetlinkDeserializable>(sock: &Socket, until_one: bool, mut each: impl FnMut(I)) -> Result<()> {
    loop {
        let (buf, _) = sock.recv_from_full().map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                anyhow!("netlink did not answer within {} s (command_timeout_secs)", super::exec::limit().as_secs_f64())
            }
            _ => anyhow::Error::new(e).context("reading from netlink"),
        })?;
        let mut off = 0;
        while off < buf.len() {
            let msg = NetlinkMessage::<I>::deserialize(&buf[off..]).context("parsing a netlink message")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(()), // ACK
                    Some(code) if code.get() == -libc::ENOENT => return Ok(()),
                    Some(code) => bail!("netlink: {}", std::io::Error::from_raw_os_error(-code.get())),
                },
                NetlinkPayload::InnerMessage(m) => {
                    each(m);
                    if until_one {
                        return Ok(());
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

/// [`receive_messages`] of netfilter replies.
pub fn receive(sock: &Socket, until_one: bool, mut each: impl FnMut(NetfilterMessageInner)) -> Result<()> {
    receive_messages(sock, until_one, |m: NetfilterMessage| each(m.inner))
}
