"""Causal encoders of a user's recent items: the query tower's ordered history.

A bag of items (:class:`~twostage.models.towers.HistoryPooling`) forgets the order in
which a user met them; under next-item protocols order is most of the signal. These
encoders read the history ``[B, L]`` (item indices, most recent last, 0 = padding) and
return one state per position, each a function of that position's item and the items
before it only: a causal transformer (SASRec, Kang & McAuley, ICDM 2018, with
pre-norm blocks) or a GRU (GRU4Rec, Hidasi et al., ICLR 2016; the TFRS sequential
retrieval tutorial). The last position's state is the query; training reads every
position at once (next-item prediction, :func:`twostage.retrieval.task.sequence_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twostage.models.fields import UNKNOWN_TIME

__all__ = [
    "GAP_BUCKETS",
    "RATING_BUCKETS",
    "SequenceEncoder",
    "causal_mask",
    "gap_buckets",
]

#: Rows of the time-gap table: 0 = no gap known (the first item, padding, a missing
#: time), then one bucket per power of two seconds (1 + floor(log2(1 + gap))).
GAP_BUCKETS = 34
#: Rows of the rating table: 0 = rating not known (padding, a session entry, a row
#: without a rating), then one bucket per level of the training log's ratings
#: (:func:`twostage.retrieval.tensors.rating_edges`).
RATING_BUCKETS = 17


def gap_buckets(history: Tensor, times: Tensor) -> Tensor:
    """``[B, L]`` bucket of the time since the previous item at each position.

    The gap of position ``i`` is ``times[i] - times[i - 1]`` (in seconds; the history
    is oldest first), bucketed as ``1 + floor(log2(1 + gap))``: 1 for no time
    between them, 2 for 1 or 2 seconds, 3 for 3 to 6... up to ``GAP_BUCKETS - 1``
    (over 2^32 seconds). Bucket 0 where it is not
    known: the first item, padding, or a time equal to
    :data:`~twostage.models.fields.UNKNOWN_TIME` on either side. A negative gap
    (items out of time order) counts as 0 seconds. It reads positions ``i - 1`` and
    ``i`` only, so it stays causal.
    """
    buckets = torch.zeros_like(history)
    if history.shape[1] < 2:
        return buckets
    known = (history > 0) & (times != UNKNOWN_TIME)
    both = known[:, 1:] & known[:, :-1]
    gaps = (times[:, 1:] - times[:, :-1]).clamp_min(0).double()
    value = 1 + torch.floor(torch.log2(1 + gaps)).clamp_max(GAP_BUCKETS - 2).long()
    buckets[:, 1:] = torch.where(both, value, torch.zeros_like(value))
    return buckets


def causal_mask(history: Tensor) -> Tensor:
    """``[B, 1, L, L]`` bool, True where query position ``i`` may read key ``j``:
    ``j <= i`` and ``j`` holds an item. A position always reads itself, so a row of
    padding cannot turn into a softmax over nothing (NaN)."""
    length = history.shape[1]
    positions = torch.arange(length, device=history.device)
    earlier = positions[None, :] <= positions[:, None]  # (L, L): key j <= query i
    real = history > 0  # (B, L)
    # (A comparison, not a boolean torch.eye: ONNX Runtime has no boolean EyeLike.)
    itself = positions[None, :] == positions[:, None]
    allowed = earlier[None] & (real[:, None, :] | itself[None])  # (B, L, L)
    return allowed.unsqueeze(1)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a feed-forward layer."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.attention_norm(x))  # (B, L, 3D)
        # (B, L, 3D) -> 3 x (B, heads, L, D / heads)
        q, k, v = (
            qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        # No dropout on the attention weights: on CPU it costs more than the
        # attention itself ([B, heads, L, L] random draws); the residual paths keep
        # theirs.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(
            self.out(attended.transpose(1, 2).reshape(batch, length, dim))
        )
        return x + self.drop(self.feed_forward(self.feed_forward_norm(x)))


class SequenceEncoder(nn.Module):
    """Encodes ``[B, L]`` recent items into ``[B, L, dim]`` causal states.

    Args:
        num_items: rows of the item table (index 0 is padding).
        dim: width of the item vectors and states.
        max_length: the longest history (positions are counted from the most recent
            item, so a shorter history reads the same position vectors for its last
            items).
        kind: ``transformer`` or ``gru``.
        num_layers: transformer blocks or GRU layers.
        num_heads: attention heads (``dim`` must be a multiple).
        dropout: on the inputs and inside the blocks.
        sparse: the item table produces sparse gradients.
        item_table: read the items from this table (the candidate tower's item ID
            table: input and output embeddings tied, as in SASRec) instead of one
            of its own. Padding reads as zeros either way.
        time_gaps: add a learned vector for the time since the previous item
            (:func:`gap_buckets`) to each item's vector; the history's times come
            as a second argument (``[B, L]`` seconds), unknown gaps read bucket 0.
        ratings: add a learned vector for the rating the user gave each history
            item (``[B, L]`` buckets, ``ratings=``; 0 or None: not known, which
            adds nothing).
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        *,
        max_length: int,
        kind: Literal["transformer", "gru"] = "transformer",
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
        sparse: bool = False,
        item_table: nn.Embedding | None = None,
        time_gaps: bool = False,
        ratings: bool = False,
    ) -> None:
        super().__init__()
        self.reads_times = time_gaps
        self.reads_ratings = ratings
        if ratings:
            self.rating = nn.Embedding(RATING_BUCKETS, dim, padding_idx=0)
            nn.init.normal_(self.rating.weight, std=0.01)
            with torch.no_grad():
                self.rating.weight[0].zero_()
        if time_gaps:
            self.gap = nn.Embedding(GAP_BUCKETS, dim)
            nn.init.normal_(self.gap.weight, std=0.01)
        self.kind, self.max_length, self.dim = kind, max_length, dim
        # A shared table belongs to the candidate tower: held outside the module
        # tree, so the weights are saved (and moved, and loaded) once, there.
        self._shared = [item_table] if item_table is not None else []
        # Held the same way: a function of the owner's, not a submodule.
        self._side: list[Callable[[Tensor], Tensor]] = []
        if item_table is None:
            self.embedding = nn.Embedding(num_items, dim, padding_idx=0, sparse=sparse)
            nn.init.normal_(self.embedding.weight, std=0.01)
            with torch.no_grad():
                self.embedding.weight[0].zero_()
        self.drop = nn.Dropout(dropout)
        if kind == "transformer":
            self.position = nn.Embedding(max_length, dim)
            nn.init.normal_(self.position.weight, std=0.01)
            self.blocks = nn.ModuleList(
                _Block(dim, num_heads, dropout) for _ in range(num_layers)
            )
            self.norm = nn.LayerNorm(dim)
        else:
            self.gru = nn.GRU(
                dim,
                dim,
                num_layers=num_layers,
                batch_first=True,
                dropout=dropout if num_layers > 1 else 0.0,
            )

    def read_item_side(self, side: Callable[[Tensor], Tensor]) -> None:
        """Add ``side(history)`` (``[B, L]`` -> ``[B, L, dim]``: the items' side
        features, embedded) to the item vectors from now on."""
        self._side = [side]

    def items(self, history: Tensor) -> Tensor:
        """``[B, L]`` -> ``[B, L, dim]`` item vectors, zeros for padding."""
        if not self._shared and not self._side:
            return self.embedding(history)
        table = self._shared[0] if self._shared else self.embedding
        vectors = table(history)
        if self._side:
            vectors = vectors + self._side[0](history)
        return vectors * (history > 0).unsqueeze(-1).to(vectors.dtype)

    def states(
        self,
        history: Tensor,
        times: Tensor | None = None,
        ratings: Tensor | None = None,
    ) -> Tensor:
        """``history [B, L]`` (most recent last, 0 = padding) -> ``[B, L, dim]``;
        state ``i`` depends on items ``0..i`` only (and their ``times``, read with
        ``time_gaps``; None: no gap known; and their rating buckets, read with
        ``ratings``; None: none known)."""
        length = history.shape[1]
        x = self.items(history)  # (B, L, D)
        if self.reads_times:
            buckets = (
                torch.zeros_like(history)
                if times is None
                else gap_buckets(history, times)
            )
            x = x + self.gap(buckets) * (history > 0).unsqueeze(-1).to(x.dtype)
        if self.reads_ratings and ratings is not None:
            # Row 0 (not known) is zero and stays so (padding_idx).
            x = x + self.rating(ratings * (history > 0).to(ratings.dtype))
        if self.kind == "gru":
            return self.gru(self.drop(x))[0]
        # The most recent item reads the last row of the position table, so a
        # history shorter than max_length reads the last `length` rows.
        positions = torch.arange(
            self.max_length - length, self.max_length, device=history.device
        )
        x = self.drop(x + self.position(positions))
        mask = causal_mask(history)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(
        self,
        history: Tensor,
        times: Tensor | None = None,
        ratings: Tensor | None = None,
    ) -> Tensor:
        """``[B, L]`` -> ``[B, dim]``: the state after the most recent item."""
        if history.shape[1] == 0:
            return torch.zeros(history.shape[0], self.dim, device=history.device)
        return self.states(history, times, ratings)[:, -1]
