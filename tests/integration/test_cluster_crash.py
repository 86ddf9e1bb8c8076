"""Crash safety under load: 20 rounds of kill -9 of a random node of a
3-node cluster at a random moment during a burst of concurrent probes from
several client threads; the killed node is restarted each round. Every
acknowledged probe (its index) must survive: at the end every acknowledged
index is <= the final commit index on every node, no two acknowledgements
share an index (one would have been overwritten), and the nodes agree."""

import os
import random
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, HarnessError  # noqa: E402

ROUNDS = int(os.environ.get("PB_CRASH_ROUNDS", "20"))
CLIENTS = 4
SEED = int(os.environ.get("PB_CRASH_SEED", str(random.randrange(1 << 30))))

with Harness("cluster-crash") as h:
    h.plan(ROUNDS + 6)
    h.diag("seed %d (PB_CRASH_SEED to repeat the kill schedule)" % SEED)
    rng = random.Random(SEED)
    t_start = time.monotonic()
    nodes = h.start_cluster(3, log_level="info")
    h.ok(True, "3-node cluster formed")

    acks = []  # (index, term, node, round)
    errors = {}
    lock = threading.Lock()

    def client(k, stop, rnd):
        crng = random.Random(SEED * 31 + rnd * 7 + k)
        while not stop.is_set():
            up = [d for d in nodes if d.alive()]
            if not up:
                stop.wait(0.01)
                continue
            node = up[crng.randrange(len(up))]
            r = node.probe(size=crng.choice((0, 64, 512)), timeout_s=2, timeout=4)
            with lock:
                if "result" in r:
                    acks.append((r["result"]["index"], r["result"]["term"], node.node_id, rnd))
                else:
                    c = r["error"].get("code")
                    errors[c] = errors.get(c, 0) + 1

    for rnd in range(1, ROUNDS + 1):
        stop = threading.Event()
        threads = [threading.Thread(target=client, args=(k, stop, rnd)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        # The burst runs for a random time before the kill (load timing, not a wait
        # for a condition), and a little after it.
        time.sleep(rng.uniform(0.05, 0.6))
        victim = nodes[rng.randrange(len(nodes))]
        victim.kill9()
        time.sleep(rng.uniform(0.0, 0.3))
        stop.set()
        for t in threads:
            t.join(10)
        try:
            victim.restart(timeout=20)
            # The next round starts once a leader commits again (no more than one
            # node is ever down).
            h.wait_leader(nodes, timeout=20)
            ok = True
            why = None
        except HarnessError as e:
            ok = False
            why = str(e)
        h.ok(ok, "round %d: kill -9 %s, restarted (%d acks so far)" % (rnd, victim.node_id,
                                                                       len(acks)), why)

    h.diag("acks %d, errors %r, %.1f s" % (len(acks), errors, time.monotonic() - t_start))
    h.ok(len(acks) >= ROUNDS, "probes were acknowledged (%d)" % len(acks))
    sts = h.wait_converged(nodes, timeout=60)
    h.ok(True, "the nodes converge: commit/applied %d, last_index %d, term %d"
         % (sts[0]["commit_index"], sts[0]["last_index"], sts[0]["term"]))
    top = max((a[0] for a in acks), default=0)
    lost = [a for a in acks if any(a[0] > st["commit_index"] for st in sts)]
    h.ok(not lost, "every acknowledged index <= the final commit index on every node "
         "(highest ack %d)" % top, "acks beyond commit: %r" % lost[:10])
    by_index = {}
    for a in acks:
        by_index.setdefault(a[0], []).append(a)
    dup = [v for v in by_index.values() if len(v) > 1]
    h.ok(not dup, "no two acknowledged probes share an index", "duplicates: %r" % dup[:5])
    codes = [d.stop(timeout=20) for d in nodes]
    h.eq(codes, [0, 0, 0], "all three stop cleanly")
