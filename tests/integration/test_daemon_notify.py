"""pickboxd talks sd_notify: READY=1 with a STATUS= line once it serves,
WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 when asked to stop."""

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, NotifyListener, wait_until  # noqa: E402

with Harness("notify") as h:
    h.plan(7)
    path = os.path.join(h.tmpdir, "notify.sock")
    listener = NotifyListener(path)
    messages = listener.messages
    drain = listener.drain
    seen = listener.seen

    n1 = h.start_daemon("n1", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"},
                        ready=False)
    wait_until(lambda: seen(lambda m: "READY=1" in m), what="READY=1")
    ready = [m for m in messages if "READY=1" in m][0]
    h.ok(True, "READY=1 sent")
    # READY comes only once the control socket answers.
    h.eq(n1.call("hello")["result"]["node_id"], "n1", "serving when READY=1 arrived")
    h.ok(re.search(r"STATUS=(leader|follower of [^,]+|[a-z]+), term \d+, commit \d+", ready),
         "READY carries STATUS= with role, term and commit", ready)
    # The lone node elects itself: a STATUS= line on the role change (cluster spec).
    wait_until(lambda: seen(lambda m: re.search(r"STATUS=leader, term \d+, commit \d+", m)),
               what="STATUS=leader")
    h.ok(True, "STATUS=leader, term N, commit M once the lone node leads")

    start = time.monotonic()
    wait_until(lambda: (drain() or True) and
               sum(m.strip() == "WATCHDOG=1" for m in messages) >= 4, what="4 WATCHDOG=1")
    h.ok(time.monotonic() - start < 2.0, "WATCHDOG=1 about every 100 ms")
    h.eq(n1.stop(), 0, "SIGTERM: exit 0")
    h.ok(seen(lambda m: m.strip() == "STOPPING=1"), "STOPPING=1 sent", repr(messages))
    listener.close()
