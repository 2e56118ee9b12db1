#!/usr/bin/env bash
# Regenerate the Python stubs from protos/ into clients/python/imageshare/.
# Deterministic for the grpcio-tools and mypy-protobuf versions pinned in
# pyproject.toml: `make proto-check` regenerates into a scratch folder and
# fails when the checked-in files differ.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/clients/python}
py=${PYTHON:-python}
mkdir -p "$out"
cd "$root/protos"
protos=$(find imageshare -name '*.proto' | LC_ALL=C sort)
# shellcheck disable=SC2086
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  $protos
for d in $(find imageshare -type d | LC_ALL=C sort); do
  : > "$out/$d/__init__.py"
  : > "$out/$d/py.typed"
done
