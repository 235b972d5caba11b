#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a few seconds each (default 30), starting from the
# committed seeds in fuzz/corpus/<target>/. New corpus entries go to a scratch directory, so
# the committed seeds stay as they are. Installs cargo-fuzz if it is missing. Needs a nightly
# toolchain (`cargo +nightly`).
#
# Usage: scripts/fuzz-smoke.sh [SECONDS] [TARGET...]
# A crash leaves its input in fuzz/artifacts/<target>/ and makes the script fail; reproduce
# with `cd fuzz && cargo +nightly fuzz run <target> <file>`.
set -euo pipefail

seconds="${1:-30}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

cargo +nightly fuzz build
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s"
    mkdir -p "$scratch/$t"
    cargo +nightly fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz smoke: ${#targets[@]} targets, ${seconds}s each, no crash"
