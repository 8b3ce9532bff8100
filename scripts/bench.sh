#!/usr/bin/env bash
# make bench: how long a file dropped into one device's sync dir takes to appear,
# byte for byte, in the user's other device's sync dir.
#
# Release binaries; one server on 127.0.0.1 and two headless clients of one user on
# 127.0.0.4 and 127.0.0.5, all on this machine and on loopback only. Cases:
#   - 50 files of 1 KiB, moved in as one folder;
#   - one file of 64 MiB, moved in;
#   - one file of 256 MiB, moved in;
#   - one file of 1 KiB, saved: written in place in device 1's sync dir (open,
#     write, close, as an editor saves a small file).
# Each run stages fresh random content on the same file system and waits a second.
# A moved-in case is then timed from the rename into device 1's sync dir (its
# content is a second old by then, so the client's settle delay for a file still
# being written does not count). The saved case is timed from the start of the
# write, so the client's debounce and settle delay count: the latency a user sees.
# Either way the clock stops when device 2 holds every file at its full size. The
# copies are then compared with cmp: a mismatch fails the bench. Before the next
# case the files are deleted on device 1 and the bench waits for the delete to
# reach device 2. It prints every run, then the median of each case (and, for the
# moved-in cases, the throughput).
#
# Settings (environment):
#   RUNS            runs per case (default 3)
#   BENCH_PORT      server port on 127.0.0.1 (default 4400)
#   BENCH_DIR       where the temporary directory goes (default $TMPDIR or /tmp;
#                   needs about 1.5 GiB free)
#   BENCH_DEADLINE  seconds one transfer may take before the bench gives up (300)
#
# Everything it starts is stopped, and its temporary directory removed, on any exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-3}
PORT=${BENCH_PORT:-4400}
DEADLINE=${BENCH_DEADLINE:-300}
SERVER_IP=127.0.0.1
DEV1_IP=127.0.0.4
DEV2_IP=127.0.0.5
BENCH_USER=bench

say() { echo "bench: $*" >&2; }
die() {
    say "$*"
    exit 1
}

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, not '$RUNS'"
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then die "BENCH_PORT must be a port number, not '$PORT'"; fi
[[ $DEADLINE =~ ^[1-9][0-9]*$ ]] || die "BENCH_DEADLINE must be a positive integer, not '$DEADLINE'"
((BASH_VERSINFO[0] >= 5)) || die "needs bash 5 or later (for EPOCHREALTIME); this is $BASH_VERSION"

