#!/usr/bin/env bash
# make cluster: the reference set-up (three servers, two devices of one user) on one
# machine, in one tmux session named replibox: one pane per process, plus a pane
# that shows every server's --status once a second.
#
#   scripts/cluster.sh start   build release binaries and (re)start the session
#   scripts/cluster.sh stop    Ctrl-C every pane (clean shutdown), then end the session
#   scripts/cluster.sh clean   stop, then delete ./cluster (data dirs and sync dirs)
#
# Five loopback addresses stand for five machines (Linux routes all of 127.0.0.0/8
# to lo): servers on 127.0.0.1-3, port 4000 each; alice's laptop on .4 and her
# desktop on .5. Everything they write is under ./cluster: s1, s2, s3 (server data
# dirs), alice-laptop and alice-desktop (sync dirs).
#
# Each pane is an interactive bash whose PATH starts with the release binaries; the
# command is typed into it (send-keys), so after a Ctrl-C or a crash, Up and Enter
# start it again: that is how a server is stopped and restarted by hand.
set -euo pipefail

SESSION=replibox
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PRIMARY=127.0.0.1:4000
SERVERS=(127.0.0.1:4000 127.0.0.2:4000 127.0.0.3:4000)
S1="replibox-server -p --id 1 --bind 127.0.0.1 --port 4000 --data cluster/s1"
S2="replibox-server -b 127.0.0.1:4000 --id 2 --bind 127.0.0.2 --port 4000 --data cluster/s2"
S3="replibox-server -b 127.0.0.1:4000 --id 3 --bind 127.0.0.3 --port 4000 --data cluster/s3"
LAPTOP="replibox-client alice 127.0.0.1 4000 --bind 127.0.0.4 --sync-dir cluster/alice-laptop"
DESKTOP="replibox-client alice 127.0.0.1 4000 --bind 127.0.0.5 --sync-dir cluster/alice-desktop"
STATUS="scripts/cluster-status.sh ${SERVERS[*]}"

say() { echo "cluster: $*" >&2; }
die() {
    say "$*"
    exit 1
}

need_tmux() {
    command -v tmux >/dev/null && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "tmux is missing; installing it with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq tmux </dev/null >/dev/null
        command -v tmux >/dev/null || die "apt-get ran but tmux is still not on PATH"
    else
        die "make cluster needs tmux; install it with: sudo apt-get install tmux (Debian/Ubuntu), sudo dnf install tmux (Fedora) or brew install tmux (macOS)"
    fi
}

have_session() {
    command -v tmux >/dev/null && tmux has-session -t "=$SESSION" 2>/dev/null
}

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
    if ! busy=$(wait_closed 5); then
        say "warning: still listening after the session ended:$busy (another replibox outside tmux?)"
    fi
    [ "${1:-}" = quiet ] || say "stopped session $SESSION"
}

target_dir() {
    cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}

start() {
    need_tmux
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

    local shell=(env "PATH=$bin:$PATH")
    if [ -n "${RUST_LOG:-}" ]; then shell+=("RUST_LOG=$RUST_LOG"); fi
    shell+=(bash)

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
    tmux select-pane -t "$s1" -T "server 1 (-p) 127.0.0.1:4000"
    tmux select-pane -t "$s2" -T "server 2 (-b) 127.0.0.2:4000"
    tmux select-pane -t "$s3" -T "server 3 (-b) 127.0.0.3:4000"
    tmux select-pane -t "$laptop" -T "alice-laptop 127.0.0.4"
    tmux select-pane -t "$desktop" -T "alice-desktop 127.0.0.5"
    tmux select-pane -t "$status" -T "status, every second"
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

# Types a command into a pane's shell and presses Enter, once the shell has drawn
# its prompt (typed earlier, the line would be echoed twice).
run_in() {
    local deadline=$((SECONDS + 5))
    # Captured whole rather than piped into `grep -q`, which may exit before tmux has
    # written everything and so fail the pipeline (SIGPIPE under pipefail).
    until [[ $(tmux capture-pane -p -t "$1") =~ [^[:space:]] ]] || ((SECONDS >= deadline)); do
        sleep 0.05
    done
    tmux send-keys -t "$1" -l -- "$2"
    tmux send-keys -t "$1" Enter
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
*) die "usage: $0 [start|stop|clean]" ;;
esac
