"""Measure an index against the exact oracle: recall@k, latency, throughput.

Shared by ``twostage index bench`` and ``benchmarks/index_bench.py``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from twostage.index.base import Index

__all__ = ["measure_search", "recall_at_k"]


def recall_at_k(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of each row of ``truth`` ([Q, k] ids) that ``found`` ([Q, k]) holds."""
    hits = [
        len(np.intersect1d(a.numpy(), b.numpy()))
        for a, b in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) / truth.shape[1]


def measure_search(
    index: Index,
    queries: torch.Tensor,
    truth: torch.Tensor,
    *,
    batch_size: int = 256,
    warmup: int = 20,
) -> dict[str, float]:
    """Search every query alone, then in batches, on the current thread settings.

    Args:
        index: a built index.
        queries: [Q, D] float tensor.
        truth: [Q, k] int64 ids from the exact index (the oracle); k is its width.
        batch_size: queries per call in the throughput pass.
        warmup: single queries searched first and not timed.

    Returns:
        ``recall_at_k``, ``p50_ms`` and ``p99_ms`` of single queries, ``batched_qps``.
    """
    k = truth.shape[1]
    for i in range(min(warmup, len(queries))):
        index.search(queries[i : i + 1], k)
    latencies = []
    for i in range(len(queries)):
        started = time.perf_counter()
        index.search(queries[i : i + 1], k)
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    found = torch.cat(
        [
            index.search(queries[i : i + batch_size], k)[1]
            for i in range(0, len(queries), batch_size)
        ]
    )
    batched_s = time.perf_counter() - started
    return {
        "recall_at_k": recall_at_k(found, truth),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "batched_qps": len(queries) / batched_s,
    }
