"""Retraining on a newer log from the served model's weights (``train.warm_start``)
against training from scratch, on MovieLens-100k read as a log that grows.

"Today's" log is every row, split by ``--split`` (a seeded random 80/20 by
default, or the global temporal rule); "yesterday's" is the part of today's
training side (its validation carve-out included) rated before the time that
leaves ``--old-fraction`` of every row before it, so the saved model never saw
a test row. A model is trained on yesterday's rows and saved; today's runs then
train on today's split from scratch and from that model, each for 1, 3 and 10
epochs (``--epochs``; early stopping as configured), training seeds ``0 ..
--seeds - 1``; "vs scratch" compares each with scratch at the last count. Figures: today's test rows, seen items excluded (means over
seeds), the loop's seconds, the epochs run. ``--copy-users N`` instead times
the copy alone (``copy_weights``) between ID towers of N users, half of them new.

    python benchmarks/warm_start.py --json benchmarks/results/warm_start.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, peak_rss_gib, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides, apply_settings
from twostage.data.registry import load_dataset_for
from twostage.data.split import prepare_split
from twostage.retrieval.fit import fit_retrieval

FIGURES = (("ndcg", "10"), ("recall", "10"), ("hit_rate", "10"))


def _epochs(count: int) -> str:
    return f"{count} epoch{'s' if count != 1 else ''}"


def copy_scale(users: int, items: int, dim: int) -> dict[str, Any]:
    """The copy itself at scale: ID-only towers over ``users`` users (half of
    them new) and ``items`` items, the saved towers' rows copied into new ones
    by ID (``copy_weights``); seconds and this process's peak memory."""
    import time

    import numpy as np

    from twostage.config import RetrievalConfig
    from twostage.features import FeatureSpec
    from twostage.features.vocab import Vocabulary
    from twostage.retrieval.run import build_member
    from twostage.training.warm import WarmStart, copy_weights

    def spec(first: int) -> FeatureSpec:
        ids = pl.Series(np.arange(first, first + users, dtype=np.int64))
        return FeatureSpec.for_ids(
            users=Vocabulary().fit(ids),
            items=Vocabulary().fit(pl.Series(np.arange(items, dtype=np.int64))),
        )

    retrieval = RetrievalConfig(
        embedding_dim=dim, output_dim=dim, history_length=0, use_side_features=False
    )
    old_spec, new_spec = spec(0), spec(users // 2)
    old, new = build_member(old_spec, retrieval), build_member(new_spec, retrieval)
    before = peak_rss_gib()
    started = time.perf_counter()
    report = WarmStart(source="synthetic")
    copy_weights(new, new_spec, old, old_spec, report=report)
    return {
        "users": users,
        "items": items,
        "dim": dim,
        "seconds": time.perf_counter() - started,
        "peak_rss_gib_before": before,
        "peak_rss_gib": peak_rss_gib(),
        "rows": report.rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--old-fraction", type=float, default=0.5)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--split", choices=("random", "temporal"), default="random")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--epochs", default="1,3,10", help="epochs of both arms (the last: vs)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument(
        "--copy-users",
        type=int,
        default=0,
        help="instead: time the copy alone for ID towers of this many users "
        "(half new), --copy-items items, width --copy-dim",
    )
    parser.add_argument("--copy-items", type=int, default=100_000)
    parser.add_argument("--copy-dim", type=int, default=64)
    args = parser.parse_args()
    if args.copy_users:
        found = copy_scale(args.copy_users, args.copy_items, args.copy_dim)
        print_table(
            "copy_weights at scale (ID towers, half the users new)",
            ["users", "items", "dim", "seconds", "peak GiB before", "peak GiB"],
            [
                [
                    f"{found['users']:,}",
                    f"{found['items']:,}",
                    found["dim"],
                    f"{found['seconds']:.1f}",
                    f"{found['peak_rss_gib_before']:.2f}",
                    f"{found['peak_rss_gib']:.2f}",
                ]
            ],
        )
        write_json(args.json, {"machine": machine(), "copy": found})
        return
    if not 0 < args.old_fraction < 1 - args.test_fraction:
        parser.error("--old-fraction must lie below today's training side")
    torch.set_num_threads(args.threads)
    config = apply_overrides(
        ExperimentConfig(),
        [
            f"data.dataset={args.dataset}",
            f"data.split={args.split}",
            f"data.test_fraction={args.test_fraction}",
            f"train.num_threads={args.threads}",
            *args.set,
        ],
    )
    today = load_dataset_for(config)
    split = prepare_split(today, config)
    times = today.interactions["timestamp"].sort()
    cut = times[int(len(times) * args.old_fraction)]
    seen = split.train.interactions.filter(pl.col("timestamp") < cut)
    yesterday = today.with_interactions(seen)
    console.print(
        f"yesterday: {yesterday.num_interactions:,} of today's training rows, before "
        f"{cut}; today: {split.train.num_interactions:,} training rows, "
        f"{split.test.num_interactions:,} test rows ({args.split} split)"
    )
    arms: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            saved = Path(folder) / f"yesterday-{seed}"
            old_config = apply_settings(
                config, {"data.split": "random", "train.seed": seed}
            )
            fit_retrieval(old_config, dataset=yesterday, out_dir=saved)
            settings: dict[str, dict[str, Any]] = {}
            for epochs in map(int, args.epochs.split(",")):
                settings[f"scratch, {_epochs(epochs)}"] = {"train.epochs": epochs}
            for epochs in map(int, args.epochs.split(",")):
                settings[f"warm, {_epochs(epochs)}"] = {
                    "train.warm_start": str(saved),
                    "train.epochs": epochs,
                }
            for name, changes in settings.items():
                run, _ = fit_retrieval(
                    apply_settings(config, {"train.seed": seed, **changes}),
                    split=split,
                )
                figures = run.metrics["metrics"]["exclude_seen"]
                found = arms.setdefault(name, {})
                for metric, k in FIGURES:
                    found.setdefault(f"{metric}@{k}", []).append(figures[metric][k])
                found.setdefault("train_seconds", []).append(run.train_result.seconds)
                found.setdefault("epochs", []).append(len(run.train_result.history))
    results = {
        name: {key: statistics.mean(values) for key, values in found.items()}
        for name, found in arms.items()
    }
    scratch = results[f"scratch, {_epochs(int(args.epochs.split(',')[-1]))}"]
    print_table(
        f"{args.dataset}: today's {args.split} test side, seen items excluded (means of "
        f"{args.seeds} training seeds)",
        ["start", "NDCG@10", "R@10", "HR@10", "vs scratch", "epochs", "train s"],
        [
            [
                name,
                r["ndcg@10"],
                r["recall@10"],
                r["hit_rate@10"],
                f"{r['ndcg@10'] / scratch['ndcg@10'] - 1:+.1%}",
                f"{r['epochs']:.1f}",
                f"{r['train_seconds']:.1f}",
            ]
            for name, r in results.items()
        ],
    )
    console.print(f"machine: {machine()}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "dataset": args.dataset,
            "old_fraction": args.old_fraction,
            "test_fraction": args.test_fraction,
            "split": args.split,
            "old_rows": yesterday.num_interactions,
            "seeds": args.seeds,
            "overrides": args.set,
            "arms": results,
        },
    )


if __name__ == "__main__":
    main()
