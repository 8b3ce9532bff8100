#!/usr/bin/env bash
# make dist: the two binaries for the lab workstations, in dist/ beside dist/README
# (which says what to run where).
#
# Statically linked x86_64 musl binaries run on any x86_64 Linux, whatever its C
# library: the target is added with `rustup target add` when it is missing. When
# it cannot be had (no rustup, no network, another architecture), this says so and
# builds for the default target instead: those binaries need a glibc at least as
# new as this machine's on every workstation.
#
# The build goes to target/TRIPLE/release (an explicit --target keeps it apart from
# the target/release that make cluster uses), without debug info and stripped.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MUSL=x86_64-unknown-linux-musl
LOCKED=$([ "${CI:-}" = true ] || [ "${CI:-}" = 1 ] && echo --locked || true)

say() { echo "dist: $*" >&2; }

host=$(rustc -vV | sed -n 's/^host: //p')
target=$host
static=no
if [ "$(uname -m)" != x86_64 ]; then
    say "this machine is $(uname -m), not x86_64: building for the default target $host (not the lab's x86_64 musl)"
elif ! command -v rustup >/dev/null; then
    say "no rustup, so the $MUSL target cannot be added: building for the default target $host, linked against this machine's glibc"
elif rustup target list --installed | grep -qx "$MUSL"; then
    target=$MUSL
    static=yes
else
    say "adding the $MUSL target: rustup target add $MUSL"
    if rustup target add "$MUSL"; then
        target=$MUSL
        static=yes
    else
        say "rustup could not add $MUSL (see above): building for the default target $host, linked against this machine's glibc"
    fi
fi

say "building replibox-server and replibox-client for $target"
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
    cargo build --release --workspace --bins --target "$target" $LOCKED

out=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/$target/release
mkdir -p dist
for b in replibox-server replibox-client; do
    install -m 0755 "$out/$b" "dist/$b"
done
(cd dist && sha256sum replibox-server replibox-client >SHA256SUMS)

# ldd says "statically linked" (static-pie) or "not a dynamic executable" (static),
# else lists the libraries the binary needs.
linkage() {
    local out
    out=$(ldd "$1" 2>&1 || true)
    case $out in
    *"statically linked"* | *"not a dynamic executable"*) echo "statically linked" ;;
    *) echo "dynamically linked" ;;
    esac
}
for b in replibox-server replibox-client; do
    say "dist/$b: $(du -h "dist/$b" | cut -f1), $(linkage "dist/$b"), $target"
done
if [ "$static" = no ]; then
    say "note: these binaries are NOT static; every workstation needs glibc $(ldd --version 2>&1 | sed -n '1s/.* //p') or newer"
fi
say "copy dist/ to each workstation; dist/README says which command to run on which machine"
