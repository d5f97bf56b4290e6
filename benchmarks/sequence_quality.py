"""Ordered (sequence) retrieval against bag models and baselines under three protocols.

Protocols, all full-ranking with each user's training items excluded:

* ``loo``: leave-one-out, each user's last item is test, the second-last validation;
* ``temporal``: a global time cut, the latest 20% of rows are test (the latest 5% of
  the rest validation); users first seen after the cut are cold, and our models'
  most-popular fallback ranks by the last 30 days (``retrieval.popularity_days``);
* ``random``: the seeded random 80/20 split of ``retrieval_quality.py``.

Datasets: MovieLens-100k and latest-small (``../shared/data/ml-latest-small``, or
``--latest-small DIR``). Models: ``twostage-bag`` (the default two towers, history
pooled as a bag), ``twostage-transformer`` (``presets/retrieval-sequence.json``) and
``twostage-gru`` (the same with a GRU) and ``twostage-ensemble``
(``presets/retrieval-sequence-ensemble.json``: both, trained apart, serving 0.7 x the
transformer's score + 0.3 x the GRU's + 0.01 x EASE's and 0.005 x the transition
model's standardised scores, plus the session-kNN term at its weight) and
``twostage-transformer-ease``
(``presets/retrieval-sequence-ease.json``: the transformer plus EASE's standardised
score at 0.01 its weight, plus the session-kNN term at its weight) and ``twostage-two-stage-ease``
(``presets/two-stage-ease.json``: retrieval by the ``users`` towers, then the ranker
re-ranks the top 100 with EASE's standardised score in its order; the list columns
are that served list, FTopK the retrieval's), ``twostage-transformer-two-stage`` and
``twostage-ensemble-two-stage`` (those presets with their ranking stage, as
``twostage train`` serves them; list columns of the served list), each trained
with seeds 0 ..
``--seeds``-1 (``--first-seed`` moves the first; means reported; the JSON also holds each of our models' served
``session_knn_weight``, picked per run on validation where a config says -1);
baselines: popularity, recent popularity (last 30 days), EASE, item-kNN (both
neighbourhood forms), the item-to-item transition model, session-kNN and EASE read
in time order (``ease-recency``), on the same split and evaluation code (a test user
new to the run gets the run's most-popular list from each baseline that reads a
user's items, as from our models' fallback). One table per protocol and dataset.

Each entry's ``standard_error`` holds the standard error over the test users of each
list figure (the mean over seeds for our models), the table that of NDCG@10. Each of
our models' entries also holds ``versus_best_baseline``: the baseline with the best
NDCG@10 on that split, the difference of each list figure from it (``difference``,
the mean over seeds) and its standard error paired over the same test users
(``paired_standard_error``: each user's figure averaged over the seeds, less the
baseline's, spread over the square root of their number); the table's "vs best"
column shows NDCG@10's, "ahead" or "behind" where the difference passes twice it.

``--validation`` is the protocol for tuning: each protocol's test rows are set aside
unread and the same protocol runs on what is left (under leave-one-out the
second-last item is then the test, the third-last the validation), so settings are
chosen without looking at the test interactions.

    python benchmarks/sequence_quality.py --json benchmarks/results/sequence_quality.json
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
from twostage.data.dataset import Dataset
from twostage.data.movielens import load_movielens
from twostage.data.registry import load_dataset
from twostage.data.split import prepare_split, split_dataset
from twostage.metrics import QueryFigures, paired_standard_error
from twostage.retrieval.evaluation import evaluate_baselines
from twostage.retrieval.fit import fit_retrieval
from twostage.two_stage import fit_two_stage

KS = ("1", "5", "10", "50", "100")
PRESETS = Path(__file__).resolve().parent.parent / "presets"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
#: The split method of each protocol (its test fraction is 0.2 where one applies).
METHODS = {"loo": "leave-last-out", "temporal": "temporal", "random": "random"}
PROTOCOLS = {
    "loo": ["data.split=leave-last-out", "data.validation_fraction=0.05"],
    "temporal": [
        "data.split=temporal",
        "data.test_fraction=0.2",
        "data.validation_fraction=0.05",
        # the test lies after training: the fallback lists what is popular now
        "retrieval.popularity_days=30",
    ],
    "random": [
        "data.split=random",
        "data.test_fraction=0.2",
        "data.validation_fraction=0.05",
    ],
}
# name -> (preset file or None for the defaults, overrides)
MODELS: dict[str, tuple[str | None, list[str]]] = {
    "twostage-bag": (None, []),
    "twostage-transformer": ("retrieval-sequence.json", []),
    "twostage-gru": ("retrieval-sequence.json", ["retrieval.query_encoder=gru"]),
    "twostage-ensemble": ("retrieval-sequence-ensemble.json", []),
    "twostage-transformer-ease": ("retrieval-sequence-ease.json", []),
    "twostage-two-stage-ease": ("two-stage-ease.json", []),
    # The sequence presets as `twostage train` serves them: both stages.
    "twostage-transformer-two-stage": ("retrieval-sequence.json", []),
    "twostage-ensemble-two-stage": ("retrieval-sequence-ensemble.json", []),
}
#: Models trained with their ranking stage: their list columns are the served
#: two-stage list (retrieve, then re-rank), their FTopK column the retrieval's.
TWO_STAGE = {
    "twostage-two-stage-ease",
    "twostage-transformer-two-stage",
    "twostage-ensemble-two-stage",
}


LISTS = ("hit_rate", "ndcg", "recall")


def entry(metrics: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """One model's JSON entry: seen items excluded, K as strings; TFRS's
    factorized top-K (nothing excluded) for comparison; the standard error of
    each list figure over the test users (``standard_error``)."""
    exclude = metrics["metrics"]["exclude_seen"]
    include = metrics["metrics"]["include_seen"]
    errors = metrics["standard_errors"]["exclude_seen"]
    return {
        **{m: {k: exclude[m][k] for k in KS} for m in LISTS},
        "factorized_top_k": {k: include["factorized_top_k"][k] for k in KS},
        "standard_error": {m: {k: errors[m][k] for k in KS} for m in LISTS},
        "train_seconds": seconds,
    }


def mean_entry(entries: list[dict[str, Any]]) -> Any:
    """The mean over seeds of each number, nested as the entries are."""
    first = entries[0]
    if isinstance(first, dict):
        return {key: mean_entry([e[key] for e in entries]) for key in first}
    return statistics.fmean(entries)


def scenario(
    dataset: Dataset,
    protocol: str,
    models: list[str],
    seeds: range,
    overrides: list[str],
) -> dict[str, Any]:
    """Every model (mean over training seeds) and every baseline on one split."""
    results: dict[str, Any] = {}
    kept: dict[str, QueryFigures] = {}  # each model's per-user figures
    split = run = None
    for name in models:
        preset, model_overrides = MODELS[name]
        base = load_config(PRESETS / preset) if preset else ExperimentConfig()
        runs, per_user = [], []
        for seed in seeds:
            config = apply_overrides(
                base,
                [
                    "data.seed=42",
                    *PROTOCOLS[protocol],
                    *model_overrides,
                    *overrides,
                    f"train.seed={seed}",
                ],
            )
            if split is None:
                split = prepare_split(dataset, config)
            started = time.perf_counter()
            # Each user's figures are kept from the one test evaluation, which
            # "train s" includes as before.
            if name not in TWO_STAGE:
                run, _ = fit_retrieval(config, split=split, keep_queries=True)
                found = entry(run.metrics, time.perf_counter() - started)
                assert run.test_queries is not None
                per_user.append(run.test_queries["exclude_seen"])
            else:
                stages = fit_two_stage(config, split=split, keep_queries=True)
                run = stages.retrieval
                assert stages.ranking_metrics is not None and stages.ranking_queries
                found = entry(run.metrics, time.perf_counter() - started)
                per_user.append(stages.ranking_queries["two_stage"])
                served = stages.ranking_metrics["two_stage"]
                errors = stages.ranking_metrics["standard_errors"]["two_stage"]
                for metric in LISTS:
                    found[metric] = {k: served[metric][k] for k in KS}
                    found["standard_error"][metric] = {k: errors[metric][k] for k in KS}
            # The term's weight as served (picked on validation where it says -1).
            found["session_knn_weight"] = run.session_knn_weight
            runs.append(found)
        results[name] = mean_entry(runs)
        if len(seeds) > 1:
            results[name]["per_seed"] = runs
        kept[name] = seed_mean(per_user)
    assert split is not None and run is not None
    started = time.perf_counter()
    baselines = evaluate_baselines(
        run, split.test, train=split.train, keep_queries=True
    )
    seconds = (time.perf_counter() - started) / max(len(baselines), 1)
    for name, result in baselines.items():
        results[name] = entry(result.to_dict(), seconds)
    if baselines:
        best = max(baselines, key=lambda n: results[n]["ndcg"]["10"])
        theirs = baselines[best].queries["exclude_seen"]
        for name, ours in kept.items():
            results[name]["versus_best_baseline"] = {
                "baseline": best,
                "difference": {
                    m: {k: results[name][m][k] - results[best][m][k] for k in KS}
                    for m in LISTS
                },
                "paired_standard_error": {
                    m: {k: paired_standard_error(ours, theirs, m, int(k)) for k in KS}
                    for m in LISTS
                },
            }
    return results


def seed_mean(found: list[QueryFigures]) -> QueryFigures:
    """Each user's figures averaged over the training seeds (the same split,
    so the same users)."""
    for other in found[1:]:
        assert (other.rows == found[0].rows).all(), "the seeds' users differ"
    values = sum(f.values.astype("float64") for f in found) / len(found)
    return QueryFigures(ks=found[0].ks, rows=found[0].rows, values=values)


def show(title: str, models: dict[str, Any]) -> None:
    rows = [
        [
            name,
            e["hit_rate"]["10"],
            e["ndcg"]["10"],
            e["standard_error"]["ndcg"]["10"],
            e["recall"]["10"],
            e["hit_rate"]["100"],
            e["factorized_top_k"]["100"],
            f"{e['train_seconds']:.1f}",
            versus(e.get("versus_best_baseline")),
        ]
        for name, e in models.items()
    ]
    header = [
        "model",
        "HR@10",
        "NDCG@10",
        "±se",
        "R@10",
        "HR@100",
        "FTopK@100",
        "train s",
        "vs best",
    ]
    print_table(title, header, rows)
    print(
        "±se: the standard error of NDCG@10 over the test users (the mean over "
        "seeds); two rows closer than about twice their combined error are level. "
        "vs best: NDCG@10 less the best baseline's, with its standard error paired "
        "over the same users; ahead or behind past twice it."
    )


def versus(found: dict[str, Any] | None) -> str:
    """The "vs best" cell: NDCG@10's difference from the best baseline, its
    paired standard error and what they make of it."""
    if found is None:
        return ""
    diff = found["difference"]["ndcg"]["10"]
    error = found["paired_standard_error"]["ndcg"]["10"]
    verdict = "level with"
    if abs(diff) > 2 * error:
        verdict = "ahead of" if diff > 0 else "behind"
    return f"{diff:+.4f} ±{error:.4f}, {verdict} {found['baseline']}"


def load(name: str, latest_small: Path) -> Dataset:
    if name == "movielens-latest-small":
        return load_movielens("latest-small", data_dir=latest_small)
    return load_dataset(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--protocols", default="loo,temporal,random", help="comma-separated"
    )
    parser.add_argument(
        "--datasets",
        default="movielens-100k,movielens-latest-small",
        help="comma-separated",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated twostage models",
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first training seed (--seeds 2 --first-seed 1: seeds 1 and 2), "
        "to run seeds apart side by side",
    )
    parser.add_argument("--latest-small", type=Path, default=SHARED)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--validation",
        action="store_true",
        help="for tuning: set each protocol's test rows aside unread and run the "
        "protocol again on the rest",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(MODELS)}")
    results: dict[str, Any] = {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for protocol in args.protocols.split(","):
        if protocol not in PROTOCOLS:
            parser.error(
                f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}"
            )
        for name in args.datasets.split(","):
            dataset = load(name, args.latest_small)
            if args.validation:
                dataset = split_dataset(
                    dataset, method=METHODS[protocol], test_fraction=0.2, seed=42
                ).train
            found = scenario(dataset, protocol, models, seeds, args.set)
            results.setdefault(protocol, {})[name] = found
            show(f"{protocol}, {name} (seen items excluded)", found)
    print(
        f"machine: {machine()}; seeds: {list(seeds)}; overrides: {args.set}; "
        f"{'validation' if args.validation else 'test'} protocol"
    )
    write_json(args.json, results)  # {protocol: {dataset: {model: entry}}}


if __name__ == "__main__":
    main()
