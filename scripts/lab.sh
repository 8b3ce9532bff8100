#!/usr/bin/env bash
# The five-host lab: three servers and two clients, each in a network namespace
# of its own with its own address on one bridge, running the very commands of
# five workstations (no --bind), in a tmux session laid out like `make cluster`.
# Needs root (network namespaces), iproute2 and tmux.
#
#   scripts/lab.sh up            make lab: build, create the network, open the session
#   scripts/lab.sh down          make lab-down: stop and remove everything `up` created
#   scripts/lab.sh crash HOST    make lab-crash HOST: HOST's link goes down (no FIN)
#   scripts/lab.sh heal HOST     make lab-heal HOST: its link comes back, cuts undone
#   scripts/lab.sh cut HOST PEER...  HOST and each PEER stop hearing each other
#                                (everyone else still hears both): a partition
#   scripts/lab.sh shell HOST    a shell on HOST (as a pane runs it)
#   scripts/lab.sh net-up | net-down   only the network, for tests and examples
#   scripts/lab.sh status        the status table once
#
# HOST is s1, s2, s3 (servers), c1, c2 (alice's two devices) or op (the operator's
# seat: the bridge's own namespace, where the status pane runs).
#
# The network lives entirely inside namespaces this script creates: PREFIX-br holds
# the bridge br0 (address NET.254, the operator), and PREFIX-HOST holds eth0, one
# end of a veth pair whose other end (named HOST) is a port of br0. Nothing is
# added to the namespace the script is started from. The addresses are a private
# range (NET.0/24, default 10.213.0.0/24) that exists only inside those namespaces.
#
# Environment: LAB_PREFIX (default rblab; tests use another), LAB_NET (default
# 10.213.0), LAB_SESSION (default replibox-lab), LAB_DIR (default ./lab: each
# host's working directory, where its data dir, sync dir and downloads go).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${LAB_PREFIX:-rblab}
NET=${LAB_NET:-10.213.0}
SESSION=${LAB_SESSION:-replibox-lab}
LAB_DIR=${LAB_DIR:-$ROOT/lab}
PORT=4000
HOSTS=(s1 s2 s3 c1 c2)
SERVERS=(s1 s2 s3)
BR=$PREFIX-br
# A locally administered MAC that no interface has: frames sent to it go nowhere
# (the bridge floods them, every host ignores them), which is how `cut` makes two
# hosts deaf to each other without an error on either side.
NOWHERE_MAC=02:00:00:00:00:00

addr_of() {
    case $1 in
    s1) echo "$NET.1" ;;
    s2) echo "$NET.2" ;;
    s3) echo "$NET.3" ;;
    c1) echo "$NET.4" ;;
    c2) echo "$NET.5" ;;
    op) echo "$NET.254" ;;
    *) return 1 ;;
    esac
}

ns_of() {
    if [ "$1" = op ]; then echo "$BR"; else echo "$PREFIX-$1"; fi
}

# The commands each workstation runs, from its own working directory (the data
# dir is the default ./replibox-data, the sync dir the default ./sync_dir_alice).
# Issue 8's credentials: s1 creates the cluster key in its data dir; on real
# workstations it is copied to the others (scp), here s2 and s3 read it where s1
# keeps it. Alice's password is made up at random when the lab starts, in
# LAB_DIR/alice.password (mode 0600). LAB_*_OPTS add options of your own.
SERVER_OPTS=${LAB_SERVER_OPTS:-}
BACKUP_OPTS="--key-file ../s1/replibox-data/cluster.key"
CLIENT_OPTS="--password-file ../alice.password${LAB_CLIENT_OPTS:+ $LAB_CLIENT_OPTS}"
cmd_of() {
    case $1 in
    s1) echo "replibox-server -p --id 1${SERVER_OPTS:+ $SERVER_OPTS}" ;;
    s2) echo "replibox-server -b $NET.1:$PORT --id 2 $BACKUP_OPTS${SERVER_OPTS:+ $SERVER_OPTS}" ;;
    s3) echo "replibox-server -b $NET.1:$PORT --id 3 $BACKUP_OPTS${SERVER_OPTS:+ $SERVER_OPTS}" ;;
    c1 | c2) echo "replibox-client alice $NET.1 $PORT $CLIENT_OPTS" ;;
    op) echo "scripts/cluster-status.sh $(server_addrs)" ;;
    esac
}

server_addrs() {
    local s out=()
    for s in "${SERVERS[@]}"; do out+=("$(addr_of "$s"):$PORT"); done
    echo "${out[*]}"
}

