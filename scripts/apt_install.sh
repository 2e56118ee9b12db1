#!/bin/sh
# Install Debian packages for the test suite: scripts/apt_install.sh PACKAGE...
# Used by the ensure_* scripts, which call it only for what is missing, so a
# prepared machine never touches the network.
set -eu

if [ "$#" -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing Debian packages: $*; apt-get is not available: install them by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$@"
