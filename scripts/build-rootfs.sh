#!/usr/bin/env bash
# Builds the guest rootfs: Debian bookworm minbase plus images/rootfs/packages, by mmdebstrap
# (no root daemon, no chroot left behind), with the overlay mountpoints the init needs created
# in the image itself (so nothing lands in the upper layer). Emitted as rootfs.ext4 and
# rootfs.erofs, reproducibly (SOURCE_DATE_EPOCH, fixed UUIDs). Keyed by the hash of the inputs.
source "$(dirname "$0")/lib.sh"
STEP=rootfs
need mmdebstrap mmdebstrap
need mkfs.ext4 e2fsprogs
need mkfs.erofs erofs-utils

pkglist="$REPO/images/rootfs/packages"
key=$(hash_inputs "$pkglist" "$0")
out="$CACHE/rootfs-$key"
if [ -f "$out/rootfs.ext4" ] && [ -f "$out/rootfs.erofs" ]; then
    publish rootfs.ext4 "$out/rootfs.ext4"
    publish rootfs.erofs "$out/rootfs.erofs"
    log "up to date ($out)"
    exit 0
fi

packages=$(grep -v '^#' "$pkglist" | xargs | tr ' ' ',')
mirror=${VMRUN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
work=$(mktemp -d "$CACHE/rootfs-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree="$work/tree"

log "mmdebstrap bookworm minbase + $packages"
mkdir -p "$CACHE/logs"
with_progress "$CACHE/logs/mmdebstrap.log" mmdebstrap --variant=minbase --include="$packages" \
    --mode=root --format=directory \
    --customize-hook='mkdir -p "$1/.overlayfs/lower" "$1/.overlayfs/upperfs"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    bookworm "$tree" "$mirror"

# mmdebstrap clamps what it unpacks; the hooks' own changes get the same time here.
find "$tree" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch --no-dereference --date="@$SOURCE_DATE_EPOCH"

mkdir -p "$out.tmp"
size_mb=$(( $(du -sm "$tree" | cut -f1) * 13 / 10 + 32 ))
log "ext4 image (${size_mb} MiB)"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L vmrun-root \
    -U 6f6e7572-6d76-4000-8000-726f6f746673 \
    -E root_owner=0:0,hash_seed=6f6e7572-6d76-4000-8000-726f6f746673 \
    -d "$tree" "$out.tmp/rootfs.ext4" "${size_mb}M"
log "erofs image"
mkfs.erofs --quiet -T "$SOURCE_DATE_EPOCH" -U 6f6e7572-6d76-4000-8000-65726f667300 \
    "$out.tmp/rootfs.erofs" "$tree"
rm -rf "$out" && mv "$out.tmp" "$out"
prune "rootfs" "$out"
publish rootfs.ext4 "$out/rootfs.ext4"
publish rootfs.erofs "$out/rootfs.erofs"
log "built $out (ext4 $(du -h "$out/rootfs.ext4" | cut -f1), erofs $(du -h "$out/rootfs.erofs" | cut -f1))"
