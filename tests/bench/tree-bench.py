#!/usr/bin/env python3
"""tree-bench.py: how fast a 3-node loopback pickbox cluster replicates a tree
(issue 5, item 2), next to Syncthing 1.19 and a plain `cp` to two other dirs.

    tests/bench/tree-bench.py [--build DIR] [--json] [--dir TMPDIR] [--only a,b]
                              [--keep] [--big-mib N] [--files N] [--fast]
                              [--timeout S] [--perf 'CMD with %p and %s']

--perf runs a profiler per node around each scenario, e.g.
  --perf 'perf record -g -p %p -o /tmp/%s.data'   or
  --perf 'strace -c -f -w -p %p -o /tmp/%s.txt'   (%s = scenario.node)

It builds nothing: it runs DIR/src/pickboxd (DIR from --build, else
$top_builddir, else _build, else the source tree). It starts its own cluster
(default Raft timings, log level notice, fsync on) in a private temp dir on
free loopback ports, runs the scenarios in order, and stops only the daemons
it started, by PID.

"All trees hold it" is detected by polling the three trees, not by
`pickboxctl sync`: sync answers once every reachable node has *applied* the
log up to the commit index, which neither covers a change still in the
writer's watcher debounce (not proposed yet) nor says that the apply reached
the tree (materializing is after the state.db commit). Polling looks at what a
user would see. Each poll lstat()s every file of every tree (scandir) and
compares the set of paths and sizes with what the scenario must produce; a
file that must change without changing size (the 10-byte edit) must also have
a new (inode, mtime, ctime). When a poll passes, every file is hashed
(SHA-256, cached by path+inode+size+mtime+ctime) and compared with the
expected content; the time reported is that of the passing poll, and only if
the files hashed are still the very files (same stat) that poll saw. A
scenario whose trees never hold the right content reports FAIL, not a time.
Poll interval: 2 ms for the single-file latency, 10 ms otherwise, but at
least twice what the last poll cost (the bench shares the CPUs it measures).

Times start just before the first byte is written (like the `cp` figures,
they include writing the source tree). Bytes sent: the sum over nodes of the
per-peer byte counters (`pickboxctl metrics` / `status` members'
`bytes_sent`) when the daemon has them; else the bytes acknowledged on the
cluster's peer TCP connections (tcp_info from `ss -ti`, both ends, diffed
around the step: exact unless a link reconnects meanwhile); else the loopback
interface's TX counter from /proc/net/dev (approximate: every process on lo
counts, and on a shared machine that is a lot). Peak RSS: VmHWM of each pickboxd pid at the end.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

# Syncthing 1.19 and `cp` figures from issue 5 (seconds; bytes for the edit).
REFERENCE = {
    "latency_p50": (1.0, 0.007),
    "latency_p99": (1.0, 0.007),
    "files_1000": (3.9, 1.2),
    "files_3x200": (3.8, 0.6),
    "big_file": (3.3, 0.7),
    "big_edit": (3.0, 0.2),
    "delete_1000": ((1.6, 7.5), 0.04),
    "rename_dir": ((1.6, 6.8), 0.01),
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", help="build dir holding src/pickboxd (default $top_builddir "
                    "or _build)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--dir", help="where the nodes live (default $TMPDIR or /tmp)")
    ap.add_argument("--only", help="comma-separated scenarios to run (default all): latency,"
                    "files,three,big,edit,delete,rename")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--big-mib", type=int, default=256, help="size of the big file [256]")
    ap.add_argument("--files", type=int, default=1000, help="files in the many-files step [1000]")
    ap.add_argument("--latency-writes", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=300.0, help="per scenario [300 s]")
    ap.add_argument("--fast", action="store_true", help="short Raft timings (tests' FAST)")
    ap.add_argument("--perf", help="run CMD with %%p = a node's pid around each scenario, "
                    "e.g. 'perf record -g -p %%p -o /tmp/x.%%s.data' (%%s = scenario)")
    return ap.parse_args()


def find_build(arg):
    cands = [arg] if arg else []
    if os.environ.get("top_builddir"):
        cands.append(os.environ["top_builddir"])
    top = os.path.abspath(os.path.join(HERE, "..", ".."))
    cands += [os.path.join(top, "_build"), top]
    for c in cands:
        if c and os.access(os.path.join(c, "src", "pickboxd"), os.X_OK):
            return os.path.abspath(c)
    sys.exit("tree-bench: no src/pickboxd under %s; build first" % ", ".join(c for c in cands if c))


ARGS = parse_args()
os.environ["top_builddir"] = find_build(ARGS.build)
if ARGS.dir:
    os.environ["TMPDIR"] = ARGS.dir

import pbharness  # noqa: E402  (needs top_builddir and TMPDIR first)
from pbharness import Harness, HarnessError  # noqa: E402


class BenchFail(Exception):
    pass


# ---- looking at trees -------------------------------------------------------

def scan_tree(root):
    """{rel path: os.stat_result} of every regular file (dirs as None), without
    .pickbox/ and .pickbox.tmp.* (temp files of an apply in progress)."""
    out = {}
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        with it:
            for e in it:
                if e.name.startswith(".pickbox.tmp."):
                    continue
                if rel == "" and e.name == ".pickbox":
                    continue
                r = e.name if rel == "" else rel + "/" + e.name
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.is_dir(follow_symlinks=False):
                    out[r] = None
                    stack.append((r, e.path))
                else:
                    out[r] = st
    return out


def skey(st):
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Tree:
    def __init__(self, node):
        self.node = node
        self.root = node.data_dir
        self.cache = {}  # path -> (skey, sha256 hex)

    def sha(self, rel, st):
        k = skey(st)
        c = self.cache.get(rel)
        if c and c[0] == k:
            return c[1]
        h = hashlib.sha256()
        p = os.path.join(self.root, rel)
        try:
            with open(p, "rb") as f:
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
            st2 = os.lstat(p)
        except OSError:
            return None
        if skey(st2) != k:
            return None  # changed while hashed: not the file the poll saw
        self.cache[rel] = (k, h.hexdigest())
        return self.cache[rel][1]


class Model:
    """What every tree must hold: {path: (size, sha256)} for files, None for dirs."""

    def __init__(self):
        self.files = {}

    def add(self, rel, data):
        self.files[rel] = (len(data), hashlib.sha256(data).hexdigest())
        d = os.path.dirname(rel)
        while d:
            self.files.setdefault(d, None)
            d = os.path.dirname(d)


def cheap_ok(scan, model, must_change=None):
    if len(scan) != len(model.files):
        return False
    for rel, want in model.files.items():
        st = scan.get(rel, False)
        if st is False:
            return False
        if want is None:
            if st is not None:
                return False
            continue
        if st is None or st.st_size != want[0]:
            return False
        if must_change and rel in must_change and skey(st) == must_change[rel]:
            return False
    return True


def wait_trees(trees, model, t0, timeout, interval=0.01, must_change=None, paths=None):
    """Polls until every tree holds exactly model (see the file comment);
    returns seconds since t0 of the first poll whose files verified.
    must_change: {tree index: {path: skey before}}. paths: only these paths
    are looked at (a subset check, for the latency step)."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if paths is not None:
            scans = []
            for t in trees:
                s = {}
                for p in paths:
                    try:
                        s[p] = os.lstat(os.path.join(t.root, p))
                    except OSError:
                        pass
                scans.append(s)
            sub = Model()
            sub.files = {p: model.files[p] for p in paths}
            m = sub
        else:
            # One tree at a time, stopping at the first that is not there yet.
            scans = []
            for i, t in enumerate(trees):
                scans.append(scan_tree(t.root))
                if not cheap_ok(scans[-1], model, (must_change or {}).get(i)):
                    break
            m = model
        if len(scans) == len(trees) and \
                all(cheap_ok(s, m, (must_change or {}).get(i)) for i, s in enumerate(scans)):
            good = True
            for t, s in zip(trees, scans):
                for rel, want in m.files.items():
                    if want is not None and t.sha(rel, s[rel]) != want[1]:
                        good = False
                        break
                if not good:
                    break
            if good:
                return now - t0
        if now >= deadline:
            raise BenchFail("trees did not converge within %.0f s:\n%s" % (
                timeout, describe(trees, model)))
        # The bench shares the CPUs with the daemons it measures: a poll
        # costs at most a third of one CPU (resolution: the poll's cost).
        time.sleep(max(interval, 2 * (time.monotonic() - now)))


