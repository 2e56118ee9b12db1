# syntax=docker/dockerfile:1
#
# imageshare-server image. Two stages: the builder resolves and installs everything into a
# virtualenv; the runtime stage copies only that venv onto a clean slim base, so no pip
# cache, build backend or source tree ships.
#
# PID 1: the JSON-form ENTRYPOINT runs the server itself as PID 1, without a shell or
# tini. That is safe because imageshare-server installs its own SIGTERM handler (the
# kernel would otherwise ignore SIGTERM for PID 1): it flips gRPC health to NOT_SERVING,
# drains for IMAGESHARE_GRACE_PERIOD seconds and exits. It spawns no child processes, so
# there are no zombies to reap.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, from the hash-checked lock only, so this layer survives source edits.
# Every runtime dependency ships as a manylinux wheel: no compiler is needed or installed.
COPY requirements/runtime.lock ./requirements/
RUN pip install --no-cache-dir --only-binary=:all: --require-hashes --no-deps \
        -r requirements/runtime.lock

# The server and the client distribution (its generated stubs), with --no-deps so nothing
# outside the lock can slip in; the emulator and the tests never enter the image. pip
# byte-compiles on install, so the read-only runtime image starts without writing .pyc
# files; pip itself is then removed from the venv because nothing at runtime installs.
COPY pyproject.toml README.md LICENSE ./
COPY server ./server
COPY clients/python ./clients/python
RUN pip install --no-cache-dir --no-deps ./clients/python . \
    && pip uninstall --yes pip

FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    IMAGESHARE_LISTEN=0.0.0.0:50051 \
    IMAGESHARE_METRICS_LISTEN=0.0.0.0:9464

COPY --from=builder /opt/venv /opt/venv

# Numeric IDs so Kubernetes' runAsNonRoot can verify them without an /etc/passwd entry.
USER 10001:10001
WORKDIR /tmp

EXPOSE 50051 9464
STOPSIGNAL SIGTERM

ENTRYPOINT ["imageshare-server"]

# Labels last: a new revision changes only this metadata step, never a layer above it.
# The base's name is the PYTHON_IMAGE the build used (make image passes a stand-in made
# from Debian packages where no registry is reachable).
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="imageshare-server" \
      org.opencontainers.image.description="gRPC service: who is a custom Alibaba Cloud ECS image shared with?" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# The commit the image was built from, exported as imageshare_build_info{revision}.
ENV IMAGESHARE_REVISION=${REVISION}
