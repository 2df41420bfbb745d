#!/usr/bin/env bash
# The hardware-KVM tier: vmrun's hardware kernel through vmrun on a real kvm_amd, which runs
# inside a QEMU guest whose AMD SVM is emulated in software (TCG). This host's own /dev/kvm is
# never used for it. An outer Debian kernel (extracted from its .deb, not installed) boots
# from an initramfs that holds busybox, the kvm modules, the vmrun binary, the test binaries
# named in scripts/tiers.conf (hw_targets), the tools they use and the guest images; its init
# (scripts/hw-tier-init.sh) loads kvm_amd, runs `vmrun doctor`, the tests and the harness
# example, and reports each result on the serial console.
# Usage: hw-tier.sh [TEST_TARGET...]   (default: hw_targets of scripts/tiers.conf)
# Env: HW_TIMEOUT (seconds for the whole QEMU run, default 1500), HW_MEM (MiB, 6144), HW_SMP (2)
# Every figure it prints is "TCG-emulated SVM": it shows the hardware path works and where it
# spends its time, not how fast it is on real hardware.
source "$(dirname "$0")/lib.sh"
STEP=hw-tier
HW_TIMEOUT=${HW_TIMEOUT:-1500}; HW_MEM=${HW_MEM:-6144}; HW_SMP=${HW_SMP:-2}

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    read -r -a targets <<<"$(sed -n 's/^hw_targets=//p' "$REPO/scripts/tiers.conf")"
fi

# --- tools, from Debian's packages
pkgs=(qemu-system-x86 busybox-static cpio tmux python3 e2fsprogs erofs-utils mount tar)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
need qemu-system-x86_64 qemu-system-x86

