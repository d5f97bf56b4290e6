"""Ranking metrics on internal indices, vectorised over queries.

Everything here works on ``item_idx`` integers (``0..num_items-1``) and on
:class:`~twostage.data.user_items.UserItems`, the CSR structure of items per row. A ranking is
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
The standard errors of those means (:meth:`MetricAccumulator.standard_errors`) are the
sample standard deviation over the same queries divided by the square root of their
number. Two rankings of the same queries are compared more sharply by the standard
error of their per-query differences (:func:`paired_standard_error`, on the
:class:`QueryFigures` an accumulator keeps with ``keep_queries=True``): most of
a figure's spread comes from the queries themselves, which the difference cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError

__all__ = [
    "RANKING_METRICS",
    "METRIC_NAMES",
    "check_ks",
    "per_query_metrics",
    "MetricAccumulator",
    "QueryFigures",
    "compute_metrics",
    "paired_standard_error",
]

RANKING_METRICS = ("recall", "ndcg", "hit_rate", "mrr")
METRIC_NAMES = (*RANKING_METRICS, "factorized_top_k", "coverage")


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


@dataclass(frozen=True)
class QueryFigures:
    """Each query's recall, NDCG, hit rate and MRR at each list length, as a
    :class:`MetricAccumulator` made with ``keep_queries=True`` kept them: the
    queries with a relevant item only.

    Attributes:
        ks: the list lengths, ascending.
        rows: ``[n]`` int64, each query's row (its position among the evaluated
            queries), ascending.
        values: ``[n, len(RANKING_METRICS), len(ks)]`` float32.
    """

    ks: tuple[int, ...]
    rows: np.ndarray
    values: np.ndarray

    def of(self, metric: str, k: int) -> np.ndarray:
        """``[n]`` one figure of every query (``metric`` in
        :data:`RANKING_METRICS`, ``k`` in :attr:`ks`)."""
        if metric not in RANKING_METRICS or k not in self.ks:
            raise ConfigError(
                f"`metric` should be one of {RANKING_METRICS} and `k` one of "
                f"{self.ks}. Received: {metric!r} at {k!r}."
            )
        return self.values[:, RANKING_METRICS.index(metric), self.ks.index(k)]

    def to_frame(self) -> pl.DataFrame:
        """A row per query: ``query`` (its row) and a ``METRIC@K`` column for
        each figure (``ndcg@10``), float32."""
        columns: dict[str, Any] = {"query": self.rows}
        for name in RANKING_METRICS:
            for k in self.ks:
                columns[f"{name}@{k}"] = self.of(name, k).astype(np.float32)
        return pl.DataFrame(columns)


def paired_standard_error(
    a: QueryFigures, b: QueryFigures, metric: str = "ndcg", k: int = 10
) -> float:
    """The standard error of the mean per-query difference ``a - b`` of one
    figure, over the queries both measured (matched by row): the sample
    standard deviation of the differences over the square root of their number.
    Two rankings of the same queries differ beyond noise when their figures
    differ by more than about twice this. NaN below two shared queries."""
    _, left, right = np.intersect1d(
        a.rows, b.rows, assume_unique=True, return_indices=True
    )
    if left.size < 2:
        return math.nan
    diff = a.of(metric, k)[left].astype(np.float64) - b.of(metric, k)[right]
    return float(diff.std(ddof=1) / math.sqrt(diff.size))


class MetricAccumulator:
    """Sums the metrics of a stream of ranked query batches, for chunked evaluation.

    Args:
        ks: list lengths to report.
        num_items: size of the catalogue (item indices ``0..num_items-1``).
        valid_items: ``[num_items]`` bool, the items a ranking may contain; the
            denominator of coverage. Default: all.
        item_mask: ``[num_items]`` bool, restricts the relevant sets and the coverage
            universe to these items (an item slice, e.g. cold items). Default: all.
        keep_queries: also keep each query's figures (:meth:`queries`), for
            :func:`paired_standard_error`; 80 bytes a query with five list lengths.
    """

    def __init__(
        self,
        *,
        ks: Sequence[int],
        num_items: int,
        valid_items: np.ndarray | None = None,
        item_mask: np.ndarray | None = None,
        keep_queries: bool = False,
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
        self._squares = torch.zeros_like(self._sums)
        self._hits = torch.zeros(len(self.ks), dtype=torch.float64)
        # Best (0-based) rank at which each item appeared in any list; max(ks) = never.
        self._best_rank = torch.full((num_items,), self.ks[-1], dtype=torch.int64)
        self._num_queries = 0
        self._num_with_relevant = 0
        self._num_interactions = 0
        self._kept: list[tuple[np.ndarray, np.ndarray]] | None = (
            [] if keep_queries else None
        )

    def update(
        self,
        topk_ids: torch.Tensor,
        relevant: UserItems,
        rows: np.ndarray | None = None,
    ) -> None:
        """Adds one batch.

        Args:
            topk_ids: ``[B, K]`` int item indices, best first, ``-1`` for empty slots;
                ``K >= max(ks)``.
            relevant: the relevant items of the same ``B`` queries.
            rows: ``[B]`` int, the queries' rows for :meth:`queries`. Default: they
                follow the queries added before.
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
            values = per[name][has]
            self._sums[i] += values.sum(0)
            self._squares[i] += values.square().sum(0)
        if self._kept is not None:
            self._keep(per, has.numpy(), ids.shape[0], rows)
        self._hits += per["hits"].sum(0)
        self._num_queries += int(ids.shape[0])
        self._num_with_relevant += int(has.sum())
        self._num_interactions += relevant.num_pairs
        present = ids >= 0
        ranks = torch.arange(ids.shape[1]).expand_as(ids)
        self._best_rank.scatter_reduce_(0, ids[present], ranks[present], reduce="amin")

    def _keep(
        self,
        per: dict[str, torch.Tensor],
        has: np.ndarray,
        size: int,
        rows: np.ndarray | None,
    ) -> None:
        """Keeps the batch's per-query figures (those with a relevant item)."""
        if rows is None:
            rows = np.arange(self._num_queries, self._num_queries + size)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (size,):
            raise DataError(
                f"`rows` should hold one row per query ({size}). "
                f"Received: shape={rows.shape}."
            )
        values = torch.stack([per[name] for name in RANKING_METRICS], dim=1)
        assert self._kept is not None
        self._kept.append((rows[has], values[torch.from_numpy(has)].float().numpy()))

    def queries(self) -> QueryFigures:
        """Each query's figures, in row order (needs ``keep_queries=True``)."""
        if self._kept is None:
            raise ConfigError(
                "this accumulator keeps no per-query figures: make it with "
                "keep_queries=True."
            )
        width = (len(RANKING_METRICS), len(self.ks))
        rows = np.concatenate([r for r, _ in self._kept] or [np.zeros(0, np.int64)])
        values = np.concatenate(
            [v for _, v in self._kept] or [np.zeros((0, *width), np.float32)]
        )
        order = np.argsort(rows, kind="stable")
        if rows.size > 1 and (np.diff(rows[order]) == 0).any():
            raise DataError("a query row was added twice; `rows` should be unique.")
        return QueryFigures(ks=self.ks, rows=rows[order], values=values[order])

    def all_reduce(self) -> None:
        """Merge the accumulators of every rank of a ``torch.distributed`` group into
        each (sums and counts add, each item's best rank is the minimum; kept
        per-query figures are gathered): after it, every rank computes the metrics
        of all ranks' queries together."""
        import torch.distributed as dist

        if self._kept is not None:
            gathered: list[object] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._kept)
            self._kept = [part for kept in gathered for part in kept]  # type: ignore[attr-defined]

        dist.all_reduce(self._sums)
        dist.all_reduce(self._squares)
        dist.all_reduce(self._hits)
        dist.all_reduce(self._best_rank, op=dist.ReduceOp.MIN)
        counts = torch.tensor(
            [self._num_queries, self._num_with_relevant, self._num_interactions],
            dtype=torch.int64,
        )
        dist.all_reduce(counts)
        self._num_queries, self._num_with_relevant, self._num_interactions = (
            int(c) for c in counts
        )

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

    def standard_errors(self) -> dict[str, dict[int, float]]:
        """``metric -> k -> standard error`` of recall, NDCG, hit rate and MRR:
        how far each mean of :meth:`compute` would move on another draw of as
        many queries (sample standard deviation over the queries with a relevant
        item, over the square root of their number). NaN below two queries.

        Two figures measured on the same queries differ beyond noise when their
        difference exceeds about twice ``sqrt(se_a ** 2 + se_b ** 2)``; that
        ignores their correlation, so it errs towards calling them level."""
        n = self._num_with_relevant
        out: dict[str, dict[int, float]] = {}
        for i, name in enumerate(RANKING_METRICS):
            out[name] = {}
            for j, k in enumerate(self.ks):
                if n < 2:
                    out[name][k] = math.nan
                    continue
                mean = float(self._sums[i, j]) / n
                spread = (float(self._squares[i, j]) - n * mean * mean) / (n - 1)
                out[name][k] = math.sqrt(max(spread, 0.0) / n)
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
