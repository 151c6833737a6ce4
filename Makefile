# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make run    venv + install, local Postgres/Valkey if DATABASE_URL/VALKEY_URL are unset, serve
#   make test   lint, proto check and the whole suite against real Postgres and Valkey
# What is installed comes from uv.lock alone (exact versions and hashes); `make lock` and
# `make upgrade` change it on purpose.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# uv itself, pinned by hash in requirements/uv.txt, in a venv of its own.
TOOLS := .tools
UV := $(TOOLS)/bin/uv
# uv uses the Python given, never one it would download.
export UV_PYTHON_DOWNLOADS := never
PROTO_OUT := availability/v1
PROTOS := $(wildcard protos/availability/v1/*.proto)

NODE_CLIENT := clients/node
NODE_STAMP := $(NODE_CLIENT)/node_modules/.installed

.PHONY: docs run reset test check test-node lint protos check-protos check-wire install lock upgrade image image-base clean bench bench-quick chaos chaos-cluster soak

$(UV): requirements/uv.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --require-hashes --no-deps -r requirements/uv.txt
	touch $(UV)

# --locked: refuses to run when pyproject.toml and uv.lock disagree (run make lock).
$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --quiet --locked --extra dev --python $(PYTHON)
	touch $(STAMP)

install: $(STAMP)

# After editing pyproject.toml: re-resolve, keeping every pin that still fits.
lock: $(UV)
	$(UV) lock

# Move pins forward on purpose and print what moved: all of them, or PACKAGE=name only.
# Then `make protos` if grpcio-tools moved, and `make test`.
upgrade: $(UV)
	$(UV) lock $(if $(PACKAGE),--upgrade-package $(PACKAGE),--upgrade)

run: $(STAMP)
	$(BIN)/availability dev

# make run from a fresh demo: empties the demo database's tables and the mirror's keys first.
reset: $(STAMP)
	$(BIN)/availability dev --reset

# Regenerate the committed Python code and typed stubs from protos/.
protos: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)

# docs/api/reference.md from the protos' comments, docs/configuration.md from the CLI parser
# and Settings; tests/test_docs.py fails when they are out of date.
docs: $(STAMP)
	$(BIN)/python -m tools.api_reference
	$(BIN)/python -m tools.configuration

# Fails when protos/ and the committed generated code disagree.
check-protos: $(STAMP)
	@rm -rf build/protos-check && mkdir -p build/protos-check
	@PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=build/protos-check --grpc_python_out=build/protos-check \
		--mypy_out=build/protos-check --mypy_grpc_out=build/protos-check $(PROTOS)
	@for f in build/protos-check/$(PROTO_OUT)/*; do \
		diff -q $$f $(PROTO_OUT)/$$(basename $$f) >/dev/null || \
		{ echo "$(PROTO_OUT)/$$(basename $$f) is out of date: run make protos"; exit 1; }; \
	done
	@echo "generated code matches protos/"

lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/ruff check availability tests bench examples tools
	$(BIN)/ruff format --check availability tests bench examples tools
	$(BIN)/mypy availability examples tools

# The wire contract (protos/) against the last release in releases.toml: fields and RPCs may
# be added, never renumbered, renamed or retyped.
PREVIOUS_RELEASE = $(shell sed -n 's/^commit = "\(.*\)"$$/\1/p' releases.toml | tail -n 1)
check-wire: $(STAMP)
	$(BIN)/buf breaking --against '.git#ref=$(PREVIOUS_RELEASE)'
	@echo "protos/ keep the wire contract of $(PREVIOUS_RELEASE)"

# The whole suite in 6 pytest-xdist workers on 2 cores (most tests wait on servers, not the
# CPU: the CPU is about half busy), a test file to a worker, each worker with its own
# database, key prefixes and ports; the files with a slow test start first, longest first
# (`slow(seconds=N)`; --no-loadscope-reorder keeps that order, which xdist would otherwise
# replace by the number of tests a file has), the Node client's suite among them
# (tests/test_node_client.py). TEST_WORKERS=0 runs it serially. xdist's loadgroup does not
# group under pytest 9 (checked), so loadfile.
TEST_WORKERS ?= 6
PYTEST_PARALLEL = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
# The suite's temporary folders live under build/, not pytest's shared /tmp/pytest-of-$USER,
# whose mode every pytest that starts resets to 0700: a local Postgres started as the postgres
# account (make test as root) could then no longer reach its own data directory.
PYTEST_TEMP := --basetemp=build/pytest
# The tests marked `alone` compare latencies within one run: in parallel, the other workers'
# bursts would be in their numbers, so they run after the rest, by themselves.
test: lint check-protos check-wire $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_TEMP) --durations=15 \
		$(if $(PYTEST_PARALLEL),-m "not alone")
	$(if $(PYTEST_PARALLEL),$(BIN)/python -m pytest --basetemp=build/pytest-alone -m alone -q)

# The inner loop (under 90 s): lint, types, the proto and wire checks, and every test that
# needs no Postgres, Valkey or server. Run it while you work; make test before you push.
check: lint check-protos check-wire
	$(BIN)/python -m pytest --no-servers -q -n 2 $(PYTEST_TEMP)

$(NODE_STAMP): $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

# The Node.js client (clients/node): generated from protos/ by buf and ts-proto (both from
# package-lock.json, no Python), compiled to ESM and CJS, and its tests (node --test) against
# a real `availability serve` from the venv, the packed tarball's included. `make test` runs
# the same through tests/test_node_client.py, beside the Python tests.
test-node: $(STAMP) $(NODE_STAMP)
	cd $(NODE_CLIENT) && npm run --silent build && npm test

# Figures next to the seed's methods, written to bench/RESULTS.md and bench/latency.png.
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

# Mixed load while Valkey is killed, restarted, restored from an older snapshot and flushed, a
# newer layout runs beside and is rolled back, and Postgres restarts (bench/CHAOS.md); then the
# same with a Sentinel failover (bench/CHAOS-sentinel.md). Both run; fails if either found a problem.
chaos: $(STAMP)
	status=0; $(BIN)/python -m bench.chaos || status=1; \
	$(BIN)/python -m bench.chaos --sentinel || status=1; exit $$status

# The same with Valkey as a local Valkey Cluster, whose slot master is killed; writes bench/CHAOS-cluster.md.
chaos-cluster: $(STAMP)
	$(BIN)/python -m bench.chaos --cluster

# Realistic mixed load for SOAK_MINUTES (60), a store fault every SOAK_FAULT_EVERY seconds (240),
# resources and p99 sampled every SOAK_SAMPLE_SECONDS (60); writes bench/SOAK.md and
# bench/soak.png, fails on a leak, a broken invariant or a p99 that does not come back.
# Not in `make test` (tests/test_soak.py runs a 2-minute version there).
soak: $(STAMP)
	$(BIN)/python -m bench.soak

# The container image (Containerfile), tagged with pyproject's version. The build context is
# build/image: the runtime wheels uv.lock names (hashes checked) and the service's wheel
# stamped with its commit, so the build itself needs no network. BASE overrides the
# Containerfile's base image; CONTAINER_FLAGS go to `build` (Podman on this kind of machine:
# "--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024").
VERSION = $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= availability:$(VERSION)
CONTAINER ?= $(shell command -v podman || command -v docker)
CONTAINER_FLAGS ?=
BASE ?=
IMAGE_CONTEXT := build/image
image: $(STAMP)
	rm -rf $(IMAGE_CONTEXT) && mkdir -p $(IMAGE_CONTEXT)/src $(IMAGE_CONTEXT)/wheels
	git ls-files -z --cached --others --exclude-standard | xargs -0 sh -c \
		'for f; do [ -f "$$f" ] && cp --parents "$$f" $(IMAGE_CONTEXT)/src; done' copy
	$(BIN)/python -c 'from availability.version import commit; print(commit())' \
		>$(IMAGE_CONTEXT)/src/availability/COMMIT
	$(UV) build --quiet --wheel --out-dir $(IMAGE_CONTEXT)/wheels $(IMAGE_CONTEXT)/src
	$(UV) export --quiet --frozen --no-dev --no-emit-project --format requirements-txt \
		-o $(IMAGE_CONTEXT)/requirements.txt
	# Every wheel any Python 3.11 may need (markers dropped: pip in the image decides).
	sed -E 's/ ;[^\\]*\\$$/ \\/' $(IMAGE_CONTEXT)/requirements.txt >$(IMAGE_CONTEXT)/all.txt
	$(TOOLS)/bin/pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		--python-version 3.11 --implementation cp --platform manylinux2014_$(shell uname -m) \
		--platform manylinux_2_28_$(shell uname -m) --platform any \
		-r $(IMAGE_CONTEXT)/all.txt -d $(IMAGE_CONTEXT)/wheels
	$(CONTAINER) build $(CONTAINER_FLAGS) $(if $(BASE),--build-arg BASE=$(BASE)) \
		--label org.opencontainers.image.version=$(VERSION) -t $(IMAGE) \
		-f Containerfile $(IMAGE_CONTEXT)

# A Python 3.11 base made from Debian's packages, for machines that reach no image registry
# (the image test uses it): `make image BASE=$(LOCAL_BASE)`.
LOCAL_BASE := localhost/availability-base:bookworm
image-base:
	$(CONTAINER) image exists $(LOCAL_BASE) || { \
		mkdir -p build && rm -f build/base.tar && \
		mmdebstrap --quiet --variant=minbase --include=python3,python3-venv bookworm build/base.tar && \
		$(CONTAINER) import build/base.tar $(LOCAL_BASE) && rm build/base.tar; }

clean:
	rm -rf $(VENV) $(TOOLS) build .data $(NODE_CLIENT)/node_modules $(NODE_CLIENT)/dist $(NODE_CLIENT)/build $(NODE_CLIENT)/src/gen
