#!/usr/bin/env python3
"""Big files written into the trees off the Raft ready cycle (issue 5, item 4:
"a 1 GiB file neither stalls heartbeats nor needs 1 GiB of memory").

Three nodes with the daemon's default timeouts; files of 1 MiB or more are
written by each node's background writer (PICKBOX_TEST_BIGWRITE_BYTES; the
default is 8 MiB). Each node gets its own PICKBOX_TEST_BIGWRITE_HOLD file:
while it exists, that node's worker pauses after each chunk, so "a big file
is being written on node X" is a state the test holds, not a race it hopes
to win. Checked:

1. a big file written on a follower reaches every tree byte-identical, and
   every node wrote it in the background; the term does not change
   meanwhile (no election: the apply no longer stops heartbeats);
2. while X's write is held: X's status says tree.writing 1, the file is not
   in X's tree, and `sync` does not answer "done" (it waits for X);
3. SIGTERM while X's write is held: X stops cleanly within seconds, leaves
   no temp, and writes the file at its next start (startup repair);
4. kill -9 while X's write is half done: after restart the temp is gone and
   the file is right;
5. a rename committed while X's write is held waits for it: once released,
   X holds the file at the new name only;
6. a delete committed while X's write is held drops the job at once (X's
   tree never gets the file, even before the hold is released).

PICKBOX_BIGWRITE_MIB sets the size of the first file (default 64).
"""

import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError, wait_until  # noqa: E402
import test_tree_bigfile as tb  # noqa: E402
import treeharness as th  # noqa: E402

MIB = 1024 * 1024
SMALL = 8 * MIB  # the held files: anything over the 1 MiB threshold


def hold_path(h, node_id):
    return os.path.join(h.tmpdir, "%s.hold" % node_id)


def start_cluster(h):
    nodes = []
    for i in range(1, 4):
        nid = "n%d" % i
        env = {"PICKBOX_TEST_BIGWRITE_BYTES": str(MIB),
               "PICKBOX_TEST_BIGWRITE_HOLD": hold_path(h, nid)}
        args = list(tb.DEFAULT_TIMEOUTS)
        if i > 1:
            secret = os.path.join(nodes[0].state_dir, "secret")
            args += ["--join", "127.0.0.1:%d" % nodes[0].port, "--secret-file", secret]
        nodes.append(h.start_daemon(nid, args=args, env=env))
        if i == 1:
            wait_until(lambda: th.status(nodes[0]).get("role") == "leader", 10,
                       what="n1 to lead")
            wait_until(lambda: os.path.exists(os.path.join(nodes[0].state_dir, "secret")), 5,
                       what="n1's secret")
    for d in nodes:
        wait_until(lambda d=d: th.member_ok(d, 3), 30, what="%s to be a member" % d.node_id)
    return nodes


def sha(path):
    try:
        return tb.file_sha256(path)
    except OSError:
        return None


def temps(d):
    n = 0
    for _, _, files in os.walk(d.data_dir):
        n += sum(1 for f in files if f.startswith(".pickbox.tmp."))
    return n


def writing(d):
    return th.status(d).get("tree", {}).get("writing")


def hold(h, d, on):
    p = hold_path(h, d.node_id)
    if on:
        open(p, "w").close()
    elif os.path.exists(p):
        os.unlink(p)


def held_write(h, writer, x, rel, size):
    """Holds x's worker, writes rel on writer, waits until x is writing it
    with a temp on disk; returns the file's SHA-256."""
    hold(h, x, True)
    digest = tb.write_random(writer, rel, size)
    wait_until(lambda: writing(x) == 1 and temps(x) == 1, 120, interval=0.05,
               what="%s to be writing %s" % (x.node_id, rel))
    return digest


def in_all(nodes, rel, digest):
    return all(sha(os.path.join(d.data_dir, rel)) == digest for d in nodes)


