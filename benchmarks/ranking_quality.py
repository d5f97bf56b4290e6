"""Ranking quality on MovieLens-100k, seeded random 80/20 split (``data.seed=42``).

Trains the ID-only retrieval model, then the ranker (DCN-v2 with biases, history and
the retrieval features) on the same training split, using the retrieval run's own
validation carve-out for early stopping and for picking the two-stage blend. Reports
the rating head's RMSE/MAE and the click head's AUC on the test pairs, the list quality
of retrieval alone and of retrieve-then-re-rank, and the RMSE of the TFRS basic
ranking model (a 256-64-1 MLP over the user and item ID embeddings) on the same split.
Last, it saves the two-stage Recommender as a bundle, loads it back, and times
``recommend(user_id, k=10)`` for one user at a time (the ranker's ``num_candidates``
re-ranked) on one torch thread: warm-up, then ``--latency-calls`` calls over random
known users, and with a client's list of 100 candidates, all known or half of them
new items sent with their features. ``--candidates-sweep`` repeats the list metrics and the timing with fewer
(or more) candidates re-ranked, the serving-time knob (``twostage serve --candidates``).
When retrieval reads per-interaction context (``--set
retrieval.query_fields=hour_of_day,day_of_week``), the ranker reads each row's own
(``ranking.use_context``), every test row is its own query, and a second ranker
trained with the context unknown is measured beside it on the same retrieval run.

    python benchmarks/ranking_quality.py --json benchmarks/results/ranking_quality.json

The quality figures do not depend on ``--threads``. On a 2-core machine that other jobs
also load, ``--threads 1`` can be much faster than 2 (torch's threads wait on each
other); the latency tail (p99) grows with that load too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, print_table, write_json
from twostage.config import ExperimentConfig, RankingConfig, apply_overrides
from twostage.data.registry import load_dataset
from twostage.ranking import RankingRun, evaluate_ranking, fit_ranking
from twostage.recommender import Recommender, load
from twostage.retrieval.run import RetrievalRun
from twostage.two_stage import fit_two_stage

KS = ("1", "5", "10", "50", "100")
RETRIEVAL = [
    "data.split=random",
    "data.test_fraction=0.2",
    "data.seed=42",
    "retrieval.use_side_features=false",
    "retrieval.history_length=200",
]
# The TFRS basic ranking tutorial's model: ID embeddings -> 256 -> 64 -> 1, MSE only.
BASELINE = RankingConfig(
    architecture="mlp",
    use_history=False,
    use_biases=False,
    use_retrieval_features=False,
    click_weight=0.0,
    num_hard_negatives=0,
    num_random_negatives=0,
    dropout=0.0,
    blend_weight=0.0,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ranking config key, e.g. --set ranking.epochs=5 (repeatable)",
    )
    parser.add_argument(
        "--latency-calls",
        type=int,
        default=1000,
        help="timed recommend() calls, one random known user each",
    )
    parser.add_argument(
        "--candidates-sweep",
        default="100,150,200",
        help="comma-separated candidate counts (>= 100) to re-rank in the sweep",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    dataset = load_dataset("movielens-100k")
    config = apply_overrides(ExperimentConfig(), [*RETRIEVAL, *args.set])

    started = time.perf_counter()
    # The ranker validates on the retrieval run's own carve-out: neither stage
    # trains on it.
    stages = fit_two_stage(config, dataset, evaluate_test=False)
    run, ranking, split = stages.retrieval, stages.ranker, stages.split
    if ranking is None:  # pragma: no cover - fit_two_stage trains it by default
        raise SystemExit("the ranking stage was not trained")
    train_seconds = time.perf_counter() - started
    retrieval_seconds = train_seconds - ranking.train_seconds
    test = split.test
    result = evaluate_ranking(ranking, test)
    without_context = None
    if ranking.reads_context:  # the same retrieval, a ranker blind to the context
        plain = dataclasses.replace(ranking.config, use_context=False)
        blind = fit_ranking(run, split.fit, config=plain, validation=split.validation)
        found = evaluate_ranking(blind, test)
        without_context = {
            key: found[key]
            for key in ("rmse", "auc", "two_stage", "blend_weight")
            if key in found
        }

    baseline_started = time.perf_counter()
    baseline = fit_ranking(run, split.fit, config=BASELINE, validation=split.validation)
    baseline_rmse = evaluate_ranking(baseline, test)["rmse"]
    baseline_seconds = time.perf_counter() - baseline_started
    latency = _latency(run, ranking, dataset.items, calls=args.latency_calls)
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.candidates_sweep.split(",") if c.strip()]
    sweep = _candidates_sweep(run, ranking, test, dataset.items, counts, calls=300)
    torch.set_num_threads(args.threads)

    payload = {
        "dataset": "movielens-100k",
        "split": "random 80/20, data.seed=42",
        "rmse": result["rmse"],
        "mae": result["mae"],
        "auc": result["auc"],
        "retrieval_only": result["retrieval_only"],
        "two_stage": result["two_stage"],
        "blend_weight": result["blend_weight"],
        "num_candidates": result["num_candidates"],
        "reads_context": ranking.reads_context,
        "without_context": without_context,
        "baseline_mlp_rmse": baseline_rmse,
        **latency,
        "candidates_sweep": sweep,
        "train_seconds": train_seconds,
        "retrieval_seconds": retrieval_seconds,
        "ranking_seconds": ranking.train_seconds,
        "ranking_epochs": len(ranking.history),
        "baseline_mlp_seconds": baseline_seconds,
        "total_seconds": time.perf_counter() - started,
        "ranking_config": ranking.config.__dict__,
        "machine": machine(),
    }
    _report(payload)
    write_json(args.json, payload)
    return payload


def _latency(
    run: RetrievalRun, ranking: RankingRun, items: Any, *, calls: int
) -> dict[str, Any]:
    """Milliseconds per ``recommend(user_id, k=10)`` of the saved, reloaded bundle.

    One torch thread (a server worker's setting); 200 warm-up calls fill the caches
    (query embeddings, the ranker's item rows); then ``calls`` seeded random known
    users. The same for the bundle without its ranker, for scale.
    """
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        Recommender(run, items=items, ranker=ranking).save(Path(tmp) / "1")
        rec = load(Path(tmp) / "1")
    users = rec.user_vocab.values.to_list()
    picks = np.random.default_rng(0).integers(0, len(users), calls + 200)

    def timed(recommender: Recommender) -> np.ndarray:
        times = []
        for n, pick in enumerate(picks):
            start = time.perf_counter()
            recommender.recommend(users[pick], 10)
            if n >= 200:  # the first 200 calls are the warm-up
                times.append(time.perf_counter() - start)
        return np.asarray(times) * 1000

    two_stage = timed(rec)
    retrieval = timed(Recommender(rec.run, items=items))
    # A client's list of 100 candidates: known items only, then half of them new
    # items (IDs the model never saw, sent with the features it reads: each as a
    # known item's, under a new ID), ranked from those features.
    catalogue = rec.item_vocab.values.to_list()
    listed = [catalogue[i] for i in np.random.default_rng(2).permutation(100)]
    table = {} if items is None else {r["item_id"]: r for r in items.to_dicts()}
    columns = rec.item_feature_columns
    fresh = [
        {
            "item_id": 10**9 + n,
            **{c: table.get(i, {}).get(c) for c in columns},
        }
        for n, i in enumerate(listed[50:])
    ]

    def timed_list(candidates: list[Any]) -> np.ndarray:
        times = []
        for n, pick in enumerate(picks):
            start = time.perf_counter()
            rec.recommend(users[pick], 10, candidates=candidates, exclude_seen=False)
            if n >= 200:
                times.append(time.perf_counter() - start)
        return np.asarray(times) * 1000

    known_list = timed_list(listed)
    new_list = timed_list([*listed[:50], *fresh])
    return {
        "latency_ms_p50": float(np.percentile(two_stage, 50)),
        "latency_ms_p99": float(np.percentile(two_stage, 99)),
        "latency_ms_p50_retrieval_only": float(np.percentile(retrieval, 50)),
        "latency_ms_p99_retrieval_only": float(np.percentile(retrieval, 99)),
        "latency_ms_p50_100_known_candidates": float(np.percentile(known_list, 50)),
        "latency_ms_p99_100_known_candidates": float(np.percentile(known_list, 99)),
        "latency_ms_p50_50_new_candidates": float(np.percentile(new_list, 50)),
        "latency_ms_p99_50_new_candidates": float(np.percentile(new_list, 99)),
        "latency_calls": calls,
        "latency_candidates": rec.num_candidates,
        "latency_threads": 1,
    }


def _candidates_sweep(
    run: RetrievalRun,
    ranking: RankingRun,
    test: Any,
    items: Any,
    counts: list[int],
    *,
    calls: int,
) -> list[dict[str, Any]]:
    """List metrics and ``recommend`` latency with ``c`` candidates re-ranked, per ``c``.

    The ranker is the same; only how many retrieved items it re-orders changes.
    """
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        Recommender(run, items=items, ranker=ranking).save(Path(tmp) / "1")
        rec = load(Path(tmp) / "1")
    users = rec.user_vocab.values.to_list()
    picks = np.random.default_rng(1).integers(0, len(users), calls + 100)
    for count in counts:
        config = dataclasses.replace(ranking.config, num_candidates=count)
        result = evaluate_ranking(dataclasses.replace(ranking, config=config), test)
        times = []
        for n, pick in enumerate(picks):
            start = time.perf_counter()
            rec.recommend(users[pick], 10, num_candidates=count)
            if n >= 100:
                times.append(time.perf_counter() - start)
        ms = np.asarray(times) * 1000
        rows.append(
            {
                "candidates": count,
                "ndcg_10": _at(result["two_stage"]["ndcg"], 10),
                "hit_rate_10": _at(result["two_stage"]["hit_rate"], 10),
                "latency_ms_p50": float(np.percentile(ms, 50)),
                "latency_ms_p99": float(np.percentile(ms, 99)),
            }
        )
    return rows


def _at(values: dict[Any, float], k: int) -> float:
    return float(values[k] if k in values else values[str(k)])


def _report(payload: dict[str, Any]) -> None:
    print_table(
        "Rating and click heads (test pairs)",
        ["model", "RMSE", "MAE", "AUC"],
        [
            ["twostage ranker", payload["rmse"], payload["mae"], payload["auc"]],
            ["TFRS-style MLP", payload["baseline_mlp_rmse"], "-", "-"],
        ],
    )
    rows = []
    for metric in ("ndcg", "hit_rate"):
        for k in KS:
            before = payload["retrieval_only"][metric][k]
            after = payload["two_stage"][metric][k]
            rows.append([f"{metric}@{k}", before, after, after - before])
    print_table(
        f"Lists (top {payload['num_candidates']} retrieved, re-ranked with blend "
        f"weight {payload['blend_weight']})",
        ["metric", "retrieval only", "two stage", "change"],
        rows,
    )
    blind = payload.get("without_context")
    if blind:
        print_table(
            "The ranker reading each test row's context, against one trained "
            "with it unknown (the same retrieval run)",
            ["ranker", "RMSE", "AUC", "NDCG@10", "HR@10", "blend"],
            [
                [
                    name,
                    figures.get("rmse", "-"),
                    figures["auc"],
                    figures["two_stage"]["ndcg"]["10"],
                    figures["two_stage"]["hit_rate"]["10"],
                    figures["blend_weight"],
                ]
                for name, figures in (("reads the context", payload), ("blind", blind))
            ],
        )
    print_table(
        f"recommend(user_id, k=10) on the reloaded bundle, {payload['latency_calls']} "
        "calls, 1 thread",
        ["stages", "p50 ms", "p99 ms"],
        [
            [
                "retrieve, re-rank",
                payload["latency_ms_p50"],
                payload["latency_ms_p99"],
            ],
            [
                "retrieval only",
                payload["latency_ms_p50_retrieval_only"],
                payload["latency_ms_p99_retrieval_only"],
            ],
            [
                "candidates=100 known items",
                payload["latency_ms_p50_100_known_candidates"],
                payload["latency_ms_p99_100_known_candidates"],
            ],
            [
                "candidates=50 known + 50 new items",
                payload["latency_ms_p50_50_new_candidates"],
                payload["latency_ms_p99_50_new_candidates"],
            ],
        ],
    )
    if payload["candidates_sweep"]:
        print_table(
            "Candidates re-ranked: list quality and recommend() latency (1 thread)",
            ["candidates", "NDCG@10", "HR@10", "p50 ms", "p99 ms"],
            [
                [
                    row["candidates"],
                    row["ndcg_10"],
                    row["hit_rate_10"],
                    row["latency_ms_p50"],
                    row["latency_ms_p99"],
                ]
                for row in payload["candidates_sweep"]
            ],
        )
    console.print(
        f"trained in {payload['train_seconds']:.1f} s (retrieval "
        f"{payload['retrieval_seconds']:.1f} s, ranker {payload['ranking_seconds']:.1f}"
        f" s, {payload['ranking_epochs']} epochs); whole run "
        f"{payload['total_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
