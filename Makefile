# The two commands a newcomer needs: `make run` and `make test`.
# Both create .venv and install the locked development environment when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LISTEN ?= 127.0.0.1:50051
METRICS_LISTEN ?= 127.0.0.1:9464
# pytest-xdist workers for make pytest: two per CPU, since the tests spend much of their
# time waiting on subprocesses, sockets and podman; a file stays on one worker.
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(2 * len(os.sched_getaffinity(0)))')
PACKAGES := pyproject.toml clients/python/pyproject.toml emulator/pyproject.toml

.PHONY: run test bootstrap check lint format typecheck proto proto-check pytest emulator lock \
	readme callers bench image image-test clean

# Third-party packages come only from the hash-checked lock; the three distributions of
# this repository are then installed editable, without dependencies of their own.
$(STAMP): $(PACKAGES) requirements/dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/dev.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation \
		-e ./clients/python -e . -e ./emulator
	touch $@

## run: start the server on the embedded ECS emulator at 127.0.0.1:50051
run: $(STAMP)
	$(BIN)/imageshare-server --emulator --listen $(LISTEN) --metrics-listen $(METRICS_LISTEN)

## emulator: start only the ECS emulator (demo data) at 127.0.0.1:8080
emulator: $(STAMP)
	$(BIN)/imageshare-emulator --listen 127.0.0.1:8080

## test: every check CI runs: system packages, lint, types, generated code, the test suite
## (which builds the image and runs it: tests/test_image.py, the same as make image-test)
test: bootstrap check pytest

## bootstrap: install the Debian packages the tests need, when missing (apt-get)
bootstrap:
	scripts/bootstrap.sh

check: lint typecheck proto-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP)
	$(BIN)/mypy

## proto: regenerate the Python stubs from protos/
proto: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH PYTHON=$(CURDIR)/$(BIN)/python scripts/gen_protos.sh

## proto-check: fail when the checked-in stubs differ from what protos/ generates
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	PATH=$(CURDIR)/$(BIN):$$PATH PYTHON=$(CURDIR)/$(BIN)/python scripts/gen_protos.sh $$tmp >/dev/null && \
	diff -r $$tmp/imageshare clients/python/imageshare -x __pycache__ && echo "generated code matches protos/" ; \
	rc=$$?; rm -rf $$tmp; exit $$rc

## pytest: the test suite on two workers per CPU (WORKERS=0: in this one process), with branch
## coverage of server, client and emulator, their subprocesses included (gate: 90%)
pytest: $(STAMP)
	rm -rf .coverage-data && mkdir -p .coverage-data
	$(BIN)/coverage run -m pytest --numprocesses $(WORKERS) --dist loadfile
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

## lock: re-pin requirements/*.lock with hashes (UPGRADE=1 to move every pin forward)
lock: $(STAMP)
	UV=$(CURDIR)/$(BIN)/uv scripts/lock.sh

## readme: regenerate the README's configuration table from the settings
readme: $(STAMP)
	$(BIN)/python scripts/update_readme_config.py

## callers: Go and Java stubs for callers in gen/ (Debian's protoc plugins, offline)
callers: $(STAMP) bootstrap
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/gen_callers.sh gen/

## image: build the image with podman (on a stand-in base from Debian packages, built once,
## where no registry is reachable; PYTHON_IMAGE=python:3.11.14-slim-bookworm for the official)
image: $(STAMP) bootstrap
	PYTHON=$(CURDIR)/$(BIN)/python scripts/image/build.sh

## image-test: build the image and run it as production does (read-only, no capabilities,
## UID 10001) against the emulator on the host; also part of make test
image-test: image
	$(BIN)/pytest tests/test_image.py

## bench: the façade benchmark (about a minute); see bench/README.md
bench: $(STAMP)
	$(BIN)/python bench/facade.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage-data
