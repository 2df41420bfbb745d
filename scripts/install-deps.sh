#!/usr/bin/env bash
# Installs what building and testing vmrun needs on a fresh Debian bookworm machine (as root).
set -euo pipefail
pkgs=(linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils
      mmdebstrap erofs-utils e2fsprogs file tmux busybox-static python3 containerd)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "[deps] installing: ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # containerd is for the shim's tests, which start a private one (scripts/containerd.sh):
    # the package's system service is not started for them.
    case " ${missing[*]} " in
        *" containerd "*) $SUDO systemctl disable --now containerd >/dev/null 2>&1 || true ;;
    esac
fi
command -v cargo >/dev/null || { echo "[deps] cargo is missing: install Rust (rustup)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true
echo "[deps] ok" >&2
