#!/bin/bash
# tree-bench.sh: replicated-tree benchmarks of a 3-node loopback cluster next
# to Syncthing 1.19 (issue 5); see tests/bench/tree-bench.py for what each
# figure means and how convergence is checked.
#
#   tests/bench/tree-bench.sh [BUILD_DIR] [tree-bench.py options: --json --only ... --dir ...]
#
# BUILD_DIR defaults to _build. It builds nothing and stops only the daemons
# it started (by PID).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=_build
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    BUILD=$1
    shift
fi
if [ ! -x "$BUILD/src/pickboxd" ]; then
    echo "tree-bench: $BUILD/src/pickboxd not found; build first (make -C $BUILD)" >&2
    exit 2
fi
exec python3 "$HERE/tree-bench.py" --build "$BUILD" "$@"
