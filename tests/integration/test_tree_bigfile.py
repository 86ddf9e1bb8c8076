#!/usr/bin/env python3
"""A big file on a 3-node cluster (issue 5: "a 1 GiB file neither stalls
heartbeats nor needs 1 GiB of memory"; "a 10-byte change inside a 256 MiB
file sends under 1 MiB").

A 256 MiB file of random bytes written on a follower reaches every tree with
the same SHA-256; the term does not change meanwhile (no election: heartbeats
were never late enough); every pickboxd's peak RSS (VmHWM) stays under a
bound; then 10 bytes changed in its middle travel as under 1 MiB of entries
proposed by the writer (status.tree.proposed_bytes: the bytes of every entry
the node proposed, CHUNKS and PUT, counted once each).

PICKBOX_BIGFILE_MIB changes the size (e.g. 32 under the sanitizers). The RSS
bound (PICKBOX_BIGFILE_RSS_MIB, default 320) is what a node should need at
most while the file travels: the writer's proposal (REPLICA_INFLIGHT_BYTES
plus a few 4 MiB slices, ~26 MiB), peer bulk queues (16 MiB per peer), the
Raft log in memory (entries since the last compaction, at most
CLUSTER_SNAPSHOT_BYTES = 64 MiB, plus 128 trailing entries of ~512 KiB of
chunks each, ~80 MiB), SQLite caches and the rest (~40 MiB): ~250 MiB.
Today's snapshots hold every chunk of state.db in memory (the file's 256 MiB
at the end, built on the loop): while they do (a snapshot larger than a
quarter of the file is seen in the logs), the absolute bound is reported as
TODO, not a failure. An election while the file travels is a failure (snapshots
carry no chunk bytes and big files are written off the Raft ready cycle), except
on a machine loaded beyond twice its cores, where it is a TODO.
The writer's excess over the other nodes, which is this proposal's doing, is
always checked.
Without the streaming proposal the writer queued the whole file as entries
(+256 MiB) on top of everything else.

tests/bench/bigfile-bench.py runs the same scenario (any size) and prints the
figures; it imports scenario() from here.
"""

import hashlib
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

MIB = 1024 * 1024
# The daemon's defaults (nodeconf.h), not treeharness.FAST's 300 ms: the claim
# is about heartbeats under the configuration people run.
DEFAULT_TIMEOUTS = ["--election-timeout-ms", "1000", "--heartbeat-ms", "100"]


def start_cluster(h, n):
    """treeharness.start_cluster() with the default timeouts."""
    nodes = [h.start_daemon("n1", args=DEFAULT_TIMEOUTS)]
    wait_until(lambda: th.status(nodes[0]).get("role") == "leader", 10, what="n1 to lead")
    secret = os.path.join(nodes[0].state_dir, "secret")
    wait_until(lambda: os.path.exists(secret), 5, what="n1's secret")
    for i in range(2, n + 1):
        nodes.append(h.start_daemon("n%d" % i, args=DEFAULT_TIMEOUTS + [
            "--join", "127.0.0.1:%d" % nodes[0].port, "--secret-file", secret]))
    for d in nodes:
        wait_until(lambda d=d: th.member_ok(d, n), 30, what="%s to be a member" % d.node_id)
    return nodes


def vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 * MIB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_random(d, rel, size):
    """Writes size random bytes (4 MiB at a time) next to d's tree and renames
    them to rel in it (one event, as a finished download); returns the SHA-256."""
    h = hashlib.sha256()
    tmp = os.path.join(d.dir, "bigfile.part")
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            b = os.urandom(min(left, 4 * MIB))
            h.update(b)
            f.write(b)
            left -= len(b)
    os.rename(tmp, os.path.join(d.data_dir, rel))
    return h.hexdigest()


class Sampler(threading.Thread):
    """Polls every node's status: terms seen, slowest status reply (a blocked
    event loop answers late), largest last_contact_ms the leader reports."""

    def __init__(self, nodes):
        super().__init__(daemon=True)
        self.nodes = nodes
        self.stop_ev = threading.Event()
        self.terms = {d.node_id: set() for d in nodes}
        self.slowest = {d.node_id: 0.0 for d in nodes}
        self.max_contact = 0

    def run(self):
        while not self.stop_ev.is_set():
            for d in self.nodes:
                t0 = time.monotonic()
                st = th.status(d)
                dt = time.monotonic() - t0
                self.slowest[d.node_id] = max(self.slowest[d.node_id], dt)
                if "term" in st:
                    self.terms[d.node_id].add(st["term"])
                if st.get("role") == "leader":
                    for m in st.get("members", []):
                        lc = m.get("last_contact_ms")
                        if not m.get("self") and isinstance(lc, int):
                            self.max_contact = max(self.max_contact, lc)
            self.stop_ev.wait(0.1)

    def stop(self):
        self.stop_ev.set()
        self.join(10)


def converged(nodes, rel, size, digest):
    for d in nodes:
        p = os.path.join(d.data_dir, rel)
        try:
            if os.stat(p).st_size != size:
                return False
        except OSError:
            return False
    return all(file_sha256(os.path.join(d.data_dir, rel)) == digest for d in nodes)


def proposed_bytes(d):
    return th.status(d).get("tree", {}).get("proposed_bytes")


