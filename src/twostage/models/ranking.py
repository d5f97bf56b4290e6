"""The ranking network: per-field embeddings, a DCN-v2 cross network, two heads.

The ranker scores a (query, candidate) pair from the same feature dicts the retrieval
towers take. Every field is embedded as :class:`~twostage.models.towers.Tower` does
(IDs and categoricals by a table, bags of indices by a mean, numbers by a linear map)
and the user's recent items are pooled (SVD++'s implicit feedback, Koren, KDD 2008).
The concatenation ``x0`` optionally carries dense extras from the retrieval stage (its
score and both tower embeddings) and feeds:

* ``architecture="dcn"``: a DCN-v2 cross network (Wang et al., WWW 2021),
  ``x_{l+1} = x0 * (W x_l + b) + x_l`` with a full-rank ``W``, beside (``parallel``) or
  before (``stacked``) a ReLU MLP;
* ``architecture="mlp"``: the MLP alone, the TFRS basic ranking model when it sees
  only the two ID embeddings (``hidden_dims=(256, 64)``, no biases, no history).

Two heads read the result. ``rating`` adds a global mean, learned user and item
biases and a factorisation term (the dot product of the summed query-side and
candidate-side embeddings), which is what carries most of the signal on MovieLens;
``click`` is a logit with a learned item bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from twostage.errors import ConfigError
from twostage.models.towers import HISTORY, FieldInfo, HistoryPooling

__all__ = ["CrossLayer", "CrossNetwork", "RankingModel", "SideEmbedding"]

Architecture = Literal["dcn", "mlp"]
Structure = Literal["parallel", "stacked"]


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l``.

    Args:
        width: size of ``x0`` and ``x_l``; ``W`` is a full-rank ``[width, width]``.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        """``x0``, ``x``: ``[B, width]`` -> ``[B, width]``."""
        return x0 * self.linear(x) + x


class CrossNetwork(nn.Module):
    """``num_layers`` cross layers applied to the same ``x0``; 0 layers is identity."""

    def __init__(self, width: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(width) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        """``x0``: ``[B, width]`` -> ``[B, width]``."""
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


def _mlp(width: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    return nn.Sequential(*layers)


class SideEmbedding(nn.Module):
    """Embeds every field of one side into ``[B, num_parts, dim]`` (no mixing).

    Args:
        fields: the side's fields, as the retrieval towers get them.
        dim: width of every field vector.
        history: pools the ``history`` entry of the dict as one more part.
        init_std: standard deviation of the embedding tables' initial values.
    """

    def __init__(
        self,
        fields: Sequence[FieldInfo],
        *,
        dim: int,
        history: HistoryPooling | None = None,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.fields = list(fields)
        self.embeddings = nn.ModuleDict()
        for info in self.fields:
            module: nn.Module
            if info.kind == "index":
                module = nn.Embedding(info.num_embeddings, dim)
                nn.init.normal_(module.weight, std=init_std)
            elif info.kind == "indices":
                module = nn.EmbeddingBag(
                    info.num_embeddings, dim, mode="mean", padding_idx=0
                )
                nn.init.normal_(module.weight, std=init_std)
                with torch.no_grad():
                    module.weight[0].zero_()
            else:
                module = nn.Linear(info.width, dim)
            self.embeddings[info.name] = module
        self.history = history
        self.num_parts = len(self.fields) + (history is not None)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """``features``: field name -> ``[B]`` / ``[B, L]`` / ``[B, width]``.

        Returns:
            ``[B, num_parts, dim]``, fields in order, then the pooled history.
        """
        parts = []
        for info in self.fields:
            value = features[info.name]
            if info.kind == "dense" and value.dim() == 1:
                value = value.unsqueeze(-1)
            parts.append(self.embeddings[info.name](value))
        if self.history is not None:
            parts.append(self.history(features[HISTORY]))
        return torch.stack(parts, dim=1)


class Side(NamedTuple):
    """One side of a batch, embedded: what :meth:`RankingModel.combine` reads.

    Attributes:
        vector: ``[B, num_parts * dim]`` concatenated field vectors.
        factor: ``[B, dim]`` sum of the field vectors (the factorisation term's side).
        rating_bias: ``[B]`` learned rating bias of the ID (zeros without biases).
        click_bias: ``[B]`` learned click bias (candidate side; zeros otherwise).
    """

    vector: Tensor
    factor: Tensor
    rating_bias: Tensor
    click_bias: Tensor

    def expand(self, repeats: int) -> Side:
        """Each row repeated ``repeats`` times in a row: ``[B, ...] -> [B * repeats, ...]``."""
        return Side(*(t.repeat_interleave(repeats, dim=0) for t in self))


class RankingModel(nn.Module):
    """Scores (query, candidate) pairs: ``{"rating": [B], "click": [B]}``.

    Args:
        query_fields: fields of the query side (``user_id`` first when present).
        candidate_fields: fields of the candidate side.
        user_field: name of the user ID field (its index keys the user bias).
        item_field: name of the item ID field (its index keys the item biases).
        num_users: rows of the user vocabulary.
        num_items: rows of the item vocabulary (also the history's embedding table).
        embedding_dim: width of every field vector.
        architecture: ``dcn`` (cross network plus MLP) or ``mlp`` (MLP only).
        cross_layers: number of cross layers (``dcn`` only).
        structure: cross network beside (``parallel``) or before (``stacked``) the MLP.
        hidden_dims: widths of the MLP's hidden layers.
        dropout: dropout after each hidden layer and on ``x0``.
        use_history: pool the query's ``history`` entry into one more query part.
        use_biases: global mean, user and item biases and the factorisation term.
        extra_dim: width ``D`` of the retrieval embeddings fed as extras; 0: none.
        rating_mean: initial global mean rating.
    """

    def __init__(
        self,
        query_fields: Sequence[FieldInfo],
        candidate_fields: Sequence[FieldInfo],
        *,
        user_field: str,
        item_field: str,
        num_users: int,
        num_items: int,
        embedding_dim: int = 32,
        architecture: Architecture = "dcn",
        cross_layers: int = 2,
        structure: Structure = "parallel",
        hidden_dims: Sequence[int] = (256, 64),
        dropout: float = 0.0,
        use_history: bool = True,
        use_biases: bool = True,
        extra_dim: int = 0,
        rating_mean: float = 0.0,
    ) -> None:
        super().__init__()
        if architecture not in ("dcn", "mlp") or structure not in (
            "parallel",
            "stacked",
        ):
            raise ConfigError(
                "`architecture` should be dcn or mlp and `structure` parallel or "
                f"stacked. Received: {architecture!r}, {structure!r}."
            )
        self.user_field, self.item_field = user_field, item_field
        self.use_biases, self.extra_dim = use_biases, extra_dim
        history = None
        if use_history:
            history = HistoryPooling(num_items, embedding_dim, max_length=1)
            nn.init.normal_(history.embedding.weight, std=0.05)
            with torch.no_grad():
                history.embedding.weight[0].zero_()
        self.query = SideEmbedding(query_fields, dim=embedding_dim, history=history)
        self.candidate = SideEmbedding(candidate_fields, dim=embedding_dim)
        num_parts = self.query.num_parts + self.candidate.num_parts
        width = num_parts * embedding_dim + (2 * extra_dim + 1 if extra_dim else 0)
        self.input_dropout = nn.Dropout(dropout)
        self.cross = CrossNetwork(width, cross_layers if architecture == "dcn" else 0)
        self.parallel = architecture == "dcn" and structure == "parallel"
        self.deep = _mlp(width, hidden_dims, dropout)
        deep_width = hidden_dims[-1] if hidden_dims else width
        out_width = deep_width + (width if self.parallel else 0)
        self.rating_head = nn.Linear(out_width, 1)
        self.click_head = nn.Linear(out_width, 1)
        self.register_buffer("rating_mean", torch.tensor(float(rating_mean)))
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_items, 1)
        self.item_click_bias = nn.Embedding(num_items, 1)
        for table in (self.user_bias, self.item_bias, self.item_click_bias):
            nn.init.zeros_(table.weight)

    def embed_queries(self, features: dict[str, Tensor]) -> Side:
        """Query feature dict (with ``history`` when used) -> embedded side ``[B, ...]``."""
        parts = self.query(features)  # (B, P, D)
        bias = self.user_bias(features[self.user_field]).squeeze(-1)
        if not self.use_biases:
            bias = torch.zeros_like(bias)
        return Side(parts.flatten(1), parts.sum(1), bias, torch.zeros_like(bias))

    def embed_candidates(self, features: dict[str, Tensor]) -> Side:
        """Candidate feature dict -> embedded side ``[B, ...]``."""
        parts = self.candidate(features)  # (B, P, D)
        ids = features[self.item_field]
        bias = self.item_bias(ids).squeeze(-1)
        if not self.use_biases:
            bias = torch.zeros_like(bias)
        click = self.item_click_bias(ids).squeeze(-1)
        return Side(parts.flatten(1), parts.sum(1), bias, click)

    def combine(
        self, query: Side, candidate: Side, extras: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Both heads on aligned rows.

        Args:
            query: embedded query side, ``B`` rows.
            candidate: embedded candidate side, ``B`` rows.
            extras: ``[B, 2 * extra_dim + 1]`` retrieval score and embeddings, or None.

        Returns:
            ``{"rating": [B], "click": [B]}``: predicted rating and click logit.
        """
        parts = [query.vector, candidate.vector]
        if self.extra_dim:
            if extras is None or extras.shape[-1] != 2 * self.extra_dim + 1:
                got = None if extras is None else tuple(extras.shape)
                raise ConfigError(
                    "this ranker was built with retrieval features: `extras` should "
                    f"be [B, {2 * self.extra_dim + 1}]. Received: {got}."
                )
            parts.append(extras)
        x0 = self.input_dropout(torch.cat(parts, dim=-1))
        crossed = self.cross(x0)
        if self.parallel:
            hidden = torch.cat([crossed, self.deep(x0)], dim=-1)
        else:
            hidden = self.deep(crossed)
        rating = self.rating_head(hidden).squeeze(-1)
        if self.use_biases:
            dot = (query.factor * candidate.factor).sum(-1)
            rating = rating + self.rating_mean + query.rating_bias + dot
            rating = rating + candidate.rating_bias
        click = self.click_head(hidden).squeeze(-1) + candidate.click_bias
        return {"rating": rating, "click": click}

    def forward(
        self,
        query: dict[str, Tensor],
        candidate: dict[str, Tensor],
        *,
        retrieval_score: Tensor | None = None,
        query_embedding: Tensor | None = None,
        candidate_embedding: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Score aligned rows.

        Args:
            query: query feature dict, ``[B]``-leading tensors (``history``: ``[B, L]``).
            candidate: candidate feature dict, ``[B]``-leading tensors.
            retrieval_score: ``[B]`` the retrieval model's score (extras only).
            query_embedding: ``[B, D]`` the retrieval query embedding (extras only).
            candidate_embedding: ``[B, D]`` the retrieval item embedding (extras only).

        Returns:
            ``{"rating": [B], "click": [B]}``.
        """
        extras = None
        if retrieval_score is not None:
            if query_embedding is None or candidate_embedding is None:
                raise ConfigError(
                    "`retrieval_score` comes with `query_embedding` and "
                    "`candidate_embedding`. Received: one of them is None."
                )
            extras = retrieval_extras(
                retrieval_score, query_embedding, candidate_embedding
            )
        return self.combine(
            self.embed_queries(query), self.embed_candidates(candidate), extras
        )


def retrieval_extras(score: Tensor, query: Tensor, candidate: Tensor) -> Tensor:
    """``[B]``, ``[B, D]``, ``[B, D]`` -> ``[B, 2D + 1]`` dense extras of the ranker."""
    return torch.cat([score.unsqueeze(-1), query, candidate], dim=-1)
