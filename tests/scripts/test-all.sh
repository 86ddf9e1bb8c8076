#!/bin/bash
# Installs what is missing, builds pickbox and runs every test:
#   formatting, the unit and multi-process suites (make check), make distcheck,
#   the suites again under ASan+UBSan, unit suites under valgrind, and the
#   fuzzers for a bounded time, the Debian package and lintian, and the
#   package under a real systemd in a container (tests/systemd/nspawn-test.sh).
#   Ends with one summary line "pickbox: N passed, M failed" and exits
#   non-zero if anything failed.
# Environment: FUZZ_SECONDS (default 20 per target), SKIP_DISTCHECK=1,
#   SKIP_SANITIZERS=1, SKIP_VALGRIND=1, SKIP_PACKAGE=1, SKIP_NSPAWN=1 to shorten a
#   local run.
set -u
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"

passed=0
failed=0
failures=()
start=$(date +%s)

stage() { echo; echo "=== $* ($(($(date +%s) - start)) s)"; }

# Adds the counts of an automake test-suite summary (from make check output).
count_suite() {
    local out=$1 name=$2 p f
    p=$(grep -E '^# PASS: +[0-9]+' "$out" | awk '{s+=$3} END {print s+0}')
    f=$(grep -E '^# (FAIL|ERROR|XPASS): +[0-9]+' "$out" | awk '{s+=$3} END {print s+0}')
    passed=$((passed + p))
    failed=$((failed + f))
    echo "$name: $p passed, $f failed"
}

# Prints what matters of one failed test's log: the test's own lines (TAP
# results but the passing ones, diagnostics, tracebacks, sanitizer reports,
# the driver's FAIL/ERROR lines),
# then for each daemon log the harness printed ("# ---- log of n1 (pid N) ----",
# lines "# <level>text") its error and warning lines, the lines without a
# level (sanitizer, valgrind, crash output) and its last lines. The whole log
# stays in the build directory.
summarize_log() {
    awk -v own_max=250 -v bad_max=40 -v tail_n=25 '
        function flush_daemon(   i, from) {
            if (name == "")
                return
            for (i = 1; i <= nbad; i++) {
                if (nbad > bad_max && i == bad_max / 2 + 1) {
                    print "#   ... " nbad - bad_max " error/warning lines of " name " left out"
                    i = nbad - bad_max / 2 + 1
                }
                print bad[i]
            }
            print "#   ... last " (nlines < tail_n ? nlines : tail_n) " of " nlines " lines of " name ":"
            from = nlines > tail_n ? nlines - tail_n + 1 : 1
            for (i = from; i <= nlines; i++)
                print ring[i % tail_n]
            name = ""
        }
        /^# ---- log of / {
            flush_daemon()
            name = $5
            nbad = 0
            nlines = 0
            print
            next
        }
        name != "" && /^#/ {
            nlines++
            ring[nlines % tail_n] = $0
            if ($0 !~ /^# <[5-7]>/ && $0 !~ /^# ?$/)
                bad[++nbad] = $0
            next
        }
        /^(ok [0-9]|PASS: )/ { next }
        {
            if (++own <= own_max)
                print
            else if (own == own_max + 1)
                print "... (more lines of the test left out)"
        }
        END { flush_daemon() }
    ' "$1"
}

# Prints the logs of failed tests below a build directory (summarized: see
# summarize_log; the full logs are the files named).
show_failed_logs() {
    local dir=$1 trs log
    while IFS= read -r trs; do
        log=${trs%.trs}.log
        echo "----- $log ($(wc -l < "$log") lines; errors, warnings and the test's own lines)"
        summarize_log "$log"
    done < <(grep -lE ':test-result: (FAIL|ERROR|XPASS)' -r "$dir" --include='*.trs' 2>/dev/null)
}

record() { # name status
    if [ "$2" -eq 0 ]; then
        passed=$((passed + 1))
        echo "$1: ok"
    else
        failed=$((failed + 1))
        failures+=("$1")
        echo "$1: FAILED"
    fi
}

stage "dependencies"
sh tests/scripts/deps.sh || { echo "pickbox: 0 passed, 1 failed (dependencies)"; exit 1; }

stage "build"
if ! tests/scripts/build.sh _build; then
    echo "pickbox: 0 passed, 1 failed (build)"
    exit 1
fi

stage "format"
( cd _build && make -s format-check CLANG_FORMAT=clang-format ) > _build/format.out 2>&1
st=$?
[ $st -ne 0 ] && head -50 _build/format.out
record "format-check" $st

