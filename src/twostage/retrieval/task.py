"""The retrieval task: the loss of a training batch in each example mode, and the same
loss on held-out pairs.

``retrieval.examples=interactions``: one example per training row
(:func:`interaction_loss`); ``retrieval.examples=users``: one per user, every training
item a positive (:class:`UserExamples`, :func:`user_loss`); ``retrieval.examples=
sequences``: one per user, the next item at every position (:func:`sequence_loss`). The loss functions and
every logQ variant are in :mod:`twostage.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twostage import distributed
from twostage.config import ExperimentConfig, RetrievalConfig
from twostage.losses import (
    full_softmax_loss,
    in_batch_softmax_loss,
    log_inclusion_probability,
    multi_positive_softmax_loss,
)
from twostage.models.fields import HISTORY, HISTORY_RATINGS, HISTORY_TIMES
from twostage.models.retrieval import RetrievalModel
from twostage.retrieval.tensors import RetrievalTensors, query_features

__all__ = [
    "UserExamples",
    "interaction_loss",
    "sequence_loss",
    "training_queries",
    "user_loss",
    "validation_loss",
]


@dataclass
class UserExamples:
    """The training rows grouped by user, for ``retrieval.examples=users``.

    Attributes:
        users: ``[M]`` every user with at least one training row: one example each.
        order: ``[n]`` training row numbers sorted by user.
        starts: ``[U]`` where each user's rows begin in ``order``.
        counts: ``[U]`` how many training rows each user has.
    """

    users: Tensor
    order: Tensor
    starts: Tensor
    counts: Tensor

    @classmethod
    def of(cls, tensors: RetrievalTensors) -> UserExamples:
        num_users = int(tensors.history.shape[0])
        order = torch.argsort(tensors.users, stable=True)
        counts = torch.bincount(tensors.users, minlength=num_users)
        starts = torch.cumsum(counts, 0) - counts
        return cls(torch.nonzero(counts).squeeze(1), order, starts, counts)

    def rows_of(
        self,
        users: Tensor,
        *,
        max_per_user: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(batch_row, training_row)`` of every training row of ``users``.

        Args:
            users: ``[B]`` user indices.
            max_per_user: > 0 keeps at most that many rows of each user, drawn
                uniformly without replacement with ``generator``; 0 keeps all.
            generator: the random source of the draw.
        """
        counts = self.counts[users]
        starts = torch.cumsum(counts, 0) - counts  # each user's first batch position
        batch_rows = torch.repeat_interleave(
            torch.arange(len(users), device=users.device), counts
        )
        offset = torch.arange(len(batch_rows), device=users.device) - starts[batch_rows]
        train_rows = self.order[self.starts[users][batch_rows] + offset]
        if max_per_user <= 0 or int(counts.max()) <= max_per_user:
            return batch_rows, train_rows
        # Shuffle within each user: sort by batch row plus a uniform key in [0, 1);
        # the runs stay in place, so a row's rank in its run is its position minus the
        # run's start. Keep the first `max_per_user` of each run.
        keys = torch.rand(len(batch_rows), generator=generator, dtype=torch.float64)
        order = torch.argsort(batch_rows.double().cpu() + keys).to(batch_rows.device)
        keep = order[offset < max_per_user]
        return batch_rows[keep], train_rows[keep]


def training_queries(
    model: RetrievalModel,
    model_config: RetrievalConfig,
    tensors: RetrievalTensors,
    users: Tensor,
    generator: torch.Generator,
    exclude_items: Tensor | None = None,
    rows: Tensor | None = None,
    shard: tuple[int, int] | None = None,
) -> Tensor:
    """Query embeddings of a training batch: ID dropout, then history dropout.
    ``rows``: the batch's training rows, whose context the queries see. ``shard``:
    ``(offset, global batch size)`` of a data-parallel rank's share, so that the
    dropout draws are the global batch's, sliced (as one process would draw them)."""
    offset, total = shard if shard is not None else (0, len(users))
    share = slice(offset, offset + len(users))
    drop = None
    if model_config.id_dropout > 0:
        drop = torch.rand(total, generator=generator)[share] < model_config.id_dropout
        drop = drop.to(users.device)
    features = query_features(
        tensors, users, exclude_items=exclude_items, drop_ids=drop, rows=rows
    )
    history = features[HISTORY]
    if model_config.history_dropout > 0 and history.shape[1]:
        draw = torch.rand((total, history.shape[1]), generator=generator)
        hidden = draw[share] < model_config.history_dropout
        features[HISTORY] = history.masked_fill(hidden.to(history.device), 0)
    return model.encode_queries(features)


