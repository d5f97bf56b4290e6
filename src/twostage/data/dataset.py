"""The in-memory dataset: interactions plus optional user and item feature tables."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from twostage.data.report import LoadReport
from twostage.errors import DataError

__all__ = [
    "ITEM",
    "LABEL",
    "RATING",
    "TIME",
    "USER",
    "WEIGHT",
    "Dataset",
    "iso_seconds",
]

USER = "user_id"
ITEM = "item_id"
TIME = "timestamp"
RATING = "rating"
WEIGHT = "weight"
LABEL = "label"  # read from ``label_col``: chosen (True) or shown only


def iso_seconds(text: str) -> float | None:
    """Seconds since 1970 of an ISO 8601 date or date-time, as a request's
    ``timestamp`` may give it (``2026-01-01``, ``2026-01-01T09:30:00Z``,
    ``2026-01-01 09:30+02:00``); one without an offset is UTC, as the log's
    times are read. None: the text is no such moment."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@dataclass
class Dataset:
    """Interactions and side tables, held as polars columns (never Python rows).

    Attributes:
        name: short name, e.g. ``"movielens-100k"`` or a file stem.
        interactions: one row per event with columns ``user_id``, ``item_id``,
            ``timestamp`` (Int64 seconds since the epoch; the 0..n-1 row order when the
            source has no time) and optionally ``rating`` and ``weight`` (Float32).
            IDs keep the dtype of the source (Int64 or String).
        users: optional user feature table keyed by ``user_id`` (one row per user).
        items: optional item feature table keyed by ``item_id`` (one row per item).
        source: where the data came from (URL, path, or the fallback used).
        report: what was rejected while reading, if anything was read from text.
        has_time: False when the source had no time column (``timestamp`` is then
            the row order, not a time).
        shown: the rows of an impression log read with ``label_col`` whose label
            says the item was shown to the user and not chosen (``user_id``,
            ``item_id``, ``timestamp``); they are not interactions. The ranker learns
            from them as negatives and evaluation scores them (``shown_auc``). None:
            the log has no such rows.
        prior: rows from before the log's period (``user_id``, ``item_id``,
            ``timestamp``): what its users did before, served as their history
            and never a test choice (a MIND test file's click histories,
            ``read_mind(..., history=False)``). Evaluation scores a user the model
            never trained on from them, as a session. None: no such rows.
    """

    name: str
    interactions: pl.DataFrame
    users: pl.DataFrame | None = None
    items: pl.DataFrame | None = None
    source: str = ""
    report: LoadReport | None = field(default=None)
    has_time: bool = True
    shown: pl.DataFrame | None = None
    prior: pl.DataFrame | None = None

    def __post_init__(self) -> None:
        missing = [c for c in (USER, ITEM, TIME) if c not in self.interactions.columns]
        if missing:
            raise DataError(
                f"`interactions` must have columns {USER!r}, {ITEM!r}, {TIME!r}; "
                f"missing {missing}. Received columns: {self.interactions.columns}."
            )
        for table, key in ((self.users, USER), (self.items, ITEM)):
            if table is not None and key not in table.columns:
                raise DataError(
                    f"a feature table must have a {key!r} column. "
                    f"Received columns: {table.columns}."
                )
        for name, rows in (("shown", self.shown), ("prior", self.prior)):
            if rows is None:
                continue
            missing = [c for c in (USER, ITEM, TIME) if c not in rows.columns]
            if missing:
                raise DataError(
                    f"`{name}` must have columns {USER!r}, {ITEM!r}, {TIME!r}; "
                    f"missing {missing}. Received columns: {rows.columns}."
                )

    @property
    def num_interactions(self) -> int:
        return self.interactions.height

    @property
    def num_users(self) -> int:
        return int(self.interactions[USER].n_unique())

    @property
    def num_items(self) -> int:
        return int(self.interactions[ITEM].n_unique())

    @property
    def has_ratings(self) -> bool:
        return RATING in self.interactions.columns

    def with_unrated(self, values: Sequence[float]) -> Dataset:
        """A copy whose ratings equal to any of ``values`` are missing (null): rows
        that record an interaction without a rating (implicit feedback)."""
        if not values or RATING not in self.interactions.columns:
            return self
        unrated = pl.col(RATING).is_in([float(v) for v in values])
        return self.with_interactions(
            self.interactions.with_columns(
                pl.when(unrated).then(None).otherwise(pl.col(RATING)).alias(RATING)
            )
        )

    @property
    def num_shown(self) -> int:
        """The rows shown and not chosen (0 without ``shown``)."""
        return 0 if self.shown is None else self.shown.height

    def with_interactions(self, interactions: pl.DataFrame) -> Dataset:
        """A copy sharing the side tables, the shown and the prior rows, with other
        interactions (a split gives each side its shown rows: :meth:`with_shown`)."""
        return Dataset(
            name=self.name,
            interactions=interactions,
            users=self.users,
            items=self.items,
            source=self.source,
            report=self.report,
            has_time=self.has_time,
            shown=self.shown,
            prior=self.prior,
        )

    def with_shown(self, shown: pl.DataFrame | None) -> Dataset:
        """A copy with other shown-and-not-chosen rows (None: none)."""
        copy = self.with_interactions(self.interactions)
        copy.shown = shown
        return copy
