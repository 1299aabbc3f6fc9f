# The two commands a fresh machine needs (see README):
#   make run    set up (idempotent) and start the service on ./data with the bundled model
#               (DEEPFEAT_HOST, DEEPFEAT_PORT, DEEPFEAT_DATA_DIR and every other DEEPFEAT_* setting apply)
#   make test   set up (idempotent, with the test extras and Chromium) and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
TEST_STAMP := $(VENV)/.installed-test-$(HASH)
LINT_PATHS := app models index scripts tests deepfeat/*.py

.PHONY: run test lint

$(PY):
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)

$(RUN_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e .
	rm -f $(VENV)/.installed-run-* && touch $@

$(TEST_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/deepfeat serve

test: $(TEST_STAMP)
	bash scripts/install_chromium.sh
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	# -X faulthandler: pytest hands its fault handler back at exit, so a crash in a native library's
	# teardown after the summary still prints every thread's Python stack.
	$(PY) -X faulthandler -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
