#!/bin/bash
# nspawn-test.sh: the Debian package under a real systemd (PID 1), in a
# Debian 12 container booted with systemd-nspawn; prints TAP.
#
#   tests/systemd/nspawn-test.sh [DEBDIR]     (default: _build-deb)
#
# DEBDIR holds pickbox_<v>_amd64.deb and the source tree it was built from
# (tests/scripts/package.sh's output; it is run when the .deb is missing).
# The script
#  - installs systemd-container and mmdebstrap when missing;
#  - builds a second package, <v>+ci1, from a copy of that tree with one more
#    changelog entry (the repository's debian/changelog is not touched);
#  - builds a minimal bookworm rootfs with mmdebstrap (the package's
#    run-time dependencies included) unless $PICKBOX_ROOTFS_CACHE
#    (/var/tmp/pickbox-rootfs-cache) already holds one for the same recipe;
#  - boots it with --volatile=overlay (the cached rootfs stays pristine) in a
#    cgroup of its own, runs tests/systemd/in-container.sh inside with
#    nsenter, and powers it off.
# On exit it stops the container, removes its cgroups and the work directory
# (kept, and named, when a check failed); it kills only what it started.
# Needs root, and the Debian mirror when the tools or the rootfs are missing.
set -u
top=$(cd "$(dirname "$0")/../.." && pwd)
debdir=$(cd "${1:-$top/_build-deb}" 2>/dev/null && pwd || echo "${1:-$top/_build-deb}")
cache=${PICKBOX_ROOTFS_CACHE:-/var/tmp/pickbox-rootfs-cache}
suite=bookworm
mirror=${PICKBOX_MIRROR:-}
# Bump when the recipe below changes: the cached rootfs is rebuilt.
recipe="pickbox-rootfs-1 $suite minbase systemd-sysv dbus"

t_start=$(date +%s%N)
t_last=$t_start
n=0
failed=0
work=""
nspawn_pid=""
leader=""
machine="pbci$$"
cgroups=()

ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); failed=1; echo "not ok $n - $1"; }
diag() { sed 's/^/# /'; }
timing() { # phase
    local now
    now=$(date +%s%N)
    awk -v p="$1" -v d="$((now - t_last))" -v t="$((now - t_start))" \
        'BEGIN { printf "# timing: %-30s %6.1f s (total %.1f s)\n", p, d / 1e9, t / 1e9 }'
    t_last=$now
}
bail() { not_ok "$1"; finish; }

# The container's PID 1, or nothing.
find_leader() {
    local c
    for c in $(ps -o pid= --ppid "$nspawn_pid" 2>/dev/null || true); do
        if [ "$(awk '/^NSpid:/ {print $NF}' "/proc/$c/status" 2>/dev/null)" = 1 ]; then
            echo "$c"
            return
        fi
    done
}

