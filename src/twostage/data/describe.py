"""Summary statistics of a dataset (what `twostage data describe` prints)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import polars as pl

from twostage.data.dataset import ITEM, RATING, TIME, USER, Dataset

__all__ = ["describe"]


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # beyond what a calendar shows
        return f"{ts} s (out of the calendar's range)"


def describe(dataset: Dataset) -> dict[str, Any]:
    """Counts, sparsity, per-user/per-item activity, rating histogram and time range.

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
    if dataset.has_ratings:
        hist = inter.group_by(RATING).len().sort(RATING)
        out["rating_histogram"] = {
            f"{r:g}": int(c) for r, c in zip(hist[RATING], hist["len"], strict=True)
        }
        out["rating_mean"] = float(inter[RATING].mean())  # type: ignore[arg-type]
    if dataset.report is not None:
        out["bad_rows"] = dataset.report.to_dict()
    return out


def _spread(counts: pl.Series) -> dict[str, float]:
    if counts.is_empty():  # a header-only file: nothing to spread
        return {"min": 0.0, "median": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "min": float(counts.min()),  # type: ignore[arg-type]
        "median": float(counts.median()),  # type: ignore[arg-type]
        "mean": float(counts.mean()),  # type: ignore[arg-type]
        "max": float(counts.max()),  # type: ignore[arg-type]
    }
