"""Nearest-neighbour indexes behind one contract (see :class:`Index`).

``exact`` is the oracle (chunked matrix product, any torch device); ``hnsw`` and ``ivf``
are faiss; ``scann`` needs the optional ScaNN package. All score by inner product and
return ``(scores, ids)`` like ``torch.topk``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from twostage.config import IndexConfig
from twostage.errors import ArtifactError, ConfigError, clause
from twostage.index.base import META_FILE, ApproximateIndex, Index
from twostage.index.exact import ExactIndex
from twostage.index.faiss import HNSWIndex, IVFIndex, IVFSQIndex
from twostage.index.scann import ScannIndex

__all__ = [
    "KINDS",
    "SETTINGS_READ",
    "ApproximateIndex",
    "ExactIndex",
    "HNSWIndex",
    "IVFIndex",
    "IVFSQIndex",
    "Index",
    "ScannIndex",
    "load_index",
    "make_index",
    "unread_settings",
]

logger = logging.getLogger(__name__)

_CLASSES: dict[str, type[Index]] = {
    "exact": ExactIndex,
    "hnsw": HNSWIndex,
    "ivf": IVFIndex,
    "ivf_sq": IVFSQIndex,
    "scann": ScannIndex,
}
KINDS = tuple(_CLASSES)

#: The ``index`` settings each kind reads (docs/guide.md, "Nearest-neighbour index").
SETTINGS_READ = {
    "exact": ("chunk_size", "device"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivf": ("ivf_nlist", "nprobe"),
    "ivf_sq": ("ivf_nlist", "nprobe"),
    "scann": ("ivf_nlist", "nprobe"),
}


def unread_settings(config: IndexConfig) -> list[str]:
    """The settings of ``config`` set away from their defaults that its kind does
    not read (``ef_search`` for an ``ivf`` index), in the section's order."""
    default = IndexConfig()
    return [
        field.name
        for field in dataclasses.fields(config)
        if field.name != "kind"
        and field.name not in SETTINGS_READ.get(config.kind, ())
        and getattr(config, field.name) != getattr(default, field.name)
    ]


def make_index(config: IndexConfig) -> Index:
    """An empty index of ``config.kind``; zeros in ``config`` pick the defaults.

    ScaNN reads ``ivf_nlist`` as its number of leaves and ``nprobe`` as the leaves
    searched per query. Settings the kind does not read (:func:`unread_settings`)
    are logged as a warning: they were taken without a word.
    """
    unread = unread_settings(config)
    if unread and config.kind in SETTINGS_READ:
        logger.warning(
            "%s: not read by the %s index (it reads %s)",
            ", ".join(f"index.{name}={getattr(config, name)!r}" for name in unread),
            config.kind,
            ", ".join(SETTINGS_READ[config.kind]),
        )
    if config.kind == "exact":
        return ExactIndex(chunk_size=config.chunk_size, device=config.device)
    if config.device != "cpu":
        raise ConfigError(
            f"`device` = {config.device!r} places the exact index; the {config.kind} "
            "index searches on the CPU. Use kind 'exact' for a GPU, or drop the device."
        )
    if config.kind == "hnsw":
        return HNSWIndex(
            m=config.hnsw_m,
            ef_construction=config.ef_construction,
            ef_search=config.ef_search,
        )
    if config.kind == "ivf":
        return IVFIndex(nlist=config.ivf_nlist, nprobe=config.nprobe)
    if config.kind == "ivf_sq":
        return IVFSQIndex(nlist=config.ivf_nlist, nprobe=config.nprobe)
    if config.kind == "scann":
        return ScannIndex(num_leaves=config.ivf_nlist, leaves_to_search=config.nprobe)
    raise ConfigError(
        f"`kind` should be one of {list(KINDS)}. Received: `kind` = {config.kind!r}."
    )


def load_index(directory: str | Path) -> Index:
    """The index saved by ``Index.save(directory)``, of whichever kind it was."""
    path = Path(directory) / META_FILE
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        kind = meta["kind"]
        if kind not in _CLASSES:
            raise ValueError(f"unknown kind {kind!r}; expected one of {list(KINDS)}")
        if not isinstance(meta["params"], dict) or not all(
            isinstance(meta[key], int) for key in ("size", "dim")
        ):
            raise ValueError("`params` should be a mapping, `size` and `dim` integers")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(
            f"cannot read index metadata {str(path)!r}: {clause(e)}. Is "
            f"{str(directory)!r} a directory written by `Index.save`?"
        ) from e
    return _CLASSES[kind]._load(Path(directory), meta)
