# Two commands set everything up on a fresh machine:  make demo   and   make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch first: on a CPU machine this picks the local CPU wheel, never the multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,arena]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/topocl demo

test: $(STAMP)
	$(BIN)/ruff check topocl tests benchmarks
	$(BIN)/python -m pytest -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check --fix topocl tests benchmarks
	$(BIN)/ruff format topocl tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
