#!/usr/bin/env bash
# make cluster: the reference set-up (three servers, two devices of one user) on one
# machine, in one tmux session named replibox: one pane per process, plus a pane
# that shows every server's --status once a second.
#
#   scripts/cluster.sh start   build release binaries and (re)start the session
#   scripts/cluster.sh stop    Ctrl-C every pane (clean shutdown), then end the session
#   scripts/cluster.sh clean   stop, then delete ./cluster (data dirs and sync dirs)
#   scripts/cluster.sh kill-primary   SIGKILL the server that answers as primary
#   scripts/cluster.sh kill-backup [N]   SIGKILL a backup (server N if given)
#   scripts/cluster.sh restart-dead   start every server whose pane is idle again,
#                              as a backup joining through a live server
#
# CLUSTER_SESSION and CLUSTER_PORT change the session name (replibox) and the port
# (4000), to run a second cluster beside one already running.
#
# Five loopback addresses stand for five machines (Linux routes all of 127.0.0.0/8
# to lo): servers on 127.0.0.1-3, port 4000 each; alice's laptop on .4 and her
# desktop on .5. Everything they write is under ./cluster: s1, s2, s3 (server data
# dirs), alice-laptop and alice-desktop (sync dirs), and alice.password.
#
# Credentials, with no step for the user: server 1 (-p) creates the cluster key
# cluster/s1/cluster.key the first time; servers 2 and 3 are given it with
# --key-file (and keep a copy in their own data dirs once accepted). Alice's
# password is made up once, at random, in cluster/alice.password (mode 0600); her
# first login creates her account with it.
#
# Each pane is an interactive bash (without rc files, so that it starts at once)
# whose PATH starts with the release binaries; the
# command is typed into it (send-keys), so after a Ctrl-C or a crash, Up and Enter
# start it again: that is how a server is stopped and restarted by hand.
set -euo pipefail

SESSION=${CLUSTER_SESSION:-replibox}
PORT=${CLUSTER_PORT:-4000}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PRIMARY=127.0.0.1:$PORT
SERVERS=(127.0.0.1:$PORT 127.0.0.2:$PORT 127.0.0.3:$PORT)
# Issue 8's credentials: server 1 creates the cluster key in its data dir, and
# the backups are given it (once accepted they keep a copy in their own); alice's
# password is made up at the first start (below).
KEY=cluster/s1/cluster.key
PASSWORD=cluster/alice.password
# Options every server, every backup and every client gets.
SERVER_OPTS=""
BACKUP_OPTS="--key-file $KEY"
CLIENT_OPTS="--password-file $PASSWORD"
# Server N's own options: where it listens and keeps its data. -p or -b comes first.
server_args() { echo "--id $1 --bind 127.0.0.$1 --port $PORT --data cluster/s$1${SERVER_OPTS:+ $SERVER_OPTS}"; }
S1="replibox-server -p $(server_args 1)"
S2="replibox-server -b 127.0.0.1:$PORT $(server_args 2) $BACKUP_OPTS"
S3="replibox-server -b 127.0.0.1:$PORT $(server_args 3) $BACKUP_OPTS"
LAPTOP="replibox-client alice 127.0.0.1 $PORT --bind 127.0.0.4 --sync-dir cluster/alice-laptop${CLIENT_OPTS:+ $CLIENT_OPTS}"
DESKTOP="replibox-client alice 127.0.0.1 $PORT --bind 127.0.0.5 --sync-dir cluster/alice-desktop${CLIENT_OPTS:+ $CLIENT_OPTS}"
STATUS="scripts/cluster-status.sh ${SERVERS[*]}"

say() { echo "cluster: $*" >&2; }
die() {
    say "$*"
    exit 1
}

# need_tmux, have_session, run_in, target_dir.
# shellcheck source=scripts/tmux.sh
source "$ROOT/scripts/tmux.sh"

