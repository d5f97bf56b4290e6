"""Ranking metrics on internal indices, vectorised over queries.

Everything here works on ``item_idx`` integers (``0..num_items-1``) and on
:class:`UserItems`, a small CSR structure with one row of items per query. A ranking is
a ``topk_ids`` tensor ``[num_queries, width]`` of item indices, best first, where ``-1``
marks an empty slot (fewer candidates than ``width``); an empty slot is never a hit.

Definitions (binary relevance; ``rel`` is the query's relevant set, ``hits@k`` the
number of its items among the first ``k`` ranked ones):

* ``recall@k = hits@k / |rel|`` (the standard definition, *not* divided by
  ``min(|rel|, k)``, so a query with more than ``k`` relevant items cannot reach 1).
* ``ndcg@k = DCG@k / IDCG@k`` with gain 1 and discount ``1 / log2(rank + 1)``; the ideal
  list puts ``min(|rel|, k)`` relevant items first.
* ``hit_rate@k = 1`` if ``hits@k > 0``.
* ``mrr@k = 1 / rank`` of the first hit within the first ``k``, ``0`` if none.
* ``factorized_top_k@k``: per relevant (query, item) pair, is the item in the query's
  top ``k`` (TFRS ``FactorizedTopK``); queries with more relevant items weigh more.
  It equals the micro-averaged recall.
* ``coverage@k``: fraction of the valid items that appear in at least one top-``k`` list.

Recall, NDCG, hit rate and MRR are averaged per query over the queries with at least
one relevant item; queries without any are counted, not averaged. A relevant item that
is not a valid item (e.g. the OOV row) can never be ranked, so it counts as a miss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from twostage.errors import ConfigError, DataError

__all__ = [
    "RANKING_METRICS",
    "METRIC_NAMES",
    "UserItems",
    "check_ks",
    "per_query_metrics",
    "MetricAccumulator",
    "compute_metrics",
]

RANKING_METRICS = ("recall", "ndcg", "hit_rate", "mrr")
METRIC_NAMES = (*RANKING_METRICS, "factorized_top_k", "coverage")


def _as_index_array(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not (
        array.size == 0 or np.issubdtype(array.dtype, np.integer)
    ):
        raise DataError(
            f"`{name}` should be a 1-D array of integers. "
            f"Received: dtype={array.dtype}, shape={array.shape}."
        )
    return array.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class UserItems:
    """A set of items per row (one row per query or user), stored as CSR.

    Rows are canonical: the items of a row are sorted and unique, so a row is a set.
    Build one with :meth:`from_pairs` rather than by hand.

    Attributes:
        indptr: ``[num_rows + 1]`` int64; row ``r`` holds ``indices[indptr[r]:indptr[r+1]]``.
        indices: ``[num_pairs]`` int64 ``item_idx`` values.
    """

    indptr: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        indptr = _as_index_array("indptr", self.indptr)
        indices = _as_index_array("indices", self.indices)
        if indptr.size == 0 or indptr[0] != 0 or indptr[-1] != indices.size:
            raise DataError(
                "`indptr` should start at 0 and end at len(indices) = "
                f"{indices.size}. Received: {indptr[:1]}...{indptr[-1:]}."
            )
        lengths = np.diff(indptr)
        if (lengths < 0).any() or (indices.size and indices.min() < 0):
            raise DataError("`indptr` should be non-decreasing and `indices` >= 0.")
        row_start = np.zeros(indices.size, dtype=bool)
        row_start[indptr[:-1][lengths > 0]] = True
        if not ((np.diff(indices) > 0) | row_start[1:]).all():
            raise DataError(
                "each row of `indices` should be sorted and unique. "
                "Use UserItems.from_pairs(rows, items) to build a canonical one."
            )
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)

    @classmethod
    def from_pairs(
        cls, rows: object, items: object, *, num_rows: int | None = None
    ) -> UserItems:
        """Builds the sets from ``(row, item)`` pairs; repeated pairs are kept once.

        Args:
            rows: ``[n]`` int row (query/user) index of each pair, in ``0..num_rows-1``.
            items: ``[n]`` int ``item_idx`` of each pair, ``>= 0``.
            num_rows: number of rows; default ``max(rows) + 1`` (0 when empty).
        """
        return cls.from_pairs_counted(rows, items, num_rows=num_rows)[0]

    @classmethod
    def from_pairs_counted(
        cls, rows: object, items: object, *, num_rows: int | None = None
    ) -> tuple[UserItems, np.ndarray]:
        """Like :meth:`from_pairs`, also returning how often each pair occurred.

        Returns:
            The sets and ``[num_pairs]`` int64 counts aligned with ``indices`` (usable as
            ``weights`` by the baselines).
        """
        row_arr = _as_index_array("rows", rows)
        item_arr = _as_index_array("items", items)
        if row_arr.shape != item_arr.shape:
            raise DataError(
                "`rows` and `items` should have the same length. "
                f"Received: {row_arr.size} and {item_arr.size}."
            )
        if num_rows is None:
            num_rows = int(row_arr.max()) + 1 if row_arr.size else 0
        if row_arr.size and (row_arr.min() < 0 or row_arr.max() >= num_rows):
            raise DataError(
                f"`rows` should lie in 0..num_rows-1 = {num_rows - 1}. "
                f"Received: min={row_arr.min()}, max={row_arr.max()}."
            )
        if item_arr.size and item_arr.min() < 0:
            raise DataError(f"`items` should be >= 0. Received: min={item_arr.min()}.")
        order = np.lexsort((item_arr, row_arr))
        row_arr, item_arr = row_arr[order], item_arr[order]
        new = np.ones(row_arr.size, dtype=bool)
        new[1:] = (np.diff(row_arr) != 0) | (np.diff(item_arr) != 0)
        starts = np.flatnonzero(new)
        counts = np.diff(np.append(starts, row_arr.size)).astype(np.int64)
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_arr[starts], minlength=num_rows), out=indptr[1:])
        return cls(indptr=indptr, indices=item_arr[starts]), counts

    @property
    def num_rows(self) -> int:
        return int(self.indptr.size - 1)

    @property
    def num_pairs(self) -> int:
        return int(self.indices.size)

    def lengths(self) -> np.ndarray:
        """``[num_rows]`` int64 number of items per row."""
        return np.diff(self.indptr)

    def row(self, row: int) -> np.ndarray:
        """The sorted items of one row."""
        return self.indices[self.indptr[row] : self.indptr[row + 1]]

    def row_ids(self) -> np.ndarray:
        """``[num_pairs]`` int64 row of each stored pair."""
        return np.repeat(np.arange(self.num_rows, dtype=np.int64), self.lengths())

    def positions(self, rows: object) -> tuple[np.ndarray, np.ndarray]:
        """Where the pairs of some rows are stored, vectorised.

        Args:
            rows: ``[B]`` int row indices; rows ``>= num_rows`` are treated as empty.

        Returns:
            ``(local_row, pos)``, both ``[n]`` int64: for each stored pair of the selected
            rows, its position ``0..B-1`` in ``rows`` and its position in ``indices``.
        """
        row_arr = _as_index_array("rows", rows)
        if row_arr.size and row_arr.min() < 0:
            raise DataError(f"`rows` should be >= 0. Received: min={row_arr.min()}.")
        known = row_arr < self.num_rows
        safe = np.where(known, row_arr, 0)
        starts = self.indptr[safe]
        lengths = np.where(known, self.indptr[safe + 1] - starts, 0)
        local_row = np.repeat(np.arange(row_arr.size, dtype=np.int64), lengths)
        offsets = np.arange(local_row.size, dtype=np.int64)
        offsets -= np.repeat(np.cumsum(lengths) - lengths, lengths)
        return local_row, starts[local_row] + offsets

    def take(self, rows: object) -> UserItems:
        """The selected rows, in the given order (rows ``>= num_rows`` come back empty)."""
        local_row, pos = self.positions(rows)
        indptr = np.zeros(np.asarray(rows).size + 1, dtype=np.int64)
        np.cumsum(np.bincount(local_row, minlength=indptr.size - 1), out=indptr[1:])
        return UserItems(indptr=indptr, indices=self.indices[pos])

    def slice(self, start: int, stop: int) -> UserItems:
        """Rows ``start..stop-1`` without copying the index structure more than needed."""
        indptr = self.indptr[start : stop + 1]
        return UserItems(
            indptr=indptr - indptr[0], indices=self.indices[indptr[0] : indptr[-1]]
        )

    def _keep(self, keep: np.ndarray) -> UserItems:
        indptr = np.zeros_like(self.indptr)
        np.cumsum(
            np.bincount(self.row_ids()[keep], minlength=self.num_rows), out=indptr[1:]
        )
        return UserItems(indptr=indptr, indices=self.indices[keep])

    def difference(self, other: UserItems) -> UserItems:
        """Row-wise set difference ``self - other`` (both with the same ``num_rows``)."""
        if other.num_rows != self.num_rows:
            raise DataError(
                "both UserItems should have the same number of rows. "
                f"Received: {self.num_rows} and {other.num_rows}."
            )
        width = (
            int(max(self.indices.max(initial=-1), other.indices.max(initial=-1))) + 1
        )
        mine = self.row_ids() * width + self.indices
        theirs = other.row_ids() * width + other.indices
        return self._keep(~np.isin(mine, theirs, assume_unique=True))

    def filter_items(self, item_mask: np.ndarray) -> UserItems:
        """Keeps the items where ``item_mask`` (``[num_items]`` bool) is true."""
        if item_mask.dtype != np.bool_ or item_mask.ndim != 1:
            raise DataError(
                "`item_mask` should be a 1-D bool array. "
                f"Received: dtype={item_mask.dtype}, shape={item_mask.shape}."
            )
        if self.indices.size and self.indices.max() >= item_mask.size:
            raise DataError(
                f"an item index {self.indices.max()} is outside the item mask of "
                f"length {item_mask.size}."
            )
        return self._keep(item_mask[self.indices])


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Validates list lengths and returns them sorted."""
    values = tuple(ks)
    if (
        not values
        or any(
            isinstance(k, bool) or not isinstance(k, int | np.integer) for k in values
        )
        or min(values) < 1
        or len(set(values)) != len(values)
    ):
        raise ConfigError(
            "`ks` should be a non-empty sequence of distinct positive integers. "
            f"Received: `ks` = {ks!r}."
        )
    return tuple(sorted(int(k) for k in values))


