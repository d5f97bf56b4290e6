"""The ranking stage: config, training data, training loop, evaluation, save/load.

The ranker re-scores the retrieval stage's candidates. It learns two objectives from
the training log, weighted by :class:`RankingConfig`:

* ``rating``: mean squared error on the explicit ratings of the training pairs;
* ``click``: binary cross-entropy of observed pairs (label 1) against negatives
  (label 0): hard ones drawn from the retrieval model's top ``hard_negative_pool``
  unseen items of the user, and uniform ones. A draw that is a training pair of the
  user, or the OOV item, is masked out of the loss.

During training the user's history leaves out the target item (as in retrieval
training), so a training pair looks like a test pair: a candidate outside the history.
A narrow hard-negative pool hurts on a random split: the retrieval model's best unseen
items are where the held-out positives are, so the ranker learns to push them down.

Two-stage lists retrieve the top ``num_candidates`` items per user (training items
excluded), then order them by ``click logit + blend_weight * retrieval logit`` (cosine
over the retrieval temperature); ``blend_weight=None`` picks the weight on the
validation carve-out. Pass the retrieval run's own carve-out (see
:func:`twostage.experiment.prepare_split`) as ``validation``: neither stage trained on
it, so neither stage's scores are inflated there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from twostage.config import from_dict, load_config, save_config
from twostage.data.dataset import ITEM, RATING, USER, Dataset
from twostage.data.split import validation_split
from twostage.errors import ArtifactError, ConfigError, DataError
from twostage.experiment import RetrievalRun, test_queries, with_history_of
from twostage.features.fields import Side
from twostage.metrics import MetricAccumulator, UserItems
from twostage.models.ranking import FirstLayers, RankingModel, retrieval_extras
from twostage.models.ranking import Side as EmbeddedSide
from twostage.models.towers import FieldInfo
from twostage.train import ProgressFn, RetrievalTensors, query_features

__all__ = [
    "RankingConfig",
    "RankingRun",
    "auc",
    "build_ranking_model",
    "evaluate_ranking",
    "fit_ranking",
    "load_ranking",
    "mae",
    "rmse",
    "save_ranking",
]

logger = logging.getLogger(__name__)

KS = (1, 5, 10, 50, 100)
BLEND_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
Pairs = tuple[Tensor, Tensor, Tensor]  # [n] user_idx, [n] item_idx, [n] rating (NaN)


@dataclass(frozen=True)
class RankingConfig:
    """Shape of the ranker, its objectives and its optimisation (saved with it).

    Attributes:
        embedding_dim: width of every field vector.
        architecture: ``dcn`` (cross network and MLP) or ``mlp`` (MLP only).
        cross_layers: DCN-v2 cross layers; ``structure``: beside (``parallel``) or
            before (``stacked``) the MLP of ``hidden_dims``, with ``dropout``.
        cross_rank: 0 for full-rank cross layers, else the rank ``r`` of low-rank
            ones (``W = U V``, ``2 r / width`` of the cost).
        use_history: pool the user's recent items (SVD++-like implicit feedback).
        use_biases: global mean, user/item biases and the factorisation term.
        use_retrieval_features: feed the retrieval score and both tower embeddings.
        rating_weight: weight of the rating MSE; ``click_weight``: of the click BCE.
        num_hard_negatives: click negatives per positive drawn from the user's
            ``hard_negative_pool`` best unseen retrieval items; ``num_random_negatives``
            drawn uniformly.
        num_candidates: items retrieved per user before re-ranking (and the default
            of ``Recommender.recommend``). On MovieLens-100k, 100 gave every user the
            same top 10 as 200, at a lower serving cost; 50 changed 11 users' lists.
        blend_weight: weight of the retrieval logit in the re-ranking order; None picks
            it per run from :data:`BLEND_GRID` on validation (set it when
            ``click_weight`` is 0: the click head is then untrained). The default 0.5
            was the best on the MovieLens-100k validation carve-out; per-run picks
            swing between 0.25 and 2 with the seed, as 5% of the data is a noisy judge.
        early_stopping_patience: epochs without a better validation RMSE (click AUC
            without ratings) before stopping; the best epoch's weights are kept.
        validation_fraction: carved out of the training data when :func:`fit_ranking`
            gets no ``validation``.

    ``architecture="mlp"`` with ``use_history``, ``use_biases``,
    ``use_retrieval_features`` off and ``click_weight=0`` is the TFRS basic ranking
    model.
    """

    embedding_dim: int = 32
    architecture: Literal["dcn", "mlp"] = "dcn"
    cross_layers: int = 2
    cross_rank: int = 0
    structure: Literal["parallel", "stacked"] = "parallel"
    hidden_dims: tuple[int, ...] = (256, 64)
    dropout: float = 0.2
    use_history: bool = True
    use_biases: bool = True
    use_retrieval_features: bool = True
    rating_weight: float = 1.0
    click_weight: float = 0.5
    num_hard_negatives: int = 2
    num_random_negatives: int = 2
    hard_negative_pool: int = 500
    num_candidates: int = 100
    blend_weight: float | None = 0.5
    epochs: int = 30
    batch_size: int = 1024
    learning_rate: float = 0.003
    weight_decay: float = 0.0
    early_stopping_patience: int = 3
    validation_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        rules = {
            "architecture": (self.architecture in ("dcn", "mlp"), "dcn or mlp"),
            "structure": (
                self.structure in ("parallel", "stacked"),
                "parallel/stacked",
            ),
            "embedding_dim": (self.embedding_dim >= 1, "a positive integer"),
            "cross_layers": (self.cross_layers >= 0, "a non-negative integer"),
            "cross_rank": (self.cross_rank >= 0, "a non-negative integer"),
            "hidden_dims": (all(h >= 1 for h in self.hidden_dims), "positive widths"),
            "dropout": (0.0 <= self.dropout < 1.0, "in [0, 1)"),
            "rating_weight": (self.rating_weight >= 0, "non-negative"),
            "click_weight": (self.click_weight >= 0, "non-negative"),
            "num_hard_negatives": (self.num_hard_negatives >= 0, "non-negative"),
            "num_random_negatives": (self.num_random_negatives >= 0, "non-negative"),
            "hard_negative_pool": (self.hard_negative_pool >= 1, "positive"),
            "num_candidates": (self.num_candidates >= max(KS), f">= {max(KS)}"),
            "epochs": (self.epochs >= 1, "a positive integer"),
            "batch_size": (self.batch_size >= 1, "a positive integer"),
            "learning_rate": (self.learning_rate > 0, "positive"),
            "weight_decay": (self.weight_decay >= 0, "non-negative"),
            "early_stopping_patience": (self.early_stopping_patience >= 0, ">= 0"),
            "validation_fraction": (0 < self.validation_fraction < 1, "in (0, 1)"),
        }
        for name, (ok, expected) in rules.items():
            if not ok:
                raise ConfigError(
                    f"`{name}` should be {expected}. "
                    f"Received: `{name}` = {getattr(self, name)!r}."
                )
        if self.rating_weight + self.click_weight == 0:
            raise ConfigError(
                "`rating_weight` and `click_weight` should not both be 0: nothing "
                "would be learned. Received: 0 and 0."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RankingConfig:
        """Strict: unknown keys and wrong types are :class:`ConfigError`."""
        return from_dict(cls, values)


def rmse(predicted: Tensor, target: Tensor) -> float:
    """Root mean squared error of two ``[n]`` tensors."""
    return float(torch.sqrt(torch.mean((predicted.double() - target.double()) ** 2)))


def mae(predicted: Tensor, target: Tensor) -> float:
    """Mean absolute error of two ``[n]`` tensors."""
    return float(torch.mean(torch.abs(predicted.double() - target.double())))


def auc(positive: Tensor, negative: Tensor) -> float:
    """P(a random positive outscores a random negative), ties counting 1/2.

    Args:
        positive: ``[p]`` scores of positive examples.
        negative: ``[n]`` scores of negative examples.
    """
    p, n = positive.numel(), negative.numel()
    if p == 0 or n == 0:
        raise DataError(
            "`auc` needs at least one positive and one negative score. "
            f"Received: {p} positive(s), {n} negative(s)."
        )
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    # Mann-Whitney U with 1-based ranks averaged over ties.
    _, inverse, counts = torch.unique_consecutive(
        scores[order], return_inverse=True, return_counts=True
    )
    tie_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = tie_rank[inverse]
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * n))


def build_ranking_model(
    run: RetrievalRun, config: RankingConfig, *, rating_mean: float = 0.0
) -> RankingModel:
    """The ranker for a retrieval run's features (from a saved config, never defaults)."""

    def fields(side: Side) -> list[FieldInfo]:
        return [
            FieldInfo(f.key, f.output, f.num_embeddings or 0, f.width)
            for f in run.spec.describe(side=side)
        ]

    return RankingModel(
        fields("query"),
        fields("candidate"),
        user_field=USER,
        item_field=ITEM,
        num_users=run.spec.vocabulary(USER).size,
        num_items=run.spec.vocabulary(ITEM).size,
        embedding_dim=config.embedding_dim,
        architecture=config.architecture,
        cross_layers=config.cross_layers,
        cross_rank=config.cross_rank,
        structure=config.structure,
        hidden_dims=config.hidden_dims,
        dropout=config.dropout,
        use_history=config.use_history,
        use_biases=config.use_biases,
        extra_dim=run.config.retrieval.output_dim * config.use_retrieval_features,
        rating_mean=rating_mean,
    )


