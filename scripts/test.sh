#!/usr/bin/env bash
# Installs everything needed and runs the whole test suite. This is what CI
# runs (.ci/run). Needs root: VMs, loop devices and /run/nexus.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

NEXUS_NEED_NEXTEST=1 scripts/install-deps.sh
scripts/build-image.sh

printf '==> cargo fmt --check\n' >&2
cargo fmt --all -- --check
printf '==> cargo clippy --all-targets -D warnings\n' >&2
cargo clippy --locked --workspace --all-targets -q -- -D warnings
printf '==> tests (VM tests boot real guests under QEMU)\n' >&2
cargo nextest run --locked --workspace --no-fail-fast
