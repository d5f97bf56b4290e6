"""Retrieval quality on MovieLens-100k, seeded random 80/20 split (the TFRS protocol).

Trains the ID-only two-tower model and the model with side features and history, each
with one example per interaction (the defaults: ``twostage-id``, ``twostage-features``;
``twostage-features-concat`` with ``retrieval.combine=concat``) and with one example per
user (``presets/retrieval-users.json``: ``twostage-users-id``,
``twostage-users-features``, ``twostage-users-age-gender`` with only those user fields,
and ``twostage-users-age-gender-t0.3`` at temperature 0.3), runs the baselines on the
same split and the same evaluation code, and prints one table. A second scenario holds
10% of the users out of training entirely (cold start). ``--seeds N`` trains each
twostage model with training seeds 0 .. N-1 on the same split and reports their means
(single runs in ``per_seed``): differences of a few thousandths in NDCG@10 are within
one seed's noise here. ``--models`` trains only the named twostage models.
``--validation`` is the protocol for tuning: it sets the test 20% aside unread and runs
everything on the other 80%, split 80/20 again with the same seed, so settings are
chosen without looking at the test interactions.

    python benchmarks/retrieval_quality.py --json benchmarks/results/retrieval_quality.json
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
from _common import machine, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides, load_config
from twostage.data.registry import load_dataset
from twostage.data.split import split_dataset
from twostage.retrieval.evaluation import evaluate_baselines
from twostage.two_stage import fit_two_stage

KS = ("1", "5", "10", "50", "100")
COMMON = ["data.split=random", "data.test_fraction=0.2", "data.seed=42"]
PRESETS = Path(__file__).resolve().parent.parent / "presets"
# name -> (preset file or None for the defaults, overrides)
MODELS: dict[str, tuple[str | None, list[str]]] = {
    "twostage-id": (None, ["retrieval.use_side_features=false"]),
    "twostage-features": (None, []),
    # the towers' fields concatenated through a linear layer instead of summed
    "twostage-features-concat": (None, ["retrieval.combine=concat"]),
    "twostage-users-id": (
        "retrieval-users.json",
        ["retrieval.use_side_features=false"],
    ),
    "twostage-users-features": ("retrieval-users.json", []),
    # the same with only the coarse user fields: zip prefix and occupation overfit the
    # cold-start path (see docs/guide.md)
    "twostage-users-age-gender": (
        "retrieval-users.json",
        ["retrieval.query_fields=age,gender"],
    ),
    # the same at temperature 0.3: on the --validation split, the highest FTopK@100
    # of the settings that kept hit@10 and hit@100 above EASE's
    "twostage-users-age-gender-t0.3": (
        "retrieval-users.json",
        ["retrieval.query_fields=age,gender", "retrieval.temperature=0.3"],
    ),
}


def entry(
    metrics: dict[str, Any], seconds: float | None, epochs: int | None
) -> dict[str, Any]:
    """The JSON entry of one model: K as strings, seen items excluded but for FTopK."""
    exclude = metrics["metrics"]["exclude_seen"]
    include = metrics["metrics"]["include_seen"]
    return {
        "factorized_top_k": {k: include["factorized_top_k"][k] for k in KS},
        "factorized_top_k_excluding_seen": {
            k: exclude["factorized_top_k"][k] for k in KS
        },
        "hit_rate": {k: exclude["hit_rate"][k] for k in KS},
        "recall": {k: exclude["recall"][k] for k in KS},
        "ndcg": {k: exclude["ndcg"][k] for k in KS},
        "mrr": {k: exclude["mrr"][k] for k in KS},
        "coverage": {k: exclude["coverage"][k] for k in KS},
        "train_seconds": seconds,
        "epochs": epochs,
    }


def mean_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over training seeds of entries made by :func:`entry`."""

    def mean(values: list[Any]) -> float | None:  # None: an empty slice has no value
        return None if None in values else statistics.fmean(values)

    out: dict[str, Any] = {}
    for key, value in entries[0].items():
        if isinstance(value, dict):
            out[key] = {k: mean([e[key][k] for e in entries]) for k in value}
        else:
            out[key] = mean([e[key] for e in entries])
    return out


