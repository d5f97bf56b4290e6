# Every target installs what it needs on first use: `make demo` and `make test` are the
# only two commands a newcomer runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean lock

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: install
	$(VENV)/bin/twostage demo

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# Everything but the long end-to-end tests (marked `slow`); `make test` runs them all.
test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: install
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

bench: install
	mkdir -p benchmarks/results
	$(PY) benchmarks/data_load.py --json benchmarks/results/data_load.json
	$(PY) benchmarks/retrieval_quality.py --json benchmarks/results/retrieval_quality.json
	$(PY) benchmarks/retrieval_speed.py --json benchmarks/results/retrieval_speed.json
	$(PY) benchmarks/ranking_quality.py --json benchmarks/results/ranking_quality.json
	$(PY) benchmarks/index_bench.py --json benchmarks/results/index_bench.json
	$(PY) benchmarks/serve_load.py --json benchmarks/results/serve_load.json

# Re-pin every dependency from what is installed (run after changing pyproject.toml).
# ScaNN (and the protobuf it needs) has wheels for Linux x86_64 only: keep the marker.
LINUX_X86 := ; sys_platform == "linux" and platform_machine == "x86_64"
lock: install
	$(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' \
		-e 's/^\(scann\|protobuf\)==\(.*\)$$/\1==\2$(LINUX_X86)/' > requirements.lock

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