@dataclass
class RankingRun:
    """A trained ranker beside the retrieval run whose candidates it re-scores.

    Attributes:
        config: the ranker's config.
        retrieval: the retrieval run (features, vocabularies, candidate model).
        model: the ranking network.
        tensors: the retrieval run's tables with ``history`` and ``users``/``items``
            (the seen items) from the ranker's training and validation pairs.
        blend_weight: weight of the retrieval logit in the two-stage order.
        rating_bounds: ``(min, max)`` training rating; predictions are clipped to it.
        history: per-epoch training records.
        train_seconds: wall time of :func:`fit_ranking`.
    """

    config: RankingConfig
    retrieval: RetrievalRun
    model: RankingModel
    tensors: RetrievalTensors
    blend_weight: float = 0.0
    rating_bounds: tuple[float, float] = (-math.inf, math.inf)
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    _vectors: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _candidates: tuple[tuple[int, ...], _Inference] | None = field(
        default=None, repr=False
    )
    _weights: tuple[RankingModel, list[Tensor]] | None = field(default=None, repr=False)

    def retrieval_vectors(self) -> tuple[Tensor, Tensor]:
        """``([U, D], [N, D])`` retrieval embeddings of every user and item (cached)."""
        if self._vectors is None:
            users = torch.arange(self.tensors.history.shape[0])
            encode = self.retrieval.model.encode_queries
            with torch.no_grad():
                queries = [
                    encode(query_features(self.tensors, chunk))
                    for chunk in users.split(4096)
                ]
            self._vectors = (torch.cat(queries), self.retrieval.item_embeddings())
        return self._vectors

    def retrieval_scores(self, user_idx: Tensor) -> Tensor:
        """``[B, N]`` retrieval logits (cosine / temperature) of every item."""
        users, items = self.retrieval_vectors()
        temperature = float(self.retrieval.model.temperature)
        return users[user_idx] @ items.T / temperature  # (B, D) @ (D, N) -> (B, N)

    def score(self, user_idx: Tensor, item_idx: Tensor) -> dict[str, Tensor]:
        """Score ``C`` candidates for each of ``B`` users in one forward pass.

        Args:
            user_idx: ``[B]`` int64 user indices (0: unknown user).
            item_idx: ``[B, C]`` int64 item indices.

        Returns:
            ``{"rating": [B, C], "click": [B, C]}``: ratings clipped to the training
            range, click logits.
        """
        if user_idx.dim() != 1 or item_idx.dim() != 2 or len(user_idx) != len(item_idx):
            raise DataError(
                "`user_idx` should be [B] and `item_idx` [B, C]. Received: "
                f"{tuple(user_idx.shape)} and {tuple(item_idx.shape)}."
            )
        if self.model.training:  # eval() walks every module: only when needed
            self.model.eval()
        with torch.no_grad():
            out = _forward(
                self,
                user_idx,
                item_idx,
                exclude_target=False,
                inference=self._inference(),
            )
        low, high = self.rating_bounds
        return {"rating": out["rating"].clamp(low, high), "click": out["click"]}

    def candidate_side(self) -> EmbeddedSide | None:
        """``[N, ...]`` every item's embedded candidate side, for inference.

        Computed once and reused until the weights or the item table change
        (optimiser steps and ``load_state_dict`` bump the parameters' version
        counters), so scoring a user's candidates only gathers rows. Each row equals
        embedding that item alone (per-row lookups and maps): the same bits. None
        when the table would pass ``_ITEM_CACHE_BYTES``: each call then embeds its
        candidates.
        """
        return self._inference().candidates

    def _inference(self) -> _Inference:
        """What inference caches: every item's embedded side, the first layers'
        weights split by side and, for catalogues where it fits, every item's
        projection through them."""
        if self._weights is None or self._weights[0] is not self.model:
            weights = [*self.model.parameters(), *self.model.buffers()]
            self._weights = (self.model, weights)
        features = self.tensors.item_features
        key = (
            id(features),
            id(self.tensors.history),
            *(t._version for t in self._weights[1]),
        )
        if self._candidates is None or self._candidates[0] != key:
            with torch.no_grad():
                self._candidates = (key, self._build_inference())
        return self._candidates[1]

    def _build_inference(self) -> _Inference:
        model = self.model
        first = model.first_layers()
        width = first.item.shape[1]
        user_vectors = item_vectors = None
        if model.extra_dim:
            user_vectors, item_vectors = self.retrieval_vectors()
        # Row widths: field vectors, the factor, two biases.
        item_row = (model.candidate.num_parts + 1) * model.embedding_dim + 2
        query_row = (model.query.num_parts + 1) * model.embedding_dim + 2
        side = projection = None
        num_items = self.tensors.num_items
        if num_items * item_row * 4 <= _ITEM_CACHE_BYTES:
            side = model.embed_candidates(self.tensors.item_features)
            if num_items * width * 4 <= _PROJECTION_CACHE_BYTES:
                projection = model.project_items(first, side, item_vectors)
        users = per_query = None
        num_users = self.tensors.history.shape[0]
        if num_users * (width + query_row) * 4 <= _PROJECTION_CACHE_BYTES:
            chunks = [
                model.embed_queries(query_features(self.tensors, chunk))
                for chunk in torch.arange(num_users).split(4096)
            ]
            users = EmbeddedSide(
                *(torch.cat(parts) for parts in zip(*chunks, strict=True))
            )
            per_query = model.project_queries(first, users, user_vectors)
        return _Inference(side, first, projection, users, per_query)


