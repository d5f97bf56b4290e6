"""Next-item figures of sessions the model never saw, as session-based
recommenders are measured: each session's last item held out and found from the
items before it, the model's lists beside its own popularity fallback and, given
the training rows, the baselines fitted on them and fed the same items."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from twostage.data.dataset import ITEM, TIME, USER, Dataset
from twostage.data.user_items import UserItems
from twostage.inputs import session_indices
from twostage.metrics import (
    MetricAccumulator,
    QueryFigures,
    check_ks,
    paired_standard_error,
)
from twostage.retrieval.tensors import TimedRows, context_keys, session_history
from twostage.session_batch import (
    BATCH_SESSIONS,
    SESSION,
    readable_rows,
    recommend_sessions,
    right_aligned,
    session_users,
    sessions_table,
)

if TYPE_CHECKING:
    from twostage.recommender import Recommender

__all__ = ["evaluate_sessions"]

# Scores held at once while the baselines rank: about 2**24 floats.
_BLOCK_ELEMENTS = 1 << 24


def evaluate_sessions(
    rec: Recommender,
    sessions: Any,
    *,
    ks: Sequence[int] = (1, 5, 10, 20, 50, 100),
    use_ranker: bool = True,
    train: Dataset | TimedRows | None = None,
) -> dict[str, Any]:
    """Next-item figures on sessions the model never saw, as session-based
    recommenders are measured: each session's last item (in the order
    :func:`recommend_sessions` reads it) is held out, its earlier items are the
    query, and the list (its items excluded) must find the held-out one. A model
    that reads per-request context is asked at the time of each held-out row
    (where the table has times), as the test split's rows are measured.

    Args:
        rec: the model.
        sessions: a row per session item, as :func:`recommend_sessions` takes it.
        ks: list lengths.
        use_ranker: measure the served list (False: retrieval's order).
        train: the rows the model trained on (fit and validation, with their
            times; a table, or :class:`~twostage.retrieval.tensors.TimedRows`
            as a streamed run reads them): the baselines are fitted on them
            (:func:`~twostage.retrieval.evaluation.baseline_makers`) and each
            reads what the model's query reads: a known user's stored history,
            then the session's items (all of them, where the model keeps the
            latest ``retrieval.history_length``). They leave out what the model
            leaves out (the session's items, a known user's seen items, removed
            items), and a session with nothing to read gets the run's
            most-popular list from the ones that read items, as the model's
            fallback serves it.

    Returns:
        ``{"twostage": {metric: {k: value}}, "popularity": ...}`` (recall, NDCG,
        hit rate and MRR; one held-out item each, so recall = hit rate), the
        popularity row being the model's own fallback list with each session's
        items excluded; ``baselines`` (``{name: {metric: {k: value}}}``, given
        ``train``); ``standard_errors``, the standard error of each of those
        figures in the same layout (``twostage``, ``popularity``, ``baselines``;
        :meth:`~twostage.metrics.MetricAccumulator.standard_errors`);
        ``paired_standard_errors``, the standard error of the model's figure
        minus each other row's, paired over the same sessions
        (:func:`~twostage.metrics.paired_standard_error`; ``popularity``,
        ``baselines``, in the same layout);
        ``sessions`` (measured), ``single_item_sessions`` (left
        out: nothing to predict from), ``unknown_targets`` (held-out items the
        model does not know, counted as misses), ``table_order_sessions``
        (measured sessions read, and their held-out row chosen, in the table's
        order because some of their rows have no timestamp and others have
        one) and the query rows not read (``unread_rows``, ``unread_reasons``).
    """
    ks = check_ks(ks)
    sessions = sessions_table(rec, sessions)
    # A row without a session or an item is neither a query item nor a target.
    usable = pl.col(SESSION).is_not_null() & pl.col(ITEM).is_not_null()
    dropped = sessions.select(
        pl.col(SESSION).is_null().sum().alias(f"no {SESSION}"),
        (pl.col(SESSION).is_not_null() & pl.col(ITEM).is_null())
        .sum()
        .alias(f"no {ITEM}"),
    ).row(0, named=True)
    ordered = _in_reading_order(sessions.with_row_index("_row").filter(usable))
    last = pl.col("_row") == pl.col("_row").last().over(SESSION)
    targets = ordered.filter(last)
    sizes = ordered.group_by(SESSION, maintain_order=True).len()
    measured = set(sizes.filter(pl.col("len") > 1)[SESSION].to_list())
    targets = targets.filter(pl.col(SESSION).is_in(list(measured)))
    queries = ordered.filter(~last).sort("_row").drop("_row")
    moments = None
    if context_keys(rec.run.spec) and TIME in targets.columns:
        # A model that reads the request's context is asked at each held-out
        # row's time, as the test split's evaluation asks at each test row's.
        moments = {
            session: {"timestamp": when}
            for session, when in targets.select(SESSION, TIME).iter_rows()
            if when is not None and math.isfinite(when)  # else: not known
        }
    found = recommend_sessions(
        rec,
        queries,
        ks[-1],
        exclude_seen=True,
        use_ranker=use_ranker,
        session_contexts=moments,
    )
    vocab = rec.item_vocab
    order = targets[SESSION].to_list()
    position = {session: row for row, session in enumerate(order)}
    wanted = np.array([vocab.lookup(i) for i in targets[ITEM].to_list()], np.int64)
    known = np.array([vocab.contains(i) for i in targets[ITEM].to_list()], bool)
    relevant = UserItems.from_pairs(
        np.arange(len(order)), np.where(known, wanted, 0), num_rows=len(order)
    )
    figures: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    paired: dict[str, Any] = {}

    def measure(lists: torch.Tensor, into: dict[str, Any], name: str) -> QueryFigures:
        """Adds one row's figures and standard errors; returns its per-session
        figures."""
        acc = MetricAccumulator(ks=ks, num_items=vocab.size, keep_queries=True)
        acc.update(lists, relevant)
        errors_of = acc.standard_errors()
        metrics = acc.compute()
        into[name] = {m: metrics[m] for m in errors_of}
        (errors if into is figures else errors["baselines"])[name] = errors_of
        return acc.queries()

    ours = measure(_ranked(found.lists, position, vocab, ks[-1]), figures, "twostage")

    def against(theirs: QueryFigures) -> dict[str, dict[int, float]]:
        """The paired standard error of the model's figures less ``theirs``."""
        return {
            m: {k: paired_standard_error(ours, theirs, m, k) for k in ks}
            for m in errors["twostage"]
        }

    popular = _popular_ranked(rec, queries, order, ks[-1])
    paired["popularity"] = against(measure(popular, figures, "popularity"))
    if train is not None:
        figures["baselines"], errors["baselines"] = {}, {}
        paired["baselines"] = {}
        for name, lists in _baseline_lists(rec, queries, order, ks[-1], train):
            paired["baselines"][name] = against(
                measure(lists, figures["baselines"], name)
            )
    figures["standard_errors"] = errors
    figures["paired_standard_errors"] = paired
    reasons = {r: n for r, n in dropped.items() if n}
    reasons.update(found.unread["reason"].value_counts(sort=True).iter_rows())
    mixed = []
    if TIME in ordered.columns:  # read, and their last row held out, in table order
        timed = ordered.group_by(SESSION, maintain_order=True).agg(
            pl.col(TIME).is_not_null().sum().alias("timed"), pl.len().alias("rows")
        )
        partly = (pl.col("timed") > 0) & (pl.col("timed") < pl.col("rows"))
        mixed = timed.filter(partly & pl.col(SESSION).is_in(list(measured)))[
            SESSION
        ].to_list()
    return {
        **figures,
        "sessions": len(order),
        "table_order_sessions": len(mixed),
        "single_item_sessions": sizes.height - len(measured),
        "unknown_targets": int((~known).sum()),
        "unread_rows": sum(reasons.values()),
        "unread_reasons": reasons,
    }


