"""Encoders for single-valued columns: numbers, buckets, timestamps and categories.

Every encoder follows :class:`~twostage.features.base.Encoder`: ``fit`` on the training
split only, ``transform`` any split, save with ``to_dict``. Missing values (null, NaN,
infinite) never raise: they become 0 after standardising, or the reserved index 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import polars as pl

from twostage.errors import ConfigError
from twostage.features.base import (
    Encoder,
    FeatureOutput,
    as_series,
    check_positive_int,
    to_float,
    warn_infinite,
)
from twostage.features.vocab import Vocabulary

__all__ = [
    "BucketEncoder",
    "CategoricalEncoder",
    "NumericEncoder",
    "TimestampEncoder",
]

Values = pl.Series | Sequence[Any]


def _moments(
    x: np.ndarray, weights: np.ndarray, *, weighted: bool
) -> tuple[float, float]:
    """``(mean, std)`` of finite values ``x`` (with row ``weights``), ``std`` 1 for a
    constant or empty column. Values near the float64 limit (1e308) overflow the
    sums to inf, which would encode every value as 0: those are computed again on
    ``x`` scaled by its largest magnitude."""
    total = float(weights.sum())
    if total == 0 or x.size == 0:
        return 0.0, 1.0

    def of(v: np.ndarray) -> tuple[float, float]:
        if not weighted:  # numpy's own (pairwise) sums, as fitted before
            return float(v.mean()), float(v.std())
        mean = float((v * weights).sum() / total)
        return mean, float(np.sqrt((weights * (v - mean) ** 2).sum() / total))

    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = of(x)
    if not (math.isfinite(mean) and math.isfinite(std)):
        scale = float(np.abs(x).max())
        low, spread = of(x / scale)
        mean, std = low * scale, spread * scale
    return mean, (std if std > 1e-12 else 1.0)


class NumericEncoder(Encoder):
    """Standardise a numeric column with the training mean and standard deviation.

    ``z = (f(x) - mean) / std`` where ``f`` is the identity or, with ``log1p``, the
    signed ``sign(x) * log1p(|x|)`` (safe for negative values). A constant training
    column uses ``std = 1``. Missing values become 0 (the training mean).

    Args:
        log1p: compress heavy tails (counts, prices) before standardising.
        missing_indicator: add a second column that is 1.0 where the value is missing.

    Output: dense ``[N, 1]`` float32, or ``[N, 2]`` (value, is_missing).
    """

    type_name = "numeric"

    def __init__(self, *, log1p: bool = False, missing_indicator: bool = False) -> None:
        self.log1p = bool(log1p)
        self.missing_indicator = bool(missing_indicator)
        self.mean: float | None = None
        self.std: float | None = None

    def _prepare(self, values: Values) -> np.ndarray:
        x = to_float(as_series(values, "values"))
        return np.sign(x) * np.log1p(np.abs(x)) if self.log1p else x

    def fit(self, values: Values) -> Self:
        warn_infinite(as_series(values, "values"))
        x = self._prepare(values)
        x = x[~np.isnan(x)]
        self.mean, self.std = _moments(x, np.ones_like(x), weighted=False)
        return self

    def fit_counts(self, values: pl.Series, counts: np.ndarray) -> Self:
        warn_infinite(values, counts)
        x = self._prepare(values)
        weights = np.asarray(counts, dtype=np.float64)
        known = ~np.isnan(x)
        x, weights = x[known], weights[known]
        # Sorted, so that the same counts in any order (a group-by's) sum alike.
        order = np.argsort(x, kind="stable")
        x, weights = x[order], weights[order]
        self.mean, self.std = _moments(x, weights, weighted=True)
        return self

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def transform(self, values: Values) -> np.ndarray:
        """[N] numbers -> [N, 1] or [N, 2] float32 (see the class docstring)."""
        self._check_fitted()
        assert self.mean is not None and self.std is not None
        x = self._prepare(values)
        missing = np.isnan(x)
        z = np.where(missing, 0.0, (x - self.mean) / self.std)
        columns = [z, missing.astype(np.float64)] if self.missing_indicator else [z]
        return np.stack(columns, axis=1).astype(np.float32)

    @property
    def output(self) -> FeatureOutput:
        return FeatureOutput("dense", 2 if self.missing_indicator else 1)

    def _config(self) -> dict[str, Any]:
        return {"log1p": self.log1p, "missing_indicator": self.missing_indicator}

    def _state(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])


class BucketEncoder(Encoder):
    """Cut a numeric column into buckets; index 0 is reserved for missing values.

    With ``b`` sorted boundaries, a value ``x`` gets ``1 + #{boundaries <= x}``: bucket 1
    is ``x < b[0]``, bucket ``k`` is ``b[k-2] <= x < b[k-1]``, the last is
    ``x >= b[-1]``. So ``num_embeddings = len(boundaries) + 2``.

    Args:
        num_buckets: fit ``num_buckets - 1`` boundaries at the training quantiles
            (observed values; duplicates dropped, so a column with few distinct
            values gets fewer buckets).
        boundaries: fixed, strictly increasing boundaries instead (nothing to learn:
            the encoder is fitted from construction).

    Output: index ``[N]`` int64.
    """

    type_name = "bucket"

    def __init__(
        self, *, num_buckets: int = 10, boundaries: Sequence[float] | None = None
    ) -> None:
        check_positive_int("num_buckets", num_buckets)
        self.num_buckets = num_buckets
        self.fixed = boundaries is not None
        self.boundaries: np.ndarray | None = None
        if boundaries is not None:
            self.boundaries = _check_boundaries(boundaries)

    def fit(self, values: Values) -> Self:
        if self.fixed:
            return self
        warn_infinite(as_series(values, "values"))
        x = to_float(as_series(values, "values"))
        x = x[~np.isnan(x)]
        if x.size == 0:
            self.boundaries = np.zeros(0)
            return self
        quantiles = np.linspace(0.0, 1.0, self.num_buckets + 1)[1:-1]
        # "lower" picks observed values, so a discrete column (MovieLens age codes)
        # gets one bucket per code instead of boundaries between codes.
        self.boundaries = np.unique(np.quantile(x, quantiles, method="lower"))
        return self

    def fit_counts(self, values: pl.Series, counts: np.ndarray) -> Self:
        if self.fixed:
            return self
        warn_infinite(values, counts)
        x = to_float(as_series(values, "values"))
        weights = np.asarray(counts, dtype=np.int64)
        known = ~np.isnan(x)
        x, weights = x[known], weights[known]
        total = int(weights.sum())
        if total == 0:
            self.boundaries = np.zeros(0)
            return self
        order = np.argsort(x, kind="stable")
        x, ends = x[order], np.cumsum(weights[order])
        quantiles = np.linspace(0.0, 1.0, self.num_buckets + 1)[1:-1]
        # numpy's "lower" quantile q is the sorted value at floor(q * (n - 1)): here
        # the distinct value whose run of copies covers that position.
        positions = np.floor(quantiles * (total - 1)).astype(np.int64)
        self.boundaries = np.unique(x[np.searchsorted(ends, positions, side="right")])
        return self

    @property
    def is_fitted(self) -> bool:
        return self.boundaries is not None

    def transform(self, values: Values) -> np.ndarray:
        """[N] numbers -> [N] int64 bucket indices (0 = missing)."""
        self._check_fitted()
        assert self.boundaries is not None
        x = to_float(as_series(values, "values"))
        missing = np.isnan(x)
        idx = np.searchsorted(self.boundaries, np.where(missing, 0.0, x), side="right")
        return np.where(missing, 0, idx + 1).astype(np.int64)

    @property
    def output(self) -> FeatureOutput:
        self._check_fitted()
        assert self.boundaries is not None
        return FeatureOutput("index", 1, len(self.boundaries) + 2)

    def _config(self) -> dict[str, Any]:
        fixed = self.boundaries if self.fixed else None
        return {
            "num_buckets": self.num_buckets,
            "boundaries": None if fixed is None else fixed.tolist(),
        }

    def _state(self) -> dict[str, Any]:
        assert self.boundaries is not None
        return {"boundaries": self.boundaries.tolist()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.boundaries = np.asarray(state["boundaries"], dtype=np.float64)


def _check_boundaries(boundaries: Sequence[float]) -> np.ndarray:
    b = np.asarray(boundaries, dtype=np.float64).reshape(-1)
    if b.size == 0 or not np.isfinite(b).all() or (np.diff(b) <= 0).any():
        raise ConfigError(
            "`boundaries` should be a non-empty, strictly increasing list of finite "
            f"numbers. Received: `boundaries` = {list(boundaries)!r}."
        )
    return b


class TimestampEncoder(Encoder):
    """Encode event times (epoch seconds, or a polars Date / Datetime column).

    Args:
        num_buckets: ``None`` gives a standardised dense value ``[N, 1]`` float32;
            an int gives ``num_buckets`` quantile buckets (index ``[N]`` int64, 0 =
            missing). Times after the training range land in the last bucket (or
            standardise beyond it), which is what a temporal split should see.
    """

    type_name = "timestamp"

    def __init__(self, *, num_buckets: int | None = None) -> None:
        check_positive_int("num_buckets", num_buckets, allow_none=True)
        self.num_buckets = num_buckets
        self._inner: NumericEncoder | BucketEncoder = (
            NumericEncoder()
            if num_buckets is None
            else BucketEncoder(num_buckets=num_buckets)
        )

    def fit(self, values: Values) -> Self:
        self._inner.fit(values)
        return self

    def fit_counts(self, values: pl.Series, counts: np.ndarray) -> Self:
        self._inner.fit_counts(values, counts)
        return self

    @property
    def is_fitted(self) -> bool:
        return self._inner.is_fitted

    def transform(self, values: Values) -> np.ndarray:
        """[N] times -> [N, 1] float32 (dense) or [N] int64 (buckets)."""
        self._check_fitted()
        return self._inner.transform(values)

    @property
    def output(self) -> FeatureOutput:
        self._check_fitted()
        return self._inner.output

    def _config(self) -> dict[str, Any]:
        return {"num_buckets": self.num_buckets}

    def _state(self) -> dict[str, Any]:
        return self._inner._state()

    def _set_state(self, state: dict[str, Any]) -> None:
        self._inner._set_state(state)


class CategoricalEncoder(Encoder):
    """A single-valued categorical or ID column through a :class:`Vocabulary`.

    Index 0 (or ``0 .. num_oov_buckets - 1``) holds values unseen in training and
    missing values; known values follow in descending training frequency.

    Args:
        min_count: keep values seen at least this many times in training.
        max_size: keep at most this many known values.
        num_oov_buckets: rows for unknown values (hashed among them when > 1).
        prefix: keep only the first ``prefix`` characters of each value (as text)
            before encoding, e.g. ``prefix=2`` turns US zip codes into regions.
        seed: seed of the OOV bucket hash.

    Output: index ``[N]`` int64 with ``num_embeddings = vocabulary.size``.
    """

    type_name = "categorical"

    def __init__(
        self,
        *,
        min_count: int = 1,
        max_size: int | None = None,
        num_oov_buckets: int = 1,
        prefix: int | None = None,
        seed: int = 0,
    ) -> None:
        check_positive_int("min_count", min_count)
        check_positive_int("max_size", max_size, allow_none=True)
        check_positive_int("prefix", prefix, allow_none=True)
        self.min_count, self.max_size, self.prefix = min_count, max_size, prefix
        self.vocabulary = Vocabulary(num_oov_buckets=num_oov_buckets, seed=seed)

    def _prepare(self, values: Values) -> pl.Series:
        series = as_series(values, "values")
        if series.dtype == pl.Boolean:
            series = series.cast(pl.String)
        if self.prefix is not None:
            series = series.cast(pl.String).str.strip_chars().str.head(self.prefix)
        return series

    def fit(self, values: Values) -> Self:
        self.vocabulary.fit(
            self._prepare(values), min_count=self.min_count, max_size=self.max_size
        )
        return self

    def fit_counts(self, values: pl.Series, counts: np.ndarray) -> Self:
        self.vocabulary.fit_counts(
            self._prepare(values),
            counts,
            min_count=self.min_count,
            max_size=self.max_size,
        )
        return self

    @property
    def is_fitted(self) -> bool:
        return self.vocabulary.is_fitted

    def transform(self, values: Values) -> np.ndarray:
        """[N] raw values -> [N] int64 indices."""
        self._check_fitted()
        return self.vocabulary.transform(self._prepare(values))

    def inverse_transform(self, indices: np.ndarray | Sequence[int]) -> pl.Series:
        """[N] indices -> [N] raw values (prefixes when ``prefix`` is set; OOV null)."""
        self._check_fitted()
        return self.vocabulary.inverse_transform(indices)

    @property
    def output(self) -> FeatureOutput:
        self._check_fitted()
        return FeatureOutput("index", 1, self.vocabulary.size)

    def _config(self) -> dict[str, Any]:
        return {
            "min_count": self.min_count,
            "max_size": self.max_size,
            "num_oov_buckets": self.vocabulary.num_oov_buckets,
            "prefix": self.prefix,
            "seed": self.vocabulary.seed,
        }

    def _state(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary.to_dict()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.vocabulary = Vocabulary.from_dict(state["vocabulary"])
