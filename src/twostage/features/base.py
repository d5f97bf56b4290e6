"""The contract every feature encoder follows, and small helpers they share.

An encoder behaves like a scikit-learn estimator: configure it in the constructor, ``fit``
it on the training split only, then ``transform`` any split. Its whole state round-trips
through ``to_dict`` / ``from_dict`` as plain JSON values (no pickle), and its ``output``
says what ``transform`` returns so a model can size its embedding tables:

========  =====================  =========================================
kind      ``transform`` returns  meaning
========  =====================  =========================================
index     ``[N]`` int64          one row of an embedding table per value
indices   ``[N, L]`` int64       up to ``L`` rows per value, ``0`` = padding
dense     ``[N, d]`` float32     ``d`` real-valued columns
========  =====================  =========================================
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import numpy as np
import polars as pl

from twostage.errors import ArtifactError, ConfigError, DataError, NotFittedError

logger = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "FeatureOutput",
    "OutputKind",
    "encoder_from_dict",
]

OutputKind = Literal["index", "indices", "dense"]
_REGISTRY: dict[str, type[Encoder]] = {}


@dataclass(frozen=True)
class FeatureOutput:
    """What an encoder's ``transform`` returns.

    Attributes:
        kind: ``"index"`` ([N] int64), ``"indices"`` ([N, L] int64, 0 = padding) or
            ``"dense"`` ([N, d] float32).
        width: 1 for ``"index"``, ``L`` for ``"indices"``, ``d`` for ``"dense"``.
        num_embeddings: rows an embedding table needs (every index is below it);
            ``None`` for ``"dense"``.
    """

    kind: OutputKind
    width: int
    num_embeddings: int | None = None

    @property
    def dtype(self) -> str:
        """``"int64"`` for the index kinds, ``"float32"`` for dense."""
        return "float32" if self.kind == "dense" else "int64"


class Encoder(ABC):
    """Base class of the feature encoders (fit on train, transform, save as JSON).

    Subclasses set ``type_name`` (the ``"type"`` written by ``to_dict``), accept their
    configuration as keyword arguments of ``__init__`` and implement ``_config``,
    ``_state``, ``_set_state``, ``fit``, ``transform`` and ``output``.
    """

    type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.type_name:
            _REGISTRY[cls.type_name] = cls

    @abstractmethod
    def fit(self, values: pl.Series | Sequence[Any]) -> Self:
        """Learn the encoder's state from the training values only; returns ``self``."""

    @abstractmethod
    def transform(self, values: pl.Series | Sequence[Any]) -> np.ndarray:
        """Encode ``N`` values; the shape and dtype are given by ``output``."""

    @property
    @abstractmethod
    def output(self) -> FeatureOutput:
        """The kind, width and embedding-table size of ``transform``'s result."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether ``transform`` can be called."""

    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """The constructor keyword arguments, as JSON values."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """The fitted state, as JSON values (only called when fitted)."""

    @abstractmethod
    def _set_state(self, state: dict[str, Any]) -> None:
        """Restore the state written by ``_state``."""

    def fit_counts(self, values: pl.Series, counts: np.ndarray) -> Self:
        """Learn the state :meth:`fit` would learn from ``counts[i]`` copies of each
        ``values[i]`` (distinct raw values and their training counts, e.g. from a
        streaming pass over a log too large to load); returns ``self``.

        Raises:
            ConfigError: this encoder cannot be fitted from counts.
        """
        raise ConfigError(
            f"a {self.type_name!r} encoder cannot be fitted from value counts (a "
            "streamed log): use a categorical, numeric, bucket or timestamp field."
        )

    def fit_transform(self, values: pl.Series | Sequence[Any]) -> np.ndarray:
        """``fit(values)`` then ``transform(values)``."""
        return self.fit(values).transform(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: ``{"type", "config", "state"}`` (state null if unfit)."""
        return {
            "type": self.type_name,
            "config": self._config(),
            "state": self._state() if self.is_fitted else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Rebuild an encoder written by ``to_dict``; transforms are identical.

        Raises:
            ArtifactError: ``data`` is not an encoder of this class or is incomplete.
        """
        encoder = encoder_from_dict(data)
        if not isinstance(encoder, cls):
            raise ArtifactError(
                f"`data` should describe a {cls.__name__}. "
                f"Received type {data.get('type')!r}."
            )
        return encoder

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet. Call `fit` with the "
                "training split first (or load a fitted one with `from_dict`)."
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        fitted = "" if self.is_fitted else ", unfitted"
        return f"{type(self).__name__}({args}{fitted})"


def encoder_from_dict(data: dict[str, Any]) -> Encoder:
    """Rebuild any encoder from the output of its ``to_dict``.

    Raises:
        ArtifactError: unknown ``"type"``, or missing / invalid config or state.
    """
    if not isinstance(data, dict) or data.get("type") not in _REGISTRY:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise ArtifactError(
            f"`data` should be an encoder dict with a 'type' in {sorted(_REGISTRY)}. "
            f"Received type {kind!r}."
        )
    cls = _REGISTRY[data["type"]]
    try:
        encoder = cls(**data["config"])
        if data.get("state") is not None:
            encoder._set_state(data["state"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(
            f"saved {cls.__name__} state is incomplete or invalid ({e}). "
            "Re-create it with `to_dict` from a fitted encoder."
        ) from e
    return encoder


def as_series(values: pl.Series | Sequence[Any] | np.ndarray, name: str) -> pl.Series:
    """``values`` as a polars Series (lists, tuples and numpy arrays are converted)."""
    if isinstance(values, pl.Series):
        return values
    if isinstance(values, (str, bytes)) or not isinstance(
        values, (Sequence, np.ndarray)
    ):
        raise DataError(
            f"`{name}` should be a polars Series, a list or a numpy array. "
            f"Received {type(values).__name__}."
        )
    return pl.Series(name, values)


def to_float(values: pl.Series) -> np.ndarray:
    """``values`` as float64 with NaN wherever a value is null, NaN or infinite.

    Raises:
        DataError: the column cannot be read as numbers.
    """
    if values.dtype == pl.Null:
        return np.full(len(values), np.nan)
    if values.dtype.is_temporal():
        if values.dtype == pl.Date:
            values = values.cast(pl.Datetime("ms"))
        values = values.dt.epoch("s")
    try:
        out = values.cast(pl.Float64).fill_null(np.nan).to_numpy()
    except pl.exceptions.PolarsError as e:
        raise DataError(
            f"column {values.name!r} should be numeric. Received dtype {values.dtype}. "
            "Use a categorical or text feature for it, or cast it first."
        ) from e
    out = np.array(out, dtype=np.float64)  # own, writable copy
    out[~np.isfinite(out)] = np.nan
    return out


def warn_infinite(values: pl.Series, counts: np.ndarray | None = None) -> None:
    """Log how many of the values an encoder is fitted on are infinite: they are
    read as missing (:func:`to_float`), which a user should hear about once, at
    fit time, not find in the figures. ``counts``: each value's row count (a
    streamed fit's distinct values)."""
    if not values.dtype.is_float():
        return
    infinite = values.is_infinite().fill_null(False).to_numpy()
    if not infinite.any():
        return
    rows = int(infinite.sum() if counts is None else np.asarray(counts)[infinite].sum())
    logger.warning(
        "column %r: %d infinite value(s) are read as missing (fitted without "
        "them; encoded as missing values are).",
        values.name,
        rows,
    )


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"`{name}` should be a positive integer"
            f"{' or None' if allow_none else ''}. Received: `{name}` = {value!r}."
        )
