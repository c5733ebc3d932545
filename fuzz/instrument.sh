#!/bin/sh
# rustc for the workspace's own crates while fuzz/run.sh builds (cargo's
# RUSTC_WORKSPACE_WRAPPER): adds the coverage instrumentation libFuzzer
# steers by, with stable rustc flags only. Dependencies are built as usual
# (and reused from ordinary builds); build scripts too, since no libFuzzer
# is linked into them. Line tables only, and mixnn-node unoptimized: the
# fuzz build then takes a third of the time, and the node's decoders are
# small next to what the crypto, model and dependencies run.
rustc="$1"
shift
case " $* " in
*" --crate-name build_script_"*) exec "$rustc" "$@" ;;
*" --crate-name mixnn_node "*) extra="-Copt-level=0" ;;
*" --crate-name "*) extra="" ;;
*) exec "$rustc" "$@" ;; # version and target queries
esac
# shellcheck disable=SC2086 # $extra is empty or one flag
exec "$rustc" "$@" \
    -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cdebuginfo=line-tables-only $extra
