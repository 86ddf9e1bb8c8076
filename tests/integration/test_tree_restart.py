#!/usr/bin/env python3
"""A follower restarted after changes were made while it was down catches up
(created, modified and deleted files); a file written into its tree while it
was down is proposed at restart and reaches the others; `sync` answers."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

with Harness("tree_restart") as h:
    h.plan(5)
    nodes = th.start_cluster(h, 3)
    n1, n2, n3 = nodes
    for name in ("keep.txt", "change.txt", "gone.txt"):
        th.write(os.path.join(n1.data_dir, name), name + "\n")
    th.wait_converged(nodes, 15, lambda t: len(t) == 3)
    r = n1.call("sync", {"timeout_s": 10})
    h.ok("result" in r, "sync answers on the leader", repr(r))

    # Stop n3 (whichever role), change things on a live node.
    live = [d for d in nodes if d is not n3]
    h.eq(n3.stop(), 0, "n3 stops cleanly")
    wait_until(lambda: any(th.status(d).get("role") == "leader" for d in live), 10,
               what="a leader among n1, n2")
    th.write(os.path.join(n1.data_dir, "change.txt"), "changed\n")
    os.unlink(os.path.join(n2.data_dir, "gone.txt"))
    th.write(os.path.join(n2.data_dir, "new.txt"), "new\n")
    th.write(os.path.join(n3.data_dir, "offline.txt"), "written while n3 was down\n")
    th.wait_converged(live, 15, lambda t: "gone.txt" not in t and "new.txt" in t and
                      t.get("change.txt", (0, 0))[1] == b"changed\n")

    secret = os.path.join(n1.state_dir, "secret")
    n3 = h.start_daemon("n3", args=th.FAST + ["--secret-file", secret], port=n3.port)
    nodes = [n1, n2, n3]

    def caught_up(t):
        return ("gone.txt" not in t and t.get("new.txt", (0, 0))[1] == b"new\n" and
                t.get("change.txt", (0, 0))[1] == b"changed\n" and
                t.get("offline.txt", (0, 0))[1] == b"written while n3 was down\n" and
                t.get("keep.txt", (0, 0))[1] == b"keep.txt\n")
    try:
        th.wait_converged(nodes, 20, caught_up)
        h.ok(True, "the restarted follower caught up and its offline edit reached everyone")
    except HarnessError as e:
        h.ok(False, "the restarted follower caught up", th.tree_diff(nodes) + "\n" + str(e))
    r = n3.call("sync", {"timeout_s": 10})
    h.ok("result" in r, "sync answers on the restarted node", repr(r))
    h.eq(th.status(n3).get("tree", {}).get("files"), 4, "status.tree.files on n3")
