#!/usr/bin/env python3
"""Big files' chunks pushed beside the Raft log (doc/decisions.md D13).

1. Three nodes: a 24 MiB file written on a follower reaches every tree with
   the same SHA-256; the writer pushed its chunks (status chunk_push counters
   of the writer and the receivers grew), the writer proposed only the REFS
   entries and the PUT (tree.proposed_bytes grew by far less than the file)
   and the leader's raft.db (+ WAL) did not grow by the file's size.
   The writer cut off from both peers cannot push to a majority: it falls
   back to CHUNKS entries, and the file reaches every tree once healed.
2. A follower is down while another big file is written: the two live nodes
   get it through the push; the follower, back, gets it too (fetched bytes).
3. Two nodes, one speaking only protocol version 1 (PICKBOX_TEST_PROTO_MAX=1,
   as before D13): the file travels as CHUNKS entries (no push, the writer's
   proposed bytes cover the file) and still reaches both trees.
"""

import hashlib
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import treeharness as th  # noqa: E402

MIB = 1024 * 1024


def write_random(d, rel, size):
    """size random bytes written next to d's tree, renamed into it (one
    event, as a finished download); returns the SHA-256."""
    h = hashlib.sha256()
    tmp = os.path.join(d.dir, "push.part")
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            b = os.urandom(min(left, 4 * MIB))
            h.update(b)
            f.write(b)
            left -= len(b)
    os.rename(tmp, os.path.join(d.data_dir, rel))
    return h.hexdigest()


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


def has_file(nodes, rel, digest):
    return all(sha(os.path.join(d.data_dir, rel)) == digest for d in nodes)


def push_stats(d):
    return th.status(d).get("chunk_push", {})


def tree(d):
    return th.status(d).get("tree", {})


def raft_bytes(d):
    n = 0
    for name in ("raft.db", "raft.db-wal"):
        try:
            n += os.path.getsize(os.path.join(d.state_dir, name))
        except OSError:
            pass
    return n


def start_two(h, env2):
    n1 = h.start_daemon("m1", args=th.DEFAULT_TIMING)
    wait_until(lambda: th.status(n1).get("role") == "leader", 10, what="m1 to lead")
    secret = os.path.join(n1.state_dir, "secret")
    wait_until(lambda: os.path.exists(secret), 5, what="m1's secret")
    n2 = h.start_daemon("m2", args=th.DEFAULT_TIMING + [
        "--join", "127.0.0.1:%d" % n1.port, "--secret-file", secret], env=env2)
    for d in (n1, n2):
        wait_until(lambda d=d: th.member_ok(d, 2), 30, what="%s to be a member" % d.node_id)
    return n1, n2