#: Largest ``[N, F]`` table of item (or user) projections inference keeps: bigger
#: catalogues project the candidates (users) of each call instead.
_PROJECTION_CACHE_BYTES = 256 * 2**20
#: Largest table of every item's embedded side inference keeps: bigger catalogues
#: (1M items with text and genre features take about 650 MB) embed the candidates of
#: each call instead.
_ITEM_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class _Inference:
    """Per-weights caches of inference: every item's side and projection through the
    first layers, and where the table fits, every user's."""

    candidates: EmbeddedSide | None
    first: FirstLayers
    projection: Tensor | None
    users: EmbeddedSide | None = None
    per_query: Tensor | None = None


def _forward(
    run: RankingRun,
    user_idx: Tensor,
    item_idx: Tensor,
    *,
    exclude_target: bool,
    inference: _Inference | None = None,
) -> dict[str, Tensor]:
    """Both heads for ``[B]`` users x ``[B, C]`` items -> ``[B, C]`` each.

    The query side is embedded once per user and repeated over its ``C`` candidates.
    ``exclude_target`` drops each row's first candidate from the user's history.
    ``inference``: the cached item side (:meth:`RankingRun._inference`) to gather
    from, with the first layers factored per query; None embeds the ``B * C``
    candidates here (training, with gradients).
    """
    num_rows, width = item_idx.shape
    model, tensors = run.model, run.tensors
    target = item_idx[:, 0] if exclude_target else None
    flat = item_idx.reshape(-1)
    if inference is not None and target is None:
        per_query = None
        if inference.users is not None and inference.per_query is not None:
            query = EmbeddedSide(
                *(t.index_select(0, user_idx) for t in inference.users)
            )
            per_query = inference.per_query.index_select(0, user_idx)
        else:
            query = model.embed_queries(query_features(tensors, user_idx))
        if inference.candidates is not None:
            candidate = EmbeddedSide(
                *(t.index_select(0, flat) for t in inference.candidates)
            )
        else:
            candidate = model.embed_candidates(
                {k: v[flat] for k, v in tensors.item_features.items()}
            )
        q = c = score = None
        if model.extra_dim:
            users, items = run.retrieval_vectors()
            q, c = users[user_idx], items[flat]
            score = (q.repeat_interleave(width, dim=0) * c).sum(-1)
        if inference.projection is not None:
            projection = inference.projection.index_select(0, flat)
        else:
            projection = model.project_items(inference.first, candidate, c)
        out = model.combine_per_query(
            query,
            candidate,
            inference.first,
            projection,
            query_embedding=q,
            candidate_embedding=c,
            retrieval_score=score,
            per_query=per_query,
        )
        return {k: v.view(num_rows, width) for k, v in out.items()}
    query = model.embed_queries(query_features(tensors, user_idx, exclude_items=target))
    candidate = model.embed_candidates(
        {k: v[flat] for k, v in tensors.item_features.items()}
    )
    extras = None
    if model.extra_dim:
        users, items = run.retrieval_vectors()
        q = users[user_idx].repeat_interleave(width, dim=0)  # (B * C, D)
        c = items[flat]  # (B * C, D)
        extras = retrieval_extras((q * c).sum(-1), q, c)
    out = model.combine(query.expand(width), candidate, extras)
    return {k: v.view(num_rows, width) for k, v in out.items()}


