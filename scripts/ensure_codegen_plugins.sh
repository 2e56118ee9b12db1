#!/bin/sh
# Make sure the code generators used by scripts/gen_callers.sh are installed:
# Debian's protoc-gen-go, protoc-gen-go-grpc, grpc-java plugin and protoc (the
# Java message generator), plus the protobuf-java and grpc-java jars (and
# javax.annotation.Generated, which the grpc-java stubs carry) so the Java stubs
# can be compiled to prove they are usable. Installs only what is missing, so
# a prepared machine does not touch the network.
set -eu

missing=""
command -v protoc >/dev/null 2>&1 || missing="$missing protobuf-compiler"
command -v protoc-gen-go >/dev/null 2>&1 || missing="$missing protoc-gen-go"
command -v protoc-gen-go-grpc >/dev/null 2>&1 || missing="$missing protoc-gen-go-grpc"
[ -x /usr/bin/grpc_java_plugin ] || missing="$missing protobuf-compiler-grpc-java-plugin"
[ -f /usr/share/java/protobuf.jar ] || missing="$missing libprotobuf-java"
[ -f /usr/share/java/grpc-stub.jar ] || missing="$missing libgrpc-java"
[ -f /usr/share/java/geronimo-annotation-1.3-spec.jar ] ||
    missing="$missing libgeronimo-annotation-1.3-spec-java"
[ -f /usr/share/java/guava.jar ] || missing="$missing libguava-java"

if [ -z "$missing" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing Debian packages:$missing; apt-get is not available: install them by hand" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
