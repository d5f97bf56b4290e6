"""What a diverse list (``recommend --diversity W``) costs and buys, on
MovieLens-100k's seeded random 80/20 split with the default configuration.

Both stages are trained once (training seed ``--seed``); every test user's
list of ``-k`` items is then re-picked from the same candidates at each weight
of ``--weights``, for the served two-stage list and for retrieval's alone
(``--no-ranker``), and then at weight 0 with at most N items a genre
(``--max-per genres=N`` for each N of ``--caps``), and at each weight of
``--by-weights`` with items alike by their genres instead of their embeddings
(``--diversity-by genres``). Figures per setting, seen items excluded: NDCG, Recall and
HitRate at ``k`` on the test rows, intra-list diversity (the mean pairwise
cosine distance of a list's items in the candidate embedding space, and the
mean pairwise Jaccard distance of their genres, a yardstick the model never
read), catalogue coverage (the share of items in some list), the mean
popularity (training rows) of the listed items, the lists' mean length (a
limit leaves a list short where the candidates run out), the seconds to write
every list (``recommend_table``), and the median milliseconds of one request
(``recommend``, the first ``--requests`` test users, as a server answers one). The model's lists are not tuned here:
weight 0 is the default and the table shows what each weight trades.

    python benchmarks/diversity.py --json benchmarks/results/diversity.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import ITEM
from twostage.list_evaluation import list_figures, served_lists
from twostage.recommender import Recommender
from twostage.retrieval.evaluation import eval_queries
from twostage.two_stage import fit_two_stage


def genre_sets(rec: Recommender, column: str) -> list[frozenset[str]]:
    """Each item index's genres (the padding row: none)."""
    items = rec.items or []
    out = [frozenset[str]()] * (len(items) + 1)
    for index, row in enumerate(items):
        value = row.get(column)
        if isinstance(value, str):
            value = [part for part in value.split("|") if part]
        out[index] = frozenset(value or [])
    return out


def genre_distance(lists: list[list[int]], genres: list[frozenset[str]]) -> float:
    """Mean over lists of the mean pairwise Jaccard distance of the items' genres."""
    means = []
    for items in lists:
        pairs = [
            1 - len(genres[a] & genres[b]) / max(1, len(genres[a] | genres[b]))
            for i, a in enumerate(items)
            for b in items[i + 1 :]
        ]
        if pairs:
            means.append(sum(pairs) / len(pairs))
    return float(np.mean(means)) if means else float("nan")


def measure(
    rec: Recommender,
    queries: Any,
    k: int,
    weight: float,
    use_ranker: bool,
    genres: list[frozenset[str]] | None,
    popularity: np.ndarray,
    max_per: dict[str, int] | None = None,
    by: str | None = None,
    requests: int = 200,
) -> dict[str, float]:
    """One setting's figures over every test user's served list: the library's
    (``twostage.list_evaluation``), and the genres' spread and popularity."""
    started = time.perf_counter()
    topk = served_lists(
        rec,
        queries,
        k,
        use_ranker=use_ranker,
        diversity=weight,
        max_per=max_per,
        diversity_by=by,
    )
    seconds = time.perf_counter() - started
    times = []
    for user in queries.user_ids.to_list()[:requests]:
        began = time.perf_counter()
        rec.recommend(
            user,
            k,
            use_ranker=use_ranker,
            diversity=weight,
            max_per=max_per,
            diversity_by=by,
        )
        times.append(time.perf_counter() - began)
    figures = list_figures(rec, queries, topk, k)
    lists = [[i for i in row if i >= 0] for row in topk.tolist()]
    listed = topk[topk > 0].numpy()
    return {
        **figures,
        "ild_embedding": figures["intra_list_diversity"],
        "ild_genres": genre_distance(lists, genres) if genres else float("nan"),
        "mean_popularity": float(popularity[listed].mean()),
        "seconds": seconds,
        "request_ms": float(np.median(times)) * 1000 if times else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="0,0.1,0.2,0.3,0.5,0.7,1")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument(
        "--caps",
        default="1,2,3",
        help="limits N of --max-per GENRES=N to measure (empty: none)",
    )
    parser.add_argument(
        "--by-weights",
        default="0.3,0.5,0.7",
        help="weights to measure with items alike by their genres (empty: none)",
    )
    parser.add_argument(
        "--requests", type=int, default=200, help="single requests timed a setting"
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument(
        "--set", action="append", default=[], help="config override, repeatable"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    config = apply_overrides(
        ExperimentConfig(),
        [f"data.dataset={args.dataset}", f"train.seed={args.seed}", *args.set],
    )
    started = time.perf_counter()
    trained = fit_two_stage(config, evaluate_test=False)
    train_seconds = time.perf_counter() - started
    rec = trained.recommender()
    queries = eval_queries(trained.retrieval, trained.split.test)
    column = next(
        (c for c in ("genres", "genre", "category") if c in rec.item_feature_columns),
        None,
    )
    if column is None and rec.items and "genres" in rec.items[0]:
        column = "genres"
    genres = genre_sets(rec, column) if column else None
    counts = np.bincount(
        rec.item_vocab.transform(trained.split.fit.interactions[ITEM]),
        minlength=rec.item_vocab.size,
    ).astype(np.float64)
    caps = [int(c) for c in args.caps.split(",") if c] if column else []
    by_weights = [float(w) for w in args.by_weights.split(",") if w] if column else []
    settings: list[tuple[str, float, dict[str, int] | None, str | None]] = [
        (f"{w:g}", w, None, None) for w in weights
    ]
    settings += [(f"{column}<={n}", 0.0, {str(column): n}, None) for n in caps]
    settings += [(f"{w:g} by {column}", w, None, column) for w in by_weights]
    results: dict[str, dict[str, dict[str, float]]] = {}
    stages = [("two_stage", True)] if rec.ranker is not None else []
    stages.append(("retrieval", False))
    for stage, use_ranker in stages:
        results[stage] = {}
        for name, weight, limits, by in settings:
            results[stage][name] = measure(
                rec,
                queries,
                args.k,
                weight,
                use_ranker,
                genres,
                counts,
                limits,
                by,
                args.requests,
            )
        base = results[stage][settings[0][0]]
        rows = []
        for name, *_ in settings:
            got = results[stage][name]
            change = got["ndcg"] / base["ndcg"] - 1 if base["ndcg"] else float("nan")
            rows.append(
                [
                    name,
                    got["ndcg"],
                    f"{change:+.1%}",
                    got["recall"],
                    got["hit_rate"],
                    got["ild_embedding"],
                    got["ild_genres"],
                    got["coverage"],
                    f"{got['mean_popularity']:.0f}",
                    f"{got['mean_length']:.2f}",
                    f"{got['seconds']:.2f}",
                    f"{got['request_ms']:.1f}",
                ]
            )
        k = args.k
        print_table(
            f"{args.dataset}, random split, {stage.replace('_', '-')} list, "
            f"{len(queries.user_ids)} test users",
            [
                "diversity / limit",
                f"NDCG@{k}",
                f"vs {settings[0][0]}",
                f"R@{k}",
                f"HR@{k}",
                "ILD emb",
                "ILD genres",
                f"Cov@{k}",
                "mean pop",
                "length",
                "lists s",
                "ms/request",
            ],
            rows,
        )
    console.print(
        f"trained both stages in {train_seconds:.0f} s; genres from "
        f"{column or 'nothing (no genre column)'}"
    )
    write_json(
        args.json,
        {
            "machine": machine(),
            "dataset": args.dataset,
            "k": args.k,
            "seed": args.seed,
            "train_seconds": train_seconds,
            "genre_column": column,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
