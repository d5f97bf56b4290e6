"""The ranking network: per-field embeddings, a DCN-v2 cross network, two heads.

The ranker scores a (query, candidate) pair from the same feature dicts the retrieval
towers take. Every field is embedded by the module the towers use,
:class:`~twostage.models.fields.FieldEmbedding` (IDs and categoricals by a table, bags
of indices by a mean, numbers by a linear map)
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
from twostage.models.cross import CrossLayer, CrossNetwork
from twostage.models.fields import FieldEmbedding, FieldInfo
from twostage.models.towers import HistoryPooling

__all__ = [
    "CrossLayer",
    "CrossNetwork",
    "FirstLayers",
    "RankingModel",
    "SideEmbedding",
]

Architecture = Literal["dcn", "mlp"]
Structure = Literal["parallel", "stacked"]


def _mlp(width: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    return nn.Sequential(*layers)


class SideEmbedding(FieldEmbedding):
    """Embeds every field of one side into ``[B, num_parts, dim]`` (no mixing).

    Args:
        fields: the side's fields, as the retrieval towers get them.
        dim: width of every field vector.
        history: pools the ``history`` entry of the dict as one more part.
        init_std: standard deviation of the embedding tables' initial values.
        sparse: the tables produce sparse gradients (only the rows a batch touched).
    """

    def __init__(
        self,
        fields: Sequence[FieldInfo],
        *,
        dim: int,
        history: HistoryPooling | None = None,
        init_std: float = 0.05,
        sparse: bool = False,
    ) -> None:
        super().__init__(
            fields, dim=dim, history=history, init_std=init_std, sparse=sparse
        )

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, num_parts, dim]``: the fields in order, then the pooled history."""
        return torch.stack(self.parts(features), dim=1)


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


