#!/usr/bin/env bash
# Generate Go and Java caller stubs from protos/ into OUTDIR/go and OUTDIR/java
# without the Buf Schema Registry: buf.gen.yaml's remote plugins need it, the
# Debian plugins (make bootstrap) do not.
#
# Go uses the protoc bundled with grpcio-tools, the compiler that produces the
# Python stubs. Java cannot: that protoc has no built-in Java generator, and
# Java message code only compiles against the protobuf-java runtime of the
# same release, so Java messages come from Debian's protoc (3.21), which
# matches Debian's libprotobuf-java and grpc-java (1.41) jars.
#
#   scripts/gen_callers.sh OUTDIR
#
# Go files land at the proto's go_package path relative to OUTDIR/go
# (paths=source_relative, i.e. go/imageshare/v1/*.pb.go); Java files under
# the java_package (java/com/imageshare/v1/). OUTDIR/go and OUTDIR/java are
# emptied first so the output depends only on the proto and the plugin versions.
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
py=${PYTHON:-$root/.venv/bin/python}
if [ ! -x "$py" ]; then
  py=python3
fi
java_plugin=${GRPC_JAVA_PLUGIN:-/usr/bin/grpc_java_plugin}

for tool in protoc protoc-gen-go protoc-gen-go-grpc; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$tool is missing: run make bootstrap" >&2
    exit 1
  fi
done
if [ ! -x "$java_plugin" ]; then
  echo "$java_plugin is missing: run make bootstrap" >&2
  exit 1
fi

# google/protobuf/*.proto (timestamp, duration) ship inside grpc_tools.
wkt=$("$py" -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

rm -rf "$out/go" "$out/java"
mkdir -p "$out/go" "$out/java"
cd "$root/protos"
protos=$(find . -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)
# shellcheck disable=SC2086
"$py" -m grpc_tools.protoc -I . -I "$wkt" \
  --go_out="$out/go" --go_opt=paths=source_relative \
  --go-grpc_out="$out/go" --go-grpc_opt=paths=source_relative \
  $protos
# shellcheck disable=SC2086
protoc -I . -I "$wkt" \
  --java_out="$out/java" \
  --plugin=protoc-gen-grpc-java="$java_plugin" --grpc-java_out="$out/java" \
  $protos
