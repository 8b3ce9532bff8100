#!/usr/bin/env bash
# scripts/bench.sh [OPTIONS]: builds the release binaries, then runs the benchmark
# harness (crates/bench, the replibox-bench binary) with OPTIONS. `make bench`,
# `make bench-quick` and `make bench-peers` call it; see docs/benchmarks.md.
#
#   scripts/bench.sh                 full run of cases 1-7 and 9 (~10-15 min); rewrites docs/benchmarks.md
#   scripts/bench.sh --quick         a short run (~3-5 min); prints the table, leaves the doc alone
#   scripts/bench.sh --peers         case 8: Syncthing side by side (cases 3-5 on both)
#   scripts/bench.sh --cases 3,4     some cases only (the doc is left alone unless --doc PATH)
#   scripts/bench.sh --help          every option
#
# BENCH_DIR (or --dir) says where the temporary directory goes; a full run needs
# about 11 GiB free there. Progress goes to stderr, the table to stdout. The
# harness talks only to 127.0.0.0/8 and, for host loss (root only), to network
# namespaces named rbbench-* that it creates and removes, Ctrl-C included.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CARGO=${CARGO:-cargo}
LOCKED=()
if [ "${CI:-}" = true ] || [ "${CI:-}" = 1 ]; then LOCKED=(--locked); fi

echo "bench: building release binaries" >&2
"$CARGO" build --release --workspace --bins "${LOCKED[@]}" >&2
target=$("$CARGO" metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
exec "$target/release/replibox-bench" "$@"
