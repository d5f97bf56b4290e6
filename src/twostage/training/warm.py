"""Warm start: a new model's weights copied from a saved one where they mean the
same thing (``train.warm_start``), so a model retrained on a newer log starts
from what the served model learnt instead of from random weights.

The new model's vocabularies are fitted on the new rows as in any run, so the
same ID may sit at another row. Each table whose rows follow a vocabulary (the
ID tables of users and items, categorical, multi-hot and text fields, the
history's item table, the ranker's bias tables) is copied row by row by ID
value: an ID both vocabularies hold keeps its saved vector, an ID only the new
rows hold starts from its fresh initial value, an ID only the saved model held
is gone. Padding and out-of-vocabulary rows are copied as they are. Every other
parameter is copied whole and must have the same shape: a different shape
means another architecture (``retrieval.embedding_dim``, the layers...), and is
refused with its name. A field's weights start afresh, and are reported, where
the saved model did not have the field, encoded it otherwise (a bucket then, a
category now), held IDs of another kind (text then, numbers now), or had a
table of another size that no vocabulary numbers (buckets, hashes). Buffers (a fixed temperature, the mean rating) are
never copied: they come from the new config and rows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from twostage.data.dataset import ITEM, USER
from twostage.errors import ConfigError, DataError
from twostage.features.vocab import Vocabulary

if TYPE_CHECKING:
    from twostage.features import FeatureSpec
    from twostage.recommender import Recommender

__all__ = ["WarmStart", "copy_weights", "load_warm_start", "warm_source"]

logger = logging.getLogger(__name__)

#: A field's weights in a tower or the ranker (a table, or a number's map and its
#: bias): its key in the feature spec.
_FIELD_TABLE = re.compile(r"(?:^|\.)embeddings\.([^.]+)\.(?:weight|bias)$")
#: Tables whose rows are the item vocabulary's or the user vocabulary's.
_ITEM_TABLES = re.compile(
    r"(?:^|\.)(?:history\.embedding|item_bias|item_click_bias)\.weight$"
)
_USER_TABLES = re.compile(r"(?:^|\.)user_bias\.weight$")
#: Rows copied at a time from a saved table into a new one.
_ROWS_A_BLOCK = 1 << 18


@dataclass
class WarmStart:
    """What a warm start copied: ``copied`` parameters in all, the rows kept of
    each vocabulary-keyed table (``rows``: name -> ``(kept, new rows)``), and the
    parameters that start afresh (``fresh``: name -> why)."""

    source: str
    copied: int = 0
    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"warm start from {self.source}: {self.copied} weights copied"]
        for name, (kept, total) in self.rows.items():
            parts.append(f"{name} {kept:,} of {total:,} rows")
        if self.fresh:
            parts.append(
                "afresh: " + ", ".join(f"{n} ({why})" for n, why in self.fresh.items())
            )
        return "; ".join(parts)


def load_warm_start(path: str) -> Recommender:
    """The saved model ``train.warm_start`` names (a bundle, a model's directory
    of versions, or a run directory), loaded as ``twostage.load`` loads it."""
    from twostage.bundles import load_recommender
    from twostage.errors import ArtifactError

    if not Path(path).exists():
        raise ConfigError(
            f"`train.warm_start` = {path!r} does not exist. Name a bundle (or a "
            "model's directory of versions) that `twostage train --out` saved."
        )
    try:
        return load_recommender(path)
    except ArtifactError as e:
        raise ConfigError(f"`train.warm_start` = {path!r}: {e}") from e


def warm_source(
    path: str | None, given: Recommender | None
) -> tuple[Recommender, str] | None:
    """The model a run starts from and how to name it: ``given`` (a model
    handed over in Python, which wins: named by the path it was loaded from,
    else "the fitted model"), else the one ``path`` (``train.warm_start``)
    names; None: neither, a cold start."""
    if given is not None:
        return given, given.loaded_from or "the fitted model"
    if path:
        return load_warm_start(path), path
    return None


def _vocabulary_key(name: str, spec: FeatureSpec) -> str | None:
    """The spec key whose vocabulary numbers the rows of parameter ``name``."""
    if _ITEM_TABLES.search(name):
        return ITEM
    if _USER_TABLES.search(name):
        return USER
    found = _FIELD_TABLE.search(name)
    if found is None or not name.endswith(".weight"):
        return None
    key = found.group(1)
    try:
        vocabulary = getattr(spec.encoder(key), "vocabulary", None)
    except ConfigError:
        return None
    return key if isinstance(vocabulary, Vocabulary) else None


def _encoders(name: str, new: FeatureSpec, old: FeatureSpec) -> str | None:
    """Why a field's table starts afresh when the field is encoded otherwise
    than in the saved model (a bucket then, a category now); None: it is not."""
    found = _FIELD_TABLE.search(name)
    if found is None:
        return None
    kinds = []
    for spec in (old, new):
        try:
            kinds.append(type(spec.encoder(found.group(1))).__name__)
        except ConfigError:
            return None
    if kinds[0] == kinds[1]:
        return None
    return f"{kinds[0]} saved, {kinds[1]} now"


def _row_map(old: Vocabulary, new: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """``(old_rows, new_rows)`` of the values both vocabularies know (vocabulary
    indices, before any padding offset)."""
    values = old.values
    if not len(values):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    target = new.transform(values)  # DataError: IDs of another kind
    source = np.arange(old.num_oov_buckets, old.size, dtype=np.int64)
    known = target >= new.num_oov_buckets
    return source[known], target[known]


def copy_weights(
    new: nn.Module,
    new_spec: FeatureSpec,
    old: nn.Module,
    old_spec: FeatureSpec,
    *,
    report: WarmStart,
    prefix: str = "",
) -> None:
    """Copy ``old``'s parameters into ``new`` (see the module docstring), adding
    to ``report``; ``prefix`` names the model in messages (an ensemble member).

    Raises:
        ConfigError: a parameter that is no field's table is missing from the
            saved model or has another shape there.
    """
    saved = dict(old.named_parameters())
    with torch.no_grad():
        for name, param in new.named_parameters():
            shown = f"{prefix}{name}"
            field_table = _FIELD_TABLE.search(name) is not None
            before = saved.get(name)
            if before is None:
                if field_table:
                    report.fresh[shown] = "not in the saved model"
                    continue
                raise ConfigError(
                    f"`train.warm_start`: the saved model has no weight {shown!r}, "
                    "which this config's model has: another architecture. Train "
                    "with the saved model's settings, or without a warm start."
                )
            encoded = _encoders(name, new_spec, old_spec)
            if encoded is not None:
                report.fresh[shown] = encoded
                continue
            key = _vocabulary_key(name, new_spec)
            old_key = _vocabulary_key(name, old_spec)
            if key is not None and old_key == key:
                _copy_rows(param, before, new_spec, old_spec, key, shown, report)
                continue
            if param.shape != before.shape:
                if field_table:
                    report.fresh[shown] = (
                        f"{list(before.shape)} saved, {list(param.shape)} now"
                    )
                    continue
                raise ConfigError(
                    f"`train.warm_start`: weight {shown!r} is "
                    f"{list(before.shape)} in the saved model and "
                    f"{list(param.shape)} in this config's: another architecture "
                    "(a width, a layer count, the fields a tower concatenates). "
                    "Train with the saved model's settings, or without a warm start."
                )
            param.copy_(before.to(param.device, param.dtype))
            report.copied += 1


def _copy_rows(
    param: torch.Tensor,
    before: torch.Tensor,
    new_spec: FeatureSpec,
    old_spec: FeatureSpec,
    key: str,
    shown: str,
    report: WarmStart,
) -> None:
    """Copy a vocabulary-keyed table row by row, by ID value."""
    if param.shape[1:] != before.shape[1:]:
        raise ConfigError(
            f"`train.warm_start`: table {shown!r} is {list(before.shape)} in the "
            f"saved model and {list(param.shape)} in this config's: rows of "
            "another width. Train with the saved model's width, or without a "
            "warm start."
        )
    old_vocab, new_vocab = old_spec.vocabulary(key), new_spec.vocabulary(key)
    # Multi-hot and text tables keep row 0 for padding before the vocabulary.
    old_offset = before.shape[0] - old_vocab.size
    new_offset = param.shape[0] - new_vocab.size
    if old_offset != new_offset or old_offset < 0:
        report.fresh[shown] = "its rows are laid out otherwise"
        return
    try:
        source, target = _row_map(old_vocab, new_vocab)
    except DataError:  # text IDs saved, numbers now
        report.fresh[shown] = "its IDs were of another kind"
        return
    # Padding, then the unknown IDs' rows where both have as many of them.
    same_oov = old_vocab.num_oov_buckets == new_vocab.num_oov_buckets
    reserved = new_offset + (new_vocab.num_oov_buckets if same_oov else 0)
    param[:reserved] = before[:reserved].to(param.device, param.dtype)
    src = torch.from_numpy(source + old_offset).to(before.device)
    dst = torch.from_numpy(target + new_offset).to(param.device)
    # In blocks: one gather would hold a second copy of every row it moves
    # (10^7 users, half kept: +1.42 GiB against +0.92 in blocks, docs/guide.md).
    for start in range(0, len(src), _ROWS_A_BLOCK):
        block = slice(start, start + _ROWS_A_BLOCK)
        param[dst[block]] = before[src[block]].to(param.device, param.dtype)
    report.copied += 1
    report.rows[shown] = (len(target), len(new_vocab.values))
