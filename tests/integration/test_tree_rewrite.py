#!/usr/bin/env python3
"""A node's own edits of one file in a row are sequential, never a conflict
with each other (issue 5, item 5), also when the first is still on its way.

Most programs write a file by truncating it, then writing: the watcher may
propose the empty file, and the bytes that follow are proposed once that
op commits. That second op used to be based on the version before the
first, so it lost to its own predecessor: the file ended up empty on every
node, with the bytes in a conflict copy. Made certain here by cutting n3
off (the debug_partition hook) while it writes, so its first op commits
only after the second edit is in its tree:
- truncate, proposed, then the bytes: the bytes everywhere, no copy;
- two saves in a row by rename over the file (an editor): the second;
- the same on a connected node (n2, a follower) in a quick loop;
- a program that keeps a file open while its first bytes replicate: its
  own committed edit is recorded, not written again, so the file stays the
  inode it writes to, and its later bytes replicate too.
"""

import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

ENV = {"PICKBOX_TEST_HOOKS": "1"}


def proposed(d):
    return th.status(d).get("tree", {}).get("proposed", 0)


def conflicts(tree):
    return sorted(k for k in tree if ".pickbox-conflict-" in k)


def save_by_rename(path, data):
    tmp = path + ".tmp-save"
    with open(tmp, "w") as f:
        f.write(data)
    os.rename(tmp, path)


with Harness("tree_rewrite") as h:
    h.plan(9)
    nodes = th.start_cluster(h, 3, env=ENV)
    n1, n2, n3 = nodes
    th.write(os.path.join(n1.data_dir, "base.txt"), "base\n")
    th.write(os.path.join(n1.data_dir, "doc.txt"), "doc v0\n")
    th.wait_converged(nodes, 60, lambda t: "base.txt" in t and "doc.txt" in t)
    r = n1.request("sync", {"timeout_s": 30}, timeout=40)
    h.ok("result" in r, "3 nodes hold the base files", "reply %r" % r)

    th.cut(n3, n1, True)
    th.cut(n3, n2, True)
    p3 = os.path.join(n3.data_dir, "trunc.txt")
    before = proposed(n3)
    open(p3, "w").close()  # the truncate alone: an empty file
    wait_until(lambda: proposed(n3) > before, 30, what="n3 to propose the empty file")
    th.write(p3, "the bytes after the truncate\n")
    # an editor's two saves of doc.txt, the first proposed before the second
    d3 = os.path.join(n3.data_dir, "doc.txt")
    before = proposed(n3)
    save_by_rename(d3, "doc v1\n")
    wait_until(lambda: proposed(n3) > before, 30, what="n3 to propose the first save")
    save_by_rename(d3, "doc v2\n")
    time.sleep(0.3)  # the watcher's debounce, so that the second save is seen while cut off
    th.cut(n3, n1, False)
    th.cut(n3, n2, False)

    def done(t):
        return (t.get("trunc.txt", (0, 0))[1] == b"the bytes after the truncate\n" and
                t.get("doc.txt", (0, 0))[1] == b"doc v2\n")
    try:
        t = th.wait_converged(nodes, 60, done)
    except HarnessError as e:
        h.diag(th.tree_diff(nodes))
        h.diag(str(e))
        t = {}
    h.ok(t.get("trunc.txt", (0, 0))[1] == b"the bytes after the truncate\n",
         "a truncate proposed before the bytes came: every tree holds the bytes")
    h.ok(t.get("doc.txt", (0, 0))[1] == b"doc v2\n",
         "two saves in a row while the first was on its way: every tree holds the second")
    h.ok(t != {} and conflicts(t) == [], "no conflict copy (%s)" % conflicts(t))

    # the same on a connected follower, as fast as a script writes
    os.makedirs(os.path.join(n2.data_dir, "burst"))
    want = {}
    for i in range(20):
        name = os.path.join("burst", "f%02d.txt" % i)
        for k in range(3):
            with open(os.path.join(n2.data_dir, name), "w") as f:
                f.flush()
                time.sleep(0.05)  # a writer between its truncate and its bytes
                f.write("%s round %d\n" % (name, k))
        want[name] = ("%s round 2\n" % name).encode()
    try:
        t = th.wait_converged(nodes, 60, lambda t: all(t.get(k, (0, 0))[1] == v
                                                        for k, v in want.items()))
    except HarnessError as e:
        h.diag(th.tree_diff(nodes))
        h.diag("n2: %r" % sorted((k, v[:2]) for k, v in th.snapshot_tree(n2.data_dir).items()
                                 if k.startswith("burst")))
        h.diag(str(e))
        t = {}
    h.ok(t != {}, "20 files each written 3 times in a row on n2: the last bytes everywhere")
    h.ok(t != {} and conflicts(t) == [], "and no conflict copy (%s)" % conflicts(t))
    # a program keeps a file open while its first bytes replicate
    lp = os.path.join(n2.data_dir, "held.log")
    with open(lp, "w") as f:
        ino = os.fstat(f.fileno()).st_ino
        f.write("first line\n")
        f.flush()
        try:
            th.wait_converged(nodes, 60, lambda t: t.get("held.log", (0, 0))[1] ==
                              b"first line\n")
            r = n2.request("sync", {"timeout_s": 30}, timeout=40)
        except HarnessError as e:
            h.diag(str(e))
        f.write("second line\n")
    h.ok(os.stat(lp).st_ino == ino,
         "the writer's file is the same inode after its own edit applied (not rewritten)")
    try:
        t = th.wait_converged(nodes, 60, lambda t: t.get("held.log", (0, 0))[1] ==
                              b"first line\nsecond line\n")
    except HarnessError as e:
        h.diag(th.tree_diff(nodes))
        h.diag(str(e))
        t = {}
    h.ok(t != {}, "what it wrote after that reaches every tree")
    codes = [d.stop(timeout=15) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly")
