"""Nearest-neighbour indexes on 1M clustered 64-d vectors: build time, size, recall@100
against the exact index, single-query latency on one thread and batched throughput,
with a sweep of HNSW ef_search and IVF nprobe (ScaNN leaves, if installed) that
justifies the defaults.

    python benchmarks/index_bench.py --json benchmarks/results/index_bench.json
    python benchmarks/index_bench.py --quick   # 100k items, a smoke run

``--grow-fraction F`` (default 0.01) also builds each approximate backend on all but
the last ``F`` of the items and grows a copy by them (``Index.extended``, what
``add_items`` does to a catalogue's index): the time that takes against a build of
every item, and the grown index's recall@100 at the default settings (0: skip).

``memory_mib`` is the size of what ``Index.save`` writes (vectors, graph or lists,
ids), close to what the index holds in memory; ``rss_delta_mib`` is the growth of the
process's resident set during ``build`` (includes build-time scratch the allocator
keeps).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json
from twostage.index import (
    ExactIndex,
    HNSWIndex,
    Index,
    IVFIndex,
    IVFSQIndex,
    ScannIndex,
)
from twostage.index.measure import measure_search

K = 100
SWEEPS: dict[str, tuple[str, list[int]]] = {
    "hnsw": ("ef_search", [64, 128, 256, 512]),
    "ivf": ("nprobe", [16, 32, 64, 128, 256]),
    "ivf_sq": ("nprobe", [16, 32, 64, 128, 256]),
    "scann": ("leaves_to_search", [25, 50, 100, 200]),  # optional: pip install scann
}
SHORT = {"ef_search": "ef", "nprobe": "nprobe", "leaves_to_search": "leaves"}
FACTORIES: dict[str, Callable[[], Index]] = {
    "hnsw": HNSWIndex,
    "ivf": IVFIndex,
    "ivf_sq": IVFSQIndex,
    "scann": ScannIndex,
}


def clustered(
    num: int, centres: torch.Tensor, spread: float, generator: torch.Generator
) -> torch.Tensor:
    """``num`` L2-normalised points of a Gaussian mixture around unit ``centres``.

    The noise has an expected norm of ``spread`` (1.0: as long as the centre).
    """
    dim = centres.shape[1]
    out = torch.empty(num, dim)
    for start in range(0, num, 1 << 18):
        rows = min(1 << 18, num - start)
        pick = torch.randint(len(centres), (rows,), generator=generator)
        noise = torch.randn(rows, dim, generator=generator) * (spread / dim**0.5)
        out[start : start + rows] = centres[pick] + noise
    return torch.nn.functional.normalize(out, dim=1)


def saved_mib(index: Index) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        return (
            sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
        )


def measure(
    index: Index, queries: torch.Tensor, truth: torch.Tensor, batch_size: int
) -> dict[str, Any]:
    """Recall@K, single-query p50/p99 (ms) and batched queries/s on one thread."""
    result = measure_search(index, queries, truth, batch_size=batch_size)
    return {"recall_at_100": result.pop("recall_at_k"), **result}


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def build(
    index: Index, items: torch.Tensor, threads: int
) -> tuple[Index, dict[str, float]]:
    """Build on ``threads`` threads; time and RSS growth. Then one thread."""
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    rss, started = rss_mib(), time.perf_counter()
    index.build(items, torch.arange(1, len(items) + 1))
    cost = {"build_s": time.perf_counter() - started, "rss_delta_mib": rss_mib() - rss}
    torch.set_num_threads(1)  # every search is measured on one thread
    faiss.omp_set_num_threads(1)
    return index, cost


def grow(
    factory: Callable[[], Index],
    items: torch.Tensor,
    queries: torch.Tensor,
    truth: torch.Tensor,
    threads: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Build on all but the last ``grow_fraction`` of ``items``, then time growing a
    copy by them; the grown index's recall@100 against ``truth`` (every item)."""
    added = max(1, round(len(items) * args.grow_fraction))
    kept = len(items) - added
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    base = factory().build(items[:kept], torch.arange(1, kept + 1))
    built = time.perf_counter() - started
    started = time.perf_counter()
    grown = base.extended(items[kept:], torch.arange(kept + 1, len(items) + 1))
    seconds = time.perf_counter() - started
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    if grown is None:  # the backend cannot grow a copy
        return {
            "added": added,
            "build_rest_s": built,
            "grow_s": float("nan"),
            "recall_at_100": float("nan"),
        }
    recall = measure_search(grown, queries, truth, batch_size=args.batch_size)
    return {
        "added": added,
        "build_rest_s": built,
        "grow_s": seconds,
        "recall_at_100": recall["recall_at_k"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--num-items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--num-clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise / centre")
    parser.add_argument("--backends", default="exact,hnsw,ivf,ivf_sq")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--build-threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100k items")
    parser.add_argument(
        "--grow-fraction",
        type=float,
        default=0.01,
        help="the share of the items added to a built index (0: skip)",
    )
    args = parser.parse_args()
    if args.quick:
        args.num_items = 100_000
    threads = args.build_threads or torch.get_num_threads()
    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.nn.functional.normalize(
        torch.randn(args.num_clusters, args.dim, generator=generator), dim=1
    )
    items = clustered(args.num_items, centres, args.spread, generator)
    queries = clustered(args.num_queries, centres, args.spread, generator)
    backends = args.backends.split(",")

    exact, exact_cost = build(ExactIndex(), items, threads)
    truth = exact.search(queries, K)[1]
    entries: list[dict[str, Any]] = []
    if "exact" in backends:
        result = measure(exact, queries, truth, args.batch_size)
        entries.append(
            {"name": "exact", "is_exact": True, **result}
            | {**exact_cost, "memory_mib": saved_mib(exact)}
        )
        print(entries[-1], flush=True)
    grown: list[dict[str, Any]] = []
    for kind in [b for b in backends if b in FACTORIES]:
        index, cost = build(FACTORIES[kind](), items, threads)
        memory = saved_mib(index)
        if args.grow_fraction > 0:
            grown.append(
                grow(FACTORIES[kind], items, queries, truth, threads, args)
                | {"name": kind, "build_all_s": cost["build_s"]}
            )
            print(grown[-1], flush=True)
        param, values = SWEEPS[kind]
        default = getattr(index, param)
        for value in sorted({*values, default}):
            setattr(index, param, value)
            result = measure(index, queries, truth, args.batch_size)
            entries.append(
                {"name": f"{kind}-{SHORT[param]}{value}", "is_exact": False}
                | result
                | {**cost, "memory_mib": memory, "params": index.params()}
            )
            print(entries[-1], flush=True)
            if grown and grown[-1]["name"] == kind and value == default:
                grown[-1]["built_recall_at_100"] = result["recall_at_100"]

    print_table(
        f"Index search: {args.num_items:,} x {args.dim} clustered items, "
        f"{args.num_queries:,} queries, k={K}, one thread",
        [
            "backend",
            "recall@100",
            "p50 ms",
            "p99 ms",
            "batched q/s",
            "build s",
            "MiB",
            "RSS+ MiB",
        ],
        [
            [
                e["name"],
                f"{e['recall_at_100']:.3f}",
                f"{e['p50_ms']:.3f}",
                f"{e['p99_ms']:.3f}",
                f"{e['batched_qps']:,.0f}",
                f"{e['build_s']:.1f}",
                f"{e['memory_mib']:.0f}",
                f"{e['rss_delta_mib']:.0f}",
            ]
            for e in entries
        ],
    )
    if grown:
        print_table(
            f"Growing a built index by {args.grow_fraction:.0%} of the items "
            "(Index.extended), default settings",
            [
                "backend",
                "build all s",
                "build the rest s",
                "grow s",
                "recall@100 grown",
                "built",
            ],
            [
                [
                    g["name"],
                    f"{g['build_all_s']:.1f}",
                    f"{g['build_rest_s']:.1f}",
                    f"{g['grow_s']:.2f}",
                    f"{g['recall_at_100']:.3f}",
                    f"{g.get('built_recall_at_100', float('nan')):.3f}",
                ]
                for g in grown
            ],
        )
    write_json(
        args.json,
        {
            "grown": grown,
            "backends": entries,
            "config": vars(args)
            | {"json": None, "k": K, "build_threads": threads, "search_threads": 1},
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
