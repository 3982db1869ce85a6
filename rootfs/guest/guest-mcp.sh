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
# After the environment: an image's Env cannot move guest-mcp's workdir,
# nor send traffic elsewhere than nexusd's egress proxy (the guest's only
# way out: 127.0.0.1:3128, spliced to vsock port 1026 on the host).
NEXUS_WORKDIR=/workspace
[ -r /etc/nexus/image.conf ] && . /etc/nexus/image.conf
export HTTP_PROXY=http://127.0.0.1:3128 HTTPS_PROXY=http://127.0.0.1:3128
export http_proxy="$HTTP_PROXY" https_proxy="$HTTPS_PROXY"
export NO_PROXY=localhost,127.0.0.1,::1 no_proxy=localhost,127.0.0.1,::1
export NODE_USE_ENV_PROXY=1
/bin/busybox mkdir -p /run/guest-mcp
exec /usr/sbin/guest-mcp --vm --listen vsock:1024 --control vsock:1023 --ready-port 1027 \
    --egress-listen 127.0.0.1:3128 --egress-port 1026 \
    --workdir "$NEXUS_WORKDIR" --process-state /run/guest-mcp/processes.json
