"""One configured feature (:class:`Field`) and what a model needs to know about it.

A field names a source column, a kind, and the options of that kind's encoder:

============  ====================  ===================================================
kind          encoder               options
============  ====================  ===================================================
id            CategoricalEncoder    min_count, max_size, num_oov_buckets, seed
categorical   CategoricalEncoder    min_count, max_size, num_oov_buckets, seed, prefix
hash          HashingEncoder        num_buckets (required), seed
bucket        BucketEncoder         num_buckets, boundaries
numeric       NumericEncoder        log1p, missing_indicator
timestamp     TimestampEncoder      num_buckets (None: dense)
multi_hot     MultiHotEncoder       max_values, min_count, max_size, separator
text          TextEncoder           max_length, min_count, max_size, lowercase
============  ====================  ===================================================

Options left as ``None`` take the encoder's default; giving an option to a kind that
does not use it is a ConfigError, so typos and misplaced options fail early.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, fields
from typing import Any, Literal, get_args

from twostage.errors import ConfigError
from twostage.features.base import Encoder, OutputKind
from twostage.features.encoders import (
    BucketEncoder,
    CategoricalEncoder,
    NumericEncoder,
    TimestampEncoder,
)
from twostage.features.sequences import MultiHotEncoder, TextEncoder
from twostage.features.vocab import HashingEncoder

__all__ = ["FIELD_KINDS", "FeatureInfo", "Field", "FieldKind", "Side"]

FieldKind = Literal[
    "id", "hash", "categorical", "bucket", "numeric", "timestamp", "multi_hot", "text"
]
FIELD_KINDS: tuple[str, ...] = get_args(FieldKind)
Side = Literal["query", "candidate"]

_VOCAB = ("min_count", "max_size", "num_oov_buckets", "seed")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "id": _VOCAB,
    "categorical": (*_VOCAB, "prefix"),
    "hash": ("num_buckets", "seed"),
    "bucket": ("num_buckets", "boundaries"),
    "numeric": ("log1p", "missing_indicator"),
    "timestamp": ("num_buckets",),
    "multi_hot": ("max_values", "min_count", "max_size", "separator"),
    "text": ("max_length", "min_count", "max_size", "lowercase"),
}
_BUILDERS: dict[str, Callable[..., Encoder]] = {
    "id": CategoricalEncoder,
    "categorical": CategoricalEncoder,
    "hash": HashingEncoder,
    "bucket": BucketEncoder,
    "numeric": NumericEncoder,
    "timestamp": TimestampEncoder,
    "multi_hot": MultiHotEncoder,
    "text": TextEncoder,
}


@dataclass(frozen=True, repr=False)
class Field:
    """A feature: which column to read, how to encode it, and under which name.

    Args:
        name: the source column (in the interactions, users or items table).
        kind: one of ``FIELD_KINDS`` (see the module docstring).
        key: the name of the output tensor; defaults to ``name``. Use it to encode one
            column twice, e.g. ``Field("timestamp", "timestamp", key="time_bucket",
            num_buckets=20)`` beside a dense ``Field("timestamp", "timestamp")``.
        **options: keyword options of the kind's encoder (module docstring).

    Example:
        ``Field("zip_code", "categorical", prefix=2)``
    """

    name: str
    kind: FieldKind
    _: KW_ONLY
    key: str = ""
    min_count: int | None = None
    max_size: int | None = None
    num_oov_buckets: int | None = None
    seed: int | None = None
    prefix: int | None = None
    num_buckets: int | None = None
    boundaries: tuple[float, ...] | None = None
    log1p: bool | None = None
    missing_indicator: bool | None = None
    max_values: int | None = None
    max_length: int | None = None
    separator: str | None = None
    lowercase: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(
                "`name` should be a non-empty column name. "
                f"Received: `name` = {self.name!r}."
            )
        if self.kind not in FIELD_KINDS:
            raise ConfigError(
                f"`kind` should be one of {list(FIELD_KINDS)}. "
                f"Received: `kind` = {self.kind!r} (for column {self.name!r})."
            )
        if not self.key:
            object.__setattr__(self, "key", self.name)
        if self.boundaries is not None:
            object.__setattr__(self, "boundaries", tuple(self.boundaries))
        allowed = _OPTIONS[self.kind]
        for option in self.options(include_unset=True):
            if getattr(self, option) is not None and option not in allowed:
                raise ConfigError(
                    f"option `{option}` does not apply to a {self.kind!r} field "
                    f"({self.name!r}); it takes {list(allowed)}. "
                    f"Received: `{option}` = {getattr(self, option)!r}."
                )
        if self.kind == "hash" and self.num_buckets is None:
            raise ConfigError(
                f"a 'hash' field ({self.name!r}) needs `num_buckets`. "
                "Received: `num_buckets` = None."
            )
        self.make_encoder()  # validates the option values

    def __repr__(self) -> str:
        key = "" if self.key == self.name else f", key={self.key!r}"
        options = "".join(f", {k}={v!r}" for k, v in self.options().items())
        return f"Field({self.name!r}, {self.kind!r}{key}{options})"

    def options(self, *, include_unset: bool = False) -> dict[str, Any]:
        """The encoder options (only the ones set, unless ``include_unset``)."""
        names = [f.name for f in fields(self)][3:]  # after name, kind, key
        values = {n: getattr(self, n) for n in names}
        return (
            values
            if include_unset
            else {k: v for k, v in values.items() if v is not None}
        )

    def make_encoder(self) -> Encoder:
        """A new, unfitted encoder configured by this field."""
        options = self.options()
        if options.get("boundaries") is not None:
            options["boundaries"] = list(options["boundaries"])
        if self.kind == "hash":
            return HashingEncoder(options.pop("num_buckets"), **options)
        return _BUILDERS[self.kind](**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``name``, ``kind``, ``key`` and the options that are set."""
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "key": self.key}
        data.update(self.options())
        if self.boundaries is not None:
            data["boundaries"] = list(self.boundaries)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Field:
        """Rebuild a field written by ``to_dict``.

        Raises:
            ConfigError: unknown keys, or missing ``name`` / ``kind``.
        """
        known = {f.name for f in fields(cls)} - {"_"}
        unknown = sorted(set(data) - known)
        if unknown or "name" not in data or "kind" not in data:
            raise ConfigError(
                f"a field dict needs 'name' and 'kind' and only keys from "
                f"{sorted(known)}. Received keys: {sorted(data)}."
            )
        return cls(**data)


