"""Every GPU figure in one run (``benchmarks/gpu.sh`` calls it): two-tower training
throughput (ID-only and side features + a 20-item history, 10M interactions / 1M
users / 1M items, fp32 and bf16), exact top-100 search over 10M x 64 item vectors
(per query and batched), and full-catalogue evaluation of 1M users. Sized to finish
in under 8 minutes on one H100/H200-class GPU; writes one JSON.

    python benchmarks/gpu.py --json benchmarks/results/gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, write_json
from retrieval_speed import FEATURES, ID_ONLY, SPARSE, measure


def training(args: argparse.Namespace) -> dict[str, Any]:
    from twostage.data.synthetic import generate

    data = generate(
        None,
        num_users=args.users,
        num_items=args.items,
        num_interactions=args.interactions,
    )
    out: dict[str, Any] = {}
    for name, overrides in (
        ("id-only", ID_ONLY),
        ("id-only/sparse", ID_ONLY + SPARSE),
        ("features+history", FEATURES),
    ):
        for precision in ("fp32", "bf16"):
            key = f"{name}/{precision}"
            out[key] = measure(
                data,
                [*overrides, f"train.precision={precision}"],
                args.device,
                args.steps,
                args.batch_size,
            )
            print(f"{key}: {out[key]['examples_per_s']:,.0f} examples/s", flush=True)
    return out


def exact_search(args: argparse.Namespace) -> dict[str, Any]:
    from twostage.index import ExactIndex

    generator = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(
        torch.randn(args.search_items, args.dim, generator=generator), dim=1
    )
    queries = torch.nn.functional.normalize(
        torch.randn(args.queries, args.dim, generator=generator), dim=1
    )
    index = ExactIndex(device=args.device).build(items, torch.arange(1, len(items) + 1))
    del items
    index.search(queries[:8], 100)  # warm-up: kernels, allocator
    times = []
    for row in range(args.queries):
        _sync(args.device)
        started = time.perf_counter()
        index.search(queries[row : row + 1], 100)
        times.append((time.perf_counter() - started) * 1000)
    _sync(args.device)
    started = time.perf_counter()
    index.search(queries, 100)
    batched = time.perf_counter() - started
    return {
        "items": args.search_items,
        "dim": args.dim,
        "p50_ms": median(times),
        "p99_ms": float(np.percentile(times, 99)),
        "batched_queries_per_s": args.queries / batched,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluation(args: argparse.Namespace) -> dict[str, Any]:
    from twostage.data.user_items import UserItems
    from twostage.evaluate import evaluate_embeddings

    generator = torch.Generator().manual_seed(1)
    users, items = args.eval_users, args.items
    queries = torch.randn(users, args.dim, generator=generator).to(args.device)
    catalogue = torch.randn(items, args.dim, generator=generator).to(args.device)
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(users), 5)
    relevant = UserItems.from_pairs(rows, rng.integers(0, items, len(rows)))
    seen = UserItems.from_pairs(rows, rng.integers(0, items, len(rows)))
    _sync(args.device)
    started = time.perf_counter()
    evaluate_embeddings(
        queries, catalogue, relevant=relevant, seen=seen, ks=(10, 100), batch_size=8192
    )
    _sync(args.device)
    return {
        "users": users,
        "items": items,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16384)
    parser.add_argument("--search-items", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eval-users", type=int, default=1_000_000)
    parser.add_argument(
        "--device",
        default="cuda",
        help="cuda; cpu only to try the script with small sizes",
    )
    parser.add_argument(
        "--parts",
        default="training,search,evaluation",
        help="comma-separated: training, search, evaluation",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure here", file=sys.stderr)
        raise SystemExit(2)
    parts = {p.strip() for p in args.parts.split(",")}
    results: dict[str, Any] = {"machine": machine()}
    if "training" in parts:
        results["training"] = training(args)
        print_table(
            f"training, {args.interactions:,} / {args.users:,} / {args.items:,}",
            ["model", "examples/s"],
            [
                [k, f"{v['examples_per_s']:,.0f}"]
                for k, v in results["training"].items()
            ],
        )
    if "search" in parts:
        results["exact_search"] = exact_search(args)
        print(results["exact_search"], flush=True)
    if "evaluation" in parts:
        results["evaluation"] = evaluation(args)
        print(results["evaluation"], flush=True)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
