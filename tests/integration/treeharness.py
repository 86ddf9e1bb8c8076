"""treeharness: helpers for the tree replication tests (test_tree_*.py).

Starts an N-node cluster with short Raft timeouts (n1 bootstraps, the others
join through n1 with n1's secret), and polls trees and status with deadlines.
"""

import errno
import os
import time

from pbharness import HarnessError, wait_until

FAST = ["--election-timeout-ms", "300", "--heartbeat-ms", "30"]
# The daemon's own defaults, for tests that move MiB-sized entries: a leader
# busy for a few hundred ms persisting or materializing them on a loaded
# 2-core machine misses FAST's heartbeats, and the elections that follow can
# go on for minutes (doc/fsm.md, "Materializing a big PUT blocks the node").
DEFAULT_TIMING = ["--election-timeout-ms", "1000", "--heartbeat-ms", "100"]


def start_cluster(h, n, extra=(), env=None, timing=None):
    """timing: the Raft timing arguments, FAST unless given."""
    timing = list(FAST if timing is None else timing)
    nodes = [h.start_daemon("n1", args=timing + list(extra), env=env)]
    wait_until(lambda: status(nodes[0]).get("role") == "leader", 10, what="n1 to lead")
    secret = os.path.join(nodes[0].state_dir, "secret")
    wait_until(lambda: os.path.exists(secret), 5, what="n1's secret")
    for i in range(2, n + 1):
        d = h.start_daemon("n%d" % i, args=timing + list(extra) + [
            "--join", "127.0.0.1:%d" % nodes[0].port, "--secret-file", secret], env=env)
        nodes.append(d)
    for d in nodes:
        wait_until(lambda d=d: member_ok(d, n), 20, what="%s to be a member" % d.node_id)
    return nodes


def member_ok(d, n):
    st = status(d)
    ms = st.get("members", [])
    return (not st.get("joining")) and len(ms) == n and all(m.get("voter") for m in ms) and \
        st.get("leader_id") is not None


def status(d):
    """The status result, {} when d does not answer within 10 s."""
    try:
        r = d.call("status", timeout=10)
    except (OSError, HarnessError):
        return {}
    return r.get("result", {})


class TreeChanging(Exception):
    """An entry vanished while the tree was read: a daemon is changing it."""


def snapshot_tree(root, attempts=50):
    """{relative path: ("f", bytes, mode) | ("d", mode) | ("l", target)}, without .pickbox.
    Read again (10 ms apart) while entries vanish under the walk; raises
    TreeChanging when the tree never holds still for a whole read."""
    for i in range(attempts):
        try:
            return _snapshot_once(root)
        except TreeChanging:
            if i == attempts - 1:
                raise
            time.sleep(0.01)


def _snapshot_once(root):
    out = {}
    try:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir == ".":
                rel_dir = ""
            if rel_dir == "" and ".pickbox" in dirnames:
                dirnames.remove(".pickbox")
            for name in list(dirnames):
                p = os.path.join(dirpath, name)
                rel = os.path.join(rel_dir, name)
                if os.path.islink(p):
                    out[rel] = ("l", os.readlink(p))
                    dirnames.remove(name)
                else:
                    out[rel] = ("d", os.lstat(p).st_mode & 0o777)
            for name in filenames:
                if name.startswith(".pickbox.tmp."):
                    continue
                p = os.path.join(dirpath, name)
                rel = os.path.join(rel_dir, name)
                if os.path.islink(p):
                    out[rel] = ("l", os.readlink(p))
                    continue
                with open(p, "rb") as f:
                    out[rel] = ("f", f.read(), os.lstat(p).st_mode & 0o777)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        # An entry was replaced (a file by a directory, or the reverse)
        # or removed between listing and reading it.
        raise TreeChanging(str(e))
    except OSError as e:
        if e.errno != errno.EINVAL:  # readlink() of what is no longer a link
            raise
        raise TreeChanging(str(e))
    return out


def trees_equal(nodes):
    try:
        snaps = [snapshot_tree(d.data_dir) for d in nodes]
    except TreeChanging:
        return False
    return all(s == snaps[0] for s in snaps[1:])


def wait_converged(nodes, timeout=20, pred=None):
    """Waits until every tree is identical (and pred(tree) holds); returns the tree."""
    def check():
        try:
            snaps = [snapshot_tree(d.data_dir, attempts=1) for d in nodes]
        except TreeChanging:
            return None
        if not all(s == snaps[0] for s in snaps[1:]):
            return None
        if pred is not None and not pred(snaps[0]):
            return None
        return snaps[0] or True
    t = wait_until(check, timeout, interval=0.05, what="the trees to converge")
    return t if isinstance(t, dict) else {}


def write(path, data, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(data)


def tree_diff(nodes):
    snaps = [snapshot_tree(d.data_dir) for d in nodes]
    lines = []
    keys = set()
    for s in snaps:
        keys |= set(s)
    for k in sorted(keys):
        vals = [s.get(k) for s in snaps]
        if any(v != vals[0] for v in vals):
            lines.append("%s: %r" % (k, vals))
    return "\n".join(lines[:40])


def cut(a, b, on):
    """Cuts (on=True) or heals the link between daemons a and b at both ends
    (the debug_partition hook: the daemons run with PICKBOX_TEST_HOOKS=1)."""
    for x, y in ((a, b), (b, a)):
        r = x.request("debug_partition", {"node": y.node_id, "on": on})
        if "result" not in r:
            raise HarnessError("debug_partition %s -> %s: %r" % (x.node_id, y.node_id, r))
