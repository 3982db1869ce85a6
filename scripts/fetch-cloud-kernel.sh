#!/usr/bin/env bash
# Fetches Debian's cloud kernel (without installing it) and prepares its
# module tree, for comparing boot times against Nexus's own kernel:
#   cargo run --release -p nexus-integration --bin bench-boot -- $(scripts/fetch-cloud-kernel.sh)
# Prints "--kernel PATH --modules DIR" on stdout. Idempotent.
set -euo pipefail
cache="${NEXUS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nexus}/cloud-kernel"
mkdir -p "$cache"
cd "$cache"
# Debian drops old kernel ABIs from its archive: resolve the current one.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -q >&2
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch-cloud-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
version=${pkg#linux-image-}
root="$cache/$version"
if [ ! -f "$root/lib/modules/$version/modules.dep" ]; then
    printf '==> fetching %s\n' "$pkg" >&2
    rm -rf "$root" ./*.deb
    (cd "$cache" && apt-get download "$pkg" >&2)
    dpkg-deb -x ./"$pkg"_*.deb "$root"
    depmod -b "$root" "$version"
fi
echo "--kernel $root/boot/vmlinuz-$version --modules $root/lib/modules/$version"
