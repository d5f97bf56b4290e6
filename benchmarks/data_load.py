"""Benchmark ``read_interactions`` against a bare polars read of the same file.

A seeded synthetic table (``user_id``, ``item_id``, ``timestamp`` integers and a
``rating`` float; about rows/20 users and rows/10 items) is written as CSV, Parquet
and JSON lines. Ours reads JSON lines with polars' reader where every line is one
object with each key once; a file with a bad line is checked line by line with
Python's ``json``, so that the bad line is rejected rather than failing the file:
``ours_ndjsonbad`` reads the same lines with one malformed line put in the middle,
which takes that path (its ratio is to ``bare_ndjson`` on the good file, which
polars' reader could not read with the bad line). ``ours_jsonarray`` reads the
rows as one JSON array of objects (what ``DataFrame.write_json`` and pandas'
``to_json(orient="records")`` write), each element checked as a line of JSON lines
is, against ``bare_jsonarray``, polars' ``read_json``.
Each measurement runs in a fresh subprocess, so the peak RSS (``VmHWM`` of
``/proc/self/status`` on Linux: ``ru_maxrss`` would carry over the parent's, which
holds the table, through the fork and exec) belongs to that one read; runs are interleaved
and repeated, and the medians are reported.

The same rows are also written in the Netflix Prize layout (``movie:`` lines opening
blocks of ``customer,rating,date`` lines, :mod:`twostage.data.netflix`; dates, so the
times are days): ``bare_netflix`` is polars reading its lines, ``ours_netflix``
:func:`~twostage.data.netflix.read_netflix` unfolding and checking them. And in
MIND's layout (:mod:`twostage.data.mind`: a line per impression of up to 20 of a
user's rows, each news ``-1`` when its rating is 4 or more, else ``-0``; no
history): ``bare_mind`` is polars reading its lines and counting their news,
``ours_mind`` :func:`~twostage.data.mind.read_mind` unfolding, parsing and
checking them into interactions and shown rows.

Usage::

    python benchmarks/data_load.py --rows 10000000 --repeats 3 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

KINDS = (
    "bare_csv",
    "ours_csv",
    "bare_parquet",
    "ours_parquet",
    "bare_ndjson",
    "ours_ndjson",
    "ours_ndjsonbad",
    "bare_jsonarray",
    "ours_jsonarray",
    "bare_netflix",
    "ours_netflix",
    "bare_mind",
    "ours_mind",
)


def make_table(rows: int, seed: int = 0) -> pl.DataFrame:
    """``rows`` interactions: ~rows/20 users, ~rows/10 items, ratings 0.5..5.0."""
    rng = np.random.default_rng(seed)
    num_users, num_items = max(rows // 20, 1), max(rows // 10, 1)
    return pl.DataFrame(
        {
            "user_id": rng.integers(0, num_users, rows),
            "item_id": rng.integers(0, num_items, rows),
            "timestamp": rng.integers(946_684_800, 1_700_000_000, rows),
            "rating": rng.integers(1, 11, rows) / 2.0,
        }
    )


def write_netflix_layout(table: pl.DataFrame, path: Path) -> Path:
    """``table`` in the Netflix Prize layout: per item, its ``N:`` line, then a
    ``user,rating,yyyy-mm-dd`` line per row."""
    day = pl.from_epoch("timestamp", time_unit="s").dt.strftime("%Y-%m-%d")
    rows = table.select(
        pl.col("item_id").alias("block"),
        pl.lit(1, dtype=pl.Int8).alias("order"),
        pl.concat_str(pl.col("user_id"), pl.col("rating"), day, separator=",").alias(
            "text"
        ),
    )
    heads = table.select(pl.col("item_id").unique().alias("block")).with_columns(
        pl.lit(0, dtype=pl.Int8).alias("order"),
        (pl.col("block").cast(pl.String) + ":").alias("text"),
    )
    lines = pl.concat([heads, rows]).sort("block", "order", maintain_order=True)
    lines.select("text").write_csv(path, include_header=False, quote_style="never")
    return path


def write_mind_layout(table: pl.DataFrame, path: Path) -> Path:
    """``table`` in MIND's ``behaviors.tsv`` layout: each user's rows in impressions
    of up to 20, at the time of the impression's first row, each news labelled 1
    when its rating is 4 or more; the history field is empty."""
    time = pl.from_epoch(pl.col("timestamp").first(), time_unit="s")
    lines = (
        table.with_columns(
            (pl.int_range(pl.len()).over("user_id") // 20).alias("impression"),
            pl.concat_str(
                pl.lit("N"),
                pl.col("item_id"),
                pl.when(pl.col("rating") >= 4)
                .then(pl.lit("-1"))
                .otherwise(pl.lit("-0")),
            ).alias("news"),
        )
        .group_by("user_id", "impression", maintain_order=True)
        .agg(
            time.dt.strftime("%m/%d/%Y %I:%M:%S %p").alias("time"),
            pl.col("news").str.join(" "),
        )
        .with_row_index("id", offset=1)
        .select(
            pl.concat_str(
                pl.col("id"),
                pl.lit("U") + pl.col("user_id").cast(pl.String),
                pl.col("time"),
                pl.lit(""),
                pl.col("news"),
                separator="\t",
            )
        )
    )
    lines.write_csv(path, include_header=False, quote_style="never")
    return path


def peak_rss_gib() -> float:
    """This process's peak resident memory since its exec, in GiB."""
    status = Path("/proc/self/status")
    if status.exists():  # Linux: ru_maxrss keeps the forking parent's peak
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return peak * scale / 2**30


