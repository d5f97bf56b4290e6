"""What running trials at once (``twostage tune --jobs``) saves: the same search
run as one job on every core and as ``--jobs`` jobs on their share of the cores,
alternated ``--repeats`` times. Wall seconds (median; the workers' start and their
copy of the rows included), trials a minute, and the best validation figure each
run found (a parallel search's proposals depend on which trial ends first).

    python benchmarks/tuning_jobs.py --json benchmarks/results/tuning_jobs.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.registry import load_dataset_for
from twostage.tuning import tune

SPACE = {
    "retrieval.temperature": "log:0.05..1",
    "train.learning_rate": "log:0.001..0.02",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="train.epochs a trial")
    args = parser.parse_args()
    config = apply_overrides(
        ExperimentConfig(),
        [f"data.dataset={args.dataset}", f"train.epochs={args.epochs}"],
    )
    dataset = load_dataset_for(config)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    runs: dict[int, list[dict[str, Any]]] = {1: [], args.jobs: []}
    for _ in range(args.repeats):
        for jobs in runs:  # alternated: the machine's load drifts
            started = time.perf_counter()
            result = tune(config, SPACE, dataset=dataset, trials=args.trials, jobs=jobs)
            seconds = time.perf_counter() - started
            runs[jobs].append({"seconds": seconds, "best": result.best.value})
            console.print(f"jobs {jobs}: {seconds:.1f} s, best {result.best.value:.4f}")
    rows = []
    summary: dict[str, Any] = {}
    base = statistics.median(r["seconds"] for r in runs[1])
    for jobs, found in runs.items():
        median = statistics.median(r["seconds"] for r in found)
        summary[str(jobs)] = {
            "seconds": [r["seconds"] for r in found],
            "median_seconds": median,
            "trials_a_minute": 60 * args.trials / median,
            "best": [r["best"] for r in found],
            "speed_up": base / median,
        }
        rows.append(
            [
                jobs,
                max(1, cores // jobs),
                median,
                60 * args.trials / median,
                f"{base / median:.2f}x",
                ", ".join(f"{r['best']:.4f}" for r in found),
            ]
        )
    print_table(
        f"twostage tune on {args.dataset}, {args.trials} trials of {args.epochs} "
        f"epochs, {args.repeats} runs each (validation NDCG@10)",
        ["jobs", "threads a job", "median s", "trials a minute", "speed-up", "best"],
        rows,
    )
    console.print(f"machine: {machine()}")
    write_json(args.json, {"machine": machine(), "space": SPACE, "jobs": summary})


if __name__ == "__main__":
    main()
