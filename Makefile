# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup setup-dev demo test bench lint clean

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Trains GPT-1 tiny (post-LN, bytes) on CPython's documentation text, then prints the result.
demo: setup
	rm -rf $(DEMO_DIR)
	$(PY) -m experiments.train --config=configs/gpt1.py:tiny --workdir=$(DEMO_DIR)

test: setup-dev
	$(PY) -m pytest -q tests

lint: setup-dev
	$(PY) -m pip install -q ruff==0.14.6
	$(VENV)/bin/ruff check gpt experiments configs tests

clean:
	rm -rf $(VENV) runs data
