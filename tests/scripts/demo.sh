#!/bin/bash
# Installs what is missing, builds pickbox, and runs a local demo cluster on
# loopback in the foreground. Ctrl-C stops every process it started.
#   tests/scripts/demo.sh [NODES]      (default: 3)
# Each node N gets its tree in demo/nN/tree, its state in demo/nN/state, its
# control socket demo/nN/control.sock and peer port 8010+N-1 on 127.0.0.1.
# n1 bootstraps the cluster (and generates its secret, demo/n1/state/secret);
# the others join through n1 with that secret. Edit any tree: every tree
# converges.
set -eu
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"

sh tests/scripts/deps.sh
tests/scripts/build.sh _build

pickboxd=$top/_build/src/pickboxd
pickboxctl=$top/_build/src/pickboxctl/pickboxctl
nodes=${1:-3}
base_port=${DEMO_PORT:-8010}
demo=$top/demo
mkdir -p "$demo"

pids=()
cleanup() {
    trap - INT TERM EXIT
    echo
    echo "demo: stopping ${#pids[@]} node(s)"
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    echo "demo: stopped; trees and state are kept in $demo"
}
trap cleanup INT TERM EXIT

first_addr="127.0.0.1:$base_port"
secret="$demo/n1/state/secret"
for i in $(seq 1 "$nodes"); do
    node="n$i"
    port=$((base_port + i - 1))
    mkdir -p "$demo/$node/tree" "$demo/$node/state"
    args=(--node-id "$node" --port "$port" --data-dir "$demo/$node/tree"
          --state-dir "$demo/$node/state" --control-socket "$demo/$node/control.sock")
    if [ "$i" -gt 1 ]; then
        # n1 writes its secret when it bootstraps: wait for it (bounded).
        for _ in $(seq 1 100); do
            [ -s "$secret" ] && break
            sleep 0.1
        done
        args+=(--join "$first_addr" --secret-file "$secret")
    fi
    # Each node's log lines are tagged with its id.
    "$pickboxd" "${args[@]}" > >(sed -u "s/^/[$node] /") 2>&1 &
    pids+=($!)
done

# Wait (bounded) until every node answers on its control socket.
for i in $(seq 1 "$nodes"); do
    sock="$demo/n$i/control.sock"
    for _ in $(seq 1 100); do
        "$pickboxctl" -s "$sock" hello >/dev/null 2>&1 && break
        sleep 0.1
    done
done

echo
for i in $(seq 1 "$nodes"); do
    echo "--- pickboxctl -s demo/n$i/control.sock status"
    "$pickboxctl" -s "$demo/n$i/control.sock" status || true
done
cat <<TXT

demo: $nodes node(s) running. Trees: $demo/n*/tree
      Try it:      echo hi > demo/n1/tree/hello.txt; sleep 0.5; ls demo/n$nodes/tree
                   echo there >> demo/n$nodes/tree/hello.txt; cat demo/n1/tree/hello.txt
      Ask a node:  $pickboxctl -s $demo/n1/control.sock status
                   $pickboxctl -s $demo/n1/control.sock sync
                   $pickboxctl -s $demo/n1/control.sock conflicts
      Press Ctrl-C to stop.
TXT
wait
