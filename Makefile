# `make lock` uses process substitution.
SHELL := /bin/bash
# Every target installs what it needs on first use: `make demo` and `make test` are the
# only two commands a newcomer runs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install install-dev demo test test-fast lint bench clean lock

# What running twostage needs (requirements.lock); tests and tools add
# requirements-dev.lock, so `make demo` installs no pytest, mypy or playwright.
install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps -e .
	touch $(STAMP)

install-dev: $(DEV)

# TorchRec goes in with --no-deps (see requirements-torchrec.lock).
$(DEV): $(STAMP) requirements-dev.lock requirements-torchrec.lock
	$(PIP) -r requirements.lock -r requirements-dev.lock
	$(PIP) --no-deps -r requirements-torchrec.lock
	touch $(DEV)

demo: install
	$(VENV)/bin/twostage demo

test: install-dev
	$(PY) -m pytest -q -n 2 --dist loadfile

# Everything but the long end-to-end tests (marked `slow`); `make test` runs them all.
test-fast: install-dev
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: install-dev
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

bench: install-dev
	mkdir -p benchmarks/results
	$(PY) benchmarks/data_load.py --json benchmarks/results/data_load.json
	$(PY) benchmarks/retrieval_quality.py --json benchmarks/results/retrieval_quality.json
	$(PY) benchmarks/retrieval_speed.py --json benchmarks/results/retrieval_speed.json
	$(PY) benchmarks/ranking_quality.py --json benchmarks/results/ranking_quality.json
	$(PY) benchmarks/added_items.py --json benchmarks/results/added_items.json
	$(PY) benchmarks/session_batch.py --json benchmarks/results/session_batch.json
	$(PY) benchmarks/session_knn_scale.py --json benchmarks/results/session_knn_scale.json
	$(PY) benchmarks/index_bench.py --json benchmarks/results/index_bench.json
	$(PY) benchmarks/serve_load.py --json benchmarks/results/serve_load.json
	$(PY) benchmarks/tuning.py --json benchmarks/results/tuning.json
	$(PY) benchmarks/tuning_jobs.py --json benchmarks/results/tuning_jobs.json

# Re-pin the dev tools from what is installed (run after changing the dev extra):
# every installed package that requirements.lock does not pin. To re-pin the runtime
# lock, install the project's dependencies into a fresh venv and freeze it there.
# ScaNN and fbgemm-gpu-cpu have wheels for Linux x86_64 only: keep their marker
# (protobuf, which ScaNN needs, is needed by onnx everywhere). What
# requirements-torchrec.lock pins stays there (it installs with --no-deps).
LINUX_X86 := ; sys_platform == "linux" and platform_machine == "x86_64"
lock: install-dev
	$(PY) -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' \
		-e 's/^\(scann\|fbgemm[-_]gpu[-_]cpu\)==\(.*\)$$/\1==\2$(LINUX_X86)/' \
		| grep -v -i -x -F -f <(sed 's/;.*//' requirements.lock) \
		| grep -v -i -x -F -f <(sed -e '/^#/d' -e 's/;.*//' requirements-torchrec.lock) \
		> requirements-dev.lock

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
