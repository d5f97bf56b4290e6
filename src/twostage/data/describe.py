"""Summary statistics of a dataset (what `twostage data describe` prints)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT, Dataset
from twostage.errors import DataError

if TYPE_CHECKING:
    from twostage.data.report import LoadReport
    from twostage.data.streaming import Reading

__all__ = ["describe", "describe_streamed"]


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # beyond what a calendar shows
        return f"{ts} s (out of the calendar's range)"


def describe(dataset: Dataset) -> dict[str, Any]:
    """Counts, sparsity, per-user/per-item activity, rating histogram, time range,
    and the spread of the row weights when the log was read with ``weight_col``.

    Returns:
        A JSON-safe dict.
    """
    inter = dataset.interactions
    num_users, num_items, n = (
        dataset.num_users,
        dataset.num_items,
        dataset.num_interactions,
    )
    per_user = inter.group_by(USER).len()["len"]
    per_item = inter.group_by(ITEM).len()["len"]
    duplicates = n - inter.select(USER, ITEM, TIME).unique().height
    out: dict[str, Any] = {
        "name": dataset.name,
        "source": dataset.source,
        "num_interactions": n,
        "num_users": num_users,
        "num_items": num_items,
        "density": n / (num_users * num_items) if num_users and num_items else 0.0,
        "interactions_per_user": _spread(per_user),
        "interactions_per_item": _spread(per_item),
        "duplicate_rows": duplicates,
        # A log without a time column has row numbers for times: no range to show.
        "time_range": {
            "min": _iso(inter[TIME].min()),  # type: ignore[arg-type]
            "max": _iso(inter[TIME].max()),  # type: ignore[arg-type]
        }
        if dataset.has_time and n
        else None,
        "user_features": [
            c
            for c in (dataset.users.columns if dataset.users is not None else [])
            if c != USER
        ],
        "item_features": [
            c
            for c in (dataset.items.columns if dataset.items is not None else [])
            if c != ITEM
        ],
    }
    rated = inter[RATING].drop_nulls() if dataset.has_ratings else None
    if rated is not None and len(rated):  # as streamed: no rows, no histogram
        hist = rated.to_frame().group_by(RATING).len().sort(RATING)
        out["rating_histogram"] = {
            f"{r:g}": int(c) for r, c in zip(hist[RATING], hist["len"], strict=True)
        }
        out["rating_mean"] = float(rated.mean())  # type: ignore[arg-type]
    if dataset.has_ratings:  # rows without a rating (``data.unrated_values``)
        out["unrated_rows"] = int(inter[RATING].null_count())
    if WEIGHT in inter.columns:  # read with ``weight_col``
        weights = inter[WEIGHT]
        out["weights"] = {**_spread(weights), "zero": int((weights == 0).sum())}
    if dataset.shown is not None:  # an impression log read with ``label_col``
        shown = dataset.shown
        chosen = inter[ITEM].unique().implode()
        out["shown"] = {
            "rows": shown.height,
            "users": int(shown[USER].n_unique()),
            "items": int(shown[ITEM].n_unique()),
            # never chosen: outside every vocabulary, so never recommended
            "items_never_chosen": int(
                shown.filter(~pl.col(ITEM).is_in(chosen))[ITEM].n_unique()
            ),
            "chosen_share": n / (n + shown.height) if n + shown.height else 0.0,
        }
    out["feature_kinds"] = _feature_kinds(dataset)
    if dataset.report is not None:
        out["bad_rows"] = dataset.report.to_dict()
    return out


def _feature_kinds(dataset: Dataset) -> dict[str, str | None]:
    """Per side-table column, the kind of feature training would make of it by
    default (:mod:`twostage.features.infer`; None: left out), so a column read
    the wrong way is seen before training (``retrieval.field_kinds`` sets it)."""
    from twostage.features.infer import infer_field

    kinds: dict[str, str | None] = {}
    for table, key in ((dataset.users, USER), (dataset.items, ITEM)):
        if table is None:
            continue
        for column in table.columns:
            if column != key:
                field = infer_field(column, table[column])
                kinds[column] = None if field is None else field.kind
    return kinds


def describe_streamed(
    path: str | Path,
    *,
    weight_col: str | None = None,
    reading: Reading | None = None,
    weight_values: dict[str, float] | None = None,
    unrated_values: tuple[float, ...] = (),
) -> tuple[dict[str, Any], LoadReport]:
    """:func:`describe` of a Parquet log read one row group at a time
    (:mod:`twostage.data.streaming`: a file or a directory of files, columns by
    name, bad rows counted and left out as every streamed pass does), and its
    bad-row report.

    Memory holds each distinct user and item with its count, and the rating
    values' counts, never the rows. ``duplicate_rows`` is None: counting them
    would hold every distinct row. ``user_features`` / ``item_features`` are
    empty (a streamed log has no feature tables until a run names its columns),
    and ``other_columns`` lists the log's columns that play no role.
    """

    from twostage.data.report import LoadReport
    from twostage.data.streaming import (
        Reading,
        RunningCounts,
        fields_of,
        iter_row_groups,
        min_count_ids,
        parquet_files,
    )

    reading = reading or Reading()
    names = list(fields_of(parquet_files(path)[0], reading))
    rated = RATING in names
    weights = _StreamedWeights(weight_col, weight_values) if weight_col else None
    report = LoadReport(path=str(path))
    users, items, ratings = RunningCounts(), RunningCounts(), RunningCounts()
    rows = unrated = 0
    low: int | None = None
    high: int | None = None
    columns = [USER, ITEM, TIME, *([RATING] if rated else [])]
    columns += [weight_col] if weight_col and weight_col not in columns else []
    for first, batch in iter_row_groups(
        path,
        columns=columns,
        report=report,
        reading=reading,
    ):
        if weights is not None:
            weights.add(batch, first)
        rows += batch.height
        users.add(batch[USER])
        items.add(batch[ITEM])
        if rated:  # rows without one: missing_ratings="unrated", unrated_values
            given = batch[RATING]
            if unrated_values:
                listed = given.is_in([float(v) for v in unrated_values])
                given = given.set(listed.fill_null(False), None)
            unrated += given.null_count()
            ratings.add(given.drop_nulls())
        if batch.height:
            times = batch[TIME]  # epoch seconds, as the loader parsed them
            first, last = int(times.min()), int(times.max())  # type: ignore[arg-type]
            low = first if low is None else min(low, first)
            high = last if high is None else max(high, last)
    removed = min_count_ids(path, reading).removed if reading.filters else None
    # the good rows the minimum counts keep, and those shown and not chosen
    report.rows_loaded = rows + report.shown_rows
    report.rows_read = (
        report.rows_loaded + report.num_rejected + (removed.rows if removed else 0)
    )
    per_user, per_item = users.result(), items.result()
    num_users = 0 if per_user is None else per_user.height
    num_items = 0 if per_item is None else per_item.height
    empty = pl.Series("count", [], dtype=pl.Int64)
    out: dict[str, Any] = {
        "name": Path(path).name,
        "source": str(path),
        "num_interactions": rows,
        "num_users": num_users,
        "num_items": num_items,
        "density": rows / (num_users * num_items) if num_users and num_items else 0.0,
        "interactions_per_user": _spread(
            empty if per_user is None else per_user["count"]
        ),
        "interactions_per_item": _spread(
            empty if per_item is None else per_item["count"]
        ),
        "duplicate_rows": None,
        "time_range": {"min": _iso(low), "max": _iso(high)} if rows else None,
        "user_features": [],
        "item_features": [],
        "other_columns": [c for c in names if c not in (USER, ITEM, TIME, RATING)],
    }
    hist = ratings.result()
    if rated and hist is not None and hist.height:
        hist = hist.sort("key")
        counts = hist["count"]
        out["rating_histogram"] = {
            f"{r:g}": int(c) for r, c in zip(hist["key"], counts, strict=True)
        }
        total = float((hist["key"] * counts).sum())
        out["rating_mean"] = total / float(counts.sum())
    if rated:
        out["unrated_rows"] = unrated
    if weights is not None:
        out["weights"] = weights.result()
    if removed is not None:
        out["filtered"] = removed.to_dict()
    if reading.label_col:  # counted, not held: no users or items of theirs
        shown = report.shown_rows
        out["shown"] = {
            "rows": shown,
            "chosen_share": rows / (rows + shown) if rows + shown else 0.0,
        }
    return out, report


class _StreamedWeights:
    """The spread of a streamed log's row weights, one row group at a time: min,
    mean, max, how many are 0, and the rows a streamed run would stop at (a weight
    that is missing, not finite or negative). The median would need every value:
    None."""

    def __init__(self, column: str, names: dict[str, float] | None = None) -> None:
        self.column = column
        self.names = names  # data.weight_values: the weight of each value
        self.count = self.zero = self.bad = 0
        self.total = 0.0
        self.low: float | None = None
        self.high: float | None = None
        self.first_bad: int | None = None

    def add(self, batch: pl.DataFrame, first: int) -> None:
        from twostage.data.streaming import ROW

        values = batch[self.column]
        if self.names is not None:
            from twostage.data._table_values import weights_from_names

            values = weights_from_names(values, self.names)[0]  # unlisted: null
        elif not values.dtype.is_numeric():
            raise DataError(
                f"`weight_col` = {self.column!r} holds {values.dtype}; row weights "
                "are numbers (cast the column), or names with `weight_values`."
            )
        weights = values.cast(pl.Float64)
        bad = (weights.is_null() | ~weights.is_finite() | (weights < 0)).fill_null(True)
        if bad.any():
            self.bad += int(bad.sum())
            at = int(batch[ROW][int(bad.arg_true()[0])]) + 1
            self.first_bad = at if self.first_bad is None else min(self.first_bad, at)
        good = weights.filter(~bad)
        if good.len():
            self.count += good.len()
            self.total += float(good.sum())
            self.zero += int((good == 0).sum())
            low, high = float(good.min()), float(good.max())  # type: ignore[arg-type]
            self.low = low if self.low is None else min(self.low, low)
            self.high = high if self.high is None else max(self.high, high)

    def result(self) -> dict[str, Any]:
        return {
            "min": 0.0 if self.low is None else self.low,
            "median": None,
            "mean": self.total / self.count if self.count else 0.0,
            "max": 0.0 if self.high is None else self.high,
            "zero": self.zero,
            "bad": self.bad,
            "first_bad_row": self.first_bad,
        }


def _spread(counts: pl.Series) -> dict[str, float]:
    if counts.is_empty():  # a header-only file: nothing to spread
        return {"min": 0.0, "median": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "min": float(counts.min()),  # type: ignore[arg-type]
        "median": float(counts.median()),  # type: ignore[arg-type]
        "mean": float(counts.mean()),  # type: ignore[arg-type]
        "max": float(counts.max()),  # type: ignore[arg-type]
    }
