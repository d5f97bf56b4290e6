"""The session-kNN term's stored sequences and scoring on a large synthetic log
(``retrieval.session_knn_weight``, ``retrieval.session_knn_length``): the
ragged sequences the term keeps against the ``[users, length]`` table it kept
until 2026-12-06 (time, peak RSS and bytes, each in its own process), then the
term's scoring of known users' queries (time a query, peak RSS), in blocks capped
at ``BLOCK_CELLS`` similarities (``score``) and in blocks of 256 queries whatever
the number of users, as before (``score-256``), and among each query's
``--sample`` latest active users sharing one of its items
(``retrieval.session_knn_sample``, ``sampled``), with the share of each query's
top 10 items that the exact term's top 10 holds.

The log: ``--users`` users with ``--mean-rows`` rows on average (geometric
lengths), one of them ``--longest`` rows long, over ``--items`` items drawn by
a Zipf law; ``--length`` is the term's ``session_knn_length`` (3,000 in the
sequence presets).

    python benchmarks/session_knn_scale.py --json benchmarks/results/session_knn_scale.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, peak_rss_gib, print_table, write_json
from twostage.config import RetrievalConfig
from twostage.models import session_knn
from twostage.models.session_knn import SessionNeighbours
from twostage.retrieval.tensors import latest_rows, neighbour_sequences

PHASES = ("ragged", "dense", "score", "score-256", "sampled")


def synthetic_log(args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    """``(times, user_idx, item_idx)`` of the log (users from 1: 0 is unknown)."""
    rng = np.random.default_rng(0)
    lengths = rng.geometric(1 / args.mean_rows, size=args.users)
    lengths[0] = args.longest
    users = np.repeat(np.arange(1, args.users + 1), lengths)
    ranks = np.arange(1, args.items + 1, dtype=np.float64)
    weights = ranks**-1.0
    items = 1 + rng.choice(args.items, size=len(users), p=weights / weights.sum())
    times = rng.integers(0, 10**9, size=len(users))
    return times, users, items


def _phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    times, users, items = synthetic_log(args)
    num_users = args.users + 1
    config = RetrievalConfig(session_knn_weight=1.0, session_knn_length=args.length)
    start = time.perf_counter()
    if name == "dense":  # the table kept until 2026-12-06: users x length, trimmed
        table = latest_rows(
            times, users, items, num_users=num_users, length=args.length
        )[0]
        longest = int((table > 0).sum(dim=1).max())
        table = table[:, table.shape[1] - longest :].contiguous()
        stored = table.numel() * table.element_size()
        return {
            "seconds": time.perf_counter() - start,
            "stored_mib": stored / 2**20,
            "peak_rss_gib": peak_rss_gib(),
        }
    lengths, sequences, latest = neighbour_sequences(
        times, users, items, num_users=num_users, config=config
    )
    built = time.perf_counter() - start
    stored = (lengths.numel() + sequences.numel() + latest.numel()) * 8
    if name == "ragged":
        return {
            "seconds": built,
            "stored_mib": stored / 2**20,
            "peak_rss_gib": peak_rss_gib(),
        }
    if name == "score-256":  # blocks of 256 queries whatever the users, as before
        session_knn.BLOCK_CELLS = 2**62
    sample = args.sample if name == "sampled" else 0
    start = time.perf_counter()
    model = SessionNeighbours(
        lengths, sequences, num_items=args.items + 1, sample=sample, latest=latest
    )
    indexed = time.perf_counter() - start
    rng = np.random.default_rng(1)
    per_query = []
    for _ in range(args.runs):
        queries = torch.from_numpy(rng.integers(1, num_users, size=args.queries))
        start = time.perf_counter()
        scores = model.score_users(queries)
        per_query.append((time.perf_counter() - start) / args.queries)
    out = {
        "seconds_per_query": median(per_query),
        "block_size": model.block_size,
        "index_seconds": indexed,
    }
    if sample:  # the last run's queries, scored exactly
        del model
        exact = SessionNeighbours(lengths, sequences, num_items=args.items + 1)
        mine, theirs = (
            scores.topk(10).indices,
            exact.score_users(queries).topk(10).indices,
        )
        shared = (mine[:, :, None] == theirs[:, None, :]).any(dim=2).float()
        out["top10_overlap"] = float(shared.mean())
    return {**out, "peak_rss_gib": peak_rss_gib()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--mean-rows", type=int, default=50)
    parser.add_argument("--longest", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--length", type=int, default=3_000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(_phase(args.phase, args)))
        return
    results: dict[str, Any] = {}
    for name in args.phases.split(","):
        command = [sys.executable, __file__, "--phase", name]
        for key in ("users", "mean_rows", "longest", "items", "length"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        command += ["--queries", str(args.queries), "--runs", str(args.runs)]
        command += ["--sample", str(args.sample)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [
        [
            name,
            result.get("seconds", float("nan")),
            result.get("stored_mib", float("nan")),
            result.get("seconds_per_query", float("nan")),
            result.get("top10_overlap", float("nan")),
            result["peak_rss_gib"],
        ]
        for name, result in results.items()
    ]
    times, users, _ = synthetic_log(args)
    print_table(
        f"session-kNN term: {args.users:,} users, {len(users):,} rows, "
        f"length {args.length:,}, sample {args.sample:,}",
        [
            "phase",
            "build s",
            "stored MiB",
            "s a query",
            "top-10 overlap",
            "peak RSS GiB",
        ],
        rows,
    )
    write_json(
        args.json,
        {
            "machine": machine(),
            "users": args.users,
            "rows": len(times),
            "items": args.items,
            "length": args.length,
            "sample": args.sample,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
