#!/usr/bin/python3
"""A scripted FTP client (Python's ftplib): one command per stdin line, one
JSON result per stdout line, so a test can drive a single control connection
through a router and see exactly which step fails after a revocation.

Commands: connect HOST PORT | login | noop | list passive|active |
          retr NAME passive|active | retr_start NAME passive|active | retr_wait |
          pasv (asks for a passive data port and does not connect: the router's
          helper keeps an expectation open) | quit
Every network wait is bounded by TIMEOUT seconds.
"""
import ftplib
import json
import sys
import threading
import time

TIMEOUT = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
ftp = None
transfer = {}


def reply(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def set_mode(mode):
    ftp.set_pasv(mode != "active")


def slow_reader(sock, state):
    """Reads a data connection slowly, so the transfer is still running when
    the test revokes the helper."""
    sock.settimeout(TIMEOUT)
    try:
        while True:
            chunk = sock.recv(16384)
            if not chunk:
                break
            state["bytes"] += len(chunk)
            time.sleep(0.01)
        sock.close()
        ftp.voidresp()
        state["result"] = {"ok": True, "bytes": state["bytes"]}
    except Exception as e:  # noqa: BLE001 - report every failure to the test
        state["result"] = {"ok": False, "bytes": state["bytes"], "error": repr(e)}


def run(words):
    global ftp
    cmd = words[0]
    if cmd == "connect":
        ftp = ftplib.FTP(timeout=TIMEOUT)
        welcome = ftp.connect(words[1], int(words[2]))
        return {"ok": True, "welcome": welcome}
    if cmd == "login":
        return {"ok": True, "reply": ftp.login()}
    if cmd == "noop":
        return {"ok": True, "reply": ftp.voidcmd("NOOP")}
    if cmd == "list":
        set_mode(words[1])
        lines = []
        ftp.retrlines("LIST", lines.append)
        return {"ok": True, "lines": lines}
    if cmd == "retr":
        set_mode(words[2])
        size = [0]
        ftp.retrbinary("RETR " + words[1], lambda b: size.__setitem__(0, size[0] + len(b)))
        return {"ok": True, "bytes": size[0]}
    if cmd == "retr_start":
        set_mode(words[2])
        sock = ftp.transfercmd("RETR " + words[1])
        transfer.clear()
        transfer.update(bytes=0, result=None)
        t = threading.Thread(target=slow_reader, args=(sock, transfer), daemon=True)
        transfer["thread"] = t
        t.start()
        time.sleep(0.5)
        return {"ok": True, "bytes": transfer["bytes"]}
    if cmd == "retr_wait":
        transfer["thread"].join()
        return transfer["result"]
    if cmd == "pasv":
        host, port = ftp.makepasv()
        return {"ok": True, "port": port}
    if cmd == "quit":
        try:
            ftp.quit()
        finally:
            return {"ok": True}
    return {"ok": False, "error": "unknown command " + cmd}


for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    try:
        reply(**run(words))
    except Exception as e:  # noqa: BLE001
        reply(ok=False, error=repr(e))
    if words[0] == "quit":
        break
