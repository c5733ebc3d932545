#!/usr/bin/env bash
# Runs the fuzz targets under libFuzzer, SECONDS each (default 30), all of
# them or those named; fails if any finds a crash.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Stable Rust: the workspace's crates are built with coverage
# instrumentation (fuzz/instrument.sh) and linked with libFuzzer
# (libfuzzer-sys, which needs a C++ compiler). Each target's corpus grows
# in fuzz/corpus/TARGET (seeded by our own encoders); a crashing input is
# saved as fuzz/artifacts/TARGET/crash-*: reproduce it with
#   MIXNN_FUZZ_TARGET=TARGET target/debug/examples/mixnn-fuzz FILE
# and, once fixed, keep it in fuzz/regressions/TARGET/ (cargo test runs it).
#
# FUZZ_JOBS=N runs N targets at a time (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
shift || true
jobs="${FUZZ_JOBS:-1}"

RUSTC_WORKSPACE_WRAPPER="$PWD/fuzz/instrument.sh" \
    cargo build -p mixnn-fuzz --features libfuzzer --example mixnn-fuzz
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="$target_dir/debug/examples/mixnn-fuzz"

# name max_len, one per line
all="$(MIXNN_FUZZ_TARGET=list "$bin" 2>/dev/null)"
if [ $# -gt 0 ]; then
    for t in "$@"; do
        grep -q "^$t " <<<"$all" || {
            echo "no fuzz target $t; the targets: $(cut -d' ' -f1 <<<"$all" | tr '\n' ' ')" >&2
            exit 2
        }
    done
    all="$(grep -E "^($(IFS='|'; echo "$*")) " <<<"$all")"
fi

fuzz_one() {
    local t="$1" max_len="$2"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    # -timeout: one input may take 10 s; -rss_limit_mb: memory use is a bug
    # past 2 GiB (a decoder allocating what a peer claims).
    MIXNN_FUZZ_TARGET="$t" MIXNN_FUZZ_SEED_DIR="fuzz/corpus/$t" \
        "$bin" "fuzz/corpus/$t" \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 \
        >"fuzz/artifacts/$t/log" 2>&1
}
export -f fuzz_one
export bin secs

echo "fuzzing $(wc -l <<<"$all") targets for ${secs}s each, $jobs at a time"
status=0
rm -f fuzz/artifacts/failed
xargs -P "$jobs" -L 1 bash -c 'fuzz_one "$0" "$1" || echo "$0" >>fuzz/artifacts/failed' \
    <<<"$all" || true

printf '%-14s %12s %8s  %s\n' target executions coverage result
for t in $(cut -d' ' -f1 <<<"$all"); do
    log="fuzz/artifacts/$t/log"
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)"
    if grep -qx "$t" fuzz/artifacts/failed 2>/dev/null; then
        result="FAILED: see $log and fuzz/artifacts/$t/"
        status=1
    else
        result=ok
    fi
    printf '%-14s %12s %8s  %s\n' "$t" "${runs:-?}" "${cov:-?}" "$result"
done
rm -f fuzz/artifacts/failed
if [ "$status" -ne 0 ]; then
    # What failed, the input (base64) and where libFuzzer saved it.
    for t in $(cut -d' ' -f1 <<<"$all"); do
        grep -q -m1 -E 'panicked|ERROR: libFuzzer' "fuzz/artifacts/$t/log" || continue
        echo "--- $t"
        grep -E -A2 'panicked|ERROR: libFuzzer|^Base64|Test unit written' "fuzz/artifacts/$t/log" |
            grep -v '^ *[0-9]*: \|^ *at ' | head -20
    done
fi
exit "$status"
