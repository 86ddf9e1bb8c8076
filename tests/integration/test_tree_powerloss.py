#!/usr/bin/env python3
"""A power loss that rolls state.db back (doc/decisions.md D8): batches of
probes commit state.db lazily, so after a power loss state.db may hold an
earlier applied index; the node replays the rest from raft.db's log.

Simulated on one node: a consistent copy of state.db is taken at applied
index X, more is committed, the node is killed with -9, state.db is replaced
by the copy (its -wal and -shm removed, as after a reboot that lost them), and
the node restarts. First only probes follow X (what lazy commits can lose),
then files too (which they cannot: batches with ops stay durable, but even
then the node must converge). Each time the applied index must come back past
where it was, the tree must be exactly what it was, with no conflict copy,
and the node must go on replicating."""

import os
import re
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402


def save_statedb(node, dest):
    """A consistent copy of the running node's state.db (SQLite's backup)."""
    src = sqlite3.connect("file:%s?mode=ro" % os.path.join(node.state_dir, "state.db"),
                          uri=True, timeout=10)
    dst = sqlite3.connect(dest)
    src.backup(dst)
    applied = dst.execute("SELECT idx FROM applied WHERE id = 1").fetchone()[0]
    dst.close()
    src.close()
    return applied


def power_loss(node, saved):
    """kill -9, then state.db goes back to the saved copy."""
    node.kill9()
    db = os.path.join(node.state_dir, "state.db")
    with open(saved, "rb") as f:
        data = f.read()
    with open(db, "wb") as f:
        f.write(data)
    for suffix in ("-wal", "-shm"):
        try:
            os.unlink(db + suffix)
        except FileNotFoundError:
            pass


def applied(node):
    return th.status(node).get("applied_index", 0)


def conflict_copies(tree):
    return sorted(p for p in tree if "pickbox-conflict" in p)


def check_after(h, node, what, before_tree, before_applied, saved_applied, log_start):
    restarted = node.log_text()[log_start:]
    h.ok(re.search(r"applied %d\b" % saved_applied, restarted) is not None,
         "%s: the node restarted from the rolled-back state.db (applied %d)"
         % (what, saved_applied), restarted[-2000:])
    try:
        wait_until(lambda: applied(node) >= before_applied, 20,
                   what="the applied index to pass %d again" % before_applied)
        h.ok(True, "%s: the entries after the rollback were applied again" % what)
    except HarnessError as e:
        h.ok(False, "%s: the entries after the rollback were applied again" % what, str(e))
    try:
        wait_until(lambda: th.snapshot_tree(node.data_dir) == before_tree and
                   th.status(node).get("tree", {}).get("files") == len(
                       [v for v in before_tree.values() if v[0] == "f"]), 20,
                   what="the tree and the index to match")
        h.ok(True, "%s: the tree and the index are what they were" % what)
    except HarnessError:
        h.ok(False, "%s: the tree and the index are what they were" % what,
             "before %r\nnow    %r\nstatus %r" % (before_tree, th.snapshot_tree(node.data_dir),
                                                 th.status(node).get("tree")))
    tree = th.snapshot_tree(node.data_dir)
    h.eq(conflict_copies(tree), [], "%s: no conflict copy in the tree" % what)
    h.eq(th.status(node).get("tree", {}).get("conflicts"), 0,
         "%s: no conflict counted in the index" % what)


with Harness("tree_powerloss") as h:
    h.plan(13)
    (n1,) = th.start_cluster(h, 1)
    th.write(os.path.join(n1.data_dir, "a.txt"), "alpha\n")
    os.mkdir(os.path.join(n1.data_dir, "d"))
    th.write(os.path.join(n1.data_dir, "d", "b.txt"), "beta\n")
    wait_until(lambda: th.status(n1).get("tree", {}).get("files") == 2, 20,
               what="the two files in the index")
    h.ok("result" in n1.call("sync", {"timeout_s": 10}), "sync answers")

    # 1. Only probes after X: the realistic case.
    saved = os.path.join(h.tmpdir, "state.db.saved")
    x = save_statedb(n1, saved)
    for _ in range(40):
        r = n1.probe(size=64)
        if "result" not in r:
            break
    h.ok("result" in r, "40 probes committed after the copy", repr(r))
    before_applied = applied(n1)
    before_tree = th.snapshot_tree(n1.data_dir)
    log_start = len(n1.log_text())
    power_loss(n1, saved)
    n1.restart()
    check_after(h, n1, "probes lost", before_tree, before_applied, x, log_start)

    # 2. Files after X as well (stronger than what lazy commits allow).
    x = save_statedb(n1, saved)
    th.write(os.path.join(n1.data_dir, "a.txt"), "alpha, edited\n")
    th.write(os.path.join(n1.data_dir, "d", "c.txt"), "gamma\n")
    os.unlink(os.path.join(n1.data_dir, "d", "b.txt"))
    wait_until(lambda: th.status(n1).get("tree", {}).get("files") == 2 and
               applied(n1) >= x + 3, 20, what="the changes in the index")
    h.ok("result" in n1.call("sync", {"timeout_s": 10}), "sync answers after the changes")
    for _ in range(10):
        n1.probe(size=64)
    before_applied = applied(n1)
    before_tree = th.snapshot_tree(n1.data_dir)
    log_start = len(n1.log_text())
    power_loss(n1, saved)
    n1.restart()
    check_after(h, n1, "files lost", before_tree, before_applied, x, log_start)
