#!/usr/bin/env python3
"""Trees that already hold files when their node bootstraps or joins (issue 5,
item 1; doc/conflicts.md "Trees that were not in sync").

- n1 bootstraps on a tree holding files, directories, a symlink and an empty
  file: all of it reaches n2 and n3, which join later.
- n2 joins (--join) with its own files: a path the cluster lacks is
  replicated, an identical one changes nothing (no conflict copy), a different
  one keeps the cluster's bytes and puts n2's in a conflict copy (R4 with
  base 0), a local directory where the cluster has a file takes the name and
  the file becomes a copy (R11), a local file where the cluster has a
  directory becomes a copy (R7), a different symlink is a copy (R4). Every
  tree ends identical, no bytes lost; n2's next edits are sequential.
- n3 joins with an empty tree: nothing is deleted anywhere.
- n4 is started alone on a tree with files (so its lone cluster has
  committed them) and joined with `pickboxctl join`: its files reach
  everyone by the same rules.
"""

import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402


def populate(root, files):
    """files: {path: bytes | ("d",) | ("l", target)}"""
    os.makedirs(root, exist_ok=True)
    for p, v in sorted(files.items()):
        full = os.path.join(root, p)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if isinstance(v, tuple) and v[0] == "d":
            os.makedirs(full, exist_ok=True)
        elif isinstance(v, tuple) and v[0] == "l":
            os.symlink(v[1], full)
        else:
            with open(full, "wb") as f:
                f.write(v)


def conflicts_of(tree, path):
    stem, ext = os.path.splitext(path)
    return sorted(k for k in tree if k.startswith(stem + ".pickbox-conflict-") and
                  k.endswith(ext))


def converge(h, nodes, pred, what, timeout=30):
    try:
        return th.wait_converged(nodes, timeout, pred)
    except HarnessError as e:
        h.diag(th.tree_diff(nodes))
        h.diag(str(e))
        return None


