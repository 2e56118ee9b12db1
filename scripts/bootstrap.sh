#!/bin/sh
# Install the Debian packages the checks and tests need, when they are missing; `make test`
# runs this first. Tests never install anything themselves: they find what is here.
#
#   redis-server                the Redis tests start their own on a free port
#   protoc and plugins, jars    Go and Java caller stubs (scripts/gen_callers.sh), compiled
#   Go, grpc-go and its deps    clients/go, built offline in GOPATH mode (/usr/share/gocode)
#   JDK, grpc-java's runtime    clients/java: netty, perfmark, gson, common protos
#   podman, runc, mmdebstrap    make image: the build, and its stand-in base without a registry
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
need openjdk-17-jdk-headless command -v javac
need libnetty-java test -f /usr/share/java/netty-codec-http2.jar
need libperfmark-java test -f /usr/share/java/perfmark-api.jar
need libgoogle-gson-java test -f /usr/share/java/gson.jar
need libgoogle-common-protos-java test -f /usr/share/java/proto-google-common-protos.jar
need golang-go command -v go
gocode=/usr/share/gocode/src
need golang-google-grpc-dev test -d $gocode/google.golang.org/grpc
need golang-google-protobuf-dev test -d $gocode/google.golang.org/protobuf
need golang-google-genproto-dev test -d $gocode/google.golang.org/genproto/googleapis/rpc
need golang-github-golang-protobuf-1-5-dev test -d $gocode/github.com/golang/protobuf
need podman command -v podman
need runc command -v runc
need mmdebstrap command -v mmdebstrap

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
# Another apt-get on the machine holds the lock for a while: wait for it instead of failing.
lock="-o DPkg::Lock::Timeout=600"
# shellcheck disable=SC2086
$SUDO apt-get $lock update -qq
# shellcheck disable=SC2086
$SUDO apt-get $lock install -y -qq --no-install-recommends $missing
