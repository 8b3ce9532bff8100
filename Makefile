# replibox: everyday commands. CI runs `make test` (through .ci/run).
#
#   make test          build both binaries, then run every test (unit, codec, process)
#   make cluster       three servers and two clients in a tmux session named replibox
#   make cluster-stop  stop that session (cluster-clean also removes ./cluster)
#   make bench         device-to-device timings, then replicated vs lone upload (127.0.0.0/8)
#   make mutants       mutation testing of the pure modules with their unit tests (slow; not in test)
#   make build         release and debug builds of the whole workspace
#   make fmt | fmt-check | clippy | clean

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
# On CI the lock file is the truth: refuse to build if Cargo.toml and Cargo.lock
# disagree instead of quietly resolving new versions. Locally, cargo may update it.
LOCKED := $(if $(filter true 1,$(CI)),--locked,)

.PHONY: build release debug test mutants cluster cluster-stop cluster-clean bench fmt fmt-check clippy clean tools help

help:
	@sed -n '3,9s/^# //p' Makefile

tools:
	@scripts/check-tools.sh

build: release debug

release: tools
	$(CARGO) build --workspace --release $(LOCKED)

debug: tools
	$(CARGO) build --workspace $(LOCKED)

# The process tests in crates/client/tests start replibox-server too, which Cargo
# builds only for the tests of its own package: build every binary first so both
# are in target/debug whichever test binary runs first. --no-fail-fast reports
# every failing test binary in one run; make still exits non-zero.
# cargo's last summary line is often a doc-test binary with nothing in it; the
# closing line here adds up every binary's counts, so a reader of the log (or CI)
# sees at the end how many tests ran.
test: tools
	$(CARGO) build --workspace $(LOCKED)
	@mkdir -p target
	RUST_BACKTRACE=1 $(CARGO) test --workspace --no-fail-fast $(LOCKED) 2>&1 | tee target/test-output.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "total: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' target/test-output.log

# Mutation testing (cargo-mutants, installed from crates.io when missing) of the
# pure modules, each against its own unit tests; see docs/testing.md. It takes
# minutes, so `make test` does not run it. Results: target/mutants/NAME/mutants.out.
mutants: tools
	@command -v cargo-mutants >/dev/null || $(CARGO) install cargo-mutants --locked
	scripts/mutants.sh

cluster: tools
	scripts/cluster.sh start

cluster-stop:
	scripts/cluster.sh stop

cluster-clean:
	scripts/cluster.sh clean

# Two benchmarks, both on release builds and 127.0.0.0/8 only: scripts/bench.sh
# (device to device through one server), then examples/bench_replication.rs (one
# upload to a lone server vs. a primary with two backups; it needs the release
# replibox-server beside it, hence --bins --examples; it is run from the target dir,
# because `cargo run -p` of one package would rebuild it with other features).
# BENCH_MIB and BENCH_ROUNDS are the upload's size and the number of rounds.
BENCH_MIB ?= 256
BENCH_ROUNDS ?= 5

bench: tools
	$(CARGO) build --release --workspace --bins --examples $(LOCKED)
	scripts/bench.sh
	target=$$($(CARGO) metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'); \
	"$$target/release/examples/bench_replication" $(BENCH_MIB) $(BENCH_ROUNDS)

fmt:
	@scripts/check-tools.sh rustfmt
	$(CARGO) fmt --all

fmt-check:
	@scripts/check-tools.sh rustfmt
	$(CARGO) fmt --all -- --check

clippy:
	@scripts/check-tools.sh clippy
	$(CARGO) clippy --workspace --all-targets $(LOCKED) -- -D warnings

clean:
	$(CARGO) clean
