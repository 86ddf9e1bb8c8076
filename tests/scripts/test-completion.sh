#!/bin/bash
# test-completion.sh: data/bash-completion/pickboxctl, sourced in bash and
# driven through COMP_WORDS/COMP_CWORD the way readline drives it. Member ids
# come from a real one-node pickboxd started here (free loopback port, private
# temp dir, stopped by PID). Prints TAP.
if [ -z "${BASH_VERSION:-}" ]; then
    exec bash "$0" "$@"
fi
set -u
top_srcdir=${top_srcdir:-$(cd "$(dirname "$0")/../.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
ctl_dir=$top_builddir/src/pickboxctl
pickboxd=$top_builddir/src/pickboxd
PYTHON3=${PYTHON3:-python3}

echo "1..12"
n=0
ok() { # ok COND-STATUS NAME [DETAIL]
    n=$((n + 1))
    if [ "$1" -eq 0 ]; then
        echo "ok $n - $2"
    else
        echo "not ok $n - $2"
        [ -n "${3:-}" ] && echo "# $3"
    fi
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pb-completion.XXXXXX")
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ]; then
        kill -TERM "$daemon_pid" 2>/dev/null
        wait "$daemon_pid" 2>/dev/null
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# The completion runs `pickboxctl` by the name typed: put the built one first.
PATH=$ctl_dir:$PATH
# shellcheck source=/dev/null
. "$top_srcdir/data/bash-completion/pickboxctl"
mkdir -p "$tmp/etc" "$tmp/run/gamma" "$tmp/run/alpha"
: >"$tmp/etc/alpha.conf"
: >"$tmp/etc/beta.conf"
: >"$tmp/etc/notes.txt"
_pickboxctl_etc=$tmp/etc
_pickboxctl_run=$tmp/run

# complete LINE: the sorted completions (one line, space-separated) of LINE,
# the cursor at its end; a trailing space starts a new, empty word.
complete_line() {
    local line=$1
    read -r -a COMP_WORDS <<<"$line"
    [[ $line == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
    COMP_LINE=$line
    COMP_POINT=${#line}
    COMPREPLY=()
    _pickboxctl
    printf '%s\n' "${COMPREPLY[@]}" | sed '/^$/d' | sort | tr '\n' ' ' | sed 's/ $//'
}

expect() { # expect NAME LINE WANT
    local got
    got=$(complete_line "$2")
    [ "$got" = "$3" ]
    ok $? "$1" "line '$2': got '$got', want '$3'"
}

complete -p pickboxctl 2>/dev/null | grep -q -- '-F _pickboxctl'
ok $? "complete -F _pickboxctl is registered for pickboxctl"

# Every command --help lists, and only those.
want=$(pickboxctl --help | sed -n '/^Commands:/,/^$/{/^  [a-z]/{s/^  \([a-z-]*\).*/\1/;p}}' | sort |
    tr '\n' ' ' | sed 's/ $//')
got=$(complete_line "pickboxctl ")
[ -n "$want" ] && [ "$got" = "$want" ] && [[ " $got " == *" remove "* ]]
ok $? "an empty command word offers every command of --help" "got '$got', want '$want'"

expect "a prefix completes a command" "pickboxctl st" "status"
expect "commands after -n NAME" "pickboxctl -n alpha tr" "transfer"
expect "-n completes instance names from *.conf and run dirs" "pickboxctl -n " "alpha beta gamma"
expect "--node completes a prefix" "pickboxctl --node g" "gamma"
expect "options do not offer bench's options elsewhere" "pickboxctl status --s" "--socket"
expect "bench offers its options" "pickboxctl bench --c" "--concurrency"
expect "no value is invented for --timeout" "pickboxctl -t " ""

# remove/transfer: member ids from a live daemon.
port=$("$PYTHON3" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$tmp/tree"
"$pickboxd" --node-id cn1 --port "$port" --data-dir "$tmp/tree" --state-dir "$tmp/state" \
    --control-socket "$tmp/c.sock" --log-level warning 2>"$tmp/daemon.log" &
daemon_pid=$!
deadline=$((SECONDS + 30))
until pickboxctl -s "$tmp/c.sock" -t 1 members 2>/dev/null | grep -q cn1; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "# pickboxd did not answer; its log:"
        sed 's/^/# /' "$tmp/daemon.log"
        break
    fi
    sleep 0.1
done
expect "remove completes member ids from the daemon on -s" "pickboxctl -s $tmp/c.sock remove " "cn1"
expect "transfer completes member ids by prefix" "pickboxctl -s $tmp/c.sock transfer c" "cn1"
start=$SECONDS
expect "no daemon: no member ids, no error" "pickboxctl -s $tmp/none.sock remove " ""
[ $((SECONDS - start)) -lt 5 ] || echo "# completion with no daemon took $((SECONDS - start)) s"