stage "make check"
( cd _build && make -j2 check ) > _build/check.out 2>&1
st=$?
count_suite _build/check.out "make check"
if [ $st -ne 0 ]; then
    failures+=("make check")
    grep -E '^(FAIL|ERROR|XPASS)' _build/check.out
    show_failed_logs _build
    [ "$(grep -cE '^# (FAIL|ERROR|XPASS): +[1-9]' _build/check.out)" -eq 0 ] && failed=$((failed + 1))
fi

if [ "${SKIP_DISTCHECK:-0}" != 1 ]; then
    stage "make distcheck"
    ( cd _build && make -j2 distcheck ) > _build/distcheck.out 2>&1
    st=$?
    [ $st -ne 0 ] && { tail -80 _build/distcheck.out; show_failed_logs _build/pickbox-*/; }
    record "make distcheck" $st
fi

if [ "${SKIP_SANITIZERS:-0}" != 1 ]; then
    stage "ASan+UBSan build and make check"
    if tests/scripts/build.sh _build-san --enable-sanitizers; then
        # The big-file test measures memory, which ASan's shadow memory and
        # 256 MiB quarantine swamp: here it moves 32 MiB and its RSS bound
        # is only a sanity limit (the plain make check holds the real one).
        ( cd _build-san && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
            CK_TIMEOUT_MULTIPLIER=4 PICKBOX_BIGFILE_MIB=32 PICKBOX_BIGFILE_RSS_MIB=1024 \
            make -j2 check ) \
            > _build-san/check.out 2>&1
        st=$?
        count_suite _build-san/check.out "make check (sanitizers)"
        if [ $st -ne 0 ]; then
            failures+=("make check (sanitizers)")
            grep -E '^(FAIL|ERROR|XPASS)' _build-san/check.out
            show_failed_logs _build-san
            [ "$(grep -cE '^# (FAIL|ERROR|XPASS): +[1-9]' _build-san/check.out)" -eq 0 ] && failed=$((failed + 1))
        fi
    else
        record "sanitizer build" 1
    fi
fi

if [ "${SKIP_VALGRIND:-0}" != 1 ]; then
    stage "valgrind (unit suites)"
    while read -r prog; do
        case "$prog" in ''|'#'*) continue ;; esac
        [ -x "_build/$prog" ] || { record "valgrind $prog (missing)" 1; continue; }
        # Run as make check does: from the build dir, with its environment.
        ( cd _build && CK_FORK=no CK_DEFAULT_TIMEOUT=120 CK_VERBOSITY=normal \
            top_srcdir="$top" top_builddir="$top/_build" \
            valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
            "./$prog" ) > "_build/valgrind-$(basename "$prog").out" 2>&1
        st=$?
        [ $st -ne 0 ] && grep -v ':Passed$' "_build/valgrind-$(basename "$prog").out" | tail -60
        record "valgrind $prog" $st
    done < tests/scripts/valgrind.list
fi

if [ "${SKIP_PACKAGE:-0}" != 1 ]; then
    stage "Debian package and lintian"
    tests/scripts/package.sh "$top/_build-deb" > _build/package.out 2>&1
    st=$?
    tail -20 _build/package.out
    record "package" $st
fi

if [ "${SKIP_NSPAWN:-0}" != 1 ]; then
    stage "package under systemd in a container (nspawn)"
    tests/systemd/nspawn-test.sh "$top/_build-deb" > _build/nspawn.out 2>&1
    st=$?
    p=$(grep -c '^ok ' _build/nspawn.out)
    f=$(grep -c '^not ok ' _build/nspawn.out)
    passed=$((passed + p))
    failed=$((failed + f))
    grep -E '^(not ok|# timing:)' _build/nspawn.out
    echo "nspawn: $p passed, $f failed"
    if [ $st -ne 0 ]; then
        failures+=("nspawn")
        tail -60 _build/nspawn.out
        [ "$f" -eq 0 ] && failed=$((failed + 1))
    fi
fi

if [ -x tests/fuzz/run.sh ]; then
    stage "fuzzing (${FUZZ_SECONDS:-20} s per target)"
    FUZZ_SECONDS=${FUZZ_SECONDS:-20} tests/fuzz/run.sh "$top/_build" > _build/fuzz.out 2>&1
    st=$?
    tail -20 _build/fuzz.out
    record "fuzzing" $st
fi

echo
echo "=== done in $(($(date +%s) - start)) s"
if [ ${#failures[@]} -gt 0 ]; then
    echo "failed stages: ${failures[*]}"
fi
echo "pickbox: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ ${#failures[@]} -eq 0 ]
