# Shared by scripts/cluster.sh and scripts/lab.sh (sourced, not run): the tmux
# session both lay out, and the build's target dir. Expects ROOT, SESSION, say
# and die from the script that sources it.

# Where cargo puts the binaries (CARGO_TARGET_DIR and config included).
target_dir() {
    (cd "$ROOT" && cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
}

# Installs tmux with apt-get when it is missing and this is root; otherwise says
# how to install it. $1 names the command that needs it ("make cluster").
need_tmux() {
    command -v tmux >/dev/null && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "tmux is missing; installing it with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq tmux </dev/null >/dev/null
        command -v tmux >/dev/null || die "apt-get ran but tmux is still not on PATH"
    else
        die "$1 needs tmux; install it with: sudo apt-get install tmux (Debian/Ubuntu), sudo dnf install tmux (Fedora) or brew install tmux (macOS)"
    fi
}

have_session() {
    command -v tmux >/dev/null && tmux has-session -t "=$SESSION" 2>/dev/null
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
