# replibox: everyday commands. CI runs `make test` (through .ci/run).
#
#   make test          build both binaries, then run every test (unit, codec, process)
#   make cluster       three servers and two clients in a tmux session named replibox
#   make cluster-stop  stop that session (cluster-clean also removes ./cluster)
#   make bench         transfer timings with release binaries on 127.0.0.0/8
#   make build         release and debug builds of the whole workspace
#   make fmt | fmt-check | clippy | clean

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
# On CI the lock file is the truth: refuse to build if Cargo.toml and Cargo.lock
# disagree instead of quietly resolving new versions. Locally, cargo may update it.
LOCKED := $(if $(filter true 1,$(CI)),--locked,)

.PHONY: build release debug test cluster cluster-stop cluster-clean bench fmt fmt-check clippy clean tools help

help:
	@sed -n '3,8s/^# //p' Makefile

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
test: tools
	$(CARGO) build --workspace $(LOCKED)
	RUST_BACKTRACE=1 $(CARGO) test --workspace --no-fail-fast $(LOCKED)
	@echo "make test: every test passed"

cluster: tools
	scripts/cluster.sh start

cluster-stop:
	scripts/cluster.sh stop

cluster-clean:
	scripts/cluster.sh clean

bench: tools
	scripts/bench.sh

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
