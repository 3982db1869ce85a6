#!/bin/sh
# Started, and restarted whenever it exits, by init. guest-mcp itself stays
# out of /workspace (so the host can unmount it for a rollback); commands
# it runs start there.
cd /
mkdir -p /run/guest-mcp
exec /usr/sbin/guest-mcp --vm --listen vsock:1024 --control vsock:1023 --ready-port 1027 \
    --workdir /workspace --process-state /run/guest-mcp/processes.json
