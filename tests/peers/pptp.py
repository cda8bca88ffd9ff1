#!/usr/bin/python3
"""The two ends of one PPTP call (RFC 2637), IPv4, as far as a router's
conntrack helper sees them: the control connection's session and call set-up
on TCP 1723, then the call's data as enhanced GRE. This kernel has no PPP, so
pptpd and pptp cannot run here; the helper reads only these messages and the
GRE header, which are sent exactly as the RFC lays them out.

  pptp.py pac ADDR        the server (PAC): answers each set-up (its call
                          ID is the client's with the top bit flipped), then
                          echoes every GRE packet of its calls to the sender.
  pptp.py pns ADDR TIMEOUT CALL_ID
                          the client (PNS): sets up a call to ADDR, prints
                          {"call_id", "peer_call_id"}; then per stdin line
                          "ping", sends one GRE packet of the call and prints
                          {"echo": true} if the PAC's echo came within
                          TIMEOUT seconds, else {"echo": false}.
"""
import json
import select
import socket
import struct
import sys
import time

PORT = 1723
MAGIC = 0x1A2B3C4D
SCCRQ, SCCRP, OCRQ, OCRP = 1, 2, 7, 8
GRE_PROTO_PPP = 0x880B


def control(kind, body):
    """A control message: length, message type 1, magic cookie, its type."""
    return struct.pack("!HHIHH", 12 + len(body), 1, MAGIC, kind, 0) + body


def read_control(conn):
    """(type, body) of the next control message, or None at the end."""
    head = read_exactly(conn, 12)
    if head is None:
        return None
    length, _, magic, kind, _ = struct.unpack("!HHIHH", head)
    if magic != MAGIC:
        raise SystemExit(f"bad magic cookie {magic:#x}")
    return kind, read_exactly(conn, length - 12)


def read_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def gre(call_id, payload=b"ppp"):
    """Enhanced GRE, version 1: key present, PPP, payload length, call ID."""
    return struct.pack("!BBHHH", 0x20, 0x01, GRE_PROTO_PPP, len(payload), call_id) + payload


def gre_call_id(packet):
    """The call ID of a GRE packet read from a raw socket (IP header first)."""
    ihl = (packet[0] & 0x0F) * 4
    header = packet[ihl:ihl + 8]
    if len(header) < 8 or header[1] & 0x07 != 1:
        return None
    return struct.unpack("!H", header[6:8])[0]


def pac(addr):
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, PORT))
    server.listen(4)
    conns = []
    calls = {}  # the PAC's call ID -> the PNS's
    while True:
        ready, _, _ = select.select([server, raw] + conns, [], [])
        for r in ready:
            if r is server:
                conn, _ = server.accept()
                conns.append(conn)
            elif r is raw:
                packet, (peer, _) = raw.recvfrom(65535)
                theirs = calls.get(gre_call_id(packet))
                if theirs is not None:
                    raw.sendto(gre(theirs, b"echo"), (peer, 0))
            else:
                message = read_control(r)
                if message is None:
                    conns.remove(r)
                    r.close()
                elif message[0] == SCCRQ:
                    # Version 1.0, result 1 (OK), framing and bearer 1,
                    # one channel, firmware 1, host and vendor names.
                    body = struct.pack("!HBBIIHH64s64s", 0x0100, 1, 0, 1, 1, 1, 1, b"pac", b"enforcer tests")
                    r.sendall(control(SCCRP, body))
                elif message[0] == OCRQ:
                    peer_call_id = struct.unpack("!H", message[1][:2])[0]
                    call_id = peer_call_id ^ 0x8000
                    calls[call_id] = peer_call_id
                    # Call ID, the PNS's call ID, result 1 (connected), no
                    # error or cause, speed, window, delay, channel.
                    body = struct.pack("!HHBBHIHHI", call_id, peer_call_id, 1, 0, 0, 100_000_000, 64, 0, 0)
                    r.sendall(control(OCRP, body))


def pns(addr, timeout, own_call_id):
    conn = socket.create_connection((addr, PORT), timeout=timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = struct.pack("!HHIIHH64s64s", 0x0100, 0, 1, 1, 1, 1, b"pns", b"enforcer tests")
    conn.sendall(control(SCCRQ, body))
    kind, reply = read_control(conn)
    if kind != SCCRP or reply[2] != 1:
        raise SystemExit(f"session refused: {kind} {reply[:4].hex()}")
    # Call ID, serial, speeds, bearer and framing (any), window, delay,
    # no phone number.
    body = struct.pack("!HHIIIIHHHH64s64s", own_call_id, 1, 300, 100_000_000, 3, 3, 64, 0, 0, 0, b"", b"")
    conn.sendall(control(OCRQ, body))
    kind, reply = read_control(conn)
    call_id, peer_call_id, result = struct.unpack("!HHB", reply[:5])
    if kind != OCRP or result != 1 or peer_call_id != own_call_id:
        raise SystemExit(f"call refused: {kind} {reply[:6].hex()}")
    print(json.dumps({"call_id": own_call_id, "peer_call_id": call_id}), flush=True)

    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_GRE)
    for line in sys.stdin:
        if line.strip() != "ping":
            continue
        raw.sendto(gre(call_id), (addr, 0))
        echoed = False
        deadline = time.monotonic() + timeout
        while not echoed:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([raw], [], [], left)[0]:
                break
            packet, (peer, _) = raw.recvfrom(65535)
            echoed = peer == addr and gre_call_id(packet) == own_call_id
        print(json.dumps({"echo": echoed}), flush=True)
    conn.close()


if __name__ == "__main__":
    if sys.argv[1] == "pac":
        pac(sys.argv[2])
    else:
        pns(sys.argv[2], float(sys.argv[3]), int(sys.argv[4], 0))
