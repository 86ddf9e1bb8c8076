#!/bin/sh
# run.sh: build and run the libFuzzer targets (src/net decoders, the Raft codec) for a bounded time.
#
# Usage: tests/fuzz/run.sh [BUILDDIR]
#   BUILDDIR holds config.h of a configured tree (default: $top_builddir, or
#   the source tree itself). FUZZ_SECONDS (default 30) bounds each target,
#   CLANG (default clang, else clang-14) is the compiler, FUZZ_WORKDIR keeps
#   binaries, grown corpora and crash artifacts (default: a fresh temp dir).
# Prints TAP, one test per target; exits non-zero if a target crashes or
# does not build. Seeds come from tests/fuzz/corpus/<target>/ and are never
# modified (new inputs go to the work dir).
set -u

srcdir=$(cd "$(dirname "$0")/../.." && pwd)
builddir=${1:-${top_builddir:-$srcdir}}
seconds=${FUZZ_SECONDS:-30}
if [ -z "${CLANG:-}" ]; then
    if command -v clang >/dev/null 2>&1; then CLANG=clang; else CLANG=clang-14; fi
fi
targets="fuzz_frame fuzz_handshake fuzz_raft_codec"
lib_sources="src/lib/buf.c src/lib/error.c src/lib/log.c src/lib/util.c"
net_sources="src/net/frame.c src/net/handshake.c"
raft_sources="src/raft/codec.c src/raft/conf.c src/raft/raft.c"

if [ ! -f "$builddir/config.h" ]; then
    echo "Bail out! no config.h in $builddir (configure the tree, or pass its build dir)"
    exit 2
fi
work=${FUZZ_WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/pickbox-fuzz.XXXXXX")}
mkdir -p "$work"

set -- $targets
echo "1..$#"
n=0
failed=0
for t in $targets; do
    n=$((n + 1))
    bin="$work/$t"
    srcs=""
    for s in $lib_sources $net_sources $raft_sources "tests/fuzz/$t.c"; do srcs="$srcs $srcdir/$s"; done
    # shellcheck disable=SC2086
    if ! "$CLANG" -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined \
            -fno-sanitize-recover=all -I"$builddir" -I"$srcdir/src" \
            -o "$bin" $srcs -lcrypto >"$work/$t.build.log" 2>&1; then
        echo "not ok $n - $t: build failed"
        sed 's/^/# /' "$work/$t.build.log"
        failed=1
        continue
    fi
    corpus="$work/corpus-$t"
    mkdir -p "$corpus"
    "$bin" -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix="$work/$t-" \
        "$corpus" "$srcdir/tests/fuzz/corpus/$t" >"$work/$t.log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -n 1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$work/$t.log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        echo "ok $n - $t: ${runs:-?} execs in ${secs:-?} s, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l) files"
    else
        echo "not ok $n - $t: exit $rc after ${runs:-?} execs (log $work/$t.log)"
        grep -E 'ERROR|SUMMARY|Test unit written|assert' "$work/$t.log" | head -n 20 | sed 's/^/# /'
        failed=1
    fi
done
[ -n "${FUZZ_WORKDIR:-}" ] || [ "$failed" -ne 0 ] || rm -rf "$work"
exit "$failed"