def describe(trees, model):
    lines = []
    for t in trees:
        s = scan_tree(t.root)
        missing = [p for p in model.files if p not in s]
        extra = [p for p in s if p not in model.files]
        wrong = [p for p, w in model.files.items() if p in s and w is not None and
                 (s[p] is None or s[p].st_size != w[0] or t.sha(p, s[p]) != w[1])]
        lines.append("%s: %d missing %s, %d extra %s, %d wrong %s" % (
            t.node.node_id, len(missing), missing[:3], len(extra), extra[:3], len(wrong),
            wrong[:3]))
    return "\n".join(lines)


# ---- counters -----------------------------------------------------------------

def lo_tx_bytes():
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                return int(line.split(":", 1)[1].split()[8])
    return 0


def ss_bytes(ports):
    """{connection: bytes acknowledged} of every established TCP connection
    from or to one of ports (tcp_info via ss(8)); both ends of a peer link
    are there, so the sum is what all nodes sent to each other. None
    without ss."""
    import subprocess
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    conns, key = {}, None
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            f = line.split()
            ends = [a.rsplit(":", 1)[-1] for a in f[-2:]] if len(f) >= 2 else []
            key = tuple(f[-2:]) if any(e.isdigit() and int(e) in ports for e in ends) else None
            continue
        if key is not None:
            for tok in line.split():
                if tok.startswith("bytes_acked:"):
                    conns[key] = int(tok.split(":", 1)[1])
    return conns


