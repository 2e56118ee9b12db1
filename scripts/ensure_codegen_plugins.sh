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

# shellcheck disable=SC2086
exec "$(dirname "$0")/apt_install.sh" $missing