# Runs a command inside the container, as its root, with a clean environment.
in_ct() {
    nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

# Polls until process $1 is gone, for at most $2 tenths of a second.
wait_gone() {
    local i
    for ((i = 0; i < $2; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

cleanup() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        [ -n "$leader" ] || leader=$(find_leader)
        # Ask the container's systemd to power off (SIGRTMIN+4); nspawn exits
        # once it has reaped the container. If that does not happen, kill the
        # container's PID 1 (which takes the whole PID namespace with it)
        # while nspawn is still there to reap it, and only then nspawn.
        # Killing nspawn first would orphan the container.
        if [ -n "$leader" ]; then
            # First the commands entered with nsenter (in the container's PID
            # namespace but not in its cgroups): shutdown would wait for them.
            local ns p
            ns=$(readlink "/proc/$leader/ns/pid")
            for p in /proc/[0-9]*; do
                [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$ns" ] || continue
                grep -q "/ci-$machine/" "$p/cgroup" 2>/dev/null || kill -KILL "${p#/proc/}" 2>/dev/null
            done
            kill -s RTMIN+4 "$leader" 2>/dev/null
            wait_gone "$nspawn_pid" 150 || { kill -KILL "$leader" 2>/dev/null; wait_gone "$nspawn_pid" 50; }
        fi
        kill -KILL "$nspawn_pid" 2>/dev/null
        wait "$nspawn_pid" 2>/dev/null
    fi
    local cg
    for cg in "${cgroups[@]}"; do
        for _ in $(seq 50); do
            [ -d "$cg" ] || break
            find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
            [ -d "$cg" ] && sleep 0.1
        done
        [ -d "$cg" ] && echo "# could not remove cgroup $cg"
    done
    if [ -n "$work" ]; then
        if [ "$failed" -eq 0 ]; then
            rm -rf "$work"
        else
            echo "# work directory kept: $work"
        fi
    fi
}

finish() {
    if [ -n "$nspawn_pid" ] && [ -f "$work/console.log" ] && [ "$failed" -ne 0 ]; then
        echo "# container console (tail):"
        tail -n 30 "$work/console.log" | diag
    fi
    cleanup
    trap - EXIT
    echo "1..$n"
    awk -v t="$(($(date +%s%N) - t_start))" 'BEGIN { printf "# timing: whole step %.1f s\n", t / 1e9 }'
    exit "$failed"
}
trap 'failed=1; finish' EXIT
trap 'exit 1' INT TERM

[ "$(id -u)" -eq 0 ] || bail "needs root"
work=$(mktemp -d /var/tmp/pickbox-nspawn.XXXXXX) || bail "work directory"
mkdir -p "$work/ci"

# ---- host tools ----
missing=""
command -v systemd-nspawn >/dev/null || missing="$missing systemd-container"
command -v mmdebstrap >/dev/null || missing="$missing mmdebstrap"
if [ -n "$missing" ]; then
    echo "# installing:$missing"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $missing; } >"$work/tools.log" 2>&1; then
        tail -20 "$work/tools.log" | diag
        bail "host tools installed ($missing)"
    fi
fi
ok "host tools present (systemd-nspawn, mmdebstrap, nsenter)"
timing "host tools"

# ---- the two packages ----
deb1=$(ls "$debdir"/pickbox_*_amd64.deb 2>/dev/null | head -1)
if [ -z "$deb1" ] || [ ! -d "$debdir/pickbox/debian" ]; then
    echo "# no package in $debdir: building it"
    "$top/tests/scripts/package.sh" "$debdir" >"$work/package.log" 2>&1 ||
        { tail -30 "$work/package.log" | diag; bail "package built"; }
    deb1=$(ls "$debdir"/pickbox_*_amd64.deb | head -1)
fi
v1=$(dpkg-deb -f "$deb1" Version)
v2="$v1+ci1"
# The upgrade package: the same tree, one more changelog entry. The copy keeps
# the build products and their times, so dh skips the build and only the
# binary package is made again.
cp -a "$debdir/pickbox" "$work/src"
{
    printf 'pickbox (%s) unstable; urgency=medium\n\n' "$v2"
    printf '  * CI build for the upgrade test (tests/systemd/nspawn-test.sh).\n\n'
    printf ' -- pickbox CI <ci@pickbox.invalid>  %s\n\n' "$(date -R)"
    cat "$debdir/pickbox/debian/changelog"
} >"$work/src/debian/changelog.new"
mv "$work/src/debian/changelog.new" "$work/src/debian/changelog"
if ! (cd "$work/src" && DEB_BUILD_OPTIONS=nocheck dpkg-buildpackage -us -uc -b -nc) \
    >"$work/upgrade-build.log" 2>&1; then
    tail -30 "$work/upgrade-build.log" | diag
    bail "upgrade package $v2 built"
fi
cp "$deb1" "$work/ci/"
cp "$work/pickbox_${v2}_amd64.deb" "$work/ci/"
cp "$top/tests/systemd/in-container.sh" "$work/ci/"
rm -rf "$work/src"
ok "packages $v1 and $v2 ready"
timing "packages"

# ---- rootfs ----
# The package's run-time dependencies go into the rootfs, so that a run
# needs neither the network nor apt-get update (in-container.sh still runs
# apt-get update when the install finds something missing).
deps=$(dpkg-deb -f "$deb1" Depends | tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/ //g' |
    grep -v '^$' | sort -u | tr '\n' ',' | sed 's/,$//')
stamp="$recipe $deps"
rootfs="$cache/$suite"
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9 # one builder at a time; concurrent runs share the result
if [ -d "$rootfs" ] && [ "$(cat "$cache/$suite.stamp" 2>/dev/null)" = "$stamp" ]; then
    ok "rootfs cached in $rootfs"
else
    rm -rf "$rootfs" "$rootfs.new" "$cache/$suite.stamp"
    echo "# building the $suite rootfs (includes: $deps)"
    if mmdebstrap --variant=minbase --include="systemd-sysv,dbus,$deps" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='systemctl --root="$1" mask console-getty.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer systemd-tmpfiles-clean.timer' \
        --customize-hook='echo pickbox-ci > "$1/etc/hostname"' \
        "$suite" "$rootfs.new" $mirror >"$work/mmdebstrap.log" 2>&1; then
        mv "$rootfs.new" "$rootfs"
        echo "$stamp" >"$cache/$suite.stamp"
        ok "rootfs built in $rootfs ($(du -sm "$rootfs" | cut -f1) MB)"
    else
        tail -30 "$work/mmdebstrap.log" | diag
        rm -rf "$rootfs.new"
        flock -u 9
        bail "rootfs built"
    fi
fi
flock -u 9
timing "rootfs"

# ---- boot ----
# With --keep-unit and no systemd on the host, nspawn puts the container
# under its own cgroup; give it a fresh one, removed afterwards.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cgroups=("/sys/fs/cgroup/ci-$machine")
else
    cgroups=("/sys/fs/cgroup/systemd/ci-$machine")
    [ -d /sys/fs/cgroup/unified ] && cgroups+=("/sys/fs/cgroup/unified/ci-$machine")
fi
for cg in "${cgroups[@]}"; do mkdir "$cg" || bail "cgroup $cg"; done
(
    for cg in "${cgroups[@]}"; do echo "$BASHPID" >"$cg/cgroup.procs"; done
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec systemd-nspawn -q -D "$rootfs" --boot \
        --register=no --keep-unit --volatile=overlay -M "$machine" \
        --bind-ro="$work/ci:/mnt/ci" </dev/null >"$work/console.log" 2>&1
) &
nspawn_pid=$!
for _ in $(seq 300); do
    leader=$(find_leader)
    [ -n "$leader" ] && break
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 0.05
done
[ -n "$leader" ] || bail "container started"
# Until PID 1 has set itself up, systemctl answers "offline": ask again.
state=""
for _ in $(seq 300); do
    state=$(timeout 60 nsenter -t "$leader" -a systemctl is-system-running --wait 2>/dev/null)
    [ "$state" = offline ] || [ -z "$state" ] || break
    sleep 0.1
done
if [ "$state" = running ]; then
    ok "container boots; systemd is PID 1 and the system is running"
else
    not_ok "container boots; systemd is PID 1 and the system is running (state: $state)"
    in_ct systemctl --failed --no-legend 2>&1 | diag
fi
timing "boot"

# ---- the checks inside ----
ports=$(python3 - <<'EOF'
import socket
socks = []
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)
# shellcheck disable=SC2086 # three port numbers
while IFS= read -r line; do
    case "$line" in
    "ok "*) ok "${line#ok - }" ;;
    "not ok "*) not_ok "${line#not ok - }" ;;
    "# timing: "*) timing "${line#\# timing: }" ;;
    *) echo "$line" ;;
    esac
done < <(in_ct bash /mnt/ci/in-container.sh $ports "$(basename "$deb1")" \
    "pickbox_${v2}_amd64.deb" 2>&1; echo "# in-container.sh exit status $?")

# ---- shutdown ----
in_ct systemctl poweroff >/dev/null 2>&1
st=124
for _ in $(seq 300); do
    if ! kill -0 "$nspawn_pid" 2>/dev/null; then
        wait "$nspawn_pid"
        st=$?
        break
    fi
    sleep 0.1
done
if [ "$st" -eq 0 ]; then
    ok "container powers off cleanly (systemd-nspawn exit status 0)"
    nspawn_pid=""
else
    not_ok "container powers off cleanly (systemd-nspawn exit status $st)"
fi
timing "shutdown"
finish
