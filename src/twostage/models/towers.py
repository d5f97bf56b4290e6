"""Towers: turn feature tensors into L2-normalised embeddings. Nothing else.

A tower embeds every field of its side (an ID, a categorical, a bag of words, a number),
sums or concatenates the field vectors, and maps them to the shared output width with
an MLP or a linear layer (none when a sum already has that width). The query tower can
also pool the user's recent items (YouTube's candidate generation model, Covington et
al., RecSys 2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twostage.errors import ConfigError
from twostage.models.fields import HISTORY, FieldEmbedding, FieldInfo, history_inputs
from twostage.models.sequence import SequenceEncoder

__all__ = ["FieldInfo", "HISTORY", "HistoryPooling", "Tower"]


class HistoryPooling(nn.Module):
    """Pools the embeddings of a user's recent items: mean or attention.

    Attention scores each history item against a learned probe vector plus a learned
    recency bias by position, so recent or distinctive items can weigh more.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        *,
        max_length: int,
        mode: str = "mean",
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.embedding = nn.Embedding(num_items, dim, padding_idx=0, sparse=sparse)
        nn.init.normal_(self.embedding.weight, std=0.01)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        if mode == "attention":
            self.probe = nn.Parameter(torch.zeros(dim))
            self.position_bias = nn.Parameter(torch.zeros(max_length))

    def states(self, history: Tensor) -> Tensor:
        """``[B, L]`` -> ``[B, L, D]``: position ``i`` pools items ``0..i`` (the
        running mean), so the bag model can train on every position of a sequence
        as the ordered encoders do (:mod:`twostage.models.sequence`)."""
        if self.mode != "mean":
            raise ConfigError(
                "training on every position of a sequence needs "
                "`retrieval.history_pooling` = 'mean' or an ordered "
                "`retrieval.query_encoder`. Received: `retrieval.history_pooling` = "
                f"{self.mode!r}."
            )
        mask = (history > 0).float().unsqueeze(-1)  # (B, L, 1)
        sums = (self.embedding(history) * mask).cumsum(1)
        return sums / mask.cumsum(1).clamp_min(1)

    def forward(self, history: Tensor) -> Tensor:
        """``history``: ``[B, L]`` item indices, most recent last, 0 = padding."""
        mask = history > 0  # (B, L)
        vectors = self.embedding(history)  # (B, L, D)
        if self.mode == "mean":
            weights = mask.float()
            return (vectors * weights.unsqueeze(-1)).sum(1) / weights.sum(
                1, True
            ).clamp_min(1)
        length = history.shape[1]
        scores = vectors @ self.probe + self.position_bias[-length:]  # (B, L)
        scores = scores.masked_fill(~mask, -1e9)
        weights = torch.softmax(scores, dim=1) * mask.float()  # empty rows -> zeros
        return (vectors * weights.unsqueeze(-1)).sum(dim=1)


class Tower(FieldEmbedding):
    """Embeds a dict of feature tensors into ``[B, output_dim]`` unit vectors.

    Each field (and the pooled history) becomes an ``embedding_dim`` vector; ``combine``
    concatenates them or sums them before the head (the MLP of ``hidden_dims``, then a
    linear layer to ``output_dim`` unless the width already matches).
    """

    def __init__(
        self,
        fields: Sequence[FieldInfo],
        *,
        embedding_dim: int,
        output_dim: int,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
        combine: Literal["concat", "sum"] = "concat",
        history: HistoryPooling | SequenceEncoder | None = None,
        sparse: bool = False,
    ) -> None:
        super().__init__(
            fields, dim=embedding_dim, history=history, init_std=0.01, sparse=sparse
        )
        self.combine = combine
        width = embedding_dim if combine == "sum" else self.num_parts * embedding_dim
        layers: list[nn.Module] = []
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        if layers or width != output_dim:
            layers.append(nn.Linear(width, output_dim))
        self.head = nn.Sequential(*layers)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self._output(self.parts(features))

    def encode_positions(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, L, output_dim]``: the query after each position of the history
        (``features["history"]`` ``[B, L]``), each seeing that item and the ones
        before it, with the side fields the same at every position."""
        if self.history is None:
            raise ConfigError(
                "training on every position of a sequence needs a history: "
                "`retrieval.history_length` should be positive. Received: 0."
            )
        history = features[HISTORY]
        inputs = history_inputs(self.history, features)
        states = self.history.states(history, **inputs)  # type: ignore[operator]
        fields = self.parts(features, with_history=False)
        parts = [p.unsqueeze(1).expand(-1, history.shape[1], -1) for p in fields]
        return self._output([*parts, states])

    def _output(self, parts: list[Tensor]) -> Tensor:
        """Combine ``[..., D]`` parts, apply the head, normalise."""
        if len(parts) == 1:
            hidden = parts[0]
        elif self.combine == "sum":
            hidden = torch.stack(parts).sum(dim=0)
        else:
            hidden = torch.cat(parts, dim=-1)
        return F.normalize(self.head(hidden), dim=-1)
