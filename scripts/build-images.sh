#!/usr/bin/env bash
# Builds the guest images into $VMRUN_CACHE (default ~/.cache/vmrun). Each step is a no-op when
# its inputs are unchanged.
# Usage: build-images.sh [kernel|kernel-hw|kernel-pvm|initramfs|rootfs]...
#   kernel: the variant this host needs (PVM when `vmrun doctor` finds guest ring 0 emulated).
#   Default: kernel initramfs rootfs.
source "$(dirname "$0")/lib.sh"
STEP=images

targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=(kernel initramfs rootfs)
for t in "${targets[@]}"; do
    case "$t" in
        kernel)
            (cd "$REPO" && cargo build --quiet --locked -p vmrun)
            variant=$("$REPO/target/debug/vmrun" host-kind) || die "cannot probe this host's KVM (run vmrun doctor)"
            log "this host needs the '$variant' kernel variant"
            bash "$REPO/scripts/build-kernel.sh" "$variant" ;;
        kernel-hw) bash "$REPO/scripts/build-kernel.sh" hw ;;
        kernel-pvm) bash "$REPO/scripts/build-kernel.sh" pvm ;;
        initramfs) bash "$REPO/scripts/build-initramfs.sh" ;;
        rootfs) bash "$REPO/scripts/build-rootfs.sh" ;;
        *) die "unknown image '$t' (kernel, kernel-hw, kernel-pvm, initramfs, rootfs)" ;;
    esac
done
