#!/usr/bin/env bash
# Build the imageshare-server image from the Dockerfile with podman (make image). The image
# ID goes to stdout, progress and timings to stderr.
#
#   scripts/image/build.sh
#       on a stand-in for python:3.11-slim-bookworm made from Debian packages, for machines
#       that reach no container registry (the project's machines and CI): mmdebstrap's
#       bookworm minbase with python3.11, imported into podman, built once and cached
#   PYTHON_IMAGE=python:3.11.14-slim-bookworm scripts/image/build.sh
#       on the official base (the Dockerfile's default), pulled when missing
#
# Every step is cached: a second run with nothing changed takes seconds and gives the same
# image ID. VERSION comes from the installed package metadata (PYTHON, the venv's python),
# REVISION and CREATED from git, so the labels are the same for the same commit.
# IMAGE names the result (default imageshare-server, tagged VERSION and latest).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/scripts/image
# Rootful podman here cannot raise the container's rlimits: see containers.conf.
export CONTAINERS_CONF=$here/containers.conf
image=${IMAGE:-imageshare-server}
py=${PYTHON:-$root/.venv/bin/python}
suite=bookworm
packages=python3.11,python3.11-venv,ca-certificates
ca_bundle=/etc/ssl/certs/ca-certificates.crt

for tool in podman mmdebstrap flock; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "$tool is missing: run make bootstrap" >&2
        exit 1
    fi
done

# One build at a time on the machine: the stand-in base is made once, and two cores do
# better with one build than with two.
exec 9>"${TMPDIR:-/tmp}/imageshare-image-build.lock"
flock 9

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

version=$("$py" -c 'import importlib.metadata as m; print(m.version("imageshare-server"))')
revision=unknown
created=unknown
if git -C "$root" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    revision=$(git -C "$root" rev-parse HEAD)
    created=$(git -C "$root" log -1 --format=%cI HEAD)
    # Edits to what the build copies make the revision "-dirty".
    if [ -n "$(git -C "$root" status --porcelain -- Dockerfile .dockerignore \
            requirements/runtime.lock pyproject.toml README.md LICENSE server clients/python)" ]; then
        revision=$revision-dirty
    fi
fi

seconds() { echo $(($(date +%s) - $1)); }

if [ -n "${PYTHON_IMAGE:-}" ]; then
    base=$PYTHON_IMAGE
    pull=--pull=missing
else
    # The tag names the recipe, so a changed recipe makes a new base and an unchanged one
    # is never rebuilt.
    recipe=$( (echo "mmdebstrap --variant=minbase --include=$packages $suite"
        cat "$here/standin.Containerfile") | sha256sum | cut -c1-12)
    base=localhost/imageshare-python-standin:3.11-$suite-$recipe
    pull=--pull=never
    if podman image exists "$base"; then
        echo "base: $base (cached)" >&2
    else
        started=$(date +%s)
        echo "base: making $base with mmdebstrap (about a minute)" >&2
        mmdebstrap --quiet --variant=minbase --include="$packages" "$suite" "$work/rootfs.tar" >&2
        rootfs=localhost/imageshare-standin-rootfs:$recipe
        podman import --quiet "$work/rootfs.tar" "$rootfs" >/dev/null
        rm -f "$work/rootfs.tar"
        mkdir "$work/context"
        podman build --quiet --pull=never --build-arg ROOTFS="$rootfs" \
            -f "$here/standin.Containerfile" -t "$base" "$work/context" >/dev/null
        podman untag "$rootfs"
        echo "base: made $base in $(seconds "$started") s" >&2
    fi
fi

# The package index is reached through a TLS-inspecting proxy on the project's machines:
# pip in the build trusts what the host trusts (the bundle is mounted, never copied).
volumes=()
if [ -f "$ca_bundle" ]; then
    volumes=(--volume "$ca_bundle:$ca_bundle:ro")
fi

# The labels go on the command line as well as through the build arguments: buildah 1.28
# (Debian's podman 4.3) keys its layer cache on the unexpanded LABEL instruction, so a new
# REVISION alone would get the previous build's labels (and ENV) back from the cache.
started=$(date +%s)
podman build "$pull" "${volumes[@]}" \
    --build-arg PYTHON_IMAGE="$base" \
    --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" \
    --build-arg CREATED="$created" \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$revision" \
    --label org.opencontainers.image.created="$created" \
    --label org.opencontainers.image.base.name="$base" \
    --env IMAGESHARE_REVISION="$revision" \
    --iidfile "$work/iid" \
    -t "$image:$version" -t "$image:latest" \
    -f "$root/Dockerfile" "$root" >&2
id=$(cat "$work/iid")
size=$(podman image inspect --format '{{.Size}}' "$id")
echo "image: $image:$version ($id) built in $(seconds "$started") s, $((size / 1000000)) MB" >&2
echo "$id"
