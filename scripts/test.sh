#!/usr/bin/env bash
# Runs every test tier of ivcom: unit, API and multi-process tests (debug and release),
# the loom model of the wait/wake handshake, and a short fuzz run when a nightly toolchain
# is available (the fuzz corpus is replayed by the normal tests in any case).
#
#   scripts/test.sh            everything
#   FUZZ_SECONDS=0 scripts/test.sh   skip the live fuzz run
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "unit, API and multi-process tests (debug)"
cargo test --workspace

step "the same in release"
cargo test --workspace --release

step "loom model of the wait/wake handshake"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p ivcom-ring --test loom --release

FUZZ_SECONDS=${FUZZ_SECONDS:-30}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    if cargo +nightly --version >/dev/null 2>&1; then
        step "fuzzing each target for ${FUZZ_SECONDS}s"
        scripts/fuzz-smoke.sh "$FUZZ_SECONDS"
    else
        echo "note: no nightly toolchain, live fuzzing skipped (the corpus replay test ran above)"
    fi
fi
echo; echo "all tests passed"