def peer_bytes(nodes):
    """(counter, source): what all nodes sent to peers so far, from the
    daemons' counters; else from tcp_info of the peer connections (ss), as
    {connection: bytes}; else from the loopback interface (approximate:
    everything on lo counts). bytes_between() takes the difference."""
    total = 0
    for d in nodes:
        got = None
        for method in ("metrics", "status"):
            r = d.request(method, timeout=5).get("result")
            if not isinstance(r, dict):
                continue
            if isinstance(r.get("bytes_sent"), int):
                got = r["bytes_sent"]
                break
            ms = r.get("members") or r.get("peers") or []
            vals = [m.get("bytes_sent") for m in ms if isinstance(m, dict)]
            vals = [v for v in vals if isinstance(v, int)]
            if vals:
                got = sum(vals)
                break
        if got is None:
            b = ss_bytes({d.port for d in nodes})
            return (b, "tcp_info") if b is not None else (lo_tx_bytes(), "lo")
        total += got
    return total, "daemon"


def bytes_between(b0, b1):
    """Bytes sent between two peer_bytes() counters. For tcp_info, a link
    that reconnected meanwhile counts from its new start (what the old one
    sent after b0 is lost: an undercount, which the result says)."""
    if isinstance(b0, dict):
        return sum(v - b0.get(k, 0) if v >= b0.get(k, 0) else v for k, v in b1.items()), \
            any(k not in b1 for k in b0)
    return b1 - b0, False


def vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


# ---- scenarios ---------------------------------------------------------------

def write_file(root, rel, data):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def payload(tag, size):
    """Deterministic, incompressible-looking, distinct per tag."""
    seed = hashlib.sha256(tag.encode()).digest()
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(seed + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:size])