def scenario(
    dataset: Any,
    extra: list[str],
    overrides: list[str],
    seeds: int,
    models: list[str],
) -> dict[str, Any]:
    """Every model and baseline on one split; each slice reported separately.

    Each twostage model trains once per training seed (0 .. seeds-1, the split stays
    the same); its entry holds the means and ``per_seed`` the single runs.
    """
    results: dict[str, Any] = {}
    slices: dict[str, dict[str, Any]] = {}
    last_run = last_split = None
    for name in models:
        preset, model_overrides = MODELS[name]
        base = load_config(PRESETS / preset) if preset else ExperimentConfig()
        runs, by_slice = [], {}
        for seed in range(seeds):
            config = apply_overrides(
                base,
                [*COMMON, *extra, *model_overrides, *overrides, f"train.seed={seed}"],
            )
            started = time.perf_counter()
            stages = fit_two_stage(config, dataset, ranking=False)
            run, split = stages.retrieval, stages.split
            seconds = time.perf_counter() - started
            runs.append(entry(run.metrics, seconds, len(run.train_result.history)))
            runs[-1]["best_epoch"] = run.train_result.best_epoch + 1
            for slice_name, sub in run.metrics["slices"].items():
                by_slice.setdefault(slice_name, []).append(entry(sub, None, None))
            last_run, last_split = run, split
        results[name] = mean_entry(runs)
        results[name]["config"] = {"preset": preset, "overrides": model_overrides}
        if seeds > 1:
            results[name]["per_seed"] = runs
        for slice_name, entries in by_slice.items():
            slices.setdefault(slice_name, {})[name] = mean_entry(entries)
    assert last_run is not None and last_split is not None
    started = time.perf_counter()
    for name, result in evaluate_baselines(last_run, last_split.test).items():
        payload = result.to_dict()
        results[name] = entry(payload, None, None)
        for slice_name, sub in payload["slices"].items():
            slices.setdefault(slice_name, {})[name] = entry(sub, None, None)
    for name in ("popularity", "ease", "itemknn"):
        if name in results:
            results[name]["train_seconds"] = (time.perf_counter() - started) / 3
    return {"models": results, "slices": slices}


def show(title: str, models: dict[str, Any]) -> None:
    rows = []
    for name, e in models.items():
        rows.append(
            [
                name,
                e["factorized_top_k"]["100"],
                e["factorized_top_k_excluding_seen"]["10"],
                e["hit_rate"]["10"],
                e["hit_rate"]["100"],
                e["recall"]["10"],
                e["recall"]["100"],
                e["ndcg"]["10"],
                "-" if e["train_seconds"] is None else f"{e['train_seconds']:.1f}",
                "-" if e["epochs"] is None else f"{e['epochs']:g}",
            ]
        )
    print_table(
        title,
        [
            "model",
            "FTopK@100 (all)",
            "hit@10",
            "HR@10",
            "HR@100",
            "R@10",
            "R@100",
            "NDCG@10",
            "train s",
            "epochs",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results here"
    )
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--skip-cold", action="store_true", help="skip the cold-start run"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="training seeds per twostage model (entries are their means)",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated twostage models to train (default: all of them; "
        "the baselines always run)",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="for tuning: set the test 20%% aside unread and run everything on the "
        "other 80%%, split 80/20 again with the same seed",
    )
    args = parser.parse_args()
    models = [name for name in args.models.split(",") if name]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    dataset = load_dataset("movielens-100k")
    source = dataset.source
    protocol = "test"
    if args.validation:
        dataset = split_dataset(dataset, test_fraction=0.2, seed=42).train
        protocol = "validation"
    main_run = scenario(dataset, [], args.set, args.seeds, models)
    show(
        f"MovieLens-100k, random 80/20 (seed 42), {protocol} protocol: seen items "
        "excluded, FTopK without",
        main_run["models"],
    )
    payload: dict[str, Any] = {
        **main_run["models"],
        "slices": main_run["slices"],
        "dataset": "movielens-100k",
        "source": source,
        "protocol": protocol,
        "seeds": args.seeds,
        "machine": machine(),
    }
    if not args.skip_cold:
        cold = scenario(
            dataset, ["data.cold_user_fraction=0.1"], args.set, args.seeds, models
        )
        for slice_name in ("warm_users", "cold_users"):
            show(
                f"10% of users held out of training: {slice_name}",
                cold["slices"][slice_name],
            )
        payload["cold_start"] = cold["slices"]
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
