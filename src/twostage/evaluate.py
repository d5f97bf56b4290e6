"""Corpus-wide evaluation of a scorer, or of embeddings, in bounded memory.

Protocol. Every query ranks the whole catalogue; invalid items (e.g. the OOV/padding
row 0) are never ranked. Under ``exclude_seen`` the query's training items are removed
from the ranking, and a test item that was also a training item of the same query is
removed from its relevant set too (it cannot be recommended, so counting it would only
cap recall below 1). Under ``include_seen`` nothing but invalid items is masked and
every test item is relevant. Counts are reported per mode because the relevant sets
differ. Scores of ``-inf`` mean "not recommendable": such items fill no list slot.

Metric definitions are in :mod:`twostage.metrics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError
from twostage.metrics import MetricAccumulator, QueryFigures, check_ks
from twostage.scratch import Scratch

__all__ = [
    "DEFAULT_KS",
    "MODES",
    "ScoreFn",
    "EvalResult",
    "evaluate_scores",
    "evaluate_embeddings",
    "saved_error",
]

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10, 50, 100)
MODES = ("exclude_seen", "include_seen")
ALL = "all"
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
_Ranked = tuple[torch.Tensor, torch.Tensor]  # (scores [B, k], ids [B, k]), as topk


@dataclass(frozen=True)
class EvalResult:
    """Metrics per protocol mode, with the same for every slice.

    Attributes:
        ks: the list lengths, ascending.
        metrics: ``mode -> metric -> k -> value``; ``mode`` in :data:`MODES` (those
            computed), ``metric`` in :data:`twostage.metrics.METRIC_NAMES`. NaN where
            nothing could be averaged (e.g. no query with a relevant item).
        counts: ``mode -> name -> count`` with ``num_queries``,
            ``num_queries_with_relevant``, ``num_queries_without_relevant`` and
            ``num_test_interactions`` (relevant pairs under that mode).
        slices: ``name -> EvalResult`` of each query slice and item slice (whose own
            ``slices`` are empty).
        standard_errors: ``mode -> metric -> k -> value``, the standard error of
            each recall, NDCG, hit rate and MRR figure over the queries
            (:meth:`twostage.metrics.MetricAccumulator.standard_errors`); empty in
            a result read from a file written before they were kept.
        queries: ``mode -> QueryFigures``, each query's figures of the whole
            result in its first mode (``exclude_seen`` when computed), for
            :func:`twostage.metrics.paired_standard_error`; only when the
            evaluation was asked to keep them (``keep_queries``), never written
            by :meth:`to_dict`.
    """

    ks: tuple[int, ...]
    metrics: dict[str, dict[str, dict[int, float]]]
    counts: dict[str, dict[str, int]]
    slices: dict[str, EvalResult] = field(default_factory=dict)
    standard_errors: dict[str, dict[str, dict[int, float]]] = field(
        default_factory=dict
    )
    queries: dict[str, QueryFigures] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.metrics)

    @property
    def num_queries(self) -> int:
        """Number of evaluated queries (the same in every mode)."""
        return next(iter(self.counts.values()))["num_queries"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe copy: ``k`` keys become strings and NaN becomes ``None``."""

        def safe(v: float) -> float | None:
            return None if v != v else v

        return {
            "ks": list(self.ks),
            "metrics": _map_values(self.metrics, str, safe),
            "standard_errors": _map_values(self.standard_errors, str, safe),
            "counts": {mode: dict(c) for mode, c in self.counts.items()},
            "slices": {name: sub.to_dict() for name, sub in self.slices.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict`."""

        def number(v: float | None) -> float:
            return math.nan if v is None else float(v)

        try:
            return cls(
                ks=tuple(int(k) for k in data["ks"]),
                metrics=_map_values(data["metrics"], int, number),
                counts={m: dict(c) for m, c in data["counts"].items()},
                slices={n: cls.from_dict(s) for n, s in data["slices"].items()},
                standard_errors=_map_values(
                    data.get("standard_errors", {}), int, number
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(
                "`data` should be a dict written by EvalResult.to_dict(). "
                f"Reading it failed with: {e!r}."
            ) from e

    def to_rows(self) -> list[dict[str, str | float]]:
        """One row per (slice, mode, metric), one ``@k`` column per list length.

        The whole result comes first under the slice name ``"all"``; the rows suit
        ``polars.DataFrame(rows)`` or a rich table.
        """
        parts = [(ALL, self), *self.slices.items()]
        rows: list[dict[str, str | float]] = []
        for slice_name, part in parts:
            for mode, by_metric in part.metrics.items():
                for name, per_k in by_metric.items():
                    row: dict[str, str | float] = {
                        "slice": slice_name,
                        "mode": mode,
                        "metric": name,
                    }
                    row.update({f"@{k}": v for k, v in per_k.items()})
                    rows.append(row)
        return rows


def saved_error(
    result: Mapping[str, Any],
    metric: str = "ndcg",
    k: str = "10",
    mode: str = "exclude_seen",
) -> float | None:
    """The standard error of one figure of an :meth:`EvalResult.to_dict` (a run's
    saved metrics, a baseline's), or None where it is unknown (not kept, NaN)."""
    errors = result.get("standard_errors") or {}
    value = errors.get(mode, {}).get(metric, {}).get(k)
    return None if value is None or value != value else float(value)


def _map_values(
    nested: Mapping[str, Mapping[str, Mapping[Any, Any]]],
    key: Callable[[Any], Any],
    value: Callable[[Any], Any],
) -> dict[str, dict[str, dict[Any, Any]]]:
    """Rebuilds ``mode -> metric -> k -> value`` with converted ``k`` and values."""
    return {
        mode: {
            name: {key(k): value(v) for k, v in per_k.items()}
            for name, per_k in by_metric.items()
        }
        for mode, by_metric in nested.items()
    }


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"`{name}` should be a positive integer. Received: `{name}` = {value!r}."
        )
    return value


def _bool_mask(name: str, mask: object, size: int, of: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.shape != (size,):
        raise DataError(
            f"`{name}` should be a bool array of shape [{size}] (one per {of}). "
            f"Received: dtype={array.dtype}, shape={array.shape}."
        )
    return array


def _check_rows(name: str, value: UserItems, num_queries: int) -> None:
    if value.num_rows != num_queries:
        raise DataError(
            f"`{name}` should have one row per query ({num_queries}). "
            f"Received: {value.num_rows} rows."
        )


def _resolve_modes(
    exclude_seen: bool | Literal["both"], seen: UserItems | None
) -> tuple[str, ...]:
    if exclude_seen == "both":
        modes: tuple[str, ...] = MODES
    elif exclude_seen is True or exclude_seen is False:
        modes = (MODES[0],) if exclude_seen else (MODES[1],)
    else:
        raise ConfigError(
            "`exclude_seen` should be True, False or 'both'. "
            f"Received: `exclude_seen` = {exclude_seen!r}."
        )
    if MODES[0] in modes and seen is None:
        raise ConfigError(
            "`exclude_seen` needs the training items of each query. Pass `seen`, "
            "or set exclude_seen=False to rank everything."
        )
    return modes


def _resolve_slices(
    slices: Mapping[str, np.ndarray] | None,
    item_slices: Mapping[str, np.ndarray] | None,
    *,
    num_queries: int,
    num_items: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Checked ``(query slices [Q] bool, item slices [num_items] bool)`` by name."""
    by_query = {
        n: _bool_mask(f"slices[{n!r}]", m, num_queries, "query")
        for n, m in (slices or {}).items()
    }
    by_item = {
        n: _bool_mask(f"item_slices[{n!r}]", m, num_items, "item")
        for n, m in (item_slices or {}).items()
    }
    clash = (set(by_query) & set(by_item)) | ({ALL} & (set(by_query) | set(by_item)))
    if clash:
        raise ConfigError(
            "slice names should be unique across `slices` and `item_slices` and "
            f"not {ALL!r}. Received duplicate or reserved names: {sorted(clash)}."
        )
    return by_query, by_item


class _Run:
    """The validated inputs of one evaluation and its metric accumulators."""

    def __init__(
        self,
        *,
        num_items: int,
        num_queries: int,
        relevant: UserItems,
        seen: UserItems | None,
        ks: Sequence[int],
        exclude_seen: bool | Literal["both"],
        batch_size: int,
        valid_items: np.ndarray | None,
        slices: Mapping[str, np.ndarray] | None,
        item_slices: Mapping[str, np.ndarray] | None,
        shard: bool = False,
        keep_queries: bool = False,
    ) -> None:
        self.ks = check_ks(ks)
        self.world = None
        if shard:
            from twostage import distributed

            self.world = distributed.current()
        self.k = self.ks[-1]
        self.modes = _resolve_modes(exclude_seen, seen)
        self.batch_size = _positive_int("batch_size", batch_size)
        if num_items < 1:
            raise DataError(f"the catalogue is empty: `num_items` = {num_items!r}.")
        _check_rows("relevant", relevant, num_queries)
        if seen is not None:
            _check_rows("seen", seen, num_queries)
        self.num_queries, self.seen = num_queries, seen
        valid = np.ones(num_items, dtype=bool)
        if valid_items is not None:
            valid = _bool_mask("valid_items", valid_items, num_items, "item")
        self.invalid = torch.from_numpy(~valid)
        self._scratch = Scratch()  # the masked copy's memory, reused
        self.relevant = {MODES[1]: relevant}
        if seen is not None and MODES[0] in self.modes:
            self.relevant[MODES[0]] = relevant.difference(seen)
        self.query_slices, item_masks = _resolve_slices(
            slices, item_slices, num_queries=num_queries, num_items=num_items
        )

        def accumulators(
            item_mask: np.ndarray | None, keep: bool = False
        ) -> dict[str, MetricAccumulator]:
            return {
                mode: MetricAccumulator(
                    ks=self.ks,
                    num_items=num_items,
                    valid_items=valid,
                    item_mask=item_mask,
                    keep_queries=keep and mode == self.modes[0],
                )
                for mode in self.modes
            }

        self.accs = {ALL: accumulators(None, keep_queries)}
        self.accs.update({n: accumulators(None) for n in self.query_slices})
        self.accs.update({n: accumulators(m) for n, m in item_masks.items()})
        self.keep_queries = keep_queries

    def batches(self) -> Iterator[tuple[int, int]]:
        """The query blocks; with ``shard`` under torch.distributed, those of this
        rank's contiguous share of the queries."""
        low, high = 0, self.num_queries
        if self.world is not None:
            sizes = self.world.sizes(self.num_queries)
            low = sum(sizes[: self.world.rank])
            high = low + sizes[self.world.rank]
        for start in range(low, high, self.batch_size):
            yield start, min(start + self.batch_size, high)

    def seen_pairs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local_row, item_idx)``, each ``[n]`` int64, of the batch's seen items."""
        if self.seen is None or MODES[0] not in self.modes:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        part = self.seen.slice(start, stop)
        return torch.from_numpy(part.row_ids()), torch.from_numpy(part.indices)

    def rank(
        self, scores: torch.Tensor, *, offset: int, seen: tuple[torch.Tensor, ...]
    ) -> dict[str, _Ranked]:
        """Top ``k`` of one item chunk per mode, with global item indices.

        Args:
            scores: ``[B, C]`` float scores of items ``offset..offset+C-1``.
            offset: index of the chunk's first item.
            seen: ``(local_row, item_idx)`` of the batch's seen items (all items).
        """
        if torch.isnan(scores).any():
            raise DataError("scores should not contain NaN; check the model's inputs.")
        width, device = scores.shape[1], scores.device
        invalid = self.invalid[offset : offset + width].to(device)
        masked = self._copy(scores).masked_fill_(invalid, -math.inf)
        out: dict[str, _Ranked] = {}
        for mode in reversed(self.modes):  # include_seen first, then mask the seen
            if mode == MODES[0]:
                rows, items = seen
                inside = (items >= offset) & (items < offset + width)
                where = (rows[inside].to(device), (items[inside] - offset).to(device))
                masked[where] = -math.inf
            values, ids = masked.topk(min(self.k, width), dim=1)
            out[mode] = (values, ids + offset)
        return out

    def _copy(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` copied into memory kept from the last block (``scores``
        stay intact; :class:`~twostage.scratch.Scratch`)."""
        kept = self._scratch.block("masked", scores.shape, scores.dtype, scores.device)
        return kept.copy_(scores)

    def update(self, start: int, stop: int, ranked: Mapping[str, torch.Tensor]) -> None:
        for mode, ids in ranked.items():
            relevant = self.relevant[mode].slice(start, stop)
            for name, by_mode in self.accs.items():
                if name == ALL:
                    by_mode[mode].update(ids, relevant, np.arange(start, stop))
                    continue
                if name not in self.query_slices:
                    by_mode[mode].update(ids, relevant)
                    continue
                rows = np.flatnonzero(self.query_slices[name][start:stop])
                if rows.size:
                    by_mode[mode].update(
                        ids[torch.from_numpy(rows)], relevant.take(rows)
                    )

    def result(self) -> EvalResult:
        if self.world is not None:  # every rank ends with all ranks' figures
            for by_mode in self.accs.values():
                for accumulator in by_mode.values():
                    accumulator.all_reduce()

        def build(by_mode: dict[str, MetricAccumulator]) -> EvalResult:
            return EvalResult(
                ks=self.ks,
                metrics={mode: acc.compute() for mode, acc in by_mode.items()},
                counts={mode: acc.counts() for mode, acc in by_mode.items()},
                standard_errors={
                    mode: acc.standard_errors() for mode, acc in by_mode.items()
                },
            )

        top = build(self.accs[ALL])
        subs = {
            name: build(by_mode) for name, by_mode in self.accs.items() if name != ALL
        }
        kept = {}
        if self.keep_queries:
            kept = {self.modes[0]: self.accs[ALL][self.modes[0]].queries()}
        return EvalResult(
            ks=top.ks,
            metrics=top.metrics,
            counts=top.counts,
            slices=subs,
            standard_errors=top.standard_errors,
            queries=kept,
        )


def _merge(old: _Ranked | None, new: _Ranked, k: int) -> _Ranked:
    if old is None:
        return new
    values = torch.cat([old[0], new[0]], dim=1)
    ids = torch.cat([old[1], new[1]], dim=1)
    values, where = values.topk(min(k, values.shape[1]), dim=1)
    return values, ids.gather(1, where)


def _finish(ranked: _Ranked, k: int) -> torch.Tensor:
    """``[B, k]`` int64 ids on the CPU: -1 for masked (-inf) slots and padding."""
    values, ids = ranked
    ids = ids.masked_fill(values == -math.inf, -1).cpu()
    if ids.shape[1] < k:
        pad = torch.full((ids.shape[0], k - ids.shape[1]), -1, dtype=ids.dtype)
        ids = torch.cat([ids, pad], dim=1)
    return ids


@torch.no_grad()  # evaluation never needs a graph; without this one would pile up
def _evaluate(
    run: _Run, score_chunks: Callable[[int, int], Iterator[tuple[int, torch.Tensor]]]
) -> EvalResult:
    """Runs every query block through ``score_chunks(start, stop)``, which yields
    ``(offset, [B, C] scores)`` item chunks, keeping a running top ``k`` per mode."""
    for start, stop in run.batches():
        seen = run.seen_pairs(start, stop)
        running: dict[str, _Ranked] = {}
        for offset, scores in score_chunks(start, stop):
            for mode, ranked in run.rank(scores, offset=offset, seen=seen).items():
                running[mode] = _merge(running.get(mode), ranked, run.k)
        run.update(start, stop, {m: _finish(r, run.k) for m, r in running.items()})
        logger.debug("evaluated queries %d..%d of %d", start, stop, run.num_queries)
    return run.result()


def evaluate_scores(
    score_fn: ScoreFn,
    *,
    num_items: int,
    queries: np.ndarray,
    relevant: UserItems,
    seen: UserItems | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    exclude_seen: bool | Literal["both"] = True,
    batch_size: int = 256,
    valid_items: np.ndarray | None = None,
    slices: Mapping[str, np.ndarray] | None = None,
    item_slices: Mapping[str, np.ndarray] | None = None,
    shard: bool = False,
    keep_queries: bool = False,
) -> EvalResult:
    """Ranks the whole catalogue for every query with a scoring function.

    Peak memory is about two ``[batch_size, num_items]`` float tensors; for catalogues
    where that is too big, use :func:`evaluate_embeddings`.

    Args:
        score_fn: ``query_batch [B] int64 -> [B, num_items]`` float scores.
        num_items: catalogue size.
        queries: ``[Q]`` int query (usually ``user_idx``) indices passed to
            ``score_fn``; row ``i`` of ``relevant``/``seen`` belongs to ``queries[i]``.
        relevant: ``Q`` rows, the test items of each query.
        seen: ``Q`` rows, the training items of each query; needed to exclude them.
        ks: list lengths to report.
        exclude_seen: ``True``, ``False`` or ``"both"`` (see the module docstring).
        batch_size: queries scored at a time.
        valid_items: ``[num_items]`` bool, the rankable items (e.g. all but the OOV
            row 0). Default: all.
        slices: ``name -> [Q] bool`` query subsets (e.g. cold users) to report apart.
        item_slices: ``name -> [num_items] bool`` item subsets (e.g. cold items): the
            same rankings, relevant sets and coverage restricted to those items.
        shard: as in :func:`evaluate_embeddings`.
        keep_queries: also keep each query's figures (:attr:`EvalResult.queries`),
            for :func:`twostage.metrics.paired_standard_error`.
    """
    query_arr = np.asarray(queries)
    if query_arr.ndim != 1 or not np.issubdtype(query_arr.dtype, np.integer):
        raise DataError(
            "`queries` should be a 1-D integer array. "
            f"Received: dtype={query_arr.dtype}, shape={query_arr.shape}."
        )
    run = _Run(
        num_items=num_items,
        num_queries=query_arr.size,
        relevant=relevant,
        seen=seen,
        ks=ks,
        exclude_seen=exclude_seen,
        batch_size=batch_size,
        valid_items=valid_items,
        slices=slices,
        item_slices=item_slices,
        shard=shard,
        keep_queries=keep_queries,
    )

    def score_chunks(start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        scores = score_fn(torch.from_numpy(query_arr[start:stop].astype(np.int64)))
        if scores.shape != (stop - start, num_items) or not scores.is_floating_point():
            raise DataError(
                f"`score_fn` should return a [{stop - start}, {num_items}] float tensor "
                f"for a batch of {stop - start} queries. "
                f"Received: dtype={scores.dtype}, shape={tuple(scores.shape)}."
            )
        yield 0, scores

    return _evaluate(run, score_chunks)


def evaluate_embeddings(
    query_emb: torch.Tensor,
    item_emb: torch.Tensor,
    *,
    relevant: UserItems,
    seen: UserItems | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    exclude_seen: bool | Literal["both"] = True,
    batch_size: int = 1024,
    item_batch_size: int = 65536,
    valid_items: np.ndarray | None = None,
    slices: Mapping[str, np.ndarray] | None = None,
    item_slices: Mapping[str, np.ndarray] | None = None,
    shard: bool = False,
    keep_queries: bool = False,
) -> EvalResult:
    """Dot-product retrieval evaluation that scans the catalogue in item chunks.

    Scores ``query_emb @ item_emb.T`` are never held whole: each block of
    ``batch_size`` queries keeps a running top ``max(ks)`` over item chunks, so peak
    memory is about two ``[batch_size, item_batch_size]`` tensors whatever the
    catalogue size. Runs on the device of ``query_emb``.

    Args:
        query_emb: ``[Q, D]`` float query embeddings; row ``i`` is query ``i`` of
            ``relevant``/``seen``.
        item_emb: ``[num_items, D]`` float item embeddings.
        item_batch_size: items scored at a time.
        relevant, seen, ks, exclude_seen, batch_size, valid_items, slices,
            item_slices, keep_queries: as in :func:`evaluate_scores`.
        shard: under ``torch.distributed`` (:mod:`twostage.distributed`), score
            this rank's share of the query blocks and merge the figures of all
            ranks; every rank must call it, and every rank returns the same result.
    """
    if (
        query_emb.ndim != 2
        or item_emb.ndim != 2
        or query_emb.shape[1] != item_emb.shape[1]
        or query_emb.dtype != item_emb.dtype
        or not query_emb.is_floating_point()
    ):
        raise DataError(
            "`query_emb` [Q, D] and `item_emb` [num_items, D] should be 2-D float "
            "tensors with the same D and dtype. Received: "
            f"{tuple(query_emb.shape)} {query_emb.dtype} and "
            f"{tuple(item_emb.shape)} {item_emb.dtype}."
        )
    item_batch_size = _positive_int("item_batch_size", item_batch_size)
    num_items = item_emb.shape[0]
    run = _Run(
        num_items=num_items,
        num_queries=query_emb.shape[0],
        relevant=relevant,
        seen=seen,
        ks=ks,
        exclude_seen=exclude_seen,
        batch_size=batch_size,
        valid_items=valid_items,
        slices=slices,
        item_slices=item_slices,
        shard=shard,
        keep_queries=keep_queries,
    )
    item_emb = item_emb.to(query_emb.device)

    scratch = Scratch()  # each chunk's scores in the memory of the one before

    def score_chunks(start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        block = query_emb[start:stop]
        for offset in range(0, num_items, item_batch_size):
            chunk = item_emb[offset : offset + item_batch_size]
            shape = (block.shape[0], chunk.shape[0])
            out = scratch.block("scores", shape, block.dtype, block.device)
            # (B, D) @ (D, C) -> (B, C); rank() reads it before the next chunk
            yield offset, torch.matmul(block, chunk.T, out=out)

    return _evaluate(run, score_chunks)