class Bench:
    def __init__(self, h, nodes):
        self.h = h
        self.nodes = nodes
        self.trees = [Tree(d) for d in nodes]
        self.model = Model()
        st = nodes[0].status()
        self.leader = st.get("leader_id")
        self.followers = [d for d in nodes if d.node_id != self.leader]
        self.writer = self.followers[0]
        self.results = {}

    def wait(self, t0, **kw):
        return wait_trees(self.trees, self.model, t0, ARGS.timeout, **kw)

    def settle(self):
        """Between scenarios: trees converged and nothing pending anywhere."""
        self.wait(time.monotonic())
        self.h.wait_converged(self.nodes, timeout=60, keys=("commit_index", "applied_index"))

    def latency(self):
        d = self.writer
        os.makedirs(os.path.join(d.data_dir, "lat"), exist_ok=True)
        self.model.files["lat"] = None
        self.settle()
        times = []
        for i in range(ARGS.latency_writes):
            rel = "lat/w%03d" % i
            data = payload(rel, 100)
            self.model.add(rel, data)
            t0 = time.monotonic()
            write_file(d.data_dir, rel, data)
            times.append(self.wait(t0, interval=0.002, paths=[rel]))
        times.sort()
        p50 = statistics.median(times)
        p99 = times[min(len(times) - 1, int(round(0.99 * len(times))) - 1)]
        self.results["latency_p50"] = {"s": p50}
        self.results["latency_p99"] = {"s": p99, "max_s": times[-1]}

    def files(self):
        d = self.writer
        todo = [("many/f%04d" % i, payload("many/f%04d" % i, 4096)) for i in range(ARGS.files)]
        for rel, data in todo:
            self.model.add(rel, data)
        t0 = time.monotonic()
        for rel, data in todo:
            write_file(d.data_dir, rel, data)
        tw = time.monotonic() - t0
        self.results["files_1000"] = {"s": self.wait(t0), "write_s": tw, "files": ARGS.files}

    def three(self):
        errs = []

        todo = [[("three/n%d/f%03d" % (k, i), payload("three/n%d/f%03d" % (k, i), 4096))
                 for i in range(200)] for k in range(3)]
        for part in todo:
            for rel, data in part:
                self.model.add(rel, data)

        def writer(d, k):
            try:
                for rel, data in todo[k]:
                    write_file(d.data_dir, rel, data)
            except OSError as e:
                errs.append(e)
        ths = [threading.Thread(target=writer, args=(d, k)) for k, d in enumerate(self.nodes)]
        t0 = time.monotonic()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        if errs:
            raise BenchFail("writing: %s" % errs[0])
        self.results["files_3x200"] = {"s": self.wait(t0)}

    def big(self):
        d = self.writer
        size = ARGS.big_mib << 20
        h = hashlib.sha256()
        block = 1 << 20
        p = os.path.join(d.data_dir, "big.bin")
        # Kept in memory so that the edit's expected hash is known before its clock starts.
        self.big_data = bytearray(os.urandom(size))
        view = memoryview(self.big_data)
        h.update(self.big_data)
        t0 = time.monotonic()
        with open(p, "wb") as f:
            for off in range(0, size, block):
                f.write(view[off:off + block])
        tw = time.monotonic() - t0
        self.model.files["big.bin"] = (size, h.hexdigest())
        self.results["big_file"] = {"s": self.wait(t0), "write_s": tw, "mib": ARGS.big_mib}

    def edit(self):
        d = self.writer
        p = os.path.join(d.data_dir, "big.bin")
        size = os.path.getsize(p)
        before = {i: {"big.bin": skey(os.lstat(os.path.join(t.root, "big.bin")))}
                  for i, t in enumerate(self.trees)}
        before.pop(self.nodes.index(d))  # the writer's own inode stays
        mid = size // 2
        self.big_data[mid:mid + 10] = b"0123456789"
        self.model.files["big.bin"] = (size, hashlib.sha256(self.big_data).hexdigest())
        b0, src = peer_bytes(self.nodes)
        t0 = time.monotonic()
        with open(p, "r+b") as f:
            f.seek(mid)
            f.write(b"0123456789")
        s = self.wait(t0, must_change=before)
        # What the apply sends settles with the indexes.
        self.h.wait_converged(self.nodes, timeout=60, keys=("commit_index", "applied_index"))
        b1, _ = peer_bytes(self.nodes)
        sent, lost = bytes_between(b0, b1)
        self.results["big_edit"] = {"s": s, "bytes_sent": sent, "bytes_source": src}
        if lost:
            self.results["big_edit"]["bytes_note"] = "a peer link reconnected: undercount"

    def delete(self):
        d = self.writer
        t0 = time.monotonic()
        shutil.rmtree(os.path.join(d.data_dir, "many"))
        for rel in [r for r in self.model.files if r == "many" or r.startswith("many/")]:
            del self.model.files[rel]
        self.results["delete_1000"] = {"s": self.wait(t0)}

    def rename_setup(self):
        d = self.writer
        for i in range(100):
            rel = "dir/f%03d" % i
            data = payload(rel, 4096)
            write_file(d.data_dir, rel, data)
            self.model.add(rel, data)
        self.settle()

    def rename(self):
        d = self.writer
        t0 = time.monotonic()
        os.rename(os.path.join(d.data_dir, "dir"), os.path.join(d.data_dir, "moved"))
        new = {}
        for rel, v in self.model.files.items():
            if rel == "dir" or rel.startswith("dir/"):
                rel = "moved" + rel[3:]
            new[rel] = v
        self.model.files = new
        self.results["rename_dir"] = {"s": self.wait(t0)}


STEPS = [
    ("latency", "latency", None),
    ("files", "files", None),
    ("three", "three", None),
    ("big", "big", None),
    ("edit", "edit", None),
    ("delete", "delete", None),
    ("rename", "rename", "rename_setup"),
]

