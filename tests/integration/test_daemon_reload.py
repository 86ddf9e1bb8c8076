"""SIGHUP re-reads the configuration: log_level takes effect at once, keys
that need a restart are named in a warning, a file that no longer loads
changes nothing and the daemon keeps serving; systemd is told RELOADING=1
and then READY=1."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Daemon, Harness, NotifyListener, free_port, wait_until  # noqa: E402

with Harness("reload") as h:
    h.plan(9)
    notify_path = os.path.join(h.tmpdir, "notify.sock")
    listener = NotifyListener(notify_path)
    messages = listener.messages
    drain = listener.drain

    conf = os.path.join(h.tmpdir, "n1.conf")
    port = free_port()
    tree = os.path.join(h.tmpdir, "n1", "tree")

    def write_conf(extra):
        with open(conf, "w") as f:
            f.write("node_id = n1\nport = %d\ndata_dir = %s\n%s" % (port, tree, extra))

    write_conf("log_level = info\n")
    # No --log-level on the command line: it would override the file's.
    n1 = Daemon(h, "n1", args=["--config", conf], port=port, pass_port=False,
                env={"NOTIFY_SOCKET": notify_path})
    n1.default_log_level = False
    n1.start().wait_ready()
    drain()
    messages.clear()

    write_conf("log_level = debug\n")
    n1.signal(signal.SIGHUP)
    wait_until(lambda: n1.log_has("reload: log_level is now debug"), what="log level change")
    h.ok(True, "SIGHUP: log_level from the file applied at once")
    wait_until(lambda: (drain() or True) and any("READY=1" in m for m in messages),
               what="READY=1 after the reload")
    rel = [i for i, m in enumerate(messages) if "RELOADING=1" in m]
    rdy = [i for i, m in enumerate(messages) if "READY=1" in m]
    h.ok(rel and rdy and rel[0] < rdy[-1], "RELOADING=1, then READY=1", repr(messages))

    write_conf("log_level = debug\nheartbeat_ms = 50\nelection_timeout_ms = 700\n")
    n1.signal(signal.SIGHUP)
    wait_until(lambda: n1.log_has("reload: election_timeout_ms, heartbeat_ms changed: "
                                  "takes effect when pickboxd restarts"),
               what="restart-only keys named")
    h.ok(True, "keys that need a restart are named in a warning")

    write_conf("log_level = debug\ncolour = blue\n")
    n1.signal(signal.SIGHUP)
    wait_until(lambda: n1.log_has("reload failed: .*n1.conf:5: unknown key .colour.; keeping the running configuration"),
               what="reload failure")
    h.ok(True, "a bad file: reload failed, naming file:line")
    h.ok(n1.alive(), "the daemon still runs after a failed reload")
    h.eq(n1.call("hello")["result"]["node_id"], "n1", "and still answers")

    os.unlink(conf)
    n1.signal(signal.SIGHUP)
    wait_until(lambda: n1.log_has("reload failed: .*keeping the running configuration.*")
               and n1.log_text().count("reload failed") >= 2, what="second reload failure")
    h.ok(n1.alive(), "a missing file: reload failed, the daemon runs on")

    write_conf("log_level = warning\n")
    n1.signal(signal.SIGHUP)
    wait_until(lambda: n1.log_has("reload: log_level is now warning"), what="log level warning")
    h.ok(True, "a later good reload applies again")
    h.eq(n1.stop(), 0, "SIGTERM: exit 0")
