#!/usr/bin/env bash
# Installs everything needed, builds the default guest image into nexusd's
# state directory and runs nexusd on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
state_dir="${NEXUS_STATE_DIR:-/var/lib/nexus}"

scripts/install-deps.sh
scripts/build-image.sh "$state_dir/images/default"
printf '==> building and starting nexusd\n' >&2
printf '==> HTTP clients: Authorization: Bearer $(cat %s/admin.token) (written at the first start)\n' "$state_dir" >&2
cargo build --release --locked -q -p nexus-host --bin nexusd
exec target/release/nexusd serve --state-dir "$state_dir" "$@"
