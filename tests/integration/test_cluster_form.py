"""Clusters of 1, 3 and 5 nodes form through --join (cluster spec, life
cycle): every node reports the same leader and cluster_id, the members list
holds every node as a voter once promoted, a probe committed through a
follower is applied on every node, and commit indexes converge."""

import json
import os
import re
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, pickboxctl_path  # noqa: E402

SIZES = (1, 3, 5)
PER_SIZE = 7

with Harness("cluster-form") as h:
    h.plan(PER_SIZE * len(SIZES) + 3)
    for n in SIZES:
        prefix = "s%dn" % n
        nodes = h.start_cluster(n, prefix=prefix)
        sts = h.wait_formed(nodes)
        leader = sts[0]["leader_id"]
        h.ok(True, "%d-node cluster formed: leader %s, all %d members voters" % (n, leader, n))

        ids = [st.get("raft_id") for st in sts]
        h.ok(all(isinstance(i, str) and re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
             and len(set(ids)) == n,
             "%d nodes: distinct 16-hex-digit raft ids" % n, "raft ids %r" % ids)
        cid = sts[0].get("cluster_id")
        h.ok(isinstance(cid, str) and re.fullmatch(r"[0-9a-f]{32}", cid) is not None
             and all(st.get("cluster_id") == cid for st in sts),
             "%d nodes: one 32-hex-digit cluster id" % n,
             "cluster ids %r" % [st.get("cluster_id") for st in sts])

        followers = [d for d in nodes if d.node_id != leader]
        via = followers[0] if followers else nodes[0]
        res, _ = h.probe_until_ok(via, timeout=20, size=64)
        idx = res.get("index") if isinstance(res, dict) else None
        h.ok(isinstance(idx, int) and idx > 0,
             "%d nodes: a probe through %s commits (index %r)" % (n, via.node_id, idx))
        h.wait_applied(nodes, idx or 1)
        h.ok(True, "%d nodes: the probe is applied on every node" % n)

        sts = h.wait_converged(nodes)
        h.ok(all(st.get("commit_index") >= idx for st in sts),
             "%d nodes: commit, applied and last index converge (%d)"
             % (n, sts[0]["commit_index"]))

        if n == 3:
            # The same cluster through pickboxctl: members table and status fields.
            ctl = pickboxctl_path()
            r = h.ctl(nodes[1], "members")
            h.ok(r.returncode == 0 and all(d.node_id in r.stdout for d in nodes)
                 and r.stdout.count("voter") == 3,
                 "pickboxctl members lists the 3 voters", "rc=%d out=%r err=%r"
                 % (r.returncode, r.stdout, r.stderr))
            r = h.ctl(nodes[1], "--json", "status")
            st = json.loads(r.stdout) if r.returncode == 0 else {}
            h.ok(st.get("cluster_id") == cid and st.get("joining") is False
                 and "snapshot_index" in st and st.get("storage_error") is None,
                 "pickboxctl --json status shows cluster_id, joining, snapshot_index, "
                 "storage_error", r.stdout + r.stderr)
            r = nodes[0].request("debug_partition", {"node": nodes[1].node_id, "on": True})
            h.eq((r.get("error") or {}).get("code"), "UNKNOWN_METHOD",
                 "debug_partition is unknown without PICKBOX_TEST_HOOKS")

        codes = [d.stop(timeout=15) for d in nodes]
        h.eq(codes, [0] * n, "%d nodes: all stop cleanly (exit 0)" % n)
