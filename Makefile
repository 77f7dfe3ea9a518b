PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-slow demo selfcheck lint format benchmark clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

demo: $(VENV)/.installed
	$(PY) -m mrconvnext.demo

selfcheck: $(VENV)/.installed
	$(PY) -m mrconvnext.selfcheck

benchmark: $(VENV)/.installed
	$(PY) benchmarks/benchmark.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
