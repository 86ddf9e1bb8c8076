#!/bin/bash
# cluster-bench.sh: commits/s and probe latency of a 3-node loopback pickbox
# cluster (fsync on, default Raft timings), measured with `pickboxctl bench`
# against a follower and against the leader at several concurrencies, next to
# etcd's published figures (issue 4).
#
#   tests/bench/cluster-bench.sh [BUILD_DIR]        (default: _build)
#
# Environment: BENCH_DURATION (seconds per run, default 10), BENCH_CONCURRENCY
# (default "1 16 64 256"), BENCH_SIZE (bytes per probe, default 256),
# BENCH_TARGETS (default "follower leader"), BENCH_RUNS (runs per line, default
# 1; with more, the line shows the median run and the min-max of commits/s:
# the machine may be shared and noisy), BENCH_DIR (where the nodes live,
# default /tmp: put it on the disk you mean to measure), BENCH_KEEP=1 keeps it.
# It builds nothing, and stops only the daemons it started (by PID).
set -euo pipefail

BUILD=${1:-_build}
PICKBOXD=$BUILD/src/pickboxd
CTL=$BUILD/src/pickboxctl/pickboxctl
DURATION=${BENCH_DURATION:-10}
CONCURRENCY=${BENCH_CONCURRENCY:-1 16 64 256}
SIZE=${BENCH_SIZE:-256}
TARGETS=${BENCH_TARGETS:-follower leader}
RUNS=${BENCH_RUNS:-1}

for f in "$PICKBOXD" "$CTL"; do
    if [ ! -x "$f" ]; then
        echo "cluster-bench: $f not found; build first (make -C $BUILD)" >&2
        exit 2
    fi
done

TMP=$(mktemp -d "${BENCH_DIR:-/tmp}/pb-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "cluster-bench: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# json_get FILE KEY...: prints result[KEY1][KEY2]... of a JSON file ("" if absent).
json_get() {
    python3 - "$@" <<'PY'
import json, sys
try:
    v = json.load(open(sys.argv[1]))
    for k in sys.argv[2:]:
        v = v[int(k)] if isinstance(v, list) else v[k]
except Exception:
    v = ""
print(v if not isinstance(v, bool) else str(v).lower())
PY
}

python3 -c 'import os; print(os.urandom(32).hex())' > "$TMP/secret"
chmod 600 "$TMP/secret"

declare -A PORT SOCK
start_node() { # NAME [--join ADDR]
    local name=$1
    shift
    PORT[$name]=$(free_port)
    SOCK[$name]=$TMP/$name/tree/.pickbox/state/control.sock
    mkdir -p "$TMP/$name"
    "$PICKBOXD" --node-id "$name" --port "${PORT[$name]}" --data-dir "$TMP/$name/tree" \
        --secret-file "$TMP/secret" --log-level notice "$@" >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
}

status() { # NAME -> $TMP/NAME.status.json; fails when the node does not answer
    "$CTL" -s "${SOCK[$1]}" -t 2 --json status >"$TMP/$1.status.json" 2>/dev/null
}

# wait_for SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        if [ $SECONDS -ge $deadline ]; then
            echo "cluster-bench: timed out waiting for $what" >&2
            for n in n1 n2 n3; do
                [ -f "$TMP/$n.log" ] && { echo "---- $n.log" >&2; tail -n 20 "$TMP/$n.log" >&2; }
            done
            exit 1
        fi
        sleep 0.1
    done
}

is_leader() { status "$1" && [ "$(json_get "$TMP/$1.status.json" role)" = leader ]; }

formed() { # all three answer, agree on the leader, and list 3 voters
    local n leader="" l
    for n in n1 n2 n3; do
        status "$n" || return 1
        l=$(json_get "$TMP/$n.status.json" leader_id)
        [ -n "$l" ] && [ "$l" != None ] || return 1
        [ -z "$leader" ] || [ "$leader" = "$l" ] || return 1
        leader=$l
        python3 - "$TMP/$n.status.json" <<'PY' || return 1
import json, sys
st = json.load(open(sys.argv[1]))
ms = st.get("members") or []
sys.exit(0 if len(ms) == 3 and all(m.get("voter") for m in ms) and not st.get("joining") else 1)
PY
    done
    LEADER=$leader
}

start_node n1
wait_for 30 "n1 to bootstrap" is_leader n1
start_node n2 --join "127.0.0.1:${PORT[n1]}"
start_node n3 --join "127.0.0.1:${PORT[n1]}"
LEADER=
wait_for 60 "the 3-node cluster to form" formed
FOLLOWER=n1
[ "$LEADER" != n1 ] || FOLLOWER=n2

echo "# pickbox cluster-bench: 3 nodes on loopback, fsync on, default timings"
echo "# leader $LEADER, follower $FOLLOWER; ${SIZE}-byte probes, ${DURATION} s per run (+1 s warm-up), $RUNS run(s) per line"
printf '%-9s %5s %12s %15s %9s %9s %9s  %s\n' target c commits/s "(min-max)" p50_ms p90_ms p99_ms errors
for target in $TARGETS; do
    case $target in
    leader) node=$LEADER ;;
    follower) node=$FOLLOWER ;;
    *) echo "cluster-bench: unknown target $target" >&2; exit 2 ;;
    esac
    for c in $CONCURRENCY; do
        outs=()
        for run in $(seq "$RUNS"); do
            out=$TMP/bench-$target-$c-$run.json
            outs+=("$out")
            if ! "$CTL" -s "${SOCK[$node]}" --json bench --size "$SIZE" --concurrency "$c" \
                --duration "$DURATION" >"$out" 2>"$TMP/bench.err"; then
                echo "cluster-bench: bench on $node (c=$c) failed: $(cat "$TMP/bench.err")" >&2
            fi
        done
        # The median run (by commits/s) and the spread over the runs.
        python3 - "$target" "$c" "${outs[@]}" <<'PY'
import json, sys
rs = []
for f in sys.argv[3:]:
    try:
        rs.append(json.load(open(f)))
    except Exception:
        pass
if not rs:
    print("%-9s %5s %12s" % (sys.argv[1], sys.argv[2], "failed"))
    sys.exit(0)
rs.sort(key=lambda r: r["commits_per_s"])
r = rs[(len(rs) - 1) // 2]
l = r["latency_ms"]
errs = {}
for x in rs:
    for k, v in x.get("errors", {}).items():
        errs[k] = errs.get(k, 0) + v
errs = ",".join("%s=%d" % kv for kv in sorted(errs.items())) or "-"
spread = "%.0f-%.0f" % (rs[0]["commits_per_s"], rs[-1]["commits_per_s"])
print("%-9s %5d %12.0f %15s %9.2f %9.2f %9.2f  %s" % (sys.argv[1], r["concurrency"],
      r["commits_per_s"], spread, l["p50"], l["p90"], l["p99"], errs))
PY
    done
done
cat <<'ETCD'
# etcd (issue 4 figures, 3 members, for comparison):
#   c=1    1,260/s  p50  0.69 ms
#   c=16   4,100/s  p50  3.6 ms
#   c=64   5,550/s  p50 10.7 ms
#   c=256  6,400/s  p50 36.6 ms
ETCD