def user_loss(
    model: RetrievalModel,
    model_config: RetrievalConfig,
    tensors: RetrievalTensors,
    by_user: UserExamples,
    batch: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """One example per user: every training item of the user is a positive (or a
    fresh draw of ``retrieval.max_positives_per_user`` of them).

    In a data-parallel run (:mod:`twostage.distributed`) ``batch`` is the global
    batch: this rank's queries are its share of the users, the positives drawn
    for the whole batch are sliced to them, the sampled candidates are the
    distinct items of the whole batch, and the loss is scaled so that DDP's
    averaged gradient is the global batch's (weighted) mean over its pairs."""
    world = distributed.current()
    everyone = by_user.users[batch]
    users, offset = everyone, 0
    if world is not None:
        users = world.shard(everyone)
        offset = world.offset(len(batch))
    queries = training_queries(
        model, model_config, tensors, users, generator, shard=(offset, len(batch))
    )
    # Every pair of the global batch (drawn as one process draws them), then
    # this rank's: every rank knows them all, so no gather is needed.
    all_rows, all_train_rows = by_user.rows_of(
        everyone,
        max_per_user=model_config.max_positives_per_user,
        generator=generator,
    )
    mine = (all_rows >= offset) & (all_rows < offset + len(users))
    rows, train_rows = all_rows[mine] - offset, all_train_rows[mine]
    items = tensors.items[train_rows]
    weights = tensors.weights[train_rows] if tensors.weights is not None else None
    if not len(rows):  # this rank's share holds no pair
        return queries.sum() * 0.0  # no loss, and a gradient (of zeros) for DDP
    if model_config.negatives == "full":
        loss = multi_positive_softmax_loss(
            queries,
            model.encode_items(tensors.item_features),
            rows,
            items,
            temperature=model.temperature,
            excluded_column=0,
            weights=weights,
        )
    else:
        # The candidates are the distinct items of the batch's users.
        loss = _distinct_items_softmax(
            model,
            model_config,
            tensors,
            queries,
            rows,
            items,
            weights=weights,
            batch_items=tensors.items[all_train_rows] if world is not None else None,
        )
    if world is None:
        return loss
    if tensors.weights is None:
        return _rank_share(loss, len(rows), len(all_rows))
    weights_of = tensors.weights
    return _rank_share(
        loss, weights_of[train_rows].sum(), weights_of[all_train_rows].sum()
    )


def _rank_share(loss: Tensor, share: float | Tensor, total: float | Tensor) -> Tensor:
    """A rank's mean ``loss`` over its ``share`` of the global batch's ``total``
    (pairs, positions, or their weights) as its part of the global mean: DDP
    averages the ranks' gradients, so each is scaled by ``size * share / total``."""
    world = distributed.current()
    assert world is not None
    return loss * (float(share) * world.size / max(float(total), 1e-12))


def _uniform_negatives(
    model_config: RetrievalConfig,
    tensors: RetrievalTensors,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor | None:
    """``[M]`` ``retrieval.num_extra_negatives`` items drawn uniformly over the real
    items (index 0 is the OOV row), or None."""
    if model_config.num_extra_negatives <= 0:
        return None
    draws = torch.randint(
        1, tensors.num_items, (model_config.num_extra_negatives,), generator=generator
    )
    return draws.to(device)


def _distinct_items_softmax(
    model: RetrievalModel,
    model_config: RetrievalConfig,
    tensors: RetrievalTensors,
    queries: Tensor,
    rows: Tensor,
    items: Tensor,
    *,
    weights: Tensor | None = None,
    extra: Tensor | None = None,
    batch_items: Tensor | None = None,
) -> Tensor:
    """The softmax of ``queries [B, D]`` over the distinct items of the positives
    ``(rows [P], items [P])`` (and the ``extra [M]`` uniform draws), each
    candidate's chance to be in that sample subtracted (logQ). ``batch_items``:
    the positives of the whole global batch when ``items`` are one rank's share
    of it (data-parallel), whose distinct items are then the candidates."""
    drawn = items if batch_items is None else batch_items
    pooled = drawn if extra is None else torch.cat([drawn, extra])
    sample = torch.unique(pooled)
    log_q = None
    if model_config.logq_correction:
        log_q = log_inclusion_probability(
            tensors.item_probs[sample],
            len(drawn),
            num_uniform=0 if extra is None else len(extra),
            num_items=tensors.num_items - 1,  # the uniform draws skip the OOV row
        )
        log_q = model_config.logq_weight * log_q
    return multi_positive_softmax_loss(
        queries,
        model.encode_items({k: v[sample] for k, v in tensors.item_features.items()}),
        rows,
        torch.searchsorted(sample, items),
        temperature=model.temperature,
        log_q=log_q,
        weights=weights,
    )


def interaction_loss(
    model: RetrievalModel,
    model_config: RetrievalConfig,
    tensors: RetrievalTensors,
    batch: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """One example per training row: the query (history without the row's item) must
    pick the row's item among the batch's (and the extra) candidates, or the whole
    catalogue with ``negatives=full``.

    In a data-parallel run (:mod:`twostage.distributed`) ``batch`` is the global batch:
    this rank's queries are its share, the in-batch candidates those of every rank,
    and the loss is scaled so that DDP's averaged gradient is the global batch's.
    """
    world = distributed.current()
    local, offset = batch, 0
    normaliser: float | Tensor | None = None
    if world is not None:
        sizes = world.sizes(len(batch))
        local = world.shard(batch)
        offset = world.offset(len(batch))
        normaliser = len(batch) / world.size
        if tensors.weights is not None:
            total = distributed.gather_rows(tensors.weights[local], sizes).sum()
            normaliser = total.clamp_min(1e-12) / world.size
    users, items = tensors.users[local], tensors.items[local]
    queries = training_queries(
        model,
        model_config,
        tensors,
        users,
        generator,
        exclude_items=items,
        rows=local,
        shard=(offset, len(batch)),
    )
    weights = tensors.weights[local] if tensors.weights is not None else None
    if model_config.negatives == "full":
        others = None
        if model_config.mask_seen_negatives:
            others = tensors.history[users]
        loss = full_softmax_loss(
            queries,
            model.encode_items(tensors.item_features),
            items,
            temperature=model.temperature,
            other_positives=others,
            weights=weights,
        )
        if normaliser is None or not len(local):
            return loss
        # The rank's mean over its share, as its share of the global mean.
        share = len(local) if weights is None else weights.sum()
        return loss * share / normaliser
    candidates = model.encode_items(
        {k: v[items] for k, v in tensors.item_features.items()}
    )
    candidate_ids = items
    if world is not None:  # the whole global batch's candidates
        candidates = distributed.gather_rows(candidates, sizes)
        candidate_ids = distributed.gather_rows(items, sizes)
    extra = extra_probs = None
    extra_ids = _uniform_negatives(model_config, tensors, generator, batch.device)
    if extra_ids is not None:
        extra = model.encode_items(
            {k: v[extra_ids] for k, v in tensors.item_features.items()}
        )
        extra_probs = tensors.item_probs[extra_ids]
    probs = tensors.item_probs[candidate_ids] if model_config.logq_correction else None
    return in_batch_softmax_loss(
        queries,
        candidates,
        temperature=model.temperature,
        candidate_ids=candidate_ids,
        candidate_probs=probs,
        extra_candidates=extra,
        extra_ids=extra_ids,
        extra_probs=extra_probs if probs is not None else None,
        num_items=tensors.num_items,
        weights=weights,
        correction_weight=model_config.logq_weight,
        positive_offset=offset,
        normaliser=normaliser,
    )


def sequence_loss(
    model: RetrievalModel,
    model_config: RetrievalConfig,
    tensors: RetrievalTensors,
    batch: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """One example per window of a user's training items (``tensors.sequences``):
    next-item prediction at every position at once. The query after the items
    before position ``i`` must pick item ``i`` (the user's first item from the side
    features alone) among the whole catalogue (``negatives=full``) or the batch's
    distinct targets plus ``num_extra_negatives`` uniform draws, logQ corrected.

    In a data-parallel run (:mod:`twostage.distributed`) ``batch`` is the global
    batch: this rank trains on its share of the windows, the sampled candidates
    are the distinct targets of every rank's share, and the loss is scaled so
    that DDP's averaged gradient is the global batch's mean over its positions."""
    world = distributed.current()
    local, offset = batch, 0
    if world is not None:
        local = world.shard(batch)
        offset = world.offset(len(batch))
    windows = tensors.sequences[local]  # (B, L + 1): the lead, then the targets
    users = tensors.sequence_users[local]
    features = query_features(tensors, users)
    if model_config.id_dropout > 0 and tensors.user_id_field in features:
        # The global batch's draws, sliced: as one process would draw them.
        draws = torch.rand(len(batch), generator=generator)
        drop = draws[offset : offset + len(local)] < model_config.id_dropout
        ids = features[tensors.user_id_field]
        features[tensors.user_id_field] = ids.masked_fill(drop.to(ids.device), 0)
    targets = windows[:, 1:]  # (B, L), most recent last
    features[HISTORY] = windows[:, :-1]  # what precedes each target
    if tensors.sequence_times.numel():
        features[HISTORY_TIMES] = tensors.sequence_times[batch][:, :-1]
    if tensors.sequence_ratings.numel():
        features[HISTORY_RATINGS] = tensors.sequence_ratings[batch][:, :-1]
    states = model.encode_query_positions(features)  # (B, L, D)
    where = targets > 0
    queries, positives = states[where], targets[where]  # (P, D), (P,)
    # Every rank's positions (a collective: each rank calls it once a step).
    sizes = None if world is None else distributed.gather_sizes(len(positives))
    # The sampled candidates are drawn and gathered before a rank may leave with
    # no position: every rank's uniform draws stay the same, and none skips the
    # collective.
    extra = batch_items = None
    if model_config.negatives != "full":
        extra = _uniform_negatives(model_config, tensors, generator, positives.device)
        if sizes is not None:
            batch_items = distributed.gather_rows(positives, sizes)
    if not len(positives):  # this rank's share holds no position
        return states.sum() * 0.0  # no loss, and a gradient (of zeros) for DDP
    if model_config.negatives == "full":
        others = None
        if model_config.mask_seen_negatives:
            rows = torch.nonzero(where)[:, 0]
            # (P, L): the user's latest training items (the history), all of them
            # positives of this user, not negatives.
            others = tensors.history[users[rows]]
        loss = full_softmax_loss(
            queries,
            model.encode_items(tensors.item_features),
            positives,
            temperature=model.temperature,
            other_positives=others,
        )
    else:
        rows = torch.arange(len(positives), device=positives.device)
        loss = _distinct_items_softmax(
            model,
            model_config,
            tensors,
            queries,
            rows,
            positives,
            extra=extra,
            batch_items=batch_items,
        )
    if sizes is None:
        return loss
    return _rank_share(loss, len(positives), sum(sizes))


def validation_loss(
    model: RetrievalModel,
    tensors: RetrievalTensors,
    users: torch.Tensor,
    items: torch.Tensor,
    config: ExperimentConfig,
) -> float:
    """The training loss (same batch size, logQ, no dropout) on held-out pairs."""
    if len(users) == 0:
        return float("nan")
    total, count = 0.0, 0
    size = config.train.batch_size
    probs = tensors.item_probs if config.retrieval.logq_correction else None
    with torch.no_grad():
        for start in range(0, len(users), size):
            u, i = users[start : start + size], items[start : start + size]
            queries = model.encode_queries(query_features(tensors, u))
            candidates = model.encode_items(
                {n: v[i] for n, v in tensors.item_features.items()}
            )
            loss = in_batch_softmax_loss(
                queries,
                candidates,
                temperature=model.temperature,
                candidate_ids=i,
                candidate_probs=None if probs is None else probs[i],
                correction_weight=config.retrieval.logq_weight,
            )
            total += float(loss) * len(u)
            count += len(u)
    return total / count
