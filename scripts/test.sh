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
cargo test --workspace --locked -- --show-output
