"""kill -9 of the leader of a 3-node cluster with the DEFAULT timings
(heartbeat 100 ms, election timeout 1000 ms): a survivor commits a probe
within 3 s of the kill (cluster spec, default timing); the killed node,
restarted with the same command line, catches up."""

import os
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness  # noqa: E402

FAILOVER_LIMIT_S = 3.0

with Harness("cluster-failover") as h:
    h.plan(7)
    nodes = h.start_cluster(3, fast=False)
    h.ok(True, "3-node cluster formed with the default timings")
    old = h.wait_leader(nodes)
    res, _ = h.probe_until_ok(old, timeout=20)
    h.wait_applied(nodes, res["index"])
    h.ok(True, "a probe commits on the leader %s before the kill (index %d)"
         % (old.node_id, res["index"]))

    survivors = [d for d in nodes if d is not old]
    first_ok = []  # (seconds after the kill, node, result)
    lock = threading.Lock()
    stop = threading.Event()

    def prober(node, t0):
        # Keeps one probe in flight on node until some survivor has committed one.
        while not stop.is_set() and time.monotonic() - t0 < 15:
            r = node.probe(timeout_s=1, timeout=3)
            if "result" in r:
                with lock:
                    first_ok.append((time.monotonic() - t0, node.node_id, r["result"]))
                stop.set()
                return
            time.sleep(0.01)  # pacing between failed attempts only

    t0 = time.monotonic()
    old.kill9()
    threads = [threading.Thread(target=prober, args=(d, t0)) for d in survivors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    first_ok.sort()
    if first_ok:
        took, who, r = first_ok[0]
        h.diag("first commit after the kill: %.3f s on %s (index %d)" % (took, who, r["index"]))
        h.ok(took <= FAILOVER_LIMIT_S and r["index"] > res["index"],
             "a survivor commits a probe %.2f s after kill -9 of the leader (<= %.1f s)"
             % (took, FAILOVER_LIMIT_S))
    else:
        h.ok(False, "a survivor commits a probe within %.1f s of kill -9 of the leader"
             % FAILOVER_LIMIT_S, "no probe committed within 15 s")

    new = h.wait_leader(survivors, exclude=(old.node_id,))
    h.ok(new is not old, "the survivors agree on a new leader %s" % new.node_id)

    old.restart()
    sts = h.wait_converged(nodes, keys=("commit_index", "applied_index"), timeout=30)
    h.ok(sts[nodes.index(old)]["applied_index"] == sts[0]["applied_index"],
         "the restarted %s catches up (applied_index %d on all)"
         % (old.node_id, sts[0]["applied_index"]))
    res2, _ = h.probe_until_ok(old, timeout=20)
    h.wait_applied(nodes, res2["index"])
    h.ok(True, "a probe through the restarted node commits and is applied everywhere")
    codes = [d.stop(timeout=15) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly")