def _check_topk(topk_ids: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    if topk_ids.ndim != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise DataError(
            "`topk_ids` should be a [num_queries, width] integer tensor. "
            f"Received: dtype={topk_ids.dtype}, shape={tuple(topk_ids.shape)}."
        )
    if topk_ids.shape[0] != num_rows or topk_ids.shape[1] < width:
        raise DataError(
            f"`topk_ids` should have {num_rows} rows (one per relevant row) and at "
            f"least max(ks) = {width} columns. Received: shape={tuple(topk_ids.shape)}."
        )
    ids = topk_ids[:, :width].to(device="cpu", dtype=torch.int64)
    if ids.numel() and ids.min() < -1:
        raise DataError(
            "`topk_ids` should hold item indices >= 0 or -1 for empty slots."
        )
    ordered = ids.sort(dim=1).values
    if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
        raise DataError("`topk_ids` should not repeat an item within a row.")
    return ids


def _hits(ids: torch.Tensor, relevant: UserItems) -> torch.Tensor:
    num_rows, width = ids.shape
    top = int(ids.max()) if ids.numel() else -1
    span = max(int(relevant.indices.max(initial=-1)), top) + 1
    # Keys row * span + item are globally sorted, because each row is sorted.
    rel_keys = torch.from_numpy(relevant.row_ids() * span + relevant.indices)
    if rel_keys.numel() == 0:
        return torch.zeros(num_rows, width, dtype=torch.bool)
    keys = torch.arange(num_rows, dtype=torch.int64).unsqueeze(1) * span + ids
    pos = torch.searchsorted(rel_keys, keys).clamp_(max=rel_keys.numel() - 1)
    return (rel_keys[pos] == keys) & (ids >= 0)


def _per_query(
    hits: torch.Tensor, num_relevant: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Per-query metrics, each ``[Q, len(ks)]`` float64 (0 where nothing is relevant)."""
    width = hits.shape[1]
    gains = hits.to(torch.float64)
    discounts = 1.0 / torch.log2(torch.arange(2, width + 2, dtype=torch.float64))
    cols = torch.tensor(ks, dtype=torch.int64) - 1
    hits_k = gains.cumsum(1)[:, cols]  # (Q, len(ks))
    dcg_k = (gains * discounts).cumsum(1)[:, cols]
    ideal_len = torch.minimum(num_relevant.unsqueeze(1), cols + 1)  # (Q, len(ks))
    idcg_k = discounts.cumsum(0)[(ideal_len - 1).clamp(min=0)]
    has = (num_relevant > 0).unsqueeze(1)
    # argmax returns the first maximum, i.e. the first hit when there is one.
    first = torch.where(hits.any(1), hits.to(torch.uint8).argmax(1), width)
    reciprocal = (1.0 / (first + 1).to(torch.float64)).unsqueeze(1)
    return {
        "recall": hits_k / num_relevant.clamp(min=1).unsqueeze(1),
        "ndcg": torch.where(has, dcg_k / idcg_k, 0.0),
        "hit_rate": (hits_k > 0).to(torch.float64),
        "mrr": torch.where(first.unsqueeze(1) <= cols, reciprocal, 0.0),
        "hits": hits_k,
    }


def per_query_metrics(
    topk_ids: torch.Tensor, relevant: UserItems, *, ks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Recall, NDCG, hit rate and MRR of every query at every ``k``.

    Args:
        topk_ids: ``[Q, K]`` int item indices, best first, ``-1`` for empty slots;
            ``K >= max(ks)``.
        relevant: the relevant items, ``Q`` rows.
        ks: list lengths.

    Returns:
        ``{"recall", "ndcg", "hit_rate", "mrr"}``: ``[Q, len(ks)]`` float64 tensors, NaN
        for queries without relevant items; ``"num_relevant"``: ``[Q]`` int64.
    """
    ks = check_ks(ks)
    ids = _check_topk(topk_ids, relevant.num_rows, ks[-1])
    num_relevant = torch.from_numpy(relevant.lengths())
    per = _per_query(_hits(ids, relevant), num_relevant, ks)
    empty = (num_relevant == 0).unsqueeze(1)
    out = {name: per[name].masked_fill(empty, math.nan) for name in RANKING_METRICS}
    out["num_relevant"] = num_relevant
    return out


class MetricAccumulator:
    """Sums the metrics of a stream of ranked query batches, for chunked evaluation.

    Args:
        ks: list lengths to report.
        num_items: size of the catalogue (item indices ``0..num_items-1``).
        valid_items: ``[num_items]`` bool, the items a ranking may contain; the
            denominator of coverage. Default: all.
        item_mask: ``[num_items]`` bool, restricts the relevant sets and the coverage
            universe to these items (an item slice, e.g. cold items). Default: all.
    """

    def __init__(
        self,
        *,
        ks: Sequence[int],
        num_items: int,
        valid_items: np.ndarray | None = None,
        item_mask: np.ndarray | None = None,
    ) -> None:
        self.ks = check_ks(ks)
        self.num_items = num_items
        universe = np.ones(num_items, dtype=bool)
        for name, mask in (("valid_items", valid_items), ("item_mask", item_mask)):
            if mask is not None:
                mask = np.asarray(mask)
                if mask.dtype != np.bool_ or mask.shape != (num_items,):
                    raise DataError(
                        f"`{name}` should be a bool array of shape [{num_items}]. "
                        f"Received: dtype={mask.dtype}, shape={mask.shape}."
                    )
                universe &= mask
        self._item_mask = None if item_mask is None else np.asarray(item_mask)
        self._universe = torch.from_numpy(universe)
        self._sums = torch.zeros(
            len(RANKING_METRICS), len(self.ks), dtype=torch.float64
        )
        self._hits = torch.zeros(len(self.ks), dtype=torch.float64)
        # Best (0-based) rank at which each item appeared in any list; max(ks) = never.
        self._best_rank = torch.full((num_items,), self.ks[-1], dtype=torch.int64)
        self._num_queries = 0
        self._num_with_relevant = 0
        self._num_interactions = 0

    def update(self, topk_ids: torch.Tensor, relevant: UserItems) -> None:
        """Adds one batch.

        Args:
            topk_ids: ``[B, K]`` int item indices, best first, ``-1`` for empty slots;
                ``K >= max(ks)``.
            relevant: the relevant items of the same ``B`` queries.
        """
        ids = _check_topk(topk_ids, relevant.num_rows, self.ks[-1])
        top = max(
            int(ids.max()) if ids.numel() else -1, relevant.indices.max(initial=-1)
        )
        if top >= self.num_items:
            raise DataError(
                f"item indices should be < num_items = {self.num_items}. "
                f"Received: an item index {top}."
            )
        if self._item_mask is not None:
            relevant = relevant.filter_items(self._item_mask)
        num_relevant = torch.from_numpy(relevant.lengths())
        per = _per_query(_hits(ids, relevant), num_relevant, self.ks)
        has = num_relevant > 0
        for i, name in enumerate(RANKING_METRICS):
            self._sums[i] += per[name][has].sum(0)
        self._hits += per["hits"].sum(0)
        self._num_queries += int(ids.shape[0])
        self._num_with_relevant += int(has.sum())
        self._num_interactions += relevant.num_pairs
        present = ids >= 0
        ranks = torch.arange(ids.shape[1]).expand_as(ids)
        self._best_rank.scatter_reduce_(0, ids[present], ranks[present], reduce="amin")

    def counts(self) -> dict[str, int]:
        """Queries seen, with and without relevant items, and relevant pairs."""
        return {
            "num_queries": self._num_queries,
            "num_queries_with_relevant": self._num_with_relevant,
            "num_queries_without_relevant": self._num_queries - self._num_with_relevant,
            "num_test_interactions": self._num_interactions,
        }

    def compute(self) -> dict[str, dict[int, float]]:
        """``metric -> k -> value``; NaN where the denominator is zero."""

        def ratio(num: float, den: int) -> float:
            return num / den if den else math.nan

        out: dict[str, dict[int, float]] = {}
        for i, name in enumerate(RANKING_METRICS):
            out[name] = {
                k: ratio(float(self._sums[i, j]), self._num_with_relevant)
                for j, k in enumerate(self.ks)
            }
        out["factorized_top_k"] = {
            k: ratio(float(self._hits[j]), self._num_interactions)
            for j, k in enumerate(self.ks)
        }
        num_universe = int(self._universe.sum())
        out["coverage"] = {
            k: ratio(int(((self._best_rank < k) & self._universe).sum()), num_universe)
            for k in self.ks
        }
        return out


def compute_metrics(
    topk_ids: torch.Tensor,
    relevant: UserItems,
    *,
    ks: Sequence[int],
    num_items: int,
    valid_items: np.ndarray | None = None,
) -> dict[str, dict[int, float]]:
    """All metrics of :data:`METRIC_NAMES` for one ranking, ``metric -> k -> value``.

    Args:
        topk_ids: ``[Q, K]`` int item indices, best first, ``-1`` for empty slots.
        relevant: the relevant items, ``Q`` rows.
        ks: list lengths, each ``<= K``.
        num_items: size of the catalogue.
        valid_items: ``[num_items]`` bool, the coverage universe. Default: all items.
    """
    acc = MetricAccumulator(ks=ks, num_items=num_items, valid_items=valid_items)
    acc.update(topk_ids, relevant)
    return acc.compute()
