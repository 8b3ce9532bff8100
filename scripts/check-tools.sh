#!/usr/bin/env bash
# Checks that this machine can build and test replibox, and says exactly what to
# install when it cannot.
#
#   scripts/check-tools.sh            cargo, rustc and a C linker (what building needs)
#   scripts/check-tools.sh tests      ... and fincore, which a process test runs (make test)
#   scripts/check-tools.sh rustfmt    ... and the rustfmt component (make fmt)
#   scripts/check-tools.sh clippy     ... and the clippy component (make clippy)
#
# The only things it installs by itself are the C linker and fincore, and only as root on a
# Debian-like system (apt-get): that is the CI case, a fresh container with the Rust
# toolchain and nothing else. Anywhere else it prints the command to run.
set -euo pipefail

die() {
    echo "check-tools: $*" >&2
    exit 1
}

command -v cargo >/dev/null || die "cargo is not on PATH; install Rust from https://rustup.rs (then open a new shell or run: . \"\$HOME/.cargo/env\")"
command -v rustc >/dev/null || die "rustc is not on PATH; install Rust from https://rustup.rs"

# rustc links through the system C compiler driver (cc) on Linux; without it every
# build ends in "linker \`cc\` not found".
if ! command -v cc >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "check-tools: no C linker (cc); installing gcc and libc6-dev with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq --no-install-recommends gcc libc6-dev </dev/null >/dev/null
        command -v cc >/dev/null || die "apt-get ran but there is still no cc on PATH"
    else
        die "Rust needs a C linker (cc) to link the binaries; install one with: sudo apt-get install gcc libc6-dev (Debian/Ubuntu) or sudo dnf install gcc (Fedora)"
    fi
fi

case "${1:-}" in
"") ;;
tests)
    # One process test counts a file's pages in the page cache with util-linux's
    # fincore, which Debian ships apart from util-linux (util-linux-extra).
    if ! command -v fincore >/dev/null; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            echo "check-tools: no fincore; installing util-linux-extra with apt-get" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq </dev/null
            apt-get install -y -qq --no-install-recommends util-linux-extra </dev/null >/dev/null ||
                apt-get install -y -qq --no-install-recommends util-linux </dev/null >/dev/null
            command -v fincore >/dev/null || die "apt-get ran but there is still no fincore on PATH"
        else
            die "the tests need fincore (util-linux); install it with: sudo apt-get install util-linux-extra (Debian/Ubuntu; util-linux on older ones) or sudo dnf install util-linux (Fedora)"
        fi
    fi
    ;;
rustfmt)
    cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing; install it with: rustup component add rustfmt"
    ;;
clippy)
    cargo clippy --version >/dev/null 2>&1 || die "clippy is missing; install it with: rustup component add clippy"
    ;;
*) die "unknown check: $1 (want tests, rustfmt or clippy)" ;;
esac
