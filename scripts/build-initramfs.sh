#!/usr/bin/env bash
# Builds the initramfs: a newc cpio (uncompressed: the guest inflates gzip very slowly where ring
# 0 is emulated) holding the static vmrun-init as /init, which is also the agent when run as
# vmrun-agent (one binary: the guest kernel copies every byte at boot), made reproducibly
# (sorted entries, owner 0:0, mtime 0). Output: $CACHE/initramfs.cpio, keyed by the hash of its
# contents' inputs.
source "$(dirname "$0")/lib.sh"
STEP=initramfs
need cpio cpio
need cargo cargo

target=x86_64-unknown-linux-gnu
log "building static vmrun-init (the agent too, when run as vmrun-agent)"
(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --locked -p vmrun-init --target "$target")
init="$REPO/target/$target/release/vmrun-init"
ldd "$init" 2>&1 | grep -qE "statically linked|not a dynamic" || die "$init is not static (it would need a loader the initramfs lacks)"

key=$(hash_inputs "$init" "$0")
out="$CACHE/initramfs-$key"
if [ -f "$out/initramfs.cpio" ]; then
    publish initramfs.cpio "$out/initramfs.cpio"
    log "up to date ($out)"
    exit 0
fi

stage=$(mktemp -d "$CACHE/initramfs-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
install -m 0755 -s "$init" "$stage/init"
# The kernel opens /dev/console for PID 1 before anything is mounted.
mknod -m 0600 "$stage/dev/console" c 5 1
find "$stage" -exec touch -h -d @0 {} +
mkdir -p "$out.tmp"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible >"$out.tmp/initramfs.cpio")
rm -rf "$out" && mv "$out.tmp" "$out"
prune "initramfs" "$out"
publish initramfs.cpio "$out/initramfs.cpio"
log "built $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1))"