LABELS = [
    ("latency_p50", "write on a follower -> 3 trees, p50"),
    ("latency_p99", "write on a follower -> 3 trees, p99"),
    ("files_1000", "1,000 x 4 KiB files from one node"),
    ("files_3x200", "200 files from each of 3 nodes at once"),
    ("big_file", "one %d MiB file" % ARGS.big_mib),
    ("big_edit", "10-byte change in its middle"),
    ("delete_1000", "delete the 1,000 files"),
    ("rename_dir", "rename a directory of 100 files"),
]


def fmt_ref(v):
    if isinstance(v, tuple):
        return "%.1f-%.1f s" % v
    return "%.3g s" % v if v < 0.1 else "%.1f s" % v


def run_perf(h, nodes, name):
    import shlex
    import subprocess
    if not ARGS.perf:
        return []
    procs = []
    for d in nodes:
        cmd = ARGS.perf.replace("%p", str(d.pid)).replace("%s", "%s.%s" % (name, d.node_id))
        procs.append(subprocess.Popen(shlex.split(cmd), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    time.sleep(0.5)  # let the profiler attach (not a wait for the daemons)
    return procs


def stop_perf(procs):
    import signal
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(60)
        except Exception:
            p.kill()


def main():
    only = set(ARGS.only.split(",")) if ARGS.only else None
    load0 = os.getloadavg()
    out = {"nodes": 3, "timings": "fast" if ARGS.fast else "default",
           "loadavg_before": load0, "results": {}, "failed": {}}
    h = Harness("tree-bench")
    h.__enter__()
    if ARGS.keep:
        out["dir"] = h.tmpdir
    code = 0
    try:
        nodes = h.start_cluster(3, fast=ARGS.fast, log_level="notice", timeout=120)
        b = Bench(h, nodes)
        out["leader"] = b.leader
        out["writer"] = b.writer.node_id
        for name, fn, setup in STEPS:
            if only and name not in only:
                continue
            if name in ("edit",) and "big.bin" not in b.model.files:
                continue
            if name == "delete" and "many" not in b.model.files:
                continue
            try:
                if setup:
                    getattr(b, setup)()
                procs = run_perf(h, nodes, name)
                try:
                    getattr(b, fn)()
                finally:
                    stop_perf(procs)
                b.settle()
            except (BenchFail, HarnessError) as e:
                out["failed"][name] = str(e)
                code = 1
                print("tree-bench: %s FAILED: %s" % (name, e), file=sys.stderr)
                break
        out["results"] = b.results
        out["vm_hwm_kib"] = {d.node_id: vm_hwm_kib(d.pid) for d in nodes}
        out["loadavg_after"] = os.getloadavg()
    finally:
        for d in h._started:
            d.kill()
        if not ARGS.keep:
            shutil.rmtree(h.tmpdir, ignore_errors=True)
        else:
            print("tree-bench: kept %s" % h.tmpdir, file=sys.stderr)
    if ARGS.json:
        print(json.dumps(out, indent=1, sort_keys=True))
        return code
    print("# pickbox tree-bench: 3 nodes on loopback, %s Raft timings, fsync on; leader %s, "
          "writer %s" % (out["timings"], out.get("leader"), out.get("writer")))
    print("# load average before %.2f %.2f %.2f, after %.2f %.2f %.2f" % (
        load0 + tuple(out.get("loadavg_after", (0, 0, 0)))))
    print("%-42s %10s  %-12s %s" % ("scenario", "pickbox", "Syncthing", "cp"))
    for key, label in LABELS:
        r = out["results"].get(key)
        ref = REFERENCE[key]
        if r is None:
            continue
        extra = ""
        if "bytes_sent" in r:
            extra = "  sent %d B (%s)" % (r["bytes_sent"], {
                "lo": "lo, approx.", "tcp_info": "peer links, tcp_info"}.get(
                r["bytes_source"], "daemon counters"))
        if r.get("bytes_note"):
            extra += " [%s]" % r["bytes_note"]
        if key == "big_edit":
            extra += "  (Syncthing sent 800 KB)"
        print("%-42s %8.3f s  %-12s %s%s" % (label, r["s"], fmt_ref(ref[0]), fmt_ref(ref[1]),
                                           extra))
    for k, v in sorted(out.get("vm_hwm_kib", {}).items()):
        print("peak RSS %s: %.1f MiB" % (k, v / 1024.0))
    for k, v in out["failed"].items():
        print("FAILED %s: %s" % (k, v.splitlines()[0]))
    return code


if __name__ == "__main__":
    sys.exit(main())
