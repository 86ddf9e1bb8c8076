#!/usr/bin/env python3
"""bigfile-bench.py: one big file through a 3-node loopback cluster (issue 5,
item 4), with the daemon's default timeouts: seconds until every tree holds
it (SHA-256 checked), peak RSS (VmHWM) of each pickboxd, term changes, the
longest a node's event loop left a status request waiting, and the bytes of
entries the writer proposed for a 10-byte change in the file's middle.

  tests/bench/bigfile-bench.py [SIZE_MIB]          (default 1024)

Run from the build directory (or set top_builddir); not part of make check
(too slow). It runs the scenario of tests/integration/test_tree_bigfile.py
and stops only the daemons it started (by PID). Needs about 5 x SIZE of disk
under $TMPDIR (trees, state.db, raft.db, snapshot files).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
os.environ.setdefault("top_srcdir", os.path.join(HERE, "..", ".."))
os.environ.setdefault("top_builddir", os.getcwd())

from pbharness import Harness  # noqa: E402
import test_tree_bigfile as tb  # noqa: E402


def main():
    size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    with Harness("bigfile_bench") as h:
        h.plan(1)
        fig = tb.scenario(h, size_mib * tb.MIB, max(300, 3 * size_mib))
        h.ok(fig["converged"] and fig["edit_converged"], "the file and its edit converged")
        report(size_mib, fig)


def report(size_mib, fig):
    out = sys.stdout
    out.write("# file: %d MiB of random bytes written on %s (leader %s)\n"
              % (size_mib, fig["writer"], fig["leader"]))
    out.write("# seconds until every tree holds it: %.1f (%.0f MiB/s)\n"
              % (fig["transfer_s"], size_mib / fig["transfer_s"]))
    out.write("# peak RSS (VmHWM) MiB: %s\n"
              % ", ".join("%s %.0f" % kv for kv in sorted(fig["hwm_end_mib"].items())))
    out.write("# term changes: %d (terms seen %r)\n" % (fig["term_changes"], fig["terms_seen"]))
    out.write("# longest status reply (event loop blocked) s: %s\n"
              % ", ".join("%s %.2f" % kv for kv in sorted(fig["slowest_status_s"].items())))
    out.write("# leader's largest last_contact_ms of a peer: %d\n" % fig["max_last_contact_ms"])
    out.write("# materialize ms per node: %r\n" % (fig["materialize_ms"],))
    out.write("# snapshots taken per node: %r, largest %d bytes\n"
              % (fig["snapshots"], fig["snapshot_max_bytes"]))
    out.write("# 10-byte change: %r bytes of entries proposed, every tree in %.1f s\n"
              % (fig["edit_bytes"], fig["edit_s"]))
    out.flush()


if __name__ == "__main__":
    main()
