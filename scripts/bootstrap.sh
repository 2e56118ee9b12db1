#!/bin/sh
# Install the Debian packages the checks and tests need, when they are missing; `make test`
# runs this first. Tests never install anything themselves: they find what is here.
#
#   redis-server                the Redis tests start their own on a free port
#   protoc and plugins, jars    Go and Java caller stubs (scripts/gen_callers.sh), compiled
#   prometheus                  promtool tests every alert; a real Prometheus scrapes the server
#                               and evaluates every dashboard and rule expression
#
# A prepared machine does not touch the network.
set -eu

missing=""
need() {  # need PACKAGE CHECK...: add PACKAGE when the check fails
    package=$1
    shift
    "$@" >/dev/null 2>&1 || missing="$missing $package"
}

need redis-server command -v redis-server
need prometheus sh -c 'command -v prometheus && command -v promtool'
need protobuf-compiler command -v protoc
need protoc-gen-go command -v protoc-gen-go
need protoc-gen-go-grpc command -v protoc-gen-go-grpc
need protobuf-compiler-grpc-java-plugin test -x /usr/bin/grpc_java_plugin
need libprotobuf-java test -f /usr/share/java/protobuf.jar
need libgrpc-java test -f /usr/share/java/grpc-stub.jar
need libgeronimo-annotation-1.3-spec-java test -f /usr/share/java/geronimo-annotation-1.3-spec.jar
need libguava-java test -f /usr/share/java/guava.jar

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
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
