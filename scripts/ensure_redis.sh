#!/bin/sh
# Make sure redis-server is on PATH for tests/test_redis.py (the tests start
# their own throwaway server on a free loopback port; nothing is left running).
# Installs Debian's redis-server package when it is missing.
set -eu

if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing and apt-get is not available: install Redis >= 6 by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server
# The package starts a system service on 6379 where systemd runs; the tests do not use it.
redis-server --version
