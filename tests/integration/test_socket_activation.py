"""pickboxd under systemd-socket-activate: it serves the control socket
passed as the fd named "control" (and takes a "peer" fd instead of binding
its port), and leaves systemd's socket file alone when it stops."""

import os
import shutil
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, free_port  # noqa: E402

with Harness("sockact") as h:
    ssa = os.environ.get("SYSTEMD_SOCKET_ACTIVATE") or shutil.which("systemd-socket-activate")
    if not ssa or not os.access(ssa, os.X_OK):
        h.skip_all("systemd-socket-activate not found")
        sys.exit(0)
    h.plan(9)

    # Only the control socket is passed; pickboxd binds its peer port itself.
    path = os.path.join(h.tmpdir, "ctl-n1.sock")
    n1 = h.start_daemon("n1", control_socket=path,
                        wrapper=[ssa, "-l", path, "--fdname=control"])
    st = n1.call("status")["result"]
    h.eq((st["node_id"], st["role"]), ("n1", "follower"), "status through the passed fd")
    h.ok("control=systemd" in n1.log_text(), "the daemon says the socket came from systemd")
    h.ok(not os.path.exists(os.path.join(n1.state_dir, "control.sock")),
         "no socket bound at the default path")
    with socket.create_connection(("127.0.0.1", n1.port), timeout=5):
        pass
    h.ok(True, "peer port bound by the daemon")
    h.eq(n1.stop(), 0, "SIGTERM: exit 0")
    h.ok(os.path.exists(path), "systemd's socket file is left alone")

    # Both sockets passed: no --port needed.
    path2 = os.path.join(h.tmpdir, "ctl-n2.sock")
    port = free_port()
    n2 = h.start_daemon("n2", control_socket=path2, port=port, pass_port=False,
                        wrapper=[ssa, "-l", path2, "-l", "127.0.0.1:%d" % port,
                                 "--fdname=control:peer"])
    h.eq(n2.call("hello")["result"]["node_id"], "n2", "hello with control and peer passed")
    h.ok("peer=systemd" in n2.log_text() and "--port" not in n2.argv(),
         "peer socket taken from systemd, no --port given")
    h.eq(n2.stop(), 0, "SIGTERM: exit 0")
