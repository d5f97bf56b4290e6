"""Items added after training (``Recommender.add_items``) on MovieLens-100k: how
well an item the model never trained on is served from its features alone.

A random ``--fraction`` of the items (seed ``--seed``) is held out: every rating
of them leaves the log, and both stages train on the rest (random 80/20 split,
``data.seed=42``, side features on: the items' genres and year, the users' age,
gender and occupation). The held-out items are then added to the catalogue from
the item table, as ``twostage add-items`` adds them. Their ratings (every one,
whatever its rating) are what each user should find:

- *among the added items*: each user who rated one gets the added items ranked
  for them (``recommend(..., candidates=added)``): two-stage, retrieval alone,
  and two orders without the model: the genres' popularity in the training log
  (each item scores the summed log-counts of its genres' training rows), and a
  random order (the mean of 20 shuffles);
- *in the whole catalogue*: the share of those users whose top ``k`` list over
  every item (their training items excluded) holds an added item they rated,
  against what the same list holds of their rated trained items' test rows.

It also times ``add_items`` for the held-out items and for ``--many`` copies of
them (new IDs), the index rebuilt each time (the median of three calls).

    python benchmarks/added_items.py --json benchmarks/results/added_items.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, median, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import Dataset
from twostage.data.registry import load_dataset
from twostage.recommender import Recommender
from twostage.two_stage import fit_two_stage

CONFIG = [
    "data.split=random",
    "data.test_fraction=0.2",
    "data.seed=42",
    "retrieval.use_side_features=true",
]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=10, help="list length")
    parser.add_argument("--many", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    dataset = load_dataset("movielens-100k")
    assert dataset.items is not None
    rng = np.random.default_rng(args.seed)
    items = dataset.items["item_id"].to_numpy()
    held = np.sort(rng.choice(items, int(len(items) * args.fraction), replace=False))
    out = pl.col("item_id").is_in(pl.Series(held).implode())
    rows = dataset.interactions
    trained_on = Dataset(
        name=dataset.name,
        interactions=rows.filter(~out),
        users=dataset.users,
        items=dataset.items,
        source=dataset.source,
    )
    config = apply_overrides(
        ExperimentConfig(), [*CONFIG, f"train.num_threads={args.threads}", *args.set]
    )
    started = time.perf_counter()
    stages = fit_two_stage(config, trained_on, evaluate_test=False)
    train_seconds = time.perf_counter() - started
    base = stages.recommender(items=dataset.items)
    table = dataset.items.filter(out)
    rec, add_seconds = _timed(base, table)

    rated = (
        rows.filter(out).group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
    )
    known = [u for u in rated["user_id"].to_list() if base.user_vocab.contains(u)]
    relevant = dict(
        zip(rated["user_id"].to_list(), rated["item_id"].to_list(), strict=True)
    )
    added = [int(i) for i in held]
    orders = _orders(rec, known, added, args.k, _genre_scores(trained_on, table))
    rows_out = {
        name: _quality(lists, relevant, args.k) for name, lists in orders.items()
    }
    rows_out["random order (mean of 20)"] = _random(known, added, relevant, args.k)
    catalogue = _catalogue_share(rec, known, relevant, stages, args.k)

    copies = _copies(table, args.many, int(items.max()) + 10_000)
    many_seconds = _timed(base, copies)[1]

    payload = {
        "machine": machine(),
        "trained_items": base.item_vocab.size - 1,
        "added_items": len(added),
        "users": len(known),
        "held_out_ratings": int(rows.filter(out).height),
        "train_seconds": train_seconds,
        "add_seconds": add_seconds,
        "add_many": {"items": args.many, "seconds": many_seconds},
        "among_added": rows_out,
        "whole_catalogue": catalogue,
    }
    _report(payload, args.k)
    write_json(args.json, payload)
    return payload


def _timed(base: Recommender, table: pl.DataFrame) -> tuple[Recommender, float]:
    """``base.add_items(table)`` and the median seconds of three calls."""
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        rec = base.add_items(table)
        seconds.append(time.perf_counter() - started)
    return rec, median(seconds)


def _orders(
    rec: Recommender,
    users: list[Any],
    added: list[int],
    k: int,
    genre: dict[int, float],
) -> dict[str, dict[Any, list[int]]]:
    """Each user's top ``k`` of the added items, by each order."""
    by_genre = sorted(added, key=lambda i: (-genre[i], i))[:k]
    lists: dict[str, dict[Any, list[int]]] = {
        "two-stage": {},
        "retrieval alone": {},
        "genres' popularity": {u: by_genre for u in users},
    }
    for user in users:
        for name, ranker in (("two-stage", True), ("retrieval alone", False)):
            answer = rec.recommend(
                user, k, candidates=added, exclude_seen=False, use_ranker=ranker
            )
            lists[name][user] = [i["item_id"] for i in answer.items]
    return lists


