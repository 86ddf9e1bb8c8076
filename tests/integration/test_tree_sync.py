#!/usr/bin/env python3
"""`pickboxctl sync` means every reachable node (issue 5, item 8).

On a 3-node cluster:
- sync on a follower returns only once every node has applied what was
  committed: right after it returns, the file written on the leader is in
  all three trees and every node's applied index is at least the one sync
  answered;
- `status` and `members` show each member's applied_index;
- a member cut off by the debug_partition hook is not waited for, and sync
  on that member itself times out (it knows no leader, so not what is
  committed);
- a member that is connected but stopped (SIGSTOP, so it applies nothing) is
  waited for: sync times out with an error naming it; after SIGCONT, sync
  returns and the node has the file.
"""

import json
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

ENV = {"PICKBOX_TEST_HOOKS": "1"}


def committed_on(d, path, data, files):
    """The file is in d's tree and d's index holds `files` files (its op
    committed and applied there)."""
    try:
        with open(os.path.join(d.data_dir, path), "rb") as f:
            if f.read() != data:
                return False
    except OSError:
        return False
    t = th.status(d).get("tree", {})
    return t.get("files") == files and t.get("pending") == 0


def has(d, path, data):
    try:
        with open(os.path.join(d.data_dir, path), "rb") as f:
            return f.read() == data
    except OSError:
        return False


with Harness("tree_sync") as h:
    h.plan(10)
    nodes = th.start_cluster(h, 3, env=ENV)
    n1, n2, n3 = nodes
    leader = h.wait_leader(nodes)
    followers = [d for d in nodes if d is not leader]
    h.ok(True, "3-node cluster, leader %s" % leader.node_id)

    # 1. sync on a follower waits for every node.
    th.write(os.path.join(leader.data_dir, "one.txt"), "one\n")
    wait_until(lambda: committed_on(leader, "one.txt", b"one\n", 1), 15,
               what="one.txt to commit on the leader")
    t0 = time.monotonic()
    r = h.ctl(followers[0], "--json", "-t", "20", "sync")
    dt = (time.monotonic() - t0) * 1000
    present = [d.node_id for d in nodes if has(d, "one.txt", b"one\n")]
    idx = json.loads(r.stdout or "{}").get("index") if r.returncode == 0 else None
    applied = [th.status(d).get("applied_index", 0) for d in nodes]
    h.ok(r.returncode == 0 and present == [d.node_id for d in nodes] and idx is not None and
         all(a >= idx for a in applied),
         "sync on follower %s returns once all trees hold one.txt (index %s, applied %s)"
         % (followers[0].node_id, idx, applied),
         "rc %d out %r err %r present %r" % (r.returncode, r.stdout, r.stderr, present))
    h.diag("sync on a follower right after a commit took %.0f ms" % dt)

    # 2. applied_index per member in status and members.
    st = th.status(followers[1])
    ms = st.get("members", [])
    h.ok(len(ms) == 3 and all(isinstance(m.get("applied_index"), int) for m in ms),
         "status lists every member's applied_index: %r"
         % [(m.get("id"), m.get("applied_index")) for m in ms])
    r = h.ctl(leader, "members")
    h.ok(r.returncode == 0 and "APPLIED" in r.stdout,
         "pickboxctl members has an applied column", "out %r" % r.stdout)

    # 3. A partitioned member is not waited for.
    th.cut(n3, n1, True)
    th.cut(n3, n2, True)
    maj_leader = h.wait_leader([n1, n2], timeout=20)
    th.write(os.path.join(maj_leader.data_dir, "two.txt"), "two\n")
    wait_until(lambda: committed_on(maj_leader, "two.txt", b"two\n", 2), 15,
               what="two.txt to commit on the majority")
    r = maj_leader.request("sync", {"timeout_s": 10}, timeout=20)
    h.ok("result" in r and not has(n3, "two.txt", b"two\n"),
         "sync while n3 is cut off returns without it (%r)" % r)
    wait_until(lambda: th.status(n3).get("leader_id") is None, 20,
               what="n3 to lose its leader")
    r = n3.request("sync", {"timeout_s": 1}, timeout=20)
    err = r.get("error") or {}
    h.ok(err.get("code") == "TIMEOUT" and "no leader" in err.get("message", ""),
         "sync on the cut-off n3 times out: it cannot know what is committed (%r)"
         % err.get("message"), "reply %r" % r)
    th.cut(n3, n1, False)
    th.cut(n3, n2, False)
    wait_until(lambda: has(n3, "two.txt", b"two\n"), 20, what="n3 to catch up after healing")

    # 4. A connected but stopped member is waited for.
    slow = [d for d in nodes if th.status(d).get("role") != "leader"][0]
    asker = th.status(slow).get("leader_id")
    asker = [d for d in nodes if d.node_id == asker][0]
    wait_until(lambda: all(m.get("reachable") for m in th.status(asker).get("members", [])), 20,
               what="every link up again")
    slow.signal(signal.SIGSTOP)
    try:
        th.write(os.path.join(asker.data_dir, "three.txt"), "three\n")
        wait_until(lambda: committed_on(asker, "three.txt", b"three\n", 3), 15,
                   what="three.txt to commit")
        r = asker.request("sync", {"timeout_s": 2}, timeout=20)
        err = r.get("error") or {}
        h.ok(err.get("code") == "TIMEOUT" and slow.node_id in err.get("message", ""),
             "sync waits for the stopped %s and times out naming it: %r"
             % (slow.node_id, err.get("message")), "reply %r" % r)
    finally:
        slow.signal(signal.SIGCONT)
    r = asker.request("sync", {"timeout_s": 20}, timeout=30)
    h.ok("result" in r and has(slow, "three.txt", b"three\n"),
         "after SIGCONT, sync returns and %s holds three.txt" % slow.node_id, "reply %r" % r)
    r = h.ctl(slow, "-t", "20", "sync")
    h.ok(r.returncode == 0 and all(has(d, "three.txt", b"three\n") for d in nodes),
         "pickboxctl sync on %s (exit 0): every tree holds three.txt" % slow.node_id,
         "rc %d out %r err %r" % (r.returncode, r.stdout, r.stderr))
    codes = [d.stop(timeout=15) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly")
