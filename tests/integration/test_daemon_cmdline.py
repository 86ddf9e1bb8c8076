"""Bad command lines and config files: exit 2 with one line on stderr;
--check-config validates and prints a summary; --help/--version exit 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbharness import Harness, free_port, pickboxd_path  # noqa: E402


def one_line(r):
    lines = r.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("pickboxd: ")


with Harness("cmdline") as h:
    pd = pickboxd_path()
    data = os.path.join(h.tmpdir, "tree")
    good = ["--node-id", "n1", "--port", str(free_port()), "--data-dir", data]
    bad_cases = [
        ("unknown option", ["--frobnicate"] + good),
        ("missing --node-id", good[2:]),
        ("missing --data-dir", good[:4]),
        ("port out of range", ["--node-id", "n1", "--port", "99999", "--data-dir", data]),
        ("port not a number", ["--node-id", "n1", "--port", "80x", "--data-dir", data]),
        ("bad node id", ["--node-id", "-n1", "--port", "8010", "--data-dir", data]),
        ("bad log level", good + ["--log-level", "loud"]),
        ("missing config file", good + ["--config", os.path.join(h.tmpdir, "nope.conf")]),
    ]
    conf = os.path.join(h.tmpdir, "bad.conf")
    with open(conf, "w") as f:
        f.write("# a config\nnode_id = n1\nport = 8010\ncolour = blue\n")
    h.plan(len(bad_cases) + 8)

    for name, args in bad_cases:
        r = h.run([pd] + args)
        h.ok(r.returncode == 2 and one_line(r), "%s: exit 2, one line" % name,
             "rc=%d stderr=%r" % (r.returncode, r.stderr))

    r = h.run([pd, "--config", conf, "--data-dir", data])
    h.ok(r.returncode == 2 and one_line(r) and "bad.conf:4" in r.stderr,
         "unknown key in a config file: exit 2, one line naming file:line", r.stderr)
    h.ok(not os.path.exists(data), "a rejected configuration creates nothing")

    r = h.run([pd, "--check-config"] + good)
    h.ok(r.returncode == 0 and "node_id = n1" in r.stdout and "configuration OK" in r.stdout,
         "--check-config: exit 0 with a summary", "rc=%d out=%r err=%r"
         % (r.returncode, r.stdout, r.stderr))
    h.ok(not os.path.exists(data), "--check-config creates nothing")
    r = h.run([pd, "--check-config", "--config", conf, "--data-dir", data])
    h.ok(r.returncode == 2 and one_line(r), "--check-config of a bad file: exit 2", r.stderr)

    r = h.run([pd, "--help"])
    h.ok(r.returncode == 0 and "--node-id" in r.stdout, "--help: exit 0")
    r = h.run([pd, "--version"])
    h.ok(r.returncode == 0 and r.stdout.strip().startswith("pickboxd "), "--version: exit 0")

    # Startup errors that are not configuration errors exit 1 with one line:
    # here the tree's path runs through a regular file.
    blocker = os.path.join(h.tmpdir, "file")
    open(blocker, "w").close()
    r = h.run([pd, "--node-id", "n1", "--port", str(free_port()),
               "--data-dir", os.path.join(blocker, "tree")])
    h.ok(r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
         and "cannot create directory" in r.stderr,
         "uncreatable data dir: exit 1, one line", "rc=%d err=%r" % (r.returncode, r.stderr))