def _top_unseen(
    run: RankingRun, user_idx: Tensor, seen: UserItems, k: int
) -> tuple[Tensor, Tensor]:
    """The retrieval model's best ``k`` items per user, ``seen`` and OOV excluded.

    Args:
        run: supplies the retrieval embeddings.
        user_idx: ``[B]`` user indices.
        seen: ``B`` rows of items to exclude (aligned with ``user_idx``).
        k: list length.

    Returns:
        ``[B, k]`` item_idx (``-1`` once the unseen items run out) and ``[B, k]``
        retrieval logits (``-inf`` there).
    """
    scores = run.retrieval_scores(user_idx)
    scores[:, 0] = -math.inf
    scores[torch.from_numpy(seen.row_ids()), torch.from_numpy(seen.indices)] = -math.inf
    if k > scores.shape[1]:
        scores = F.pad(scores, (0, k - scores.shape[1]), value=-math.inf)
    values, ids = scores.topk(k, dim=1)
    return ids.masked_fill(values == -math.inf, -1), values


def _pairs(run: RetrievalRun, dataset: Dataset, *, known_only: bool) -> Pairs:
    """A dataset's pairs as vocabulary indices (0: unknown) and ratings (NaN: none)."""
    inter = dataset.interactions
    users = torch.from_numpy(run.spec.vocabulary(USER).transform(inter[USER]))
    items = torch.from_numpy(run.spec.vocabulary(ITEM).transform(inter[ITEM]))
    ratings = torch.full((len(users),), math.nan)
    if RATING in inter.columns:
        values = inter[RATING].cast(pl.Float32).fill_null(math.nan).to_numpy()
        ratings = torch.from_numpy(values.copy())
    if not known_only:
        return users, items, ratings
    keep = (users > 0) & (items > 0)
    return users[keep], items[keep], ratings[keep]


