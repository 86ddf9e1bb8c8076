#!/usr/bin/env python3
"""Crashes during a big file's chunk push (doc/decisions.md D13 push half,
D14), with real processes: three nodes, 32 MiB files (big files go through
the push from 4 MiB on), the moment read from the status counters
(chunk_push: frames acknowledged by the receivers, or stored by one;
tree.pushed_files: REFS and the PUT queued).

1.  kill -9 of the WRITER (a follower) after some PUSH frames were
    acknowledged and before its REFS entries were queued; restarted, it
    proposes the file again (still complete in its tree) over its own bytes
    without a row: the file ends identical on every tree, no conflict copy.
1b. The same once REFS and the PUT are queued (committed or not), the file
    rewritten over case 1's.
1c. The writer is the leader, killed mid-push.
2.  kill -9 of a RECEIVER (the other follower) once it stored a PUSH frame;
    the file reaches the two live nodes, and the receiver, restarted,
    fetches what it lacks.
2b. A receiver that SIGKILLs itself (PICKBOX_TEST_PUSH_CRASH) between
    appending a pushed frame to its pack and committing the frame's index:
    restarted, it cuts that tail off the pack (logged) and fetches.
2c. A receiver killed mid-push, restarted, killed again while it fetches.
3.  kill -9 of the LEADER (the writer a follower) once it stored a PUSH
    frame: a new leader, the file reaches the live nodes, and the old
    leader, restarted, gets it too.
3b. The leader killed once the writer queued REFS and the PUT.
4.  The writer replaces the file (a rename over it, as a finished download)
    while its push is in flight: every tree ends with the second version,
    and no sample of any receiver's file (taken all along) is anything but
    absent, the first version or the second one.
4b. The same once REFS and the PUT of the first version are queued.
4c. The file rewritten in place (same inode, same size) mid-push.
6.  All three nodes killed at once mid-push, restarted.
5.  After each case `pickboxctl sync` returns on every node, every node's
    tree.chunks_missing is 0, no storage or tree error, no conflict. At the
    end all three nodes are killed (-9) and restarted: their packs reopen
    over crashed state, the trees stay identical (SHA-256 of every file),
    and every node then stops cleanly (exit 0: no leak under ASan).
"""

import hashlib
import os
import re
import signal
import sys
import threading

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

MIB = 1024 * 1024
SIZE = 32 * MIB
ENV = {"PICKBOX_TEST_HOOKS": "1"}


def make_file(d, name, size):
    """size random bytes in d's directory, beside (not in) its tree; returns
    (path, SHA-256)."""
    h = hashlib.sha256()
    path = os.path.join(d.dir, name)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            b = os.urandom(min(left, 4 * MIB))
            h.update(b)
            f.write(b)
            left -= len(b)
    return path, h.hexdigest()


def sha(path):
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                b = f.read(4 * MIB)
                if not b:
                    break
                h.update(b)
    except OSError:
        return None
    return h.hexdigest()


def tree_sums(d):
    """{relative path: SHA-256 of a file, "dir" or "link:target"} of d's tree
    (without .pickbox and the daemon's temporary files); None while an entry
    vanishes under the walk."""
    out = {}
    root = d.data_dir
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            rel_dir = ""
            if ".pickbox" in dirnames:
                dirnames.remove(".pickbox")
        for name in dirnames:
            out[os.path.join(rel_dir, name)] = "dir"
        for name in filenames:
            if name.startswith(".pickbox.tmp."):
                continue
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[os.path.join(rel_dir, name)] = "link:" + os.readlink(p)
                continue
            s = sha(p)
            if s is None:
                return None
            out[os.path.join(rel_dir, name)] = s
    return out


def same_trees(nodes):
    sums = [tree_sums(d) for d in nodes]
    if any(s is None for s in sums) or any(s != sums[0] for s in sums[1:]):
        return None
    return sums[0]


def sums_diff(nodes):
    sums = [tree_sums(d) or {} for d in nodes]
    keys = sorted(set().union(*sums))
    return "\n".join("%s: %r" % (k, [s.get(k) for s in sums]) for k in keys
                     if any(s.get(k) != sums[0].get(k) for s in sums))


def has_file(nodes, rel, digest):
    return all(sha(os.path.join(d.data_dir, rel)) == digest for d in nodes)


