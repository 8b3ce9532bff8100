#!/usr/bin/env bash
# The status pane of `make cluster`: `replibox-server --status` of every server,
# redrawn once a second. A watch(1) written in bash, so nothing beyond bash,
# coreutils and the replibox binaries is needed.
#
#   scripts/cluster-status.sh [--once] HOST:PORT...
#
# REPLIBOX_SERVER names the binary (default: replibox-server from PATH).
set -uo pipefail

server=${REPLIBOX_SERVER:-replibox-server}
once=0
if [ "${1:-}" = --once ]; then
    once=1
    shift
fi
if [ $# -eq 0 ]; then
    echo "usage: $0 [--once] HOST:PORT..." >&2
    exit 2
fi
command -v "$server" >/dev/null || {
    echo "cluster-status: $server is not on PATH (set REPLIBOX_SERVER)" >&2
    exit 2
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/replibox-status.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 0' INT TERM

while :; do
    # Ask every server at once: one that hangs (SIGSTOP) costs its timeout once per
    # round instead of once per server.
    i=0
    for addr in "$@"; do
        "$server" --status "$addr" >"$tmp/$i" 2>&1 &
        i=$((i + 1))
    done
    wait
    screen="replibox-server --status, every second ($(date +%H:%M:%S)); Ctrl-C stops"$'\n'
    i=0
    for addr in "$@"; do
        screen+=$'\n'"$addr"$'\n'"  $(<"$tmp/$i")"$'\n'
        i=$((i + 1))
    done
    if ((once)); then
        printf '%s' "$screen"
        break
    fi
    # Home the cursor, clear the screen, draw: what `clear` does, without ncurses.
    printf '\033[H\033[2J%s' "$screen"
    sleep 1
done
