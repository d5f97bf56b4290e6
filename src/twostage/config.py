"""Typed, strict configuration: frozen dataclasses, JSON files and ``key=value`` overrides.

A config is saved beside the weights; reloading rebuilds the model from the saved config,
never from today's defaults. Unknown keys and wrong types are errors, not warnings.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from twostage.errors import ConfigError

__all__ = [
    "DataConfig",
    "RetrievalConfig",
    "TrainConfig",
    "IndexConfig",
    "ExperimentConfig",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "load_config",
    "save_config",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is split.

    ``user_features``/``item_features`` name extra columns of a user's own log that become
    side features; the ``*_col`` options map the log's columns.
    """

    dataset: str = "movielens-100k"
    split: Literal["random", "temporal", "leave-last-out"] = "random"
    test_fraction: float = 0.2
    validation_fraction: float = 0.05
    seed: int = 42
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    rating_col: str | None = None
    separator: str | None = None
    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    cold_user_fraction: float = 0.0


@dataclass(frozen=True)
class RetrievalConfig:
    """Shape of the two-tower retrieval model and its loss.

    ``query_fields`` / ``candidate_fields`` restrict the side features to these columns
    (the ID fields are always used); empty means every column the data offers.

    ``examples`` is ``interactions`` (one training example per (user, item) row: the
    query sees the user's history without that item and must pick it) or ``users`` (one
    example per user, as in Mult-DAE, Liang et al., WWW 2018: the query sees the user's
    history with ``history_dropout`` of it hidden, and must put every one of the user's
    training items high; with ``in_batch`` negatives the candidates are the items of the
    batch's users, logQ corrected). ``history_dropout`` hides that share of the history
    items from each training query, at random. ``max_positives_per_user`` > 0 draws at
    most that many of a user's training items as the positives of each users-mode
    example (a fresh draw every time), so a user with a very long log neither fills a
    batch's memory nor outweighs everyone else in the loss (YouTube's candidate
    generation model, Covington et al. 2016, also caps examples per user); 0 uses
    them all.

    ``negatives`` is ``in_batch`` (the other positives of the batch, plus
    ``num_extra_negatives`` uniform draws, with the logQ correction) or ``full`` (an
    exact softmax over the whole catalogue, for catalogues up to some tens of thousands
    of items); with ``full``, ``mask_seen_negatives`` keeps the user's other training
    items (its history) out of the negatives.

    ``combine`` joins a tower's field embeddings (and the pooled history): ``sum`` (the
    default) adds them, as factorisation machines and LightFM do, so an item's vector
    is its ID vector plus its features' vectors and a field that does not help can fade
    to zero; ``concat`` passes their concatenation through the head (an MLP or one
    linear layer).
    """

    embedding_dim: int = 64
    output_dim: int = 64
    hidden_dims: tuple[int, ...] = ()
    combine: Literal["concat", "sum"] = "sum"
    use_side_features: bool = True
    query_fields: tuple[str, ...] = ()
    candidate_fields: tuple[str, ...] = ()
    history_length: int = 100
    history_pooling: Literal["mean", "attention"] = "mean"
    history_dropout: float = 0.0
    examples: Literal["interactions", "users"] = "interactions"
    max_positives_per_user: int = 0
    temperature: float = 0.3
    learn_temperature: bool = False
    logq_correction: bool = True
    logq_weight: float = 1.0
    num_extra_negatives: int = 0
    negatives: Literal["in_batch", "full"] = "in_batch"
    mask_seen_negatives: bool = True
    rating_weights: bool = False
    id_dropout: float = 0.1
    dropout: float = 0.0
    sparse_embeddings: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop.

    ``max_steps`` > 0 stops after that many optimiser steps in all (smoke runs and
    throughput benchmarks). ``device`` is ``auto`` (CUDA when present), ``cpu`` or
    ``cuda[:n]``; ``num_threads`` > 0 sets torch's CPU threads.
    """

    epochs: int = 10
    batch_size: int = 512
    learning_rate: float = 0.005
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "adagrad"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 50
    grad_clip: float = 1.0
    early_stopping_patience: int = 3
    eval_k: int = 100
    max_steps: int = 0
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0


@dataclass(frozen=True)
class IndexConfig:
    """The nearest-neighbour index the Recommender retrieves with.

    ``exact`` (chunked matrix product + top-k) is right for catalogues up to a few
    hundred thousand items; ``hnsw`` and ``ivf`` are faiss backends for millions,
    ``scann`` needs the optional ``scann`` package. Zero means "pick from the catalogue
    size" for ``ivf_nlist`` and the measured default for the other numbers.
    """

    kind: Literal["exact", "hnsw", "ivf", "scann"] = "exact"
    hnsw_m: int = 32
    ef_construction: int = 0
    ef_search: int = 0
    ivf_nlist: int = 0
    nprobe: int = 0
    chunk_size: int = 65536
    device: str = "cpu"


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run needs; saved with the model."""

    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` should be a mapping. Received: {value!r}.")
        return from_dict(hint, value, prefix=where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"`{where}` should be one of {list(args)}. Received: {value!r}."
            )
        return value
    if origin is tuple:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"`{where}` should be a list, e.g. `256,128` or `[256, 128]`. "
                    f"Received: {value!r} ({e.msg})."
                ) from e
        elif isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"`{where}` should be a list. Received: {value!r}.")
        return tuple(_coerce(v, args[0], f"{where}[]") for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise ConfigError(f"`{where}` has an unsupported type {hint!r}.")
    raise ConfigError(
        f"`{where}` should be of type {getattr(hint, '__name__', hint)}. "
        f"Received: {value!r}."
    )


def from_dict(cls: type[T], values: dict[str, Any], *, prefix: str = "") -> T:
    """Build a config dataclass, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f" in `{prefix}`" if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {unknown}{where}. Known keys: {names}."
        )
    kwargs = {
        k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
        for k, v in values.items()
    }
    return cls(**kwargs)


def apply_overrides(config: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Apply ``section.key=value`` overrides (e.g. ``train.epochs=5``) to a config."""
    values = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(
                f"an override should look like `train.epochs=5`. Received: {item!r}."
            )
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"unknown config section {part!r} in override {item!r}. "
                    f"Known sections: {sorted(k for k, v in node.items() if isinstance(v, dict))}."
                )
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ConfigError(
                f"unknown config key {key!r} in override {item!r}. "
                f"Known keys here: {sorted(node)}."
            )
        node[parts[-1]] = raw
    return from_dict(type(config), values)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as indented JSON."""
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path, cls: type[T] = ExperimentConfig) -> T:  # type: ignore[assignment]
    """Read a config saved by :func:`save_config` (or written by hand), strictly."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from e
    return from_dict(cls, values)