def _in_reading_order(rows: pl.DataFrame) -> pl.DataFrame:
    """Each session's rows in the order ``recommend`` reads them: by time where
    every row of the session has one (ties in the table's order), else in the
    table's order."""
    if TIME not in rows.columns:
        return rows
    timed = pl.col(TIME).is_not_null().all().over(SESSION)
    key = pl.when(timed).then(pl.col(TIME).cast(pl.Float64)).otherwise(pl.col("_row"))
    first = pl.col("_row").min().over(SESSION)
    return (
        rows.with_columns(_first=first, _key=key)
        .sort("_first", "_key", "_row")
        .drop("_first", "_key")
    )


def _ranked(
    lists: pl.DataFrame, position: dict[Any, int], vocab: Any, k: int
) -> torch.Tensor:
    """``[S, k]`` item indices of each measured session's list (-1: empty)."""
    out = torch.full((len(position), k), -1, dtype=torch.long)
    for session, rank, item in lists.select(SESSION, "rank", ITEM).iter_rows():
        if session in position:
            out[position[session], rank - 1] = vocab.lookup(item)
    return out


def _popular_ranked(
    rec: Recommender, queries: pl.DataFrame, order: list[Any], k: int
) -> torch.Tensor:
    """``[S, k]`` the model's fallback list for each session, its items left out."""
    vocab = rec.item_vocab
    seen: dict[Any, set[int]] = {}
    for session, item in queries.select(SESSION, ITEM).iter_rows():
        if item is not None:
            seen.setdefault(session, set()).add(vocab.lookup(item))
    longest = max((len(items) for items in seen.values()), default=0)
    popular = [
        vocab.lookup(i["item_id"]) for i in rec.recommend(None, k + longest).items
    ]
    out = torch.full((len(order), k), -1, dtype=torch.long)
    for row, session in enumerate(order):
        kept = [i for i in popular if i not in seen.get(session, ())][:k]
        out[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out


def _baseline_lists(
    rec: Recommender,
    queries: pl.DataFrame,
    order: list[Any],
    k: int,
    train: Dataset | TimedRows,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, [S, k] item indices)`` of each baseline's list for the measured
    sessions ``order`` (-1 past what is left), fitted on ``train`` one at a time:
    each reads the items the model's query reads, in full, and leaves out what
    the model leaves out."""
    from twostage.retrieval.evaluation import (
        BY_POPULARITY,
        baseline_makers,
        fitted_baselines,
    )

    reads, excluded = _session_reads(rec, queries, order)
    empty = torch.tensor([len(items) == 0 for items in reads], dtype=torch.bool)
    popular = rec.run.tensors.fallback_popularity.to(torch.float32)
    num_items = rec.item_vocab.size
    block = max(1, min(BATCH_SESSIONS, _BLOCK_ELEMENTS // num_items))
    for name, model in fitted_baselines(baseline_makers(rec.run, train)):
        out = torch.full((len(order), k), -1, dtype=torch.long)
        for start in range(0, len(order), block):
            stop = min(start + block, len(order))
            scores = model.score_sequences(right_aligned(reads[start:stop]))
            scores = scores.to(torch.float32)
            if name not in BY_POPULARITY:
                scores[empty[start:stop]] = popular
            # items added after training: no baseline has learned them
            scores = torch.nn.functional.pad(
                scores, (0, num_items - scores.shape[1]), value=-torch.inf
            )
            out_of_list = rec.removed_mask.expand(stop - start, -1).clone()
            out_of_list[:, 0] = True  # the padding row
            for row, taken in enumerate(excluded[start:stop]):
                out_of_list[row, taken] = True
            scores = scores.masked_fill(out_of_list, -torch.inf)
            # ties in catalogue order, so the list does not hang on k (topk's
            # order among equal scores does; popularity ties often)
            top, idx = torch.sort(scores, dim=1, descending=True, stable=True)
            top, idx = top[:, :k], idx[:, :k]
            out[start:stop, : idx.shape[1]] = idx.masked_fill(top == -torch.inf, -1)
        yield name, out


def _session_reads(
    rec: Recommender, queries: pl.DataFrame, order: list[Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each measured session's item indices as the model's query reads them,
    oldest first: a known user's stored history, then the session's items the
    model trained on; each one's items the model's list leaves out besides the
    removed ones: the session's items and a known user's seen ones)."""
    rows = queries.to_dicts()
    owners = session_users(rows) if USER in queries.columns else {}
    entries, _, _ = readable_rows(rec, rows)
    tensors = rec.run.tensors
    length = int(tensors.history.shape[1])
    excluded = []
    reads = []
    for session in order:
        user = rec.user_vocab.lookup(owners[session]) if session in owners else 0
        got = session_indices(
            entries.get(session) or None, rec.item_vocab, history_length=length
        )
        empty = torch.zeros(0, dtype=torch.long)
        items, times, given = got if got is not None else (empty, empty, empty)
        ratings = given if got is not None else torch.zeros(0, dtype=torch.float64)
        read = session_history(tensors, user, (items, times, ratings))[0]
        reads.append(read[read < rec.num_trained_items])
        seen = torch.from_numpy(rec.seen_items(user)) if user > 0 else empty
        excluded.append(torch.cat([items, seen]))
    return reads, excluded
