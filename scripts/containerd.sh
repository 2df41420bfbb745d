#!/usr/bin/env bash
# A private containerd for vmrun's shim (tests, trying it out): loopback only, its own root,
# state and sockets under DIR, the CRI plugin off, vmrun's shim on its PATH.
#   containerd.sh start DIR [SHIM_DIR]   install containerd if missing (Debian's package), write
#                                        DIR/config.toml, start it, wait for DIR/containerd.sock
#   containerd.sh stop DIR               stop it, unmount what is left under DIR, remove DIR
# Then: ctr --address DIR/containerd.sock run --runtime io.containerd.vmrun.v1 ...
set -euo pipefail
STEP=containerd
source "$(dirname "$0")/lib.sh"
cmd="${1:-}"; dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: containerd.sh start|stop DIR [SHIM_DIR]"
case "$cmd" in
start)
    shim_dir="$(cd "${3:-$REPO/target/debug}" && pwd)"
    [ -x "$shim_dir/containerd-shim-vmrun-v1" ] ||
        die "$shim_dir/containerd-shim-vmrun-v1 is missing: cargo build -p containerd-shim-vmrun"
    if ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
        log "installing Debian's containerd"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containerd >/dev/null
        # The package's own service is not ours: leave the host's containerd as it was.
        systemctl disable --now containerd >/dev/null 2>&1 || true
    fi
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    cat > "$dir/config.toml" <<CONF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
  level = "info"
CONF
    PATH="$shim_dir:$PATH" setsid containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 < /dev/null &
    echo $! > "$dir/containerd.pid"
    for _ in $(seq 100); do
        [ -S "$dir/containerd.sock" ] && ctr --address "$dir/containerd.sock" version >/dev/null 2>&1 && exit 0
        sleep 0.2
    done
    tail -20 "$dir/containerd.log" >&2
    die "containerd did not answer on $dir/containerd.sock"
    ;;
stop)
    [ -d "$dir" ] || exit 0
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/containerd.pid" ]; then
        pid=$(cat "$dir/containerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    # Its shims outlive it by design (a restarted containerd reconnects to them); this one
    # is not coming back: end them, and with them their VMs.
    pkill -TERM -f -- "-address $dir/containerd.sock" 2>/dev/null || true
    for _ in $(seq 50); do pgrep -f -- "-address $dir/containerd.sock" >/dev/null || break; sleep 0.1; done
    pkill -KILL -f -- "-address $dir/containerd.sock" 2>/dev/null || true
    # Snapshot and bundle mounts, deepest first.
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$dir"
    ;;
*) die "unknown command $cmd (start or stop)" ;;
esac