# True when something accepts TCP connections at HOST:PORT (bash's /dev/tcp: no
# tools needed, and a connection closed before any frame costs the server nothing).
listening() {
    local host=${1%:*} port=${1##*:}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# Waits up to $1 seconds until none of the servers' addresses accepts connections.
wait_closed() {
    local deadline=$((SECONDS + $1)) addr busy
    while :; do
        busy=
        for addr in "${SERVERS[@]}"; do
            if listening "$addr"; then busy+=" $addr"; fi
        done
        [ -z "$busy" ] && return 0
        if ((SECONDS >= deadline)); then
            echo "$busy"
            return 1
        fi
        sleep 0.2
    done
}

stop() {
    if ! have_session; then
        [ "${1:-}" = quiet ] || say "no tmux session named $SESSION is running"
        return 0
    fi
    # Ctrl-C first, so that everything ends cleanly: the clients (and the status
    # loop) first, so that their logouts reach a live server, then the servers.
    local pane title busy clients=() servers=()
    while read -r pane title; do
        case $title in
        server*) servers+=("$pane") ;;
        *) clients+=("$pane") ;;
        esac
    done < <(tmux list-panes -s -t "=$SESSION" -F '#{pane_id} #{pane_title}')
    # Every process the panes run, by pid (the pane's shell and its children), so
    # that whatever outlives the session can be named and ended; nothing else.
    local pids=()
    for pane in "${clients[@]}" "${servers[@]}"; do
        local shell_pid
        shell_pid=$(tmux display-message -p -t "$pane" '#{pane_pid}')
        pids+=("$shell_pid")
        mapfile -t -O "${#pids[@]}" pids < <(ps -o pid= --ppid "$shell_pid" | tr -d ' ')
    done
    for pane in "${clients[@]}"; do tmux send-keys -t "$pane" C-c; done
    local deadline=$((SECONDS + 10))
    for pane in "${clients[@]}"; do
        while [[ $(tmux display-message -p -t "$pane" '#{pane_current_command}' 2>/dev/null) == replibox-* ]] &&
            ((SECONDS < deadline)); do
            sleep 0.1
        done
    done
    for pane in "${servers[@]}"; do tmux send-keys -t "$pane" C-c; done
    wait_closed 10 >/dev/null || true
    tmux kill-session -t "=$SESSION" 2>/dev/null || true
    # The panes' processes get SIGHUP with the session; give them 2 s to go.
    local pid deadline=$((SECONDS + 2)) left
    while :; do
        left=()
        for pid in "${pids[@]}"; do
            if alive "$pid"; then left+=("$pid"); fi
        done
        [ "${#left[@]}" -eq 0 ] && break
        if ((SECONDS >= deadline)); then
            for pid in "${left[@]}"; do
                say "pid $pid ($(ps -o comm= -p "$pid")) outlived the session; sending it SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            done
            break
        fi
        sleep 0.1
    done
    if ! busy=$(wait_closed 5); then
        say "warning: still listening after the session ended:$busy (another replibox outside tmux?)"
    fi
    [ "${1:-}" = quiet ] || say "stopped session $SESSION: the clients logged out, then the servers stopped (Ctrl-C); their data stays in ./cluster (make cluster-clean removes it)"
}

# True while process $1 runs (a zombie, dead but not yet reaped, does not count).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $stat && $stat != Z* ]]
}