@dataclass(frozen=True)
class FeatureInfo:
    """What a model needs to embed one feature (one entry of ``FeatureSpec.describe``).

    Attributes:
        key: the key of the tensor in ``transform_queries`` / ``transform_items``.
        column: the source column.
        side: ``"query"`` (user / context tower) or ``"candidate"`` (item tower).
        kind: the field kind, e.g. ``"categorical"``.
        source: where ``fit`` read it: ``"interactions"``, ``"users"`` or ``"items"``.
        output: ``"index"`` -> ``[N]`` int64; ``"indices"`` -> ``[N, width]`` int64
            padded with 0; ``"dense"`` -> ``[N, width]`` float32.
        width: 1 for ``"index"``, ``L`` for ``"indices"``, ``d`` for ``"dense"``.
        num_embeddings: embedding rows for the index kinds, else ``None``.
        dtype: ``"int64"`` or ``"float32"``.
        padding_idx: 0 for ``"indices"`` (pool only ``indices != 0``), else ``None``.
    """

    key: str
    column: str
    side: Side
    kind: FieldKind
    source: str
    output: OutputKind
    width: int
    num_embeddings: int | None
    dtype: str
    padding_idx: int | None

    def to_dict(self) -> dict[str, Any]:
        """The attributes as a JSON-safe dict."""
        return asdict(self)
