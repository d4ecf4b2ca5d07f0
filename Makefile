# Every target bootstraps .venv itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo demo-batch bench bench-detail clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests bench scripts

demo: $(STAMP)
	$(PY) scripts/demo.py

demo-batch: $(STAMP)
	$(PY) scripts/demo_batch.py

# The side-by-side table against the peers (their virtualenvs are created under bench/.venvs on first use).
bench: $(STAMP)
	cd bench && ../$(PY) compare.py

# Our own figures in more depth: 1M-row estimate, throughput, journal overhead and resume, embeddings.
bench-detail: $(STAMP)
	cd bench && ../$(PY) estimate.py && ../$(PY) throughput.py && ../$(PY) resume.py && ../$(PY) embed.py

clean:
	rm -rf $(VENV) out bench/out
