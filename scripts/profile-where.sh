#!/usr/bin/env bash
# Where a guest's emulated ring-0 time goes, on a host that emulates guest ring 0 (nested PVM).
# There a guest's time is, to first order, the number of kernel instructions the host emulates
# (~1 µs each), and KVM reports each one through its `kvm_emulate_insn` tracepoint with the
# guest's instruction address. This records that tracepoint (perf; every event: a sampling
# period is not honoured for it) during a named VM's boot and during its `exec true` round
# trips, names each address from the guest kernel's System.map and prints the functions and
# the kinds of work that cost most. `vmrun profile` says how long and how many exits; this
# says which guest code. Recording slows the guest: a boot takes minutes under it.
#
# Usage: profile-where.sh [--execs N] [--memory MIB] [--top N] [DIR]
#   DIR: a build frozen by profile-build.sh (vmrun, vmlinux, initramfs.cpio, System.map);
#        default: this checkout's release vmrun with the cached images.
source "$(dirname "$0")/lib.sh"
STEP=profile-where

execs=10
memory=
top=25
dir=
while [ $# -gt 0 ]; do
    case "$1" in
        --execs) execs="${2:?--execs needs a number}"; shift 2 ;;
        --memory) memory="${2:?--memory needs MiB}"; shift 2 ;;
        --top) top="${2:?--top needs a number}"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) dir="$1"; shift ;;
    esac
done
need perf linux-perf
need python3 python3
[ "$(id -u)" = 0 ] || die "perf needs root to read KVM's tracepoints: run as root"

if [ -n "$dir" ]; then
    vmrun="$dir/vmrun"
    export VMRUN_KERNEL="$dir/vmlinux" VMRUN_INITRAMFS="$dir/initramfs.cpio"
    map="$dir/System.map"
else
    vmrun="$REPO/target/release/vmrun"
    [ -x "$vmrun" ] || die "no release build at $vmrun: run 'cargo build --release -p vmrun' first"
    kernel=$(readlink -f "$CACHE/vmlinux-pvm" 2>/dev/null) || true
    map="$(dirname "${kernel:-/nonexistent}")/System.map"
fi
[ -x "$vmrun" ] || die "no vmrun at $vmrun"
[ -f "$map" ] || die "no System.map at $map: build the PVM kernel (vmrun images build kernel-pvm) or give a profile-build.sh DIR"
kind=$("$vmrun" host-kind) || die "cannot probe this host's KVM (run vmrun doctor)"
[ "$kind" = pvm ] || die "this host runs guest ring 0 at hardware speed: KVM emulates next to nothing, so there is nothing to sample (use perf kvm on real hardware)"
[ -d /sys/kernel/tracing/events/kvm/kvm_emulate_insn ] || [ -d /sys/kernel/debug/tracing/events/kvm/kvm_emulate_insn ] ||
    die "no kvm:kvm_emulate_insn tracepoint (is tracefs mounted at /sys/kernel/tracing and the kvm module loaded?)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vmrun-where.XXXXXX")
name="where-$$"
cleanup() {
    "$vmrun" stop "$name" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
start_args=(--name "$name")
[ -n "$memory" ] && start_args+=(--memory "$memory")

record() { # record OUT CMD... : sample the tracepoint system-wide while CMD runs
    local out="$1"; shift
    perf record -q -a -e kvm:kvm_emulate_insn -o "$out" -- "$@" >/dev/null 2>"$tmp/perf.err" ||
        die "perf record failed: $(tail -3 "$tmp/perf.err")"
}

log "booting $name under perf (every emulated instruction recorded)"
record "$tmp/boot.data" "$vmrun" start "${start_args[@]}"
log "running 'exec $name -- true' $execs times under perf"
record "$tmp/exec.data" bash -c 'for _ in $(seq "$1"); do "$2" exec "$3" -- true || exit 1; done' _ "$execs" "$vmrun" "$name"
"$vmrun" stop "$name" >/dev/null 2>&1 || true

report() { # report TITLE DATA PER : the table for one recording, counts divided by PER
    perf script -i "$2" -F trace 2>/dev/null |
        python3 "$REPO/scripts/profile-where.py" --map "$map" --per "$3" --top "$top" --title "$1"
}
echo "profile-where: host KVM $kind, guest ring 0 emulated; $(basename "$map") from $(dirname "$map")"
report "boot (vmrun start → agent ready)" "$tmp/boot.data" 1
echo
report "one exec of /bin/true (mean of $execs)" "$tmp/exec.data" "$execs"