def _genre_scores(trained_on: Dataset, table: pl.DataFrame) -> dict[int, float]:
    """Each added item's summed log training count of its genres."""
    assert trained_on.items is not None
    counts = (
        trained_on.interactions.join(trained_on.items, on="item_id")
        .explode("genres")
        .group_by("genres")
        .len()
    )
    log_count = {g: math.log1p(n) for g, n in counts.iter_rows()}
    return {
        int(item): sum(log_count.get(g, 0.0) for g in genres or [])
        for item, genres in table.select("item_id", "genres").iter_rows()
    }


def _quality(
    lists: dict[Any, list[int]], relevant: dict[Any, list[int]], k: int
) -> dict[str, float]:
    """Means over users of HR@k, Recall@k and NDCG@k."""
    hits, recalls, ndcgs = [], [], []
    for user, top in lists.items():
        wanted = set(relevant[user])
        gains = [1.0 if item in wanted else 0.0 for item in top[:k]]
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(wanted), k)))
        hits.append(float(any(gains)))
        recalls.append(sum(gains) / len(wanted))
        ndcgs.append(sum(g / math.log2(r + 2) for r, g in enumerate(gains)) / ideal)
    return {
        f"hit_rate@{k}": float(np.mean(hits)),
        f"recall@{k}": float(np.mean(recalls)),
        f"ndcg@{k}": float(np.mean(ndcgs)),
    }


def _random(
    users: list[Any], added: list[int], relevant: dict[Any, list[int]], k: int
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    draws = [
        _quality({u: list(rng.permutation(added)[:k]) for u in users}, relevant, k)
        for _ in range(20)
    ]
    return {name: float(np.mean([d[name] for d in draws])) for name in draws[0]}


def _catalogue_share(
    rec: Recommender,
    users: list[Any],
    relevant: dict[Any, list[int]],
    stages: Any,
    k: int,
) -> dict[str, float]:
    """Over the whole catalogue (training items excluded), the share of users
    whose top ``k`` holds an added item they rated, one of their test items, and
    the share of added items among all the lists' entries."""
    test = stages.split.test.interactions.group_by("user_id").agg(pl.col("item_id"))
    tested = dict(
        zip(test["user_id"].to_list(), test["item_id"].to_list(), strict=True)
    )
    added_hit, test_hit, added_share = [], [], []
    for user in users:
        top = [i["item_id"] for i in rec.recommend(user, k).items]
        added_hit.append(bool(set(top) & set(relevant[user])))
        test_hit.append(bool(set(top) & set(tested.get(user, []))))
        added_share.append(
            sum(rec.item_vocab.lookup(i) >= rec.num_trained_items for i in top)
            / max(len(top), 1)
        )
    return {
        f"hit_rate@{k}_added": float(np.mean(added_hit)),
        f"hit_rate@{k}_test": float(np.mean(test_hit)),
        "added_share_of_lists": float(np.mean(added_share)),
    }


def _copies(table: pl.DataFrame, n: int, start: int) -> pl.DataFrame:
    """``n`` rows of ``table`` again under new IDs from ``start``."""
    reps = -(-n // table.height)
    many = pl.concat([table] * reps).head(n)
    return many.with_columns(pl.Series("item_id", np.arange(start, start + n)))


def _report(payload: dict[str, Any], k: int) -> None:
    console.print(
        f"MovieLens-100k: {payload['added_items']} items held out of training "
        f"({payload['held_out_ratings']:,} ratings) and added from their features "
        f"to a catalogue of {payload['trained_items']:,}; {payload['users']} users "
        f"rated one. Training {payload['train_seconds']:.1f} s; add_items "
        f"{payload['add_seconds']:.3f} s, {payload['add_many']['items']:,} items "
        f"{payload['add_many']['seconds']:.2f} s."
    )
    rows = [[name, *values.values()] for name, values in payload["among_added"].items()]
    print_table(
        "Ranking the added items for each user who rated one",
        ["order", f"HR@{k}", f"R@{k}", f"NDCG@{k}"],
        rows,
    )
    whole = payload["whole_catalogue"]
    print_table(
        f"The whole catalogue, top {k} (training items excluded)",
        ["figure", "value"],
        [[name, value] for name, value in whole.items()],
    )


if __name__ == "__main__":
    main()