def counter(d, group, key):
    return th.status(d).get(group, {}).get(key, 0)


def catch(d, group, key, base, what):
    """Polls d's status until status[group][key] > base (the push is under
    way); returns that status. Polled as fast as the daemon answers."""
    def seen():
        st = th.status(d)
        return st if st.get(group, {}).get(key, 0) > base else None
    return wait_until(seen, 60, interval=0.005, what=what)


def conflict_copies(nodes):
    n = 0
    for d in nodes:
        for _dirpath, _dirs, files in os.walk(d.data_dir):
            n += sum(1 for f in files if ".pickbox-conflict-" in f)
    return n


def restart(d):
    d.restart(timeout=30)
    wait_until(lambda: th.status(d).get("leader_id"), 30,
               what="%s to know a leader" % d.node_id)


def leader_of(nodes):
    def one():
        ids = {th.status(d).get("leader_id") for d in nodes}
        if len(ids) != 1:
            return None
        lid = ids.pop()
        return next((d for d in nodes if d.node_id == lid), None)
    return wait_until(one, 30, interval=0.05, what="one leader among the live nodes")


def ready(nodes):
    """Waits until every node reaches every other one (a push goes only to
    the peers linked at its start) and they agree on a leader; returns it."""
    def linked():
        for d in nodes:
            ms = th.status(d).get("members") or []
            if len(ms) != len(nodes) or not all(m.get("reachable") for m in ms):
                return False
        return True
    wait_until(linked, 30, interval=0.05, what="every node linked to every other")
    return leader_of(nodes)


def settled(h, nodes, what):
    """Case 5's checks after a case: sync returns on every node, no chunk
    missing, no conflict. One TAP line."""
    problems = []
    for d in nodes:
        r = h.ctl(d, "-t", "40", "sync", timeout=60)
        if r.returncode != 0:
            problems.append("%s: pickboxctl sync exit %d: %s%s" % (
                d.node_id, r.returncode, r.stdout, r.stderr))
    try:
        wait_until(lambda: all(th.status(d).get("tree", {}).get("chunks_missing") == 0
                               for d in nodes), 30, interval=0.1,
                   what="chunks_missing == 0 everywhere")
    except HarnessError as e:
        problems.append("%s: %r" % (e, [th.status(d).get("tree") for d in nodes]))
    for d in nodes:
        st = th.status(d)
        t = st.get("tree", {})
        if st.get("storage_error") or t.get("tree_error"):
            problems.append("%s: storage_error %r, tree_error %r" % (
                d.node_id, st.get("storage_error"), t.get("tree_error")))
        if t.get("last_error"):
            h.diag("%s: %s: last_error %r" % (what, d.node_id, t.get("last_error")))
    conf = [th.status(d).get("tree", {}).get("conflicts") for d in nodes]
    copies = conflict_copies(nodes)
    if any(c != 0 for c in conf) or copies:
        problems.append("conflicts %r, %d conflict copies" % (conf, copies))
    h.ok(not problems, "%s: sync returns on every node, no chunk missing, no conflict" % what,
         "\n".join(problems))


def converge(h, nodes, rel, digest, what):
    try:
        wait_until(lambda: has_file(nodes, rel, digest), 90, interval=0.3,
                   what="%s on every node" % rel)
        wait_until(lambda: same_trees(nodes), 30, interval=0.2, what="identical trees")
        h.ok(True, what)
        return True
    except HarnessError as e:
        h.ok(False, what, "%s\n%s\n%r" % (e, sums_diff(nodes),
                                            [th.status(d).get("tree") for d in nodes]))
        return False


