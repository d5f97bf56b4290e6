"""A split of a log larger than memory, written to files: `twostage data split` on a
directory of Parquet files.

The rows are read and checked one row group at a time as ``train --stream`` reads
them (:func:`~twostage.data.streaming.iter_row_groups`), each goes to the side the
streamed split puts it on (:func:`~twostage.data.streaming.split_rule`: the rows
a streamed run trains on, and the rows it is evaluated on), and each side is
appended to its Parquet file a row group at a time, so memory holds one row group
(and what the split's own pass keeps: each user's last row for leave-last-out).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT
from twostage.data.report import LoadReport
from twostage.data.streaming import (
    ROW,
    Reading,
    checked_weights,
    fields_of,
    iter_row_groups,
    min_count_ids,
    parquet_files,
    split_rule,
)
from twostage.errors import ConfigError, DataError

__all__ = ["StreamedSplit", "write_streamed_split"]


@dataclass(frozen=True)
class StreamedSplit:
    """What :func:`write_streamed_split` wrote: the rows of each side, and the
    rows rejected (``report``: their reasons and row numbers)."""

    train: Path
    test: Path
    train_rows: int
    test_rows: int
    report: LoadReport


def write_streamed_split(
    path: str | Path,
    train: str | Path,
    test: str | Path,
    *,
    method: str = "random",
    test_fraction: float = 0.2,
    seed: int = 42,
    reading: Reading = Reading(),
    weight_col: str | None = None,
    weight_values: dict[str, float] | None = None,
) -> StreamedSplit:
    """Split a Parquet log as ``train --stream`` splits it, and write each side.

    Args:
        path: a Parquet file or a directory of them, with ``user_id``,
            ``item_id`` and ``timestamp`` columns (and ``rating``, written when
            present).
        train, test: the files to write (``user_id``, ``item_id``, ``timestamp``
            in epoch seconds, ``rating`` and ``weight``: the values as the
            readers parse them), each written whole or not at all.
        method, test_fraction, seed: the split (``random``: a stable hash of each
            row; ``temporal``: a time cut at the quantile; ``leave-last-out``:
            each user's last row).
        reading: how values are read (column names, time unit and format,
            missing ratings, duplicates, minimum rows per user and item); not an
            impression log's label column.
        weight_col: the log's column of row weights, written as ``weight``:
            finite non-negative numbers, or with ``weight_values`` the weight of
            each of its values. A bad weight stops the split with its row, as it
            stops a streamed run (nothing is written).

    Returns:
        A :class:`StreamedSplit` with each side's rows and the bad rows' report.

    Raises:
        DataError: no row to split (every row rejected: the report says why).
        ConfigError: a bad split setting, or ``reading.label_col``.
    """
    if reading.label_col:
        raise ConfigError(
            "a streamed split writes the interactions alone; an impression log's "
            "shown rows (`label_col`) are split in memory (one Parquet file)."
        )
    files = parquet_files(path)
    rated = RATING in fields_of(files[0], reading)
    columns = [USER, ITEM, TIME, *([RATING] if rated else [])]
    columns += [weight_col] if weight_col and weight_col not in columns else []
    rule = split_rule(
        path, method=method, test_fraction=test_fraction, seed=seed, reading=reading
    )
    report = LoadReport(path=str(path))
    targets = (Path(train), Path(test))
    partial = [t.with_name(f".{t.name}.{os.getpid()}.partial") for t in targets]
    counts = [0, 0]
    try:
        with contextlib.ExitStack() as stack:
            writers: list[pq.ParquetWriter] = []
            for first, frame in iter_row_groups(
                path, columns=columns, report=report, reading=reading
            ):
                held = rule.test_mask(frame, first)
                if weight_col:
                    weights = checked_weights(frame, weight_col, path, weight_values)
                    frame = frame.drop(weight_col).with_columns(
                        pl.Series(WEIGHT, weights)
                    )
                table = frame.drop(ROW).to_arrow()
                if not writers:
                    for where in partial:
                        where.parent.mkdir(parents=True, exist_ok=True)
                        writers.append(
                            stack.enter_context(pq.ParquetWriter(where, table.schema))
                        )
                for side, keep in enumerate((~held, held)):
                    if keep.any():
                        part = table.filter(pa.array(keep)).cast(writers[side].schema)
                        writers[side].write_table(part)
                        counts[side] += part.num_rows
            if not sum(counts):  # every row rejected: the report, not two files
                raise DataError(
                    f"{str(path)!r} has no row to split: {report.summary()}"
                    if report.num_rejected
                    else f"{str(path)!r} has no row to split."
                )
        for where, target in zip(partial, targets, strict=True):
            where.replace(target)
    finally:
        for where in partial:
            with contextlib.suppress(FileNotFoundError):
                where.unlink()
    removed = min_count_ids(path, reading).removed if reading.filters else None
    report.rows_loaded = sum(counts)
    report.rows_read = (
        report.rows_loaded + report.num_rejected + (removed.rows if removed else 0)
    )
    return StreamedSplit(targets[0], targets[1], counts[0], counts[1], report)
