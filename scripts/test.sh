#!/usr/bin/env bash
# Runs every test tier of ivcom: unit, API and multi-process tests (debug and release),
# the loom model of the wait/wake handshake, a short fuzz run when a nightly toolchain
# is available (the fuzz corpus is replayed by the normal tests in any case), and, as root,
# the VM harness (two QEMU guests; scripts/vm-test.sh, docs/vm-harness.md).
# First it installs what the tests need from Debian when missing (scripts/deps.sh; without root
# it names what is missing and stops). At its end it checks that no process it started is
# still running (it fails, listing them, and ends them, if so).
#
#   scripts/test.sh                  everything
#   FUZZ_SECONDS=0 scripts/test.sh   skip the live fuzz run
#   VM_TEST=0 scripts/test.sh        skip the VM harness
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

run_vm=0
if [ "${VM_TEST:-1}" != 0 ] && [ "$(id -u)" = 0 ]; then run_vm=1; fi
step "what the tests need from the system"
if [ "$run_vm" = 1 ]; then scripts/deps.sh tests vm; else scripts/deps.sh tests; fi

# Every process this run starts inherits IVCOM_TEST_RUN=<an id of this run only> (the tests
# that start programs with a cleared environment pass it on explicitly); at the end, a process
# whose environment holds it is one this run started and left behind. Installing packages
# (above) comes before it on purpose: a service a package started is not the tests' doing.
IVCOM_TEST_RUN="$(date +%s%N).$$.$RANDOM$RANDOM"
export IVCOM_TEST_RUN

# Lists (pid and command line) the processes still running whose environment holds this run's
# id, after a grace of 2 s for processes that were killed and are still exiting; ends them
# (SIGKILL, by pid) and makes the run fail.
check_leftovers() {
    local rc=$? id=$IVCOM_TEST_RUN
    # The check's own commands must not carry the id.
    export -n IVCOM_TEST_RUN
    unset IVCOM_TEST_RUN
    local left=() tries=0 d
    while :; do
        left=()
        for d in /proc/[0-9]*; do
            # The environment a process was started with (fixed at exec; a zombie has none).
            if grep -qzxF "IVCOM_TEST_RUN=$id" "$d/environ" 2>/dev/null; then
                left+=("${d#/proc/}")
            fi
        done
        [ ${#left[@]} -eq 0 ] && break
        tries=$((tries + 1))
        [ "$tries" -gt 10 ] && break
        sleep 0.2
    done
    if [ ${#left[@]} -gt 0 ]; then
        echo
        echo "error: ${#left[@]} process(es) started by the tests still running after they ended:"
        local p
        for p in "${left[@]}"; do
            printf '  pid %s: %s\n' "$p" "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)"
        done
        for p in "${left[@]}"; do
            kill -KILL "$p" 2>/dev/null || true
        done
        echo "(ended them; the run fails)"
        exit 1
    fi
    [ "$rc" = 0 ] && echo "no process the tests started is still running"
    exit "$rc"
}
trap check_leftovers EXIT

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
if [ "$run_vm" = 1 ]; then
    step "VM harness: two QEMU guests, ivcom channels beside TCP"
    scripts/vm-test.sh
elif [ "${VM_TEST:-1}" != 0 ]; then
    echo "note: the VM harness needs root (it installs QEMU and boots guests); skipped"
fi
echo; echo "all tests passed"
