#!/bin/sh
# raft-sim-check.sh: the `make check` face of the Raft simulator (TAP).
#
# Runs fixed seed ranges over 3- and 5-node clusters (>= 2,000 seeds in all),
# plus a few single- and seven-node runs. RAFT_SIM_SEEDS overrides the seeds
# per cluster size. Under sanitizers raft-sim --ci shortens each run (fewer
# ticks per seed) but the seed count stays the same.
sim="${top_builddir:-.}/tests/sim/raft-sim"
seeds="${RAFT_SIM_SEEDS:-2000}"

echo "1..4"
n=0
run() {
    n=$((n + 1))
    desc="$1"
    shift
    out=$("$sim" --ci "$@" 2>&1)
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok $n - $desc"
    else
        echo "not ok $n - $desc"
    fi
    printf '%s\n' "$out" | sed 's/^/# /'
}
run "3 nodes, $seeds seeds" --seed-start 1 --seeds "$seeds" --nodes 3
run "5 nodes, $seeds seeds" --seed-start 1 --seeds "$seeds" --nodes 5
run "1 node, 100 seeds" --seed-start 1 --seeds 100 --nodes 1
run "7 nodes, 100 seeds" --seed-start 1 --seeds 100 --nodes 7
