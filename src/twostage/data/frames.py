"""Tables given in memory: the frame types of the field's libraries, as polars.

A log, a feature table, a sessions table or new items may come as a polars
DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table or RecordBatch, or a
mapping of column names to values; :func:`as_polars` makes one polars frame of
any of them, so that every entry point reads them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from twostage.errors import DataError

#: How messages name what :func:`as_polars` takes.
FRAME_KINDS = "a polars, pandas or pyarrow table (or a polars LazyFrame)"


def as_polars(data: Any, *, columns: bool = True) -> pl.DataFrame | None:
    """``data`` as a polars DataFrame, or None when it is not a table.

    Args:
        data: a polars DataFrame (returned as it is) or LazyFrame (collected),
            a pandas DataFrame (through Arrow, without its index; a column of
            mixed Python objects, numbers and text, is read as text so that
            its bad values are rejected row by row, as a file's are), a pyarrow
            Table or RecordBatch, or (``columns``) a mapping of column names to
            equally long sequences of values.
        columns: whether a mapping is read as columns.

    Raises:
        DataError: ``data`` is one of those but cannot be converted (a LazyFrame
            whose query fails, columns of different lengths...), with the
            converter's reason.
    """
    if isinstance(data, pl.DataFrame):
        return data
    module = type(data).__module__.split(".")[0]
    try:
        if isinstance(data, pl.LazyFrame):
            return data.collect()
        if module == "pandas" and hasattr(data, "columns"):
            return _from_pandas(data)
        if module == "pyarrow" and type(data).__name__ in ("Table", "RecordBatch"):
            frame = pl.from_arrow(data)
            assert isinstance(frame, pl.DataFrame)  # a table gives a frame
            return frame
        if columns and isinstance(data, Mapping):
            return pl.DataFrame(dict(data))
    except (OSError, TypeError, ValueError, pl.exceptions.PolarsError) as e:
        raise DataError(
            f"the {module} {type(data).__name__} could not be read as a table: {e}"
        ) from e
    return None


def _from_pandas(data: Any) -> pl.DataFrame:
    names = [str(c) for c in data.columns]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"it names the column(s) {twice} more than once")
    try:
        return pl.from_pandas(data, include_index=False)
    except (TypeError, ValueError, pl.exceptions.PolarsError):
        pass
    mixed = {c: "string" for c in data.columns if data[c].dtype == object}
    return pl.from_pandas(data.astype(mixed), include_index=False)


def log_names(data: Any, session_col: str | None = None) -> dict[str, str]:
    """``{our column: the training log's name for it}`` where they differ: the
    user, item, time and rating columns ``data`` names (a ``DataConfig``, or
    anything with its ``user_col``, ``item_col``, ``time_col`` and
    ``rating_col``; None: ours), and ``session_col`` for ``session_id``; an
    empty name (``rating_col=""``: a log read without ratings) is kept. A table
    of sessions, IDs or new items may come in the training log's layout, and a
    streamed log is read by these names (``Reading.names``)."""
    given = {
        "session_id": session_col,
        "user_id": data.user_col,
        "item_id": data.item_col,
        "timestamp": data.time_col,
        "rating": data.rating_col,
    }
    return {
        ours: theirs
        for ours, theirs in given.items()
        if theirs is not None and theirs != ours
    }


def with_our_names(
    frame: pl.DataFrame, names: Mapping[str, str], where: str
) -> pl.DataFrame:
    """``frame`` with the columns ``names`` maps to (``{ours: theirs}``,
    :func:`log_names`) renamed to ours.

    Raises:
        DataError: ``frame`` (``where`` names it in the message) holds both a
            column of ours and the name the mapping gives it: which to read is
            not clear.
    """
    renames = {
        theirs: ours
        for ours, theirs in names.items()
        if theirs and theirs in frame.columns
    }
    both = sorted(ours for ours in renames.values() if ours in frame.columns)
    if both:
        pairs = ", ".join(f"{names[ours]!r} and {ours!r}" for ours in both)
        raise DataError(
            f"{where} has both {pairs}, the training log's name for a column and "
            "ours; keep one of each."
        )
    return frame.rename(renames)
