"""Per-interaction context: columns of a log row (not of the user) that describe the
moment of the interaction, and can feed the query tower.

A context field is a query field read from the interactions rather than the user
table (:meth:`FeatureSpec.describe` says ``source="interactions"``): the raw
``timestamp`` (standardised), a per-row column the log carries (a device, a country:
categorical when text, numeric otherwise), or one derived from the timestamp here:

* ``hour_of_day``: 0-23 (UTC);
* ``day_of_week``: 1 (Monday) - 7 (Sunday), UTC.

Training encodes each row's own context; evaluation makes every test interaction a
query with its context; serving takes a ``context`` mapping (a missing value encodes
as unknown, which the encoders fitted on training rows map to their missing slot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import polars as pl

from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT, Dataset, iso_seconds
from twostage.errors import ConfigError
from twostage.features.fields import Field

__all__ = [
    "DERIVED",
    "DERIVED_OF_SECONDS",
    "add_context_columns",
    "context_field",
    "context_frame",
    "context_names",
]

#: Context columns computed from the timestamp (epoch seconds, UTC).
DERIVED: dict[str, pl.Expr] = {
    "hour_of_day": pl.from_epoch(pl.col(TIME), time_unit="s").dt.hour().cast(pl.Int64),
    "day_of_week": pl.from_epoch(pl.col(TIME), time_unit="s")
    .dt.weekday()
    .cast(pl.Int64),
}
#: :data:`DERIVED` of one request's epoch seconds, in plain Python (a test checks
#: them against the expressions): the hour of day, UTC, and the ISO weekday
#: (Monday 1; 1970-01-01 was a Thursday).
DERIVED_OF_SECONDS: dict[str, Callable[[int], int]] = {
    "hour_of_day": lambda seconds: seconds // 3600 % 24,
    "day_of_week": lambda seconds: (seconds // 86400 + 3) % 7 + 1,
}
_NOT_CONTEXT = (USER, ITEM, RATING, WEIGHT)


#: The values a request may give a derived column directly.
_RANGES = {"hour_of_day": (0, 23), "day_of_week": (1, 7)}


def _checked(name: str, value: Any) -> Any:
    """A request's context value, refused when it cannot be what the column holds:
    a timestamp that is no number of seconds, an hour or weekday out of range
    (they were read as unknown, as if the client had left them out)."""
    if value is None:
        return None
    if name == TIME:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            moment = iso_seconds(value) if isinstance(value, str) else None
            seconds = math.nan if moment is None else moment
        if isinstance(value, bool) or not (
            math.isfinite(seconds) and abs(seconds) < 2**40
        ):
            raise ConfigError(
                "`context`['timestamp'] should be epoch seconds, a finite number, "
                f"or an ISO 8601 date-time (2026-01-01T09:30:00Z). Received: {value!r}."
            )
        return math.floor(seconds)
    if name in _RANGES:
        low, high = _RANGES[name]
        number = (
            value if isinstance(value, int) and not isinstance(value, bool) else None
        )
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value)
        if number is None or not low <= number <= high:
            raise ConfigError(
                f"`context`[{name!r}] should be an integer from {low} to {high}. "
                f"Received: {value!r}."
            )
        return number
    return value


def _request_frame(
    frame: pl.DataFrame, context: Mapping[str, Any] | None, names: list[str]
) -> pl.DataFrame:
    """:func:`context_frame` of one request's mapping, built in one step: the
    hour and weekday computed here as :data:`DERIVED` computes them (UTC; ISO
    weekday, Monday 1), where the expressions cost a serving request 0.1 ms."""
    values = dict(context or {})
    unknown = sorted(set(values) - set(names) - {TIME})
    if unknown:
        raise ConfigError(
            f"unknown context column(s) {unknown}; this model reads {names}."
        )
    values = {k: _checked(k, v) for k, v in values.items()}
    rows = frame.height
    columns = [frame[USER]]
    for name, value in values.items():
        dtype = pl.Int64 if name == TIME else None
        columns.append(pl.Series(name, [value] * rows, dtype=dtype))
    seconds = values.get(TIME)
    for name in names:
        if name in values:
            continue
        if name in DERIVED and TIME in values:
            value = None if seconds is None else DERIVED_OF_SECONDS[name](seconds)
            columns.append(pl.Series(name, [value] * rows, dtype=pl.Int64))
        else:  # unknown: null
            columns.append(pl.Series(name, [None] * rows))
    return pl.DataFrame(columns)


def context_names(dataset: Dataset) -> list[str]:
    """The context columns a dataset offers: its per-row columns (the timestamp only
    when the log has times) and the ones derived from the timestamp."""
    columns = [
        c
        for c in dataset.interactions.columns
        if c not in _NOT_CONTEXT and (c != TIME or dataset.has_time)
    ]
    return columns + (list(DERIVED) if dataset.has_time else [])


def context_field(name: str, dataset: Dataset) -> Field:
    """The field of one context column: the timestamp standardised, derived columns
    and text columns as categories, other numbers standardised."""
    if name == TIME:
        return Field(TIME, "timestamp")
    if name in DERIVED:
        return Field(name, "categorical")
    dtype = dataset.interactions.schema[name]
    if dtype == pl.String or dtype == pl.Categorical:
        return Field(name, "categorical")
    return Field(name, "numeric")


def add_context_columns(dataset: Dataset, names: Iterable[str]) -> Dataset:
    """The dataset with the derived context columns among ``names`` computed."""
    derived = [n for n in names if n in DERIVED and n not in dataset.interactions]
    if not derived:
        return dataset
    return dataset.with_interactions(
        dataset.interactions.with_columns(DERIVED[n].alias(n) for n in derived)
    )


def context_frame(
    user_ids: pl.Series,
    context: Mapping[str, Any] | pl.DataFrame | None,
    names: list[str],
) -> pl.DataFrame:
    """``[N]`` query rows: the user IDs and each context column (null where unknown).

    Args:
        user_ids: ``[N]`` raw user IDs.
        context: one mapping for every row (serving: ``{"timestamp": 1700000000}``),
            a frame of ``N`` rows (evaluation: the test interactions), or None.
        names: the model's context columns.

    Raises:
        ConfigError: the mapping names a column the model does not read.
    """
    frame = user_ids.rename(USER).to_frame()
    if not isinstance(context, pl.DataFrame):
        return _request_frame(frame, context, names)
    given = context.select([c for c in context.columns if c in names or c == TIME])
    frame = pl.concat([frame, given], how="horizontal") if given.width else frame
    if TIME in frame.columns:
        frame = frame.with_columns(pl.col(TIME).cast(pl.Int64, strict=False))
        frame = frame.with_columns(
            DERIVED[n].alias(n) for n in names if n in DERIVED and n not in given
        )
    missing = [n for n in names if n not in frame.columns]
    return frame.with_columns(pl.lit(None).alias(n) for n in missing)
