#!/bin/busybox sh
# Started, and restarted whenever it exits, by init. guest-mcp itself stays
# out of /workspace (so the host can unmount it for a rollback); commands
# it runs start there.
# The image's environment (its recipe's `env`) is every command's. Static
# busybox's shell, as in rcS: it starts at every boot and restart.
cd /
if [ -r /etc/nexus/environment ]; then
    set -a
    . /etc/nexus/environment
    set +a
fi
# After the environment: an image's Env cannot move guest-mcp's workdir.
NEXUS_WORKDIR=/workspace
[ -r /etc/nexus/image.conf ] && . /etc/nexus/image.conf
/bin/busybox mkdir -p /run/guest-mcp
exec /usr/sbin/guest-mcp --vm --listen vsock:1024 --control vsock:1023 --ready-port 1027 \
    --workdir "$NEXUS_WORKDIR" --process-state /run/guest-mcp/processes.json
