"""Minimum interaction counts (the "k-core" of the recommender literature).

Papers and production pipelines alike drop users and items with too few interactions
before splitting (5-core Amazon reviews, 10-core MovieLens, ...): a user with one row
has nothing to learn from and nothing left to test on. Dropping users can leave an item
under its minimum and the other way round, so the rule is applied until no row moves:
what remains is the largest sub-log in which every user has at least ``users`` rows
and every item at least ``items``.

Nothing is dropped without a word: :func:`min_counts` returns what it removed (rows,
users, items, rounds), and :func:`twostage.data.registry.load_dataset_for` logs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import polars as pl

from twostage.data.dataset import ITEM, USER, Dataset
from twostage.errors import ConfigError, DataError

__all__ = ["Filtered", "min_counts"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Filtered:
    """What :func:`min_counts` removed.

    Attributes:
        min_user_rows, min_item_rows: the minimums applied.
        rows, users, items: how many rows, users and items were removed.
        rounds: how many passes it took until no row moved.
    """

    min_user_rows: int
    min_item_rows: int
    rows: int
    users: int
    items: int
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        """One line for the log and the CLI."""
        return (
            f"minimum counts (users >= {self.min_user_rows} rows, items >= "
            f"{self.min_item_rows} rows) removed {self.rows:,} rows: {self.users:,} "
            f"users and {self.items:,} items, in {self.rounds} "
            f"round{'s' if self.rounds != 1 else ''}"
        )


def min_counts(
    dataset: Dataset, *, users: int = 0, items: int = 0
) -> tuple[Dataset, Filtered]:
    """``dataset`` without the users that have fewer than ``users`` rows and the items
    that have fewer than ``items``, applied until no row moves.

    Args:
        dataset: the log (its feature tables are kept as they are: they may hold
            more IDs than the log).
        users, items: the minimum rows per user and per item; 0 or 1: no minimum.

    Returns:
        The filtered dataset, and what was removed.

    Raises:
        ConfigError: a minimum is not a non-negative integer.
        DataError: the minimums remove every row.
    """
    for name, value in (("users", users), ("items", items)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(
                f"`{name}` should be a minimum count, an integer >= 0. "
                f"Received: {value!r}."
            )
    frame = dataset.interactions
    before = (frame.height, frame[USER].n_unique(), frame[ITEM].n_unique())
    rounds = 0
    rules = [
        pl.len().over(key) >= minimum
        for key, minimum in ((USER, users), (ITEM, items))
        if minimum > 1
    ]
    while rules:  # removing users can leave an item short, and the other way
        kept = frame.filter(*rules)
        if kept.height == frame.height:
            break
        frame, rounds = kept, rounds + 1
    removed = Filtered(
        min_user_rows=users,
        min_item_rows=items,
        rows=before[0] - frame.height,
        users=before[1] - frame[USER].n_unique(),
        items=before[2] - frame[ITEM].n_unique(),
        rounds=rounds,
    )
    if before[0] and not frame.height:
        raise DataError(
            f"{removed.summary()}: every row of the log. Lower the minimums "
            "(`min_user_rows`, `min_item_rows`)."
        )
    return dataset.with_interactions(frame), removed