def _seen(tensors: RetrievalTensors) -> UserItems:
    """The tables' training items of every user (row = user_idx)."""
    num_users = tensors.history.shape[0]
    return UserItems.from_pairs(
        tensors.users.numpy(), tensors.items.numpy(), num_rows=num_users
    )


def _is_pair(known: Tensor, users: Tensor, items: Tensor, num_items: int) -> Tensor:
    """Whether each (user, item) is among ``known``: sorted ``user * N + item`` keys."""
    keys = users * num_items + items
    pos = torch.searchsorted(known, keys).clamp_(max=max(len(known) - 1, 0))
    return (
        known[pos] == keys if len(known) else torch.zeros_like(keys, dtype=torch.bool)
    )


@dataclass
class _Negatives:
    """Samples click negatives: hard ones from a retrieval pool, uniform ones."""

    pool: Tensor  # (U, P) each user's top unseen retrieval items, 0 where exhausted
    known: Tensor  # (n,) sorted user_idx * num_items + item_idx of training pairs
    num_items: int
    num_hard: int
    num_random: int

    def sample(
        self, users: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``[B]`` users -> ``[B, M]`` item_idx and ``[B, M]`` bool (usable draw)."""
        shape = (len(users), self.num_hard)
        cols = torch.randint(0, self.pool.shape[1], shape, generator=generator)
        hard = self.pool[users[:, None], cols]
        shape = (len(users), self.num_random)
        uniform = torch.randint(1, self.num_items, shape, generator=generator)
        items = torch.cat([hard, uniform], dim=1)
        known = _is_pair(self.known, users[:, None], items, self.num_items)
        return items, (items > 0) & ~known


def _loss(
    run: RankingRun,
    negatives: _Negatives | None,
    batch: Pairs,
    generator: torch.Generator,
) -> Tensor:
    """Weighted rating MSE (rated positives) plus click BCE (positives, negatives)."""
    config, (users, items, ratings) = run.config, batch
    candidates, usable = items[:, None], torch.ones(len(items), 1, dtype=torch.bool)
    if negatives is not None:
        sampled, ok = negatives.sample(users, generator)
        candidates = torch.cat([candidates, sampled], dim=1)  # (B, 1 + M)
        usable = torch.cat([usable, ok], dim=1)
    out = _forward(run, users, candidates, exclude_target=True)
    loss = torch.zeros(())
    rated = ~torch.isnan(ratings)
    if config.rating_weight > 0 and rated.any():
        error = out["rating"][:, 0][rated] - ratings[rated]
        loss = loss + config.rating_weight * error.pow(2).mean()
    if config.click_weight > 0:
        labels = torch.zeros_like(out["click"])
        labels[:, 0] = 1.0
        bce = F.binary_cross_entropy_with_logits(
            out["click"], labels, weight=usable.float(), reduction="sum"
        )
        loss = loss + config.click_weight * bce / usable.sum()
    return loss


def _validate(run: RankingRun, pairs: Pairs) -> dict[str, float]:
    """Validation RMSE (rating head, clipped) and click AUC against uniform items."""
    users, items, ratings = pairs
    generator = torch.Generator().manual_seed(run.config.seed + 17)
    uniform = torch.randint(
        1, run.tensors.num_items, (len(users),), generator=generator
    )
    out = run.score(users, torch.stack([items, uniform], dim=1))
    result = {"auc": auc(out["click"][:, 0], out["click"][:, 1])}
    rated = ~torch.isnan(ratings)
    if rated.any():
        result["rmse"] = rmse(out["rating"][:, 0][rated], ratings[rated])
    return result


def fit_ranking(
    run: RetrievalRun,
    train: Dataset,
    *,
    config: RankingConfig | None = None,
    validation: Dataset | None = None,
    on_step: ProgressFn | None = None,
) -> RankingRun:
    """Train a ranker on a retrieval run's features and candidates.

    Args:
        run: the trained retrieval run (features, vocabularies, candidate source).
        train: the ranker's training pairs (pairs with unknown IDs are skipped).
        config: the ranker's settings; ``RankingConfig()`` when None.
        validation: held-out pairs, disjoint from ``train``, for early stopping and the
            blend weight; carved out of ``train`` (``config.validation_fraction``) when
            None. Best: the retrieval run's own carve-out (module docstring).
        on_step: called after every step with ``{"epoch", "step", "loss", "examples"}``.

    Returns:
        The run; its tables hold ``train`` and ``validation`` as history and seen items
        (as a retrieval run's tables do after training).
    """
    config = config or RankingConfig()
    started = time.perf_counter()
    if validation is None:
        train, validation = validation_split(
            train, fraction=config.validation_fraction, seed=config.seed
        )
    pairs = _pairs(run, train, known_only=True)
    rated = pairs[2][~torch.isnan(pairs[2])]
    if not len(pairs[0]) or (config.rating_weight > 0 and not len(rated)):
        raise DataError(
            "`train` should hold pairs of known users and items, with ratings when "
            f"rating_weight > 0 (else set rating_weight=0). Received: {len(pairs[0])} "
            f"known pairs, {len(rated)} rated."
        )
    torch.manual_seed(config.seed)  # the initial weights are part of the run
    mean = float(rated.mean()) if len(rated) else 0.0
    ranking = RankingRun(
        config=config,
        retrieval=run,
        model=build_ranking_model(run, config, rating_mean=mean),
        tensors=with_history_of(run.tensors, run.spec, train, run.config.retrieval),
    )
    if len(rated):
        ranking.rating_bounds = (float(rated.min()), float(rated.max()))
    val_pairs = _pairs(run, validation, known_only=True)
    ranking.history = _train(
        ranking,
        pairs,
        _negatives(ranking, pairs),
        val_pairs if len(val_pairs[0]) else None,
        on_step,
    )
    ranking.blend_weight = (
        _pick_blend(ranking, validation)
        if config.blend_weight is None
        else config.blend_weight
    )
    both = train.with_interactions(
        pl.concat([train.interactions, validation.interactions])
    )
    ranking.tensors = with_history_of(run.tensors, run.spec, both, run.config.retrieval)
    ranking._vectors = None  # the retrieval query vectors depend on the history
    ranking.train_seconds = time.perf_counter() - started
    logger.info("ranker trained in %.1f s", ranking.train_seconds)
    return ranking


def _negatives(ranking: RankingRun, pairs: Pairs) -> _Negatives | None:
    config, num_items = ranking.config, ranking.tensors.num_items
    if config.click_weight == 0:
        return None
    if config.num_hard_negatives + config.num_random_negatives == 0:
        return None
    num_users = ranking.tensors.history.shape[0]
    pool = torch.zeros(num_users, 1, dtype=torch.long)
    if config.num_hard_negatives > 0:
        seen = _seen(ranking.tensors)
        chunks = [
            _top_unseen(
                ranking, users, seen.take(users.numpy()), config.hard_negative_pool
            )
            for users in torch.arange(num_users).split(1024)
        ]
        pool = torch.cat([ids for ids, _ in chunks]).clamp_min(0)
    return _Negatives(
        pool=pool,
        known=(pairs[0] * num_items + pairs[1]).unique(),  # sorted
        num_items=num_items,
        num_hard=config.num_hard_negatives,
        num_random=config.num_random_negatives,
    )


def _train(
    ranking: RankingRun,
    pairs: Pairs,
    negatives: _Negatives | None,
    validation: Pairs | None,
    on_step: ProgressFn | None,
) -> list[dict[str, float]]:
    """Per epoch: shuffle, then per step loss, backward, step; then validate, keep best."""
    config, model = ranking.config, ranking.model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    history: list[dict[str, float]] = []
    best, best_state, bad_epochs = math.inf, None, 0
    num_pairs, step, started = len(pairs[0]), 0, time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout masks
        total = 0.0
        for batch in torch.randperm(num_pairs, generator=generator).split(
            config.batch_size
        ):
            users, items, ratings = (p[batch] for p in pairs)
            loss = _loss(ranking, negatives, (users, items, ratings), generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            step += 1
            if on_step is not None:
                progress = {"loss": loss.item(), "examples": len(batch)}
                on_step({"epoch": epoch, "step": step, **progress})
        record = {"epoch": float(epoch), "train_loss": total / num_pairs}
        if validation is not None:
            record.update(_validate(ranking, validation))
        record["seconds"] = time.perf_counter() - started
        logger.info("ranking epoch %d: %s", epoch, record)
        history.append(record)
        metric = record.get("rmse", -record.get("auc", -record["train_loss"]))
        if metric < best:
            best, bad_epochs = metric, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= config.early_stopping_patience > 0:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def _two_stage(
    ranking: RankingRun,
    user_idx: Tensor,
    seen: UserItems,
    blend_weights: tuple[float, ...],
    *,
    chunk: int = 256,
) -> tuple[Tensor, dict[float, Tensor]]:
    """Retrieve ``num_candidates`` unseen items per user, then re-rank them.

    Returns:
        ``[Q, C]`` item_idx in retrieval order and, per blend weight, ``[Q, C]`` in
        re-ranked order; ``-1`` marks empty slots, which stay last.
    """
    k = ranking.config.num_candidates
    retrieved: list[Tensor] = []
    reranked: dict[float, list[Tensor]] = {w: [] for w in blend_weights}
    for start in range(0, len(user_idx), chunk):
        users = user_idx[start : start + chunk]
        ids, logits = _top_unseen(
            ranking, users, seen.slice(start, start + len(users)), k
        )
        click = ranking.score(users, ids.clamp_min(0))["click"]
        retrieved.append(ids)
        for w in blend_weights:
            key = (click + w * logits).masked_fill(ids < 0, -math.inf)
            order = key.argsort(dim=1, descending=True, stable=True)
            reranked[w].append(ids.gather(1, order))
    return torch.cat(retrieved), {w: torch.cat(v) for w, v in reranked.items()}


def _list_metrics(
    ids: Tensor, relevant: UserItems, num_items: int
) -> dict[str, dict[str, float]]:
    """``{"ndcg", "hit_rate"} -> "k" -> value`` of ``[Q, K]`` ranked item_idx."""
    acc = MetricAccumulator(ks=KS, num_items=num_items)
    acc.update(ids, relevant)
    metrics = acc.compute()
    return {m: {str(k): v for k, v in metrics[m].items()} for m in ("ndcg", "hit_rate")}


def _queries(ranking: RankingRun, data: Dataset) -> tuple[Tensor, UserItems, UserItems]:
    """One query per user of ``data``: ``[Q]`` user_idx, relevant unseen, seen items."""
    queries = test_queries(ranking.retrieval, data)
    seen = _seen(ranking.tensors).take(queries.user_idx)
    return torch.from_numpy(queries.user_idx), queries.relevant.difference(seen), seen


def _pick_blend(ranking: RankingRun, validation: Dataset) -> float:
    """The blend weight of :data:`BLEND_GRID` with the best validation NDCG@10."""
    if not validation.num_interactions:
        return 0.0
    user_idx, relevant, seen = _queries(ranking, validation)
    _, lists = _two_stage(ranking, user_idx, seen, BLEND_GRID)
    num_items = ranking.tensors.num_items
    ndcg = {
        w: _list_metrics(ids, relevant, num_items)["ndcg"]["10"]
        for w, ids in lists.items()
    }
    logger.info("validation NDCG@10 by blend weight: %s", ndcg)
    return max(ndcg, key=ndcg.__getitem__)


def evaluate_ranking(
    ranking: RankingRun, test: Dataset, *, seed: int = 0
) -> dict[str, Any]:
    """Rating error, click AUC and the two-stage list quality on a test split.

    Args:
        ranking: the trained ranker (its tables say which items are seen).
        test: held-out interactions; a user's test items are the relevant ones.
        seed: seed of the AUC's negatives.

    Returns:
        ``rmse`` and ``mae`` of the rating head on the rated test pairs (clipped to the
        training range; unknown IDs use the OOV rows); ``auc`` of the click head, each
        test pair against one uniform item that is neither a training nor a test item
        of the user; ``retrieval_only`` and ``two_stage``: ``{"ndcg", "hit_rate"}`` ->
        ``"k"`` -> per-user mean (users with a relevant unseen item; unknown users are
        the OOV row) for k in 1, 5, 10, 50, 100; and ``blend_weight``,
        ``num_candidates``, ``num_test_pairs``.
    """
    users, items, ratings = _pairs(ranking.retrieval, test, known_only=False)
    splits = zip(users.split(8192), items.split(8192), strict=True)
    predicted = torch.cat(
        [ranking.score(u, i[:, None])["rating"][:, 0] for u, i in splits]
    )
    rated = ~torch.isnan(ratings)
    result: dict[str, Any] = {"num_test_pairs": len(users)}
    if rated.any():
        result["rmse"] = rmse(predicted[rated], ratings[rated])
        result["mae"] = mae(predicted[rated], ratings[rated])
    result["auc"] = _test_auc(ranking, users, items, seed)
    user_idx, relevant, seen = _queries(ranking, test)
    retrieved, lists = _two_stage(ranking, user_idx, seen, (ranking.blend_weight,))
    num_items = ranking.tensors.num_items
    result["retrieval_only"] = _list_metrics(retrieved, relevant, num_items)
    result["two_stage"] = _list_metrics(
        lists[ranking.blend_weight], relevant, num_items
    )
    result["blend_weight"] = ranking.blend_weight
    result["num_candidates"] = ranking.config.num_candidates
    return result


def _test_auc(ranking: RankingRun, users: Tensor, items: Tensor, seed: int) -> float:
    """Click AUC: each test pair against a uniform item unknown to its user."""
    num_items, tensors = ranking.tensors.num_items, ranking.tensors
    pair_keys = torch.cat(
        [tensors.users * num_items + tensors.items, users * num_items + items]
    )
    known = pair_keys.unique()  # sorted
    generator = torch.Generator().manual_seed(seed)
    negatives = torch.randint(1, num_items, (len(users),), generator=generator)
    for _ in range(20):  # redraw the negatives that are a known pair of their user
        clash = _is_pair(known, users, negatives, num_items)
        if not clash.any():
            break
        redraw = torch.randint(1, num_items, (int(clash.sum()),), generator=generator)
        negatives[clash] = redraw
    candidates = torch.stack([items, negatives], dim=1)
    splits = zip(users.split(8192), candidates.split(8192), strict=True)
    click = torch.cat([ranking.score(u, c)["click"] for u, c in splits])
    return auc(click[:, 0], click[:, 1])


_CONFIG, _WEIGHTS, _TABLES, _STATE = (
    "ranking_config.json",
    "ranking.safetensors",
    "ranking_tables.safetensors",
    "ranking_state.json",
)


def save_ranking(ranking: RankingRun, directory: str | Path) -> None:
    """Write config and state (JSON), weights and seen/history tables (safetensors).

    The retrieval run is saved on its own (``RetrievalRun.save``); pass it back to
    :func:`load_ranking`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_config(ranking.config, out / _CONFIG)
    weights = ranking.model.state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, out / _WEIGHTS)
    tensors = ranking.tensors
    tables = {
        "history": tensors.history,
        "users": tensors.users,
        "items": tensors.items,
    }
    save_file({k: v.contiguous() for k, v in tables.items()}, out / _TABLES)
    state = {
        "blend_weight": ranking.blend_weight,
        "rating_bounds": list(ranking.rating_bounds),
        "history": ranking.history,
        "train_seconds": ranking.train_seconds,
    }
    (out / _STATE).write_text(json.dumps(state, indent=2) + "\n")


def load_ranking(directory: str | Path, retrieval_run: RetrievalRun) -> RankingRun:
    """Rebuild a saved ranker from its own config and weights (strict key checks).

    Args:
        directory: what :func:`save_ranking` wrote.
        retrieval_run: the retrieval run the ranker was trained on.
    """
    path = Path(directory)
    try:
        config = load_config(path / _CONFIG, RankingConfig)
        weights, tables = load_file(path / _WEIGHTS), load_file(path / _TABLES)
        state = json.loads((path / _STATE).read_text())
        model = build_ranking_model(retrieval_run, config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        low, high = state["rating_bounds"]
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(
            f"cannot load the ranker in {str(path)!r}: {e}. Is it a directory written "
            "by save_ranking, loaded with the retrieval run it was trained on?"
        ) from e
    if missing or unexpected:
        raise ArtifactError(
            f"weights in {str(path / _WEIGHTS)!r} do not match the saved config: "
            f"missing keys {missing}, unexpected keys {unexpected}."
        )
    model.eval()
    tensors = dataclasses.replace(
        retrieval_run.tensors,
        history=tables["history"],
        users=tables["users"],
        items=tables["items"],
        weights=None,
    )
    return RankingRun(
        config=config,
        retrieval=retrieval_run,
        model=model,
        tensors=tensors,
        blend_weight=float(state["blend_weight"]),
        rating_bounds=(float(low), float(high)),
        history=state["history"],
        train_seconds=float(state["train_seconds"]),
    )