# Microseconds since the epoch, without forking: EPOCHREALTIME always has six
# decimals, so dropping its separator (a dot or a comma, by locale) gives µs.
now() { NOW=${EPOCHREALTIME//[!0-9]/}; }

WORK=
PIDS=()
cleanup() {
    local rc=$? pid deadline
    trap - EXIT INT TERM HUP
    # Clients first (they log out on SIGTERM), then the server.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[$i]}
        kill -TERM "$pid" 2>/dev/null || continue
        deadline=$((SECONDS + 5))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if ((rc != 0 && rc < 128)) && [ -n "$WORK" ]; then  # not after a signal
        for log in server.log dev1.err dev2.err; do
            [ -s "$WORK/$log" ] || continue
            say "last lines of $log:"
            tail -n 15 "$WORK/$log" | sed 's/^/    /' >&2
        done
    fi
    if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND every 50 ms until it succeeds.
wait_for() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        ((SECONDS < deadline)) || die "gave up after ${limit} s waiting for $what"
        sleep 0.05
    done
}

alive() { kill -0 "$1" 2>/dev/null; }

# ---- set-up ------------------------------------------------------------------

if listening "$SERVER_IP" "$PORT"; then
    die "something already listens on $SERVER_IP:$PORT; set BENCH_PORT to a free port"
fi

say "building release binaries"
cargo build --workspace --release >&2
BIN="$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release"
if [ ! -x "$BIN/replibox-server" ] || [ ! -x "$BIN/replibox-client" ]; then die "no binaries in $BIN after the build"; fi

parent=${BENCH_DIR:-${TMPDIR:-/tmp}}
WORK=$(mktemp -d "$parent/replibox-bench.XXXXXX")
free_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
((free_kib > 1536 * 1024)) || die "only $((free_kib / 1024)) MiB free in $parent; the bench needs about 1.5 GiB (set BENCH_DIR)"
mkdir -p "$WORK/stage"

# Job control puts each process started below in its own process group, so that a
# Ctrl-C on the terminal reaches only this script, whose cleanup then stops the
# clients before the server (a client whose server vanished first keeps waiting
# for it to come back).
set -m
(cd "$WORK" && exec "$BIN/replibox-server" -p --bind "$SERVER_IP" --port "$PORT" --data server) \
    >"$WORK/server.log" 2>&1 </dev/null &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
server_up() {
    alive "$SERVER_PID" || die "the server exited at start-up: $(tail -n 3 "$WORK/server.log")"
    "$BIN/replibox-server" --status "$SERVER_IP:$PORT" >/dev/null 2>&1
}
wait_for "the server at $SERVER_IP:$PORT" 20 server_up

start_client() { # NAME IP
    (cd "$WORK" && exec "$BIN/replibox-client" "$BENCH_USER" "$SERVER_IP" "$PORT" \
        --bind "$2" --sync-dir "$1" --headless) >"$WORK/$1.out" 2>"$WORK/$1.err" </dev/null &
    PIDS+=("$!")
}
# A client prints the outcome of its login-time get_sync_dir on stdout once it has
# reconciled: from then on it is syncing.
client_up() { # NAME PID
    alive "$2" || die "client $1 exited at start-up: $(tail -n 3 "$WORK/$1.err")"
    grep -q "in sync with the server" "$WORK/$1.out"
}
start_client dev1 "$DEV1_IP"
DEV1_PID=$!
start_client dev2 "$DEV2_IP"
DEV2_PID=$!
set +m
wait_for "device 1 to log in" 30 client_up dev1 "$DEV1_PID"
wait_for "device 2 to log in" 30 client_up dev2 "$DEV2_PID"

# ---- measuring ---------------------------------------------------------------

# transfer NAME [write]: moves stage/NAME (a file, or a folder of files) into device
# 1's sync dir and sets ELAPSED_US to the time until device 2 has every file at its
# full size. Device 2's client places each received file with a rename, so full size
# means complete; cmp then checks the bytes. With `write`, a writer instead creates
# the file in device 1's sync dir (open, write, close: what an editor saving a small
# file does), so the client's settle delay counts: the latency a user sees.
transfer() {
    local name=$1 how=${2:-move} f i pause=0.01
    # Finer polling for the latency case (one file, so cheap).
    [ "$how" = write ] && pause=0.002
    local files=() sizes=()
    if [ -d "$WORK/stage/$name" ]; then
        for f in "$WORK/stage/$name"/*; do files+=("$name/${f##*/}"); done
    else
        files=("$name")
    fi
    for f in "${files[@]}"; do sizes+=("$(stat -c %s "$WORK/stage/$f")"); done
    local pending=("${!files[@]}") still deadline=$((SECONDS + DEADLINE)) t0
    now
    t0=$NOW
    if [ "$how" = write ]; then
        cat "$WORK/stage/$name" >"$WORK/dev1/$name"
    else
        mv "$WORK/stage/$name" "$WORK/dev1/$name"
    fi
    while :; do
        still=()
        for i in "${pending[@]}"; do
            f="$WORK/dev2/${files[$i]}"
            if [ -f "$f" ] && [ "$(stat -c %s "$f")" = "${sizes[$i]}" ]; then continue; fi
            still+=("$i")
        done
        if ((${#still[@]} == 0)); then break; fi
        pending=("${still[@]}")
        alive "$DEV1_PID" || die "device 1's client exited"
        alive "$DEV2_PID" || die "device 2's client exited"
        ((SECONDS < deadline)) || die "$name: ${#pending[@]} of ${#files[@]} files not on device 2 after $DEADLINE s"
        sleep "$pause"
    done
    now
    ELAPSED_US=$((NOW - t0))
    rm -rf "${WORK:?}/stage/$name"
    for f in "${files[@]}"; do
        cmp -s "$WORK/dev1/$f" "$WORK/dev2/$f" || die "$f arrived on device 2 with different content"
    done
}

# remove NAME: deletes it on device 1 and waits until device 2 no longer has it.
remove() {
    rm -rf "${WORK:?}/dev1/$1"
    gone() { [ ! -e "$WORK/dev2/$1" ]; }
    wait_for "the delete of $1 to reach device 2" "$DEADLINE" gone "$1"
}

stage_small() { # NAME: a folder of 50 files of 1 KiB
    mkdir "$WORK/stage/$1"
    for i in $(seq -w 1 50); do head -c 1024 /dev/urandom >"$WORK/stage/$1/f$i"; done
}
stage_big() { # NAME MIB
    head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$WORK/stage/$1"
}

CASES=("50 x 1 KiB" "64 MiB" "256 MiB" "1 KiB saved")
BYTES=($((50 * 1024)) $((64 * 1024 * 1024)) $((256 * 1024 * 1024)) 1024)
declare -A TIMES=()

for ((run = 1; run <= RUNS; run++)); do
    for c in 0 1 2 3; do
        name="r$run-c$c"
        case $c in
        0) stage_small "$name" ;;
        1) stage_big "$name" 64 ;;
        2) stage_big "$name" 256 ;;
        3) head -c 1024 /dev/urandom >"$WORK/stage/$name" ;;
        esac
        sleep 1
        if ((c == 3)); then transfer "$name" write; else transfer "$name"; fi
        ms=$(((ELAPSED_US + 500) / 1000))
        TIMES[$c]+="$ms "
        say "$(printf '%-12s run %d/%d: %6d ms' "${CASES[$c]}" "$run" "$RUNS" "$ms")"
        remove "$name"
    done
