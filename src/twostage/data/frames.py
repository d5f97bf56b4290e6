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