start() {
    need_tmux "make cluster"
    stop quiet
    local busy
    if ! busy=$(wait_closed 0); then
        die "cannot start: something already listens on$busy; stop it first"
    fi

    say "building release binaries"
    cargo build --workspace --release
    local bin
    bin="$(target_dir)/release"
    if [ ! -x "$bin/replibox-server" ] || [ ! -x "$bin/replibox-client" ]; then die "no binaries in $bin after the build"; fi
    mkdir -p cluster
    if [ ! -s "$PASSWORD" ]; then
        # 18 random bytes as base64: one line, no quoting trouble.
        (umask 077 && head -c 18 /dev/urandom | base64 >"$PASSWORD")
        say "made up alice's password in $PASSWORD"
    fi

    local shell=(env "PATH=$bin:$PATH")
    if [ -n "${RUST_LOG:-}" ]; then shell+=("RUST_LOG=$RUST_LOG"); fi
    # No rc files: a slow ~/.bashrc (pyenv's rehash, run by six panes at once,
    # took a minute here) delayed the typed commands, so a client started
    # before its server and exited. The prompt is set here instead.
    shell+=('PS1=\w\$ ' bash --norc --noprofile)

    # Layout: the servers on the top row, the clients and the status on the bottom.
    local s1 s2 s3 laptop desktop status
    s1=$(tmux new-session -d -P -F '#{pane_id}' -s "$SESSION" -n cluster -x 240 -y 60 -c "$ROOT" -- "${shell[@]}")
    laptop=$(tmux split-window -v -l 50% -t "$s1" -P -F '#{pane_id}' -c "$ROOT" -- "${shell[@]}")
    s2=$(tmux split-window -h -l 67% -t "$s1" -P -F '#{pane_id}' -c "$ROOT" -- "${shell[@]}")
    s3=$(tmux split-window -h -l 50% -t "$s2" -P -F '#{pane_id}' -c "$ROOT" -- "${shell[@]}")
    desktop=$(tmux split-window -h -l 67% -t "$laptop" -P -F '#{pane_id}' -c "$ROOT" -- "${shell[@]}")
    status=$(tmux split-window -h -l 50% -t "$desktop" -P -F '#{pane_id}' -c "$ROOT" -- "${shell[@]}")

    tmux set-option -w -t "$s1" pane-border-status top >/dev/null
    tmux set-option -w -t "$s1" pane-border-format ' #{pane_index}: #{pane_title} ' >/dev/null
    tmux select-pane -t "$s1" -T "server 1 (-p) 127.0.0.1:$PORT"
    tmux select-pane -t "$s2" -T "server 2 (-b) 127.0.0.2:$PORT"
    tmux select-pane -t "$s3" -T "server 3 (-b) 127.0.0.3:$PORT"
    tmux select-pane -t "$laptop" -T "alice-laptop 127.0.0.4"
    tmux select-pane -t "$desktop" -T "alice-desktop 127.0.0.5"
    tmux select-pane -t "$status" -T "status, every second"
    # kill-primary, kill-backup and restart-dead find a server's pane by this.
    tmux set-option -p -t "$s1" @server 1 >/dev/null
    tmux set-option -p -t "$s2" @server 2 >/dev/null
    tmux set-option -p -t "$s3" @server 3 >/dev/null
    # A shell that started before the last split may have missed its resize and
    # draw long lines twice: start every shell again now that the layout is final.
    local pane
    for pane in "$s1" "$s2" "$s3" "$laptop" "$desktop" "$status"; do
        tmux respawn-pane -k -t "$pane" -c "$ROOT" -- "${shell[@]}"
    done

    run_in "$s1" "$S1"
    # Backups join through the primary and clients log in to it: wait until it
    # answers, or until its pane is back at the shell prompt (it exited).
    local deadline=$((SECONDS + 20)) started=$SECONDS
    until "$bin/replibox-server" --status "$PRIMARY" >/dev/null 2>&1; do
        if ((SECONDS - started >= 1)) && [ "$(tmux display-message -p -t "$s1" '#{pane_current_command}')" = bash ]; then
            say "warning: server 1 exited at start-up; its pane (top left) says why"
            break
        fi
        if ((SECONDS >= deadline)); then
            say "warning: server 1 does not answer at $PRIMARY after 20 s; its pane (top left) says why"
            break
        fi
        sleep 0.2
    done
    run_in "$s2" "$S2"
    run_in "$s3" "$S3"
    run_in "$laptop" "$LAPTOP"
    run_in "$desktop" "$DESKTOP"
    run_in "$status" "$STATUS"
    tmux select-pane -t "$laptop"

    if [ -n "${TMUX:-}" ]; then
        say "up: switch to it with 'tmux switch-client -t $SESSION'; stop it with 'make cluster-stop'"
    else
        say "up: attach with 'tmux attach -t $SESSION' (detach: Ctrl-b d); stop it with 'make cluster-stop'"
    fi
}

