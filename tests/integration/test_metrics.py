#!/usr/bin/env python3
"""Metrics end to end on a 3-node cluster, each node with metrics_listen on a
free loopback port: `pickboxctl metrics` and GET /metrics both give valid
Prometheus text (every line parsed: HELP/TYPE before samples, valid names and
label syntax, numbers, counters named *_total, cumulative histogram buckets
with +Inf == _count); writing files moves commit/applied, per-peer bytes,
proposals, fsync and proposal histograms, chunks, files and bytes in the
tree; a leadership transfer moves term and leader changes; bad HTTP requests
(garbage, huge headers, POST, unknown path, a client that never finishes)
get errors while the daemon keeps serving, and the stalled one is dropped; a metrics address in use stops
startup with an error naming it."""

import http.client
import math
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, free_port, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE_RE = re.compile(r"^(%s)(\{(?:%s(?:,%s)*)?\})? (\S+)$" % (NAME, LABEL, LABEL))
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
HELP_RE = re.compile(r"^# HELP (%s) (.*)$" % NAME)
TYPE_RE = re.compile(r"^# TYPE (%s) (counter|gauge|histogram|summary|untyped)$" % NAME)


def unescape(v):
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def parse(text):
    """(samples, types, errors): samples {(name, ((label, value), ...)): float}."""
    errors, samples, types, helps = [], {}, {}, set()
    if not text.endswith("\n"):
        errors.append("does not end with a newline")
    current = None
    for n, line in enumerate(text.split("\n")[:-1], 1):
        m = HELP_RE.match(line)
        if m:
            if m.group(1) in helps:
                errors.append("line %d: second HELP for %s" % (n, m.group(1)))
            helps.add(m.group(1))
            continue
        m = TYPE_RE.match(line)
        if m:
            name, typ = m.groups()
            if name in types:
                errors.append("line %d: second TYPE for %s" % (n, name))
            types[name] = typ
            current = name
            if typ == "counter" and not name.endswith("_total"):
                errors.append("line %d: counter %s does not end in _total" % (n, name))
            continue
        if line.startswith("#") or line == "":
            errors.append("line %d: unexpected %r" % (n, line))
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            errors.append("line %d: not a sample: %r" % (n, line))
            continue
        name, labels, value = m.groups()
        family = name
        if current and types.get(current) == "histogram" and \
                name in (current + "_bucket", current + "_sum", current + "_count"):
            family = current
        if family != current:
            errors.append("line %d: sample %s outside its family (TYPE %s)" % (n, name, current))
        try:
            v = float(value)
        except ValueError:
            errors.append("line %d: value %r is not a number" % (n, value))
            continue
        if types.get(family) == "counter" and (v < 0 or math.isnan(v)):
            errors.append("line %d: counter %s = %r" % (n, name, value))
        lbl = tuple((k, unescape(val)) for k, val in LABEL_RE.findall(labels or ""))
        key = (name, lbl)
        if key in samples:
            errors.append("line %d: duplicate series %r" % (n, key))
        samples[key] = v
    for name, typ in types.items():
        if name not in helps:
            errors.append("%s has no HELP" % name)
        if typ != "histogram":
            continue
        series = {}
        for (sname, lbl), v in samples.items():
            if sname == name + "_bucket":
                rest = tuple(kv for kv in lbl if kv[0] != "le")
                le = dict(lbl).get("le")
                series.setdefault(rest, []).append((math.inf if le == "+Inf" else float(le), v))
        if not series:
            errors.append("histogram %s has no buckets" % name)
        for rest, buckets in series.items():
            buckets.sort()
            counts = [c for _, c in buckets]
            if counts != sorted(counts) or buckets[-1][0] != math.inf:
                errors.append("histogram %s%r: buckets not cumulative or no +Inf" % (name, rest))
            if samples.get((name + "_count", rest)) != counts[-1] or \
                    (name + "_sum", rest) not in samples:
                errors.append("histogram %s%r: _count != +Inf bucket or no _sum" % (name, rest))
    return samples, types, errors


def val(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), None)


def peers_of(samples, name):
    return {dict(lbl).get("peer"): v for (n, lbl), v in samples.items() if n == name}


def scrape_ctl(h, d):
    r = h.ctl(d, "metrics", timeout=20)
    if r.returncode != 0:
        raise HarnessError("pickboxctl metrics on %s: rc=%d %s" % (d.node_id, r.returncode,
                                                                   r.stderr))
    return r.stdout


def scrape_http(port, method="GET", path="/metrics", timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path)
        resp = c.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode("utf-8", "replace")
    finally:
        c.close()


def metrics(h, d):
    s, _, errors = parse(scrape_ctl(h, d))
    if errors:
        raise HarnessError("%s: invalid exposition: %s" % (d.node_id, errors[:5]))
    return s