with Harness("tree-push-crash") as h:
    h.plan(40)
    nodes = th.start_cluster(h, 3, timing=th.DEFAULT_TIMING, env=ENV)
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    other = next(d for d in nodes if d not in (leader, writer))

    # 1. kill -9 of the writer mid-push
    src, digest1 = make_file(writer, "c1.part", SIZE)
    acked0 = counter(writer, "chunk_push", "acked_frames")
    pushed0 = counter(writer, "tree", "pushed_files")
    os.rename(src, os.path.join(writer.data_dir, "c1.bin"))
    st = catch(writer, "chunk_push", "acked_frames", acked0, "a PUSH frame acknowledged")
    writer.kill9()
    mid = st.get("tree", {}).get("pushed_files", 0) == pushed0
    h.ok(mid, "writer %s killed mid-push (%d frames acknowledged, REFS not queued yet)" % (
        writer.node_id, st["chunk_push"]["acked_frames"] - acked0), repr(st.get("chunk_push")))
    restart(writer)
    converge(h, nodes, "c1.bin", digest1,
             "case 1: restarted, the writer's file reached all three trees (same SHA-256)")
    settled(h, nodes, "case 1")

    # 1b. kill -9 of the writer once its REFS entries and PUT are queued
    # (committed or not): restarted, it finds its own file with no record
    # or with the PUT applying over it; it rewrites the same file (over c1)
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    src, digest1 = make_file(writer, "c1b.part", SIZE)
    pushed0 = counter(writer, "tree", "pushed_files")
    os.rename(src, os.path.join(writer.data_dir, "c1.bin"))
    catch(writer, "tree", "pushed_files", pushed0, "the REFS entries queued")
    writer.kill9()
    restart(writer)
    converge(h, nodes, "c1.bin", digest1,
             "case 1b: killed once REFS was queued, restarted: the new c1.bin is on all three "
             "trees")
    settled(h, nodes, "case 1b")

    # 1c. kill -9 of a writer that is the leader, mid-push
    writer = ready(nodes)
    src, digest1c = make_file(writer, "c1c.part", SIZE)
    acked0 = counter(writer, "chunk_push", "acked_frames")
    pushed0 = counter(writer, "tree", "pushed_files")
    os.rename(src, os.path.join(writer.data_dir, "c1c.bin"))
    st = catch(writer, "chunk_push", "acked_frames", acked0, "a PUSH frame acknowledged")
    writer.kill9()
    h.ok(st.get("tree", {}).get("pushed_files", 0) == pushed0,
         "case 1c: writer and leader %s killed mid-push" % writer.node_id,
         repr(st.get("chunk_push")))
    restart(writer)
    converge(h, nodes, "c1c.bin", digest1c,
             "case 1c: restarted, the leader's file reached all three trees")
    settled(h, nodes, "case 1c")

    # 2. kill -9 of a receiver (the other follower) mid-push
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    other = next(d for d in nodes if d not in (leader, writer))
    src, digest2 = make_file(writer, "c2.part", SIZE)
    recv0 = counter(other, "chunk_push", "received_frames")
    os.rename(src, os.path.join(writer.data_dir, "c2.bin"))
    catch(other, "chunk_push", "received_frames", recv0, "a PUSH frame stored by the receiver")
    other.kill9()
    converge(h, [leader, writer], "c2.bin", digest2,
                  "case 2: receiver %s killed mid-push, the file reached the live nodes"
                  % other.node_id)
    restart(other)
    converge(h, nodes, "c2.bin", digest2, "case 2: the receiver, restarted, has the file")
    h.diag("%s fetched %d bytes" % (other.node_id, counter(other, "tree", "fetched_bytes")))
    settled(h, nodes, "case 2")

    # 2b. a receiver dies (PICKBOX_TEST_PUSH_CRASH=2: SIGKILL by itself)
    # with a PUSH frame's bytes appended to its pack and their index not
    # committed; restarted, it cuts that tail off the pack and fetches
    leader = ready(nodes)
    other = next(d for d in nodes if d is not leader)
    h.eq(other.stop(timeout=30), 0, "case 2b: %s stops" % other.node_id)
    other.env = dict(ENV, PICKBOX_TEST_PUSH_CRASH="2")
    restart(other)
    h.wait_formed(nodes, 60)
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader and d is not other)
    src, digest2b = make_file(writer, "c2b.part", SIZE)
    os.rename(src, os.path.join(writer.data_dir, "c2b.bin"))
    try:
        rc = other.wait_exit(60)
    except HarnessError as e:
        rc = str(e)
    h.eq(rc, -signal.SIGKILL, "case 2b: receiver %s died between its pack append and the index "
         "commit" % other.node_id)
    live = [d for d in nodes if d is not other]
    converge(h, live, "c2b.bin", digest2b, "case 2b: the file reached the live nodes")
    other.env = ENV
    log_at = len(other.log_text())
    restart(other)
    converge(h, nodes, "c2b.bin", digest2b, "case 2b: the receiver, restarted, has the file")
    h.ok(re.search(r"cut \d+ bytes never committed off chunk pack", other.log_text()[log_at:]),
         "case 2b: at open, the pack's tail that was never committed was cut")
    settled(h, nodes, "case 2b")

    # 2c. a receiver killed mid-push, restarted, killed again while it
    # fetches what it lacks, restarted
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    other = next(d for d in nodes if d not in (leader, writer))
    src, digest2c = make_file(writer, "c2c.part", SIZE)
    recv0 = counter(other, "chunk_push", "received_frames")
    os.rename(src, os.path.join(writer.data_dir, "c2c.bin"))
    catch(other, "chunk_push", "received_frames", recv0, "a PUSH frame stored by the receiver")
    other.kill9()
    converge(h, [leader, writer], "c2c.bin", digest2c, "case 2c: the file reached the live nodes")
    restart(other)
    st = catch(other, "tree", "fetched_chunks", 0, "the receiver to fetch")
    other.kill9()
    h.diag("case 2c: %s killed after fetching %d chunks" % (other.node_id,
                                                          st["tree"]["fetched_chunks"]))
    restart(other)
    converge(h, nodes, "c2c.bin", digest2c,
             "case 2c: killed while fetching and restarted, the receiver has the file")
    settled(h, nodes, "case 2c")

    # 3. kill -9 of the leader mid-push (the writer a follower)
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    other = next(d for d in nodes if d not in (leader, writer))
    src, digest3 = make_file(writer, "c3.part", SIZE)
    recv0 = counter(leader, "chunk_push", "received_frames")
    os.rename(src, os.path.join(writer.data_dir, "c3.bin"))
    catch(leader, "chunk_push", "received_frames", recv0, "a PUSH frame stored by the leader")
    leader.kill9()
    try:
        nl = leader_of([writer, other])
        h.ok(nl is not leader, "leader %s killed mid-push: %s leads" % (leader.node_id,
                                                                       nl.node_id))
    except HarnessError as e:
        h.ok(False, "a new leader after the leader's kill -9", str(e))
    converge(h, [writer, other], "c3.bin", digest3,
             "case 3: the file reached the two live nodes")
    restart(leader)
    converge(h, nodes, "c3.bin", digest3, "case 3: the old leader, restarted, has the file")
    settled(h, nodes, "case 3")

    # 3b. kill -9 of the leader once the writer queued REFS and the PUT:
    # proposed again to the next leader, applied once (sessions)
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    src, digest3b = make_file(writer, "c3b.part", SIZE)
    pushed0 = counter(writer, "tree", "pushed_files")
    os.rename(src, os.path.join(writer.data_dir, "c3b.bin"))
    catch(writer, "tree", "pushed_files", pushed0, "the REFS entries queued")
    leader.kill9()
    live = [d for d in nodes if d is not leader]
    converge(h, live, "c3b.bin", digest3b,
             "case 3b: leader killed once REFS was queued: the file reached the live nodes")
    restart(leader)
    converge(h, nodes, "c3b.bin", digest3b, "case 3b: the old leader, restarted, has the file")
    settled(h, nodes, "case 3b")

    # 4. the file replaced while its push is in flight
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    src1, digest4a = make_file(writer, "c4a.part", SIZE)
    src2, digest4b = make_file(writer, "c4b.part", SIZE - 3 * MIB - 12345)
    rel = "c4.bin"
    allowed = {None, digest4a, digest4b}
    torn = []
    samples = [0]
    stop = threading.Event()
    receivers = [d for d in nodes if d is not writer]

    def sample():
        while not stop.is_set():
            for d in receivers:
                s = sha(os.path.join(d.data_dir, rel))
                samples[0] += 1
                if s not in allowed:
                    torn.append((d.node_id, s))
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        acked0 = counter(writer, "chunk_push", "acked_frames")
        os.rename(src1, os.path.join(writer.data_dir, rel))
        catch(writer, "chunk_push", "acked_frames", acked0, "a PUSH frame acknowledged")
        os.rename(src2, os.path.join(writer.data_dir, rel))
        converge(h, nodes, rel, digest4b,
                 "case 4: replaced mid-push, every tree ends with the second version")
    finally:
        stop.set()
        t.join(30)
    h.ok(not torn and samples[0] > 0,
         "case 4: %d samples of the receivers' file, none torn" % samples[0], repr(torn[:5]))
    settled(h, nodes, "case 4")

    # 4b. replaced once REFS and the PUT of the first version are queued
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    src1, digest5a = make_file(writer, "c5a.part", SIZE)
    src2, digest5b = make_file(writer, "c5b.part", SIZE // 2 + 4321)
    rel = "c4.bin"
    allowed = {None, digest4b, digest5a, digest5b}
    torn.clear()
    samples[0] = 0
    stop.clear()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        pushed0 = counter(writer, "tree", "pushed_files")
        os.rename(src1, os.path.join(writer.data_dir, rel))
        catch(writer, "tree", "pushed_files", pushed0, "the REFS entries queued")
        os.rename(src2, os.path.join(writer.data_dir, rel))
        converge(h, nodes, rel, digest5b,
                 "case 4b: replaced once REFS was queued, every tree ends with the last version")
    finally:
        stop.set()
        t.join(30)
    h.ok(not torn and samples[0] > 0,
         "case 4b: %d samples of the receivers' file, none torn" % samples[0], repr(torn[:5]))
    settled(h, nodes, "case 4b")

    # 4c. rewritten in place (same inode, same size) mid-push
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    src, digest7a = make_file(writer, "c7a.part", SIZE)
    v2 = os.urandom(SIZE)
    digest7b = hashlib.sha256(v2).hexdigest()
    acked0 = counter(writer, "chunk_push", "acked_frames")
    os.rename(src, os.path.join(writer.data_dir, "c7.bin"))
    catch(writer, "chunk_push", "acked_frames", acked0, "a PUSH frame acknowledged")
    with open(os.path.join(writer.data_dir, "c7.bin"), "r+b") as f:
        for off in range(0, SIZE, 4 * MIB):
            f.write(v2[off:off + 4 * MIB])
    del v2
    converge(h, nodes, "c7.bin", digest7b,
             "case 4c: rewritten in place mid-push, every tree ends with the second version")
    settled(h, nodes, "case 4c")

    # 6. every node killed mid-push at once, restarted
    leader = ready(nodes)
    writer = next(d for d in nodes if d is not leader)
    src, digest6 = make_file(writer, "c6.part", SIZE)
    recv0 = counter(leader, "chunk_push", "received_frames")
    os.rename(src, os.path.join(writer.data_dir, "c6.bin"))
    catch(leader, "chunk_push", "received_frames", recv0, "a PUSH frame stored by the leader")
    for d in nodes:
        d.kill9()
    for d in nodes:
        d.restart(timeout=30)
    h.wait_formed(nodes, 60)
    converge(h, nodes, "c6.bin", digest6,
             "case 6: all three killed mid-push and restarted: the file is on every tree")
    settled(h, nodes, "case 6")

    # 5. every node killed and restarted: packs reopen over crashed state
    want = {"c1.bin": digest1, "c2.bin": digest2, "c2b.bin": digest2b, "c3.bin": digest3,
            "c3b.bin": digest3b, "c4.bin": digest5b, "c6.bin": digest6, "c2c.bin": digest2c,
            "c7.bin": digest7b, "c1c.bin": digest1c}
    before = wait_until(lambda: same_trees(nodes), 30, interval=0.2, what="identical trees")
    for d in nodes:
        d.kill9()
    for d in nodes:
        d.restart(timeout=30)
    h.wait_formed(nodes, 60)
    try:
        wait_until(lambda: same_trees(nodes) == before, 30, interval=0.2,
                   what="the trees as they were")
        h.ok(all(before.get(k) == v for k, v in want.items()),
             "all killed and restarted: the trees are identical and unchanged",
             "%r\n%r" % (before, want))
    except HarnessError as e:
        h.ok(False, "all killed and restarted: the trees are identical and unchanged",
             "%s\n%s" % (e, sums_diff(nodes)))
    settled(h, nodes, "after the restart of all")
    codes = []
    for d in nodes:
        try:
            codes.append(d.stop(timeout=60))
        except HarnessError as e:
            codes.append(str(e))
    h.eq(codes, [0, 0, 0], "every node stops cleanly (exit 0; under the sanitizers, no leak)")
