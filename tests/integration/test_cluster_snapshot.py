"""Catch-up through a snapshot: with PICKBOX_TEST_SNAPSHOT_EVERY=50 the nodes
compact their logs every 50 applied entries. A follower is stopped, a few
hundred probes commit without it (the leader's snapshot_index passes the
stopped node's last index, so the entries it lacks are gone from the log),
and the restarted follower catches up: its snapshot_index advances and its
applied_index equals the others'."""

import os
import sys
import threading

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness  # noqa: E402

PROBES = 300
THREADS = 6
ENV = {"PICKBOX_TEST_SNAPSHOT_EVERY": "50"}

with Harness("cluster-snapshot") as h:
    h.plan(9)
    nodes = h.start_cluster(3, env=ENV)
    h.ok(True, "3-node cluster formed with PICKBOX_TEST_SNAPSHOT_EVERY=50")
    leader = h.wait_leader(nodes)
    lagger = [d for d in nodes if d is not leader][0]
    for _ in range(5):
        h.probe_until_ok(leader)
    sts = h.wait_converged(nodes)
    before = sts[nodes.index(lagger)]
    h.eq(lagger.stop(timeout=15), 0, "follower %s stops (last_index %d, snapshot_index %r)"
         % (lagger.node_id, before["last_index"], before.get("snapshot_index")))

    live = [d for d in nodes if d is not lagger]
    acked = []
    failed = []
    lock = threading.Lock()

    def worker(k):
        for i in range(PROBES // THREADS):
            node = live[(k + i) % len(live)]
            r = node.probe(size=128, timeout_s=5)
            with lock:
                (acked if "result" in r else failed).append(r)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    h.ok(len(acked) == PROBES and not failed,
         "%d probes commit on the two live nodes while %s is down" % (PROBES, lagger.node_id),
         "acked %d, failed %d, e.g. %r" % (len(acked), len(failed), failed[:3]))

    def compacted(sts):
        return all(st is not None and (st.get("snapshot_index") or 0) > before["last_index"]
                   for st in sts) and sts
    sts = h._poll(live, compacted, 30, "the live nodes to snapshot past %d" % before["last_index"])
    h.ok(True, "the live nodes compacted past the stopped node's last index (snapshot_index %s > %d)"
         % ([st["snapshot_index"] for st in sts], before["last_index"]))

    lagger.restart()
    sts = h.wait_converged(nodes, keys=("commit_index", "applied_index"), timeout=60)
    after = sts[nodes.index(lagger)]
    h.ok(after["applied_index"] == sts[0]["applied_index"]
         and after["applied_index"] >= before["last_index"] + PROBES,
         "restarted %s catches up: applied_index %d on all"
         % (lagger.node_id, after["applied_index"]))
    h.ok((after.get("snapshot_index") or 0) > before["last_index"],
         "its snapshot_index advanced (%r -> %r) past its old last index %d"
         % (before.get("snapshot_index"), after.get("snapshot_index"), before["last_index"]))

    res, _ = h.probe_until_ok(lagger)
    h.wait_applied(nodes, res["index"])
    h.ok(True, "a probe through the caught-up node commits and is applied everywhere")
    sts = h.wait_converged(nodes)
    h.ok(True, "all three agree on commit/applied/last index and term (%d)"
         % sts[0]["commit_index"])
    codes = [d.stop(timeout=15) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly (exit 0)")
