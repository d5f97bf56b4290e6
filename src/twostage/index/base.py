"""The one index contract: ``build(embeddings, ids)``, ``search(queries, k)``, ``save``.

Every backend scores by inner product and returns ``(scores, ids)`` sorted best first,
as ``torch.topk`` does. Rows that cannot be filled (fewer than ``k`` vectors left after
exclusion) are padded with score ``-inf`` and id ``-1``. :class:`ExactIndex` is the
oracle that the approximate backends are tested against.

Approximate backends derive from :class:`ApproximateIndex`, which over-fetches
``k + |exclude[b]|`` neighbours, drops the excluded ids and, for any row that is still
short, doubles the fetch (and widens the backend's search) until the row is full; a
last exhaustive pass guarantees that no result is ever lost.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from twostage.artifacts import read_safetensors
from twostage.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    NotFittedError,
    clause,
)

__all__ = ["META_FILE", "ApproximateIndex", "Exclude", "Index", "check_int"]

META_FILE = "index.json"
Exclude = Sequence[torch.Tensor | np.ndarray | Sequence[int] | None] | None


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int, or a ConfigError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        value_ok = False
    else:
        value_ok = int(value) >= minimum
    if not value_ok:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(
            f"`{name}` should be {expected}. Received: `{name}` = {value!r}."
        )
    return int(value)


def _as_matrix(name: str, values: Any) -> torch.Tensor:
    """A detached float32 [rows, dim] tensor, or a DataError."""
    tensor = torch.as_tensor(values).detach()
    if tensor.ndim != 2 or not tensor.is_floating_point():
        raise DataError(
            f"`{name}` should be a 2-D float tensor [rows, dim]. Received a "
            f"{tensor.ndim}-D {tensor.dtype} tensor of shape {tuple(tensor.shape)}."
        )
    return tensor.to(torch.float32)


def _as_ids(values: Any) -> np.ndarray:
    """The distinct int64 ids in one ``exclude`` entry (None: none)."""
    if values is None:
        return np.empty(0, dtype=np.int64)
    ids = torch.as_tensor(values).detach().cpu().reshape(-1)
    if ids.is_floating_point() and len(ids):
        raise DataError(
            f"each `exclude` entry should hold integer ids. Received dtype {ids.dtype}."
        )
    return np.unique(ids.numpy().astype(np.int64))


def load_tensors(path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """The safetensors file at ``path`` with exactly ``keys``, or an ArtifactError."""
    try:
        tensors = read_safetensors(path)
    except (OSError, SafetensorError) as e:
        raise ArtifactError(
            f"cannot read index file {str(path)!r}: {clause(e)}."
        ) from e
    if set(tensors) != keys:
        raise ArtifactError(
            f"index file {str(path)!r} should hold tensors {sorted(keys)}. "
            f"Received {sorted(tensors)}."
        )
    return tensors


class Index(abc.ABC):
    """Maximum inner product search over ``N`` vectors with int64 ids.

    Attributes:
        kind: the name ``make_index`` and ``index.json`` use ("exact", "hnsw", ...).
        is_exact: whether ``search`` returns the true top-k.
    """

    kind: ClassVar[str]
    is_exact: ClassVar[bool]

    def __init__(self) -> None:
        self._ids: np.ndarray | None = None  # [N] int64, in build order
        self._sorted_ids = np.empty(0, dtype=np.int64)
        self._order = np.empty(0, dtype=np.int64)  # build positions of _sorted_ids
        self._dim = 0

    @property
    def size(self) -> int:
        """Number of indexed vectors (0 before ``build``)."""
        return 0 if self._ids is None else len(self._ids)

    @property
    def dim(self) -> int:
        """Width of the indexed vectors (0 before ``build``)."""
        return self._dim

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The constructor arguments, resolved (saved to ``index.json``)."""

    @property
    def ids(self) -> np.ndarray:
        """``[N]`` int64 the indexed ids, in build order (a copy)."""
        return np.empty(0, dtype=np.int64) if self._ids is None else self._ids.copy()

    def build(self, embeddings: torch.Tensor, ids: torch.Tensor) -> Self:
        """Index ``embeddings`` under ``ids``, replacing anything indexed before.

        Args:
            embeddings: [num_items, dim] float tensor.
            ids: [num_items] int64 tensor of distinct, non-negative labels.

        Returns:
            ``self``.
        """
        vectors, labels = self._checked(embeddings, ids)
        self._build(vectors, labels)
        self._set_ids(labels.numpy(), vectors.shape[1])
        return self

    def extended(self, embeddings: torch.Tensor, ids: torch.Tensor) -> Self | None:
        """A new index of this kind and settings holding this one's vectors and
        ``embeddings`` under ``ids`` (ids it does not hold), added to it rather than
        built anew: an HNSW graph of a million items takes minutes to build and a
        second to grow by a thousand. This index is left as it is. None where the
        backend cannot grow a copy (then build one).

        Raises:
            DataError: ``ids`` it holds already, or vectors of another width.
        """
        if self._ids is None:
            raise NotFittedError(
                f"this {type(self).__name__} is empty; build it first."
            )
        vectors, labels = self._checked(embeddings, ids)
        if vectors.shape[1] != self._dim:
            raise DataError(
                f"`embeddings` should have {self._dim} columns, the dim of the index. "
                f"Received shape {tuple(vectors.shape)}."
            )
        held = self._positions(np.unique(labels.numpy()))
        if len(held):
            raise DataError(
                f"`ids` holds ids the index holds already: {self._ids[held][:5].tolist()}."
            )
        grown = self._extended(vectors, labels)
        if grown is not None:
            grown._set_ids(np.concatenate([self._ids, labels.numpy()]), self._dim)
        return grown

    def _extended(self, embeddings: torch.Tensor, ids: torch.Tensor) -> Self | None:
        """A copy of the backend's data with [M, D] float32 ``embeddings`` added at
        build positions ``size..size+M-1`` (its ids are set by the caller); None
        when the backend cannot."""
        return None

    def _checked(
        self, embeddings: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors, labels)``: float32 CPU rows and their int64 ids, checked."""
        vectors = _as_matrix("embeddings", embeddings).cpu().contiguous()
        labels = torch.as_tensor(ids).detach().cpu()
        if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise DataError(
                f"`ids` should be a 1-D int64 tensor. Received dtype {labels.dtype}, "
                f"shape {tuple(labels.shape)}."
            )
        labels = labels.to(torch.int64)
        if len(labels) != len(vectors) or len(labels) == 0:
            raise DataError(
                f"`embeddings` and `ids` should have the same, non-zero number of "
                f"rows. Received {len(vectors)} embeddings and {len(labels)} ids."
            )
        if bool((labels < 0).any()) or len(labels.unique()) != len(labels):
            raise DataError("`ids` should be distinct and non-negative (-1 pads).")
        return vectors, labels

    def _set_ids(self, ids: np.ndarray, dim: int) -> None:
        self._ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted_ids = self._ids[self._order]
        self._dim = dim

    def _positions(self, excluded: np.ndarray) -> np.ndarray:
        """Build positions of the distinct ``excluded`` ids that are indexed."""
        at = np.searchsorted(self._sorted_ids, excluded).clip(max=self.size - 1)
        return self._order[at[self._sorted_ids[at] == excluded]]

    def search(
        self, queries: torch.Tensor, k: int, *, exclude: Exclude = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` indexed ids with the largest inner product, per query.

        Args:
            queries: [batch, dim] float tensor.
            k: list length.
            exclude: per query, ids that must not be returned (e.g. seen items), or
                None; a sequence of ``batch`` tensors / arrays / None.

        Returns:
            ``(scores, ids)``: [batch, k] float32 and [batch, k] int64 CPU tensors, best
            first. Each row holds ``min(k, vectors not excluded)`` results, then
            ``-inf`` / ``-1`` padding.
        """
        if self._ids is None:
            raise NotFittedError(
                f"this {type(self).__name__} is empty; call `build(embeddings, ids)` "
                "or `load_index(directory)` before `search`."
            )
        k = check_int("k", k)
        matrix = _as_matrix("queries", queries)
        if matrix.shape[1] != self._dim:
            raise DataError(
                f"`queries` should have {self._dim} columns, the dim of the index. "
                f"Received shape {tuple(matrix.shape)}."
            )
        if exclude is not None and len(exclude) != len(matrix):
            raise DataError(
                f"`exclude` should hold one entry per query ({len(matrix)}). "
                f"Received {len(exclude)}."
            )
        if not len(matrix):  # no query: no rows (the exact index's concat failed)
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        excluded = [
            self._positions(_as_ids(None if exclude is None else exclude[row]))
            for row in range(len(matrix))
        ]
        return self._search(matrix, k, excluded)

    @abc.abstractmethod
    def _build(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        """Index [N, D] float32 CPU ``embeddings`` with [N] int64 ``ids``."""

    @abc.abstractmethod
    def _search(
        self, queries: torch.Tensor, k: int, excluded: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated [B, D] float32 queries; ``excluded[b]``: build positions."""

    def save(self, directory: str | Path) -> Path:
        """Write ``index.json`` and the data files into ``directory``."""
        if self._ids is None:
            raise NotFittedError(
                f"this {type(self).__name__} is empty; build it first."
            )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._save_data(out)
        meta: dict[str, Any] = {"kind": self.kind, "params": self.params()}
        meta |= {"size": self.size, "dim": self.dim} | self._extra_meta()
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @abc.abstractmethod
    def _save_data(self, directory: Path) -> None:
        """Write the backend's data files."""

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> Self:
        """Rebuild from ``index.json`` contents and the data files."""
        try:
            index = cls(**meta["params"])
        except (TypeError, ConfigError) as e:
            raise ArtifactError(
                f"bad params in {str(directory / META_FILE)!r}: {e}"
            ) from e
        index._load_data(directory, meta)
        if index.size != meta["size"] or index.dim != meta["dim"]:
            raise ArtifactError(
                f"the data files in {str(directory)!r} hold {index.size} x {index.dim} "
                f"vectors, but {META_FILE} says {meta['size']} x {meta['dim']}."
            )
        return index

    def _extra_meta(self) -> dict[str, Any]:
        """What a backend records in ``index.json`` beside its params: the state
        of its data that is not a setting (read back by :meth:`_load_data`)."""
        return {}

    @abc.abstractmethod
    def _load_data(self, directory: Path, meta: dict[str, Any]) -> None:
        """Read the backend's data files (ArtifactError naming a bad file)."""

    def _save_ids(self, directory: Path) -> None:
        assert self._ids is not None  # callers check; not user input
        save_file({"ids": torch.from_numpy(self._ids)}, directory / "ids.safetensors")

    def _load_ids(self, directory: Path) -> np.ndarray:
        return load_tensors(directory / "ids.safetensors", {"ids"})["ids"].numpy()


class ApproximateIndex(Index):
    """Over-fetch, filter and widen on top of a backend's raw top-``fetch`` search."""

    is_exact = False

    @abc.abstractmethod
    def _raw_search(
        self, queries: np.ndarray, fetch: int, attempt: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """[R, fetch] scores and build positions (-1: none) for [R, D] queries.

        ``attempt`` counts the widenings so far; backends search more widely with it.
        """

    @abc.abstractmethod
    def _exhaustive_search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[R, size] scores and build positions of every vector, best first."""

    def _search(
        self, queries: torch.Tensor, k: int, excluded: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = np.ascontiguousarray(queries.cpu().numpy())
        num_excluded = np.array([len(e) for e in excluded], dtype=np.int64)
        targets = np.minimum(k, self.size - num_excluded)
        fetch = np.minimum(k + num_excluded, self.size)
        scores = np.full((len(matrix), k), -np.inf, dtype=np.float32)
        positions = np.full((len(matrix), k), -1, dtype=np.int64)
        pending, attempt, exhaustive = np.arange(len(matrix)), 0, False
        while pending.size:
            used = int(fetch[pending].max())
            if exhaustive:
                found = self._exhaustive_search(matrix[pending])
            else:
                found = self._raw_search(matrix[pending], used, attempt)
            short = [
                row
                for j, row in enumerate(pending)
                if not self._fill(
                    found, j, excluded[row], targets[row], scores[row], positions[row]
                )
            ]
            if short and exhaustive:
                raise RuntimeError(f"{self.kind}: exhaustive search lost results")
            exhaustive = bool(short) and used >= self.size
            fetch[short] = np.minimum(fetch[short] * 2, self.size)
            pending, attempt = np.array(short, dtype=np.int64), attempt + 1
        assert self._ids is not None
        ids = np.where(positions >= 0, self._ids[positions], -1)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    @staticmethod
    def _fill(
        found: tuple[np.ndarray, np.ndarray],
        j: int,
        excluded: np.ndarray,
        target: int,
        scores: np.ndarray,
        positions: np.ndarray,
    ) -> bool:
        """Copy row ``j`` of ``found`` minus ``excluded``; False if it is short."""
        row = found[1][j]
        keep = row >= 0
        if excluded.size:
            keep &= ~np.isin(row, excluded)
        chosen = np.flatnonzero(keep)[: len(scores)]
        if len(chosen) < target:
            return False
        scores[: len(chosen)] = found[0][j, chosen]
        positions[: len(chosen)] = row[chosen]
        return True
