#!/usr/bin/env bash
# The test command: builds (or reuses) the guest images this host needs, then runs every test
# tier this host supports. Tests that cannot run here print SKIPPED and why; with CI=true the
# KVM and full-guest tiers are required instead. Every test binary runs even when an earlier
# one failed, and the failing tests of the whole run are listed at the end.
#
# Where this host's KVM emulates guest ring 0 (nested PVM), the full-guest tests are split
# (scripts/tiers.conf): those that prove the PVM path run here, the rest in the hardware tier
# (scripts/hw-tier.sh), where the same tests run on a real kvm_amd many times faster. Results
# are labelled with the KVM kind they ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-images.sh kernel initramfs rootfs
# The containerd shim is a binary of its own package: its T4 test runs it through containerd.
cargo build --locked --quiet -p containerd-shim-vmrun
if [ "${CI:-}" = true ]; then
    export VMRUN_REQUIRE_KVM=1 VMRUN_REQUIRE_T2=1 VMRUN_REQUIRE_T4=1
fi
conf() { sed -n "s/^$1=//p" scripts/tiers.conf; }
kind=$(target/debug/vmrun host-kind 2>/dev/null || echo none)
# Test targets of the workspace, minus the T4 ones that run elsewhere on this kind of host.
all=$(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if t["kind"] == ["test"]:
            print(t["name"])
' | sort -u)
skip=" "
if [ "$kind" = pvm ]; then
    for t in $(conf t4_targets); do
        case " $(conf pvm_targets) " in *" $t "*) ;; *) skip="$skip$t " ;; esac
    done
fi
tests=()
for t in $all; do
    case "$skip" in *" $t "*) ;; *) tests+=(--test "$t") ;; esac
done
log=$(mktemp "${TMPDIR:-/tmp}/vmrun-test-XXXXXX.log")
trap 'rm -f "$log"' EXIT
echo "== tests on this host (KVM: $kind)"
# One test at a time: full-guest tests each boot VMs that need the host's cores (guest ring 0 is
# CPU-bound where it is emulated), and several at once starve each other's vCPUs.
set +e
cargo test --workspace --locked --no-fail-fast --lib --bins "${tests[@]}" -- --show-output --test-threads=1 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
cargo test --workspace --locked --doc 2>&1 | tee -a "$log"
rc=$((rc | PIPESTATUS[0]))
hw_rc=0
if [ "$kind" = pvm ]; then
    echo "== the hardware tier (kvm_amd on TCG-emulated SVM): $(conf hw_targets)"
    bash scripts/hw-tier.sh 2>&1 | tee -a "$log"
    hw_rc=${PIPESTATUS[0]}
fi
set -e
failed=$(grep -aE '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/  \1 (this host)/' || true)
# A target's last result line is its result (hw-tier.sh may rerun one in a fresh outer VM).
hw_results() { grep -a "HWTIER-RESULT" "$log" | tr -d '\r' | sed 's/^.*HWTIER-RESULT //' | awk '{ if (!($1 in r)) o[n++] = $1; r[$1] = $0 } END { for (i = 0; i < n; i++) print r[o[i]] }'; }
hw_failed=$(hw_results | grep -v "^[^ ]* ok" | sed 's/^/  /; s/$/ (hardware tier)/' || true)
skipped=$(grep -ac '^SKIPPED ' "$log" || true)
passed=$(grep -acE '^test .* \.\.\. ok$' "$log" || true)
echo "== tests: $passed passed on this host ($kind), $(printf '%s' "$failed" | grep -c . || true) failed, $skipped skipped"
[ "$kind" = pvm ] && echo "== hardware tier: $(hw_results | tr '\n' ';')"
if [ -n "$failed$hw_failed" ]; then
    echo "== failing tests:"
    printf '%s\n' "$failed" "$hw_failed" | grep .
fi
if [ "$rc" -ne 0 ] && [ -z "$failed" ]; then
    echo "== cargo test failed without a failing test (a build error or a crashed test binary): see above"
fi
[ "$rc" -eq 0 ] && [ "$hw_rc" -eq 0 ]
