# Entry points: `make demo`, `make test`, `make compare`. Each creates .venv and installs pinned dependencies first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.PHONY: demo compare test test-slow bench lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/duo demo

compare: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/duo demo --compare

# Two workers of one OpenMP thread each: most tests are single-threaded Python, and two 2-thread workers on two
# cores slow each other down several-fold.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -n 2 --dist worksteal --durations=15

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/train_step.py
	$(VENV)/bin/python benchmarks/curate_throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
