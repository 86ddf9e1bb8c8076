#!/usr/bin/env python3
"""Catch-up of a tree by snapshot, where only missing chunk bytes travel
(issue 5 item 7, doc/fsm.md "Snapshots").

Three nodes compact every 100 applied entries (PICKBOX_TEST_SNAPSHOT_EVERY).
About 20 MiB of files are replicated; n3 stops; 1,000+ changes (small files
created, edited, renamed, deleted) commit without it while the 20 MiB stay
untouched, and the live nodes compact past n3's log. n3 restarts, installs a
snapshot (metadata only) and fetches from its peers only the chunk bytes it
lacks: every tree ends identical (SHA-256 of every file) and n3's counters
show far less than 20 MiB fetched. Then n3's state.db loses the bytes of the
big files (and its tree the files): they come back from the peers.
"""

import hashlib
import os
import re
import sqlite3
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

ENV = {"PICKBOX_TEST_SNAPSHOT_EVERY": "100"}
BIG_FILES = 20
BIG_SIZE = 1024 * 1024
SMALL = 500
MIB = 1024 * 1024


def hashes(root):
    """{relative path: sha256 hex | "dir" | "link:target"} without .pickbox."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == "" and ".pickbox" in dirnames:
            dirnames.remove(".pickbox")
        for name in dirnames:
            out[os.path.join(rel_dir, name)] = "dir"
        for name in filenames:
            if name.startswith(".pickbox.tmp."):
                continue
            p = os.path.join(dirpath, name)
            try:
                with open(p, "rb") as f:
                    out[os.path.join(rel_dir, name)] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                pass
    return out


def wait_same(nodes, pred, timeout, what):
    last = [None]

    def check():
        hs = [hashes(d.data_dir) for d in nodes]
        last[0] = hs
        return all(x == hs[0] for x in hs[1:]) and pred(hs[0]) and hs[0]
    try:
        return wait_until(check, timeout, interval=0.5, what=what)
    except HarnessError as e:
        hs = last[0] or [{}]
        keys = sorted(set().union(*hs))
        diff = ["%s: %s" % (k, [x.get(k, "-")[:8] for x in hs])
                for k in keys if any(x.get(k) != hs[0].get(k) for x in hs)]
        raise HarnessError("%s\n%s" % (e, "\n".join(diff[:30])))


def tree_status(d):
    return th.status(d).get("tree", {})


def wait_live(live, pred, what, timeout=180):
    """Generous: the 500 small files took more than 60 s on a loaded 2-core
    machine, with the two live nodes going through elections."""
    wait_same(live, pred, timeout, what)


with Harness("tree-catchup") as h:
    h.plan(9)
    # The default timing: 20 entries of 1 MiB each keep leaders busy for long
    # enough on a loaded machine that FAST's 300 ms led to minutes of
    # elections (see treeharness.DEFAULT_TIMING).
    nodes = th.start_cluster(h, 3, env=ENV, timing=th.DEFAULT_TIMING)
    n1, n2, n3 = nodes
    big = {}
    # The 20 MiB go in batches of 4 files, each replicated before the next is
    # written, with generous deadlines. Written at once, on a loaded 2-core
    # machine under ASan, they did not reach every node in 300 s: once the
    # writer was no longer the leader, its forwards of 1 MiB entries were
    # retried every second while earlier copies still filled the link's
    # queue (ENOBUFS) and the leader's log (duplicates).
    for first in range(0, BIG_FILES, 4):
        for i in range(first, min(first + 4, BIG_FILES)):
            data = os.urandom(BIG_SIZE)
            rel = "big/blob%02d.bin" % i
            big[rel] = hashlib.sha256(data).hexdigest()
            th.write(os.path.join(n1.data_dir, rel), data, "wb")
        t = wait_same(nodes, lambda t: all(t.get(k) == v for k, v in big.items()), 120,
                      "%d MiB to reach every node" % len(big))
    h.ok(True, "%d MiB in %d files replicated to all three nodes" % (BIG_FILES * BIG_SIZE // MIB,
                                                                     BIG_FILES))

    applied_before = th.status(n3).get("applied_index", 0)
    last_before = th.status(n3).get("last_index", 0)
    h.eq(n3.stop(timeout=15), 0, "n3 stops (applied %d)" % applied_before)
    live = [n1, n2]
    wait_until(lambda: any(th.status(d).get("role") == "leader" for d in live), 15,
               what="a leader among n1, n2")

    # 1,000+ changes on the live nodes, the 20 MiB untouched.
    for i in range(SMALL):
        th.write(os.path.join(n1.data_dir, "small/d%d/f%03d.txt" % (i % 10, i)),
                 "small file %d\n" % i)
    wait_live(live, lambda t: sum(1 for k in t if k.startswith("small/d")) >= SMALL + 10,
              "the small files on n1, n2")
    for i in range(400):
        th.write(os.path.join(n1.data_dir, "small/d%d/f%03d.txt" % (i % 10, i)),
                 "edited %d %s\n" % (i, "x" * (i % 50)))
    want_edit = hashlib.sha256(("edited %d %s\n" % (399, "x" * (399 % 50))).encode()).hexdigest()
    wait_live(live, lambda t: t.get("small/d9/f399.txt") == want_edit, "the edits")
    for i in range(400, 500):
        os.rename(os.path.join(n2.data_dir, "small/d%d/f%03d.txt" % (i % 10, i)),
                  os.path.join(n2.data_dir, "small/d%d/r%03d.txt" % (i % 10, i)))
    wait_live(live, lambda t: "small/d9/r499.txt" in t and "small/d9/f499.txt" not in t,
              "the renames")
    for i in range(0, 150):
        os.unlink(os.path.join(n1.data_dir, "small/d%d/f%03d.txt" % (i % 10, i)))
    wait_live(live, lambda t: "small/d9/f149.txt" not in t and "small/d0/f150.txt" in t,
              "the deletes")
    st1 = th.status(n1)
    changes = st1.get("applied_index", 0) - applied_before
    h.ok(changes >= 1000, "%d entries committed while n3 was down" % changes)

    def compacted(sts):
        return all(st is not None and (st.get("snapshot_index") or 0) > last_before
                   for st in sts) and sts
    h._poll(live, compacted, 60, "the live nodes to compact past %d" % last_before)
    h.ok(True, "the live nodes compacted past n3's last index %d" % last_before)

    secret = os.path.join(n1.state_dir, "secret")
    n3 = h.start_daemon("n3", args=th.DEFAULT_TIMING + ["--secret-file", secret], port=n3.port,
                        env=ENV)
    nodes = [n1, n2, n3]
    try:
        final = wait_same(nodes, lambda t: "small/d9/f149.txt" not in t and
                          t.get("small/d9/f399.txt") == want_edit and "small/d9/r499.txt" in t,
                          120, "n3 to catch up")
        h.ok(all(final.get(k) == v for k, v in big.items()),
             "n3 caught up: all trees identical (%d paths, SHA-256 of every file)" % len(final))
    except HarnessError as e:
        h.ok(False, "n3 caught up", str(e))
    st3 = th.status(n3)
    m = re.search(r"installed snapshot at index \d+ \(term \d+, (\d+) bytes\)", n3.log_text())
    size = int(m.group(1)) if m else -1
    h.ok((st3.get("snapshot_index") or 0) > last_before and 0 < size < MIB,
         "n3 installed a snapshot of %d bytes (metadata only, not the 20 MiB; snapshot_index %r)"
         % (size, st3.get("snapshot_index")))
    wait_until(lambda: tree_status(n3).get("chunks_missing") == 0, 30,
               what="n3 to have every chunk")
    ts = tree_status(n3)
    fetched = ts.get("fetched_bytes", -1)
    h.ok(0 < fetched < 2 * MIB and n3.log_has("chunk fetch: complete"),
         "n3 fetched %d bytes in %d chunks from peers (the 20 MiB stayed; no chunk missing)"
         % (fetched, ts.get("fetched_chunks", -1)), repr(ts))

    # n3 loses the bytes of the big files (and the files): the peers have them.
    h.eq(n3.stop(timeout=15), 0, "n3 stops again")
    db = sqlite3.connect(os.path.join(n3.state_dir, "state.db"))
    with db:
        db.execute("DELETE FROM chunk_data")
        db.execute("DELETE FROM disk WHERE path >= CAST('big/' AS BLOB) "
                   "AND path < CAST('big0' AS BLOB)")
    db.close()
    for rel in big:
        os.unlink(os.path.join(n3.data_dir, rel))
    n3 = h.start_daemon("n3", args=th.DEFAULT_TIMING + ["--secret-file", secret], port=n3.port,
                        env=ENV)
    nodes = [n1, n2, n3]
    try:
        final = wait_same(nodes, lambda t: all(t.get(k) == v for k, v in big.items()), 300,
                          "n3's big files to come back")
        wait_until(lambda: tree_status(n3).get("chunks_missing") == 0, 30,
                   what="n3 to have every chunk")
        ts = tree_status(n3)
        h.ok(ts.get("fetched_bytes", 0) >= BIG_FILES * BIG_SIZE,
             "n3's wiped chunk bytes came from the peers (%d bytes fetched), trees identical"
             % ts.get("fetched_bytes", 0), repr(ts))
    except HarnessError as e:
        h.ok(False, "n3's wiped chunk bytes came from the peers", str(e))
    for d in nodes:
        d.stop(timeout=15)
