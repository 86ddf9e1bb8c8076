"""pickboxd starts, answers hello and status truthfully, owns its ports and
directories, and stops cleanly (exit 0, socket file removed) on SIGTERM/SIGINT."""

import os
import signal
import socket
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, free_port, pickboxd_path, wait_until  # noqa: E402

with Harness("basic") as h:
    h.plan(25)
    version = h.run([pickboxd_path(), "--version"]).stdout.split()[-1]

    n1 = h.start_daemon("n1")
    hello = n1.call("hello")["result"]
    h.eq(hello, {"protocol": 1, "version": version, "node_id": "n1"}, "hello")

    st = n1.call("status")["result"]
    h.eq(st["node_id"], "n1", "status node_id")
    # Empty state and no --join: a one-voter cluster bootstraps and elects itself
    # (cluster spec, life cycle).
    # Leading, with its election's no-op applied (commit moves first, then
    # applied, in the same loop turn's ready: a status in between sees both).
    st = wait_until(lambda: (lambda r: r if r["role"] == "leader" and
                             r["applied_index"] == r["commit_index"] else None)(
        n1.call("status")["result"]), what="n1 to lead its one-node cluster, caught up")
    h.ok(st["term"] >= 1 and st["leader_id"] == "n1", "status: leader of itself, term >= 1",
         "%r" % ((st["role"], st["term"], st["leader_id"]),))
    h.ok(st["commit_index"] >= 1 and st["applied_index"] == st["commit_index"],
         "status indexes: bootstrap entries committed and applied",
         "%r" % ((st["commit_index"], st["applied_index"]),))
    m = st["members"]
    h.ok(len(m) == 1 and m[0]["id"] == "n1" and m[0]["address"] == "127.0.0.1:%d" % n1.port
         and m[0]["voter"] is True and m[0]["self"] is True,
         "status members: itself as a voter (bootstrap)", "%r" % m)
    h.eq(st["consensus_running"], True, "status says consensus is running")
    h.eq((st["data_dir"], st["state_dir"]), (n1.data_dir, n1.state_dir), "status dirs")
    h.ok(isinstance(st["uptime_s"], int) and st["uptime_s"] >= 0, "status uptime_s")
    h.eq(st["version"], version, "status version")

    h.eq(stat.S_IMODE(os.stat(n1.state_dir).st_mode), 0o700, "state dir is 0700")
    h.ok(os.path.isdir(os.path.join(n1.data_dir, ".pickbox")), "tree has its .pickbox marker")
    h.eq(stat.S_IMODE(os.stat(n1.control_socket).st_mode), 0o660, "control socket is 0660")

    # The peer port is really owned: it accepts TCP connections, and nobody else can bind it.
    with socket.create_connection(("127.0.0.1", n1.port), timeout=5):
        pass
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", n1.port))
        h.ok(False, "peer port cannot be bound twice")
    except OSError:
        h.ok(True, "peer port cannot be bound twice")
    finally:
        s.close()

    # A second daemon on the same state dir refuses to start: exit 1, one line.
    r = h.run([pickboxd_path(), "--node-id", "n1b", "--port", str(n1.port),
               "--data-dir", n1.data_dir])
    h.ok(r.returncode == 1 and "cannot listen on peer address" in r.stderr
         and len(r.stderr.strip().splitlines()) == 1,
         "busy peer port: exit 1 with one line", r.stderr)
    r = h.run([pickboxd_path(), "--node-id", "n1c", "--port", str(free_port()),
               "--data-dir", n1.data_dir])
    h.ok(r.returncode == 1 and "in use" in r.stderr
         and len(r.stderr.strip().splitlines()) == 1,
         "live control socket: exit 1 with one line", r.stderr)
    h.ok(n1.call("hello")["result"]["node_id"] == "n1", "the first daemon is unharmed")

    rc = n1.stop()
    h.eq(rc, 0, "SIGTERM: exit 0")
    h.ok(not os.path.exists(n1.control_socket), "SIGTERM: control socket removed")
    h.ok("SIGTERM received" in n1.log_text(), "SIGTERM: logged")

    # Restart on the same dirs works (nothing stale left behind), then SIGINT.
    n1b = h.start_daemon("n1", port=n1.port)
    h.eq(n1b.call("status")["result"]["node_id"], "n1", "restart on the same dirs")
    n1b.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded the command line" in n1b.log_text(), what="SIGHUP reload logged")
    h.ok(n1b.call("hello")["result"]["node_id"] == "n1", "SIGHUP does not stop the daemon")
    n1b.signal(signal.SIGINT)
    h.eq(n1b.wait_exit(), 0, "SIGINT: exit 0")

    # A joining node without a secret file cannot authenticate: exit 1, one line.
    r = h.run([pickboxd_path(), "--node-id", "n2", "--port", str(free_port()),
               "--data-dir", os.path.join(h.tmpdir, "n2nosecret"),
               "--join", "127.0.0.1:%d" % n1.port])
    h.ok(r.returncode == 1 and "--secret-file" in r.stderr,
         "joining without a secret: exit 1, asks for --secret-file", r.stderr)

    # A joining node is not a member yet: joining, no leader, no cluster id.
    n2 = h.start_daemon("n2", args=["--join", "127.0.0.1:%d" % n1.port, "--secret-file",
                                    os.path.join(n1.state_dir, "secret")])
    st = n2.call("status")["result"]
    h.eq((st["role"], st["leader_id"], st["joining"], st["cluster_id"], st["join"]),
         ("follower", None, True, None, "127.0.0.1:%d" % n1.port), "joining node status")
    h.eq(n2.stop(), 0, "joining node stops cleanly")
