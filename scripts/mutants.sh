#!/usr/bin/env bash
# Mutation testing of the pure modules (make mutants): cargo-mutants changes the
# code one small way at a time (a condition flipped, a function body replaced by
# a default value, an operator swapped) and runs the module's own unit tests
# against each change. A mutant the tests do not notice ("missed") is code whose
# behaviour no test pins. docs/testing.md reports the figures.
#
#   scripts/mutants.sh                 every module below
#   scripts/mutants.sh state frame     only those modules (by the names below)
#
# Each module's mutants run only that module's unit tests (cargo test --lib with a
# name filter): a process test per mutant would take hours on two cores. Results go
# to target/mutants/NAME/mutants.out (outcomes.json, caught.txt, missed.txt, ...).
# cargo-mutants works on a copy of the tree, so the working tree is never changed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# name | file | package | unit-test filter
MODULES="
state|crates/replica/src/state.rs|replibox-replica|state::
frame|crates/proto/src/frame.rs|replibox-proto|frame::
receipt|crates/proto/src/receipt.rs|replibox-proto|receipt::
names|crates/proto/src/names.rs|replibox-proto|names::
reconcile|crates/client/src/reconcile.rs|replibox-client|reconcile::
detector|crates/election/src/detector.rs|replibox-election|detector::
bully|crates/election/src/bully.rs|replibox-election|bully::
"

command -v cargo-mutants >/dev/null || {
    echo "mutants: cargo-mutants is not installed; installing it from crates.io" >&2
    cargo install cargo-mutants --locked
}

out=target/mutants
mkdir -p "$out"
wanted=("$@")
status=0
summary=""
while IFS='|' read -r name file package filter; do
    [ -n "$name" ] || continue
    if [ ${#wanted[@]} -gt 0 ] && [[ " ${wanted[*]} " != *" $name "* ]]; then
        continue
    fi
    echo "== mutants: $name ($file, tests: $package --lib $filter)"
    # cargo-mutants exits 2 when mutants were missed and 3 when some timed out:
    # both are results to read, not failures of the run; go on to the next module.
    rc=0
    cargo mutants --no-shuffle --profile mutants --jobs 1 \
        --package "$package" --file "$file" --output "$out/$name" \
        -- --lib -- "$filter" || rc=$?
    case "$rc" in
    0 | 2 | 3) ;;
    *) status=$rc ;;
    esac
    m="$out/$name/mutants.out"
    count() { if [ -f "$m/$1.txt" ]; then grep -c . "$m/$1.txt" || true; else echo 0; fi; }
    summary+="$(printf '%-10s caught %3s  missed %3s  timeout %3s  unviable %3s' \
        "$name" "$(count caught)" "$(count missed)" "$(count timeout)" "$(count unviable)")"$'\n'
done <<<"$MODULES"

echo "== mutants: summary (details in $out/NAME/mutants.out/)"
printf '%s' "$summary"
exit "$status"
