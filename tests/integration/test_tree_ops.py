#!/usr/bin/env python3
"""Every kind of change made on one node of a 3-node cluster reaches the
others: create, append, truncate, delete, mkdir -p, rmdir, rename of a file
and of a directory, chmod, symlink; edits on different nodes in turn. FIFOs
and hard-linked files are skipped."""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError  # noqa: E402
import treeharness as th  # noqa: E402

with Harness("tree_ops") as h:
    h.plan(13)
    nodes = th.start_cluster(h, 3)
    n1, n2, n3 = nodes

    def step(desc, action, pred):
        action()
        try:
            th.wait_converged(nodes, 15, pred)
            h.ok(True, desc)
        except HarnessError as e:
            h.ok(False, desc, th.tree_diff(nodes) + "\n" + str(e))

    def p(d, rel):
        return os.path.join(d.data_dir, rel)

    step("create a file on n1",
         lambda: th.write(p(n1, "a.txt"), "hello\n"),
         lambda t: t.get("a.txt", (0, 0))[1] == b"hello\n")
    step("append to it on n2",
         lambda: th.write(p(n2, "a.txt"), "more\n", "a"),
         lambda t: t.get("a.txt", (0, 0))[1] == b"hello\nmore\n")
    step("truncate it on n3",
         lambda: os.truncate(p(n3, "a.txt"), 3),
         lambda t: t.get("a.txt", (0, 0))[1] == b"hel")
    step("mkdir -p on n1",
         lambda: os.makedirs(p(n1, "x/y/z")),
         lambda t: t.get("x/y/z", ("",))[0] == "d")
    step("a file inside the new directories on n2",
         lambda: th.write(p(n2, "x/y/z/f.bin"), "deep\n"),
         lambda t: t.get("x/y/z/f.bin", (0, 0))[1] == b"deep\n")
    step("chmod a file on n3",
         lambda: os.chmod(p(n3, "a.txt"), 0o600),
         lambda t: t.get("a.txt", (0, 0, 0))[2] == 0o600)
    step("symlink on n1",
         lambda: os.symlink("a.txt", p(n1, "link")),
         lambda t: t.get("link") == ("l", "a.txt"))
    step("rename a file on n2",
         lambda: os.rename(p(n2, "a.txt"), p(n2, "b.txt")),
         lambda t: "a.txt" not in t and t.get("b.txt", (0, 0))[1] == b"hel")
    step("rename a directory on n3",
         lambda: os.rename(p(n3, "x/y"), p(n3, "x/w")),
         lambda t: "x/y" not in t and t.get("x/w/z/f.bin", (0, 0))[1] == b"deep\n")
    step("delete a file on n1",
         lambda: os.unlink(p(n1, "b.txt")),
         lambda t: "b.txt" not in t)
    step("rmdir (a whole subtree) on n2",
         lambda: shutil.rmtree(p(n2, "x/w")),
         lambda t: "x/w" not in t and "x/w/z/f.bin" not in t and t.get("x", ("",))[0] == "d")
    step("rmdir of an empty directory on n3",
         lambda: os.rmdir(p(n3, "x")),
         lambda t: "x" not in t)

    # A FIFO and a hard-linked file are not replicated (skipped, counted).
    os.mkfifo(p(n1, "fifo"))
    th.write(p(n1, "linked"), "two names\n")
    os.link(p(n1, "linked"), p(n1, "linked2"))
    th.write(p(n1, "after.txt"), "after\n")
    try:
        th.wait_until(lambda: os.path.exists(p(n2, "after.txt")) and
                      th.status(n1).get("tree", {}).get("skipped", 0) >= 2, 15,
                      what="after.txt on n2 and two skips on n1")
        h.ok(not os.path.exists(p(n2, "fifo")) and not os.path.exists(p(n2, "linked")),
             "a FIFO and a hard-linked file are skipped, later files still replicate")
    except HarnessError as e:
        h.ok(False, "a FIFO and a hard-linked file are skipped", str(e))
