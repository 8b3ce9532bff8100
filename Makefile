# replibox: everyday commands. CI runs `make test` (through .ci/run).
#
#   make test          build both binaries, then run every test (unit, codec, process)
#   make cluster       three servers and two clients in a tmux session named replibox
#   make cluster-stop  stop that session (cluster-clean also removes ./cluster)
#   make bench         benchmarks, full run (bench-quick: short; bench-peers: beside Syncthing)
#   make mutants       mutation testing of the pure modules with their unit tests (slow; not in test)
#   make chaos         the chaos suite for DURATION (10m); make fuzz: cargo-fuzz, FUZZ_TIME s a target
#   make build         release and debug builds of the whole workspace
#   make fmt | fmt-check | clippy | clean

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
# On CI the lock file is the truth: refuse to build if Cargo.toml and Cargo.lock
# disagree instead of quietly resolving new versions. Locally, cargo may update it.
LOCKED := $(if $(filter true 1,$(CI)),--locked,)

.PHONY: build release debug test mutants cluster cluster-stop cluster-clean bench bench-quick bench-peers bench-replication fmt fmt-check clippy clean tools test-tools help

help:
	@sed -n '3,10s/^# //p' Makefile

tools:
	@scripts/check-tools.sh

test-tools:
	@scripts/check-tools.sh tests

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
test: test-tools
	$(CARGO) build --workspace $(LOCKED)
	@mkdir -p target
	RUST_BACKTRACE=1 $(CARGO) test --workspace --no-fail-fast $(LOCKED) 2>&1 | tee target/test-output.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "total: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' target/test-output.log

# make chaos [DURATION=10m] [CHAOS_SEED=N]: the chaos suite (issue 11;
# crates/client/tests/process/chaos.rs) for longer than the 35 s that `make test`
# gives it: SIGKILLs of servers under a random workload, then the ledger checks.
# The seed is printed at the start and on failure; CHAOS_SEED replays a run's
# decisions. Results and counts: docs/reliability.md.
.PHONY: chaos
DURATION ?= 10m
chaos: tools
	$(CARGO) build --workspace $(LOCKED)
	CHAOS_DURATION=$(DURATION) $(if $(CHAOS_SEED),CHAOS_SEED=$(CHAOS_SEED)) RUST_BACKTRACE=1 \
		$(CARGO) test -p replibox-client --test process $(LOCKED) chaos -- --nocapture

# make fuzz [FUZZ_TIME=60]: the cargo-fuzz targets in fuzz/ (issue 11), FUZZ_TIME
# seconds each: frame (the frame decoder on arbitrary bytes, with a round trip of
# what it accepts) and node (the replication state machine, primary and backup,
# fed arbitrary frames). Needs a nightly toolchain (cargo-fuzz's sanitizer flags):
# installed with rustup when missing (without rustup, it says what to install);
# cargo-fuzz is installed from crates.io when missing; each says so. The seeds are
# one frame per protocol sample (crates/proto/tests/golden.rs). Findings go to
# fuzz/artifacts/TARGET/, the corpus grows in fuzz/corpus/TARGET/ (both ignored
# by git). `make test` never builds fuzz/ (a workspace of its own, on stable).
FUZZ_TIME ?= 60
.PHONY: fuzz
fuzz: tools
	@command -v rustup >/dev/null || { echo "make fuzz: cargo-fuzz needs a nightly Rust toolchain, and rustup to get one: install rustup (https://rustup.rs), then run make fuzz again"; exit 1; }
	@rustup toolchain list | grep -q '^nightly' || { echo "make fuzz: no nightly toolchain (cargo-fuzz needs one); installing it: rustup toolchain install nightly --profile minimal"; rustup toolchain install nightly --profile minimal; }
	@command -v cargo-fuzz >/dev/null || { echo "make fuzz: cargo-fuzz is not installed; installing it from crates.io"; $(CARGO) install cargo-fuzz --locked; }
	FUZZ_SEEDS=$(CURDIR)/target/fuzz-seeds $(CARGO) test -p replibox-proto --test golden $(LOCKED) -- --ignored write_fuzz_seeds
	cd fuzz && for t in $$(cargo +nightly fuzz list); do \
		mkdir -p corpus/$$t; \
		echo "make fuzz: $$t for $(FUZZ_TIME) s"; \
		cargo +nightly fuzz run $$t corpus/$$t $(CURDIR)/target/fuzz-seeds/$$t -- -max_total_time=$(FUZZ_TIME) -print_final_stats=1 || exit 1; \
	done

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

# --- Failure scenarios, the five-host lab, workstation binaries (issue 10) -------
#   make kill-primary      SIGKILL the server of `make cluster` that answers as primary
#   make kill-backup [N=2] SIGKILL a backup (server N if given)
#   make restart-dead      start the killed servers again in their panes, as backups
#   make lab               (root) five network namespaces s1 s2 s3 c1 c2 on a bridge,
#                          10.213.0.0/24, in a tmux session named replibox-lab
#   make lab-crash HOST    HOST's link goes down (no FIN); make lab-heal HOST undoes it
#   make lab-cut HOST PEER...  HOST and the PEERs stop hearing each other (a partition)
#   make lab-down          remove every namespace, process and session `make lab` made
#   make dist              static x86_64 musl binaries (else the default target) in dist/
# HOST may also be given as HOST=s1. See docs/operations.md.
.PHONY: kill-primary kill-backup restart-dead lab lab-crash lab-heal lab-cut lab-down dist

kill-primary:
	@scripts/cluster.sh kill-primary

kill-backup:
	@scripts/cluster.sh kill-backup $(N)

restart-dead:
	@scripts/cluster.sh restart-dead

lab: tools
	@scripts/lab.sh up

lab-down:
	@scripts/lab.sh down

# `make lab-crash s1`: the words after the target are its arguments, and each gets
# an empty rule so that make does not try to build it.
ifneq ($(filter lab-crash lab-heal lab-cut,$(firstword $(MAKECMDGOALS))),)
LAB_ARGS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
ifneq ($(LAB_ARGS),)
$(eval $(LAB_ARGS):;@:)
endif
endif

lab-crash lab-heal lab-cut:
	@scripts/lab.sh $(patsubst lab-%,%,$@) $(HOST) $(LAB_ARGS)

dist: tools
	@scripts/dist.sh

# Benchmarks (crates/bench, docs/benchmarks.md): release builds, 127.0.0.0/8 and, as
# root, network namespaces rbbench-* of their own. Not tests: `make test` only
# compiles the harness. BENCH_ARGS passes more options (e.g. BENCH_ARGS="--cases 3,4";
# scripts/bench.sh --help lists them).
#   bench              cases 1-7 and 9 in full (~10-15 min); rewrites docs/benchmarks.md
#   bench-quick        a short run of the same; prints the table, leaves the doc alone
#   bench-peers        case 8: Syncthing side by side (apt-get installs it as root)
#   bench-replication  examples/bench_replication.rs: one upload to a lone server vs a
#                      primary with two backups (BENCH_MIB, BENCH_ROUNDS)
BENCH_ARGS ?=
BENCH_MIB ?= 256
BENCH_ROUNDS ?= 5

bench: tools
	scripts/bench.sh $(BENCH_ARGS)

bench-quick: tools
	scripts/bench.sh --quick $(BENCH_ARGS)

bench-peers: tools
	scripts/bench.sh --peers $(BENCH_ARGS)

# It needs the release replibox-server beside it, hence --bins --examples; it is run
# from the target dir, because `cargo run -p` of one package would rebuild it with
# other features.
bench-replication: tools
	$(CARGO) build --release --workspace --bins --examples $(LOCKED)
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