def raw_http(port, data, timeout=15):
    """Sends data, returns what comes back until the server closes (or b"")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


with Harness("metrics") as h:
    h.plan(20)
    mports = {}

    def start(name, join=None, secret=None):
        mports[name] = free_port()
        args = th.FAST + ["--metrics-listen", "127.0.0.1:%d" % mports[name]]
        if join is not None:
            args += ["--join", "127.0.0.1:%d" % join.port, "--secret-file", secret]
        return h.start_daemon(name, args=args)

    n1 = start("n1")
    wait_until(lambda: th.status(n1).get("role") == "leader", 10, what="n1 to lead")
    secret = os.path.join(n1.state_dir, "secret")
    wait_until(lambda: os.path.exists(secret), 5, what="n1's secret")
    nodes = [n1, start("n2", n1, secret), start("n3", n1, secret)]
    for d in nodes:
        wait_until(lambda d=d: th.member_ok(d, 3), 30, what="%s to be a member" % d.node_id)

    # 1-3: the format, through both paths.
    texts = {d.node_id: scrape_ctl(h, d) for d in nodes}
    errs = {k: parse(t)[2] for k, t in texts.items()}
    h.ok(all(not e for e in errs.values()) and all(len(parse(t)[0]) > 50 for t in texts.values()),
         "pickboxctl metrics: valid exposition on every node", repr(errs)[:2000])
    st, hdr, body = scrape_http(mports["n2"])
    s_http, types_http, e_http = parse(body)
    # Prometheus keeps its connection open between scrapes.
    conn = http.client.HTTPConnection("127.0.0.1", mports["n2"], timeout=10)
    again = []
    for _ in range(3):
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        again.append((resp.status, not parse(resp.read().decode())[2]))
    conn.close()
    h.ok(st == 200 and hdr.get("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
         and not e_http and again == [(200, True)] * 3,
         "GET /metrics: 200, text format 0.0.4, valid; 3 more on one kept-alive connection",
         "status %r headers %r errors %r again %r" % (st, hdr, e_http[:5], again))
    types_ctl = parse(texts["n2"])[1]
    want_families = {"pickbox_raft_term", "pickbox_raft_commit_index",
                     "pickbox_raft_applied_index", "pickbox_raft_leader_changes_total",
                     "pickbox_raft_apply_lag_entries", "pickbox_raft_apply_lag_seconds",
                     "pickbox_raft_fsync_seconds", "pickbox_proposals_total",
                     "pickbox_proposal_duration_seconds", "pickbox_peer_sent_bytes_total",
                     "pickbox_peer_received_bytes_total", "pickbox_chunks_sent_total",
                     "pickbox_chunks_deduplicated_total", "pickbox_conflicts_total",
                     "pickbox_watch_rescans_total", "pickbox_watch_overflows_total",
                     "pickbox_watch_failures_total", "pickbox_tree_files", "pickbox_tree_bytes",
                     "pickbox_tree_chunks_missing", "pickbox_tree_chunk_bytes_missing",
                     "pickbox_tree_writing"}
    h.ok(types_ctl == types_http and want_families <= set(types_ctl),
         "control and HTTP expose the same families, every one the issue asks for",
         "missing %r; ctl-only %r; http-only %r" % (
             sorted(want_families - set(types_ctl)), sorted(set(types_ctl) - set(types_http)),
             sorted(set(types_http) - set(types_ctl))))

    ws = [parse(t)[0] for t in texts.values()]
    h.ok(all(val(s, "pickbox_watch_rescans_total") >= 1 and
             val(s, "pickbox_watch_directories") >= 1 and
             val(s, "pickbox_watch_overflows_total") == 0 and
             val(s, "pickbox_watch_failures_total") == 0 and
             val(s, "pickbox_raft_leader_changes_total") >= 1 and
             val(s, "pickbox_raft_leader") in (0, 1) for s in ws),
         "at start: the initial rescan counted, the root watched, no overflow or failure, "
         "a leader seen by every node",
         repr([{k: val(s, k) for k in ("pickbox_watch_rescans_total", "pickbox_watch_directories",
                                       "pickbox_raft_leader_changes_total",
                                       "pickbox_raft_leader")} for s in ws]))

    # status --json carries the per-member byte counters. Every link carries
    # bytes: the leader's heartbeats, and every node reports its applied index
    # to every peer (sync).
    st2 = th.status(nodes[1])
    ms = st2.get("members", [])
    h.ok(len(ms) == 3 and all((m["bytes_sent"] is None) == m["self"] and
                              (m["bytes_received"] is None) == m["self"] for m in ms) and
         all(isinstance(m["bytes_sent"], int) and isinstance(m["bytes_received"], int)
             for m in ms if not m["self"]) and
         all(m["bytes_sent"] > 0 and m["bytes_received"] > 0 for m in ms if not m["self"]),
         "status members: bytes_sent/bytes_received per peer (> 0 on every link), "
         "null for self", repr(ms))

    # 5-10: writing files moves what it should.
    leader_id = h.wait_leader(nodes).node_id
    before = {d.node_id: metrics(h, d) for d in nodes}
    writer = nodes[1]
    files = {"m/a.txt": "alpha\n" * 100, "m/b.txt": "bravo\n" * 2000, "m/c.bin": "c" * 70000,
             "d.txt": "delta\n", "e.txt": "echo\n" * 7}
    for rel, data in files.items():
        th.write(os.path.join(writer.data_dir, rel), data)
    th.wait_converged(nodes, 30, lambda t: all(
        t.get(rel, ("", b""))[1] == data.encode() for rel, data in files.items()))
    h.ok(True, "5 files written on %s reach every tree" % writer.node_id)
    # Applied everywhere (the trees are materialized after state.db).
    wait_until(lambda: len({th.status(d).get("applied_index") for d in nodes}) == 1, 20,
               what="applied indexes to converge")
    after = {d.node_id: metrics(h, d) for d in nodes}
    b, a = before, after

    def grew(name, nid, by=1, **labels):
        x, y = val(b[nid], name, **labels), val(a[nid], name, **labels)
        return x is not None and y is not None and y - x >= by

    h.ok(all(grew("pickbox_raft_commit_index", n, 5) and grew("pickbox_raft_applied_index", n, 5)
             for n in a) and
         all(val(a[n], "pickbox_raft_apply_lag_entries") >= 0 and
             val(a[n], "pickbox_raft_apply_lag_seconds") >= 0 for n in a) and
         all(grew("pickbox_raft_fsync_seconds_count", n) for n in a),
         "commit and applied index grow by >= 5 on every node, fsyncs counted, lag >= 0",
         repr({n: [(k, val(b[n], k), val(a[n], k)) for k in (
             "pickbox_raft_commit_index", "pickbox_raft_applied_index",
             "pickbox_raft_fsync_seconds_count")] for n in a}))
    total = sum(len(d) for d in files.values())
    h.ok(all(val(a[n], "pickbox_tree_files") - val(b[n], "pickbox_tree_files") == 5 and
             val(a[n], "pickbox_tree_bytes") - val(b[n], "pickbox_tree_bytes") == total
             for n in a),
         "files and bytes in the tree grow by exactly 5 files and %d bytes everywhere" % total,
         repr({n: (val(b[n], "pickbox_tree_files"), val(a[n], "pickbox_tree_files"),
                   val(b[n], "pickbox_tree_bytes"), val(a[n], "pickbox_tree_bytes"))
               for n in a}))
    h.ok(all(val(a[n], "pickbox_tree_chunks_missing") == 0 and
             val(a[n], "pickbox_tree_chunk_bytes_missing") == 0 and
             val(a[n], "pickbox_tree_writing") == 0 for n in a),
         "no chunk missing and no big file being written anywhere once the trees agree",
         repr({n: [val(a[n], k) for k in ("pickbox_tree_chunks_missing",
                                          "pickbox_tree_chunk_bytes_missing",
                                          "pickbox_tree_writing")] for n in a}))
    w = writer.node_id
    h.ok(grew("pickbox_proposals_total", w, 5) and
         grew("pickbox_proposals_applied_total", w, 5) and
         grew("pickbox_proposal_duration_seconds_count", w, 5) and
         val(a[w], "pickbox_proposal_duration_seconds_sum") >
         val(b[w], "pickbox_proposal_duration_seconds_sum") and
         grew("pickbox_chunks_sent_total", w, 5),
         "the writer counts >= 5 proposals, their latencies, and the chunks it carried",
         repr([(k, val(b[w], k), val(a[w], k)) for k in (
             "pickbox_proposals_total", "pickbox_proposals_applied_total",
             "pickbox_proposal_duration_seconds_count", "pickbox_chunks_sent_total")]))
    ok_peers = True
    for n in a:
        others = {d.node_id for d in nodes} - {n}
        # The leader's links carry the entries; followers only talk to it.
        talked = others if n == leader_id else {leader_id}
        for fam in ("pickbox_peer_sent_bytes_total", "pickbox_peer_received_bytes_total"):
            pb_, pa = peers_of(b[n], fam), peers_of(a[n], fam)
            if set(pa) != others or any(pa[p] <= pb_.get(p, math.inf) for p in talked) or \
                    any(pa[p] < pb_.get(p, math.inf) for p in others):
                ok_peers = False
                h.diag("%s %s: before %r after %r" % (n, fam, pb_, pa))
        if set(peers_of(a[n], "pickbox_peer_up")) != others or \
                any(v != 1 for v in peers_of(a[n], "pickbox_peer_up").values()):
            ok_peers = False
    h.ok(ok_peers, "per-peer bytes (peer label) grow on every link to the leader %s" % leader_id)

    # Same content under a new name: its chunks are not carried again.
    dup_before = metrics(h, writer)
    th.write(os.path.join(writer.data_dir, "m/c-copy.bin"), files["m/c.bin"])
    th.wait_converged(nodes, 30, lambda t: "m/c-copy.bin" in t)
    dup_after = metrics(h, writer)
    h.ok(val(dup_after, "pickbox_chunks_deduplicated_total") >
         val(dup_before, "pickbox_chunks_deduplicated_total") and
         val(dup_after, "pickbox_chunks_sent_total") ==
         val(dup_before, "pickbox_chunks_sent_total"),
         "a copy of a file counts its chunks as deduplicated, not sent",
         repr([(k, val(dup_before, k), val(dup_after, k)) for k in (
             "pickbox_chunks_deduplicated_total", "pickbox_chunks_sent_total")]))

    # 11: a leader change.
    old = h.wait_leader(nodes)
    target = [d for d in nodes if d is not old][0]
    lb = {d.node_id: metrics(h, d) for d in nodes}
    r = h.ctl(old, "transfer", target.node_id)
    got = h.wait_leader(nodes)

    def moved():
        la = {d.node_id: metrics(h, d) for d in nodes}
        ok = all(val(la[n], "pickbox_raft_leader_changes_total") >
                 val(lb[n], "pickbox_raft_leader_changes_total") and
                 val(la[n], "pickbox_raft_term") > val(lb[n], "pickbox_raft_term") and
                 val(la[n], "pickbox_raft_leader") == (1 if n == target.node_id else 0)
                 for n in la)
        return la if ok else None
    try:
        wait_until(moved, 15, interval=0.1, what="metrics to show the new leader")
        h.ok(r.returncode == 0 and got is target,
             "transfer to %s: leader changes and term grow everywhere, "
             "pickbox_raft_leader is 1 on %s only" % (target.node_id, target.node_id))
    except HarnessError as e:
        h.ok(False, "leadership transfer shows in the metrics", str(e))

    # 12-15: bad HTTP clients.
    port = mports["n3"]
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow_t0 = time.monotonic()
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    garbage = raw_http(port, b"\x00\xffGARBAGE \x01\x02 nonsense\r\n\r\n")
    huge = raw_http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 +
                    b"\r\n\r\n")
    h.ok((garbage == b"" or garbage.startswith(b"HTTP/1.1 4")) and
         (huge == b"" or huge.startswith(b"HTTP/1.1 4")),
         "garbage and 64 KiB of headers get a 4xx or a closed connection",
         "garbage %r huge %r" % (garbage[:80], huge[:80]))
    st, hdr, _ = scrape_http(port, method="POST")
    h.ok(st == 405 and hdr.get("Allow") == "GET", "POST /metrics: 405 with Allow: GET",
         "%r %r" % (st, hdr))
    st404 = [scrape_http(port, path=p)[0] for p in ("/", "/metricsx", "/nope?x=1")]
    h.ok(st404 == [404, 404, 404], "other paths: 404", repr(st404))
    st, _, body = scrape_http(port, timeout=10)
    role = th.status(nodes[2]).get("role")
    h.ok(st == 200 and not parse(body)[2] and nodes[2].alive() and
         role in ("leader", "follower"),
         "with a stalled client connected, scrapes and status still answer",
         "status %r errors %r alive %r role %r" % (st, parse(body)[2][:5], nodes[2].alive(),
                                                  role))
    # The stalled client is dropped by the server's timeout (10 s).
    try:
        eof = slow.recv(4096)
    except (ConnectionResetError, socket.timeout) as e:
        eof = repr(e)
    waited = time.monotonic() - slow_t0
    slow.close()
    h.ok(eof == b"" and 5 <= waited < 30,
         "the stalled client is disconnected by the server after %.1f s" % waited, repr(eof))

    # 16: a metrics address in use stops startup, naming it.
    busy = "127.0.0.1:%d" % mports["n1"]
    lone = h.start_daemon("lone", args=["--metrics-listen", busy], ready=False)
    try:
        rc = lone.wait_exit(15)
    except HarnessError:
        rc = None
    h.ok(rc == 1 and ("metrics address %s" % busy) in lone.log_text() and
         "in use" in lone.log_text(),
         "metrics_listen on a busy port: exit 1 naming %s" % busy, lone.log_text()[-600:])

    # 17
    codes = [d.stop(timeout=20) for d in nodes]
    h.eq(codes, [0, 0, 0], "all stop cleanly (exit 0)")
