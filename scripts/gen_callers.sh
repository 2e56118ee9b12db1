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
# the java_package (java/com/imageshare/v1/).
#
# OUTDIR/java-debian holds what a Java caller on Debian's jars needs besides:
# com.google.rpc error details (Debian's proto-google-common-protos 1.16 predates
# ErrorInfo; put these classes ahead of that jar) and io.grpc.health.v1 stubs
# (Debian has no grpc-services). They come from the error_details.proto that
# googleapis-common-protos ships and the descriptor grpcio-health-checking
# ships; a caller on Maven Central's current artifacts needs neither.
#
# OUTDIR/go, OUTDIR/java and OUTDIR/java-debian are emptied first so the output
# depends only on the protos and the plugin versions.
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

rm -rf "$out/go" "$out/java" "$out/java-debian"
mkdir -p "$out/go" "$out/java" "$out/java-debian"
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

# What Debian's jars lack (see above). health.proto is not shipped as a file: protoc reads
# the file descriptor grpcio-health-checking carries.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
googleapis=$("$py" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("google.rpc.error_details_pb2")
print(pathlib.Path(spec.origin).parents[2])')
"$py" -c 'import sys
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2
files = descriptor_pb2.FileDescriptorSet()
files.file.add().ParseFromString(health_pb2.DESCRIPTOR.serialized_pb)
sys.stdout.buffer.write(files.SerializeToString())' >"$tmp/health.pb"
protoc -I "$googleapis" -I "$wkt" --java_out="$out/java-debian" google/rpc/error_details.proto
protoc --descriptor_set_in="$tmp/health.pb" --java_out="$out/java-debian" \
  --plugin=protoc-gen-grpc-java="$java_plugin" --grpc-java_out="$out/java-debian" \
  grpc_health/v1/health.proto