with Harness("tree-push") as h:
    h.plan(9)
    nodes = th.start_cluster(h, 3, timing=th.DEFAULT_TIMING, env={"PICKBOX_TEST_HOOKS": "1"})
    wait_until(lambda: all(th.status(d).get("leader_id") for d in nodes), 20,
               what="a leader everywhere")
    leader_id = th.status(nodes[0]).get("leader_id")
    leader = next(d for d in nodes if d.node_id == leader_id)
    writer = next(d for d in nodes if d.node_id != leader_id)
    other = next(d for d in nodes if d not in (leader, writer))

    # 1. pushed to everyone
    size = 24 * MIB
    raft0 = raft_bytes(leader)
    prop0 = tree(writer).get("proposed_bytes", 0)
    recv0 = {d.node_id: push_stats(d).get("received_bytes", 0) for d in nodes}
    digest = write_random(writer, "big1.bin", size)
    try:
        wait_until(lambda: has_file(nodes, "big1.bin", digest), 60, interval=0.3,
                   what="big1.bin in every tree")
        h.ok(True, "a %d MiB file reached all three trees (same SHA-256)" % (size // MIB))
    except HarnessError as e:
        h.ok(False, "a big file reached all three trees", str(e))
    ws, wt = push_stats(writer), tree(writer)
    recv = {d.node_id: push_stats(d).get("received_bytes", 0) - recv0[d.node_id]
            for d in (leader, other)}
    h.ok(ws.get("acked_bytes", 0) >= size and wt.get("pushed_files", 0) >= 1 and
         all(v > 0 for v in recv.values()),
         "the writer pushed its chunks (acked %d bytes, received %r)" %
         (ws.get("acked_bytes", 0), recv), repr(ws))
    prop = wt.get("proposed_bytes", 0) - prop0
    grown = raft_bytes(leader) - raft0
    h.ok(prop < size // 10 and grown < size // 2,
         "the log carried no chunk bytes: writer proposed %d bytes, leader's raft.db grew %d"
         % (prop, grown))

    # 1b. the writer cut off from both peers: no majority can hold the chunks,
    # so the push falls back and the file goes as CHUNKS entries once healed
    fb0 = tree(writer).get("push_fallbacks", 0)
    for d in (leader, other):
        th.cut(writer, d, True)
    digest_c = write_random(writer, "cut.bin", 6 * MIB)
    try:
        wait_until(lambda: tree(writer).get("push_fallbacks", 0) > fb0, 30, interval=0.2,
                   what="the push to fall back")
    finally:
        for d in (leader, other):
            th.cut(writer, d, False)
    try:
        wait_until(lambda: has_file(nodes, "cut.bin", digest_c), 90, interval=0.3,
                   what="cut.bin in every tree")
        h.ok(True, "cut off, the writer fell back to CHUNKS entries; healed, the file reached "
             "all three trees")
    except HarnessError as e:
        h.ok(False, "the file written while cut off reached all three trees", str(e))

    # 2. a follower down during the push fetches the bytes once back
    h.eq(other.stop(timeout=15), 0, "%s stops" % other.node_id)
    pushed0 = tree(writer).get("pushed_files", 0)
    digest2 = write_random(writer, "big2.bin", 12 * MIB)
    try:
        wait_until(lambda: has_file([leader, writer], "big2.bin", digest2), 60, interval=0.3,
                   what="big2.bin on the live nodes")
        h.ok(tree(writer).get("pushed_files", 0) > pushed0,
             "with %s down the file reached the live nodes through a push" % other.node_id)
    except HarnessError as e:
        h.ok(False, "the file reached the live nodes", str(e))
    secret = os.path.join(nodes[0].state_dir, "secret")
    other = h.start_daemon(other.node_id, args=th.DEFAULT_TIMING + ["--secret-file", secret],
                           port=other.port)
    try:
        wait_until(lambda: has_file([other], "big2.bin", digest2), 60, interval=0.3,
                   what="big2.bin on %s" % other.node_id)
        h.ok(tree(other).get("fetched_bytes", 0) > 0,
             "%s, back, has the file (fetched %d bytes from peers)" %
             (other.node_id, tree(other).get("fetched_bytes", 0)))
    except HarnessError as e:
        h.ok(False, "the node back has the file", str(e))
    for d in (leader, writer, other):
        d.stop(timeout=15)

    # 3. a node speaking only version 1: CHUNKS entries, as before
    m1, m2 = start_two(h, {"PICKBOX_TEST_PROTO_MAX": "1"})
    prop0 = tree(m1).get("proposed_bytes", 0)
    size3 = 8 * MIB
    digest3 = write_random(m1, "big3.bin", size3)
    try:
        wait_until(lambda: has_file([m1, m2], "big3.bin", digest3), 60, interval=0.3,
                   what="big3.bin on both nodes")
        h.ok(True, "with a version 1 node the file reached both trees")
    except HarnessError as e:
        h.ok(False, "with a version 1 node the file reached both trees", str(e))
    prop = tree(m1).get("proposed_bytes", 0) - prop0
    h.ok(push_stats(m1).get("sent_frames", 0) == 0 and tree(m1).get("pushed_files", 0) == 0 and
         prop >= size3,
         "no push toward a version 1 node: the chunks went in the log (%d bytes proposed)" % prop)
    for d in (m1, m2):
        d.stop(timeout=15)
