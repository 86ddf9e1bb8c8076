#!/bin/sh
# verify.sh: checks the shipped systemd files without a running systemd (TAP).
#
#  - the generated pickboxd@.service has every @var@ substituted;
#  - systemd-analyze verify accepts pickboxd@test.service, pickboxd@test.socket
#    and pickbox.target with no message about our units (unknown keys only
#    warn and keep rc 0, so the output is checked too), and the same check
#    does flag a deliberately broken copy (so this test can fail);
#  - the control socket keeps the contract the daemon relies on;
#  - the sandbox stays tight: systemd-analyze security exposure <= 2.0;
#  - systemd-sysusers and systemd-tmpfiles accept our files (in a temp root);
#  - pickboxd --check-config accepts etc/pickbox/example.conf (skipped while
#    pickboxd does not offer --check-config yet).
# Needs: top_srcdir, top_builddir (exported by make check).

set -u
: "${top_srcdir:?}" "${top_builddir:?}"
SYSTEMD_ANALYZE=${SYSTEMD_ANALYZE:-$(command -v systemd-analyze || true)}

n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=1; echo "not ok $n - $1"; }
skip() { n=$((n + 1)); echo "ok $n - $1 # SKIP $2"; }
diag() { sed 's/^/# /'; }

echo "1..9"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pickbox-units.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT

service_in="$top_builddir/systemd/pickboxd@.service"
socket="$top_srcdir/systemd/pickboxd@.socket"
target="$top_srcdir/systemd/pickbox.target"
pickboxd="$top_builddir/src/pickboxd"

# 1. substitution
if [ -f "$service_in" ] && ! grep -q '@[a-z_]*@' "$service_in" &&
    grep -q '^ExecStart=/.*/pickboxd ' "$service_in"; then
    ok "pickboxd@.service is generated with absolute paths"
else
    not_ok "pickboxd@.service is generated with absolute paths"
    grep -n 'ExecStart\|@' "$service_in" 2>&1 | diag
fi

# The units as installed, but ExecStart pointing at the binary just built
# (verify insists that the command exists and is executable).
mkdir -p "$tmp/units"
sed -e "s|^ExecStart=/[^ ]*/pickboxd |ExecStart=$pickboxd |" "$service_in" \
    >"$tmp/units/pickboxd@.service"
cp "$socket" "$target" "$tmp/units/"

# Runs systemd-analyze verify in dir $1; prints our units' messages; fails on
# rc != 0 or any message that names one of our units.
verify_units() {
    out=$(cd "$1" && "$SYSTEMD_ANALYZE" verify --man=no ./pickboxd@test.service \
        ./pickboxd@test.socket ./pickbox.target 2>&1)
    rc=$?
    ours=$(printf '%s\n' "$out" | grep -i 'pickbox' || true)
    if [ $rc -ne 0 ] || [ -n "$ours" ]; then
        printf 'rc=%s\n%s\n' "$rc" "$out"
        return 1
    fi
    return 0
}

# 2, 3. systemd-analyze verify, and its negative control
if [ -z "$SYSTEMD_ANALYZE" ] || [ ! -x "$pickboxd" ]; then
    skip "systemd-analyze verify pickboxd@test.service/.socket, pickbox.target" \
        "no systemd-analyze or no pickboxd binary"
    skip "a broken unit is flagged" "no systemd-analyze or no pickboxd binary"
else
    if log=$(verify_units "$tmp/units"); then
        ok "systemd-analyze verify pickboxd@test.service/.socket, pickbox.target"
    else
        not_ok "systemd-analyze verify pickboxd@test.service/.socket, pickbox.target"
        printf '%s\n' "$log" | diag
    fi
    mkdir -p "$tmp/broken"
    cp "$tmp/units/"* "$tmp/broken/"
    sed -i 's/^RemoveOnStop=yes/RemoveOnStop=yes\nRemoveOnStp=yes/' "$tmp/broken/pickboxd@.socket"
    if verify_units "$tmp/broken" >/dev/null; then
        not_ok "a broken unit is flagged (unknown key passed unnoticed)"
    else
        ok "a broken unit is flagged"
    fi
fi