def main():
    size = int(os.environ.get("PICKBOX_BIGWRITE_MIB", "64")) * MIB
    with Harness("tree_bigwrite") as h:
        h.plan(13)
        nodes = start_cluster(h)
        wait_until(lambda: all(th.status(d).get("leader_id") for d in nodes), 20,
                   what="a leader everywhere")
        leader_id = th.status(nodes[0]).get("leader_id")
        writer = next(d for d in nodes if d.node_id != leader_id)
        x = next(d for d in nodes if d is not writer and d.node_id != leader_id)
        y = next(d for d in nodes if d is not writer and d is not x)
        h.diag("leader %s, writer %s, held node %s" % (leader_id, writer.node_id, x.node_id))

        # 1. The transfer, no election.
        terms0 = {d.node_id: th.status(d).get("term") for d in nodes}
        s = tb.Sampler(nodes)
        s.start()
        t0 = time.monotonic()
        digest = tb.write_random(writer, "big1.bin", size)
        try:
            wait_until(lambda: in_all(nodes, "big1.bin", digest), 600, interval=0.2,
                       what="big1.bin in every tree")
            ok = True
        except HarnessError:
            ok = False
        dt = time.monotonic() - t0
        s.stop()
        terms1 = {d.node_id: th.status(d).get("term") for d in nodes}
        h.ok(ok, "a %d MiB file reaches every tree byte-identical (%.1f s)" % (size // MIB, dt))
        # (a node that lost entries in an election may write it in a repair)
        bg = [d.node_id for d in nodes
              if d.log_has(r"materialized big1\.bin: \d+ bytes in \d+ ms \(in the background")]
        h.ok(any(n != writer.node_id for n in bg),
             "the nodes wrote it in the background (%s)" % ", ".join(bg))
        # A machine loaded far beyond its cores (make check -j with other
        # suites) misses heartbeats with no big file at all: then TODO.
        tb.ok_or_todo(h, terms0 == terms1 and s.terms and
                      max(len(v) for v in s.terms.values()) == 1,
                      "no election while it travels (terms %r -> %r; the leader's largest "
                      "last_contact_ms %d)" % (terms0, terms1, s.max_contact),
                      "load: %.1f" % os.getloadavg()[0] if os.getloadavg()[0] > 2 * (
                          os.cpu_count() or 1) else None)

        # 2. A held write: status and sync see it.
        d2 = held_write(h, writer, x, "big2.bin", SMALL)
        h.ok(not os.path.exists(os.path.join(x.data_dir, "big2.bin")),
             "while %s's write is held, big2.bin is not in its tree (writing %r)"
             % (x.node_id, writing(x)))
        wait_until(lambda: in_all([writer, y], "big2.bin", d2), 300, what="big2.bin elsewhere")
        r = writer.request("sync", {"timeout_s": 2}, timeout=20)
        h.ok("error" in r and x.node_id in r["error"].get("message", ""),
             "sync does not answer before %s has the file in its tree: %r" % (x.node_id, r))

        # 3. SIGTERM while it is held.
        t1 = time.monotonic()
        rc = x.stop(timeout=20)
        h.ok(rc == 0 and temps(x) == 0,
             "SIGTERM during the write: exit %r in %.1f s, %d temp(s) left"
             % (rc, time.monotonic() - t1, temps(x)))
        x.restart(timeout=180)
        wait_until(lambda: in_all([x], "big2.bin", d2), 300, what="big2.bin on %s" % x.node_id)
        r = writer.request("sync", {"timeout_s": 120}, timeout=130)
        h.ok("result" in r and in_all(nodes, "big2.bin", d2),
             "after the restart the startup repair wrote it, and sync answers: %r" % r)

        # 4. kill -9 while a temp is half written.
        d3 = held_write(h, writer, x, "big3.bin", SMALL)
        x.kill9()
        hold(h, x, False)
        h.ok(temps(x) == 1 and not os.path.exists(os.path.join(x.data_dir, "big3.bin")),
             "kill -9 during the write leaves the half-written temp and no big3.bin")
        x.restart(timeout=180)
        wait_until(lambda: in_all(nodes, "big3.bin", d3), 300, what="big3.bin everywhere")
        h.ok(temps(x) == 0, "after the restart the temp is gone and big3.bin is right")

        # 5. A rename committed while the write is held waits for it.
        d4 = held_write(h, writer, x, "big4.bin", SMALL)
        wait_until(lambda: in_all([writer, y], "big4.bin", d4), 300, what="big4.bin elsewhere")
        os.rename(os.path.join(writer.data_dir, "big4.bin"),
                  os.path.join(writer.data_dir, "big5.bin"))
        wait_until(lambda: in_all([y], "big5.bin", d4), 300, what="the rename on %s" % y.node_id)
        hold(h, x, False)
        try:
            th.wait_converged(nodes, 300,
                              pred=lambda t: "big5.bin" in t and "big4.bin" not in t)
            ok = in_all(nodes, "big5.bin", d4)
        except HarnessError:
            ok = False
        h.ok(ok and temps(x) == 0, "a rename right after the write: every tree holds big5.bin "
             "only (%s)" % th.tree_diff(nodes))

        # 6. A delete committed while the write is held drops it.
        held_write(h, writer, x, "big6.bin", SMALL)
        wait_until(lambda: os.path.exists(os.path.join(y.data_dir, "big6.bin")), 300,
                   what="big6.bin on %s" % y.node_id)
        os.unlink(os.path.join(writer.data_dir, "big6.bin"))
        try:
            wait_until(lambda: writing(x) == 0 and temps(x) == 0 and not any(
                os.path.exists(os.path.join(d.data_dir, "big6.bin")) for d in nodes), 300,
                what="the delete everywhere")
            ok = True
        except HarnessError:
            ok = False
        h.ok(ok, "a delete right after the write drops %s's job while it is still held"
             % x.node_id)
        hold(h, x, False)
        h.ok(th.trees_equal(nodes), "the trees are identical at the end (%s)"
             % th.tree_diff(nodes))
        h.diag("%s's background writes:\n%s" % (x.node_id, "\n".join(
            line for line in x.log_text().splitlines()
            if "bigwrite" in line or "materialized" in line)))
        h.ok(not any(d.log_has(r"tree could not follow|bigwrite .*: .*repaired") for d in nodes),
             "no tree error on any node")


if __name__ == "__main__":
    main()
