#!/usr/bin/env bash
# Runs every test tier of ivcom: unit, API and multi-process tests (debug and release),
# the loom model of the wait/wake handshake, a short fuzz run when a nightly toolchain
# is available (the fuzz corpus is replayed by the normal tests in any case), and, as root,
# the VM harness (two QEMU guests; scripts/vm-test.sh, docs/vm-harness.md).
# First it installs what the tests need from Debian when missing (scripts/deps.sh; without root
# it names what is missing and stops). At its end it checks that no process it started is
# still running (it fails, listing them, and ends them, if so). Needs python3 (for prctl).
#
#   scripts/test.sh                  everything
#   FUZZ_SECONDS=0 scripts/test.sh   skip the live fuzz run
#   VM_TEST=0 scripts/test.sh        skip the VM harness
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

run_vm=0
if [ "${VM_TEST:-1}" != 0 ] && [ "$(id -u)" = 0 ]; then run_vm=1; fi

# The leftover check at the end: this shell becomes a child subreaper (prctl
# PR_SET_CHILD_SUBREAPER, kept across exec), so that every process the tests start stays its
# descendant — a daemon that forks and lets its parent exit is re-parented to this shell, not
# to init — and what is still running below it at the end is what the tests left behind.
# Nothing else can be below it. Installing packages comes first: a service a package's
# scripts start is not the tests' doing (and deps.sh stops packages from starting any).
if [ "${IVCOM_TEST_SUBREAPER:-}" != "$$" ]; then
    step "what the tests need from the system"
    if [ "$run_vm" = 1 ]; then scripts/deps.sh tests vm; else scripts/deps.sh tests; fi
    export IVCOM_TEST_SUBREAPER=$$
    exec python3 -c '
import ctypes, os, sys
PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit("test.sh: prctl(PR_SET_CHILD_SUBREAPER): " + os.strerror(ctypes.get_errno()))
os.execv("/bin/bash", ["bash"] + sys.argv[1:])
' "$root/scripts/test.sh" "$@"
fi

# Sets `left` to the processes (not zombies) below this shell. Only shell builtins run here:
# a command it started would be below the shell too.
find_leftovers() {
    local -A parent=()
    local d pid stat rest state p
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        { read -r stat <"$d/stat"; } 2>/dev/null || continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses.
        rest=${stat##*) }
        state=${rest%% *}
        rest=${rest#* }
        [ "$state" = Z ] && continue
        parent[$pid]=${rest%% *}
    done
    left=()
    for pid in "${!parent[@]}"; do
        p=$pid
        while [ -n "${parent[$p]:-}" ]; do
            p=${parent[$p]}
            if [ "$p" = "$$" ]; then
                left+=("$pid")
                break
            fi
        done
    done
}

# Lists (pid and command line) the processes still running below this shell, after a grace of
# 2 s for processes that were killed and are still exiting; ends them (SIGKILL, by pid) and
# makes the run fail.
check_leftovers() {
    local rc=$? tries=0 p
    local -a left=()
    while :; do
        find_leftovers
        [ ${#left[@]} -eq 0 ] && break
        tries=$((tries + 1))
        [ "$tries" -gt 10 ] && break
        sleep 0.2
    done
    if [ ${#left[@]} -gt 0 ]; then
        local -a lines=()
        for p in "${left[@]}"; do
            lines+=("  pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)")
        done
        for p in "${left[@]}"; do
            kill -KILL "$p" 2>/dev/null || true
        done
        echo
        echo "error: ${#left[@]} process(es) started by the tests still running after they ended:"
        printf '%s\n' "${lines[@]}"
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
