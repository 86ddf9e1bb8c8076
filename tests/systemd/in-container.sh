#!/bin/bash
# in-container.sh: the checks nspawn-test.sh runs inside the booted Debian 12
# container, as root, with systemd as PID 1. Prints "ok - ..." / "not ok - ..."
# lines (nspawn-test.sh numbers them), "# ..." diagnostics and "# timing: ..."
# marks.
#
#   in-container.sh PORT1 PORT2 PORT3 DEB DEB_UPGRADE     (debs in /mnt/ci)
#
# It installs DEB, checks what the package sets up, runs pickboxd@node1..3 on
# loopback (node2 and node3 join node1 with a copy of node1's generated
# secret, as pickboxd(8) tells an operator to), checks notify readiness,
# socket activation, replication, the sandbox of the running process, an
# upgrade to DEB_UPGRADE under a writer (rolling restart by the postinst),
# leave, a clean stop, the journal, a reinstall, removal of the package, and
# purge (the state kept by default, deleted when debconf says so).
set -u
p1=$1 p2=$2 p3=$3
deb1=/mnt/ci/$4
deb2=/mnt/ci/$5
export DEBIAN_FRONTEND=noninteractive
nodes="node1 node2 node3"
log=/tmp/pbci
mkdir -p "$log"

ok() { echo "ok - $1"; }
not_ok() { echo "not ok - $1"; }
diag() { sed 's/^/# /'; }
timing() { echo "# timing: $1"; }
check() { # DESCRIPTION COMMAND...: ok when the command succeeds
    local d=$1
    shift
    if "$@"; then ok "$d"; else not_ok "$d"; fi
}
# Polls COMMAND every 0.1 s until it succeeds or SECONDS have passed. A
# condition that must be recomputed each time is given as: eval 'CODE'.
wait_for() { # SECONDS COMMAND...
    local end=$((SECONDS + $1))
    shift
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.1
    done
}
prop() { systemctl show -p "$2" --value "$1"; } # UNIT PROPERTY
ctl() { pickboxctl "$@"; }
status_field() { # NODE FIELD (from pickboxctl --json status)
    ctl -n "$1" -t 5 --json status 2>/dev/null |
        sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\).*/\1/p"
}
member_ids() { # NODE: the member ids, sorted, on one line
    ctl -n "$1" -t 5 --json members 2>/dev/null | grep -o '"id":"[^"]*"' | cut -d'"' -f4 |
        sort | tr '\n' ' ' | sed 's/ $//'
}
as_pickbox() { setpriv --reuid=pickbox --regid=pickbox --clear-groups -- "$@"; }
# "sha256  ./path" of every file in a node's tree (not .pickbox/), sorted.
tree_sums() {
    (cd "/srv/pickbox/$1" && find . -path ./.pickbox -prune -o -type f -print0 | sort -z |
        xargs -0 -r sha256sum)
}
trees_equal() { # NODE...: every tree has the same files with the same content
    local a b
    a=$(tree_sums "$1")
    shift
    for b in "$@"; do [ "$(tree_sums "$b")" = "$a" ] || return 1; done
}
journal_cursor() { journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
node_units() { for x in "$@"; do printf '_SYSTEMD_UNIT=pickboxd@%s.service ' "$x"; done; }

# ---- install ----
if apt-get install -y -q --no-install-recommends "$deb1" >"$log/install.log" 2>&1 ||
    { apt-get update -q >>"$log/install.log" 2>&1 &&
        apt-get install -y -q --no-install-recommends "$deb1" >>"$log/install.log" 2>&1; }; then
    ok "package $(dpkg-query -W -f='${Version}' pickbox) installs"
else
    not_ok "package installs"
    tail -20 "$log/install.log" | diag
    exit 1
fi
timing "install"

# ---- what the package set up ----
pw=$(getent passwd pickbox)
uid=$(id -u pickbox 2>/dev/null)
if [ -n "$pw" ] && [ "$uid" -lt 1000 ] && [ "$(echo "$pw" | cut -d: -f6)" = /var/lib/pickbox ] &&
    getent group pickbox >/dev/null && grep -q '^u pickbox ' /usr/lib/sysusers.d/pickbox.conf; then
    ok "sysusers.d created the pickbox system user ($pw)"
else
    not_ok "sysusers.d created the pickbox system user ($pw)"
fi
enabled_instances=$(find /etc/systemd/system -name 'pickboxd@*' 2>/dev/null)
loaded=$(systemctl list-units --all --plain --no-legend 'pickboxd@*' | awk '{print $1}')
if [ -f /lib/systemd/system/pickboxd@.service ] && [ -f /lib/systemd/system/pickboxd@.socket ] &&
    [ "$(systemctl is-enabled pickbox.target)" = enabled ] &&
    [ -z "$enabled_instances" ] && [ -z "$loaded" ] && [ -d /run/pickbox ]; then
    ok "units installed, pickbox.target enabled, no pickboxd@ instance enabled or started"
else
    not_ok "units installed, pickbox.target enabled, no pickboxd@ instance enabled or started"
    { echo "enabled: $enabled_instances"; echo "loaded: $loaded"; } | diag
fi
# /etc/pickbox is the package's; NODE.conf files are the admin's. The one
# conffile is the example, whose name is no startable instance.
conffiles=$(dpkg-query -W -f='${Conffiles}' pickbox | awk 'NF {print $1}')
if [ "$(dpkg -S /etc/pickbox 2>/dev/null)" = "pickbox: /etc/pickbox" ] &&
    [ "$conffiles" = "/etc/pickbox/node.conf.example" ] &&
    [ -z "$(ls /etc/pickbox/*.conf 2>/dev/null)" ]; then
    ok "/etc/pickbox belongs to the package; its one conffile is node.conf.example, no NODE.conf"
else
    not_ok "/etc/pickbox belongs to the package; its one conffile is node.conf.example, no NODE.conf"
    echo "conffiles: $conffiles" | diag
fi

# ---- node configuration, as an operator writes it ----
for x in $nodes; do install -d -o pickbox -g pickbox -m 0750 "/srv/pickbox/$x"; done
write_conf() { # NODE PORT [JOIN]
    {
        echo "[pickbox]"
        echo "node_id = $1"
        echo "port = $2"
        echo "data_dir = /srv/pickbox/$1"
        if [ -n "${3:-}" ]; then
            echo "join = 127.0.0.1:$3"
            echo "secret_file = /etc/pickbox/cluster.secret"
        fi
    } >"/etc/pickbox/$1.conf"
}
write_conf node1 "$p1"
write_conf node2 "$p2" "$p1"
write_conf node3 "$p3" "$p1"

# ---- start: Type=notify ----
t0=$SECONDS
if systemctl start pickboxd@node1; then st=0; else st=$?; fi
state="$(prop pickboxd@node1.service ActiveState)/$(prop pickboxd@node1.service SubState)"
type=$(prop pickboxd@node1.service Type)
status=$(prop pickboxd@node1.service StatusText)
if [ "$st" -eq 0 ] && [ "$state" = active/running ] && [ "$type" = notify ] && [ -n "$status" ]; then
    ok "systemctl start pickboxd@node1: $state, Type=$type, READY=1 reached (STATUS=$status)"
else
    not_ok "systemctl start pickboxd@node1 (rc $st, $state, Type=$type, STATUS=$status)"
    journalctl -u pickboxd@node1 -n 30 --no-pager | diag
fi
wait_for 20 eval '[ "$(status_field node1 role)" = leader ]' || echo "# node1 is not leader"

# ---- socket activation ----
systemctl stop pickboxd@node1.service pickboxd@node1.socket
systemctl start pickboxd@node1.socket
before="$(prop pickboxd@node1.socket ActiveState) $(prop pickboxd@node1.service ActiveState)"
out=$(ctl -n node1 -t 20 status 2>&1)
st=$?
after=$(prop pickboxd@node1.service ActiveState)
if [ "$before" = "active inactive" ] && [ "$st" -eq 0 ] && [ "$after" = active ]; then
    ok "only the socket active: pickboxctl -n node1 status starts pickboxd@node1 through it"
else
    not_ok "socket activation (socket/service before: $before, pickboxctl rc $st, after: $after)"
    echo "$out" | diag
fi
wait_for 20 eval '[ "$(status_field node1 role)" = leader ]'

# ---- cluster of three ----
# node1 generated the cluster secret; the others get a copy (pickboxd(8)).
install -o root -g pickbox -m 0640 /var/lib/pickbox/node1/secret /etc/pickbox/cluster.secret
systemctl start pickboxd@node2 && wait_for 30 eval '[ "$(member_ids node1)" = "node1 node2" ]'
systemctl start pickboxd@node3
if wait_for 30 eval '[ "$(member_ids node1)" = "node1 node2 node3" ]' &&
    wait_for 30 eval '[ "$(status_field node3 leader_id)" = node1 ]'; then
    ok "three instances form a cluster (members: $(member_ids node1))"
else
    not_ok "three instances form a cluster (members: $(member_ids node1))"
    for x in $nodes; do journalctl -u "pickboxd@$x" -n 15 --no-pager | diag; done
fi
timing "start and cluster ($((SECONDS - t0)) s)"

# ---- replication ----
head -c 3000 /dev/urandom | base64 | as_pickbox tee /srv/pickbox/node2/hello.txt >/dev/null
sum=$(sha256sum </srv/pickbox/node2/hello.txt)
same() { for x in node1 node3; do [ "$(sha256sum 2>/dev/null <"/srv/pickbox/$x/hello.txt")" = "$sum" ] || return 1; done; }
check "a file written into node2's tree appears in node1's and node3's with the same content" \
    wait_for 30 same
rm /srv/pickbox/node2/hello.txt
gone() { for x in node1 node3; do [ ! -e "/srv/pickbox/$x/hello.txt" ] || return 1; done; }
check "its deletion propagates to node1 and node3" wait_for 30 gone

# ---- the sandbox, read from the running process ----
pid=$(prop pickboxd@node1.service MainPID)
pst=$(cat "/proc/$pid/status")
field() { echo "$pst" | awk -v k="$1:" '$1 == k {print $2}'; }
if [ "$(echo "$pst" | awk '$1 == "Uid:" {print $2 $3 $4 $5}')" = "$uid$uid$uid$uid" ] &&
    [ "$(echo "$pst" | awk '$1 == "Gid:" {print $2}')" = "$(getent group pickbox | cut -d: -f3)" ]; then
    ok "pickboxd (pid $pid) runs as user and group pickbox (uid $uid)"
else
    not_ok "pickboxd (pid $pid) runs as user and group pickbox"
    echo "$pst" | grep -E '^(Uid|Gid)' | diag
fi
if [ "$(field NoNewPrivs)" = 1 ] && [ "$(field Seccomp)" = 2 ] &&
    [ "$(field CapEff)" = 0000000000000000 ] && [ "$(field CapBnd)" = 0000000000000000 ]; then
    ok "NoNewPrivs=1, Seccomp=2 (filter), CapEff=0, CapBnd=0 in /proc/$pid/status"
else
    not_ok "NoNewPrivs, Seccomp, capabilities in /proc/$pid/status"
    echo "$pst" | grep -E '^(NoNewPrivs|Seccomp|Cap)' | diag
fi
# In the service's mount namespace /usr and /etc are read-only, the state
# directory is writable, and /home and /root are inaccessible. (The same
# write works in the container's own namespace, so the check can fail.)
in_svc() { nsenter -t "$pid" -m -- "$@"; }
probe=.pbci-probe
if touch "/usr/$probe" && rm "/usr/$probe" &&
    ! in_svc touch "/usr/$probe" 2>"$log/usr.err" && grep -q 'Read-only' "$log/usr.err" &&
    ! in_svc touch "/etc/$probe" 2>/dev/null &&
    in_svc touch "/var/lib/pickbox/node1/$probe" && rm -f "/var/lib/pickbox/node1/$probe"; then
    ok "service mount namespace: /usr and /etc read-only, its state directory writable"
else
    not_ok "service mount namespace: /usr and /etc read-only, its state directory writable"
    cat "$log/usr.err" | diag
fi
if [ "$(in_svc stat -c %a /home)" = 0 ] && [ "$(in_svc stat -c %a /root)" = 0 ] &&
    [ "$(stat -c %a /root)" != 0 ]; then
    ok "ProtectHome: /home and /root are inaccessible (mode 000) to the service"
else
    not_ok "ProtectHome: /home $(in_svc stat -c %a /home), /root $(in_svc stat -c %a /root)"
fi

# systemctl reload: SIGHUP re-reads the configuration without a restart.
pid_before=$(systemctl show -p MainPID --value pickboxd@node2)
rl_cursor=$(journal_cursor)
if systemctl reload pickboxd@node2 &&
    wait_for 10 sh -c "journalctl --after-cursor '$rl_cursor' -o cat -u pickboxd@node2 | grep -q 'reloaded /etc/pickbox/node2.conf'" &&
    [ "$(systemctl show -p MainPID --value pickboxd@node2)" = "$pid_before" ] &&
    [ "$(systemctl is-active pickboxd@node2)" = active ]; then
    ok "systemctl reload pickboxd@node2 re-reads node2.conf in the same process (pid $pid_before)"
else
    not_ok "systemctl reload pickboxd@node2 (pid $pid_before -> $(systemctl show -p MainPID --value pickboxd@node2))"
    journalctl -u pickboxd@node2 -n 10 --no-pager | diag
fi

# ---- upgrade under a writer ----
# The writer creates one file every 50 ms, in turn in each node's tree, as
# user pickbox, until told to stop; it counts what it wrote.
t0=$SECONDS
rm -f "$log/stop"
as_pickbox bash -c '
    i=0
    while [ ! -e '"$log"'/stop ]; do
        i=$((i + 1))
        n=$((i % 3 + 1))
        printf "file %d, via node%d, %s\n" $i $n "$(date +%s.%N)" >/srv/pickbox/node$n/up-$i.txt
        sleep 0.05
    done
    echo $i' >"$log/writer.count" 2>"$log/writer.err" &
writer=$!
declare -A oldpid
for x in $nodes; do oldpid[$x]=$(prop "pickboxd@$x.service" MainPID); done
confsum=$(cat /etc/pickbox/*.conf | sha256sum)
wait_for 10 [ -e /srv/pickbox/node2/up-10.txt ]
cursor=$(journal_cursor)
t1=$SECONDS
apt-get install -y -q --no-install-recommends "$deb2" >"$log/upgrade.log" 2>&1
st=$?
t_upgrade=$((SECONDS - t1))
sleep 1 # the writer keeps going after the upgrade too
touch "$log/stop"
wait "$writer"
count=$(cat "$log/writer.count")
v=$(dpkg-query -W -f='${Version}' pickbox)
if [ "$st" -eq 0 ] && [ "$v" = "$(dpkg-deb -f "$deb2" Version)" ]; then
    ok "upgrade to $v installs over the running cluster (${t_upgrade} s, writer running)"
else
    not_ok "upgrade installs over the running cluster (rc $st, version $v)"
fi
grep '^pickbox:' "$log/upgrade.log" | diag
restarted=""
for x in $nodes; do
    p=$(prop "pickboxd@$x.service" MainPID)
    [ "$(prop "pickboxd@$x.service" ActiveState)" = active ] && [ "$p" != 0 ] &&
        [ "$p" != "${oldpid[$x]}" ] && restarted="$restarted $x"
done
check "the postinst restarted every running instance (new PID:${restarted:- none})" \
    [ "$restarted" = " node1 node2 node3" ]
# From the journal: "Stopping pickboxd@X.service - ..." (PID 1), then
# "Started pickboxd@X.service - ...", then X's own "status: follower of N" or
# "status: leader" line, all before the next instance is stopped.
# shellcheck disable=SC2046
seq=$(journalctl --after-cursor "$cursor" -o with-unit _PID=1 + $(node_units $nodes) |
    sed -n -e 's/.*: Stopping pickboxd@\(.*\)\.service - .*/stop \1/p' \
        -e 's/.*: Started pickboxd@\(.*\)\.service - .*/start \1/p' \
        -e 's/.* pickboxd@\(.*\)\.service\[[0-9]*\]: status: \(follower of [^(]\|leader,\).*/ready \1/p' |
    awk '
        $1 == "stop" { if (state != "") bad = 1; cur = $2; state = "stopped"; n++; seen[$2] = 1; print; next }
        $1 == "start" { if ($2 != cur || state != "stopped") bad = 1; state = "started"; print; next }
        $1 == "ready" && $2 == cur && state == "started" { state = ""; print }
        END { k = 0; for (x in seen) k++; if (bad || state != "" || n != 3 || k != 3) print "BAD" }' |
    tr '\n' ' ')
one_at_a_time() { [ -n "$seq" ] && [ "${seq%BAD }" = "$seq" ]; }
check "instances restarted one at a time, each following a leader before the next (journal: $seq)" \
    one_at_a_time
all_there() {
    local x
    for x in $nodes; do
        [ "$(find "/srv/pickbox/$x" -maxdepth 1 -name 'up-*.txt' | wc -l)" -eq "$count" ] || return 1
    done
    trees_equal $nodes
}
if [ -n "$count" ] && wait_for 60 all_there; then
    ok "all $count files written before, during and after the upgrade are in every tree, identical"
else
    not_ok "all $count files written before, during and after the upgrade are in every tree"
    for x in $nodes; do
        echo "$x: $(find "/srv/pickbox/$x" -maxdepth 1 -name 'up-*.txt' | wc -l) files"
    done | diag
    diff <(tree_sums node1) <(tree_sums node2) | head -10 | diag
    diff <(tree_sums node1) <(tree_sums node3) | head -10 | diag
fi
check "the upgrade left /etc/pickbox/*.conf untouched" \
    [ "$(cat /etc/pickbox/*.conf | sha256sum)" = "$confsum" ]
timing "upgrade (${t_upgrade} s in apt-get)"

# ---- leave ----
leader=node1 # a follower's view of the membership is enough
out=$(ctl -n node3 leave 2>&1)
st=$?
if [ "$st" -eq 0 ] && wait_for 30 eval '[ "$(member_ids "$leader")" = "node1 node2" ]'; then
    ok "pickboxctl -n node3 leave: members shows two ($(member_ids "$leader"))"
else
    not_ok "pickboxctl -n node3 leave (rc $st; members: $(member_ids "$leader"))"
    echo "$out" | diag
fi
wait_for 10 eval '[ "$(prop pickboxd@node3.service ActiveState)" != active ]'
echo "# node3 after leave: $(prop pickboxd@node3.service ActiveState)," \
    "result $(prop pickboxd@node3.service Result), exit status $(prop pickboxd@node3.service ExecMainStatus)"

# ---- stop ----
cursor=$(journal_cursor)
bad=""
for x in node2 node1 node3; do
    systemctl stop "pickboxd@$x.service" "pickboxd@$x.socket" || bad="$bad $x:rc"
    [ -e "/run/pickbox/$x/control.sock" ] && bad="$bad $x:socket-file"
done
if journalctl --after-cursor "$cursor" -o cat -u 'pickboxd@*' |
    grep -E 'SIGKILL|signal=KILL|timed out|Failed with result|status=[1-9]' >"$log/stop.bad"; then
    bad="$bad journal"
    diag <"$log/stop.bad"
fi
for x in node1 node2; do
    journalctl --after-cursor "$cursor" -o cat -u "pickboxd@$x.service" |
        grep -q 'Deactivated successfully' || bad="$bad $x:not-deactivated"
done
check "systemctl stop: exit status 0, no SIGKILL, socket files removed${bad:+ (bad:$bad)}" [ -z "$bad" ]

# ---- the journal ----
# shellcheck disable=SC2046 # one match per unit
leaders=$(journalctl -o cat $(node_units $nodes) | grep -cE '^node[123] became leader for term [0-9]+$')
check "the journal holds the leadership-change lines ($leaders x \"... became leader for term N\")" \
    [ "$leaders" -ge 1 ]
# shellcheck disable=SC2046
journalctl -p 0..3 -o short-monotonic $(node_units $nodes) -q >"$log/err.lines"
if [ ! -s "$log/err.lines" ]; then
    ok "no journal line at priority err or worse from pickboxd"
else
    not_ok "no journal line at priority err or worse from pickboxd ($(wc -l <"$log/err.lines"))"
    head -20 "$log/err.lines" | diag
fi
echo "# warnings from pickboxd (count, message):"
# shellcheck disable=SC2046
journalctl -p 4..4 -o cat $(node_units $nodes) | sed 's/[0-9][0-9]*/N/g' | sort | uniq -c |
    sort -rn | head -15 | diag
timing "leave, stop, journal"

# ---- a reinstall starts nothing the admin stopped ----
systemctl enable --quiet pickboxd@node2.service
apt-get install -y -q --reinstall "$deb2" >"$log/reinstall.log" 2>&1
st=$?
state=$(prop pickboxd@node2.service ActiveState)
if [ "$st" -eq 0 ] && [ "$state" = inactive ] &&
    [ -L /etc/systemd/system/pickbox.target.wants/pickboxd@node2.service ]; then
    ok "reinstalling the package leaves an enabled but stopped instance stopped"
else
    not_ok "reinstalling the package leaves an enabled but stopped instance stopped (rc $st, $state)"
    tail -5 "$log/reinstall.log" | diag
fi

# ---- removal stops what runs ----
systemctl start pickboxd@node1.socket pickboxd@node2.socket
ctl -n node1 -t 20 status >/dev/null 2>&1
apt-get remove -y -q pickbox >"$log/remove.log" 2>&1
st=$?
left=$(systemctl list-units --plain --no-legend --state=active 'pickboxd@*' | awk '{print $1}')
procs=$(grep -lx pickboxd /proc/[0-9]*/comm 2>/dev/null)
if [ "$st" -eq 0 ] && [ -z "$left" ] && [ -z "$procs" ]; then
    ok "apt-get remove stops the running instance and every pickboxd@ socket"
else
    not_ok "apt-get remove stops every instance (rc $st; active: $left; pids: $procs)"
    tail -5 "$log/remove.log" | diag
fi

# ---- purge: the state is kept unless the debconf question says delete ----
# DEBIAN_FRONTEND=noninteractive: pickbox/purge_state keeps its default (no).
sums_before=$(tree_sums node1)
apt-get purge -y -q pickbox >"$log/purge.log" 2>&1
st=$?
if [ "$st" -eq 0 ] && [ -f /var/lib/pickbox/node1/raft.db ] && [ -f /var/lib/pickbox/node1/secret ] &&
    [ -f /etc/pickbox/node1.conf ] && [ ! -e /etc/pickbox/node.conf.example ] &&
    [ "$(tree_sums node1)" = "$sums_before" ] && grep -q "keeping the node state" "$log/purge.log"; then
    ok "apt-get purge (non-interactive) keeps /var/lib/pickbox, the trees and the admin's NODE.conf, says so, removes the conffile"
else
    not_ok "apt-get purge (non-interactive) keeps the state and the trees (rc $st)"
    ls -la /var/lib/pickbox/node1 /etc/pickbox 2>&1 | diag
    tail -5 "$log/purge.log" | diag
fi
# Answered yes (preseeded): the state goes, the trees and the admin's files stay.
apt-get install -y -q --no-install-recommends "$deb2" >"$log/purge-reinstall.log" 2>&1
echo "pickbox pickbox/purge_state boolean true" | debconf-set-selections
apt-get purge -y -q pickbox >"$log/purge2.log" 2>&1
st=$?
if [ "$st" -eq 0 ] && [ ! -e /var/lib/pickbox ] && [ -f /etc/pickbox/node1.conf ] &&
    [ -d /srv/pickbox/node1 ] && [ "$(tree_sums node1)" = "$sums_before" ] &&
    [ -z "$(debconf-show pickbox 2>/dev/null)" ]; then
    ok "apt-get purge with pickbox/purge_state=true deletes /var/lib/pickbox, keeps the trees and NODE.conf, forgets the question"
else
    not_ok "apt-get purge with pickbox/purge_state=true deletes only /var/lib/pickbox (rc $st)"
    ls -la /var/lib/pickbox /etc/pickbox 2>&1 | diag
    tail -5 "$log/purge2.log" | diag
fi
