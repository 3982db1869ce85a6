#!/usr/bin/env bash
# Builds (or reuses) the default guest image: Nexus's microVM kernel, a
# busybox root filesystem with a static guest-mcp, and the manifest; and,
# unless OUT_DIR is given, the Debian userland image beside it.
# Usage: scripts/build-image.sh [OUT_DIR]   (default: target/images/default)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
out="${1:-${NEXUS_IMAGE_DIR:-target/images/default}}"
printf '==> building the guest image in %s (the first time compiles a kernel: ~5 min on 2 cores)\n' "$out" >&2
cargo run --release --locked -q -p nexus-rootfs -- build --out "$out"
# The Debian userland of rootfs/recipes/default.toml (the first time
# downloads and installs Debian packages: a few minutes; then cached).
if [ -z "${1:-}" ]; then
    printf '==> building the userland image in target/images/userland\n' >&2
    cargo run --release --locked -q -p nexus-rootfs -- build --out target/images/userland \
        --name userland --recipe rootfs/recipes/default.toml
fi
