"""A hostile local caller: opens up to 10,000 connections to the API socket
and floods each with garbage and requests it has no right to make, for
DURATION seconds. Prints: connections tried, connections open at most,
lines sent."""
import socket
import sys
import time

path, duration = sys.argv[1], float(sys.argv[2])
LINES = b'garbage{{{\n{"op":"helper_delete","router_id":"x","helper_id":"y"}\n' * 8
end = time.monotonic() + duration
tried, most, sent, open_ = 0, 0, 0, []
while time.monotonic() < end:
    if tried < 10000 and len(open_) < 500:
        tried += 1
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.setblocking(False)
            open_.append(s)
        except OSError:
            s.close()
    most = max(most, len(open_))
    for s in list(open_):
        try:
            sent += s.send(LINES) and 16
            s.recv(1 << 16)
        except BlockingIOError:
            pass
        except OSError:
            open_.remove(s)
            s.close()
print(tried, most, sent)
