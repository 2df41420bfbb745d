#!/usr/bin/env bash
# Runs the T1–T3 tests (every test binary but the full-guest T4 ones) RUNS times with both
# cores kept busy by CPU hogs this script starts and stops, and reports every test that failed
# in any run. A test that fails only under load is a defect in the test: fix it, then rerun.
# Usage: scripts/flake-sweep.sh [RUNS] [--no-hog] [--t4]
#   --no-hog  no CPU load (a baseline)
#   --t4      also the T4 test binaries (slow: minutes per run where guest ring 0 is emulated)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=20 hog=1 t4=0
for a in "$@"; do
    case "$a" in
        --no-hog) hog=0 ;;
        --t4) t4=1 ;;
        [0-9]*) runs=$a ;;
        *) echo "usage: $0 [RUNS] [--no-hog] [--t4]" >&2; exit 2 ;;
    esac
done
# The full-guest tests, by test target name (tests/tests/*.rs that boot the real guest).
T4_TARGETS=" $(sed -n 's/^t4_targets=//p' scripts/tiers.conf) "
export VMRUN_REQUIRE_KVM=1 VMRUN_REQUIRE_T2=1
[ "$t4" = 1 ] && export VMRUN_REQUIRE_T4=1

work=$(mktemp -d "${TMPDIR:-/tmp}/vmrun-sweep-XXXXXX")
hogs=()
cleanup() {
    [ "${#hogs[@]}" -gt 0 ] && kill "${hogs[@]}" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "[sweep] building the test binaries" >&2
cargo test --workspace --locked --no-run --message-format=json 2>/dev/null >"$work/build.json"
# name<TAB>package dir<TAB>executable, for each test binary of this tier selection.
python3 - "$work/build.json" "$T4_TARGETS" "$t4" >"$work/bins" <<'PY'
import json, os, sys
t4 = sys.argv[2].split()
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    t = m["target"]
    if t["kind"] == ["test"] and t["name"] in t4 and sys.argv[3] != "1":
        continue
    print(f'{t["name"]}\t{os.path.dirname(m["manifest_path"])}\t{m["executable"]}')
PY
echo "[sweep] $(wc -l <"$work/bins") test binaries, $runs runs, CPU hogs: $([ $hog = 1 ] && nproc || echo 0)" >&2

if [ "$hog" = 1 ]; then
    for _ in $(seq "$(nproc)"); do
        sh -c 'while :; do :; done' &
        hogs+=($!)
    done
fi

: >"$work/failed"
start=$SECONDS
for r in $(seq "$runs"); do
    t0=$SECONDS passed=0 failed=0
    while IFS=$'\t' read -r name dir exe; do
        log="$work/run$r-$name.log"
        # As cargo runs them: from the package's directory, one test at a time (test.sh's flags).
        if (cd "$dir" && "$exe" --test-threads=1) >"$log" 2>&1; then :; fi
        p=$(grep -c '^test .* \.\.\. ok$' "$log" || true)
        f=$(grep '^test .* \.\.\. FAILED$' "$log" | sed 's/^test \(.*\) \.\.\. FAILED$/\1/' || true)
        passed=$((passed + p))
        if [ -n "$f" ]; then
            while read -r t; do
                failed=$((failed + 1))
                printf '%s\t%s\t%s\n' "$r" "$name::$t" "$log" >>"$work/failed"
                cp "$log" "${TMPDIR:-/tmp}/vmrun-sweep-fail-$r-$name.log"
            done <<<"$f"
        elif ! grep -q '^test result: ok' "$log"; then
            failed=$((failed + 1))
            printf '%s\t%s\t%s\n' "$r" "$name (binary did not finish)" "$log" >>"$work/failed"
            cp "$log" "${TMPDIR:-/tmp}/vmrun-sweep-fail-$r-$name.log"
        fi
    done <"$work/bins"
    echo "[sweep] run $r/$runs: $passed passed, $failed failed, $((SECONDS - t0)) s" >&2
done

total=$(wc -l <"$work/failed")
echo "[sweep] $runs runs in $((SECONDS - start)) s: $total failures"
if [ "$total" -gt 0 ]; then
    cut -f2 "$work/failed" | sort | uniq -c | sort -rn
    echo "[sweep] logs of failing binaries: ${TMPDIR:-/tmp}/vmrun-sweep-fail-*.log"
    exit 1
fi