with Harness("tree_join") as h:
    h.plan(16)
    seed = {
        "top.txt": b"top from n1\n",
        "empty": b"",
        "docs/a.md": b"# a\n",
        "docs/deep/b.bin": bytes(range(256)) * 700,  # > one chunk's minimum
        "emptydir": ("d",),
        "link": ("l", "docs/a.md"),
        "same.txt": b"identical everywhere\n",
        "diff.txt": b"n1's version\n",
        "clash": b"a file on n1\n",
        "cdir/inside.txt": b"n1 dir child\n",
    }
    n1_dir = os.path.join(h.tmpdir, "n1", "tree")
    populate(n1_dir, seed)
    secret = h.secret_file()
    n1 = h.start_node("n1")
    wait_until(lambda: th.status(n1).get("role") == "leader", 10, what="n1 to lead")

    def has_seed(t):
        return all(k in t for k in seed)
    try:
        wait_until(lambda: has_seed(th.snapshot_tree(n1.data_dir)) and
                   th.status(n1).get("tree", {}).get("pending") == 0 and
                   th.status(n1).get("tree", {}).get("files") == 8, 15,
                   what="n1 to propose its own tree")
        ok = True
    except HarnessError as e:
        h.diag(str(e))
        ok = False
    h.ok(ok, "n1 bootstraps on a populated tree and commits all of it (8 files)")
    before_n1 = th.snapshot_tree(n1.data_dir)

    # n2 joins with its own files.
    n2_files = {
        "only-n2.txt": b"only on n2\n",
        "n2dir/sub/x.txt": b"x\n",
        "same.txt": b"identical everywhere\n",
        "diff.txt": b"n2's version, longer\n",
        "clash/child.txt": b"a directory on n2\n",
        "cdir": b"a file on n2 where n1 has a directory\n",
        "n2empty": b"",
        "link": ("l", "elsewhere"),
    }
    populate(os.path.join(h.tmpdir, "n2", "tree"), n2_files)
    t0 = time.monotonic()
    n2 = h.start_node("n2", join=n1)

    def joined(t):
        return ("only-n2.txt" in t and "n2dir/sub/x.txt" in t and len(conflicts_of(t, "diff.txt"))
                == 1 and "clash/child.txt" in t and len(conflicts_of(t, "clash")) == 1 and
                len(conflicts_of(t, "cdir")) == 1 and "n2empty" in t and
                len(conflicts_of(t, "link")) == 1)
    t = converge(h, [n1, n2], joined, "n1 and n2")
    h.diag("n2 started with --join -> both trees reconciled: %.0f ms" % ((time.monotonic() - t0) * 1000))
    h.ok(t is not None, "n2 joins with files: n1 and n2 converge")
    t = t or th.snapshot_tree(n2.data_dir)
    h.ok(all(t.get(k, (None, None))[1] == v for k, v in seed.items()
             if not isinstance(v, tuple) and k not in ("clash",)) and
         t.get("link") == ("l", "docs/a.md") and t.get("emptydir", ("?",))[0] == "d",
         "n1's bootstrap tree (files, dirs, symlink, empty file) reached n2")
    h.ok(t.get("only-n2.txt", (0, 0))[1] == b"only on n2\n" and
         t.get("n2dir/sub/x.txt", (0, 0))[1] == b"x\n" and t.get("n2empty", (0, 0))[1] == b"",
         "paths only n2 had are replicated")
    h.ok(conflicts_of(t, "same.txt") == [] and t.get("same.txt", (0, 0))[1] == seed["same.txt"],
         "an identical file makes no conflict copy")
    dc = conflicts_of(t, "diff.txt")
    h.ok(t.get("diff.txt", (0, 0))[1] == b"n1's version\n" and len(dc) == 1 and
         dc[0].startswith("diff.pickbox-conflict-n2-") and
         t.get(dc[0], (0, 0))[1] == b"n2's version, longer\n",
         "different content: the cluster's stays, n2's bytes are in %s" % dc)
    cc = conflicts_of(t, "clash")
    h.ok(t.get("clash", ("?",))[0] == "d" and t.get("clash/child.txt", (0, 0))[1] ==
         b"a directory on n2\n" and len(cc) == 1 and t.get(cc[0], (0, 0))[1] == b"a file on n1\n",
         "n2's directory where n1 had a file: the directory wins, n1's file is %s" % cc)
    dd = conflicts_of(t, "cdir")
    h.ok(t.get("cdir", ("?",))[0] == "d" and t.get("cdir/inside.txt", (0, 0))[1] ==
         b"n1 dir child\n" and len(dd) == 1 and
         t.get(dd[0], (0, 0))[1] == b"a file on n2 where n1 has a directory\n",
         "n2's file where n1 had a directory: the directory stays, n2's file is %s" % dd)

    lc = conflicts_of(t, "link")
    h.ok(t.get("link") == ("l", "docs/a.md") and len(lc) == 1 and "-n2-" in lc[0] and
         t.get(lc[0]) == ("l", "elsewhere"),
         "a different symlink: the cluster's stays, n2's is the copy %s" % lc)

    # After the join, n2's edits are sequential: no new copies.
    th.write(os.path.join(n2.data_dir, "same.txt"), "edited on n2 after the join\n")
    th.write(os.path.join(n2.data_dir, "diff.txt"), "diff edited on n2 after the join\n")
    n_copies = len([k for k in t if ".pickbox-conflict-" in k])

    def edited(t):
        return (t.get("same.txt", (0, 0))[1] == b"edited on n2 after the join\n" and
                t.get("diff.txt", (0, 0))[1] == b"diff edited on n2 after the join\n")
    te = converge(h, [n1, n2], edited, "n2's edits")
    h.ok(te is not None and len([k for k in te if ".pickbox-conflict-" in k]) == n_copies,
         "after the join, n2's edits of same.txt and diff.txt apply everywhere, no new copy")

    # n3 joins with an empty tree: nothing is deleted.
    before = th.snapshot_tree(n1.data_dir)
    n3 = h.start_node("n3", join=n1)
    t3 = converge(h, [n1, n2, n3], lambda t: t == before, "n1..n3")
    if t3 is None:
        now = th.snapshot_tree(n1.data_dir)
        h.diag("before vs n1 now: %r" % sorted((k, before.get(k, (None,))[:2], now.get(k, (None,))[:2])
                                            for k in set(before) | set(now)
                                            if before.get(k) != now.get(k)))
    h.ok(t3 is not None, "n3 joins with an empty tree: all three trees equal the tree before it")
    h.ok(all(k in th.snapshot_tree(n1.data_dir) for k in before_n1 if k not in ("clash",
                                                                              "cdir")),
         "nothing n1 had at bootstrap was deleted")

    # n4: a lone node with committed files, then `pickboxctl join`.
    n4_files = {"n4/own.txt": b"n4 alone\n", "diff.txt": b"n4's version\n",
                "same.txt": b"edited on n2 after the join\n"}
    populate(os.path.join(h.tmpdir, "n4", "tree"), n4_files)
    n4 = h.start_node("n4")
    wait_until(lambda: th.status(n4).get("tree", {}).get("files") == 3 and
               th.status(n4).get("tree", {}).get("pending") == 0, 15,
               what="n4 to commit its own files alone")
    r = h.ctl(n4, "join", n1.address)
    h.ok(r.returncode == 0, "pickboxctl join: the lone n4 with committed files joins",
         "rc %d out %s err %s" % (r.returncode, r.stdout, r.stderr))
    nodes = [n1, n2, n3, n4]

    def n4_in(t):
        return "n4/own.txt" in t and len(conflicts_of(t, "diff.txt")) == 2
    t4 = converge(h, nodes, n4_in, "all four", timeout=40)
    h.ok(t4 is not None and t4.get("n4/own.txt", (0, 0))[1] == b"n4 alone\n",
         "n4's files reach every node")
    t4 = t4 or {}
    dc4 = [k for k in conflicts_of(t4, "diff.txt") if "-n4-" in k]
    h.ok(len(dc4) == 1 and t4.get(dc4[0], (0, 0))[1] == b"n4's version\n" and
         t4.get("diff.txt", (0, 0))[1] == b"diff edited on n2 after the join\n" and
         conflicts_of(t4, "same.txt") == [],
         "n4's different diff.txt is a copy %s, its identical same.txt none" % dc4)
    h.ok(all(k in t4 for k in before), "nothing was deleted by n4's join")
    for d in nodes:
        d.stop(timeout=15)
