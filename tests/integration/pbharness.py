"""pbharness: run pickboxd processes for multi-process tests (Python 3 stdlib only).

A test script does:

    from pbharness import Harness
    with Harness("basic") as h:
        h.plan(3)
        n1 = h.start_daemon("n1")
        h.ok(n1.call("hello")["result"]["node_id"] == "n1", "hello answers")
        ...

Every daemon gets a free loopback port and its own directory under a private
temp dir. Waiting is always polling against a deadline (wait_until), never a
bare sleep. The harness stops exactly the processes it started, by PID (never
by name), on success, on failure, on KeyboardInterrupt and on SIGTERM from the
test driver. Each daemon's stderr goes to a log file that is printed (as TAP
comments) when the test fails. Output is TAP: plan, ok / not ok, # comments. Set PB_DAEMON_WRAPPER (e.g.
"valgrind -q --error-exitcode=9 --leak-check=full") to run every daemon under
a tool; its exit status then shows in the tests that check exit codes.

Clusters (cluster spec): Harness.start_cluster(3) bootstraps the first node
and joins the others through it with --join, all sharing one secret file;
wait_formed() / wait_leader() / wait_converged() poll every node's status;
Daemon.probe() commits a no-op entry; Daemon.restart() runs the same command
line again (after a kill -9 or a stop).
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

DEFAULT_TIMEOUT = 10.0
# Deadline of waits for something to happen (a daemon to start, to stop, a
# condition to hold): generous, since a sanitizer build on a loaded 2-core
# machine is many times slower than a quiet one, and a wait that succeeds
# returns as soon as its condition holds.
WAIT_TIMEOUT = 30.0

# Short Raft timings for tests that do not measure failover (cluster spec:
# heartbeat below half the election timeout).
FAST_TIMING = ("--election-timeout-ms", "300", "--heartbeat-ms", "30")

# Errors a probe may get while no quorum is reachable.
NO_COMMIT_CODES = ("TIMEOUT", "NO_QUORUM", "UNAVAILABLE")


class HarnessError(Exception):
    pass


def wait_until(predicate, timeout=WAIT_TIMEOUT, interval=0.01, what="condition"):
    """Polls predicate() until it returns a true value (returned) or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def top_builddir():
    return os.environ.get("top_builddir") or os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", ".."))


def pickboxd_path():
    return os.path.join(top_builddir(), "src", "pickboxd")


