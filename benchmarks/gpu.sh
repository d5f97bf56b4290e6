#!/usr/bin/env bash
# Every GPU check and figure in one run, on a machine with CUDA: the CUDA-only tests,
# then benchmarks/gpu.py (training examples/s at 10M/1M/1M, exact top-100 over
# 10M x 64, evaluation of 1M users), under 8 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu.sh [JSON path, default benchmarks/results/gpu.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu.json}
mkdir -p "$(dirname "$OUT")"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
timeout 420 "$PY" benchmarks/gpu.py --json "$OUT"
