"""Lists for many sessions at once (``Recommender.recommend_sessions``, ``twostage
recommend --sessions``): the batched path against ``recommend(session=...)`` one
session at a time, with and without the ranking stage.

The sessions are each MovieLens-100k user's latest ``--length`` rows (their
times kept), anonymous, repeated ``--repeat`` times under new session IDs. The
model is ``--bundle`` or, by default, ``presets/retrieval-sequence-ease.json``
trained here with its ranking stage (leave-last-out split, ``data.seed=42``).
Rows of items the model never trained on are left out (one session's
``recommend`` refuses them). Times are the median of ``--runs`` calls; the
lists are checked to agree. ``--set KEY=VALUE`` changes the preset (say
``retrieval.query_fields=user_id,hour_of_day`` for a model that reads the
request's context), and ``--context SECONDS`` gives every list that moment
(``context={"timestamp": SECONDS}``).

    python benchmarks/session_batch.py --json benchmarks/results/session_batch.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, machine, median, print_table, write_json
from twostage.config import apply_overrides, load_config
from twostage.data.registry import load_dataset
from twostage.recommender import Recommender, load
from twostage.two_stage import fit_two_stage

PRESET = (
    Path(__file__).resolve().parent.parent / "presets" / "retrieval-sequence-ease.json"
)


def sessions_table(length: int, repeat: int) -> pl.DataFrame:
    """Each user's latest ``length`` rows as an anonymous session, ``repeat``
    times over (session IDs ``copy * 10**6 + user``)."""
    log = load_dataset("movielens-100k").interactions.sort("timestamp")
    latest = log.group_by("user_id", maintain_order=True).tail(length)
    copies = [
        latest.select(
            (pl.col("user_id") + copy * 10**6).alias("session_id"),
            "item_id",
            "timestamp",
        )
        for copy in range(repeat)
    ]
    return pl.concat(copies)


def one_at_a_time(
    rec: Recommender,
    table: pl.DataFrame,
    k: int,
    use_ranker: bool,
    context: dict[str, Any] | None = None,
) -> list[list[Any]]:
    """Each session's list from ``recommend``, in the table's session order."""
    lists = []
    for (_,), rows in table.group_by("session_id", maintain_order=True):
        entries = rows.select("item_id", "timestamp").to_dicts()
        answer = rec.recommend(
            None, k, session=entries, use_ranker=use_ranker, context=context
        )
        lists.append([item["item_id"] for item in answer.items])
    return lists


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a saved bundle to time")
    parser.add_argument("--length", type=int, default=5, help="rows per session")
    parser.add_argument("--repeat", type=int, default=1, help="copies of the sessions")
    parser.add_argument("-k", type=int, default=10, help="list length")
    parser.add_argument("--runs", type=int, default=3, help="calls per figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--set", action="append", default=[], help="KEY=VALUE for the preset"
    )
    parser.add_argument("--context", type=int, help="every list's moment (seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.bundle is not None:
        rec = load(args.bundle)
    else:
        config = apply_overrides(
            load_config(PRESET),
            ["data.split=leave-last-out", "data.seed=42", *args.set],
        )
        rec = fit_two_stage(config, evaluate_test=False).recommender()
    context = None if args.context is None else {"timestamp": args.context}
    table = sessions_table(args.length, args.repeat)
    # Items the model never trained on: one session's `recommend` refuses them.
    known = table["item_id"].is_in(rec.item_vocab.values.implode())
    dropped = int((~known).sum())
    table = table.filter(known)
    count = table["session_id"].n_unique()
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for use_ranker in (True, False):
        if use_ranker and rec.ranker is None:
            continue
        timed: dict[str, float] = {}
        for mode in ("batched", "one at a time"):
            seconds = []
            for _ in range(args.runs):
                started = time.perf_counter()
                if mode == "batched":
                    found = rec.recommend_sessions(
                        table, args.k, use_ranker=use_ranker, context=context
                    )
                    batched = [
                        rows_["item_id"].to_list()
                        for _, rows_ in found.lists.group_by(
                            "session_id", maintain_order=True
                        )
                    ]
                else:
                    alone = one_at_a_time(rec, table, args.k, use_ranker, context)
                seconds.append(time.perf_counter() - started)
            timed[mode] = median(seconds)
        same = sum(a == b for a, b in zip(batched, alone, strict=True)) / count
        name = "with the ranker" if use_ranker else "retrieval alone"
        results[name] = {
            "batched_s": timed["batched"],
            "one_at_a_time_s": timed["one at a time"],
            "speed_up": timed["one at a time"] / timed["batched"],
            "same_lists": same,
        }
        figures = results[name]
        rows.append(
            [
                name,
                figures["batched_s"],
                figures["one_at_a_time_s"],
                figures["speed_up"],
                same,
            ]
        )
    print_table(
        f"{count:,} sessions of {args.length} rows, k={args.k} (median of {args.runs})",
        ["lists", "batched s", "one at a time s", "speed-up", "same lists"],
        rows,
    )
    console.print(
        f"{dropped:,} rows of items the model does not know left out; "
        f"machine: {machine()}"
    )
    payload = {
        "sessions": count,
        "length": args.length,
        "k": args.k,
        "rows_left_out": dropped,
        "overrides": args.set,
        "context": context,
        **results,
    }
    write_json(args.json, {**payload, "machine": machine()})
    return payload


if __name__ == "__main__":
    main()
