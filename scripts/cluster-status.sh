#!/usr/bin/env bash
# The status pane of `make cluster`: one table row per server, from
# `replibox-server --status`, redrawn once a second. A watch(1) written in bash,
# so nothing beyond bash, coreutils and the replibox binaries is needed (no jq:
# the status line's fields are plain numbers and strings, read with bash's own
# regular expressions).
#
#   scripts/cluster-status.sh [--once] HOST:PORT...
#
# Columns: ID, ADDRESS, ROLE, EPOCH, SEQ, SESSIONS, ANSWERS. A server that does
# not answer keeps its row (its id from another server's membership, or from an
# earlier answer) with "no" and the reason. A backup whose primary is one of the
# listed servers and does not answer shows "backup (primary down)"; one that
# knows no primary shows "backup (no primary)".
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

# One number or string field of a status line, with the members list cut out
# first (its entries have an id, an addr and a role of their own).
field() { # json name
    local top=${1/\"members\":\[*\],/} re_num="\"$2\":([0-9]+)" re_str="\"$2\":\"([^\"]*)\""
    if [[ $top =~ $re_num ]] || [[ $top =~ $re_str ]]; then
        printf '%s' "${BASH_REMATCH[1]}"
    elif [[ $top =~ \"$2\":null ]]; then
        printf 'null'
    fi
}

declare -A known_id # address -> id, from any answer seen so far

# Records every member's id by address, from one status line's members list.
learn_ids() { # json
    local rest=$1 re='\{"addr":"([^"]*)","id":([0-9]+),'
    while [[ $rest =~ $re ]]; do
        known_id[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
        rest=${rest#*"${BASH_REMATCH[0]}"}
    done
}

while :; do
    # Ask every server at once: one that hangs (SIGSTOP) costs its timeout once per
    # round instead of once per server.
    i=0
    for addr in "$@"; do
        "$server" --status "$addr" >"$tmp/$i.out" 2>"$tmp/$i.err" &
        i=$((i + 1))
    done
    wait
    declare -A answers=()
    i=0
    for addr in "$@"; do
        if [[ $(<"$tmp/$i.out") == \{* ]]; then
            answers[$addr]=$(<"$tmp/$i.out")
            learn_ids "${answers[$addr]}"
        fi
        i=$((i + 1))
    done
    # The table: cells in one flat array, COLS per row, padded to the widest cell
    # of each column (column(1) is not in coreutils).
    cells=(ID ADDRESS ROLE EPOCH SEQ SESSIONS ANSWERS)
    COLS=7
    i=0
    for addr in "$@"; do
        if [ -n "${answers[$addr]:-}" ]; then
            json=${answers[$addr]}
            id=$(field "$json" id)
            known_id[$addr]=$id
            role=$(field "$json" role)
            primary=$(field "$json" primary)
            if [ "$role" = backup ]; then
                if [ "$primary" = null ] || [ -z "$primary" ]; then
                    role="backup (no primary)"
                elif [[ " $* " == *" $primary "* ]] && [ -z "${answers[$primary]:-}" ]; then
                    role="backup (primary down)"
                fi
            fi
            cells+=("$id" "$addr" "$role" "$(field "$json" epoch)" "$(field "$json" seq)" "$(field "$json" sessions)" yes)
        else
            why=$(head -n 1 "$tmp/$i.err")
            why=${why#*"$addr: "}
            why=${why% (os error *)}
            cells+=("${known_id[$addr]:-?}" "$addr" - - - - "no${why:+ ($why)}")
        fi
        i=$((i + 1))
    done
    widths=()
    for ((c = 0; c < ${#cells[@]}; c++)); do
        w=${#cells[c]}
        ((w > ${widths[c % COLS]:-0})) && widths[c % COLS]=$w
    done
    table=
    for ((c = 0; c < ${#cells[@]}; c++)); do
        if ((c % COLS == COLS - 1)); then
            table+="${cells[c]}"$'\n'
        else
            printf -v pad '%-*s  ' "${widths[c % COLS]}" "${cells[c]}"
            table+=$pad
        fi
    done
    unset answers
    screen="replibox-server --status, every second ($(date +%H:%M:%S)); Ctrl-C stops"$'\n\n'
    screen+=$table
    if ((once)); then
        printf '%s' "$screen"
        break
    fi
    # Home the cursor, clear the screen, draw: what `clear` does, without ncurses.
    printf '\033[H\033[2J%s' "$screen"
    sleep 1
done
