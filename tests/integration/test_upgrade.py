#!/usr/bin/env python3
"""Upgrades end to end (doc/upgrades.md): today's pickboxd starts on the state
a format-1 and a format-2 pickboxd left behind (tests/fixtures/v1 and v2:
raft.db, state.db, snapshot.pbs, secret and the tree), serves the same tree,
takes new edits, and brings a new member up to date from it; its state.db is
then of today's format with every chunk's bytes kept (in the chunk packs);
a raft.db or state.db whose format is newer than this build's is refused at
startup with both format numbers named, leaving every file as it was."""

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
FIXTURES = os.path.join(TOP_SRCDIR, "tests", "fixtures")


def build_format(header, name):
    """The format this build writes: #define NAME N in src/store/HEADER."""
    with open(os.path.join(TOP_SRCDIR, "src", "store", header)) as f:
        m = re.search(r"^#define\s+%s\s+(\d+)" % name, f.read(), re.M)
    return int(m.group(1))


def read_info(fixture):
    info = {}
    with open(os.path.join(fixture, "info.txt")) as f:
        for line in f:
            k, v = line.split()
            info[k] = int(v) if v.isdigit() else v
    return info


def read_expect(fixture):
    """{path: (kind, mode, sha256)} from tree.sha256 (made with coreutils)."""
    out = {}
    with open(os.path.join(fixture, "tree.sha256")) as f:
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


def install_fixture(fixture, node_dir):
    """node_dir/tree from tree.tar, its state in tree/.pickbox/state (the
    harness's layout). Returns (tree, state)."""
    tree = os.path.join(node_dir, "tree")
    state = os.path.join(tree, ".pickbox", "state")
    os.makedirs(tree)
    with tarfile.open(os.path.join(fixture, "tree.tar")) as t:
        t.extractall(tree)
    os.makedirs(state, exist_ok=True)
    for name in ("raft.db", "state.db", "snapshot.pbs", "secret"):
        shutil.copyfile(os.path.join(fixture, "state", name), os.path.join(state, name))
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


def chunk_census(path):
    """(format, {chunk id: length}) of a state.db's node-local bytes: the
    BLOBs of format 2, the pack index of format 3; formats 1 kept the bytes
    in the chunks table."""
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        fmt = db.execute("SELECT format FROM statedb_meta").fetchone()[0]
        if fmt == 1:
            rows = db.execute("SELECT id, length(data) FROM chunks")
        elif fmt == 2:
            rows = db.execute("SELECT id, length(data) FROM chunk_data")
        else:
            rows = db.execute("SELECT id, len FROM chunk_data")
        return fmt, {bytes(i): n for i, n in rows}
    finally:
        db.close()


def pack_bytes(state, path):
    """{chunk id: sha256 of its bytes} read from a format 3 node's packs."""
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    out = {}
    try:
        for cid, pack, off, n in db.execute("SELECT id, pack, off, len FROM chunk_data"):
            with open(os.path.join(state, "chunks", "%08d.pack" % pack), "rb") as f:
                f.seek(off)
                out[bytes(cid)] = hashlib.sha256(f.read(n)).hexdigest()
    finally:
        db.close()
    return out


def upgrade_generation(h, gen):
    """Steps 1-3 on fixture gen (8 checks)."""
    fixture = os.path.join(FIXTURES, gen)
    info = read_info(fixture)
    expect = read_expect(fixture)
    node_dir = os.path.join(h.tmpdir, "fx1")  # the fixture's node id: one generation at a time
    shutil.rmtree(node_dir, ignore_errors=True)
    tree, state = install_fixture(fixture, node_dir)
    old_format, old_chunks = chunk_census(os.path.join(state, "state.db"))

    # 1. The old state opens and the node serves it.
    fx1 = h.start_daemon("fx1", args=list(FAST_TIMING))
    st = wait_until(lambda: (lambda s: s if s.get("role") == "leader" else None)(
        fx1.try_status() or {}), 15, what="fx1 to lead on the %s state" % gen)
    h.ok(st["applied_index"] >= info["applied_index"] and st["term"] > info["term"] and
         st["snapshot_index"] >= info["snapshot_index"],
         "%s: pickboxd starts on the state and leads (applied, term, snapshot carried over)" %
         gen, repr({k: st.get(k) for k in ("applied_index", "term", "snapshot_index")}))

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
         t.get("conflicts") == 0 and t.get("chunks_missing", 0) == 0 and
         st.get("storage_error") is None,
         "%s: status: %d files, %d dirs, no conflict, no chunk missing, no storage error" % (
             gen, info["files"], info["dirs"]), repr(t))
    h.eq(tree_now(tree), expect, "%s: the tree on disk is the fixture's tree, byte for byte" % gen)

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
    h.ok(ok, "%s: a new edit on the upgraded node is applied" % gen)

    # 3. A new member catches up from it (the old snapshot.pbs and log).
    secret = os.path.join(state, "secret")
    n2 = h.start_daemon("n2" + gen, args=list(FAST_TIMING) + ["--join", fx1.address,
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
    h.ok(ok, "%s: a new member joins through the upgraded node and gets the same tree" % gen)
    got = tree_now(n2.data_dir)
    h.ok(all(got.get(p, (None, None, None))[2] == v[2] for p, v in want.items()),
         "%s: the new member's files have the fixture's bytes" % gen,
         repr(sorted(set(got) ^ set(want))))
    h.eq(fx1.stop(), 0, "%s: the upgraded node stops cleanly" % gen)
    n2.stop()

    # 4. Its state.db is of today's format, with every chunk's bytes kept
    # (the same ids and lengths; the bytes in the packs hash to their ids).
    db_path = os.path.join(state, "state.db")
    new_format, new_chunks = chunk_census(db_path)
    hashes = pack_bytes(state, db_path)
    kept = {i: n for i, n in new_chunks.items() if i in old_chunks}
    h.ok(old_format < build_format("statedb.h", "STATEDB_FORMAT") and
         new_format == build_format("statedb.h", "STATEDB_FORMAT") and
         kept == old_chunks and all(hashes[i] == i.hex() for i in old_chunks),
         "%s: state.db went from format %d to %d, keeping all %d chunks' bytes" % (
             gen, old_format, new_format, len(old_chunks)),
         repr((old_format, new_format, len(old_chunks), len(kept))))


with Harness("upgrade") as h:
    h.plan(20)
    upgrade_generation(h, "v1")
    upgrade_generation(h, "v2")

    # 5. Newer formats are refused, and nothing is touched.
    def refused(name, table, ours):
        node_dir = os.path.join(h.tmpdir, "bumped-" + name)
        btree, bstate = install_fixture(os.path.join(FIXTURES, "v2"), node_dir)
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
