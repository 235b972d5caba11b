#!/usr/bin/env bash
# Runs every test tier of ivcom: unit, API and multi-process tests (debug and release),
# the loom model of the wait/wake handshake, a short fuzz run when a nightly toolchain
# is available (the fuzz corpus is replayed by the normal tests in any case), and, as root,
# the VM harness (two QEMU guests; scripts/vm-test.sh, docs/vm-harness.md).
#
#   scripts/test.sh                  everything
#   FUZZ_SECONDS=0 scripts/test.sh   skip the live fuzz run
#   VM_TEST=0 scripts/test.sh        skip the VM harness
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
if [ "${VM_TEST:-1}" != 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        step "VM harness: two QEMU guests, ivcom channels beside TCP"
        scripts/vm-test.sh
    else
        echo "note: the VM harness needs root (it installs QEMU and boots guests); skipped"
    fi
fi
echo; echo "all tests passed"
