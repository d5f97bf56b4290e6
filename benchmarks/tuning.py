"""What ``twostage tune`` gains, and what pruning saves, on MovieLens-100k and
latest-small's ratings read as a plain CSV (the user's own log).

For each log: the same search (temperature on a log scale, learning rate on a log
scale, width 32, 64 or 128; ``--trials`` trials, sampler seed 0) run whole and with
``--prune``, on the tuning split (the config's test rows set aside unread); then
the defaults and the best config of the whole search are trained on the real
split with training seeds ``0 .. --seeds - 1`` and measured on its test rows,
once each (random 80/20 split, seen items excluded).

    python benchmarks/tuning.py --json benchmarks/results/tuning.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides, apply_settings
from twostage.data.registry import load_dataset_for
from twostage.retrieval.fit import fit_retrieval
from twostage.tuning import tune

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
SPACE = {
    "retrieval.temperature": "log:0.05..1",
    "train.learning_rate": "log:0.001..0.02",
    "retrieval.embedding_dim": "32,64,128",
}
FIGURES = (("ndcg", "10"), ("recall", "10"), ("hit_rate", "10"))


def logs(latest_small: Path) -> dict[str, list[str]]:
    """Each log's config overrides: a built-in name, and a CSV with its columns."""
    return {
        "movielens-100k": ["data.dataset=movielens-100k"],
        "latest-small-csv": [
            f"data.dataset={latest_small / 'ratings.csv'}",
            "data.user_col=userId",
            "data.item_col=movieId",
        ],
    }


def test_figures(config: ExperimentConfig, dataset: Any, seeds: range) -> dict:
    """Means over training seeds of the test figures, seen items excluded, and
    TFRS's FTopK@100 (nothing excluded)."""
    found: dict[str, list[float]] = {}
    for seed in seeds:
        run, _ = fit_retrieval(
            apply_settings(config, {"train.seed": seed}), dataset=dataset
        )
        assert run.metrics is not None
        figures = run.metrics["metrics"]
        for name, k in FIGURES:
            found.setdefault(f"{name}@{k}", []).append(figures["exclude_seen"][name][k])
        # TFRS's metric counts seen items.
        found.setdefault("factorized_top_k@100", []).append(
            figures["include_seen"]["factorized_top_k"]["100"]
        )
    return {key: statistics.mean(values) for key, values in found.items()}


def search(config: ExperimentConfig, dataset: Any, trials: int, prune: bool) -> dict:
    started = time.perf_counter()
    result = tune(config, SPACE, dataset=dataset, trials=trials, prune=prune)
    return {
        "seconds": time.perf_counter() - started,
        "trial_seconds": sum(t.seconds for t in result.trials),
        "best_trial": result.best.number + 1,
        "best_value": result.best.value,
        "best_params": result.best.params,
        "default_value": result.trials[0].value,  # the config as given runs first
        "pruned": sum(t.state == "pruned" for t in result.trials),
        "values": [t.value for t in result.trials],
        "config": result.config,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--logs", default="movielens-100k,latest-small-csv")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds on test")
    parser.add_argument("--latest-small", type=Path, default=SHARED)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    known = logs(args.latest_small)
    names = args.logs.split(",")
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown --logs {unknown}; choose from {sorted(known)}")
    results: dict[str, Any] = {}
    rows = []
    for name in names:
        config = apply_overrides(
            ExperimentConfig(), [*known[name], f"train.num_threads={args.threads}"]
        )
        dataset = load_dataset_for(config)
        whole = search(config, dataset, args.trials, prune=False)
        pruned = search(config, dataset, args.trials, prune=True)
        seeds = range(args.seeds)
        default = test_figures(config, dataset, seeds)
        tuned = test_figures(whole.pop("config"), dataset, seeds)
        pruned.pop("config")
        results[name] = {
            "search": whole,
            "search_pruned": pruned,
            "test_default": default,
            "test_tuned": tuned,
        }
        rows.append(
            [
                name,
                whole["default_value"],
                whole["best_value"],
                pruned["best_value"],
                f"{whole['trial_seconds']:.0f} / {pruned['trial_seconds']:.0f}",
                pruned["pruned"],
                default["ndcg@10"],
                tuned["ndcg@10"],
                f"{tuned['ndcg@10'] / default['ndcg@10'] - 1:+.1%}",
            ]
        )
        console.print(f"{name}: best settings {whole['best_params']}")
    print_table(
        f"twostage tune, {args.trials} trials (validation NDCG@10; test NDCG@10, "
        f"mean of {args.seeds} training seeds)",
        [
            "log",
            "defaults (val)",
            "best (val)",
            "best, pruned (val)",
            "trial s (whole / pruned)",
            "pruned",
            "defaults (test)",
            "tuned (test)",
            "gain",
        ],
        rows,
    )
    console.print(f"machine: {machine()}")
    write_json(args.json, {"machine": machine(), "space": SPACE, "logs": results})


if __name__ == "__main__":
    main()
