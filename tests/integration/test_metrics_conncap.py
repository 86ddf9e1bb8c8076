#!/usr/bin/env python3
"""The metrics HTTP listener answers a client that half-closes after its
request, and holds at most METRICS_HTTP_MAX_CONNECTIONS (32) connections: a client opening 300 raises the daemon's open descriptors by
32, not 300; meanwhile the control socket answers status and a new scrape
waits; once the clients close, the descriptors come back and GET /metrics
answers again."""

import http.client
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, free_port, wait_until  # noqa: E402

CAP = 32  # METRICS_HTTP_MAX_CONNECTIONS
FLOOD = 300


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def accepted(pid, port):
    """The daemon's descriptors that are connections accepted on port: its
    socket inodes that /proc/net/tcp lists with local port `port`, not
    listening."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            if int(cols[1].split(":")[1], 16) == port and cols[3] != "0A":
                inodes.add("socket:[%s]" % cols[9])
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)) in inodes
        except OSError:
            pass
    return n


def scrape(port, timeout):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


with Harness("metrics_conncap") as h:
    h.plan(8)
    port = free_port()
    n1 = h.start_daemon("n1", args=["--metrics-listen", "127.0.0.1:%d" % port])
    st, body = scrape(port, 10)
    h.ok(st == 200 and "pickbox_raft_term" in body, "GET /metrics answers before the flood",
         "status %r" % st)
    # A client that half-closes right after its request still gets the reply.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    h.ok(out.startswith(b"HTTP/1.1 200 OK\r\n") and b"pickbox_raft_term" in out,
         "a request followed by a half-close is answered in full", repr(out[:80]))
    pid = n1.pid
    # The scrapes' connections are closed by the clients; wait for the
    # server side to let go of them too before counting (a count taken
    # while one lingers is one too high, and the flood then never reaches
    # it).
    wait_until(lambda: accepted(pid, port) == 0, 30,
               what="the first scrapes' connections to close")
    base = fds(pid)

    socks = []
    try:
        for _ in range(FLOOD):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(("127.0.0.1", port))  # the kernel's backlog completes it
            socks.append(s)
        # The daemon accepts up to the cap, then stops accepting.
        wait_until(lambda: accepted(pid, port) >= CAP, 30,
                   what="the daemon to accept %d" % CAP)
        # A status round trip: the loop has run since; no more were accepted.
        st = n1.call("status")["result"]
        held = accepted(pid, port)
        grown = fds(pid) - base
        h.ok(held == CAP and grown <= CAP + 2,
             "%d clients connected: the daemon holds %d of them (cap %d), %d descriptors more"
             % (FLOOD, held, CAP, grown))
        h.ok(st["node_id"] == "n1" and n1.alive(), "status answers on the control socket while "
             "the metrics listener is full")
        try:
            st_full, _ = scrape(port, 1)
        except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            st_full = type(e).__name__
        h.ok(st_full != 200, "a new scrape is not served while the listener is full",
             "got %r" % (st_full,))
        h.ok(n1.log_has("accepting no more until one closes"),
             "the daemon logs that the metrics listener is full")
    finally:
        for s in socks:
            s.close()

    # The queued connections are accepted and seen closed; the listener is
    # back to serving.
    def served():
        try:
            return scrape(port, 2)[0] == 200
        except (OSError, http.client.HTTPException):
            return False
    try:
        wait_until(served, 30, interval=0.1, what="GET /metrics to answer again")
        again = True
    except HarnessError:
        again = False
    h.ok(again, "GET /metrics answers again once the clients closed")
    try:
        wait_until(lambda: fds(pid) <= base + 1 and accepted(pid, port) == 0, 30,
                   what="the descriptors to come back")
    except HarnessError:
        pass
    h.ok(n1.alive() and fds(pid) <= base + 1 and accepted(pid, port) == 0,
         "the daemon's descriptors are back to %d (+%d)" % (base, fds(pid) - base))