def scenario(h, size, timeout):
    """Runs the scenario with a file of size bytes; returns the figures."""
    fig = {}
    nodes = start_cluster(h, 3)
    wait_until(lambda: all(th.status(d).get("leader_id") for d in nodes), 20,
               what="a leader everywhere")
    leader_id = th.status(nodes[0]).get("leader_id")
    writer = next(d for d in nodes if d.node_id != leader_id)
    fig["leader"], fig["writer"] = leader_id, writer.node_id
    terms0 = {d.node_id: th.status(d).get("term") for d in nodes}
    s = Sampler(nodes)
    s.start()
    rel = "big.bin"
    t0 = time.monotonic()
    digest = write_random(writer, rel, size)
    fig["write_s"] = time.monotonic() - t0
    try:
        wait_until(lambda: converged(nodes, rel, size, digest), timeout, interval=0.5,
                   what="the big file in every tree")
        fig["converged"] = True
    except HarnessError:
        fig["converged"] = False
    fig["transfer_s"] = time.monotonic() - t0
    s.stop()
    terms1 = {d.node_id: th.status(d).get("term") for d in nodes}
    fig["terms_before"], fig["terms_after"] = terms0, terms1
    fig["terms_seen"] = {k: sorted(v) for k, v in s.terms.items()}
    fig["term_changes"] = max(len(v) for v in s.terms.values()) - 1 if s.terms else 0
    fig["slowest_status_s"] = s.slowest
    fig["max_last_contact_ms"] = s.max_contact
    fig["hwm_mib"] = {d.node_id: vm_hwm_kib(d.pid) / 1024.0 for d in nodes}
    fig["snapshot_index"] = {d.node_id: th.status(d).get("snapshot_index") for d in nodes}

    # 10 bytes in the middle, in place.
    before = proposed_bytes(writer)
    path = os.path.join(writer.data_dir, rel)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"0123456789")
    digest2 = file_sha256(path)
    t1 = time.monotonic()
    try:
        wait_until(lambda: converged(nodes, rel, size, digest2), timeout, interval=0.5,
                   what="the 10-byte change in every tree")
        fig["edit_converged"] = True
    except HarnessError:
        fig["edit_converged"] = False
    fig["edit_s"] = time.monotonic() - t1
    after = proposed_bytes(writer)
    fig["edit_bytes"] = after - before if isinstance(after, int) and isinstance(before, int) \
        else None
    fig["hwm_end_mib"] = {d.node_id: vm_hwm_kib(d.pid) / 1024.0 for d in nodes}
    fig["snapshot_max_bytes"] = max(snapshot_max_bytes(d) for d in nodes)
    fig["materialize_ms"] = {d.node_id: [int(m) for m in re.findall(
        r"materialized \S+: \d+ bytes in (\d+) ms", d.log_text())] for d in nodes}
    fig["snapshots"] = {d.node_id: len(re.findall(r"snapshot at index", d.log_text()))
                        for d in nodes}
    return fig


def snapshot_max_bytes(d):
    """Largest state machine snapshot the node took (from its log), 0 if none."""
    sizes = [int(m) for m in re.findall(r"snapshot at index \d+ \(term \d+, (\d+) bytes\)",
                                        d.log_text())]
    return max(sizes) if sizes else 0


def ok_or_todo(h, cond, desc, todo):
    """ok, or, where todo names a known cause that is not this change's, a
    TAP TODO (reported, not counted as a failure). Never XPASS: passing is
    plain ok."""
    if cond or not todo:
        return h.ok(cond, desc)
    h._n += 1
    print("not ok %d - %s # TODO %s" % (h._n, desc, todo), flush=True)
    return False


def main():
    size = int(os.environ.get("PICKBOX_BIGFILE_MIB", "256")) * MIB
    bound = float(os.environ.get("PICKBOX_BIGFILE_RSS_MIB", "320"))
    with Harness("tree_bigfile") as h:
        h.plan(7)
        fig = scenario(h, size, 600)
        h.diag("figures: %r" % (fig,))
        snap_chunks = fig["snapshot_max_bytes"] > size // 4
        h.ok(fig["converged"], "a %d MiB file written on %s reaches every tree with the same "
             "SHA-256 (%.1f s)" % (size // MIB, fig["writer"], fig["transfer_s"]))
        ok_or_todo(h, fig["terms_before"] == fig["terms_after"] and fig["term_changes"] == 0,
                   "no election while it travels (terms %r -> %r)"
                   % (fig["terms_before"], fig["terms_after"]),
                   # a machine loaded far beyond its cores (make check -j with
                   # other suites) misses heartbeats with no big file at all
                   "load %.1f on %d cores" % (os.getloadavg()[0], os.cpu_count() or 1)
                   if os.getloadavg()[0] > 2 * (os.cpu_count() or 1) else None)
        others = [v for k, v in fig["hwm_mib"].items() if k != fig["writer"]]
        excess = fig["hwm_mib"][fig["writer"]] - max(others)
        h.ok(excess < 64, "the writer's peak RSS exceeds the other nodes' by under 64 MiB "
             "(%.0f MiB): its proposal is bounded, not the file's size" % excess)
        worst = max(fig["hwm_mib"].values())
        ok_or_todo(h, worst < bound, "peak RSS of every pickboxd under %.0f MiB (%s)"
                   % (bound, ", ".join("%s %.0f" % kv for kv in sorted(fig["hwm_mib"].items()))),
                   "snapshots hold every chunk in memory (largest %d bytes)"
                   % fig["snapshot_max_bytes"] if snap_chunks else None)
        h.ok(fig["edit_converged"], "10 bytes changed in its middle reach every tree")
        eb = fig["edit_bytes"]
        h.ok(eb is not None and 0 < eb < MIB,
             "the change proposed under 1 MiB of entries (%r bytes)" % (eb,))
        worst = max(fig["hwm_end_mib"].values())
        ok_or_todo(h, worst < bound, "peak RSS still under %.0f MiB after the change" % bound,
                   "snapshots hold every chunk in memory" if snap_chunks else None)


if __name__ == "__main__":
    main()
