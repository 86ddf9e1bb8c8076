"""Membership through pickboxctl (cluster spec, life cycle and control
methods): a lone node joins with `pickboxctl join`, `members` lists the
voters, a second join is refused, `transfer NODE` and `transfer` move the
leadership, `remove NODE` drops a stopped member (through a follower),
`leave` makes a node exit 0 and disappear from the others' lists, and a node
with the wrong secret cannot join and says why."""

import json
import os
import re
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, pickboxctl_path, wait_until, HarnessError  # noqa: E402


def member_ids(st):
    return sorted(m.get("id") for m in (st or {}).get("members") or [])


with Harness("cluster-membership") as h:
    if pickboxctl_path() is None:
        h.skip_all("pickboxctl not built")
        sys.exit(0)
    h.plan(16)
    n1 = h.start_node("n1")
    wait_until(lambda: (n1.try_status() or {}).get("role") == "leader", 20, 0.05,
               "n1 to bootstrap")
    n2 = h.start_node("n2")  # bootstraps a one-node cluster of its own
    wait_until(lambda: (n2.try_status() or {}).get("role") == "leader", 20, 0.05,
               "n2 to bootstrap")
    r = h.ctl(n2, "join", n1.address)
    if not h.ok(r.returncode == 0 and "yes" in r.stdout,
                "pickboxctl join %s: the lone n2 joins n1's cluster" % n1.address,
                "rc=%d out=%r err=%r" % (r.returncode, r.stdout, r.stderr)):
        # Carry on with a node joined through --join so that the rest is checked.
        n2.kill9()
        n2 = h.start_node("n2j", join=n1)
    n3 = h.start_node("n3", join=n1)
    nodes = [n1, n2, n3]
    sts = h.wait_formed(nodes)
    h.ok(len({st["cluster_id"] for st in sts}) == 1, "n1, n2, n3 form one cluster of voters")

    r = h.ctl(n3, "members")
    rows = [ln for ln in r.stdout.splitlines() if re.match(r"\s+n[123]j?\s", ln)]
    h.ok(r.returncode == 0 and len(rows) == 3 and all("voter" in ln for ln in rows),
         "pickboxctl members shows 3 voter rows", r.stdout + r.stderr)
    r = h.ctl(n3, "--json", "members")
    ms = json.loads(r.stdout).get("members", []) if r.returncode == 0 else []
    h.ok(sorted(m["id"] for m in ms) == sorted(d.node_id for d in nodes)
         and sum(1 for m in ms if m.get("self")) == 1 and all(m["voter"] for m in ms),
         "pickboxctl --json members: 3 voters, one of them self", r.stdout + r.stderr)

    r = h.ctl(n2, "join", n1.address)
    h.ok(r.returncode == 1 and "INVALID_PARAMS" in r.stderr and "already" in r.stderr
         and r.stderr.count("\n") == 1,
         "a second join is refused in one line (INVALID_PARAMS, already a member)",
         "rc=%d err=%r" % (r.returncode, r.stderr))

    leader = h.wait_leader(nodes)
    target = [d for d in nodes if d is not leader][0]
    r = h.ctl(leader, "transfer", target.node_id)
    got = h.wait_leader(nodes)
    h.ok(r.returncode == 0 and got is target and target.node_id in r.stdout,
         "pickboxctl transfer %s: %s becomes leader" % (target.node_id, target.node_id),
         "rc=%d out=%r err=%r leader now %s" % (r.returncode, r.stdout, r.stderr, got.node_id))
    r = h.ctl(target, "--json", "transfer")
    new = json.loads(r.stdout).get("leader_id") if r.returncode == 0 else None
    got = h.wait_leader(nodes)
    h.ok(r.returncode == 0 and new != target.node_id and got.node_id == new,
         "pickboxctl transfer (no node): leadership moves to %s" % new,
         "rc=%d out=%r err=%r" % (r.returncode, r.stdout, r.stderr))

    leader = got
    victim, via = [d for d in nodes if d is not leader]
    h.eq(victim.stop(timeout=15), 0, "%s stops" % victim.node_id)
    r = h.ctl(via, "remove", victim.node_id)
    h.ok(r.returncode == 0 and victim.node_id in r.stdout,
         "pickboxctl remove %s through the follower %s" % (victim.node_id, via.node_id),
         "rc=%d out=%r err=%r" % (r.returncode, r.stdout, r.stderr))
    live = [leader, via]
    h._poll(live, lambda sts: all(st is not None and victim.node_id not in member_ids(st)
                                  for st in sts) and sts, 20,
            "%s to disappear from the members lists" % victim.node_id)
    h.ok(True, "%s is gone from every members list" % victim.node_id)
    r = h.ctl(via, "remove", "nosuchnode")
    h.ok(r.returncode == 1 and "INVALID_PARAMS" in r.stderr,
         "remove of an unknown node: INVALID_PARAMS", "rc=%d err=%r" % (r.returncode, r.stderr))

    n4 = h.start_node("n4", join=leader)
    h.wait_formed(live + [n4])
    r = h.ctl(n4, "leave")
    h.ok(r.returncode == 0, "pickboxctl leave on n4", "rc=%d out=%r err=%r"
         % (r.returncode, r.stdout, r.stderr))
    try:
        code = n4.wait_exit(30)
    except HarnessError as e:
        code = str(e)
    h.eq(code, 0, "n4 exits 0 after leaving")
    h._poll(live, lambda sts: all(st is not None and member_ids(st) == sorted(
        d.node_id for d in live) for st in sts) and sts, 20, "n4 to leave the members lists")
    h.ok(True, "the others' members lists no longer have n4")

    n5 = h.start_node("n5", join=leader, secret="wrong-secret")
    pat = r"(?i)authentication failed.*secret"
    try:
        wait_until(lambda: n5.log_has(pat), 20, 0.1,
                   "an authentication error in n5's log")
        said = True
    except HarnessError:
        said = False
    st5 = n5.try_status()
    h.ok(said and "n5" not in member_ids(leader.status())
         and (st5 is None and not n5.alive()
              or st5.get("joining") is True and st5.get("cluster_id") is None),
         "n5 with the wrong secret is not let in, and its log says why",
         "n5 status %r" % st5)
    codes = [d.stop(timeout=15) for d in live]
    h.eq(codes, [0, 0], "the remaining members stop cleanly (exit 0)")
    n5.kill()
