# The two commands a fresh machine needs (see README):
#   make run    set up (idempotent) and start the service on ./data with the bundled model
#   make test   set up (idempotent, with test extras and Chromium) and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint setup

$(PY):
	python3.11 -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/deepfeat serve --data-dir $${DEEPFEAT_DATA_DIR:-data} --host $(HOST) --port $(PORT)

test: $(STAMP)
	bash scripts/install_chromium.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check app models index scripts tests
	$(VENV)/bin/ruff format --check app models index scripts tests
	$(VENV)/bin/mypy
