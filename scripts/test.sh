#!/usr/bin/env bash
# The test command: builds (or reuses) the guest images this host needs, then runs every test
# tier this host supports. Tests that cannot run here print SKIPPED and why; with CI=true the
# KVM and full-guest tiers are required instead. Every test binary runs even when an earlier
# one failed, and the failing tests of the whole run are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-images.sh kernel initramfs rootfs
if [ "${CI:-}" = true ]; then
    export VMRUN_REQUIRE_KVM=1 VMRUN_REQUIRE_T2=1 VMRUN_REQUIRE_T4=1
fi
log=$(mktemp "${TMPDIR:-/tmp}/vmrun-test-XXXXXX.log")
trap 'rm -f "$log"' EXIT
# One test at a time: full-guest tests each boot VMs that need the host's cores (guest ring 0 is
# CPU-bound where it is emulated), and several at once starve each other's vCPUs.
set +e
cargo test --workspace --locked --no-fail-fast -- --show-output --test-threads=1 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/  \1/' || true)
skipped=$(grep -c '^SKIPPED ' "$log" || true)
passed=$(grep -cE '^test .* \.\.\. ok$' "$log" || true)
echo "== tests: $passed passed, $(printf '%s' "$failed" | grep -c . || true) failed, $skipped skipped"
if [ -n "$failed" ]; then
    echo "== failing tests:"
    printf '%s\n' "$failed"
fi
if [ "$rc" -ne 0 ] && [ -z "$failed" ]; then
    echo "== cargo test failed without a failing test (a build error or a crashed test binary): see above"
fi
exit "$rc"
