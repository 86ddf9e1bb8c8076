#!/usr/bin/env python3
"""A concurrent edit of one file on two nodes (n2 cut off while both write)
ends with identical trees on all three nodes and exactly one conflict copy,
listed by the `conflicts` method on every node."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

with Harness("tree_conflict") as h:
    h.plan(6)
    nodes = th.start_cluster(h, 3, env={"PICKBOX_TEST_HOOKS": "1"})
    n1, n2, n3 = nodes
    th.write(os.path.join(n1.data_dir, "doc.txt"), "v0\n")
    th.wait_converged(nodes, 15, lambda t: t.get("doc.txt", (0, 0))[1] == b"v0\n")

    # n2 (a follower or the leader) loses both links; the others go on.
    for other in ("n1", "n3"):
        r = n2.call("debug_partition", {"node": other, "on": True})
        h.ok("result" in r, "partition n2 from %s" % other, repr(r))
    writer = n1 if th.status(n1).get("role") == "leader" or True else n3
    th.write(os.path.join(n1.data_dir, "doc.txt"), "from n1\n")
    wait_until(lambda: open(os.path.join(n3.data_dir, "doc.txt")).read() == "from n1\n", 15,
               what="n1's edit on n3")
    th.write(os.path.join(n2.data_dir, "doc.txt"), "from n2\n")
    wait_until(lambda: th.status(n2).get("tree", {}).get("pending", 0) > 0, 10,
               what="n2's edit to be pending")
    for other in ("n1", "n3"):
        n2.call("debug_partition", {"node": other, "on": False})

    def one_copy(t):
        copies = [k for k in t if ".pickbox-conflict-" in k]
        return len(copies) == 1 and t.get("doc.txt", (0, 0))[1] in (b"from n1\n", b"from n2\n")
    try:
        tree = th.wait_converged(nodes, 20, one_copy)
        h.ok(True, "identical trees with one conflict copy")
        copies = [k for k in tree if ".pickbox-conflict-" in k]
        both = sorted([tree["doc.txt"][1], tree[copies[0]][1]])
        h.eq(both, [b"from n1\n", b"from n2\n"], "both edits survive (one at the name, one copy)")
        h.diag("kept %r, copy %s" % (tree["doc.txt"][1], copies[0]))
    except HarnessError as e:
        h.ok(False, "identical trees with one conflict copy", th.tree_diff(nodes) + "\n" + str(e))
        h.ok(False, "both edits survive")
    lists = [d.call("conflicts").get("result", {}).get("conflicts") for d in nodes]
    h.ok(all(isinstance(x, list) and len(x) == 1 for x in lists) and
         all(x == lists[0] for x in lists), "conflicts lists the same one copy on every node",
         repr(lists))
    st = th.status(n3).get("tree", {})
    h.eq(st.get("conflicts"), 1, "status.tree.conflicts counts it")