class FirstLayers(NamedTuple):
    """The weights of the layers that read ``x0``, split by where ``x0``'s columns
    come from (see :meth:`RankingModel.first_layers`).

    Attributes:
        query: ``[query columns, F]`` rows for the query's field vectors and retrieval
            embedding.
        item: ``[item columns, F]`` rows for the item's field vectors and retrieval
            embedding.
        score: ``[F]`` the row of the retrieval score (zeros without extras).
        bias: ``[F]`` the layers' biases.
    """

    query: Tensor
    item: Tensor
    score: Tensor
    bias: Tensor


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
        cross_rank: 0 for full-rank cross layers, else the rank of their low-rank
            ``W = U V`` (see :class:`CrossLayer`).
        structure: cross network beside (``parallel``) or before (``stacked``) the MLP.
        hidden_dims: widths of the MLP's hidden layers.
        dropout: dropout after each hidden layer and on ``x0``.
        use_history: pool the query's ``history`` entry into one more query part.
        use_biases: global mean, user and item biases and the factorisation term.
        extra_dim: width ``D`` of the retrieval embeddings fed as extras; 0: none.
        rating_mean: initial global mean rating.
        sparse: every ID-keyed table (fields, history, biases) produces sparse
            gradients, so an optimiser step touches only the batch's rows.
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
        cross_rank: int = 0,
        structure: Structure = "parallel",
        hidden_dims: Sequence[int] = (256, 64),
        dropout: float = 0.0,
        use_history: bool = True,
        use_biases: bool = True,
        extra_dim: int = 0,
        rating_mean: float = 0.0,
        sparse: bool = False,
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
            history = HistoryPooling(
                num_items, embedding_dim, max_length=1, sparse=sparse
            )
            nn.init.normal_(history.embedding.weight, std=0.05)
            with torch.no_grad():
                history.embedding.weight[0].zero_()
        self.embedding_dim = embedding_dim
        self.query = SideEmbedding(
            query_fields, dim=embedding_dim, history=history, sparse=sparse
        )
        self.candidate = SideEmbedding(
            candidate_fields, dim=embedding_dim, sparse=sparse
        )
        num_parts = self.query.num_parts + self.candidate.num_parts
        width = num_parts * embedding_dim + (2 * extra_dim + 1 if extra_dim else 0)
        self.input_dropout = nn.Dropout(dropout)
        self.cross = CrossNetwork(
            width, cross_layers if architecture == "dcn" else 0, cross_rank
        )
        self.parallel = architecture == "dcn" and structure == "parallel"
        self.deep = _mlp(width, hidden_dims, dropout)
        deep_width = hidden_dims[-1] if hidden_dims else width
        out_width = deep_width + (width if self.parallel else 0)
        self.rating_head = nn.Linear(out_width, 1)
        self.click_head = nn.Linear(out_width, 1)
        self.register_buffer("rating_mean", torch.tensor(float(rating_mean)))
        self.user_bias = nn.Embedding(num_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=sparse)
        self.item_click_bias = nn.Embedding(num_items, 1, sparse=sparse)
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
        x0 = self.input_dropout(self._x0(query.vector, candidate.vector, extras))
        crossed = self.cross(x0)
        if self.parallel:
            hidden = torch.cat([crossed, self.deep(x0)], dim=-1)
        else:
            hidden = self.deep(crossed)
        return self._heads(hidden, query, candidate)

    def _x0(self, query: Tensor, candidate: Tensor, extras: Tensor | None) -> Tensor:
        parts = [query, candidate]
        if self.extra_dim:
            if extras is None or extras.shape[-1] != 2 * self.extra_dim + 1:
                got = None if extras is None else tuple(extras.shape)
                raise ConfigError(
                    "this ranker was built with retrieval features: `extras` should "
                    f"be [B, {2 * self.extra_dim + 1}]. Received: {got}."
                )
            parts.append(extras)
        return torch.cat(parts, dim=-1)

    def _heads(self, hidden: Tensor, query: Side, candidate: Side) -> dict[str, Tensor]:
        rating = self.rating_head(hidden).squeeze(-1)
        if self.use_biases:
            dot = (query.factor * candidate.factor).sum(-1)
            rating = rating + self.rating_mean + query.rating_bias + dot
            rating = rating + candidate.rating_bias
        click = self.click_head(hidden).squeeze(-1) + candidate.click_bias
        return {"rating": rating, "click": click}

    def first_layers(self) -> FirstLayers:
        """The layers that read ``x0`` itself, split by the side each column of ``x0``
        comes from (for :meth:`combine_per_query`).

        Those are cross layer 1, and the MLP's first layer when it reads ``x0``
        (parallel structure, or no cross layers). Their outputs are stacked.
        """
        layers: list[tuple[Tensor, Tensor]] = []
        if self.cross.layers:
            cross = self.cross.layers[0]
            assert isinstance(cross, CrossLayer)
            layers.append(cross.matrix())
        if (self.parallel or not self.cross.layers) and len(self.deep):
            deep = self.deep[0]
            assert isinstance(deep, nn.Linear)
            layers.append((deep.weight, deep.bias))
        if not layers:
            raise ConfigError("this ranker has no layer that reads x0 to factor.")
        weight = torch.cat([w for w, _ in layers]).T  # (width, F)
        q = self.query.num_parts * self.embedding_dim
        c = self.candidate.num_parts * self.embedding_dim
        d = self.extra_dim
        # x0 = [query fields (q) | candidate fields (c) | score | query emb (d) | item emb (d)]
        query_rows = [*range(q), *range(q + c + 1, q + c + 1 + d)]
        item_rows = [*range(q, q + c), *range(q + c + 1 + d, q + c + 1 + 2 * d)]
        score = weight[q + c] if d else torch.zeros(weight.shape[1])
        return FirstLayers(
            query=weight[query_rows].contiguous(),
            item=weight[item_rows].contiguous(),
            score=score.contiguous(),
            bias=torch.cat([b for _, b in layers]),
        )

    def combine_per_query(
        self,
        query: Side,
        candidate: Side,
        first: FirstLayers,
        projection: Tensor,
        *,
        query_embedding: Tensor | None = None,
        candidate_embedding: Tensor | None = None,
        retrieval_score: Tensor | None = None,
        per_query: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """:meth:`combine` for ``C`` candidates of each of ``B`` queries (inference).

        The layers that read ``x0`` are linear, so their product splits into a query
        part, computed here once per query instead of once per candidate, and an item
        part (``projection``), which the caller can compute once per item with
        :meth:`project_items`. The result equals :meth:`combine` on the expanded rows
        up to float rounding.

        Args:
            query: embedded query side, ``B`` rows.
            candidate: embedded candidate side, ``B * C`` rows (query-major).
            first: :meth:`first_layers` of this model's current weights.
            projection: ``[B * C, F]`` :meth:`project_items` of the candidates.
            query_embedding: ``[B, D]`` retrieval query embeddings (extras only).
            candidate_embedding: ``[B * C, D]`` retrieval item embeddings (extras only).
            retrieval_score: ``[B * C]`` retrieval scores (extras only).
            per_query: ``[B, F]`` :meth:`project_queries` of these queries, or None to
                compute it here.
        """
        batch = query.vector.shape[0]
        repeats = candidate.vector.shape[0] // max(batch, 1)
        extras = None
        if self.extra_dim:
            if (
                query_embedding is None
                or candidate_embedding is None
                or retrieval_score is None
            ):
                raise ConfigError(
                    "this ranker was built with retrieval features: `query_embedding`, "
                    "`candidate_embedding` and `retrieval_score` are required. "
                    "Received: None."
                )
            extras = retrieval_extras(
                retrieval_score,
                query_embedding.repeat_interleave(repeats, dim=0),
                candidate_embedding,
            )
        if per_query is None:
            per_query = self.project_queries(first, query, query_embedding)
        pre = projection.view(batch, repeats, -1) + per_query[:, None]
        pre = pre.view(batch * repeats, -1)
        if self.extra_dim:
            assert retrieval_score is not None
            pre.addcmul_(retrieval_score[:, None], first.score)
        expanded = query.expand(repeats)
        x0 = self._x0(expanded.vector, candidate.vector, extras)
        width = x0.shape[1]
        if self.cross.layers:
            x = torch.addcmul(x0, x0, pre[:, :width])  # x0 * (W x0 + b) + x0
            for layer in self.cross.layers[1:]:
                x = layer(x0, x)
            deep_pre = pre[:, width:]
        else:
            x, deep_pre = x0, pre
        if self.parallel:
            hidden = torch.cat([x, self._deep_after_first(deep_pre)], dim=-1)
        elif self.cross.layers:
            hidden = self.deep(x)
        else:
            hidden = self._deep_after_first(deep_pre)
        return self._heads(hidden, expanded, candidate)

    def _deep_after_first(self, x: Tensor) -> Tensor:
        """The MLP after its first linear layer (slicing the Sequential would build a
        new module on every call)."""
        for index, module in enumerate(self.deep):
            if index:
                x = module(x)
        return x

    @staticmethod
    def project_queries(
        first: FirstLayers, query: Side, query_embedding: Tensor | None
    ) -> Tensor:
        """``[B, F]``: the query's columns of ``x0`` through the first layers, plus
        their biases. Depends on the query alone, so inference can keep it per user."""
        query_in = query.vector
        if query_embedding is not None:
            query_in = torch.cat([query_in, query_embedding], dim=-1)
        return torch.addmm(first.bias, query_in, first.query)

    @staticmethod
    def project_items(
        first: FirstLayers, candidate: Side, candidate_embedding: Tensor | None
    ) -> Tensor:
        """``[N, F]``: the item's columns of ``x0`` through the first layers, no bias.

        Depends on the item alone, so inference computes it once per item.
        """
        item_in = candidate.vector
        if candidate_embedding is not None:
            item_in = torch.cat([item_in, candidate_embedding], dim=-1)
        return item_in @ first.item

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