# One field of a status line (a number or a string), the members list cut out
# first: its entries have a role of their own.
field() { # json name
    local top=${1/\"members\":\[*\],/} re_num="\"$2\":([0-9]+)" re_str="\"$2\":\"([^\"]*)\""
    if [[ $top =~ $re_num ]] || [[ $top =~ $re_str ]]; then printf '%s' "${BASH_REMATCH[1]}"; fi
}

server_bin() {
    local bin
    bin="$(target_dir)/release/replibox-server"
    [ -x "$bin" ] || die "no $bin: run make cluster first"
    echo "$bin"
}

need_session() {
    have_session || die "no tmux session named $SESSION is running: start it with make cluster"
}

# The pane of server N (1, 2 or 3).
pane_of() {
    local pane n
    while read -r pane n; do
        if [ "$n" = "$1" ]; then
            echo "$pane"
            return 0
        fi
    done < <(tmux list-panes -s -t "=$SESSION" -F '#{pane_id} #{@server}')
    return 1
}

# The pid of the replibox-server a pane runs (a child of the pane's shell).
server_pid() {
    local shell_pid pid comm
    shell_pid=$(tmux display-message -p -t "$1" '#{pane_pid}')
    while read -r pid comm; do
        if [ "$comm" = replibox-server ]; then
            echo "$pid"
            return 0
        fi
    done < <(ps -o pid=,comm= --ppid "$shell_pid")
    return 1
}

# Prints "N ROLE EPOCH" for every server that answers a status query.
roles() {
    local bin i json
    bin=$(server_bin)
    for i in 1 2 3; do
        if json=$("$bin" --status "${SERVERS[i - 1]}" 2>/dev/null); then
            echo "$i $(field "$json" role) $(field "$json" epoch)"
        fi
    done
}

# SIGKILLs server N, found by its pane. $2 says what it was, for the message.
kill_server() {
    local n=$1 what=$2 pane pid
    pane=$(pane_of "$n") || die "server $n has no pane in session $SESSION (was it started by an older make cluster? make cluster starts it again)"
    pid=$(server_pid "$pane") || die "server $n answers at ${SERVERS[n - 1]}, but its pane runs no replibox-server (started by hand outside the pane?); killing nothing"
    kill -KILL "$pid"
    say "killed server $n ($what, pid $pid, ${SERVERS[n - 1]}) with SIGKILL: no clean stop, its sockets closed by the kernel"
}

kill_primary() {
    need_session
    local n role epoch primary=
    while read -r n role epoch; do
        if [ "$role" = primary ]; then primary="$n $epoch"; fi
    done < <(roles)
    [ -n "$primary" ] || die "no server answers as primary right now (an election may be under way, or none is left); the status pane shows each one's role"
    read -r n epoch <<<"$primary"
    kill_server "$n" "primary of epoch $epoch"
    say "watch: the status pane: server $n answers 'no'; within about a second (--failure-timeout-ms, 400 ms, then the election) a backup reports primary of epoch $((epoch + 1)) and the other follows it at the same seq. The client panes say 'connection to the server is back: resumed with the new primary ...'; a command typed meanwhile waits and then completes. Server $n's pane is back at its prompt: make restart-dead starts it again as a backup."
}

kill_backup() {
    need_session
    local n role epoch victim= want=${1:-}
    while read -r n role epoch; do
        if [ "$role" = backup ] && { [ -z "$want" ] || [ "$want" = "$n" ]; }; then victim=${victim:-$n}; fi
    done < <(roles)
    [ -n "$victim" ] || die "no ${want:+server $want as }backup answers right now; the status pane shows each server's role"
    kill_server "$victim" "a backup"
    say "watch: the status pane: server $victim answers 'no'. The primary's pane logs 'dropping backup id=$victim' at once (the kernel closed the link), then 'fenced backup id=$victim: its port refuses connections: it is down', and commits its leave: the members list shrinks. Clients notice nothing. make restart-dead starts it again as a backup; it catches up on what it missed."
}

restart_dead() {
    need_session
    local n role epoch live= primary= pane pid restarted=0
    while read -r n role epoch; do
        live=${live:-$n}
        if [ "$role" = primary ]; then primary=$n; fi
    done < <(roles)
    local via=${primary:-$live}
    [ -n "$via" ] || die "no server answers: there is none to join; start one with -p in its pane (server 1: $S1)"
    for n in 1 2 3; do
        pane=$(pane_of "$n") || continue
        if pid=$(server_pid "$pane"); then continue; fi
        # --id and the data dir as before: the server keeps its id and files.
        run_in "$pane" "replibox-server -b ${SERVERS[via - 1]} $(server_args "$n") $BACKUP_OPTS"
        tmux select-pane -t "$pane" -T "server $n (-b) ${SERVERS[n - 1]}"
        say "restarted server $n in its pane as a backup joining through server $via (${SERVERS[via - 1]})"
        restarted=$((restarted + 1))
    done
    if [ "$restarted" -eq 0 ]; then
        say "every server pane runs its server; nothing to restart"
        return 0
    fi
    say "watch: each restarted pane logs 'joined primary id=... at ...', fetches only the files it lacks, then 'caught up'; in the status pane it becomes a backup of the current epoch at the primary's seq."
}

clean() {
    stop quiet
    rm -rf "$ROOT/cluster"
    say "stopped session $SESSION and removed ./cluster"
}

case "${1:-start}" in
start) start ;;
stop) stop ;;
clean) clean ;;
kill-primary) kill_primary ;;
kill-backup) kill_backup "${2:-}" ;;
restart-dead) restart_dead ;;
*) die "usage: $0 [start|stop|clean|kill-primary|kill-backup [N]|restart-dead]" ;;
esac