def pickboxctl_path():
    for rel in (("src", "pickboxctl", "pickboxctl"), ("src", "pickboxctl")):
        path = os.path.join(top_builddir(), *rel)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class Client:
    """One NDJSON connection to a control socket."""

    def __init__(self, path, timeout=DEFAULT_TIMEOUT):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.next_id = 1

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, method, params=None, req_id=None):
        if req_id is None:
            req_id = self.next_id
            self.next_id += 1
        msg = {"id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        return req_id

    def recv_line(self, timeout=DEFAULT_TIMEOUT):
        """The next reply line, parsed; None when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError("no reply within %.1fs" % timeout)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        req_id = self.send(method, params)
        reply = self.recv_line(timeout)
        if reply is None:
            raise HarnessError("connection closed instead of a reply to %s" % method)
        if reply.get("id") != req_id:
            raise HarnessError("reply id %r != request id %r" % (reply.get("id"), req_id))
        return reply

    def wait_closed(self, timeout=DEFAULT_TIMEOUT):
        """True once the server has closed the connection (data is discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
        return False


class NotifyListener:
    """A NOTIFY_SOCKET for sd_notify(3) messages: give .path to a daemon's
    environment; .drain() collects what arrived into .messages; .seen(pred)
    drains and says whether any message satisfies pred."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages = []

    def drain(self):
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return

    def seen(self, pred):
        self.drain()
        return any(pred(m) for m in self.messages)

    def close(self):
        self.sock.close()


class Daemon:
    """One pickboxd process started by the harness."""

    def __init__(self, harness, node_id, args=(), port=None, wrapper=(), env=None,
                 control_socket=None, pass_port=True):
        self.h = harness
        self.node_id = node_id
        self.dir = os.path.join(harness.tmpdir, node_id)
        self.data_dir = os.path.join(self.dir, "tree")
        self.state_dir = os.path.join(self.data_dir, ".pickbox", "state")
        self.control_socket = control_socket or os.path.join(self.state_dir, "control.sock")
        self.port = port if port is not None else free_port()
        harness._runs += 1
        self.log_path = os.path.join(harness.tmpdir, "%s.%d.log" % (node_id, harness._runs))
        self.extra_args = list(args)
        self.wrapper = list(wrapper)
        self.env = env
        self.pass_port = pass_port  # False: the port comes from a systemd "peer" fd
        self.default_log_level = True  # False: no --log-level unless args give one
        self.proc = None
        self.pids = []  # every process this Daemon started (restarts included)
        self.returncode = None

    def argv(self):
        argv = [pickboxd_path(), "--node-id", self.node_id, "--data-dir", self.data_dir]
        if self.default_log_level and "--log-level" not in self.extra_args:
            argv += ["--log-level", "debug"]
        if self.pass_port:
            argv += ["--port", str(self.port)]
        if self.control_socket != os.path.join(self.state_dir, "control.sock"):
            argv += ["--control-socket", self.control_socket]
        # PB_DAEMON_WRAPPER="valgrind -q --error-exitcode=9" runs every daemon under a tool.
        tool = shlex.split(os.environ.get("PB_DAEMON_WRAPPER", ""))
        return self.wrapper + tool + argv + self.extra_args

    def start(self):
        if self.alive():
            raise HarnessError("%s is already running (pid %d)" % (self.node_id, self.proc.pid))
        os.makedirs(self.dir, exist_ok=True)
        env = dict(os.environ)
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                  "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        if self.env:
            env.update(self.env)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        self.pids.append(self.proc.pid)
        if self not in self.h._started:
            self.h._started.append(self)
        return self

    def restart(self, ready=True, timeout=WAIT_TIMEOUT):
        """Starts the same command line again (the process must have ended)."""
        if self.alive():
            raise HarnessError("restart of %s while it runs" % self.node_id)
        if self.proc is not None:
            self.proc.wait()
            if not self.log.closed:
                self.log.close()
        self.start()
        if ready:
            self.wait_ready(timeout)
        return self

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def status(self, timeout=5.0):
        """The status result; HarnessError when the daemon answers an error."""
        reply = self.call("status", timeout=timeout)
        if "error" in reply:
            raise HarnessError("%s: status failed: %r" % (self.node_id, reply["error"]))
        return reply["result"]

    def try_status(self, timeout=2.0):
        """The status result, or None when the node does not answer."""
        if not self.alive():
            return None
        try:
            return self.status(timeout)
        except (OSError, HarnessError, ValueError):
            return None

    def request(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        """One request; returns the reply object, or {"error": {"code": "CLIENT", ...}}
        when the exchange itself failed (connection refused, closed, no reply)."""
        try:
            return self.call(method, params, timeout)
        except (OSError, HarnessError, ValueError) as e:
            return {"error": {"code": "CLIENT", "message": str(e)}}

    def probe(self, size=0, timeout_s=None, timeout=None):
        """Commits one no-op entry of size bytes through this node. Returns the
        reply: {"result": {"index":, "term":}} or {"error": {...}}."""
        params = {"size": size}
        if timeout_s is not None:
            params["timeout_s"] = timeout_s
        if timeout is None:
            timeout = (timeout_s if timeout_s is not None else 10) + 5
        return self.request("probe", params, timeout)

    def log_has(self, pattern):
        return re.search(pattern, self.log_text()) is not None

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout=DEFAULT_TIMEOUT):
        return Client(self.control_socket, timeout)

    def wait_ready(self, timeout=WAIT_TIMEOUT):
        """Waits until hello answers on the control socket (or the daemon dies)."""
        def ready():
            if not self.alive():
                raise HarnessError("%s exited with %s before it was ready"
                                   % (self.node_id, self.proc.returncode))
            try:
                with self.client(timeout=2) as c:
                    return c.call("hello")
            except (FileNotFoundError, ConnectionRefusedError):
                return None
        return wait_until(ready, timeout, what="%s to answer hello" % self.node_id)

    def call(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        with self.client(timeout) as c:
            return c.call(method, params, timeout)

    def kill9(self):
        """kill -9 of this node (our own PID), reaped; the log stays open."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.returncode = self.proc.wait(WAIT_TIMEOUT)
        return self.returncode

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout=WAIT_TIMEOUT):
        """Waits for the process to end; returns its exit status (negative = signal)."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError("%s (pid %d) did not exit within %.1fs"
                               % (self.node_id, self.proc.pid, timeout))
        return self.returncode

    def stop(self, timeout=WAIT_TIMEOUT):
        """SIGTERM and wait; returns the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self):
        """SIGKILL this process (only ours, by PID) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if not self.log.closed:
            self.log.close()

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class _Terminated(BaseException):
    pass


class Harness:
    """A TAP test with a private temp dir and the daemons it started."""

    def __init__(self, name):
        self.name = name
        self.tmpdir = None
        self._started = []
        self._runs = 0
        self._n = 0
        self._planned = None
        self.failed = 0

    # --- TAP ---------------------------------------------------------------
    def plan(self, n):
        self._planned = n
        print("1..%d" % n, flush=True)

    def ok(self, cond, desc, diag=None):
        self._n += 1
        print("%s %d - %s" % ("ok" if cond else "not ok", self._n, desc), flush=True)
        if not cond:
            self.failed += 1
            if diag:
                self.diag(diag)
        return bool(cond)

    def eq(self, got, want, desc):
        return self.ok(got == want, desc, "got %r, want %r" % (got, want))

    def skip(self, desc, why):
        self._n += 1
        print("ok %d - %s # SKIP %s" % (self._n, desc, why), flush=True)

    def skip_all(self, why):
        print("1..0 # SKIP %s" % why, flush=True)
        self._planned = 0

    def diag(self, text):
        for line in str(text).splitlines():
            print("# " + line, flush=True)

    # --- processes ---------------------------------------------------------
    def start_daemon(self, node_id, args=(), ready=True, **kw):
        d = Daemon(self, node_id, args, **kw).start()
        if ready:
            d.wait_ready()
        return d

    def run(self, argv, timeout=DEFAULT_TIMEOUT, env=None):
        """Runs a short-lived command (e.g. pickboxd --check-config); returns
        CompletedProcess with text stdout/stderr. It is killed on timeout."""
        e = dict(os.environ)
        if env:
            e.update(env)
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=e)

    # --- clusters ----------------------------------------------------------
    def secret_file(self, name="secret"):
        """A cluster secret (64 hex digits, mode 0600) in the temp dir."""
        path = os.path.join(self.tmpdir, name)
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex() + "\n")
        return path

    def start_node(self, node_id, join=None, fast=True, env=None, args=(), secret="secret",
                   log_level=None, ready=True):
        """A cluster node: the shared secret file, FAST_TIMING unless fast is
        False, --join ADDRESS when join (a Daemon or an address) is given."""
        argv = []
        if secret:
            argv += ["--secret-file", self.secret_file(secret)]
        if fast:
            argv += list(FAST_TIMING)
        if join is not None:
            argv += ["--join", join.address if isinstance(join, Daemon) else join]
        if log_level:
            argv += ["--log-level", log_level]
        argv += list(args)
        return self.start_daemon(node_id, argv, ready=ready, env=env)

    def start_cluster(self, n, prefix="n", fast=True, env=None, log_level=None, timeout=60):
        """Bootstraps prefix1 and joins prefix2..prefixN through it; waits until
        all are voters and agree on a leader. Returns the Daemons."""
        first = self.start_node("%s1" % prefix, fast=fast, env=env, log_level=log_level)
        wait_until(lambda: (first.try_status() or {}).get("role") == "leader", timeout,
                   interval=0.05, what="%s to bootstrap and lead" % first.node_id)
        nodes = [first]
        for i in range(2, n + 1):
            nodes.append(self.start_node("%s%d" % (prefix, i), join=first, fast=fast, env=env,
                                         log_level=log_level))
        self.wait_formed(nodes, timeout)
        return nodes

    def _poll(self, nodes, check, timeout, what):
        """Polls check(statuses) (a list of status dicts, None for a node that
        did not answer) until it returns a true value, which is returned."""
        last = [None]

        def pred():
            sts = [d.try_status() for d in nodes]
            last[0] = sts
            return check(sts)
        try:
            return wait_until(pred, timeout, interval=0.05, what=what)
        except HarnessError as e:
            brief = []
            for d, st in zip(nodes, last[0] or []):
                if st is None:
                    brief.append("%s: no answer" % d.node_id)
                    continue
                keys = ("role", "term", "leader_id", "commit_index", "applied_index",
                        "last_index", "snapshot_index", "joining", "storage_error")
                brief.append("%s: %s members=%s" % (
                    d.node_id, {k: st.get(k) for k in keys},
                    [(m.get("id"), m.get("voter")) for m in st.get("members") or []]))
            raise HarnessError("%s\n%s" % (e, "\n".join(brief)))

    def wait_formed(self, nodes, timeout=30):
        """Every node answers, none is joining, all report the same leader (one
        of them), the same cluster_id, and members = exactly these nodes, all
        voters. Returns the statuses."""
        names = sorted(d.node_id for d in nodes)

        def check(sts):
            if any(st is None for st in sts):
                return None
            leaders = {st.get("leader_id") for st in sts}
            cids = {st.get("cluster_id") for st in sts}
            if len(leaders) != 1 or None in leaders or leaders.pop() not in names:
                return None
            if len(cids) != 1 or None in cids:
                return None
            for st in sts:
                if st.get("joining"):
                    return None
                ms = st.get("members") or []
                if sorted(m.get("id") for m in ms) != names:
                    return None
                if not all(m.get("voter") for m in ms):
                    return None
            return sts
        return self._poll(nodes, check, timeout,
                          "cluster %s to form (same leader, all voters)" % ",".join(names))

    def wait_leader(self, nodes, timeout=30, exclude=()):
        """Waits until the answering nodes among nodes agree on one leader that
        is one of them (and reports role leader), not in exclude. Returns its Daemon."""
        by_name = {d.node_id: d for d in nodes}

        def check(sts):
            live = [st for st in sts if st is not None]
            if not live:
                return None
            leaders = {st.get("leader_id") for st in live}
            if len(leaders) != 1:
                return None
            name = leaders.pop()
            if name not in by_name or name in exclude:
                return None
            lst = sts[nodes.index(by_name[name])]
            if lst is None or lst.get("role") != "leader":
                return None
            return by_name[name]
        return self._poll(nodes, check, timeout, "one leader among %s"
                          % ",".join(d.node_id for d in nodes))

    def wait_converged(self, nodes, timeout=30,
                       keys=("commit_index", "applied_index", "last_index", "term")):
        """Waits until every node answers with equal values for keys (and
        applied == commit). Returns the statuses."""
        def check(sts):
            if any(st is None for st in sts):
                return None
            for k in keys:
                if len({st.get(k) for st in sts}) != 1:
                    return None
            if any(st.get("applied_index") != st.get("commit_index") for st in sts):
                return None
            return sts
        return self._poll(nodes, check, timeout, "%s to converge on %s"
                          % (",".join(d.node_id for d in nodes), "/".join(keys)))

    def wait_applied(self, nodes, index, timeout=30):
        """Waits until every node's applied_index >= index."""
        def check(sts):
            return all(st is not None and (st.get("applied_index") or 0) >= index
                       for st in sts) and sts
        return self._poll(nodes, check, timeout, "applied_index >= %d everywhere" % index)

    def probe_until_ok(self, node, timeout=20, size=0, timeout_s=2):
        """Retries probes on node until one commits; returns (result, seconds)."""
        t0 = time.monotonic()
        last = [None]

        def attempt():
            r = node.probe(size, timeout_s=timeout_s)
            last[0] = r
            return r.get("result")
        try:
            res = wait_until(attempt, timeout, interval=0.05,
                             what="a probe to commit on %s" % node.node_id)
        except HarnessError as e:
            raise HarnessError("%s (last reply %r)" % (e, last[0]))
        return res, time.monotonic() - t0

    def ctl(self, node, *args, timeout=DEFAULT_TIMEOUT + 40):
        """Runs pickboxctl -s <node's socket> args...; CompletedProcess."""
        ctl = pickboxctl_path()
        if ctl is None:
            raise HarnessError("pickboxctl not built")
        return self.run([ctl, "-s", node.control_socket] + list(args), timeout=timeout)

    # --- lifecycle ---------------------------------------------------------
    def __enter__(self):
        self.tmpdir = tempfile.mkdtemp(prefix="pb-%s-" % self.name)
        self._old_term = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame):
        raise _Terminated()

    def __exit__(self, exc_type, exc, tb):
        problem = exc_type is not None
        if problem:
            self.failed += 1
            self._n += 1
            print("not ok %d - %s raised %s" % (self._n, self.name, exc_type.__name__),
                  flush=True)
            self.diag("".join(traceback.format_exception(exc_type, exc, tb)))
        for d in self._started:
            d.kill()
        if self._planned is not None and self._planned != self._n and not problem:
            self.diag("planned %d tests, ran %d" % (self._planned, self._n))
            self.failed += 1
        if self.failed:
            for d in self._started:
                self.diag("---- log of %s (pid %d) ----" % (d.node_id, d.pid))
                self.diag(d.log_text())
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, self._old_term)
        sys.stdout.flush()
        # Exceptions were reported as TAP; the exit status tells the driver.
        code = 1 if self.failed else 0
        if exc_type is KeyboardInterrupt:
            code = 130
        sys.exit(code)
