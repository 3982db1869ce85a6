#!/usr/bin/env bash
# Builds (or reuses) the guest images: Nexus's microVM kernel, a static
# guest-mcp and init, and a root filesystem; each image has a manifest.
#   scripts/build-image.sh          target/images/minimal (busybox only) and
#                                   target/images/default (the agent's
#                                   computer: rootfs/recipes/default.toml)
#   scripts/build-image.sh OUT_DIR  only the default image, into OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
build() { cargo run --release --locked -q -p nexus-rootfs -- build "$@"; }
if [ -z "${1:-}" ]; then
    out="${NEXUS_IMAGE_DIR:-target/images/minimal}"
    printf '==> building the minimal image in %s (the first time compiles a kernel: ~5 min on 2 cores)\n' "$out" >&2
    build --out "$out" --name minimal
fi
out="${1:-target/images/default}"
printf '==> building the default image in %s (the first time downloads and installs Debian packages: a few minutes)\n' "$out" >&2
build --out "$out" --name default --recipe rootfs/recipes/default.toml
