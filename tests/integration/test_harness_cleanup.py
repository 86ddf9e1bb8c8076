"""The harness itself: whatever way a test ends (an exception, SIGTERM from
the test driver), the daemons it started are killed by PID and their logs
are printed."""

import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, wait_until  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = r'''
import sys, time
sys.path.insert(0, %r)
from pbharness import Harness, wait_until
with Harness("inner") as h:
    h.plan(1)
    d = h.start_daemon("x1")
    print("PID %%d" %% d.pid, flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    wait_until(lambda: False, timeout=60, what="forever")
''' % HERE


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); /proc tells it apart.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def start_inner(mode):
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = ""
    for line in p.stdout:  # the plan comes first, then our PID line
        seen += line
        if line.startswith("PID "):
            return p, int(line.split()[1]), seen
    return p, None, seen


with Harness("cleanup") as h:
    h.plan(6)

    p, pid, first = start_inner("raise")
    h.ok(pid is not None, "inner test started a daemon", first)
    out = p.stdout.read()
    rc = p.wait(30)
    h.ok(rc != 0 and "not ok" in out and "RuntimeError" in out,
         "an exception is reported as TAP and fails the test", out)
    h.ok(pid is not None and gone(pid), "the daemon was killed when the test raised")
    h.ok("---- log of x1" in out and "ready: node=x1" in out, "the daemon's log was printed",
         out)

    p, pid, first = start_inner("wait")
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    rc = p.wait(30)
    h.ok(rc != 0 and pid is not None, "SIGTERM ends the inner test with a failure", out)
    h.ok(pid is not None and wait_until(lambda: gone(pid), timeout=5, what="daemon gone"),
         "the daemon was killed when the test was terminated")
