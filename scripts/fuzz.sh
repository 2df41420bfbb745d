#!/usr/bin/env bash
# Coverage-guided fuzzing of what the guest and every peer control: libFuzzer (libfuzzer-sys)
# on the stable toolchain, instrumented with SanitizerCoverage flags (cargo-fuzz needs a
# nightly toolchain, which a new machine here cannot fetch). Targets are fuzz/fuzz_targets/*.
# Usage: fuzz.sh [--time SECONDS] [TARGET...]      (default: every target, 60 s each)
# Corpora are kept in $CACHE/fuzz/corpus/TARGET, seeded from fuzz/seeds/TARGET; crashes go to
# $CACHE/fuzz/artifacts/TARGET and fail the run, naming the input to turn into a test.
source "$(dirname "$0")/lib.sh"
STEP=fuzz
secs=60
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time) secs="$2"; shift 2 ;;
        -*) die "unknown option $1 (use --time SECONDS [TARGET...])" ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ "${#targets[@]}" -eq 0 ]; then
    for f in "$REPO"/fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
log "building ${#targets[@]} targets (release, SanitizerCoverage)"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros (they run on the
# host and must not be instrumented).
triple=x86_64-unknown-linux-gnu
cargo build --quiet --release --locked --manifest-path "$REPO/fuzz/Cargo.toml" \
    --target-dir "$REPO/fuzz/target" --target "$triple" --bins
failed=()
printf '%-18s %12s %10s %8s %8s  %s\n' TARGET EXECS EXECS/S COV FT RESULT
for t in "${targets[@]}"; do
    bin="$REPO/fuzz/target/$triple/release/$t"
    [ -x "$bin" ] || die "no fuzz target $t (see fuzz/fuzz_targets/)"
    corpus="$CACHE/fuzz/corpus/$t"
    art="$CACHE/fuzz/artifacts/$t"
    mkdir -p "$corpus" "$art"
    seeds=()
    [ -d "$REPO/fuzz/seeds/$t" ] && seeds=("$REPO/fuzz/seeds/$t")
    out=$(mktemp)
    set +e
    "$bin" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="$art/" "$corpus" "${seeds[@]}" >"$out" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$out" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$out" | tail -1 | cut -d' ' -f2)
    if [ $rc -eq 0 ]; then
        result=ok
    else
        result="CRASH (rc $rc): $(grep -o 'Test unit written to .*' "$out" | tail -1)"
        failed+=("$t")
        tail -40 "$out" >&2
    fi
    printf '%-18s %12s %10s %8s %8s  %s\n' "$t" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$result"
    rm -f "$out"
done
[ "${#failed[@]}" -eq 0 ] || die "crashes in: ${failed[*]} (inputs under $CACHE/fuzz/artifacts)"
log "no crashes (${secs}s per target)"
