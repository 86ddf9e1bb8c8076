"""A symmetric network partition through the debug_partition test hook
(PICKBOX_TEST_HOOKS=1): the leader is cut off from both followers (the cut is
set at all three nodes). The isolated minority cannot commit (its probe fails
with TIMEOUT/NO_QUORUM/UNAVAILABLE), the majority elects a leader and goes
on; after healing, all nodes converge on the same commit/applied/last index
and term."""

import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, NO_COMMIT_CODES  # noqa: E402

ENV = {"PICKBOX_TEST_HOOKS": "1"}


def partition(h, a, b, on):
    """Cuts (on) or heals the link a<->b at both ends; returns the replies."""
    ra = a.request("debug_partition", {"node": b.node_id, "on": on})
    rb = b.request("debug_partition", {"node": a.node_id, "on": on})
    return ra, rb


with Harness("cluster-partition") as h:
    h.plan(10)
    nodes = h.start_cluster(3, env=ENV)
    h.ok(True, "3-node cluster formed with PICKBOX_TEST_HOOKS=1")
    x = h.wait_leader(nodes)
    res, _ = h.probe_until_ok(x)
    sts = h.wait_converged(nodes)
    majority = [d for d in nodes if d is not x]

    replies = []
    for m in majority:
        replies += partition(h, x, m, True)
    ok = all("result" in r for r in replies)
    xs = replies[0].get("result", {}).get("partitioned") if ok else None
    ok = ok and isinstance(xs, list) and majority[0].node_id in xs
    # The last reply from x lists both cut peers.
    last_x = replies[2].get("result", {}).get("partitioned") if ok else None
    h.ok(ok and sorted(last_x or []) == sorted(m.node_id for m in majority),
         "debug_partition isolates %s from %s (symmetric)" % (x.node_id,
                                                               [m.node_id for m in majority]),
         "replies %r" % replies)

    r = x.probe(timeout_s=2, timeout=8)
    code = (r.get("error") or {}).get("code")
    h.ok(code in NO_COMMIT_CODES, "a probe on the isolated %s fails (%s)" % (x.node_id, code),
         "reply %r" % r)

    new = h.wait_leader(majority, timeout=20, exclude=(x.node_id,))
    h.ok(new in majority, "the majority elects %s" % new.node_id)
    acked = []
    for i in range(10):
        res, _ = h.probe_until_ok(majority[i % 2], timeout=10)
        acked.append(res["index"])
    h.wait_applied(majority, max(acked))
    h.ok(len(acked) == 10, "10 probes commit on the majority (up to index %d)" % max(acked))

    stx = x.status()
    h.ok(stx["commit_index"] < max(acked),
         "the isolated node has not committed the majority's entries (commit %d, role %s)"
         % (stx["commit_index"], stx["role"]))

    replies = []
    for m in majority:
        replies += partition(h, x, m, False)
    last_x = replies[2].get("result", {}).get("partitioned")
    h.ok(all("result" in r for r in replies) and last_x == [],
         "debug_partition heals every link", "replies %r" % replies)

    sts = h.wait_converged(nodes, timeout=30)
    h.ok(sts[0]["commit_index"] >= max(acked),
         "after healing all nodes agree: commit/applied %d, last_index %d, term %d"
         % (sts[0]["commit_index"], sts[0]["last_index"], sts[0]["term"]))
    res, _ = h.probe_until_ok(x, timeout=20)
    h.wait_applied(nodes, res["index"])
    h.ok(True, "a probe through the formerly isolated node commits everywhere")
    codes = [d.stop(timeout=15) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly (exit 0)")
