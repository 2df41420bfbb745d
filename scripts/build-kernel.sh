#!/usr/bin/env bash
# Builds the guest kernel from Debian's linux-source-6.12: tinyconfig + images/kernel/microvm.config,
# and for the `pvm` variant also images/kernel/pvm/{config,*.patch}. Output: $CACHE/vmlinux or
# $CACHE/vmlinux-pvm, a symlink into a directory keyed by the hash of every input.
# Usage: build-kernel.sh hw|pvm
source "$(dirname "$0")/lib.sh"

variant="${1:?usage: build-kernel.sh hw|pvm}"
case "$variant" in
    hw) name=vmlinux; extra=() ;;
    pvm) name=vmlinux-pvm; extra=("$REPO"/images/kernel/pvm/config "$REPO"/images/kernel/pvm/*.patch) ;;
    *) die "unknown kernel variant '$variant' (hw or pvm)" ;;
esac
STEP="kernel-$variant"

tarball=/usr/src/linux-source-6.12.tar.xz
[ -f "$tarball" ] || die "$tarball is missing: apt-get install linux-source-6.12"
for t in make:make gcc:gcc flex:flex bison:bison bc:bc perl:perl; do need "${t%%:*}" "${t##*:}"; done
[ -f /usr/include/libelf.h ] || die "libelf headers are missing: apt-get install libelf-dev"

srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || stat -c %s "$tarball")
key=$( (echo "$srcver"; hash_inputs "$REPO/images/kernel/microvm.config" "${extra[@]}" "$0") | sha256sum | cut -c1-16)
out="$CACHE/kernel-$variant-$key"
if [ -f "$out/vmlinux" ]; then
    publish "$name" "$out/vmlinux"
    log "up to date ($out)"
    exit 0
fi

build="$CACHE/build/kernel-$variant-$key"
# Source trees of earlier (failed or superseded) builds of this variant take ~1.5 GB each.
rm -rf "$CACHE/build/kernel-$variant-"* && mkdir -p "$build"
log "extracting $tarball"
with_progress "$build/extract.log" tar -xf "$tarball" -C "$build" --strip-components=1
cd "$build"
if [ "$variant" = pvm ]; then
    for p in "$REPO"/images/kernel/pvm/*.patch; do
        log "applying $(basename "$p")"
        patch -p1 --quiet <"$p" || die "patch $(basename "$p") does not apply to linux-source $srcver"
    done
fi

log "configuring"
fragments=("$REPO/images/kernel/microvm.config")
[ "$variant" = pvm ] && fragments+=("$REPO/images/kernel/pvm/config")
make -s tinyconfig >/dev/null
./scripts/kconfig/merge_config.sh -m .config "${fragments[@]}" >config.log 2>&1
make -s olddefconfig >>config.log 2>&1
# Every option the fragments ask for must have survived dependency resolution (where two
# fragments set one option, the later one wins, as in merge_config.sh).
missing=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" .config || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" .config || echo unset))") ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            if grep -qE "^$opt=" .config; then missing+=("$line (got: $(grep -E "^$opt=" .config))"); fi ;;
    esac
done < <(cat "${fragments[@]}" | awk '
    /^CONFIG_[A-Za-z0-9_]+=/ { k = $0; sub(/=.*/, "", k) }
    /^# CONFIG_[A-Za-z0-9_]+ is not set/ { k = $2 }
    k != "" { last[k] = $0; order[++n] = k; k = "" }
    END { for (i = 1; i <= n; i++) if (!(order[i] in done)) { done[order[i]] = 1; print last[order[i]] } }')
if [ "${#missing[@]}" -gt 0 ]; then
    printf '  %s\n' "${missing[@]}" >&2
    die "the kernel config does not hold what the fragments ask (dependencies?); see $build/config.log"
fi

log "compiling vmlinux with $(nproc) jobs"
with_progress "$build/make.log" make -j"$(nproc)" vmlinux

mkdir -p "$out.tmp"
cp vmlinux System.map .config "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
prune "kernel-$variant" "$out"
cd /
rm -rf "$build"
publish "$name" "$out/vmlinux"
log "built $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