# 9 (run here, numbered last). systemd-analyze security, offline; 1.4 when written.
security_check() {
    if [ -z "$SYSTEMD_ANALYZE" ] || [ ! -x "$pickboxd" ]; then
        skip "hardening: systemd-analyze security exposure <= 2.0" \
            "no systemd-analyze or no pickboxd binary"
        return
    fi
    out=$(cd "$tmp/units" && "$SYSTEMD_ANALYZE" security --offline=true --threshold=20 \
        --no-pager ./pickboxd@test.service 2>&1)
    rc=$?
    level=$(printf '%s\n' "$out" | grep 'Overall exposure level' || true)
    if [ $rc -eq 0 ] && [ -n "$level" ]; then
        ok "hardening: systemd-analyze security exposure <= 2.0"
        printf '%s\n' "$level" | diag
    else
        not_ok "hardening: systemd-analyze security exposure <= 2.0"
        printf '%s\n' "$out" | grep -v '^✓' | diag
    fi
}

# 4. the contract between the socket unit, the service and the daemon
missing=""
for line in 'ListenStream=/run/pickbox/%i/control.sock' 'FileDescriptorName=control' \
    'SocketGroup=pickbox' 'SocketMode=0660' 'RemoveOnStop=yes' 'Service=pickboxd@%i.service'; do
    grep -qx "$line" "$socket" || missing="$missing $line"
done
for line in 'Type=notify' 'User=pickbox' 'StateDirectory=pickbox/%i' 'WatchdogSec=30s' \
    'Sockets=pickboxd@%i.socket' 'AssertPathExists=/etc/pickbox/%i.conf' 'PartOf=pickbox.target'; do
    grep -qx "$line" "$service_in" || missing="$missing $line"
done
if [ -z "$missing" ]; then
    ok "socket and service keep the control socket contract"
else
    not_ok "socket and service keep the control socket contract"
    echo "missing:$missing" | diag
fi

# 5. sysusers.d
if command -v systemd-sysusers >/dev/null 2>&1; then
    mkdir -p "$tmp/root/etc"
    if systemd-sysusers --root="$tmp/root" "$top_builddir/systemd/sysusers/pickbox.conf" \
        >"$tmp/sysusers.log" 2>&1 &&
        grep -q '^pickbox:' "$tmp/root/etc/passwd" && grep -q '^pickbox:' "$tmp/root/etc/group"; then
        ok "sysusers.d file creates user and group pickbox"
    else
        not_ok "sysusers.d file creates user and group pickbox"
        diag <"$tmp/sysusers.log"
    fi
else
    skip "sysusers.d file creates user and group pickbox" "no systemd-sysusers"
fi

# 6. tmpfiles.d
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    mkdir -p "$tmp/root2"
    if systemd-tmpfiles --root="$tmp/root2" --create \
        "$top_builddir/systemd/tmpfiles/pickbox.conf" >"$tmp/tmpfiles.log" 2>&1 &&
        [ -d "$tmp/root2/run/pickbox" ]; then
        ok "tmpfiles.d file creates /run/pickbox"
    else
        not_ok "tmpfiles.d file creates /run/pickbox"
        diag <"$tmp/tmpfiles.log"
    fi
else
    skip "tmpfiles.d file creates /run/pickbox" "no systemd-tmpfiles"
fi

# 7. the service's own command line is a valid configuration
example="$top_srcdir/etc/pickbox/example.conf"
if [ -x "$pickboxd" ] && "$pickboxd" --help 2>/dev/null | grep -q -- '--check-config'; then
    can_check=yes
else
    can_check=no
fi
if [ $can_check = yes ]; then
    if "$pickboxd" --check-config --config "$example" --node-id test \
        --state-dir "$tmp/state" --control-socket /run/pickbox/test/control.sock \
        >"$tmp/cc1.log" 2>&1; then
        ok "pickboxd accepts the unit's command line with example.conf"
    else
        not_ok "pickboxd accepts the unit's command line with example.conf"
        diag <"$tmp/cc1.log"
    fi
else
    skip "pickboxd accepts the unit's command line with example.conf" \
        "pickboxd has no --check-config yet"
fi

# 8. example.conf on its own
if [ $can_check = yes ]; then
    if "$pickboxd" --check-config --config "$example" >"$tmp/cc2.log" 2>&1; then
        ok "pickboxd --check-config accepts etc/pickbox/example.conf"
    else
        not_ok "pickboxd --check-config accepts etc/pickbox/example.conf"
        diag <"$tmp/cc2.log"
    fi
else
    skip "pickboxd --check-config accepts etc/pickbox/example.conf" \
        "pickboxd has no --check-config yet"
fi

security_check

exit $failed
