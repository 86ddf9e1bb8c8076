#!/usr/bin/env python3
"""Edits made on a node while it is cut off from the majority (issue 5,
item 7): proposed when it reconnects and resolved by the conflict rules.

Two rounds on one 3-node cluster, each with the same script of edits:
- partition: n3 is cut off with the debug_partition test hook
  (PICKBOX_TEST_HOOKS=1, the cut set at both ends of both links);
- down: n3 is killed (kill -9) and restarted after the edits.
While n3 is away, a user edits n3's tree (create, edit, delete, rename,
mkdir) and the majority edits some of the same paths. After the heal or
restart every tree converges, with the conflict copies the rules call for:
- a file both sides edited: the majority's edit committed first and stays
  (R4), n3's bytes are in `name.pickbox-conflict-n3-<I>.ext`;
- a file only n3 edited: n3's edit applies (R2);
- a file n3 deleted while the majority edited it: the edit wins (R14);
- a file n3 deleted that nobody edited: deleted everywhere (R13);
- a file n3 edited while the majority deleted it: the edit wins (R3/R1);
- a file n3 renamed: renamed everywhere (R21); renamed while the majority
  edited it: the edit moves with it (partition) or, renamed while the
  daemon was down (seen as a new file and a delete), both are kept;
- a file or directory n3 renamed while the majority deleted it: kept under
  the new name (R19, then proposed as a creation);
- new files on either side: everywhere.
Then `pickboxctl sync` on n3 answers, and no bytes of either side are lost.
"""

import os
import shutil
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

ENV = {"PICKBOX_TEST_HOOKS": "1"}


def conflicts_of(tree, path):
    stem, ext = os.path.splitext(path)
    return sorted(k for k in tree if k.startswith(stem + ".pickbox-conflict-") and
                  k.endswith(ext))


def rd(d, p):
    with open(os.path.join(d.data_dir, p), "rb") as f:
        return f.read()


def explain(h, nodes, what):
    """What a failure needs to be understood from CI's output alone: the
    phase, each node's view of the cluster and the trees' differences."""
    h.diag("FAILED PHASE: " + what)
    for d in nodes:
        st = th.status(d)
        tree = st.get("tree", {})
        h.diag("%s: role %s term %s leader %s commit %s applied %s tree %r" % (
            d.node_id, st.get("role"), st.get("term"), st.get("leader_id"),
            st.get("commit_index"), st.get("applied_index"), tree))
    try:
        h.diag(th.tree_diff(nodes))
    except th.TreeChanging as e:
        h.diag("trees still changing: %s" % e)


