"""The control socket survives bad input: every bad request gets an error
reply or a disconnect, and other clients are served all along."""

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Client, Harness, wait_until  # noqa: E402

MAX_LINE = 1024 * 1024


def code(reply):
    return reply.get("error", {}).get("code") if reply else None


with Harness("badinput") as h:
    h.plan(15)
    n1 = h.start_daemon("n1")
    c = n1.client()

    c.send_raw(b'{"id":1,"method":\n')
    r = c.recv_line()
    h.ok(code(r) == "BAD_REQUEST" and r["id"] is None, "malformed JSON: BAD_REQUEST", r)
    r = c.call("hello")
    h.eq(r["result"]["node_id"], "n1", "connection still usable after malformed JSON")

    c.send_raw(b'{"id":2,"method":"frobnicate"}\n')
    r = c.recv_line()
    h.ok(code(r) == "UNKNOWN_METHOD" and r["id"] == 2, "unknown method: UNKNOWN_METHOD", r)

    c.send_raw(b'{"id":3,"method":"status","params":[1,2]}\n')
    r = c.recv_line()
    h.ok(code(r) == "INVALID_PARAMS" and r["id"] == 3, "params not an object: INVALID_PARAMS",
         r)

    c.send_raw(b'{"id":4,"id":5,"method":"status"}\n')
    h.eq(code(c.recv_line()), "BAD_REQUEST", "duplicate keys: BAD_REQUEST")

    # Binary garbage inside a line: an error, and the connection lives on.
    c.send_raw(bytes(range(256)).replace(b"\n", b"") + b"\n")
    h.eq(code(c.recv_line()), "BAD_REQUEST", "binary garbage line: BAD_REQUEST")
    h.eq(c.call("status")["result"]["node_id"], "n1", "still usable after garbage")

    # Several requests in one write are answered in order.
    c.send_raw(b'{"id":10,"method":"hello"}\n{"id":11,"method":"status"}\n')
    h.eq([c.recv_line()["id"], c.recv_line()["id"]], [10, 11], "pipelined requests in order")
    c.close()

    # A line over 1 MiB: disconnected, while another client is served meanwhile.
    big = n1.client()
    other = n1.client()
    big.send_raw(b'{"id":1,"method":"hello","params":{"x":"' + b"a" * (MAX_LINE // 2))
    h.eq(other.call("hello")["result"]["node_id"], "n1", "served during a half-sent huge line")
    try:
        big.send_raw(b"a" * (MAX_LINE // 2 + 100))
    except (BrokenPipeError, ConnectionResetError):
        pass
    h.ok(big.wait_closed(), "line over 1 MiB: disconnected")
    h.eq(other.call("status")["result"]["node_id"], "n1", "the other client is still served")
    big.close()

    # Binary garbage without any newline: disconnected at the cap.
    g = n1.client()
    try:
        g.send_raw(os.urandom(4096).replace(b"\n", b"x") * (MAX_LINE // 4096 + 2))
    except (BrokenPipeError, ConnectionResetError):
        pass
    h.ok(g.wait_closed(), "endless binary garbage: disconnected")
    g.close()

    # A client that connects and stalls (mid-line) does not block others.
    stall = n1.client()
    stall.send_raw(b'{"id":1,"meth')
    idle = n1.client()
    h.eq(other.call("hello")["result"]["node_id"], "n1", "stalled clients block nobody")

    # 300 clients at once, all connected before any is answered.
    clients = [Client(n1.control_socket) for _ in range(300)]
    for i, cl in enumerate(clients):
        cl.send("hello", req_id=i)
    answers = [cl.recv_line() for cl in clients]
    h.ok(all(a is not None and a["id"] == i and a["result"]["node_id"] == "n1"
             for i, a in enumerate(answers)), "300 concurrent clients all answered")
    for cl in clients:
        cl.close()
    # Left: stall, idle and other.
    wait_until(lambda: other.call("status")["result"]["control_clients"] == 3,
               what="closed clients to be reaped")
    h.ok(n1.alive(), "daemon alive, closed clients reaped")
    for cl in (stall, idle, other):
        cl.close()
