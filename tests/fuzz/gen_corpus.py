#!/usr/bin/env python3
"""gen_corpus.py: writes the seed corpus of tests/fuzz (run from anywhere).

Seeds are valid inputs (so the fuzzers start deep in the decoders) plus a few
classic broken ones. The handshake seeds include a peer AUTH computed with the
fuzz target's fixed secret and nonce, so the whole exchange up to DONE is
reachable. Formats: see fuzz_frame.c and fuzz_handshake.c.
"""
import hashlib
import hmac
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = b"fuzz-secret-0123456789abcdef"
CLUSTER = bytes(range(1, 17))
LABEL = b"pickbox/net/1"


def frame(t, flags, payload, tag=b""):
    return struct.pack(">BBBBI", 0xB7, 1, t, flags, len(payload)) + payload + tag


def hello(node_id, name, nonce, cluster, vmin=1, vmax=1):
    cid = cluster if cluster is not None else b""
    return (struct.pack(">HHQ", vmin, vmax, node_id) + struct.pack(">I", len(cid)) + cid +
            struct.pack(">I", len(name)) + name + nonce)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# fuzz_frame: option byte (bits 0-1: payload cap index, bit 2: 16-byte tags), stream.
write("fuzz_frame", "control", b"\x03" + frame(20, 0, b"\x00\x00\x00\x01hello"))
write("fuzz_frame", "bulk_fragments",
      b"\x03" + frame(30, 3, b"a" * 100) + frame(20, 0, b"ping") + frame(30, 1, b"b" * 50))
write("fuzz_frame", "tagged", b"\x07" + frame(20, 0, b"abc", b"T" * 16) * 2)
write("fuzz_frame", "hello", b"\x02" + frame(1, 0, hello(2, b"n2", b"\x11" * 32, CLUSTER)))
write("fuzz_frame", "truncated", b"\x03" + frame(20, 0, b"x" * 40)[:20])
write("fuzz_frame", "http", b"\x03GET / HTTP/1.1\r\nHost: x\r\n\r\n")
write("fuzz_frame", "oversized", b"\x01" + frame(20, 0, b"y" * 65))

# fuzz_handshake: option byte, then (u8 type, u16 len, payload)*.
def msg(t, payload):
    return struct.pack(">BH", t, len(payload)) + payload


def peer_auth(opt, peer_hello):
    initiator = bool(opt & 1)
    ours = hello(1, b"fuzz", b"\x42" * 32, CLUSTER if opt & 4 else None)
    ih, rh = (ours, peer_hello) if initiator else (peer_hello, ours)
    t = hashlib.sha256(LABEL + struct.pack(">I", len(ih)) + ih + struct.pack(">I", len(rh)) +
                       rh).digest()
    role = b"responder" if initiator else b"initiator"
    return hmac.new(SECRET, LABEL + b" auth " + role + t, hashlib.sha256).digest()


for opt in (0, 1, 6, 7):
    ph = hello(2, b"peer", b"\x17" * 32, CLUSTER)
    write("fuzz_handshake", "done_%d" % opt,
          bytes([opt]) + msg(1, ph) + msg(2, peer_auth(opt, ph)) + msg(20, b"late"))
ph = hello(2, b"joiner", b"\x18" * 32, None)
write("fuzz_handshake", "join", b"\x05" + msg(1, ph) + msg(2, peer_auth(5, ph)))
write("fuzz_handshake", "bad_mac", b"\x00" + msg(1, ph) + msg(2, b"\x00" * 32))
write("fuzz_handshake", "version",
      b"\x00" + msg(1, hello(2, b"peer", b"\x17" * 32, CLUSTER, 2, 3)))
write("fuzz_handshake", "extension",
      b"\x00" + msg(1, hello(2, b"peer", b"\x17" * 32, CLUSTER, 1, 4) + b"ext"))
write("fuzz_handshake", "auth_first", b"\x00" + msg(2, b"\x00" * 32))
