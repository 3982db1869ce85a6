#!/usr/bin/env bash
# Installs everything needed and runs the whole test suite. This is what CI
# runs (.ci/run). Needs root: VMs, loop devices and /run/nexus.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

NEXUS_NEED_NEXTEST=1 scripts/install-deps.sh
scripts/build-image.sh

# The official Python MCP client, for tests with a real non-Rust client.
# Debian's python3 (not one under /root): tests also run the client as
# another local user.
MCP_PY_VERSION=2.3.0
if [ "$(readlink -f .venv/bin/python 2>/dev/null)" = "$(readlink -f /usr/bin/python3)" ] &&
    .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('mcp') != '$MCP_PY_VERSION')" 2>/dev/null; then
    printf '==> Python mcp %s: present in .venv\n' "$MCP_PY_VERSION" >&2
else
    printf '==> installing the Python mcp client %s into .venv\n' "$MCP_PY_VERSION" >&2
    rm -rf .venv
    /usr/bin/python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "mcp==$MCP_PY_VERSION"
fi

# The official MCP conformance suite (Node 22 from npm), run by mcp-host's tests.
scripts/install-conformance.sh

printf '==> cargo fmt --check\n' >&2
cargo fmt --all -- --check
printf '==> cargo clippy --all-targets -D warnings\n' >&2
cargo clippy --locked --workspace --all-targets -q -- -D warnings
printf '==> tests (VM tests boot real guests under QEMU)\n' >&2
# Here (as CI runs it, as root) a test that cannot run fails instead of
# skipping.
export NEXUS_NO_SKIP=1
cargo nextest run --locked --workspace --no-fail-fast