# --- the outer kernel: the one linux-image-amd64 depends on, extracted once
work="$CACHE/hw-tier"
mkdir -p "$work"
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$kpkg" ] || die "cannot find the kernel package linux-image-amd64 depends on (apt-get update?)"
kdir="$work/$kpkg"
if [ ! -d "$kdir/boot" ]; then
    log "fetching $kpkg (unpacked into $kdir, not installed)"
    tmpd=$(mktemp -d "$work/deb.XXXXXX")
    (cd "$tmpd" && apt-get download "${kpkg}-unsigned" >/dev/null 2>&1 || apt-get download "$kpkg" >/dev/null)
    rm -rf "$kdir.tmp" && dpkg-deb -x "$tmpd"/*.deb "$kdir.tmp" && rm -rf "$tmpd" && mv "$kdir.tmp" "$kdir"
fi
kver=$(ls "$kdir/lib/modules")
mods="$kdir/lib/modules/$kver/kernel"
vmlinuz="$kdir/boot/vmlinuz-$kver"

# --- what runs inside: the hardware kernel and images, vmrun, the tests, the example
bash "$REPO/scripts/build-images.sh" kernel-hw initramfs rootfs
log "building vmrun, the hw-tier tests (${targets[*]}) and the harness example"
(cd "$REPO" && cargo build --quiet --locked -p vmrun --bins --examples)
test_args=()
for t in "${targets[@]}"; do test_args+=(--test "$t"); done
json=$(cd "$REPO" && cargo test --quiet --locked -p vmrun-tests "${test_args[@]}" --no-run --message-format=json 2>/dev/null)

root=$(mktemp -d "$work/outer.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,lib,proc,sys,dev,etc,tmp,root,run,vm/bin,vm/tests,vm/cache,usr/lib,usr/share}
cp /bin/busybox "$root/bin/busybox"
install -m 0755 "$REPO/scripts/hw-tier-init.sh" "$root/init"
# KVM, and what `vmrun diff` needs on the host side (loop devices; ext4, erofs and overlayfs
# to mount the images below an upper).
for m in virt/lib/irqbypass.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko \
    crypto/crc32c_generic.ko lib/libcrc32c.ko fs/erofs/erofs.ko fs/overlayfs/overlay.ko \
    drivers/block/loop.ko lib/crc16.ko fs/mbcache.ko fs/jbd2/jbd2.ko fs/ext4/ext4.ko; do
    cp "$mods/$m" "$root/lib/"
done
# A binary and every shared library it loads, at the same paths.
copy_bin() {
    local src="$1" dst="$2" lib
    cp "$src" "$dst"
    strip --strip-debug "$dst" 2>/dev/null || true
    for lib in $(ldd "$src" 2>/dev/null | grep -o '/[^ ]*'); do
        [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"; }
    done
}
copy_bin "$REPO/target/debug/vmrun" "$root/vm/bin/vmrun"
copy_bin "$REPO/target/debug/examples/harness" "$root/vm/bin/harness"
for tool in tar tmux mkfs.ext4 mke2fs mkfs.erofs losetup python3 sha256sum; do
    copy_bin "$(command -v "$tool")" "$root/vm/bin/$tool"
done
cp -r /usr/lib/python3.11 "$root/usr/lib/" 2>/dev/null || true
# tmux (the terminal tests) needs a UTF-8 locale.
mkdir -p "$root/usr/lib/locale" && cp -r /usr/lib/locale/C.utf8 "$root/usr/lib/locale/"
rm -rf "$root"/usr/lib/python3.11/{test,idlelib,tkinter,ensurepip,lib2to3,pydoc_data,__pycache__}
mkdir -p "$root/usr/share/terminfo" && cp -r /usr/share/terminfo/x "$root/usr/share/terminfo/" 2>/dev/null || true
mkdir -p "$root/lib/terminfo" && cp -r /lib/terminfo/* "$root/lib/terminfo/" 2>/dev/null || true
printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do copy_bin "$exe" "$root/vm/tests/$name"; done
for t in "${targets[@]}"; do
    [ -x "$root/vm/tests/$t" ] || die "no test binary for '$t' (a tests/tests/$t.rs of vmrun-tests?)"
done
cp -L "$CACHE/vmlinux" "$CACHE/initramfs.cpio" "$CACHE/rootfs.ext4" "$root/vm/cache/"
printf '%s\n' "${targets[@]}" >"$root/vm/tests/list"
printf '%s\n' "${HW_DEBUG_CMD:-}" >"$root/vm/debug.sh"
# The kvmpin helper of the probe: one idle VM held for the whole session (see the init).
cc -static -O2 -o "$root/vm/bin/kvmpin" "$REPO/scripts/kvmpin.c"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/outer.cpio"
rm -rf "$root"
log "outer initramfs: $(du -h "$work/outer.cpio" | cut -f1); outer kernel $kver"

# --- the run: a host-side timeout around everything, one retry if the outer kernel hangs
run_once() {
    local logf="$1" extra="${2:-}"
    timeout "$HW_TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$HW_SMP" -m "$HW_MEM" \
        -nographic -no-reboot -kernel "$vmlinuz" -initrd "$work/outer.cpio" \
        -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init $extra" </dev/null 2>&1 \
        | while IFS= read -r l; do printf '[hw %6ds] %s\n' "$SECONDS" "$l"; done | tee "$logf"
}
start=$SECONDS
logf="$work/last.log"
run_once "$logf" || true
if ! grep -q "HWTIER-DONE" "$logf"; then
    log "the outer VM did not finish (a hang of the outer kernel under TCG?); once more"
    run_once "$logf" || true
fi
grep -q "HWTIER-DONE" "$logf" || die "the outer VM never finished; see $logf"
grep -a "HWTIER-RESULT" "$logf" | tr -d '\r' | sed 's/^.*HWTIER-RESULT //' >"$work/results"
# A target that failed again after its outer kernel reported a soft lockup: the stalled outer
# VM can stay slow (seen: a boot stuck early in both runs, then fine in a fresh VM). Those get
# one more run in a fresh outer VM; its result is the target's (a real failure fails again).
# HW_FORCE_FRESH=a,b runs that path for the named targets (to test it).
stalled=$( (grep -a "FAILED (rc [0-9]*, after a retry: outer soft lockup" "$work/results" || true) | cut -d' ' -f1 | paste -sd, -)
stalled="${stalled:-${HW_FORCE_FRESH:-}}"
if [ -n "$stalled" ]; then
    log "$stalled: failed after an outer soft lockup; once more in a fresh outer VM"
    run_once "$work/fresh.log" "hwtier.only=$stalled" || true
    for t in ${stalled//,/ }; do
        line=$(grep -a "HWTIER-RESULT $t " "$work/fresh.log" | tr -d '\r' | sed 's/^.*HWTIER-RESULT //' | head -1)
        [ -n "$line" ] || line="$t FAILED (the fresh outer VM gave no result)"
        line=$(printf '%s' "$line" | sed 's/)$/, in a fresh outer VM after an outer soft lockup)/')
        grep -v "^$t " "$work/results" >"$work/results.new" || true
        printf '%s\n' "$line" >>"$work/results.new"
        mv "$work/results.new" "$work/results"
        echo "HWTIER-RESULT $line"
    done
fi
failed=$(grep -v "^[^ ]* ok" "$work/results" || true)
log "results (KVM: kvm_amd on TCG-emulated SVM), $((SECONDS - start))s:"
sed 's/^/  /' "$work/results" >&2
for t in doctor harness "${targets[@]}"; do
    grep -aq "^$t " "$work/results" || failed="$failed missing:$t"
done
[ -z "$failed" ] || die "failed on hardware-kind KVM:$(printf ' %s' $failed)"
log "all passed on hardware-kind KVM (TCG-emulated SVM)"