def child(kind: str, path: str) -> None:
    """Time one read in this (fresh) process and print the result as JSON."""
    from twostage.data.mind import read_mind
    from twostage.data.netflix import read_netflix
    from twostage.data.tables import read_interactions

    start = time.perf_counter()
    if kind == "bare_netflix":
        lines = pl.read_csv(
            path, has_header=False, separator="\x1f", quote_char=None
        ).to_series()
        rows = int((~lines.str.ends_with(":")).sum())
    elif kind == "ours_netflix":
        rows = read_netflix(path).num_interactions
    elif kind == "bare_mind":
        lines = pl.read_csv(
            path, has_header=False, separator="\x1f", quote_char=None
        ).to_series()
        news = lines.str.split("\t").list.get(4).str.count_matches(" ") + 1
        rows = int(news.sum())
    elif kind == "ours_mind":
        data = read_mind(path)
        rows = data.num_interactions + data.num_shown
    elif kind.startswith("bare"):
        read = {
            "csv": pl.read_csv,
            "parquet": pl.read_parquet,
            "ndjson": pl.read_ndjson,
            "jsonarray": pl.read_json,
        }
        rows = read[kind.split("_")[1]](path).height
    else:
        ds = read_interactions(path, time_col="timestamp", rating_col="rating")
        rows = ds.num_interactions
    seconds = time.perf_counter() - start
    print(
        json.dumps({"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "rows": rows})
    )


def run_child(kind: str, path: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_with_bad_line(good: Path, path: Path) -> Path:
    """``good``'s lines with a malformed one put in the middle."""
    data = good.read_bytes()
    middle = data.index(b"\n", len(data) // 2) + 1
    path.write_bytes(data[:middle] + b'{"user_id": 1, "item_id":\n' + data[middle:])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument(
        "--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        table = make_table(args.rows)
        files = {
            "csv": workdir / "interactions.csv",
            "parquet": workdir / "interactions.parquet",
            "ndjson": workdir / "interactions.jsonl",
            "jsonarray": workdir / "interactions.json",
        }
        table.write_csv(files["csv"])
        table.write_parquet(files["parquet"])
        table.write_ndjson(files["ndjson"])
        table.write_json(files["jsonarray"])
        files["ndjsonbad"] = write_with_bad_line(files["ndjson"], workdir / "bad.jsonl")
        files["netflix"] = write_netflix_layout(table, workdir / "combined_data_1.txt")
        files["mind"] = write_mind_layout(table, workdir / "behaviors.tsv")
        del table
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):  # interleaved, so drift hits every kind alike
            for kind in KINDS:
                result = run_child(kind, files[kind.split("_")[1]])
                if result["rows"] != args.rows:
                    raise SystemExit(
                        f"{kind} read {result['rows']} rows, not {args.rows}"
                    )
                runs[kind].append(result)
        sizes = {k: p.stat().st_size / 2**20 for k, p in files.items()}
    report(args, runs, sizes)


def report(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, float]]],
    sizes: dict[str, float],
) -> None:
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    rss = {k: statistics.median(r["peak_rss_gib"] for r in v) for k, v in runs.items()}
    summary = {
        "rows": args.rows,
        "repeats": args.repeats,
        "csv_ratio": seconds["ours_csv"] / seconds["bare_csv"],
        "parquet_ratio": seconds["ours_parquet"] / seconds["bare_parquet"],
        "ndjson_ratio": seconds["ours_ndjson"] / seconds["bare_ndjson"],
        "ndjsonbad_ratio": seconds["ours_ndjsonbad"] / seconds["bare_ndjson"],
        "jsonarray_ratio": seconds["ours_jsonarray"] / seconds["bare_jsonarray"],
        "netflix_ratio": seconds["ours_netflix"] / seconds["bare_netflix"],
        "mind_ratio": seconds["ours_mind"] / seconds["bare_mind"],
        "peak_rss_gib": max(
            r["peak_rss_gib"] for k in KINDS if k.startswith("ours") for r in runs[k]
        ),
        "median_seconds": seconds,
        "median_peak_rss_gib": rss,
        "file_mib": sizes,
    }
    table = Table(
        title=f"Loading {args.rows:,} interactions (median of {args.repeats})"
    )
    for column in ("read", "file MiB", "seconds", "peak RSS GiB", "ours / bare"):
        table.add_column(column, justify="right" if column != "read" else "left")
    for kind in KINDS:
        fmt = kind.split("_")[1]
        ratio = summary[f"{fmt}_ratio"] if kind.startswith("ours") else None
        table.add_row(
            kind,
            f"{sizes[fmt]:.0f}",
            f"{seconds[kind]:.3f}",
            f"{rss[kind]:.2f}",
            "" if ratio is None else f"{ratio:.2f}x",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
