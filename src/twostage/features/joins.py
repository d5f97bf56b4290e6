"""Join side-table columns onto frames by ``user_id`` / ``item_id``, order preserved."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import polars as pl

from twostage.data.dataset import ITEM, USER
from twostage.errors import DataError

__all__ = ["as_frame", "join_missing_columns", "rows_with_keys"]

_JOIN = "__join_key"


def as_frame(frame: pl.DataFrame | pl.Series | Sequence[Any], key: str) -> pl.DataFrame:
    """``frame`` itself, or a one-column frame of IDs named ``key``."""
    if isinstance(frame, pl.DataFrame):
        return frame
    if isinstance(frame, pl.Series):
        return frame.rename(key).to_frame()
    if isinstance(frame, (Sequence, np.ndarray)) and not isinstance(frame, str):
        return pl.DataFrame({key: frame})
    raise DataError(
        f"`frame` should be a polars DataFrame, or a Series / list of {key!r} values. "
        f"Received {type(frame).__name__}."
    )


def _join_keys(left: pl.Series, right: pl.Series) -> tuple[pl.Series, pl.Series]:
    """Key columns with a common dtype (text when one side reads IDs as strings)."""
    if left.dtype == right.dtype:
        return left, right
    return left.cast(pl.String), right.cast(pl.String)


def rows_with_keys(table: pl.DataFrame, key: str, keys: pl.Series) -> pl.DataFrame:
    """The rows of ``table`` whose ``key`` occurs in ``keys``."""
    left, right = _join_keys(table[key], keys)
    wanted = right.alias(_JOIN).to_frame().unique()
    return (
        table.with_columns(left.alias(_JOIN))
        .join(wanted, on=_JOIN, how="semi")
        .drop(_JOIN)
    )


def join_missing_columns(
    frame: pl.DataFrame,
    columns: list[str],
    side: Literal["query", "candidate"],
    table: pl.DataFrame | None,
) -> pl.DataFrame:
    """``frame`` plus the ``columns`` it lacks, left-joined from ``table`` on the key."""
    key, arg = (USER, "users") if side == "query" else (ITEM, "items")
    missing = [c for c in dict.fromkeys(columns) if c not in frame.columns]
    if not missing:
        return frame
    if table is None or key not in frame.columns:
        raise DataError(
            f"`frame` lacks column(s) {missing} used by {side} features. Add them, or "
            f"give `frame` a {key!r} column and pass `{arg}=` (a table keyed by "
            f"{key!r}) to join them from. Received columns: {frame.columns}."
        )
    absent = [c for c in [key, *missing] if c not in table.columns]
    if absent:
        raise DataError(
            f"column(s) {absent} used by {side} features are missing from `{arg}`. "
            f"Received `{arg}` columns: {table.columns}."
        )
    right = table.select([key, *missing])
    if right[key].n_unique() != right.height:
        raise DataError(
            f"`{arg}` should have one row per {key!r}; it has "
            f"{right.height - right[key].n_unique()} duplicated keys. Deduplicate it."
        )
    left_key, right_key = _join_keys(frame[key], right[key])
    return (
        frame.with_columns(left_key.alias(_JOIN))
        .join(
            right.drop(key).with_columns(right_key.alias(_JOIN)),
            on=_JOIN,
            how="left",
            maintain_order="left",
        )
        .drop(_JOIN)
    )
