# dsec-rl: the one documented way to set up, build, test, lint and benchmark.
# Every target sets up what it needs from nothing (a venv in .venv, pinned by requirements.txt).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
# CPU-only defaults (PLATFORM.md §9); a GPU machine unsets TRITON_INTERPRET.
export TRITON_INTERPRET ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

RUST_SOURCES := $(shell find dsec/rust policy/rust -name '*.rs' -o -name '*.py' -o -name Cargo.toml 2>/dev/null) Cargo.toml Cargo.lock

.DEFAULT_GOAL := help

.PHONY: help
help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.deps: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.build: $(VENV)/.deps $(RUST_SOURCES)
	$(VENV)/bin/maturin develop --release -q
	# The policy's CPU kernels: a plain C-ABI library loaded by policy.kernels.cpu_indexer.
	# `install` replaces the file (a new inode), so a process that has the old one loaded keeps it.
	cargo build --release -q -p policy-kernels
	install -m 755 target/release/libv4cpu.so policy/kernels/_v4cpu.so
	@touch $@

.PHONY: setup
setup: $(VENV)/.build ## create .venv, install pinned dependencies, build the Rust extension

.PHONY: build
build: $(VENV)/.build ## (re)build the Rust extension into .venv

# Each `make demo` writes a new run directory (the notebook opens the newest under runs/);
# `make demo DEMO_OUT=runs/x DEMO_ARGS=--resume` continues an interrupted one.
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo
demo: setup ## set up and run the main job: SFT warm start then GRPO on arith_tool (embedded Ray)
	$(PY) -m rollout run configs/demo.toml --out $(DEMO_OUT) $(DEMO_ARGS)

.PHONY: lint
lint: $(VENV)/.deps ## ruff, rustfmt --check, clippy -D warnings
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --release -q -- -D warnings

.PHONY: fmt
fmt: $(VENV)/.deps ## format Python and Rust sources
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	cargo fmt --all

.PHONY: test
test: setup lint ## set up, lint, then cargo test + pytest
	# The Rust unit tests are dsec-core's: a debug build of that crate alone compiles in about
	# 15 s, where `--workspace --release` rebuilds pyo3 and LTO for the test harness (about 60 s).
	# clippy --all-targets (lint) already compiles every crate's tests.
	cargo test -p dsec-core -p policy-kernels -q
	$(PY) -m pytest -q $(PYTEST_ARGS)

.PHONY: bench
bench: setup ## run the benchmarks (tables printed, JSON under bench/results/)
	$(PY) bench/sandbox.py
	$(PY) bench/kv_memory.py
	$(PY) bench/engine.py
	$(PY) bench/engine_sessions.py
	$(PY) bench/rollout.py
	$(PY) bench/attention.py
	$(PY) bench/numerics.py
# bench/long_context.py (tens of minutes: 128K-token prefills) runs on its own.

.PHONY: clean
clean: ## remove build outputs (keeps .venv)
	cargo clean
	rm -f $(VENV)/.build policy/kernels/_v4cpu.so
