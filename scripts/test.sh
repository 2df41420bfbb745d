#!/usr/bin/env bash
# The test command: builds (or reuses) the guest images this host needs, then runs every test
# tier this host supports. Tests that cannot run here print SKIPPED and why; with CI=true the
# KVM and full-guest tiers are required instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-images.sh kernel initramfs rootfs
if [ "${CI:-}" = true ]; then
    export VMRUN_REQUIRE_KVM=1 VMRUN_REQUIRE_T2=1 VMRUN_REQUIRE_T4=1
fi
# One test at a time: full-guest tests each boot VMs that need the host's cores (guest ring 0 is
# CPU-bound where it is emulated), and several at once starve each other's vCPUs.
cargo test --workspace --locked -- --show-output --test-threads=1