say() { echo "lab: $*" >&2; }
die() {
    say "$*"
    exit 1
}

# need_tmux, have_session, run_in, target_dir.
# shellcheck source=scripts/tmux.sh
source "$ROOT/scripts/tmux.sh"

need_root() {
    [ "$(id -u)" -eq 0 ] || die "the lab needs root to create network namespaces; run it as root (sudo make $1). make cluster runs the same on loopback without root."
    command -v ip >/dev/null || die "the lab needs iproute2's ip (apt-get install iproute2)"
}

need_host() {
    [ -n "${1:-}" ] || die "name a host: one of ${HOSTS[*]}"
    addr_of "$1" >/dev/null && [ "$1" != op ] || die "unknown host '$1': one of ${HOSTS[*]}"
}

have_ns() { [ -e "/run/netns/$1" ]; }

net_is_up() { have_ns "$BR"; }

net_up() {
    need_root lab
    if net_is_up; then die "the lab network $PREFIX-* exists already; 'make lab-down' (LAB_PREFIX=$PREFIX) removes it"; fi
    # Whatever fails half-way is undone: no namespace of ours is left behind.
    trap 'net_down quiet' ERR
    ip netns add "$BR"
    ip -n "$BR" link set lo up
    ip -n "$BR" link add br0 type bridge
    ip -n "$BR" addr add "$(addr_of op)/24" dev br0
    ip -n "$BR" link set br0 up
    local h ns
    for h in "${HOSTS[@]}"; do
        ns=$(ns_of "$h")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # Both ends are created directly in their namespaces.
        ip link add eth0 netns "$ns" type veth peer name "$h" netns "$BR"
        ip -n "$BR" link set "$h" master br0
        ip -n "$BR" link set "$h" up
        ip -n "$ns" addr add "$(addr_of "$h")/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
    trap - ERR
}

# Removes our namespaces (and with them every interface and the bridge in them).
# Processes still inside are killed first, by the pids the kernel lists for each
# namespace: nothing outside our namespaces is touched.
net_down() {
    local h ns pids
    for h in "${HOSTS[@]}" op; do
        ns=$(ns_of "$h")
        have_ns "$ns" || continue
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        if [ -n "${pids// /}" ]; then
            [ "${1:-}" = quiet ] || say "killing what still runs on $h: pids $pids"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
    done
    for h in "${HOSTS[@]}" op; do
        ns=$(ns_of "$h")
        have_ns "$ns" || continue
        ip netns del "$ns"
        [ "${1:-}" = quiet ] || say "removed namespace $ns"
    done
}

crash() {
    need_root lab-crash
    need_host "${1:-}"
    net_is_up || die "the lab is not up (make lab)"
    ip -n "$BR" link set "$1" down
    say "$1 ($(addr_of "$1")) is cut off: its link is down. No FIN, no RST: its processes run on and its sockets stay open; the others hear nothing from it."
    case $1 in
    s*) say "watch: the status pane shows $1 as 'no'. If it was the primary, a backup suspects it after --failure-timeout-ms (400 ms) of silence and the backups elect a new one (epoch+1), which calls c1 and c2 back: their panes say 'resumed with the new primary'. The cut-off primary cannot reach its backups and, after --ack-timeout-ms and its fence timeout, goes on without them; nothing can reach it. Heal it with 'make lab-heal $1'." ;;
    c*) say "watch: $1's pane: requests wait; after 15 s without a frame its front-end marks the server unreachable. Its changes wait in its sync dir. Heal it with 'make lab-heal $1'." ;;
    esac
}

# Undoes `crash` and every `cut` involving HOST.
heal() {
    need_root lab-heal
    need_host "${1:-}"
    net_is_up || die "the lab is not up (make lab)"
    ip -n "$BR" link set "$1" up
    local h
    for h in "${HOSTS[@]}"; do
        [ "$h" = "$1" ] && continue
        ip -n "$(ns_of "$1")" neigh del "$(addr_of "$h")" dev eth0 2>/dev/null || true
        ip -n "$(ns_of "$h")" neigh del "$(addr_of "$1")" dev eth0 2>/dev/null || true
    done
    say "$1 ($(addr_of "$1")) is back on the network."
    case $1 in
    s*) say "watch: a primary that was cut off hears of the later epoch (from a backup or the new primary) and steps down ('stepping down: heard of epoch=...'), then rejoins as a backup and catches up: the status pane shows it as a backup of the new epoch at the same seq." ;;
    c*) say "watch: $1's pane: the front-end reconnects, and the changes it kept are sent." ;;
    esac
}