def run_round(h, nodes, tag, mode):
    n1, n2, n3 = nodes
    base = {
        "both.txt": "base both\n", "only3.txt": "base only3\n", "del-edit.txt": "base de\n",
        "del.txt": "base del\n", "ren.txt": "base ren\n", "keep/k.txt": "base keep\n",
        "edit-del.txt": "base ed\n", "ren-edit.txt": "base re\n",
        "ren-del.txt": "base rd\n", "rdir/c.txt": "base rdir\n",
    }
    for p, v in base.items():
        th.write(os.path.join(n1.data_dir, tag, p), v)
    want = {os.path.join(tag, p): v.encode() for p, v in base.items()}
    try:
        th.wait_converged(nodes, 60, lambda t: all(t.get(k, (0, 0))[1] == v
                                                    for k, v in want.items()))
    except HarnessError as e:
        explain(h, nodes, "%s: the base files never reached every tree" % tag)
        raise e
    # every node has applied (and recorded) the base before n3 goes away
    r = n1.request("sync", {"timeout_s": 30}, timeout=40)
    if "result" not in r:
        explain(h, nodes, "%s: sync before the cut failed" % tag)
        raise HarnessError("sync before the cut: %r" % r)

    leader = None
    if mode == "partition":
        th.cut(n3, n1, True)
        th.cut(n3, n2, True)
    else:
        n3.kill9()

    def p3(p):
        return os.path.join(n3.data_dir, tag, p)

    # n3's user, meanwhile
    th.write(p3("both.txt"), "n3 edit of both\n")
    th.write(p3("only3.txt"), "n3 edit of only3\n")
    os.unlink(p3("del-edit.txt"))
    os.unlink(p3("del.txt"))
    os.rename(p3("ren.txt"), p3("ren2.txt"))
    th.write(p3("new3/n.txt"), "new on n3\n")
    th.write(p3("edit-del.txt"), "n3 edit of ed\n")
    os.rename(p3("ren-edit.txt"), p3("ren-edit2.txt"))
    os.rename(p3("ren-del.txt"), p3("ren-del2.txt"))
    os.rename(p3("rdir"), p3("rdir2"))
    # the majority, meanwhile
    leader = h.wait_leader([n1, n2], timeout=30)
    th.write(os.path.join(leader.data_dir, tag, "both.txt"), "majority edit of both\n")
    th.write(os.path.join(leader.data_dir, tag, "del-edit.txt"), "majority edit of de\n")
    th.write(os.path.join(leader.data_dir, tag, "newm.txt"), "new on the majority\n")
    os.unlink(os.path.join(leader.data_dir, tag, "edit-del.txt"))
    th.write(os.path.join(leader.data_dir, tag, "ren-edit.txt"), "majority edit of re\n")
    os.unlink(os.path.join(leader.data_dir, tag, "ren-del.txt"))
    shutil.rmtree(os.path.join(leader.data_dir, tag, "rdir"))
    maj = [n1, n2]
    try:
        wait_until(lambda: all(os.path.exists(os.path.join(d.data_dir, tag, "newm.txt")) and
                               rd(d, os.path.join(tag, "both.txt")) == b"majority edit of both\n"
                               and rd(d, os.path.join(tag, "del-edit.txt")) ==
                               b"majority edit of de\n" and
                               not os.path.exists(os.path.join(d.data_dir, tag, "edit-del.txt"))
                               and not os.path.exists(os.path.join(d.data_dir, tag, "rdir"))
                               for d in maj), 60,
                   what="the majority to commit its edits")
    except HarnessError as e:
        explain(h, nodes, "%s: the majority's edits did not apply on n1 and n2" % tag)
        raise e
    r = leader.request("sync", {"timeout_s": 20}, timeout=30)
    h.ok("result" in r, "%s: sync on the majority's leader answers while n3 is away (%s)"
         % (tag, list(r)), "reply %r" % r)

    t0 = time.monotonic()
    if mode == "partition":
        th.cut(n3, n1, False)
        th.cut(n3, n2, False)
    else:
        n3.restart()

    def T(p):
        return os.path.join(tag, p)

    def done(t):
        return (t.get(T("both.txt"), (0, 0))[1] == b"majority edit of both\n" and
                len(conflicts_of(t, T("both.txt"))) == 1 and
                t.get(T("only3.txt"), (0, 0))[1] == b"n3 edit of only3\n" and
                T("ren2.txt") in t and T("ren.txt") not in t and T("del.txt") not in t and
                T("new3/n.txt") in t and T("newm.txt") in t and T("del-edit.txt") in t and
                T("edit-del.txt") in t and T("ren-edit2.txt") in t and
                (mode != "partition" or T("ren-edit.txt") not in t) and
                T("ren-del2.txt") in t and T("rdir2/c.txt") in t)
    try:
        t = th.wait_converged(nodes, 40, done)
        h.diag("%s: n3 back -> all trees converged: %.0f ms" % (tag, (time.monotonic() - t0) * 1000))
    except HarnessError as e:
        h.diag(th.tree_diff(nodes))
        h.diag("n3: %r" % sorted((k, v[:2]) for k, v in th.snapshot_tree(n3.data_dir).items()
                                 if k.startswith(tag)))
        h.diag(str(e))
        t = None
    h.ok(t is not None, "%s: all trees converge after n3 is back" % tag)
    t = t or {}
    bc = conflicts_of(t, T("both.txt"))
    h.ok(t.get(T("both.txt"), (0, 0))[1] == b"majority edit of both\n" and len(bc) == 1 and
         "-n3-" in bc[0] and t.get(bc[0], (0, 0))[1] == b"n3 edit of both\n",
         "%s: both edited: the majority's stays, n3's bytes are in %s" % (tag, bc))
    h.ok(t.get(T("only3.txt"), (0, 0))[1] == b"n3 edit of only3\n" and
         conflicts_of(t, T("only3.txt")) == [],
         "%s: only n3 edited: its edit applies, no copy" % tag)
    h.ok(t.get(T("del-edit.txt"), (0, 0))[1] == b"majority edit of de\n" and
         T("del.txt") not in t,
         "%s: the majority's edit beats n3's delete; an untouched delete applies" % tag)
    h.ok(t.get(T("ren2.txt"), (0, 0))[1] == b"base ren\n" and T("ren.txt") not in t and
         t.get(T("new3/n.txt"), (0, 0))[1] == b"new on n3\n" and
         t.get(T("newm.txt"), (0, 0))[1] == b"new on the majority\n" and
         t.get(T("keep/k.txt"), (0, 0))[1] == b"base keep\n",
         "%s: rename and new files on both sides reach everyone, nothing else changed" % tag)
    h.ok(t.get(T("edit-del.txt"), (0, 0))[1] == b"n3 edit of ed\n",
         "%s: n3's edit beats the majority's delete (the file is back everywhere)" % tag)
    if mode == "partition":
        h.ok(t.get(T("ren-edit2.txt"), (0, 0))[1] == b"majority edit of re\n" and
             T("ren-edit.txt") not in t,
             "%s: n3's rename of a file the majority edited carries the edit (R21)" % tag)
    else:
        # A rename made while the daemon was down is seen as a new file and
        # a delete: the delete loses to the majority's edit, both are kept.
        h.ok(t.get(T("ren-edit2.txt"), (0, 0))[1] == b"base re\n" and
             t.get(T("ren-edit.txt"), (0, 0))[1] == b"majority edit of re\n",
             "%s: n3's offline rename of a file the majority edited keeps both" % tag)
    h.ok(t.get(T("ren-del2.txt"), (0, 0))[1] == b"base rd\n" and T("ren-del.txt") not in t and
         t.get(T("rdir2/c.txt"), (0, 0))[1] == b"base rdir\n" and T("rdir") not in t,
         "%s: a file and a directory n3 renamed while the majority deleted them survive under "
         "the new names" % tag)
    r = n3.request("sync", {"timeout_s": 20}, timeout=30)
    h.ok("result" in r, "%s: sync on n3 answers after it is back" % tag, "reply %r" % r)


with Harness("tree_offline") as h:
    h.plan(22)
    nodes = th.start_cluster(h, 3, env=ENV)
    h.ok(True, "3-node cluster with test hooks")
    for tag, mode in (("part", "partition"), ("down", "down")):
        try:
            run_round(h, nodes, tag, mode)
        except HarnessError:
            explain(h, nodes, "%s: round stopped by an error (traceback below)" % tag)
            raise
    codes = [d.stop(timeout=15) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly")
