"""Which item columns name an item and tag it, for any item table.

Every place that shows items (``recommend`` and ``similar`` in the CLI, the report,
the web page, the API's ``label`` and ``tags`` fields) uses :func:`display_columns`:
the configured ``data.title_col`` / ``data.tags_col`` when set, else a guess that
works for MovieLens (``display_title``, ``genres``), Book-Crossing
(``book_title``, ``Category``) and most catalogues: a column named like a title or a
name, else the text column with the most distinct values; a list column, else one
named like a genre, category or tag.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import polars as pl

from twostage.errors import ConfigError

__all__ = ["DisplayColumns", "display_columns", "label_and_tags"]

logger = logging.getLogger(__name__)

_TITLE_NAMES = ("display_title", "title", "name")
_TITLE_PARTS = ("title", "name")
_TAG_NAMES = ("genres", "genre", "categories", "category", "tags", "tag")
_TAG_PARTS = ("genre", "categor", "tag")


@dataclass(frozen=True)
class DisplayColumns:
    """The item table's column that names an item, and the one that tags it."""

    title: str | None = None
    tags: str | None = None
    #: The tags column's separator where it holds a set-valued feature written
    #: as text (``"hats|kids"``); None: one value a row (or a list column).
    separator: str | None = None


def display_columns(
    items: pl.DataFrame | None,
    *,
    title: str | None = None,
    tags: str | None = None,
    key: str = "item_id",
) -> DisplayColumns:
    """The display columns of an item table (configured ones are checked to exist).

    Without a table nothing is shown, and a configured column says so (logged):
    it names a column of a table the model does not have.

    Raises:
        ConfigError: a configured column is not in the table.
    """
    if items is None:
        named = {"data.title_col": title, "data.tags_col": tags}
        for name, value in named.items():
            if value is not None:
                logger.warning(
                    "`%s` = %r is not shown: the model keeps no item table for it to "
                    "name a column of. List the column in `data.item_features` "
                    "(`retrieval.candidate_fields` can then leave it out of the "
                    "model) or give it in `data.item_table`.",
                    name,
                    value,
                )
        return DisplayColumns()
    columns = [c for c in items.columns if c != key]
    for name, value in (("data.title_col", title), ("data.tags_col", tags)):
        if value is not None and value not in columns:
            raise ConfigError(
                f"`{name}` should name a column of the item table. Received: "
                f"`{name}` = {value!r}; the table has {columns}."
            )
    return DisplayColumns(
        title=title or _guess_title(items, columns),
        tags=tags or _guess_tags(items, columns),
    )


def _guess_title(items: pl.DataFrame, columns: list[str]) -> str | None:
    lowered = {c.lower().replace("-", "_"): c for c in columns}
    for name in _TITLE_NAMES:
        if name in lowered:
            return lowered[name]
    text = [c for c in columns if items[c].dtype == pl.String]
    for column in text:
        if any(part in column.lower() for part in _TITLE_PARTS):
            return column
    if not text:
        return None
    return max(text, key=lambda c: items[c].n_unique())


def _guess_tags(items: pl.DataFrame, columns: list[str]) -> str | None:
    lowered = {c.lower().replace("-", "_"): c for c in columns}
    for name in _TAG_NAMES:
        if name in lowered:
            return lowered[name]
    lists = [c for c in columns if isinstance(items[c].dtype, pl.List)]
    if lists:
        return lists[0]
    for column in columns:
        if any(part in column.lower() for part in _TAG_PARTS):
            return column
    return None


def label_and_tags(row: dict[str, Any], columns: DisplayColumns) -> dict[str, Any]:
    """``{"label": str | None, "tags": list[str]}`` of one item's metadata row."""
    label = row.get(columns.title) if columns.title else None
    value = row.get(columns.tags) if columns.tags else None
    if value is None:
        tags: list[str] = []
    elif isinstance(value, list):
        tags = [str(v) for v in value if v is not None]
    elif columns.separator is not None and isinstance(value, str):
        tags = [p.strip() for p in value.split(columns.separator) if p.strip()]
    else:
        tags = [_strip_brackets(str(value))]
    return {"label": None if label is None else str(label), "tags": tags}


def _strip_brackets(text: str) -> str:
    """``"['Fiction']"`` (a list written as text, as Book-Crossing does) -> ``Fiction``."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        parts = [p.strip().strip("'\"") for p in stripped[1:-1].split(",")]
        return ", ".join(p for p in parts if p)
    return stripped
