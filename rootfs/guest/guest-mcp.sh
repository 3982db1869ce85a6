#!/bin/sh
# Started, and restarted whenever it exits, by init.
cd /workspace 2>/dev/null || cd /
exec /usr/sbin/guest-mcp --vm --listen vsock:1024 --control vsock:1023 --ready-port 1027
