#!/bin/sh
# Make sure redis-server is on PATH for tests/test_redis.py (the tests start
# their own throwaway server on a free loopback port; nothing is left running).
# Installs Debian's redis-server package when it is missing.
set -eu

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
"$(dirname "$0")/apt_install.sh" redis-server
# The package starts a system service on 6379 where systemd runs; the tests do not use it.
redis-server --version
