#!/usr/bin/env python3
"""Upgrades end to end (doc/upgrades.md): today's pickboxd starts on the state
a format-1 pickboxd left behind (tests/fixtures/v1: raft.db, state.db,
snapshot.pbs, secret and the tree), serves the same tree, takes new edits, and
brings a new member up to date from it; a raft.db or state.db whose format is
newer than this build's is refused at startup with both format numbers named,
leaving every file as it was."""

import hashlib
import os
import re
import shutil
import sqlite3
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import (FAST_TIMING, Harness, HarnessError, free_port,  # noqa: E402
                       pickboxd_path, wait_until)

TOP_SRCDIR = os.environ.get("top_srcdir", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIXTURE = os.path.join(TOP_SRCDIR, "tests", "fixtures", "v1")


def build_format(header, name):
    """The format this build writes: #define NAME N in src/store/HEADER."""
    with open(os.path.join(TOP_SRCDIR, "src", "store", header)) as f:
        m = re.search(r"^#define\s+%s\s+(\d+)" % name, f.read(), re.M)
    return int(m.group(1))


def read_info():
    info = {}
    with open(os.path.join(FIXTURE, "info.txt")) as f:
        for line in f:
            k, v = line.split()
            info[k] = int(v) if v.isdigit() else v
    return info


def read_expect():
    """{path: (kind, mode, sha256)} from tree.sha256 (made with coreutils)."""
    out = {}
    with open(os.path.join(FIXTURE, "tree.sha256")) as f:
        for line in f:
            kind, mode, sha, path = line.rstrip("\n").split(" ", 3)
            out[path] = (kind, int(mode, 8), sha)
    return out


def tree_now(root):
    """The same description of a tree on disk, without .pickbox."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir == "" and ".pickbox" in dirnames:
            dirnames.remove(".pickbox")
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name)
            if name.startswith(".pickbox.tmp."):
                continue
            if os.path.islink(p):
                out[rel] = ("l", 0, hashlib.sha256(os.readlink(p).encode()).hexdigest())
            elif os.path.isdir(p):
                out[rel] = ("d", os.lstat(p).st_mode & 0o777, "-")
            else:
                with open(p, "rb") as f:
                    out[rel] = ("f", os.lstat(p).st_mode & 0o777,
                                hashlib.sha256(f.read()).hexdigest())
    return out


def install_fixture(node_dir):
    """node_dir/tree from tree.tar, its state in tree/.pickbox/state (the
    harness's layout). Returns (tree, state)."""
    tree = os.path.join(node_dir, "tree")
    state = os.path.join(tree, ".pickbox", "state")
    os.makedirs(tree)
    with tarfile.open(os.path.join(FIXTURE, "tree.tar")) as t:
        t.extractall(tree)
    os.makedirs(state, exist_ok=True)
    for name in ("raft.db", "state.db", "snapshot.pbs", "secret"):
        shutil.copyfile(os.path.join(FIXTURE, "state", name), os.path.join(state, name))
        os.chmod(os.path.join(state, name), 0o600)
    return tree, state


def digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def tree_status(d):
    st = d.try_status() or {}
    return st, st.get("tree") or {}


with Harness("upgrade") as h:
    h.plan(11)
    info = read_info()
    expect = read_expect()

    # 1. The v1 state opens and the node serves it.
    tree, state = install_fixture(os.path.join(h.tmpdir, "fx1"))
    fx1 = h.start_daemon("fx1", args=list(FAST_TIMING))
    st = wait_until(lambda: (lambda s: s if s.get("role") == "leader" else None)(
        fx1.try_status() or {}), 15, what="fx1 to lead on the v1 state")
    h.ok(st["applied_index"] >= info["applied_index"] and st["term"] > info["term"] and
         st["snapshot_index"] >= info["snapshot_index"],
         "pickboxd starts on the v1 state and leads (applied, term, snapshot carried over)",
         repr({k: st.get(k) for k in ("applied_index", "term", "snapshot_index")}))

    def settled():
        s, t = tree_status(fx1)
        return (s, t) if t.get("pending") == 0 and t.get("files") == info["files"] and \
            t.get("dirs") == info["dirs"] and "result" in fx1.call("sync") else None
    try:
        st, t = wait_until(settled, 20, interval=0.05, what="fx1's tree to settle")
    except HarnessError as e:
        h.diag(str(e))
        st, t = tree_status(fx1)
    h.ok(t.get("files") == info["files"] and t.get("dirs") == info["dirs"] and
         t.get("conflicts") == 0 and st.get("storage_error") is None,
         "status: %d files, %d dirs, no conflict, no storage error" % (
             info["files"], info["dirs"]), repr(t))
    h.eq(tree_now(tree), expect, "the tree on disk is the v1 tree, byte for byte")

    # 2. It keeps working: a new edit is applied.
    before = st.get("applied_index", 0)
    with open(os.path.join(tree, "after-upgrade.txt"), "w") as f:
        f.write("written by the new version\n")
    ok = True
    try:
        wait_until(lambda: tree_status(fx1)[1].get("files") == info["files"] + 1 and
                   (fx1.try_status() or {}).get("applied_index", 0) > before, 15,
                   interval=0.05, what="the new file to be applied")
    except HarnessError as e:
        ok = False
        h.diag(str(e))
    h.ok(ok, "a new edit on the upgraded node is applied")

    # 3. A new member catches up from it (the v1 snapshot.pbs and log).
    secret = os.path.join(state, "secret")
    n2 = h.start_daemon("n2", args=list(FAST_TIMING) + ["--join", fx1.address,
                                                        "--secret-file", secret])
    want = dict(expect)
    want["after-upgrade.txt"] = ("f", 0o644, hashlib.sha256(
        b"written by the new version\n").hexdigest())
    ok = True
    try:
        wait_until(lambda: tree_now(n2.data_dir) == tree_now(tree) and
                   tree_now(n2.data_dir).keys() == want.keys(), 30, interval=0.1,
                   what="n2's tree to equal fx1's")
    except HarnessError as e:
        ok = False
        h.diag(str(e))
    h.ok(ok, "a new member joins through the upgraded node and gets the same tree")
    got = tree_now(n2.data_dir)
    h.ok(all(got.get(p, (None, None, None))[2] == v[2] for p, v in want.items()),
         "the new member's files have the v1 bytes", repr(sorted(set(got) ^ set(want))))
    h.eq(fx1.stop(), 0, "the upgraded node stops cleanly")

    # 4. Newer formats are refused, and nothing is touched.
    def refused(name, table, ours):
        node_dir = os.path.join(h.tmpdir, "bumped-" + name)
        btree, bstate = install_fixture(node_dir)
        db = sqlite3.connect(os.path.join(bstate, name))
        db.execute("UPDATE %s SET format = ? WHERE id = 1" % table, (ours + 1,))
        db.commit()
        db.close()
        files = sorted(os.path.join(bstate, n) for n in os.listdir(bstate))
        tree_before = tree_now(btree)
        sum_before = digest(files)
        r = h.run([pickboxd_path(), "--node-id", "fx1", "--port", str(free_port()),
                   "--data-dir", btree] + list(FAST_TIMING), timeout=20)
        msg = r.stderr
        named = ("format %d" % (ours + 1)) in msg and ("format %d" % ours) in msg and name in msg
        h.ok(r.returncode == 3 and named,
             "%s of format %d (this build: %d): pickboxd exits 3 naming both" % (
                 name, ours + 1, ours), "exit %d, stderr: %s" % (r.returncode, msg))
        after = sorted(os.path.join(bstate, n) for n in os.listdir(bstate))
        h.ok(after == files and digest(after) == sum_before and tree_now(btree) == tree_before,
             "%s of a newer format: state files and tree left untouched" % name,
             "before %r after %r" % (files, after))

    refused("raft.db", "raft_meta", build_format("store.h", "STORE_FORMAT"))
    refused("state.db", "statedb_meta", build_format("statedb.h", "STATEDB_FORMAT"))
