#!/usr/bin/env bash
# Freezes this checkout's build for `vmrun profile --build NAME=DIR`: the release `vmrun`, the
# kernel this host needs and the initramfs, copied out of the image cache into DIR, so it can
# be compared with later builds after the cache has moved on.
# Usage: profile-build.sh DIR [REV]
#   REV: build that git revision instead (in a temporary worktree; its images go to a cache of
#   their own, $VMRUN_CACHE/profile-builds, so the main cache is untouched: a kernel is built
#   there once per distinct input).
source "$(dirname "$0")/lib.sh"
STEP=profile-build

dir="${1:?usage: profile-build.sh DIR [REV]}"
rev="${2:-}"
src="$REPO"
cache="$CACHE"
if [ -n "$rev" ]; then
    src=$(mktemp -d "${TMPDIR:-/tmp}/vmrun-profile-src.XXXXXX")
    trap 'git -C "$REPO" worktree remove --force "$src" >/dev/null 2>&1; rm -rf "$src"' EXIT
    git -C "$REPO" worktree add --detach --force "$src" "$rev" >/dev/null || die "no revision '$rev'"
    cache="$CACHE/profile-builds"
fi
log "building vmrun (release) in $src"
(cd "$src" && cargo build --quiet --release --locked -p vmrun)
variant=$("$src/target/release/vmrun" host-kind) || die "cannot probe this host's KVM (run vmrun doctor)"
[ "$variant" = pvm ] && kernel=vmlinux-pvm || kernel=vmlinux
VMRUN_CACHE="$cache" bash "$src/scripts/build-images.sh" "kernel-$variant" initramfs
mkdir -p "$dir"
cp "$src/target/release/vmrun" "$dir/vmrun"
cp -L "$cache/$kernel" "$dir/vmlinux"
# The kernel's symbols, for scripts/profile-where.sh.
cp "$(dirname "$(readlink -f "$cache/$kernel")")/System.map" "$dir/System.map" 2>/dev/null || true
cp -L "$cache/initramfs.cpio" "$dir/initramfs.cpio"
( cd "$src" && git describe --always --dirty ) >"$dir/revision" 2>/dev/null || true
log "$dir: vmrun, vmlinux ($variant), initramfs.cpio from $(cat "$dir/revision" 2>/dev/null || echo "$src")"
