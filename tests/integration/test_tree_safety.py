#!/usr/bin/env python3
"""Files already in a tree when its cluster is bootstrapped are proposed (the
initial scan) and reach the nodes that join later; a node whose tree lost its
.pickbox marker (unmounted: an empty directory in its place) reports
tree_error and replicates nothing, in particular no deletes, while the other
two commit, and catches up once its tree is back."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

with Harness("tree_safety") as h:
    h.plan(7)
    pre = os.path.join(h.tmpdir, "n1", "tree")
    th.write(os.path.join(pre, "old", "before.txt"), "was here first\n")
    th.write(os.path.join(pre, "top.txt"), "top\n")
    n1 = h.start_daemon("n1", args=th.FAST)
    wait_until(lambda: th.status(n1).get("role") == "leader", 10, what="n1 to lead")
    secret = os.path.join(n1.state_dir, "secret")
    n2_state = os.path.join(h.tmpdir, "n2-state")
    os.makedirs(n2_state)
    sock = os.path.join(n2_state, "control.sock")
    n2_args = th.FAST + ["--state-dir", n2_state, "--secret-file", secret]
    n2 = h.start_daemon("n2", args=n2_args + ["--join", "127.0.0.1:%d" % n1.port],
                        control_socket=sock)
    # A third node: a node whose tree is away stops acknowledging as soon as
    # it has an entry to apply (by design: it must not claim what it cannot
    # write), so with two nodes whether the cluster still commits depended on
    # whether n2 had anything to apply yet (it failed NO_QUORUM under load).
    n3 = h.start_daemon("n3", args=th.FAST + ["--secret-file", secret,
                                              "--join", "127.0.0.1:%d" % n1.port])
    nodes = [n1, n2, n3]
    try:
        th.wait_converged(nodes, 20, lambda t: t.get("old/before.txt", (0, 0))[1] ==
                          b"was here first\n" and "top.txt" in t)
        h.ok(True, "files present at bootstrap reach the node that joined")
    except HarnessError as e:
        h.ok(False, "files present at bootstrap reach the node that joined",
             th.tree_diff(nodes) + "\n" + str(e))

    # n1 and n3 must be able to commit without n2: n3 a voter first.
    wait_until(lambda: all(th.member_ok(d, 3) for d in (n1, n3)), 30, what="n3 to be a voter")

    # "Unmount" n2's tree: an empty directory without the marker in its place.
    h.eq(n2.stop(), 0, "n2 stops")
    real = n2.data_dir + ".real"
    os.rename(n2.data_dir, real)
    os.makedirs(n2.data_dir)
    n2 = h.start_daemon("n2", args=n2_args, control_socket=sock, port=n2.port)
    st = wait_until(lambda: th.status(n2).get("tree", {}).get("tree_error"), 10,
                    what="tree_error on n2")
    h.ok("marker" in st, "status.tree.tree_error says the marker is missing", st)
    th.write(os.path.join(n1.data_dir, "during.txt"), "while n2's tree was away\n")
    r = n1.call("probe", {"timeout_s": 10}, timeout=20)
    h.ok("result" in r, "the cluster still commits", repr(r))
    t1 = th.snapshot_tree(n1.data_dir)
    h.ok("top.txt" in t1 and "old/before.txt" in t1 and os.listdir(n2.data_dir) == [],
         "nothing deleted on n1, nothing written into the empty directory",
         repr(sorted(t1)) + " / " + repr(os.listdir(n2.data_dir)))

    # "Mount" it again and restart: n2 catches up.
    h.eq(n2.stop(), 0, "n2 stops again")
    os.rmdir(n2.data_dir)
    os.rename(real, n2.data_dir)
    n2 = h.start_daemon("n2", args=n2_args, control_socket=sock, port=n2.port)
    try:
        th.wait_converged(nodes, 20, lambda t: "during.txt" in t and "top.txt" in t)
        ok = th.status(n2).get("tree", {}).get("tree_error") is None
        h.ok(ok, "with its tree back, n2 catches up and reports no tree error")
    except HarnessError as e:
        h.ok(False, "with its tree back, n2 catches up", th.tree_diff(nodes) + "\n" + str(e))
