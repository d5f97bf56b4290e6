"""Retrieval training examples and their loss.

``RetrievalTensors`` holds everything batches are gathered from; ``query_features``
gathers a batch's query side; ``UserExamples`` groups the rows by user for
``retrieval.examples=users``. ``interaction_loss`` and ``user_loss`` are the loss of one
batch in each set-up: the training loop in ``twostage.train`` calls one of them per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twostage.config import RetrievalConfig
from twostage.losses import (
    full_softmax_loss,
    in_batch_softmax_loss,
    multi_positive_softmax_loss,
)
from twostage.models.retrieval import RetrievalModel
from twostage.models.towers import HISTORY

__all__ = [
    "RetrievalTensors",
    "UserExamples",
    "interaction_loss",
    "query_features",
    "user_loss",
]


@dataclass
class RetrievalTensors:
    """Everything the training loop gathers batches from.

    Attributes:
        user_features: per-user rows ``[U, ...]`` indexed by ``user_idx``.
        item_features: per-item rows ``[N, ...]`` indexed by ``item_idx``.
        history: ``[U, L]`` each user's most recent training items, most recent last,
            0 = padding; ``[U, 0]`` when the model uses no history.
        users: ``[n]`` user index of each training example.
        items: ``[n]`` item index of each training example.
        weights: ``[n]`` example weights, or None.
        item_probs: ``[N]`` share of the training examples of each item (logQ).
        user_id_field: name of the user ID field (dropped to OOV for ID dropout).
    """

    user_features: dict[str, Tensor]
    item_features: dict[str, Tensor]
    history: Tensor
    users: Tensor
    items: Tensor
    weights: Tensor | None
    item_probs: Tensor
    user_id_field: str | None = "user_id"

    def to(self, device: torch.device) -> RetrievalTensors:
        """A copy with every tensor on ``device``."""

        def move(values: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device) for k, v in values.items()}

        return RetrievalTensors(
            user_features=move(self.user_features),
            item_features=move(self.item_features),
            history=self.history.to(device),
            users=self.users.to(device),
            items=self.items.to(device),
            weights=None if self.weights is None else self.weights.to(device),
            item_probs=self.item_probs.to(device),
            user_id_field=self.user_id_field,
        )

    @property
    def num_examples(self) -> int:
        return int(self.users.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_probs.shape[0])


def query_features(
    tensors: RetrievalTensors,
    users: Tensor,
    *,
    exclude_items: Tensor | None = None,
    drop_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Gather the query features of a batch of users.

    Args:
        tensors: the prepared tables.
        users: ``[B]`` user indices.
        exclude_items: ``[B]`` item per row to remove from that row's history (the
            training target, so the model cannot see the answer).
        drop_ids: ``[B]`` bool; where True, the user ID becomes OOV (0) and the history
            is emptied, which trains the cold-start path.
    """
    features = {name: values[users] for name, values in tensors.user_features.items()}
    history = tensors.history[users]
    if exclude_items is not None and history.shape[1]:
        history = history.masked_fill(history == exclude_items[:, None], 0)
    if drop_ids is not None:
        if tensors.user_id_field in features:
            ids = features[tensors.user_id_field]
            features[tensors.user_id_field] = ids.masked_fill(drop_ids, 0)
        history = history.masked_fill(drop_ids[:, None], 0)
    features[HISTORY] = history
    return features


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
) -> Tensor:
    """Query embeddings of a training batch: ID dropout, then history dropout."""
    drop = None
    if model_config.id_dropout > 0:
        drop = torch.rand(len(users), generator=generator) < model_config.id_dropout
        drop = drop.to(users.device)
    features = query_features(
        tensors, users, exclude_items=exclude_items, drop_ids=drop
    )
    history = features[HISTORY]
    if model_config.history_dropout > 0 and history.shape[1]:
        hidden = torch.rand(history.shape, generator=generator)
        hidden = hidden < model_config.history_dropout
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
    fresh draw of ``retrieval.max_positives_per_user`` of them)."""
    users = by_user.users[batch]
    queries = training_queries(model, model_config, tensors, users, generator)
    rows, train_rows = by_user.rows_of(
        users,
        max_per_user=model_config.max_positives_per_user,
        generator=generator,
    )
    items = tensors.items[train_rows]
    weights = tensors.weights[train_rows] if tensors.weights is not None else None
    if model_config.negatives == "full":
        return multi_positive_softmax_loss(
            queries,
            model.encode_items(tensors.item_features),
            rows,
            items,
            temperature=model.temperature,
            excluded_column=0,
            weights=weights,
        )
    # The candidates are the distinct items of the batch's users.
    sample, columns = torch.unique(items, return_inverse=True)
    log_q = None
    if model_config.logq_correction:
        # Chance that an item is among `len(items)` draws from the training rows.
        draws = float(len(items))
        probs = tensors.item_probs[sample].clamp(1e-12, 1 - 1e-7)
        log_q = torch.log(-torch.expm1(draws * torch.log1p(-probs)))
        log_q = model_config.logq_weight * log_q
    return multi_positive_softmax_loss(
        queries,
        model.encode_items({k: v[sample] for k, v in tensors.item_features.items()}),
        rows,
        columns,
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
    users, items = tensors.users[batch], tensors.items[batch]
    queries = training_queries(
        model, model_config, tensors, users, generator, exclude_items=items
    )
    weights = tensors.weights[batch] if tensors.weights is not None else None
    if model_config.negatives == "full":
        others = None
        if model_config.mask_seen_negatives:
            others = tensors.history[users]
        return full_softmax_loss(
            queries,
            model.encode_items(tensors.item_features),
            items,
            temperature=model.temperature,
            other_positives=others,
            weights=weights,
        )
    candidates = model.encode_items(
        {k: v[items] for k, v in tensors.item_features.items()}
    )
    extra = extra_ids = extra_probs = None
    if model_config.num_extra_negatives > 0:
        # Uniform over the real items (index 0 is the OOV row).
        extra_ids = torch.randint(
            1,
            tensors.num_items,
            (model_config.num_extra_negatives,),
            generator=generator,
        ).to(batch.device)
        extra = model.encode_items(
            {k: v[extra_ids] for k, v in tensors.item_features.items()}
        )
        extra_probs = tensors.item_probs[extra_ids]
    probs = tensors.item_probs[items] if model_config.logq_correction else None
    return in_batch_softmax_loss(
        queries,
        candidates,
        temperature=model.temperature,
        candidate_ids=items,
        candidate_probs=probs,
        extra_candidates=extra,
        extra_ids=extra_ids,
        extra_probs=extra_probs if probs is not None else None,
        num_items=tensors.num_items,
        weights=weights,
        correction_weight=model_config.logq_weight,
    )


def tensors_to_flat(tensors: RetrievalTensors) -> dict[str, torch.Tensor]:
    """The trainer's tables as one flat dict for safetensors."""
    flat = {
        "history": tensors.history,
        "users": tensors.users,
        "items": tensors.items,
        "item_probs": tensors.item_probs,
    }
    if tensors.weights is not None:
        flat["weights"] = tensors.weights
    flat.update({f"user.{k}": v for k, v in tensors.user_features.items()})
    flat.update({f"item.{k}": v for k, v in tensors.item_features.items()})
    return {k: v.contiguous() for k, v in flat.items()}


def tensors_from_flat(flat: dict[str, torch.Tensor]) -> RetrievalTensors:
    """Inverse of :func:`tensors_to_flat`."""
    return RetrievalTensors(
        user_features={k[5:]: v for k, v in flat.items() if k.startswith("user.")},
        item_features={k[5:]: v for k, v in flat.items() if k.startswith("item.")},
        history=flat["history"],
        users=flat["users"],
        items=flat["items"],
        weights=flat.get("weights"),
        item_probs=flat["item_probs"],
    )
