"""A split of a log larger than memory, written to files: `twostage data split` on a
directory of Parquet files.

The rows are read and checked one row group at a time as ``train --stream`` reads
them (:func:`~twostage.data.streaming.iter_row_groups`), each goes to the side the
streamed split puts it on (:func:`~twostage.data.streaming.split_rule`: the rows
a streamed run trains on, and the rows it is evaluated on), and each side is
appended to its Parquet file a row group at a time, so memory holds one row group
(and what the split's own passes keep: each user's last row for leave-last-out;
for an impression log, each chosen row's user, time and side).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from twostage.data.dataset import ITEM, LABEL, RATING, TIME, USER, WEIGHT
from twostage.data.report import LoadReport
from twostage.data.streaming import (
    ROW,
    Reading,
    SplitRule,
    checked_weights,
    fields_of,
    iter_row_groups,
    min_count_ids,
    parquet_files,
    split_rule,
)
from twostage.errors import DataError

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
            present), or the columns ``reading.names`` names so.
        train, test: the files to write (``user_id``, ``item_id``, ``timestamp``
            in epoch seconds, ``rating`` and ``weight``: the values as the
            readers parse them), each written whole or not at all.
        method, test_fraction, seed: the split (``random``: a stable hash of each
            row; ``temporal``: a time cut at the quantile; ``leave-last-out``:
            each user's last row).
        reading: how values are read (column names, time unit and format,
            missing ratings, duplicates, minimum rows per user and item, an
            impression log's label column: its rows shown and not chosen are
            written too, with ``label`` False, each on the side of its user's
            next choice as ``train --stream`` places it).
        weight_col: the log's column of row weights, written as ``weight``:
            finite non-negative numbers, or with ``weight_values`` the weight of
            each of its values. A bad weight stops the split with its row, as it
            stops a streamed run (nothing is written).

    Returns:
        A :class:`StreamedSplit` with each side's rows and the bad rows' report.

    Raises:
        DataError: no row to split (every row rejected: the report says why).
        ConfigError: a bad split setting.
    """
    files = parquet_files(path)
    rated = RATING in fields_of(files[0], reading)
    columns = [USER, ITEM, TIME, *([RATING] if rated else [])]
    columns += [weight_col] if weight_col and weight_col not in columns else []
    rule = split_rule(
        path, method=method, test_fraction=test_fraction, seed=seed, reading=reading
    )
    # An impression log's shown rows are read too, each placed beside its choice.
    every = dataclasses.replace(reading, keep_shown=True) if reading.label_col else None
    chosen = _chosen_sides(path, rule, every) if every is not None else None
    report = LoadReport(path=str(path))
    targets = (Path(train), Path(test))
    partial = [t.with_name(f".{t.name}.{os.getpid()}.partial") for t in targets]
    counts = [0, 0]
    try:
        with contextlib.ExitStack() as stack:
            writers: list[pq.ParquetWriter] = []
            for first, frame in iter_row_groups(
                path, columns=columns, report=report, reading=every or reading
            ):
                if every is None:
                    held = rule.test_mask(frame, first)
                else:
                    held = _held_with_shown(frame, first, rule, chosen)
                    report.shown_rows += int((~frame[LABEL]).sum())
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
    report.rows_loaded = sum(counts)  # the shown rows among them
    report.rows_read = (
        report.rows_loaded + report.num_rejected + (removed.rows if removed else 0)
    )
    return StreamedSplit(targets[0], targets[1], counts[0], counts[1], report)


def _chosen_sides(path: str | Path, rule: SplitRule, every: Reading) -> pl.DataFrame:
    """Each chosen row's user, time and side (``later``: a test row), in time
    order: where the shown rows go (none needed under a temporal split, which
    places a shown row by its own time)."""
    if rule.method == "temporal":
        return pl.DataFrame()
    parts = []
    for first, frame in iter_row_groups(
        path, columns=[USER, ITEM, TIME], reading=every
    ):
        picked = frame.filter(frame[LABEL])
        later = pl.Series("later", rule.test_mask(picked, first))
        parts.append(picked.select(USER, TIME, later))
    if not parts:
        return pl.DataFrame()
    return pl.concat(parts).sort(TIME, maintain_order=True)


def _held_with_shown(
    frame: pl.DataFrame, first: int, rule: SplitRule, chosen: pl.DataFrame | None
) -> np.ndarray:
    """Which rows of an impression log's row group are test rows: a chosen row by
    the split's rule, a shown row on the side :func:`shown_sides` gives it (the
    side of its user's next choice, as ``train --stream`` and the in-memory split
    place it; a user held out whole on the test side)."""
    picked = frame[LABEL].to_numpy()
    held = np.zeros(frame.height, dtype=bool)
    held[picked] = rule.test_mask(frame.filter(pl.Series(picked)), first)
    if picked.all():
        return held
    shown = frame.filter(~pl.Series(picked))
    sides = chosen if chosen is not None and chosen.height else None
    later = rule.shown_test_mask(
        shown,
        shown.select(USER, TIME).clear() if sides is None else sides.select(USER, TIME),
        pl.Series("later", [], pl.Boolean) if sides is None else sides["later"],
    )
    held[~picked] = later.to_numpy()
    return held