done

# ---- report ------------------------------------------------------------------

median() { # values...: the middle one (the mean of the two middle ones for an even count)
    local sorted
    mapfile -t sorted < <(printf '%s\n' "$@" | sort -n)
    local n=${#sorted[@]}
    if ((n % 2)); then
        echo "${sorted[n / 2]}"
    else
        echo $(((sorted[n / 2 - 1] + sorted[n / 2]) / 2))
    fi
}

rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
# sed stops by itself after the first match (q); a `| head -n 1` could kill it with
# SIGPIPE, which pipefail turns into a failed script.
cpu=$(sed -n '/^model name[[:space:]]*: /{s///p;q}' /proc/cpuinfo 2>/dev/null || true)
echo "replibox bench: device 1 -> device 2 through one server ($RUNS runs per case)"
echo "  commit $rev, release build; $(nproc) cores${cpu:+ ($cpu)}; $(uname -sr)"
echo "  server $SERVER_IP:$PORT, clients $DEV1_IP and $DEV2_IP; files on $(stat -f -c %T "$WORK")"
echo
printf '  %-12s  %-26s  %10s  %12s\n' "case" "runs (ms)" "median" "throughput"
for c in 0 1 2 3; do
    read -r -a values <<<"${TIMES[$c]}"
    m=$(median "${values[@]}")
    # Files per second for the small files, MiB/s for the big ones; one decimal,
    # in integer arithmetic.
    if ((m == 0)); then
        rate="-"
    elif ((c == 3)); then
        rate="(latency)"
    elif ((c == 0)); then
        tenths=$((50 * 10000 / m))
        rate="$((tenths / 10)).$((tenths % 10)) files/s"
    else
        tenths=$((BYTES[c] * 10000 / (m * 1048576)))
        rate="$((tenths / 10)).$((tenths % 10)) MiB/s"
    fi
    printf '  %-12s  %-26s  %7d ms  %12s\n' "${CASES[$c]}" "${values[*]}" "$m" "$rate"
done
