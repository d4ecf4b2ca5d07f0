# Every target bootstraps .venv itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The package's bytecode, written once as installing a wheel does: an editable install leaves it to each import,
# which writes nothing where PYTHONDONTWRITEBYTECODE is set, and then every process (a test's simulator, a Ray
# worker, a benchmark's run) compiled the package again (about 0.2 s of CPU each: docs/benchmarks.md, the seams).
# Python ignores a stale file and compiles that module again.
COMPILE := $(PY) -m compileall -q pipeline >/dev/null

.PHONY: install test lint demo demo-batch demo-ray bench bench-detail clean

# The package alone: what a user installs, and all the demo needs (about half a minute).
$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	$(COMPILE)
	touch $(CORE)

# With the test and Ray extras: what `make test` and the benchmarks need.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev,ray]'
	$(COMPILE)
	touch $(STAMP) $(CORE)

install: $(STAMP)

# Two workers, each taking whole test files: most of the suite's time is spent waiting (on rate limits, signals,
# Ray, batch polls), so two at once take little more than half as long on two cores (580 tests: 292 s, against
# 491-528 s in one process).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests bench scripts
	$(VENV)/bin/mypy

demo: $(CORE)
	$(PY) scripts/demo.py

demo-batch: $(CORE)
	$(PY) scripts/demo_batch.py

demo-ray: $(CORE)
	$(PIP) -e '.[ray]'
	$(PY) scripts/demo_ray.py

# The side-by-side table against the peers (their virtualenvs are created under bench/.venvs on first use).
bench: $(STAMP)
	cd bench && ../$(PY) compare.py

# Our own figures in more depth: 1M-row estimate, throughput, journal overhead and resume, embeddings.
bench-detail: $(STAMP)
	cd bench && ../$(PY) estimate.py && ../$(PY) throughput.py && ../$(PY) resume.py && ../$(PY) embed.py && ../$(PY) frames.py && ../$(PY) images_out.py

clean:
	rm -rf $(VENV) out bench/out
