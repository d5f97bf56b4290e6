"""What the readers of fixed layouts share (the Netflix Prize's blocks, MIND's
impressions): refusing the options of a table's columns, and reading a file's
lines as they are."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from twostage.data._table_values import LINE
from twostage.errors import ConfigError, DataError

#: The column of :func:`read_lines` holding each line's text.
TEXT = "__text"


def refuse_options(
    options: Mapping[str, Any], allowed: tuple[str, ...], layout: str, spec: str
) -> None:
    """Refuse the ``options`` a layout does not take (a column mapping: its
    columns are fixed). ``layout`` says what the file holds, ``spec`` its
    ``--dataset`` form."""
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise ConfigError(
            f"{', '.join(f'`{k}`' for k in unknown)}: {layout}; leave "
            f"{'them' if len(unknown) > 1 else 'it'} unset for `{spec}`."
        )


def read_lines(path: Path, what: str) -> pl.DataFrame:
    """Every line of ``path`` as text (``__text``; null for an empty line) with its
    1-based number (``__line``), nothing split or unquoted."""
    try:
        lines = pl.read_csv(
            path,
            has_header=False,
            separator="\x1f",  # a unit separator: each line is one field
            quote_char=None,
            schema={TEXT: pl.String},
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError as err:  # e.g. a \x1f inside a line
        raise DataError(f"{path}: not {what}: {err}") from err
    return lines.with_row_index(LINE, offset=1).with_columns(
        pl.col(LINE).cast(pl.Int64)
    )
