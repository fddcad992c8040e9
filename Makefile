# Every target sets itself up: a fresh clone needs only python3 (and, for the full suite, root for
# Debian's redis-server; without it those tests skip, except under CI=true where they fail).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp

.PHONY: demo test lint types check system-deps bench clean venv docs airflow stack

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

types: $(STAMP)
	$(VENV)/bin/mypy

check: lint types test

bench: $(STAMP) system-deps
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache

docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

airflow: $(STAMP)
	$(PY) scripts/airflow_ui.py

# a production-shaped Airflow on loopback: Postgres, Redis, CeleryExecutor (2 workers), moto S3, 20 practices
stack: $(STAMP) system-deps
	$(PY) scripts/stack.py $(STACK_ARGS)
