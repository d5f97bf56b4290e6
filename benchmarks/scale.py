"""Scale: a log written straight to Parquet, the streaming data pass against a bare
polars scan (time and peak RSS, each phase in its own process), and data-parallel
training with 1 and 2 gloo ranks on MovieLens-100k (throughput, the cost of gathering
negatives, and quality with the same global batch).

    python benchmarks/scale.py --rows 100000000 --users 10000000 --items 2000000 \\
        --json benchmarks/results/scale.json

Defaults are smaller (10M rows) so that a run takes about a minute.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_gib, print_table, write_json

#: Each in its own process: wall time and peak RSS per phase.
PHASES = (
    "write",
    "vocabularies",
    "polars-scan",
    "min-counts",
    "duplicates",
    "filters-2-ranks",
    "shown-rows",
    "train",
    "train-streamed",
    "baseline-rows",
    "itemknn",
    "sample-users",
    "sample-fraction",
    "split-files",
)


def _phase(name: str, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Run one phase in a fresh process; its wall time and peak RSS come back."""
    command = [
        *(sys.executable, __file__, "--phase", name, "--dir", str(directory)),
        *("--rows", str(args.rows), "--users", str(args.users)),
        *("--items", str(args.items), "--rows-per-group", str(args.rows_per_group)),
        *("--steps", str(args.steps), "--history", str(args.history)),
        *("--split", args.split),
        *("--validation-fraction", str(args.validation_fraction)),
        *("--min-rows", str(args.min_rows)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import polars as pl

    from twostage.data.streaming import fit_vocabularies, parquet_files
    from twostage.data.synthetic import write_parquet

    started = time.perf_counter()
    out: dict[str, Any] = {}
    if name == "write":
        files = write_parquet(
            args.dir,
            num_users=args.users,
            num_items=args.items,
            num_interactions=args.rows,
            rows_per_group=args.rows_per_group,
            rows_per_file=10 * args.rows_per_group,
        )
        out["files"] = len(files)
        out["bytes"] = sum(f.stat().st_size for f in files)
    elif name == "vocabularies":
        fitted = fit_vocabularies(
            args.dir,
            method=args.split,
            test_fraction=0.2,
            seed=42,
            validation_fraction=args.validation_fraction,
        )
        out.update(
            users=fitted.users.size - 1,
            items=fitted.items.size - 1,
            train_rows=fitted.num_train_rows,
            validation_rows=fitted.num_validation_rows,
            test_rows=fitted.num_test_rows,
        )
    elif name == "min-counts":
        # The k-core of a streamed run (--min-user-rows / --min-item-rows): one
        # pass over the user and item columns per round.
        from twostage.data.streaming import Reading, min_count_ids

        minimum = args.min_rows
        removed = min_count_ids(
            args.dir, Reading(min_user_rows=minimum, min_item_rows=minimum)
        ).removed
        out.update(removed.to_dict())
    elif name == "duplicates":
        # --duplicates first on a stream: a hash and a row number per row, then
        # the rows whose hash repeats compared exactly.
        from twostage.data.streaming import Reading, duplicate_rows

        out["dropped"] = int(duplicate_rows(args.dir, Reading(duplicates="first")).size)
    elif name == "filters-2-ranks":
        out.update(_filters_two_ranks(args))
    elif name == "shown-rows":
        out.update(_shown_rows(args))
    elif name == "train":
        out.update(_train_steps(args, streamed=False))
    elif name == "train-streamed":
        out.update(_train_steps(args, streamed=True))
    elif name == "baseline-rows":
        out.update(_baseline_rows(args))
    elif name == "itemknn":
        out.update(_itemknn_fit(args))
    elif name in ("sample-users", "sample-fraction"):
        # `twostage data sample`: every row of 1% of the users to one file.
        from twostage.data.sample import sample_log_users

        with tempfile.TemporaryDirectory() as folder:
            share = (
                {"users": max(1, args.users // 100)}
                if name == "sample-users"
                else {"fraction": 0.01}
            )
            drawn = sample_log_users(args.dir, Path(folder) / "s.parquet", **share)
        out.update(sampled_users=drawn.users, sampled_rows=drawn.rows)
    elif name == "split-files":
        # `twostage data split` of the stream (--split): both sides to files.
        from twostage.data.streamed_split import write_streamed_split

        with tempfile.TemporaryDirectory() as folder:
            written = write_streamed_split(
                args.dir,
                Path(folder) / "train.parquet",
                Path(folder) / "test.parquet",
                method=args.split,
            )
        out.update(train_rows=written.train_rows, test_rows=written.test_rows)
    elif name == "polars-scan":
        # The floor: count every user and item with polars' streaming engine, no
        # split and no vocabulary.
        files = [str(f) for f in parquet_files(args.dir)]
        for column in ("user_id", "item_id"):
            counts = (
                pl.scan_parquet(files)
                .group_by(column)
                .len()
                .collect(engine="streaming")
            )
            out[column] = counts.height
    out["seconds"] = time.perf_counter() - started
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def _shown_rows(args: argparse.Namespace) -> dict[str, Any]:
    """The log as an impression log (a ``clicked`` column, 1 for a tenth of the
    rows by a hash of the row, written beside it with polars' streaming engine),
    then what a streamed two-stage run does with its rows shown and not chosen
    before the ranker trains (:func:`twostage.retrieval.streamed.streamed_shown`,
    the training side kept as vocabulary indices): its seconds and the RSS it adds
    at its peak (``shown_added_gib``, the peak reset before it)."""
    import polars as pl

    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.data.streaming import (
        Reading,
        fit_vocabularies,
        parquet_files,
        split_rule,
    )
    from twostage.retrieval.streamed import streamed_shown

    labelled = args.dir.parent / "impressions"
    labelled.mkdir(exist_ok=True)
    files = [str(f) for f in parquet_files(args.dir)]
    chosen = (pl.int_range(pl.len()).hash(seed=7) % 10) == 0
    pl.scan_parquet(files).with_columns(clicked=chosen.cast(pl.Int8)).sink_parquet(
        labelled / "log.parquet", row_group_size=args.rows_per_group
    )
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.label_col=clicked",
            f"data.split={args.split}",
            f"data.validation_fraction={args.validation_fraction}",
        ],
    )
    reading = Reading.of(config.data)
    common = {"method": args.split, "test_fraction": 0.2, "seed": 42}
    rule = split_rule(
        labelled,
        **common,
        validation_fraction=args.validation_fraction,
        reading=reading,
    )
    fitted = fit_vocabularies(
        labelled,
        **common,
        validation_fraction=args.validation_fraction,
        reading=reading,
    )
    base = _reset_peak_rss()
    started = time.perf_counter()
    shown = streamed_shown(labelled, rule, config.data, vocabularies=fitted)
    return {
        "shown_seconds": time.perf_counter() - started,
        "shown_added_gib": peak_rss_gib() - base,
        "shown_train_pairs": shown.train.height,
        "shown_held_out_rows": shown.validation.height + shown.test.height,
    }


def _filters_two_ranks(args: argparse.Namespace) -> dict[str, Any]:
    """Two gloo ranks (one thread each) compute the streamed filters, the k-core
    of ``--min-rows`` and the duplicates pass, and the split rules' passes (the
    temporal cut, each user's last row), twice: each rank over the whole log
    (as before the ranks shared them), then shared (each rank its row groups,
    the counts merged). The slower rank's seconds of each, and the larger rank's
    peak RSS over each pass (``*_peak_gib``: the peak is reset before the pass,
    so it is the rank's resident memory then, which earlier passes leave in
    allocators' pools, plus what the pass adds: ``*_added_gib``); the phase's
    own peak RSS is the launching process's."""
    from twostage import distributed

    with tempfile.TemporaryDirectory() as temp:
        out = f"{temp}/rank"
        distributed.run_local_group(_filter_rank, 2, str(args.dir), args.min_rows, out)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    return {key: max(r[key] for r in ranks) for key in ranks[0]}


def _filter_rank(rank: int, path: str, min_rows: int, out: str) -> None:
    import torch

    from twostage import distributed
    from twostage.data import streaming
    from twostage.data.streaming import (
        Reading,
        duplicate_rows,
        min_count_ids,
        split_rule,
    )

    torch.set_num_threads(1)
    distributed.init_from_env()
    core = Reading(min_user_rows=min_rows, min_item_rows=min_rows)
    times: dict[str, float] = {}
    for mode, ranks in (("whole", (0, 1)), ("shared", (rank, 2))):
        streaming._KEPT.clear()  # computed again, not remembered
        streaming._DROPPED.clear()
        passes = {
            "min_counts": functools.partial(min_count_ids, path, core, ranks=ranks),
            "duplicates": functools.partial(
                duplicate_rows, path, Reading(duplicates="first"), ranks=ranks
            ),
            **{  # the split's own passes
                f"{method}_split": functools.partial(
                    split_rule,
                    path,
                    method=method,
                    test_fraction=0.2,
                    seed=0,
                    ranks=ranks,
                )
                for method in ("temporal", "leave-last-out")
            },
        }
        for name, run in passes.items():
            distributed.gather_sizes(0)  # the ranks start together
            base = _reset_peak_rss()
            started = time.perf_counter()
            run()
            times[f"{name}_{mode}_s"] = time.perf_counter() - started
            times[f"{name}_{mode}_peak_gib"] = peak_rss_gib()
            times[f"{name}_{mode}_added_gib"] = peak_rss_gib() - base
    Path(f"{out}.{rank}").write_text(json.dumps(times))
    distributed.shutdown()


def _reset_peak_rss() -> float:
    """Start this process's peak RSS (``VmHWM``) again from its current RSS
    (Linux's ``clear_refs``, value 5); that RSS, in GiB."""
    Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20  # kB
    return 0.0


def _train_steps(args: argparse.Namespace, *, streamed: bool) -> dict[str, Any]:
    """The first ``--steps`` steps of ID training (sparse embeddings, batches of
    1,024; with ``--history N`` each user's last N items pooled in the query) on the
    whole log: loaded and split in memory (``train``), or streamed
    (``train-streamed``: two passes over the row groups, index arrays only)."""
    import polars as pl
    import torch

    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.data.dataset import Dataset
    from twostage.data.streaming import parquet_files
    from twostage.retrieval.fit import fit_retrieval

    config = apply_overrides(
        ExperimentConfig(),
        [
            "retrieval.use_side_features=false",
            f"retrieval.history_length={args.history}",
            "retrieval.sparse_embeddings=true",
            "retrieval.popularity_fallback=0",
            "data.validation_fraction=0",
            f"data.split={args.split}",
            "train.optimizer=adagrad",
            "train.batch_size=1024",
            f"train.max_steps={args.steps}",
            "train.epochs=1",
            "train.early_stopping_patience=0",
        ],
    )
    stamps: list[float] = []
    started = time.perf_counter()
    if streamed:
        from twostage.retrieval.streamed import fit_streamed_retrieval

        fit_streamed_retrieval(
            config,
            args.dir,
            on_step=lambda _: stamps.append(time.perf_counter()),
            evaluate_test=False,
        )
    else:
        files = [str(f) for f in parquet_files(args.dir)]
        log = pl.read_parquet(files, columns=["user_id", "item_id", "timestamp"])
        fit_retrieval(
            config,
            dataset=Dataset(name="scale", interactions=log),
            evaluate_test=False,
            on_step=lambda _: stamps.append(time.perf_counter()),
        )
    steps = [b - a for a, b in itertools.pairwise(stamps[10:])]  # after warm-up
    step = sorted(steps)[len(steps) // 2]
    return {
        "steps": len(stamps),
        "examples_per_s": 1024 / step,
        "prepare_and_train_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }


def _one_step_run(args: argparse.Namespace) -> Any:
    """A streamed run of the log after one training step (IDs only): what the
    baseline phases fit on."""
    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.retrieval.streamed import fit_streamed_retrieval

    config = apply_overrides(
        ExperimentConfig(),
        [
            "retrieval.use_side_features=false",
            "retrieval.popularity_fallback=0",
            "data.validation_fraction=0",
            f"data.split={args.split}",
            "train.max_steps=1",
            "train.epochs=1",
        ],
    )
    run = fit_streamed_retrieval(config, args.dir, evaluate_test=False)
    return run


def _baseline_rows(args: argparse.Namespace) -> dict[str, Any]:
    """What `twostage evaluate --baselines` adds on a streamed run: one more pass
    that keeps every non-test row's user and item index and time
    (:func:`~twostage.retrieval.streamed.streamed_training_rows`), timed after a
    one-step streamed training gives it a run."""
    from twostage.retrieval.streamed import streamed_training_rows

    run = _one_step_run(args)
    started = time.perf_counter()
    rows = streamed_training_rows(run)
    rows_seconds = time.perf_counter() - started
    # What every evaluation and baseline fit builds first: the users' seen items.
    started = time.perf_counter()
    seen = run.tensors.seen()
    return {
        "rows_seconds": rows_seconds,
        "seen_seconds": time.perf_counter() - started,
        "seen_pairs": seen.num_pairs,
        "rows_read": len(rows.users),
        # what the arrays hold (the phase's peak RSS is training's)
        "rows_gib": (rows.users.nbytes + rows.items.nbytes + rows.times.nbytes) / 2**30,
    }


def _itemknn_fit(args: argparse.Namespace) -> dict[str, Any]:
    """The item-kNN baseline's fit on a one-step streamed run's training items
    (what `evaluate --baselines` fits): from sparse blocks (the pairs that share
    a user; the path above ``DENSE_ITEMS`` items) and from dense ones (every
    pair), one after the other."""
    import twostage.baselines as baselines
    from twostage.baselines import ItemKNN

    run = _one_step_run(args)
    seen = run.tensors.seen()
    num_items = run.tensors.num_items
    out: dict[str, Any] = {"items": num_items - 1}
    kept = {}
    for path, dense_items in (("sparse", 0), ("dense", 10**9)):
        baselines.DENSE_ITEMS = dense_items
        started = time.perf_counter()
        model = ItemKNN().fit(seen, num_items=num_items)
        out[f"{path}_fit_s"] = time.perf_counter() - started
        assert model.similarity is not None
        kept[path] = model.similarity
        out[f"{path}_pairs"] = int(model.similarity.values().numel())
    # Ties (counts of 1 over equal norms) may pick other neighbours: the share
    # of each item's kept values that the two paths agree on, sorted per row.
    sparse, dense = kept["sparse"].to_sparse_coo(), kept["dense"].to_sparse_coo()
    out["same_pairs_share"] = _shared_pairs(sparse, dense)
    return out


def _shared_pairs(a: Any, b: Any) -> float:
    """The share of ``b``'s (row, column) pairs that ``a`` holds too."""
    import numpy as np

    width = int(max(a.shape[1], 1))
    keys_a = a.indices()[0].numpy() * width + a.indices()[1].numpy()
    keys_b = b.indices()[0].numpy() * width + b.indices()[1].numpy()
    return float(np.isin(keys_b, keys_a).mean()) if len(keys_b) else 1.0


def _distributed(args: argparse.Namespace) -> dict[str, Any]:
    """`twostage train retrieval --nproc N` on MovieLens-100k, N = 1 and 2, the
    same global batch: seconds, examples/s, and the test figures."""
    results: dict[str, Any] = {}
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    for ranks in (1, 2):
        with tempfile.TemporaryDirectory() as temp:
            command = [
                *(sys.executable, "-m", "twostage", "-q", "train", "retrieval"),
                *("--dataset", "movielens-100k", "--out", f"{temp}/run", "--json"),
                *("--set", f"train.epochs={args.epochs}"),
                *("--set", f"train.batch_size={args.batch_size}"),
                *("--set", "train.num_threads=1"),
                *("--set", f"retrieval.embedding_backend={args.embedding_backend}"),
            ]
            if ranks > 1:
                command += ["--nproc", str(ranks)]
            started = time.perf_counter()
            done = subprocess.run(
                command, capture_output=True, text=True, env=env, check=False
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
            answer = json.loads(done.stdout)
            history = json.loads(Path(f"{temp}/run/history.json").read_text())
        metrics = answer["retrieval"]["metrics"]
        epochs = history["history"] if isinstance(history, dict) else history
        train_seconds = epochs[-1]["seconds"]
        results[str(ranks)] = {
            "wall_seconds": seconds,
            "train_seconds": train_seconds,
            "examples_per_second": 0.8 * 0.95 * 100_000 * args.epochs / train_seconds,
            "ndcg@10": metrics["exclude_seen"]["ndcg"]["10"],
            "recall@100": metrics["exclude_seen"]["recall"]["100"],
            "factorized_top_k@100": metrics["include_seen"]["factorized_top_k"]["100"],
        }
    return results


def _gather_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Two gloo ranks time what gathering the in-batch negatives adds to a step: the
    candidate embeddings (forward all-gather, backward reduce-scatter), their item
    IDs and sampling probabilities, for the global batch of the distributed runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc-per-node", "2", __file__, "--phase", "gather", "--dir", "."),
        *("--batch-size", str(args.batch_size)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the gather timing failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _time_gather(batch_size: int, dim: int = 64, repeats: int = 200) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from twostage import distributed

    torch.set_num_threads(1)  # as the distributed runs: one thread per rank
    world = distributed.init_from_env("cpu")
    assert world is not None, "run under torchrun with 2 ranks"
    sizes = world.sizes(batch_size)
    local = torch.randn(sizes[world.rank], dim, requires_grad=True)
    ids = torch.randint(1, 100_000, (sizes[world.rank],))
    probs = torch.rand(sizes[world.rank])
    stamps = []
    for _ in range(repeats + 20):
        dist.barrier()
        started = time.perf_counter()
        candidates = distributed.gather_rows(local, sizes)
        distributed.gather_rows(ids, sizes)
        distributed.gather_rows(probs, sizes)
        candidates.sum().backward()
        stamps.append(time.perf_counter() - started)
    stamps = sorted(stamps[20:])
    out = {
        "ranks": world.size,
        "global_batch": batch_size,
        "dim": dim,
        "median_ms": 1000 * stamps[len(stamps) // 2],
        "p90_ms": 1000 * stamps[int(0.9 * len(stamps))],
    }
    distributed.shutdown()
    return out if world.rank == 0 else {}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--rows-per-group", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=3, help="distributed runs")
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps measured on the log"
    )
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--history",
        type=int,
        default=0,
        help="training phases: each user's last N items in the query (0: ID-only)",
    )
    parser.add_argument(
        "--split",
        default="random",
        choices=("random", "temporal", "leave-last-out"),
        help="the split of the vocabulary and training phases (the test rows held "
        "out row by row, or each user's last row found by a streaming aggregation)",
    )
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="the vocabulary phase's validation carve-out of the training rows "
        "(leave-last-out: each user's last training row, one more pass)",
    )
    parser.add_argument(
        "--min-rows",
        type=int,
        default=5,
        help="the min-counts phase: the minimum rows per user and per item",
    )
    parser.add_argument(
        "--skip-distributed", action="store_true", help="only the data pass"
    )
    parser.add_argument(
        "--embedding-backend",
        default="torch",
        choices=("torch", "torchrec"),
        help="the distributed runs' retrieval.embedding_backend (torchrec: the ID "
        "tables sharded by rows over the ranks; the optional torchrec package)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES[1:]),
        help="after writing the log: any of " + ", ".join(PHASES[1:]),
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "gather":
        timing = _time_gather(args.batch_size)
        if timing:
            print(json.dumps(timing))
        return {}
    if args.phase:
        args.dir = Path(args.dir)
        print(json.dumps(_run_phase(args.phase, args)))
        return {}
    results: dict[str, Any] = {"config": vars(args) | {"json": None}}
    with tempfile.TemporaryDirectory(prefix="twostage-scale-") as temp:
        directory = Path(temp) / "log"
        for name in ["write", *args.phases.split(",")]:
            results[name] = _phase(name, args, directory)
    rows = [
        [name, results[name]["seconds"], results[name]["peak_rss_gib"]]
        for name in PHASES
        if name in results
    ]
    print_table(
        f"data pass: {args.rows:,} rows, {args.users:,} users, {args.items:,} items",
        ["phase", "seconds", "peak RSS GiB"],
        rows,
    )
    if "filters-2-ranks" in results:
        shared = results["filters-2-ranks"]
        print(
            "2 gloo ranks (the slower one): the k-core "
            f"{shared['min_counts_shared_s']:.1f} s shared, "
            f"{shared['min_counts_whole_s']:.1f} s with each rank reading the whole "
            f"log; the duplicates {shared['duplicates_shared_s']:.1f} s shared, "
            f"{shared['duplicates_whole_s']:.1f} s; the temporal cut "
            f"{shared['temporal_split_shared_s']:.1f} s shared, "
            f"{shared['temporal_split_whole_s']:.1f} s; the leave-last-out rows "
            f"{shared['leave-last-out_split_shared_s']:.1f} s shared, "
            f"{shared['leave-last-out_split_whole_s']:.1f} s"
        )
        print(
            "memory a pass adds to a rank's RSS at its peak, shared / whole: "
            + ", ".join(
                f"{name} {shared[f'{name}_shared_added_gib']:.2f} / "
                f"{shared[f'{name}_whole_added_gib']:.2f} GiB"
                for name in (
                    "min_counts",
                    "duplicates",
                    "temporal_split",
                    "leave-last-out_split",
                )
            )
        )
    if "shown-rows" in results:
        shown = results["shown-rows"]
        print(
            "an impression log's shown rows placed for the ranker (a tenth of the "
            f"rows chosen): {shown['shown_seconds']:.1f} s, "
            f"{shown['shown_added_gib']:.2f} GiB added at the peak; "
            f"{shown['shown_train_pairs']:,} training pairs, "
            f"{shown['shown_held_out_rows']:,} held-out rows"
        )
    if "baseline-rows" in results:
        read = results["baseline-rows"]
        print(
            "a streamed run's training rows read again for its baselines: "
            f"{read['rows_read']:,} rows in {read['rows_seconds']:.1f} s, "
            f"{read['rows_gib']:.2f} GiB held; the users' "
            f"{read['seen_pairs']:,} seen pairs built in {read['seen_seconds']:.2f} s"
        )
    if "itemknn" in results:
        knn = results["itemknn"]
        print(
            f"item-kNN's fit over {knn['items']:,} items: "
            f"{knn['sparse_fit_s']:.1f} s from sparse blocks, "
            f"{knn['dense_fit_s']:.1f} s from dense ones; "
            f"{knn['same_pairs_share']:.1%} of the dense fit's "
            f"{knn['dense_pairs']:,} neighbour pairs kept by both"
        )
    for name in ("sample-users", "sample-fraction"):
        if name in results:
            drawn = results[name]
            print(
                f"{name} (`twostage data sample`, 1% of the users): "
                f"{drawn['sampled_users']:,} users' {drawn['sampled_rows']:,} rows "
                f"in {drawn['seconds']:.1f} s"
            )
    if "split-files" in results:
        split = results["split-files"]
        print(
            f"split-files (`twostage data split` of the stream, {args.split}): "
            f"{split['train_rows']:,} train and {split['test_rows']:,} test rows "
            f"written in {split['seconds']:.1f} s"
        )
    for name in ("train", "train-streamed"):
        if name in results:
            train = results[name]
            print(
                f"{name}, first {train['steps']} steps (IDs, history "
                f"{args.history}, sparse, batch 1,024): "
                f"{train['examples_per_s']:,.0f} examples/s"
            )
    if not args.skip_distributed:
        results["distributed"] = _distributed(args)
        print_table(
            f"MovieLens-100k, {args.epochs} epochs, global batch {args.batch_size}, "
            f"{args.embedding_backend} tables",
            ["ranks", "train s", "examples/s", "NDCG@10", "R@100", "FTopK@100"],
            [
                [
                    ranks,
                    r["train_seconds"],
                    r["examples_per_second"],
                    r["ndcg@10"],
                    r["recall@100"],
                    r["factorized_top_k@100"],
                ]
                for ranks, r in results["distributed"].items()
            ],
        )
        gather = results["distributed"]["gather"] = _gather_cost(args)
        two = results["distributed"]["2"]
        steps = args.epochs * -(-int(0.8 * 0.95 * 100_000) // args.batch_size)
        step_ms = 1000 * two["train_seconds"] / steps
        gather["share_of_2_rank_step"] = gather["median_ms"] / step_ms
        print(
            f"gathering the negatives of a {args.batch_size:,} batch over 2 ranks: "
            f"{gather['median_ms']:.2f} ms median (p90 {gather['p90_ms']:.2f}), "
            f"{100 * gather['share_of_2_rank_step']:.1f}% of a 2-rank step "
            f"({step_ms:.1f} ms)"
        )
    results["machine"] = machine()
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
