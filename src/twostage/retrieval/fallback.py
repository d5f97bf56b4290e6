"""Serving rules picked on the validation carve-out after training: the
most-popular fallback, and the session-kNN term's weight.

The most-popular fallback is for users a sparse log tells too little about.

On a sparse log (most users with one or two rows, as in Book-Crossing) a trained model
can rank worse than most-popular for the users with the fewest interactions. After
training, :func:`choose_popularity_fallback` measures both on the validation carve-out
by the users' number of training items, and picks the threshold ``t`` whose rule
"users with at most ``t`` training items get the most-popular list" gives the best
NDCG@10 on validation (0: the model serves everyone). Users unknown to the model have
no training items: with ``t >= 1`` they get most-popular too, instead of the
cold-start query from their features. Evaluation, the ranker's
lists and the Recommender apply the same rule, so the figures describe what is served.

With ``retrieval.session_knn_weight=-1``, :func:`choose_term_weight` picks the
session-kNN term's weight from :data:`SESSION_KNN_GRID` the same way: the one whose
lists, as served (the fallback applied), score the best validation NDCG@10 (ties go
to the smaller weight, 0 included).
How much the neighbourhood should count differs by log: on leave-one-out
validation MovieLens-100k's ensemble preset peaks at 0.005, latest-small's at 0.02.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from twostage.data.user_items import UserItems
from twostage.metrics import per_query_metrics

__all__ = [
    "EVERYONE",
    "FALLBACK_GRID",
    "SESSION_KNN_GRID",
    "FallbackChoice",
    "WeightChoice",
    "choose_popularity_fallback",
    "choose_term_weight",
    "format_by_weight",
]

logger = logging.getLogger(__name__)

#: Every user, however active: the model loses to most-popular across the board.
EVERYONE = 2**31 - 1
#: Thresholds tried on validation (training items per user).
FALLBACK_GRID = (0, 1, 2, 3, 5, 10, 20, 50, 100, EVERYONE)
#: Weights of the session-kNN term tried on validation (its scores are standardised
#: per query; the dot products of unit vectors lie in [-1, 1]).
SESSION_KNN_GRID = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
_K = 10


@dataclass(frozen=True)
class FallbackChoice:
    """The picked threshold and the validation NDCG@10 it rests on.

    Attributes:
        max_interactions: users with at most this many training items get the
            most-popular list (0: nobody).
        model, popularity, combined: validation NDCG@10 (seen items excluded) of the
            model alone, of most-popular alone, and of the rule.
        num_users: validation users measured.
    """

    max_interactions: int
    model: float
    popularity: float
    combined: float
    num_users: int

    def __str__(self) -> str:
        """One line for the log: who gets most-popular and the figures."""
        who = (
            "nobody"
            if self.max_interactions == 0
            else f"users with at most {self.max_interactions} training items"
        )
        return (
            f"most-popular for {who} (validation NDCG@10 over {self.num_users:,} "
            f"users: model {self.model:.4f}, most-popular {self.popularity:.4f}, "
            f"the rule {self.combined:.4f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_interactions": self.max_interactions,
            "validation_ndcg_10": {
                "model": self.model,
                "popularity": self.popularity,
                "with_fallback": self.combined,
            },
            "num_validation_users": self.num_users,
        }


@dataclass(frozen=True)
class WeightChoice:
    """The session-kNN weight picked on validation and the figures behind it.

    Attributes:
        weight: the picked weight (0: no term).
        ndcg: validation NDCG@10 (seen items excluded) of the lists as served (the
            fallback applied) at each weight tried.
        num_users: validation users measured.
    """

    weight: float
    ndcg: dict[float, float]
    num_users: int

    def __str__(self) -> str:
        """One line for the log: the weight and the NDCG@10 at each one tried."""
        return (
            f"{self.weight:g} (validation NDCG@10 over {self.num_users:,} users by "
            f"weight: {format_by_weight(self.ndcg)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "validation_ndcg_10": {f"{w:g}": v for w, v in self.ndcg.items()},
            "num_validation_users": self.num_users,
        }


def format_by_weight(values: dict[float, float]) -> str:
    """``{weight: figure}`` as ``"0: 0.1328, 0.0025: 0.1368, ..."`` for logs."""
    return ", ".join(f"{w:g}: {v:.4f}" for w, v in values.items())


def popularity_top(
    item_probs: Tensor, seen: list[np.ndarray], k: int, *, valid: Tensor
) -> Tensor:
    """``[Q, k]`` the most popular valid items of each row, its ``seen`` excluded."""
    # Stable: ties in popularity keep catalogue order, as the Recommender does.
    order = torch.argsort(
        item_probs.masked_fill(~valid, -1.0), descending=True, stable=True
    )
    order = order[valid[order]]
    rows = []
    for items in seen:
        head = order[: k + len(items)]  # enough to fill k after the exclusions
        top = head[~torch.isin(head, torch.from_numpy(items))][:k]
        rows.append(torch.nn.functional.pad(top, (0, k - len(top)), value=-1))
    return torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)


def choose_popularity_fallback(
    query_embeddings: Tensor,
    item_embeddings: Tensor,
    item_probs: Tensor,
    *,
    relevant: UserItems,
    seen: UserItems,
    num_train_items: np.ndarray,
    chunk: int = 1024,
    extra_scores: Callable[[int, int], Tensor] | None = None,
) -> FallbackChoice:
    """Pick the fallback threshold on validation queries.

    Args:
        query_embeddings: ``[Q, D]`` the validation users' query embeddings.
        item_embeddings: ``[N, D]`` every item's (row 0: OOV, never ranked).
        item_probs: ``[N]`` each item's share of the training rows.
        relevant: ``Q`` rows of validation items (a ``UserItems``; items past ``N``
            are unknown to the model and never hit).
        seen: ``Q`` rows of training items (a ``UserItems``), excluded from lists.
        num_train_items: ``[Q]`` each user's number of training items.
        chunk: queries scored at once.
        extra_scores: ``(start, stop) -> [stop - start, N]`` added to those queries'
            dot products (the session-kNN term), as serving adds it.
    """
    num_items = item_embeddings.shape[0]
    valid = torch.ones(num_items, dtype=torch.bool)
    valid[0] = False
    model_ids, popular_ids = [], []
    for start in range(0, len(query_embeddings), chunk):
        stop = min(start + chunk, len(query_embeddings))
        scores = query_embeddings[start:stop] @ item_embeddings.T  # (B, D)@(D, N)
        if extra_scores is not None:
            scores += extra_scores(start, stop)
        part = seen.slice(start, stop)
        model_ids.append(_top_unseen(scores, part))
        seen_rows = [part.row(r) for r in range(stop - start)]
        popular_ids.append(popularity_top(item_probs, seen_rows, _K, valid=valid))
    model_ndcg = _ndcg(torch.cat(model_ids), relevant)
    popular_ndcg = _ndcg(torch.cat(popular_ids), relevant)
    has = ~np.isnan(model_ndcg)
    counts = np.asarray(num_train_items)[has]
    model_ndcg, popular_ndcg = model_ndcg[has], popular_ndcg[has]
    best_t, best = _best_threshold(model_ndcg, popular_ndcg, counts, FALLBACK_GRID)
    choice = FallbackChoice(
        max_interactions=best_t,
        model=float(model_ndcg.mean()) if has.any() else 0.0,
        popularity=float(popular_ndcg.mean()) if has.any() else 0.0,
        combined=best,
        num_users=int(has.sum()),
    )
    logger.info("popularity fallback picked on validation: %s", choice)
    return choice


def choose_term_weight(
    query_embeddings: Tensor,
    item_embeddings: Tensor,
    term: Callable[[int, int], Tensor],
    *,
    relevant: UserItems,
    seen: UserItems,
    grid: tuple[float, ...] = SESSION_KNN_GRID,
    chunk: int = 1024,
    item_probs: Tensor | None = None,
    num_train_items: np.ndarray | None = None,
    thresholds: tuple[int, ...] = (0,),
) -> WeightChoice:
    """Pick the weight of a score term on validation queries: the ``grid`` entry
    whose lists (dot product plus weight x term, seen items excluded) have the best
    mean NDCG@10; a tie goes to the smaller weight.

    The lists are scored as served, the popularity fallback applied: at each weight
    the best of ``thresholds`` (users with at most that many training items get
    most-popular; 0: nobody). Given :data:`FALLBACK_GRID` (the fallback is picked
    too), the weight and threshold are the best pair: where most-popular serves
    users better than the model alone, the term may still serve them better than
    most-popular (a sequence-aware neighbourhood on a temporal split).

    Args:
        query_embeddings, item_embeddings, relevant, seen, chunk, item_probs,
            num_train_items: as :func:`choose_popularity_fallback`'s
            (``item_probs`` and ``num_train_items`` needed with thresholds > 0).
        term: ``(start, stop) -> [stop - start, N]`` those queries' term at weight 1.
        grid: the weights tried.
        thresholds: the fallback thresholds each weight is measured at.
    """
    ids: dict[float, list[Tensor]] = {w: [] for w in sorted(grid)}
    if not len(query_embeddings):  # nothing to measure: the smallest weight
        return WeightChoice(weight=min(ids), ndcg=dict.fromkeys(ids, 0.0), num_users=0)
    popular_ids = []
    fallback = any(thresholds)
    if fallback and (item_probs is None or num_train_items is None):
        raise ValueError("thresholds above 0 need `item_probs` and `num_train_items`")
    valid = torch.ones(item_embeddings.shape[0], dtype=torch.bool)
    valid[0] = False
    for start in range(0, len(query_embeddings), chunk):
        stop = min(start + chunk, len(query_embeddings))
        dots = query_embeddings[start:stop] @ item_embeddings.T  # (B, D)@(D, N)
        extra = term(start, stop)
        part = seen.slice(start, stop)
        for weight, parts in ids.items():
            parts.append(_top_unseen(dots + weight * extra, part))
        if fallback:
            assert item_probs is not None
            seen_rows = [part.row(r) for r in range(stop - start)]
            popular_ids.append(popularity_top(item_probs, seen_rows, _K, valid=valid))
    per_weight = {w: _ndcg(torch.cat(parts), relevant) for w, parts in ids.items()}
    has = ~np.isnan(per_weight[min(per_weight)])  # queries with a relevant item
    if fallback:
        popular = _ndcg(torch.cat(popular_ids), relevant)[has]
        counts = np.asarray(num_train_items)[has]
    else:  # threshold 0 alone: nobody falls back
        popular = counts = np.zeros(int(has.sum()))
    ndcg = {
        w: _best_threshold(values[has], popular, counts, thresholds)[1]
        for w, values in per_weight.items()
    }
    best = min(ndcg)  # the smallest weight, unless a larger one scores better
    for weight, value in ndcg.items():
        if value > ndcg[best] + 1e-12:
            best = weight
    choice = WeightChoice(weight=best, ndcg=ndcg, num_users=int(has.sum()))
    logger.info("session-kNN weight picked on validation: %s", choice)
    return choice


def _best_threshold(
    model: np.ndarray,
    popular: np.ndarray,
    counts: np.ndarray,
    thresholds: tuple[int, ...],
) -> tuple[int, float]:
    """``(t, NDCG@10)``: the threshold of ``thresholds`` whose rule (users with at
    most ``t`` training items get most-popular; 0: nobody) has the best mean of the
    per-query figures, and that mean (0 without queries); a tie goes to the smaller."""
    if not len(model):
        return min(thresholds), 0.0
    best_t, best = -1, -np.inf
    for t in sorted(thresholds):
        combined = float(
            np.where(counts <= t, popular, model).mean() if t else model.mean()
        )
        if combined > best + 1e-12:
            best_t, best = t, combined
    return best_t, best


def _top_unseen(scores: Tensor, seen: UserItems) -> Tensor:
    """``[B, 10]`` the best-scored items of each row (modified in place), the OOV
    row and the row's ``seen`` items excluded; -1 where the unseen items ran out."""
    scores[:, 0] = -torch.inf
    rows, cols = torch.from_numpy(seen.row_ids()), torch.from_numpy(seen.indices)
    scores[rows, cols] = -torch.inf
    values, ids = scores.topk(min(_K, scores.shape[1]), dim=1)
    ids = ids.masked_fill(values == -torch.inf, -1)  # the unseen items ran out
    return torch.nn.functional.pad(ids, (0, _K - ids.shape[1]), value=-1)


def _ndcg(ids: Tensor, relevant: UserItems) -> np.ndarray:
    """``[Q]`` NDCG@10 per query (NaN without relevant items)."""
    out = per_query_metrics(ids, relevant, ks=(_K,))
    return out["ndcg"][:, 0].numpy()
