"""Which columns feed the query tower and which feed the candidate tower, and how.

A :class:`FeatureSpec` holds the :class:`~twostage.features.fields.Field` lists of both
sides, fits one encoder per field on the training split, and turns frames into the
tensor dicts the towers read::

    spec = FeatureSpec(
        query=[Field("user_id", "id"), Field("gender", "categorical")],
        candidate=[Field("item_id", "id"), Field("genres", "multi_hot")],
    ).fit(train)
    q = spec.transform_queries(batch, users=train.users)  # {"user_id": [B], ...}
    c = spec.transform_items(train.items)                   # {"item_id": [M], ...}

Where ``fit`` reads each column: a side's key column (``user_id`` / ``item_id``) from the
training interactions; other columns from the side table (``dataset.users`` /
``dataset.items``, restricted to the users / items that occur in the training
interactions, one row each); columns in neither table but in the interactions (context
such as ``timestamp``) from the interactions. ``transform_*`` uses a column of ``frame``
when present and otherwise joins it from the ``users=`` / ``items=`` table on the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import polars as pl
import torch

from twostage.data.dataset import ITEM, USER, Dataset
from twostage.errors import ArtifactError, ConfigError, DataError, NotFittedError
from twostage.features.base import Encoder, encoder_from_dict
from twostage.features.fields import FeatureInfo, Field, Side
from twostage.features.infer import default_fields
from twostage.features.joins import (
    as_frame,
    join_missing_columns,
    rows_with_keys,
)
from twostage.features.vocab import Vocabulary

__all__ = ["FeatureSpec"]

FORMAT = "twostage.feature_spec"
VERSION = 1
_SIDES: tuple[Side, ...] = ("query", "candidate")


class FeatureSpec:
    """The features of both towers, their fitted encoders, and JSON persistence.

    Args:
        query: fields of the query (user and context) side.
        candidate: fields of the candidate (item) side.

    Raises:
        ConfigError: an entry is not a :class:`Field`, or two fields share a ``key``.
    """

    def __init__(self, *, query: Sequence[Field], candidate: Sequence[Field]) -> None:
        self.query: tuple[Field, ...] = tuple(query)
        self.candidate: tuple[Field, ...] = tuple(candidate)
        for field in self.fields:
            if not isinstance(field, Field):
                raise ConfigError(
                    "`query` and `candidate` should hold Field objects. "
                    f"Received {type(field).__name__}: {field!r}."
                )
        keys = [f.key for f in self.fields]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ConfigError(
                f"every field needs its own output key; {duplicated} are used twice. "
                "Give one of them `key=...`."
            )
        self._encoders: dict[str, Encoder] = {}
        self._sources: dict[str, str] = {}

    @property
    def fields(self) -> tuple[Field, ...]:
        """The query fields, then the candidate fields."""
        return self.query + self.candidate

    def _side(self, side: Side) -> tuple[Field, ...]:
        return self.query if side == "query" else self.candidate

    @property
    def is_fitted(self) -> bool:
        return bool(self._encoders) or not self.fields

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                "This FeatureSpec is not fitted yet. Call `spec.fit(train)` with the "
                "training split first, or `FeatureSpec.load(path)` a fitted one."
            )

    @classmethod
    def default_for(cls, dataset: Dataset, *, use_side_features: bool = True) -> Self:
        """An unfitted spec with fields chosen from the columns of ``dataset``.

        ``user_id`` and ``item_id`` are always ``"id"`` fields. With
        ``use_side_features``, columns of ``dataset.users`` / ``dataset.items`` are
        added by name (MovieLens: age, gender, occupation, zip_code, title, genres,
        year) or by dtype and content (see :mod:`twostage.features.infer`). Call it
        on the training split so that content statistics come from train only.
        """
        query, candidate = default_fields(dataset, use_side_features=use_side_features)
        return cls(query=query, candidate=candidate)

    @classmethod
    def for_ids(cls, *, users: Vocabulary, items: Vocabulary) -> Self:
        """A fitted ID-only spec (``user_id`` and ``item_id`` fields) from vocabularies
        fitted elsewhere, e.g. in a streaming pass over a log too large to load
        (:func:`twostage.data.streaming.fit_vocabularies`)."""
        spec = cls(query=[Field(USER, "id")], candidate=[Field(ITEM, "id")])
        encoders: dict[str, Encoder] = {}
        for field, vocabulary in ((spec.query[0], users), (spec.candidate[0], items)):
            encoder = field.make_encoder()
            encoder.vocabulary = vocabulary  # type: ignore[attr-defined]
            encoders[field.key] = encoder
        spec._encoders = encoders
        spec._sources = {USER: "interactions", ITEM: "interactions"}
        return spec

    def fit_streamed(
        self,
        *,
        users: Vocabulary,
        items: Vocabulary,
        user_table: pl.DataFrame | None,
        item_table: pl.DataFrame | None,
        context: Mapping[str, pl.DataFrame] | None = None,
    ) -> Self:
        """Fit on a log too large to load: the ID fields take vocabularies fitted in
        a streaming pass (:func:`twostage.data.streaming.fit_vocabularies`), the
        other fields the rows of the feature tables whose ID is in them (the training
        users and items), as :meth:`fit` takes them from a training split.

        A query field whose column is in no feature table reads the log's rows (per-row
        context): ``context[column]`` holds that column's distinct training values
        and their counts (``key``, ``count``; :func:`twostage.data.streaming.
        count_values`), and the encoder fits on them (:meth:`Encoder.fit_counts`).

        Raises:
            DataError: a field reads a column found in no feature table and not in
                ``context``.
        """
        context = context or {}
        encoders: dict[str, Encoder] = {}
        sources: dict[str, str] = {}
        for side in _SIDES:
            key, vocabulary, table, table_name = (
                (USER, users, user_table, "users")
                if side == "query"
                else (ITEM, items, item_table, "items")
            )
            seen: pl.DataFrame | None = None
            for field in self._side(side):
                if field.name == key:
                    encoder = field.make_encoder()
                    encoder.vocabulary = vocabulary  # type: ignore[attr-defined]
                    encoders[field.key], sources[field.key] = encoder, "interactions"
                    continue
                if (
                    side == "query"
                    and field.name in context
                    and (table is None or field.name not in table.columns)
                ):
                    counts = context[field.name]
                    encoders[field.key] = field.make_encoder().fit_counts(
                        counts["key"].rename(field.name), counts["count"].to_numpy()
                    )
                    sources[field.key] = "interactions"
                    continue
                if table is None or field.name not in table.columns:
                    raise DataError(
                        f"{side} field {field.key!r} reads column {field.name!r}, which "
                        f"is not in the {table_name} feature table "
                        f"{None if table is None else table.columns}, nor counted "
                        "as a per-row context column of the streamed log."
                    )
                if seen is None:  # one row per training user / item
                    seen = rows_with_keys(table, key, vocabulary.values)
                encoders[field.key] = field.make_encoder().fit(seen[field.name])
                sources[field.key] = table_name
        self._encoders, self._sources = encoders, sources
        return self

    def fit(self, dataset: Dataset) -> Self:
        """Fit one encoder per field on the training split (see the module docstring).

        Args:
            dataset: the training split only.

        Returns:
            ``self``.

        Raises:
            DataError: a field's column is in none of the tables it may come from.
        """
        if not isinstance(dataset, Dataset):
            raise DataError(
                "`dataset` should be a twostage Dataset (the training split). "
                f"Received {type(dataset).__name__}."
            )
        encoders: dict[str, Encoder] = {}
        sources: dict[str, str] = {}
        for side in _SIDES:
            for field, values, source in _training_columns(dataset, side, self):
                encoders[field.key] = field.make_encoder().fit(values)
                sources[field.key] = source
        self._encoders, self._sources = encoders, sources
        return self

    def transform_queries(
        self,
        frame: pl.DataFrame | pl.Series | Sequence[Any],
        *,
        users: pl.DataFrame | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the query side of ``N`` rows.

        Args:
            frame: [N] rows with ``user_id`` and any context columns (e.g.
                ``timestamp``), such as a batch of interactions; or just the user IDs.
            users: user feature table keyed by ``user_id``, for the query columns that
                ``frame`` lacks (unknown users get missing / OOV values).

        Returns:
            ``{field.key: tensor}`` for the query fields: ``[N]`` int64 for "index",
            ``[N, L]`` int64 for "indices", ``[N, d]`` float32 for "dense".

        Raises:
            DataError: a query column is neither in ``frame`` nor in ``users``.
        """
        return self._transform("query", as_frame(frame, USER), users)

    def transform_context(self, frame: pl.DataFrame) -> dict[str, torch.Tensor]:
        """Encode the per-row context fields of the query side (the query fields
        read from the interactions, the user ID aside) from ``frame``'s columns, as
        :meth:`transform_queries` encodes them."""
        self._check_fitted()
        out: dict[str, torch.Tensor] = {}
        for field in self._side("query"):
            if field.name == USER or self._sources[field.key] != "interactions":
                continue
            encoded = self._encoders[field.key].transform(frame[field.name])
            out[field.key] = torch.from_numpy(
                np.require(encoded, requirements=["C", "W"])
            )
        return out

    def transform_items(
        self,
        frame: pl.DataFrame | pl.Series | Sequence[Any],
        *,
        items: pl.DataFrame | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode the candidate side of ``N`` rows (e.g. the whole item table).

        Args:
            frame: [N] rows with ``item_id`` and candidate columns (e.g.
                ``dataset.items``), or interactions, or just the item IDs.
            items: item feature table keyed by ``item_id``, for the candidate columns
                that ``frame`` lacks.

        Returns:
            ``{field.key: tensor}`` for the candidate fields, shapes as in
            ``transform_queries``.

        Raises:
            DataError: a candidate column is neither in ``frame`` nor in ``items``.
        """
        return self._transform("candidate", as_frame(frame, ITEM), items)

    def _transform(
        self, side: Side, frame: pl.DataFrame, table: pl.DataFrame | None
    ) -> dict[str, torch.Tensor]:
        self._check_fitted()
        fields = self._side(side)
        frame = join_missing_columns(frame, [f.name for f in fields], side, table)
        out: dict[str, torch.Tensor] = {}
        for field in fields:
            encoded = self._encoders[field.key].transform(frame[field.name])
            # torch.from_numpy shares memory; it needs a writable, C-ordered array.
            out[field.key] = torch.from_numpy(
                np.require(encoded, requirements=["C", "W"])
            )
        return out

    def describe(self, *, side: Side | None = None) -> list[FeatureInfo]:
        """One :class:`FeatureInfo` per field (query fields first), for model building.

        Args:
            side: only ``"query"`` or only ``"candidate"`` fields; both when None.
        """
        self._check_fitted()
        infos = []
        for side_name in _SIDES if side is None else (side,):
            for field in self._side(side_name):
                out = self._encoders[field.key].output
                infos.append(
                    FeatureInfo(
                        key=field.key,
                        column=field.name,
                        side=side_name,
                        kind=field.kind,
                        source=self._sources[field.key],
                        output=out.kind,
                        width=out.width,
                        num_embeddings=out.num_embeddings,
                        dtype=out.dtype,
                        padding_idx=0 if out.kind == "indices" else None,
                    )
                )
        return infos

    def encoder(self, key: str) -> Encoder:
        """The fitted encoder of the field with output key ``key``."""
        self._check_fitted()
        if key not in self._encoders:
            raise ConfigError(
                f"`key` should be one of {list(self._encoders)}. Received: `key` = "
                f"{key!r}."
            )
        return self._encoders[key]

    def vocabulary(self, key: str) -> Vocabulary:
        """The vocabulary of an id / categorical / multi_hot / text field, e.g.
        ``spec.vocabulary("item_id").inverse_transform(item_idx)``."""
        vocabulary = getattr(self.encoder(key), "vocabulary", None)
        if not isinstance(vocabulary, Vocabulary):
            raise ConfigError(
                f"field {key!r} has no vocabulary (its encoder is "
                f"{type(self.encoder(key)).__name__}). Ask for an id, categorical, "
                "multi_hot or text field."
            )
        return vocabulary

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields and (when fitted) encoder states; see ``from_dict``."""
        fitted = bool(self._encoders)
        return {
            "format": FORMAT,
            "version": VERSION,
            "query": [f.to_dict() for f in self.query],
            "candidate": [f.to_dict() for f in self.candidate],
            "encoders": (
                {k: e.to_dict() for k, e in self._encoders.items()} if fitted else None
            ),
            "sources": dict(self._sources) if fitted else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Rebuild a spec written by ``to_dict``; transforms give identical tensors.

        Raises:
            ArtifactError: not a feature spec, another version, or inconsistent.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(
                f"expected a feature spec dict with format {FORMAT!r}. Received "
                f"format {data.get('format') if isinstance(data, dict) else None!r}."
            )
        if data.get("version") != VERSION:
            raise ArtifactError(
                f"feature spec version {data.get('version')!r} is not supported (this "
                f"twostage reads version {VERSION}). Re-fit and save the spec."
            )
        try:
            spec = cls(
                query=[Field.from_dict(d) for d in data["query"]],
                candidate=[Field.from_dict(d) for d in data["candidate"]],
            )
            if data.get("encoders") is not None:
                spec._encoders, spec._sources = _load_encoders(spec, data)
        except (ConfigError, KeyError, TypeError) as e:
            raise ArtifactError(f"saved feature spec is invalid: {e}") from e
        return spec

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the spec to one JSON file (atomically: a temporary file, then rename)."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), allow_nan=False), encoding="utf-8")
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        """Read a spec written by ``save``.

        Raises:
            ArtifactError: the file is missing, not JSON, or not a valid spec.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(
                f"cannot read a feature spec from {str(path)!r}: {e}"
            ) from e
        return cls.from_dict(data)

    def __repr__(self) -> str:
        query = ", ".join(f.key for f in self.query)
        candidate = ", ".join(f.key for f in self.candidate)
        fitted = "fitted" if self._encoders else "unfitted"
        return f"FeatureSpec(query=[{query}], candidate=[{candidate}], {fitted})"


def _load_encoders(
    spec: FeatureSpec, data: dict[str, Any]
) -> tuple[dict[str, Encoder], dict[str, str]]:
    saved, sources = data["encoders"], data["sources"]
    keys = [f.key for f in spec.fields]
    if sorted(saved) != sorted(keys) or sorted(sources) != sorted(keys):
        raise ConfigError(f"encoders {sorted(saved)} do not match fields {keys}")
    encoders: dict[str, Encoder] = {}
    for field in spec.fields:
        encoder = encoder_from_dict(saved[field.key])
        if type(encoder) is not type(field.make_encoder()):
            raise ConfigError(
                f"field {field.key!r} of kind {field.kind!r} has a saved "
                f"{type(encoder).__name__}"
            )
        encoders[field.key] = encoder
    return encoders, {k: str(v) for k, v in sources.items()}


def _training_columns(
    dataset: Dataset, side: Side, spec: FeatureSpec
) -> Iterator[tuple[Field, pl.Series, str]]:
    """(field, training values, source) for each field of one side."""
    key, table, table_name = (
        (USER, dataset.users, "users")
        if side == "query"
        else (ITEM, dataset.items, "items")
    )
    interactions = dataset.interactions
    seen: pl.DataFrame | None = None
    for field in spec._side(side):
        if field.name == key:
            yield field, interactions[key], "interactions"
        elif table is not None and field.name in table.columns:
            if seen is None:  # one row per user / item that occurs in training
                seen = rows_with_keys(table, key, interactions[key])
            yield field, seen[field.name], table_name
        elif field.name in interactions.columns:
            yield field, interactions[field.name], "interactions"
        else:
            raise DataError(
                f"{side} field {field.key!r} reads column {field.name!r}, which is in "
                f"neither the interactions {interactions.columns} nor the {table_name} "
                f"table {None if table is None else table.columns}. Add the column or "
                "remove the field."
            )
