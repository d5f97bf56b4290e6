"""Stable hashes of IDs and strings, identical across processes, platforms and versions.

Python's ``hash`` is randomised per process and ``polars.Series.hash`` is not promised
stable across polars versions, so neither can place values in saved hash buckets. This
module uses FNV-1a 64 over the UTF-8 bytes of each value's text form, then the murmur3
``fmix64`` finaliser so that ``hash % n`` is well spread even for small ``n``. Integers
hash as their decimal text, so ``42`` and ``"42"`` share a bucket whichever dtype a file
was read with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from twostage.features.base import as_series

__all__ = ["stable_hash"]

_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_FMIX_1 = 0xFF51AFD7ED558CCD
_FMIX_2 = 0xC4CEB9FE1A85EC53


def _fmix64_scalar(h: int) -> int:
    h &= _MASK64
    h ^= h >> 33
    h = (h * _FMIX_1) & _MASK64
    h ^= h >> 33
    h = (h * _FMIX_2) & _MASK64
    return h ^ (h >> 33)


def _fmix64(h: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what the finaliser needs.
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(_FMIX_1)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(_FMIX_2)
    return h ^ (h >> np.uint64(33))


def _fnv1a64(strings: pl.Series, basis: int = _FNV_OFFSET) -> np.ndarray:
    """FNV-1a 64 of each string's UTF-8 bytes (nulls hash like ``""``); [N] uint64.

    Loops over byte positions, not rows: rows are sorted by length so the rows still
    active at position ``p`` are a prefix, and the total work is the number of bytes.
    """
    strings = strings.cast(pl.String).fill_null("")
    n = len(strings)
    hashes = np.full(n, basis, dtype=np.uint64)
    if n == 0:
        return hashes
    lengths = strings.str.len_bytes().to_numpy().astype(np.int64)
    blob = np.frombuffer(strings.str.join("").item().encode("utf-8"), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    order = np.argsort(-lengths, kind="stable")
    sorted_len, sorted_start = lengths[order], starts[order]
    # active[p] = number of rows longer than p (sorted_len is descending).
    active = np.searchsorted(-sorted_len, -np.arange(sorted_len[0]), side="left")
    h = hashes[order]
    prime = np.uint64(_FNV_PRIME)
    for p, count in enumerate(active):
        h[:count] ^= blob[sorted_start[:count] + p]
        h[:count] *= prime
    hashes[order] = h
    return hashes


def stable_hash(values: pl.Series | Sequence[Any], *, seed: int = 0) -> np.ndarray:
    """A hash of each value that is identical across processes, platforms and versions.

    Args:
        values: [N] ints or strings (ints hash as their decimal text; nulls as ``""``).
        seed: any int; different seeds give independent hash functions.

    Returns:
        [N] uint64 hashes.
    """
    series = as_series(values, "values")
    if series.dtype in (pl.Categorical, pl.Enum):
        series = series.cast(pl.String)
    basis = _FNV_OFFSET ^ _fmix64_scalar(seed)
    return _fmix64(_fnv1a64(series, basis))
