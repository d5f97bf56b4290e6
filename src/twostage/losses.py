"""Retrieval losses, and every logQ (sampling-probability) correction they use.
Towers only make embeddings; the loss lives here.

The in-batch sampled softmax treats the other positives of a batch as negatives. Popular
items appear in more batches and so are over-penalised; the logQ correction subtracts the
log of each candidate's expected count among the negatives (Yi et al., RecSys 2019) so the
logits estimate the full softmax. Mixed negative sampling (Yang et al., WWW 2020) adds
uniformly drawn items, which reach the long tail that in-batch negatives rarely show.
When the candidates are the distinct items of a batch (one example per user), the
correction is the log of each item's chance to be in the sample at all
(:func:`log_inclusion_probability`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "full_softmax_loss",
    "in_batch_softmax_loss",
    "log_inclusion_probability",
    "multi_positive_softmax_loss",
]

_MASKED = -1e9  # finite, so a fully masked row cannot produce NaN


def in_batch_softmax_loss(
    queries: Tensor,
    candidates: Tensor,
    *,
    temperature: float | Tensor = 0.05,
    candidate_ids: Tensor | None = None,
    candidate_probs: Tensor | None = None,
    extra_candidates: Tensor | None = None,
    extra_ids: Tensor | None = None,
    extra_probs: Tensor | None = None,
    num_items: int | None = None,
    weights: Tensor | None = None,
    correction_weight: float = 1.0,
    positive_offset: int = 0,
    normaliser: float | Tensor | None = None,
) -> Tensor:
    """Sampled softmax over in-batch (and optional uniform) negatives.

    Row ``i`` of ``queries`` has its positive at row ``positive_offset + i`` of
    ``candidates`` (``candidates`` may hold more rows than ``queries``: the global
    batch of a data-parallel step, :mod:`twostage.distributed`).

    Args:
        queries: ``[B, D]`` query embeddings.
        candidates: ``[B, D]`` embeddings of each query's positive item.
        temperature: logits are divided by it (a float or a learnable scalar tensor).
        candidate_ids: ``[B]`` item indices of the positives. When given, accidental hits
            (the same item as row ``i``'s positive at another column) are masked out.
        candidate_probs: ``[B]`` sampling probability of each positive item (its share of
            the training interactions). When given, the logQ correction is applied.
        extra_candidates: ``[M, D]`` embeddings of extra negatives drawn uniformly.
        extra_ids: ``[M]`` item indices of the extra negatives (accidental-hit masking).
        extra_probs: ``[M]`` sampling probabilities of the extra negatives' items, for the
            logQ correction of the mixed batch.
        num_items: catalogue size; needed with extra negatives and the correction.
        weights: ``[B]`` per-example weights (e.g. from ratings); the loss is the
            weighted mean.
        correction_weight: scales the logQ term; 1 is the full correction, values
            below 1 keep part of the popularity signal in the scores.
        positive_offset: where the queries' positives start among ``candidates``.
        normaliser: divide the (weighted) sum of the losses by this instead of taking
            the mean (a data-parallel rank passes its share of the global count).

    Returns:
        A scalar loss.
    """
    num_queries = queries.shape[0]
    batch = candidates.shape[0]  # the in-batch candidates: the global batch
    labels = torch.arange(num_queries, device=queries.device) + positive_offset
    columns = candidates
    columns_ids = candidate_ids
    if extra_candidates is not None:
        columns = torch.cat([candidates, extra_candidates])
        if candidate_ids is not None and extra_ids is not None:
            columns_ids = torch.cat([candidate_ids, extra_ids])
    # Every elementwise pass over the (b, B[+M]) logits costs about as much as one of
    # the matmuls, so the temperature scales the queries (b x D) and the logQ term and
    # the masked accidental hits go in as the matmul's bias (addmm), which autograd
    # does not have to mask again on the way back.
    scaled = queries / temperature
    bias: Tensor | None = None
    if candidate_probs is not None:
        bias = -correction_weight * _log_expected_count(
            batch,
            candidate_probs,
            extra_probs,
            num_extra=0 if extra_candidates is None else extra_candidates.shape[0],
            num_items=num_items,
        )
    if candidate_ids is not None and columns_ids is not None:
        hits = _accidental_hits(columns_ids, positive_offset, num_queries)
        if hits is not None:
            shape = (num_queries, columns.shape[0])
            full = torch.zeros(shape, device=queries.device, dtype=scaled.dtype)
            bias = full if bias is None else full.add_(bias)
            bias.index_put_(hits, bias.new_tensor(_MASKED))
    if bias is None:
        logits = scaled @ columns.T  # (b, D) @ (D, B[+M]) -> (b, B[+M])
    else:
        logits = torch.addmm(bias.to(scaled.dtype), scaled, columns.T)
    losses = F.cross_entropy(logits, labels, reduction="none")
    if normaliser is not None:
        total = losses.sum() if weights is None else (losses * weights).sum()
        return total / normaliser
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


def _accidental_hits(
    columns_ids: Tensor, offset: int, num_queries: int
) -> tuple[Tensor, Tensor] | None:
    """``(rows, columns)`` where a query's logits hold its own positive item again at
    another column (query ``i``'s positive is column ``offset + i``), or None.

    Only the columns whose item occurs more than once are compared, so the cost is
    that of a sort of the columns, not of a dense ``(b, B)`` comparison.
    """
    ordered, order = torch.sort(columns_ids)
    repeated = ordered[1:] == ordered[:-1]
    if not bool(repeated.any()):
        return None
    member = torch.zeros_like(ordered, dtype=torch.bool)
    member[1:] |= repeated
    member[:-1] |= repeated
    columns = order[member]  # the columns of repeated items
    same = columns_ids[columns][:, None] == columns_ids[columns][None, :]
    same.fill_diagonal_(False)
    first, second = torch.nonzero(same, as_tuple=True)
    rows = columns[first] - offset  # the column of a query's positive, as its row
    mine = (rows >= 0) & (rows < num_queries)
    return rows[mine], columns[second][mine]


def _log_expected_count(
    batch: int,
    candidate_probs: Tensor,
    extra_probs: Tensor | None,
    *,
    num_extra: int,
    num_items: int | None,
) -> Tensor:
    """log of each column's expected number of appearances among the negatives.

    An item with training share ``p`` appears ``B * p`` times among ``B`` in-batch
    positives and ``M / N`` times among ``M`` uniform draws over ``N`` items.
    """
    uniform = 0.0
    if num_extra:
        if num_items is None or extra_probs is None:
            raise ValueError(
                "`num_items` and `extra_probs` are required with extra negatives and the "
                "logQ correction. Received: "
                f"num_items={num_items!r}, extra_probs={'set' if extra_probs is not None else None}."
            )
        uniform = num_extra / num_items
        probs = torch.cat([candidate_probs, extra_probs])
    else:
        probs = candidate_probs
    return torch.log(batch * probs + uniform + 1e-12)[None, :]


def full_softmax_loss(
    queries: Tensor,
    items: Tensor,
    targets: Tensor,
    *,
    temperature: float | Tensor = 0.05,
    other_positives: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Softmax over the whole catalogue: every item is a negative, none is sampled.

    Exact where the in-batch loss estimates, so no logQ correction is needed; it costs
    one candidate-tower pass over the catalogue per step, which pays for catalogues up
    to some tens of thousands of items. Row 0 of ``items`` (the out-of-vocabulary item)
    is never a negative.

    Args:
        queries: ``[B, D]`` query embeddings.
        items: ``[N, D]`` embeddings of every item, row ``j`` is item index ``j``.
        targets: ``[B]`` item index of each row's positive.
        temperature: logits are divided by it.
        other_positives: ``[B, L]`` item indices (0 = padding) the row's user also
            interacted with; they are removed from that row's negatives, since they are
            not negatives.
        weights: ``[B]`` per-example weights; the loss is the weighted mean.

    Returns:
        A scalar loss.
    """
    # Scaling the queries costs B x D where scaling the logits costs B x N.
    logits = (queries / temperature) @ items.T  # (B, D) @ (D, N) -> (B, N)
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[:, 0] = True
    if other_positives is not None and other_positives.shape[1]:
        masked.scatter_(1, other_positives, True)
    rows = torch.arange(queries.shape[0], device=queries.device)
    masked[rows, targets] = False
    logits = logits.masked_fill(masked, _MASKED)
    losses = F.cross_entropy(logits, targets, reduction="none")
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


def multi_positive_softmax_loss(
    queries: Tensor,
    candidates: Tensor,
    rows: Tensor,
    columns: Tensor,
    *,
    temperature: float | Tensor = 0.05,
    log_q: Tensor | None = None,
    excluded_column: int | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Softmax over a shared candidate set, with many positives per query.

    The multinomial likelihood of Mult-DAE (Liang et al., WWW 2018): each query spreads
    one softmax over the candidates and every positive pair ``(rows[k], columns[k])``
    adds ``-log p`` of its candidate. The candidates are the whole catalogue (exact) or
    a sample such as the batch's items, whose ``log_q`` (log of each candidate's chance
    to be in the sample) is subtracted from the logits.

    Args:
        queries: ``[B, D]`` query embeddings.
        candidates: ``[M, D]`` candidate embeddings.
        rows: ``[P]`` query row of each positive pair.
        columns: ``[P]`` candidate row of each positive pair.
        temperature: logits are divided by it.
        log_q: ``[M]`` sampling log-probability of each candidate, or None.
        excluded_column: a candidate that is never scored (the OOV item), or None.
        weights: ``[P]`` per-pair weights; the loss is the weighted mean over pairs.

    Returns:
        A scalar loss.
    """
    logits = queries @ candidates.T / temperature  # (B, D) @ (D, M) -> (B, M)
    if log_q is not None:
        logits = logits - log_q[None, :]
    if excluded_column is not None:
        column = torch.tensor([excluded_column], device=logits.device)
        logits = logits.index_fill(1, column, _MASKED)
    log_probs = torch.log_softmax(logits, dim=1)[rows, columns]  # (P,)
    if weights is None:
        return -log_probs.mean()
    return -(log_probs * weights).sum() / weights.sum().clamp_min(1e-12)


def log_inclusion_probability(
    probs: Tensor, num_draws: int, *, num_uniform: int = 0, num_items: int = 1
) -> Tensor:
    """log of each item's chance to be among ``num_draws`` draws from the training rows
    (and ``num_uniform`` uniform draws over ``num_items`` items).

    The logQ term of :func:`multi_positive_softmax_loss` when the candidates are the
    distinct items of a batch: an item with training share ``p`` is in the sample with
    probability ``1 - (1 - p) ** num_draws * (1 - 1 / num_items) ** num_uniform``.

    Args:
        probs: ``[M]`` training share of each candidate item.
        num_draws: how many training rows the batch drew.
        num_uniform: how many extra items were drawn uniformly.
        num_items: how many items the uniform draws chose from.

    Returns:
        ``[M]`` log-probabilities.
    """
    probs = probs.clamp(1e-12, 1 - 1e-7)
    log_missed = float(num_draws) * torch.log1p(-probs)
    if num_uniform > 0 and num_items > 1:
        log_missed = log_missed + num_uniform * math.log1p(-1.0 / num_items)
    return torch.log(-torch.expm1(log_missed))