# HOST and each PEER stop hearing each other; every other pair still talks.
cut() {
    need_root lab-cut
    need_host "${1:-}"
    local h=$1 p
    shift
    [ $# -gt 0 ] || die "usage: $0 cut HOST PEER..."
    net_is_up || die "the lab is not up (make lab)"
    for p in "$@"; do
        need_host "$p"
        ip -n "$(ns_of "$h")" neigh replace "$(addr_of "$p")" lladdr "$NOWHERE_MAC" nud permanent dev eth0
        ip -n "$(ns_of "$p")" neigh replace "$(addr_of "$h")" lladdr "$NOWHERE_MAC" nud permanent dev eth0
    done
    say "$h no longer hears $* (and they no longer hear it); everyone else hears everyone. Undo with 'make lab-heal $h'."
}

# A shell on HOST: in its namespace, with its own host name (a UTS namespace, so
# the client's default device name and the prompt say which workstation this is),
# the release binaries on PATH, in its working directory.
shell() {
    local h=${1:-} bin
    addr_of "$h" >/dev/null || die "unknown host '$h'"
    bin=${LAB_BIN:-$(target_dir)/release}
    local dir=$LAB_DIR/$h
    [ "$h" = op ] && dir=$ROOT
    mkdir -p "$dir"
    cd "$dir"
    local name=$h
    [ "$h" = op ] && name=operator
    exec ip netns exec "$(ns_of "$h")" unshare --uts -- \
        sh -c 'hostname "$1" && shift && exec "$@"' sh "$name" \
        env "PATH=$bin:$PATH" ${RUST_LOG:+RUST_LOG=$RUST_LOG} 'PS1=\h:\w\$ ' bash --norc --noprofile
}

status_of() { # HOST:PORT, queried from the operator's seat
    ip netns exec "$BR" "$LAB_BIN_DIR/replibox-server" --status "$1" 2>/dev/null
}

up() {
    need_root lab
    need_tmux "make lab"
    if have_session || net_is_up; then
        say "replacing the running lab"
        down quiet
    fi
    say "building release binaries (the first build takes several minutes on a small machine)"
    (cd "$ROOT" && cargo build --workspace --release)
    LAB_BIN_DIR="$(target_dir)/release"
    export LAB_BIN=$LAB_BIN_DIR
    net_up
    local h
    for h in "${HOSTS[@]}"; do mkdir -p "$LAB_DIR/$h"; done
    if [ ! -s "$LAB_DIR/alice.password" ]; then
        (umask 077 && head -c 18 /dev/urandom | base64 >"$LAB_DIR/alice.password")
        say "made up alice's password in $LAB_DIR/alice.password"
    fi

    local shell=("$ROOT/scripts/lab.sh" shell)
    local env=(env "LAB_PREFIX=$PREFIX" "LAB_NET=$NET" "LAB_DIR=$LAB_DIR" "LAB_BIN=$LAB_BIN")
    [ -n "${RUST_LOG:-}" ] && env+=("RUST_LOG=$RUST_LOG")
    local s1 s2 s3 c1 c2 op
    s1=$(tmux new-session -d -P -F '#{pane_id}' -s "$SESSION" -n lab -x 240 -y 60 -- "${env[@]}" "${shell[@]}" s1)
    c1=$(tmux split-window -v -l 50% -t "$s1" -P -F '#{pane_id}' -- "${env[@]}" "${shell[@]}" c1)
    s2=$(tmux split-window -h -l 67% -t "$s1" -P -F '#{pane_id}' -- "${env[@]}" "${shell[@]}" s2)
    s3=$(tmux split-window -h -l 50% -t "$s2" -P -F '#{pane_id}' -- "${env[@]}" "${shell[@]}" s3)
    c2=$(tmux split-window -h -l 67% -t "$c1" -P -F '#{pane_id}' -- "${env[@]}" "${shell[@]}" c2)
    op=$(tmux split-window -h -l 50% -t "$c2" -P -F '#{pane_id}' -- "${env[@]}" "${shell[@]}" op)
    tmux set-option -w -t "$s1" pane-border-status top >/dev/null
    tmux set-option -w -t "$s1" pane-border-format ' #{pane_index}: #{pane_title} ' >/dev/null
    tmux select-pane -t "$s1" -T "s1 $(addr_of s1) server (-p)"
    tmux select-pane -t "$s2" -T "s2 $(addr_of s2) server (-b)"
    tmux select-pane -t "$s3" -T "s3 $(addr_of s3) server (-b)"
    tmux select-pane -t "$c1" -T "c1 $(addr_of c1) alice"
    tmux select-pane -t "$c2" -T "c2 $(addr_of c2) alice"
    tmux select-pane -t "$op" -T "operator $(addr_of op): status"
    for h in s1 s2 s3 c1 c2 op; do tmux set-option -p -t "${!h}" @lab-host "$h" >/dev/null; done
    # A shell started before the last split may draw long lines twice: start
    # every shell again now that the layout is final.
    for h in s1 s2 s3 c1 c2 op; do
        tmux respawn-pane -k -t "${!h}" -- "${env[@]}" "${shell[@]}" "$h"
    done

    run_in "$s1" "$(cmd_of s1)"
    local deadline=$((SECONDS + 20))
    until status_of "$(addr_of s1):$PORT" >/dev/null; do
        if ((SECONDS >= deadline)); then
            say "warning: s1 does not answer after 20 s; its pane (top left) says why"
            break
        fi
        sleep 0.2
    done
    run_in "$s2" "$(cmd_of s2)"
    run_in "$s3" "$(cmd_of s3)"
    run_in "$c1" "$(cmd_of c1)"
    run_in "$c2" "$(cmd_of c2)"
    run_in "$op" "$(cmd_of op)"
    tmux select-pane -t "$c1"
    say "up: five hosts on bridge br0 ($NET.0/24): s1 $(addr_of s1) (primary), s2 $(addr_of s2), s3 $(addr_of s3), c1 $(addr_of c1), c2 $(addr_of c2); each pane is a shell on its host, its files under ${LAB_DIR#"$ROOT"/}/HOST"
    say "try: make lab-crash s1 (then make lab-heal s1); stop everything with make lab-down"
    if [ -n "${TMUX:-}" ]; then
        say "switch to it with 'tmux switch-client -t $SESSION'"
    else
        say "attach with 'tmux attach -t $SESSION' (detach: Ctrl-b d)"
    fi
}

# Ctrl-C in every pane (clients first, so that their logouts reach a server),
# then the session, then whatever still runs in our namespaces, then the
# namespaces themselves.
down() {
    local pane host
    if have_session; then
        local clients=() servers=() others=()
        while read -r pane host; do
            case $host in
            c*) clients+=("$pane") ;;
            s*) servers+=("$pane") ;;
            *) others+=("$pane") ;;
            esac
        done < <(tmux list-panes -s -t "=$SESSION" -F '#{pane_id} #{@lab-host}')
        for pane in "${clients[@]}" "${others[@]}"; do tmux send-keys -t "$pane" C-c; done
        wait_idle 10 "${clients[@]}"
        for pane in "${servers[@]}"; do tmux send-keys -t "$pane" C-c; done
        wait_idle 10 "${servers[@]}"
        tmux kill-session -t "=$SESSION" 2>/dev/null || true
        [ "${1:-}" = quiet ] || say "ended tmux session $SESSION"
    fi
    if net_is_up || have_ns "$PREFIX-s1"; then
        need_root lab-down
        net_down "${1:-}"
    else
        [ "${1:-}" = quiet ] || say "no lab network ($PREFIX-*) to remove"
    fi
    [ "${1:-}" = quiet ] || say "the hosts' files stay under ${LAB_DIR#"$ROOT"/}/ (data dirs, sync dirs)"
}

# Waits until none of the panes runs anything but its shell.
wait_idle() {
    local deadline=$((SECONDS + $1)) pane
    shift
    for pane in "$@"; do
        while [ -n "$(ps -o pid= --ppid "$(tmux display-message -p -t "$pane" '#{pane_pid}')" 2>/dev/null)" ] &&
            ((SECONDS < deadline)); do
            sleep 0.1
        done
    done
}

case "${1:-up}" in
up) up ;;
down) down ;;
crash) crash "${2:-}" ;;
heal) heal "${2:-}" ;;
cut) shift && cut "$@" ;;
shell) shell "${2:-}" ;;
net-up) net_up ;;
net-down) net_down quiet ;;
status)
    net_is_up || die "the lab is not up (make lab)"
    LAB_BIN_DIR=${LAB_BIN:-$(target_dir)/release}
    ip netns exec "$BR" env "REPLIBOX_SERVER=$LAB_BIN_DIR/replibox-server" "$ROOT/scripts/cluster-status.sh" --once $(server_addrs)
    ;;
*) die "usage: $0 up|down|crash HOST|heal HOST|cut HOST PEER...|shell HOST|net-up|net-down|status" ;;
esac
