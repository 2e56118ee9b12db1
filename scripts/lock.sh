#!/usr/bin/env bash
# Re-pin requirements/runtime.lock (what the image installs) and requirements/dev.lock (the
# development environment) from requirements/*.in, with hashes, for Python 3.11 on every
# platform. Versions already in a lock are kept unless UPGRADE=1 (then the newest allowed).
#
# uv, not pip-tools: one static binary (itself pinned in dev.lock) that resolves in a second
# and writes universal locks with every wheel's hash; installing needs only pip.
#
# Usage: scripts/lock.sh        (UPGRADE=1 scripts/lock.sh to move every pin forward)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
uv="${UV:-$root/.venv/bin/uv}"
cd "$root"
upgrade=()
if [ "${UPGRADE:-0}" = "1" ]; then
    upgrade=(--upgrade)
fi
for name in runtime dev; do
    "$uv" pip compile "requirements/$name.in" -o "requirements/$name.lock" \
        --generate-hashes --universal --python-version 3.11 --quiet \
        --custom-compile-command "make lock" \
        --no-emit-package imageshare-server \
        --no-emit-package imageshare-client \
        --no-emit-package imageshare-emulator \
        "${upgrade[@]}"
done
echo "wrote requirements/runtime.lock and requirements/dev.lock" >&2
