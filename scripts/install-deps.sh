#!/usr/bin/env bash
# Installs everything Nexus needs on Debian 12, as root. Idempotent: a second
# run checks and installs nothing.
set -euo pipefail

step() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install-deps: %s\n' "$*" >&2; exit 1; }

VHOST_VSOCK_VERSION=0.3.0
PACKAGES=(
    qemu-system-x86              # the QEMU microvm backend
    btrfs-progs e2fsprogs        # the storage pool and ext4 drives
    busybox-static cpio xz-utils gzip binutils  # guest images
    mmdebstrap                   # Debian userlands for guest images
    linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev  # the guest kernel
    python3 python3-venv         # tests with the Python MCP client
    kmod                         # depmod, for supplied modular kernels
    pkg-config ca-certificates
)

[ "$(id -u)" -eq 0 ] || die "run as root (it installs Debian packages and needs /dev, /run)"

# For the test suite only (scripts/test.sh): an OCI registry the tests
# start on loopback for pull_image, and skopeo to fill it.
if [ "${NEXUS_NEED_NEXTEST:-0}" = 1 ]; then
    PACKAGES+=(docker-registry skopeo)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
    step "Debian packages: all present"
fi
# Debian's docker-registry enables a service on port 5000 of every
# interface: the tests start their own on loopback, so it is turned off.
if [ "${NEXUS_NEED_NEXTEST:-0}" = 1 ] && command -v systemctl >/dev/null &&
    systemctl is-enabled docker-registry >/dev/null 2>&1; then
    step "turning off Debian's docker-registry service (the tests run their own on loopback)"
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"

if vhost-device-vsock --version 2>/dev/null | grep -qx "vhost-device-vsock $VHOST_VSOCK_VERSION"; then
    step "vhost-device-vsock $VHOST_VSOCK_VERSION: present"
else
    step "building vhost-device-vsock $VHOST_VSOCK_VERSION (about a minute)"
    cargo install --locked vhost-device-vsock --version "$VHOST_VSOCK_VERSION"
fi

if [ "${NEXUS_NEED_NEXTEST:-0}" = 1 ]; then
    if cargo nextest --version >/dev/null 2>&1; then
        step "cargo-nextest: present"
    else
        step "building cargo-nextest (a few minutes)"
        cargo install --locked cargo-nextest
    fi
fi
