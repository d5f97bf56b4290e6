"""Choose default feature fields from the columns a dataset has.

``user_id`` and ``item_id`` are always ``"id"`` fields. Side-table columns are chosen by
name first (the MovieLens columns; integer codes named ``*_id``, ``*_code``,
``*_key``, ``*_no``, ``*_nr``, ``*_type``, ``category`` or ``brand`` ->
``categorical``, not a number to normalise; ``title`` and ``*_title`` text -> ``text``),
then by dtype and content:

* numbers -> ``numeric``; booleans -> ``categorical``; dates and times -> ``timestamp``;
* list columns, and strings that look like ``"A|B"`` or ``"['A', 'B']"`` -> ``multi_hot``;
* strings of several words that are mostly distinct -> ``text``;
* other strings with few distinct values -> ``categorical``; with many distinct
  values (ID-like) -> ``categorical`` keeping values seen at least twice;
* URLs, columns with no values and ``display_title`` (a copy of title and year)
  are skipped.

Interaction columns other than the keys (timestamp, rating, weight) are not used:
ratings and weights are labels, and a timestamp context needs the caller to supply a
time at serving, so add ``Field("timestamp", "timestamp")`` explicitly when wanted.
"""

from __future__ import annotations

import logging

import polars as pl

from twostage.data.dataset import ITEM, USER, Dataset
from twostage.features.fields import Field

__all__ = ["default_fields", "infer_field"]

logger = logging.getLogger(__name__)

_MAX_CATEGORIES = 1000  # at most this many distinct values is "low cardinality"
_LIST_SHARE = 0.5  # share of values that must look like lists / URLs
_TEXT_WORDS = 3.0  # mean words per value from which mostly-distinct strings are text
# Integer columns named so hold codes (Taobao's category_id, a brand_id, H&M's
# product_type_no and section_no, a device_type).
_CODE_SUFFIXES = ("_id", "_code", "_key", "_no", "_nr", "_type")
_CODE_NAMES = frozenset({"id", "category", "brand"})
# Presentation copies of other columns (MovieLens "Title (Year)").
_SKIPPED_NAMES = frozenset({"display_title"})


def _is_numeric(series: pl.Series) -> bool:
    return series.dtype.is_numeric() and series.dtype != pl.Boolean


def _categories(name: str, values: pl.Series) -> Field:
    """A categorical field; with many distinct values (ID-like), keeping those seen
    at least twice."""
    distinct = values.n_unique()
    if distinct <= _MAX_CATEGORIES or distinct <= 0.5 * len(values):
        return Field(name, "categorical")
    return Field(name, "categorical", min_count=2, max_size=100_000)


def _by_name(name: str, series: pl.Series) -> Field | None:
    """The MovieLens conventions, and integer codes, where the dtype fits them."""
    lowered = name.lower()
    if lowered == "age":
        return Field(name, "bucket", num_buckets=10) if _is_numeric(series) else None
    if lowered in ("gender", "sex", "occupation"):
        return Field(name, "categorical")
    if lowered in ("zip_code", "zip", "zipcode"):
        return Field(name, "categorical", prefix=2)
    if lowered in ("genres", "genre", "tags"):
        return Field(name, "multi_hot")
    if (lowered == "title" or lowered.endswith("_title")) and series.dtype == pl.String:
        return Field(name, "text", max_length=16)
    if lowered == "year" and _is_numeric(series):
        return Field(name, "bucket", num_buckets=10)
    if series.dtype.is_integer() and (
        lowered.endswith(_CODE_SUFFIXES) or lowered in _CODE_NAMES
    ):  # category_id 17 is no more than category_id 3: a code, not a quantity
        return _categories(name, series.drop_nulls())
    return None


def _share(mask: pl.Series) -> float:
    return float(mask.to_numpy().mean()) if len(mask) else 0.0


def _by_content(name: str, series: pl.Series) -> Field | None:
    values = series.drop_nulls()
    if len(values) == 0:
        return None
    dtype = values.dtype
    if dtype == pl.Boolean:
        return Field(name, "categorical")
    if dtype.is_numeric():
        return Field(name, "numeric")
    if dtype.is_temporal():
        return Field(name, "timestamp")
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner
        # Lists of records (Amazon's "images": [{"thumb": ...}]) or of lists: no
        # encoder reads their values.
        if inner is None or isinstance(inner, (pl.Struct, pl.List, pl.Array)):
            return None
        return Field(name, "multi_hot")
    if dtype not in (pl.String, pl.Categorical, pl.Enum):
        return None
    text = values.cast(pl.String).str.strip_chars()
    if _share(text.str.contains(r"^https?://")) > _LIST_SHARE:
        return None
    bracketed = text.str.starts_with("[") & text.str.ends_with("]")
    if _share(bracketed | text.str.contains("|", literal=True)) > _LIST_SHARE:
        return Field(name, "multi_hot")
    distinct = text.n_unique()
    words = float(text.str.count_matches(r"[\p{L}\p{N}]+").to_numpy().mean())
    if words >= _TEXT_WORDS and distinct > 0.2 * len(text):
        return Field(name, "text")
    return _categories(name, text)


def infer_field(name: str, series: pl.Series) -> Field | None:
    """A default field for one side-table column, or ``None`` to leave it out."""
    if series.null_count() == len(series) or name.lower() in _SKIPPED_NAMES:
        return None
    return _by_name(name, series) or _by_content(name, series)


def default_fields(
    dataset: Dataset, *, use_side_features: bool = True
) -> tuple[list[Field], list[Field]]:
    """(query fields, candidate fields) for ``dataset`` (see the module docstring)."""
    query = [Field(USER, "id")]
    candidate = [Field(ITEM, "id")]
    if use_side_features:
        for fields, table, key in (
            (query, dataset.users, USER),
            (candidate, dataset.items, ITEM),
        ):
            if table is None:
                continue
            for column in table.columns:
                field = None if column == key else infer_field(column, table[column])
                if field is not None:
                    fields.append(field)
                elif column != key:
                    _report_skipped(column, table[column])
    logger.info("default features: query=%s candidate=%s", query, candidate)
    return query, candidate


def _report_skipped(name: str, series: pl.Series) -> None:
    """Say why a side-table column is no default feature: a warning where the
    column looks meant as one (no values, a type no encoder reads), a note for the
    columns left out by design (URLs, presentation copies)."""
    values = series.drop_nulls()
    if name.lower() in _SKIPPED_NAMES:
        logger.info("column %r is not a feature: a display copy of others", name)
    elif len(values) == 0:
        logger.warning("column %r is not a feature: it holds no values", name)
    elif values.dtype in (pl.String, pl.Categorical, pl.Enum):
        logger.info("column %r is not a feature: it holds URLs", name)
    else:
        logger.warning(
            "column %r is not a feature: no encoder reads its type %s; convert it "
            "to numbers, text or a list of strings or numbers to use it",
            name,
            values.dtype,
        )
