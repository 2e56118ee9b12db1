#!/usr/bin/env bash
# Build clients/go into OUTDIR/imageshare-caller, offline, with Debian's Go packages
# (make bootstrap: golang-go 1.19, golang-google-grpc-dev 1.33, golang-google-protobuf-dev,
# golang-google-genproto-dev, golang-github-golang-protobuf-1-5-dev).
#
#   clients/go/build.sh OUTDIR
#
# GOPATH mode: Debian installs Go sources under /usr/share/gocode and there is no module
# proxy. The stubs come from scripts/gen_callers.sh (into OUTDIR/gen) and sit at their
# go_package import path, imageshare/gen/go/imageshare/v1, in a GOPATH of their own.
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

"$root/scripts/gen_callers.sh" "$out/gen"

gopath=$out/gopath
rm -rf "$gopath"
mkdir -p "$gopath/src/imageshare/gen/go/imageshare" "$gopath/src/imageshare/caller"
cp -R "$out/gen/go/imageshare/v1" "$gopath/src/imageshare/gen/go/imageshare/"
cp "$root/clients/go/main.go" "$gopath/src/imageshare/caller/"

export GO111MODULE=off GOFLAGS="" GOPATH="$gopath:/usr/share/gocode"
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
    export GOCACHE=$out/go-build-cache
fi
cd "$gopath/src/imageshare/caller"
go build -o "$out/imageshare-caller" .
