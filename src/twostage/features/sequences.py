"""Encoders for multi-valued columns: multi-hot sets (genres) and text (titles).

Both return a padded ``[N, L]`` int64 index matrix with one shared convention:

* ``0`` is padding (an empty or missing value is a row of zeros);
* ``1`` is a value not seen in training (out of vocabulary);
* known values start at ``2``, in descending training frequency then by value.

So ``num_embeddings = 2 + number of known values``, and a model can use
``padding_idx=0`` (or a mask ``indices != 0``) to pool the row.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import polars as pl

from twostage.errors import DataError
from twostage.features.base import (
    Encoder,
    FeatureOutput,
    as_series,
    check_positive_int,
)
from twostage.features.vocab import Vocabulary

__all__ = ["MultiHotEncoder", "TextEncoder", "parse_lists", "tokenize"]

Values = pl.Series | Sequence[Any]
_TOKEN = r"[\p{L}\p{N}]+"  # a run of Unicode letters or digits
_QUOTES = "'\""


def parse_lists(values: pl.Series, *, separator: str = "|") -> pl.Series:
    """Read a multi-valued column as a list column.

    Accepts list (or array) columns, and strings written either as
    ``"Action|Comedy"`` (split on ``separator``) or as a bracketed list such as
    ``"['Fiction', 'Biography']"`` or ``'["A", "B"]'`` (split on commas, quotes and
    spaces stripped). Empty items are dropped and repeats within a row kept once.

    Args:
        values: [N] list, array or string column.
        separator: the separator of non-bracketed strings.

    Returns:
        [N] list column (null where the input is null).

    Raises:
        DataError: the column is neither a list nor a string column.
    """
    if isinstance(values.dtype, pl.Array):
        values = values.cast(pl.List(values.dtype.inner))
    if isinstance(values.dtype, pl.List):
        lists = values
        if values.dtype.inner in (pl.Categorical, pl.Enum):
            lists = lists.cast(pl.List(pl.String))
    elif values.dtype in (pl.String, pl.Categorical, pl.Null):
        s = pl.col("s").cast(pl.String).str.strip_chars()
        bracketed = s.str.starts_with("[") & s.str.ends_with("]")
        items = s.str.strip_prefix("[").str.strip_suffix("]").str.split(",")
        lists = (
            pl.DataFrame({"s": values})
            .select(
                pl.when(bracketed)
                .then(items)
                .otherwise(s.str.split(separator))
                .list.eval(
                    pl.element()
                    .str.strip_chars()
                    .str.strip_chars(_QUOTES)
                    .str.strip_chars()
                )
            )
            .to_series()
        )
    else:
        raise DataError(
            f"column {values.name!r} should hold lists or delimited strings for a "
            f"multi-valued feature. Received dtype {values.dtype}."
        )
    kept = pl.element().is_not_null() & (pl.element().cast(pl.String) != "")
    return lists.list.eval(pl.element().filter(kept)).list.unique(maintain_order=True)


def tokenize(values: pl.Series, *, lowercase: bool = True) -> pl.Series:
    """Split text into words: runs of Unicode letters or digits (all else separates).

    ``"Toy Story (1995)"`` -> ``["toy", "story", "1995"]``; ``"a_b-c"`` -> ``["a", "b",
    "c"]``. Nulls stay null.

    Args:
        values: [N] string column.
        lowercase: lowercase before splitting.

    Returns:
        [N] list-of-strings column.
    """
    if values.dtype not in (pl.String, pl.Categorical, pl.Null):
        raise DataError(
            f"column {values.name!r} should hold text for a text feature. "
            f"Received dtype {values.dtype}."
        )
    text = values.cast(pl.String)
    if lowercase:
        text = text.str.to_lowercase()
    return text.str.extract_all(_TOKEN)


def _flatten(lists: pl.Series) -> pl.Series:
    """All list items in row order (empty and null lists contribute nothing)."""
    return lists.explode(empty_as_null=False, keep_nulls=False)


class _ListEncoder(Encoder):
    """Shared fit / transform of a list column through a vocabulary into [N, L]."""

    def __init__(
        self, *, width: int | None, min_count: int, max_size: int | None
    ) -> None:
        check_positive_int("min_count", min_count)
        check_positive_int("max_size", max_size, allow_none=True)
        self.min_count, self.max_size = min_count, max_size
        self.vocabulary = Vocabulary()
        self._fixed_width = width  # None: the longest training row
        self.width: int | None = None  # L, set by fit

    @abstractmethod
    def _to_lists(self, values: pl.Series) -> pl.Series:
        """The column as a list column."""

    def fit(self, values: Values) -> Self:
        lists = self._to_lists(as_series(values, "values"))
        self.vocabulary.fit(
            _flatten(lists), min_count=self.min_count, max_size=self.max_size
        )
        longest = int(lists.list.len().fill_null(0).to_numpy().max(initial=0))
        self.width = self._fixed_width or max(longest, 1)
        return self

    @property
    def is_fitted(self) -> bool:
        return self.width is not None

    def transform(self, values: Values) -> np.ndarray:
        """[N] values -> [N, L] int64 (0 padding, 1 OOV, known from 2)."""
        self._check_fitted()
        assert self.width is not None
        lists = self._to_lists(as_series(values, "values")).list.head(self.width)
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        flat = _flatten(lists)
        out = np.zeros((len(lengths), self.width), dtype=np.int64)
        if len(flat) == 0:
            return out
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.cumsum(lengths) - lengths
        cols = np.arange(len(flat)) - np.repeat(starts, lengths)  # position in row
        out[rows, cols] = self.vocabulary.transform(flat) + 1  # vocab OOV 0 -> 1
        return out

    def inverse_transform(self, indices: np.ndarray) -> pl.Series:
        """[N, L] indices -> [N] lists of values (padding dropped, OOV as null)."""
        self._check_fitted()
        matrix = np.asarray(indices, dtype=np.int64)
        if matrix.ndim != 2:
            raise DataError(
                f"`indices` should be a [N, L] matrix. Received shape {matrix.shape}."
            )
        rows, cols = np.nonzero(matrix)  # row-major, so items keep their order
        values = self.vocabulary.inverse_transform(matrix[rows, cols] - 1)
        grouped = (
            pl.DataFrame({"row": rows, "value": values})
            .group_by("row", maintain_order=True)
            .agg("value")
        )
        every_row = pl.DataFrame({"row": np.arange(matrix.shape[0], dtype=rows.dtype)})
        joined = every_row.join(grouped, on="row", how="left", maintain_order="left")
        return joined["value"].fill_null([])

    @property
    def output(self) -> FeatureOutput:
        self._check_fitted()
        assert self.width is not None
        return FeatureOutput("indices", self.width, self.vocabulary.size + 1)

    def _state(self) -> dict[str, Any]:
        return {"width": self.width, "vocabulary": self.vocabulary.to_dict()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.width = int(state["width"])
        self.vocabulary = Vocabulary.from_dict(state["vocabulary"])


class MultiHotEncoder(_ListEncoder):
    """A set-valued column (genres, tags) as a padded matrix of value indices.

    Args:
        max_values: ``L``, the values kept per row (the first ones); ``None`` uses the
            longest row seen in training.
        min_count: keep values present in at least this many training rows.
        max_size: keep at most this many known values.
        separator: separator of delimited strings (see :func:`parse_lists`).

    Output: indices ``[N, L]`` int64, 0 padding, 1 OOV, known from 2.
    """

    type_name = "multi_hot"

    def __init__(
        self,
        *,
        max_values: int | None = None,
        min_count: int = 1,
        max_size: int | None = None,
        separator: str = "|",
    ) -> None:
        check_positive_int("max_values", max_values, allow_none=True)
        super().__init__(width=max_values, min_count=min_count, max_size=max_size)
        self.max_values, self.separator = max_values, separator

    def _to_lists(self, values: pl.Series) -> pl.Series:
        return parse_lists(values, separator=self.separator)

    def _config(self) -> dict[str, Any]:
        return {
            "max_values": self.max_values,
            "min_count": self.min_count,
            "max_size": self.max_size,
            "separator": self.separator,
        }


class TextEncoder(_ListEncoder):
    """Short text (titles, names) as a padded matrix of word indices.

    Words are runs of Unicode letters or digits (see :func:`tokenize`); repeats are
    kept, in order.

    Args:
        max_length: ``L``, the words kept per row (the first ones).
        min_count: keep words seen at least this many times in training.
        max_size: keep at most this many known words.
        lowercase: lowercase before splitting.

    Output: indices ``[N, L]`` int64, 0 padding, 1 OOV, known from 2.
    """

    type_name = "text"

    def __init__(
        self,
        *,
        max_length: int = 32,
        min_count: int = 1,
        max_size: int | None = None,
        lowercase: bool = True,
    ) -> None:
        check_positive_int("max_length", max_length)
        super().__init__(width=max_length, min_count=min_count, max_size=max_size)
        self.max_length, self.lowercase = max_length, bool(lowercase)

    def _to_lists(self, values: pl.Series) -> pl.Series:
        return tokenize(values, lowercase=self.lowercase)

    def _config(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "min_count": self.min_count,
            "max_size": self.max_size,
            "lowercase": self.lowercase,
        }
