"""The trained ranker (:class:`RankingRun`): building the model, inference with its
caches, and the pair tables training and evaluation use."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from twostage.config import RankingConfig
from twostage.data.dataset import ITEM, RATING, USER, WEIGHT, Dataset
from twostage.data.user_items import UserItems
from twostage.errors import DataError
from twostage.features.fields import Side
from twostage.features.spec import FeatureSpec
from twostage.models.linear_items import LinearItemsModel
from twostage.models.ranking import FirstLayers, RankingModel, retrieval_extras
from twostage.models.ranking import Side as EmbeddedSide
from twostage.models.towers import FieldInfo
from twostage.retrieval.run import RetrievalRun
from twostage.retrieval.tensors import PriorHistory, RetrievalTensors, query_features

logger = logging.getLogger(__name__)

Pairs = tuple[Tensor, Tensor, Tensor]  # [n] user_idx, [n] item_idx, [n] rating (NaN)


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
        extra_dim=run.config.retrieval.served_dim * config.use_retrieval_features,
        rating_mean=rating_mean,
        sparse=config.sparse_embeddings,
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
        ease: the EASE term's factorised matrix when ``config.ease_weight`` > 0
            (fitted on the rows of ``tensors``), else None.
        metrics: the test figures of :func:`twostage.ranking.evaluate_ranking`
            measured after training (saved with the bundle), or None.
        reads_context: trained with each row's own per-interaction context
            (``ranking.use_context`` with a retrieval model that reads some):
            scoring then takes the query's context (:meth:`score`'s
            ``context``); False for a ranker trained with it unknown.
    """

    config: RankingConfig
    retrieval: RetrievalRun
    model: RankingModel
    tensors: RetrievalTensors
    blend_weight: float = 0.0
    rating_bounds: tuple[float, float] = (-math.inf, math.inf)
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    ease: LinearItemsModel | None = None
    metrics: dict[str, Any] | None = None
    reads_context: bool = False
    _vectors: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _seen: tuple[int, UserItems] | None = field(default=None, repr=False)
    _candidates: tuple[tuple[int, ...], _Inference] | None = field(
        default=None, repr=False
    )
    _weights: tuple[RankingModel, list[Tensor]] | None = field(default=None, repr=False)

    @property
    def predicts_ratings(self) -> bool:
        """Whether the rating head was trained: the data had ratings and
        ``rating_weight`` > 0 (an implicit log's ranker learns clicks only)."""
        return math.isfinite(self.rating_bounds[0]) and self.config.rating_weight > 0

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

    def as_trained_users(self, user_idx: Tensor) -> Tensor:
        """``user_idx`` with the users past the retrieval run's rows
        (:meth:`with_users`) as the unknown user, 0: what the retrieval run's own
        per-user tables (fallback, session-kNN) know of them."""
        known = int(self.retrieval.tensors.history.shape[0])
        return user_idx.masked_fill(user_idx >= known, 0)

    def retrieval_scores(
        self, user_idx: Tensor, *, queries: Tensor | None = None
    ) -> Tensor:
        """``[B, N]`` retrieval logits (cosine / temperature) of every item, the
        session-kNN term included when the retrieval run has one (a user past
        the retrieval run's rows, :meth:`with_users`, reads its history there as
        a session, as serving reads one). ``queries``: ``[B, D]`` the retrieval
        query embeddings to score with instead of the users' own, which read no
        context (:meth:`context_queries`)."""
        users, items = self.retrieval_vectors()
        temperature = float(self.retrieval.model.temperature)
        query = users[user_idx] if queries is None else queries
        scores = query @ items.T  # (B, D) @ (D, N) -> (B, N)
        if self.retrieval.scores_exactly:  # computed on the host, like its table
            host = user_idx.cpu()
            sessions = None
            past = host >= int(self.retrieval.tensors.history.shape[0])
            if past.any():  # new users (with_users): their history as a session
                sessions = self.tensors.history[host].masked_fill(~past[:, None], 0)
            term = self.retrieval.neighbour_term(
                self.as_trained_users(host), sessions=sessions
            )
            scores += term.to(scores.device)
        return scores / temperature

    def context_queries(self, user_idx: Tensor, context: dict[str, Tensor]) -> Tensor:
        """``[B, D]`` the retrieval query embeddings of ``B`` users, each at its
        row of ``context`` (``{key: [B, ...]}``, :meth:`encode_context`), from
        the users' rows of this ranker's tables: what serving retrieves with for
        a request that carries that context, and :meth:`retrieval_scores` scores
        with."""
        out = [
            self._context_query(
                user_idx[rows], {k: v[rows] for k, v in context.items()}
            )
            for rows in torch.arange(len(user_idx)).split(4096)
        ]
        if not out:
            return torch.zeros(0, self.retrieval_vectors()[1].shape[1])
        return torch.cat(out)

    def encode_context(self, context: pl.DataFrame) -> dict[str, Tensor]:
        """``{key: [n, ...]}`` the encoded context fields of ``n`` rows of context
        columns (the retrieval model's; missing values encode as unknown)."""
        from twostage.features.context import context_frame
        from twostage.retrieval.tensors import context_keys

        spec = self.retrieval.spec
        ids = pl.Series(USER, [None] * context.height, dtype=pl.Int64)
        return spec.transform_context(context_frame(ids, context, context_keys(spec)))

    def _context_query(self, user_idx: Tensor, context: dict[str, Tensor]) -> Tensor:
        """``[B, D]`` the retrieval query embeddings of users at an encoded
        context, from their rows of this ranker's tables."""
        features = query_features(self.tensors, user_idx)
        features.update(context)
        model = self.retrieval.model
        # The retrieval model stays where it was trained while the ranker's
        # tables train on a GPU: encode there, answer on the tables' device.
        at = next(model.parameters()).device
        with torch.no_grad():
            found = model.encode_queries({k: v.to(at) for k, v in features.items()})
        return found.to(user_idx.device)

    def ease_scores(
        self, user_idx: Tensor, item_idx: Tensor, *, rows: UserItems | None = None
    ) -> Tensor | None:
        """``[B, C]`` the EASE term of ``C`` candidates for each of ``B`` users: the
        user's EASE score over their seen items, divided by its spread over the
        catalogue (less its mean, which shifts a user's candidates alike); None
        without the term. Unknown users (index 0) have no items and score 0, and
        so do items past the matrix's rows (:meth:`with_items`: none in the
        training log). ``rows``: ``B`` item sets to read instead of the users'
        seen items (a session's)."""
        if self.ease is None:
            return None
        if rows is None:
            users = self.tensors.users
            if self._seen is None or self._seen[0] != id(users):
                self._seen = (id(users), self.tensors.seen())
            rows = self._seen[1].take(user_idx.numpy())
        right = self.ease.right
        inside = item_idx < right.shape[0]
        with torch.no_grad():
            queries = self.ease.encode_item_sets(rows)  # (B, r)
            items = right[item_idx.masked_fill(~inside, 0)]  # (B, C, r)
            term = (items @ queries[:, :, None])[:, :, 0]  # (B, C, r) @ (B, r, 1)
            return term.masked_fill(~inside, 0.0)

    def with_items(
        self, ids: pl.Series, items: pl.DataFrame | None
    ) -> tuple[RankingRun, Tensor, int]:
        """This ranker, able to score items it never trained on, and ``ids``' indices.

        Each distinct ID outside the item vocabulary (an item only ever shown, a news
        item published after training) gets a row past the vocabulary: its candidate
        side encoded from its row of ``items`` with its ID at the unknown row, as a
        new item is embedded for a cold start, or, where ``items`` has no row or
        lacks a feature column, the unknown item's row itself (every such item
        then scores alike). Vocabulary items keep their indices and scores.

        Returns:
            The run to score with (this one when every ID is known), ``[n]`` int64
            indices of ``ids``, and how many distinct IDs were new.
        """
        spec = self.retrieval.spec
        index, new = _past_vocabulary(spec, ITEM, ids, self.tensors.num_items)
        if not len(new):
            return self, index, 0
        columns = [f.column for f in spec.describe(side="candidate")]
        if items is not None and all(c in items.columns for c in [ITEM, *columns]):
            side = spec.transform_items(new.rename(ITEM), items=items)
        else:  # nothing to encode them from: the unknown item's row
            side = {
                k: v[:1].expand(len(new), *v.shape[1:]).clone()
                for k, v in self.tensors.item_features.items()
            }
        tensors = dataclasses.replace(
            self.tensors,
            item_features={
                k: torch.cat([v, side[k].to(v.dtype)])
                for k, v in self.tensors.item_features.items()
            },
            item_probs=F.pad(self.tensors.item_probs, (0, len(new))),
        )
        vectors = None
        if self.model.extra_dim:
            users, known = self.retrieval_vectors()
            with torch.no_grad():
                added = self.retrieval.model.encode_items(side)
            vectors = (users, torch.cat([known, added.to(known.dtype)]))
        run = dataclasses.replace(
            self, tensors=tensors, _vectors=vectors, _seen=None, _candidates=None
        )
        return run, index, len(new)

    def score(
        self,
        user_idx: Tensor,
        item_idx: Tensor,
        *,
        context: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Score ``C`` candidates for each of ``B`` users in one forward pass.

        Args:
            user_idx: ``[B]`` int64 user indices (0: unknown user).
            item_idx: ``[B, C]`` int64 item indices.
            context: ``{key: [B, ...]}`` each query's encoded context
                (:meth:`encode_context`), read by a ranker that
                :attr:`reads_context` (ignored by one that does not).

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
            out = forward_pairs(
                self,
                user_idx,
                item_idx,
                exclude_target=False,
                inference=self._inference(),
                context=context if self.reads_context else None,
            )
        low, high = self.rating_bounds
        return {"rating": out["rating"].clamp(low, high), "click": out["click"]}

    def with_users(
        self,
        ids: pl.Series,
        users: pl.DataFrame | None,
        prior: pl.DataFrame | None = None,
    ) -> tuple[RankingRun, Tensor, int]:
        """This ranker, able to score users it never trained on, and ``ids``'
        indices: :meth:`with_items` for the query side.

        Each distinct ID outside the user vocabulary gets a row past it: its query
        fields encoded from its row of ``users`` with its ID at the unknown row, as
        a new user's features are for a cold start; where ``users`` has no row or
        lacks a feature column, the unknown user's row. Its history is its rows
        of ``prior`` (``user_id``, ``item_id``, ``timestamp``: what it did before,
        the latest ``history_length`` items the model knows, in time order), as
        serving reads a session; none without.

        Returns:
            The run to score with (this one when every ID is known), ``[n]`` int64
            indices of ``ids``, and how many distinct IDs were new.
        """
        from twostage.features.context import context_frame
        from twostage.retrieval.tensors import context_keys

        spec = self.retrieval.spec
        known_rows = int(self.tensors.history.shape[0])
        index, new = _past_vocabulary(spec, USER, ids, known_rows)
        if not len(new):
            return self, index, 0
        keys = context_keys(spec)
        columns = [
            f.column
            for f in spec.describe(side="query")
            if f.column != USER and f.column not in keys
        ]
        if users is not None and all(c in users.columns for c in [USER, *columns]):
            frame = context_frame(new.rename(USER), None, keys)
            side = spec.transform_queries(frame, users=users)
        else:  # nothing to encode them from: the unknown user's row
            side = {
                k: v[:1].expand(len(new), *v.shape[1:]).clone()
                for k, v in self.tensors.user_features.items()
            }

        def grown(table: Tensor) -> Tensor:  # new users' rows: nothing
            return F.pad(table, (0, 0, 0, len(new))) if table.numel() else table

        history = grown(self.tensors.history)
        history_times = grown(self.tensors.history_times)
        if prior is not None and prior.height and history.shape[1]:
            items, times = PriorHistory.of(spec, new, prior).padded(
                np.arange(len(new)), history.shape[1]
            )
            history[known_rows:] = items
            if history_times.numel():
                history_times[known_rows:] = times
        latest = self.tensors.neighbour_latest
        tensors = dataclasses.replace(
            self.tensors,
            user_features={
                k: torch.cat([v, side[k].to(v.dtype)])
                for k, v in self.tensors.user_features.items()
            },
            history=history,
            history_times=history_times,
            # a new user's prior rows carry no ratings: not known
            history_ratings=grown(self.tensors.history_ratings),
            neighbour_lengths=(
                F.pad(self.tensors.neighbour_lengths, (0, len(new)))
                if self.tensors.has_neighbours
                else self.tensors.neighbour_lengths
            ),
            # without items, the new users are never sampled: any distinct ranks
            neighbour_latest=(
                torch.cat([latest, torch.arange(len(new)) + len(latest)])
                if latest.numel()
                else latest
            ),
        )
        vectors = None
        if self.model.extra_dim:
            known, items = self.retrieval_vectors()
            features = {k: v[known_rows:] for k, v in tensors.user_features.items()}
            features.update(tensors.history_features(slice(known_rows, None)))
            with torch.no_grad():
                added = self.retrieval.model.encode_queries(features)
            vectors = (torch.cat([known, added.to(known.dtype)]), items)
        run = dataclasses.replace(
            self, tensors=tensors, _vectors=vectors, _seen=None, _candidates=None
        )
        return run, index, len(new)

    def score_features(
        self, user_idx: Tensor, side: dict[str, Tensor], vectors: Tensor | None
    ) -> dict[str, Tensor]:
        """:meth:`score` for items given by their encoded candidate side rather
        than their index: items the ranker never trained on (a new item's features,
        its ID at the unknown row), scored one request at a time without
        re-embedding the catalogue (:meth:`with_items` grows the tables instead).

        Args:
            user_idx: ``[1]`` int64 user index (0: unknown user).
            side: ``{key: [C, ...]}`` the items' candidate fields, as
                ``FeatureSpec.transform_items`` encodes them.
            vectors: ``[C, D]`` their retrieval embeddings, which a ranker with
                ``use_retrieval_features`` reads (None for one without).

        Returns:
            ``{"rating": [1, C], "click": [1, C]}``, as :meth:`score`.
        """
        if user_idx.shape != (1,):
            raise DataError(
                f"`user_idx` should be [1]. Received: {tuple(user_idx.shape)}."
            )
        if self.model.training:
            self.model.eval()
        width = len(next(iter(side.values())))
        with torch.no_grad():
            out = _per_query(
                self,
                self._inference(),
                user_idx,
                self.model.embed_candidates(side),
                vectors if self.model.extra_dim else None,
                None,
                width,
            )
        low, high = self.rating_bounds
        return {"rating": out["rating"].clamp(low, high), "click": out["click"]}

    def user_fields(self, user_idx: int) -> dict[str, Tensor]:
        """``{key: [1, ...]}`` a user's encoded query fields and history from this
        ranker's tables (the context unknown), for :meth:`score_user`."""
        return query_features(self.tensors, torch.tensor([user_idx]))

    def score_user(
        self,
        fields: dict[str, Tensor],
        query_vector: Tensor | None,
        item_idx: Tensor | None = None,
        *,
        item_side: dict[str, Tensor] | None = None,
        item_vectors: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """:meth:`score` (or :meth:`score_features`) for one user given by the
        encoded values of its query fields rather than by its index: a user the
        ranker never trained on, answered from its features (a cold start), with
        its ID at the unknown row and no history, one request at a time
        (:meth:`with_users` grows the tables instead).

        Args:
            fields: ``{key: [1, ...]}`` the user's query fields, as
                ``FeatureSpec.transform_queries`` encodes them; the fields it
                leaves out are the unknown user's.
            query_vector: ``[D]`` its retrieval query embedding, which a ranker
                with ``use_retrieval_features`` reads (None for one without).
            item_idx: ``[C]`` int64 item indices; or, for new items,
            item_side: ``{key: [C, ...]}`` their encoded candidate side and
            item_vectors: ``[C, D]`` their retrieval embeddings.

        Returns:
            ``{"rating": [1, C], "click": [1, C]}``, as :meth:`score`.
        """
        vector = None if query_vector is None else query_vector[None]
        if item_side is None:
            assert item_idx is not None
            return self.score_users(fields, vector, item_idx[None])
        model = self.model

        def embedded(_: _Inference) -> tuple[EmbeddedSide, Tensor | None, None]:
            vectors = item_vectors if model.extra_dim else None
            return model.embed_candidates(item_side), vectors, None

        width = len(next(iter(item_side.values())))
        return self._score_fields(fields, vector, embedded, (1, width))

    def score_users(
        self,
        fields: dict[str, Tensor],
        query_vectors: Tensor | None,
        item_idx: Tensor,
    ) -> dict[str, Tensor]:
        """:meth:`score_user` for ``B`` users at once (anonymous sessions, say).

        Args:
            fields: ``{key: [B, ...]}`` their encoded query fields (those left out
                are the unknown user's).
            query_vectors: ``[B, D]`` their retrieval queries (None for a ranker
                without ``use_retrieval_features``).
            item_idx: ``[B, C]`` int64 item indices.

        Returns:
            ``{"rating": [B, C], "click": [B, C]}``, as :meth:`score`.
        """
        flat = item_idx.reshape(-1)
        return self._score_fields(
            fields,
            query_vectors,
            lambda inference: _gathered(self, inference, flat),
            (int(item_idx.shape[0]), int(item_idx.shape[1])),
        )

    def _score_fields(
        self,
        fields: dict[str, Tensor],
        query_vectors: Tensor | None,
        candidates: Callable[
            [_Inference], tuple[EmbeddedSide, Tensor | None, Tensor | None]
        ],
        shape: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Both heads ``shape = (B, C)`` for ``B`` users given by their encoded
        query fields (the unknown user's where left out) and retrieval queries
        ``[B, D]``, against the candidates ``candidates(inference)`` gives
        (embedded side, retrieval embeddings, cached projection)."""
        model = self.model
        if model.training:
            model.eval()
        inference = self._inference()
        users = torch.zeros(shape[0], dtype=torch.long)
        features = query_features(self.tensors, users)
        features.update({k: v for k, v in fields.items() if k in features})
        with torch.no_grad():
            candidate, vectors, projection = candidates(inference)
            q = None
            if model.extra_dim:
                assert vectors is not None and query_vectors is not None
                q = query_vectors.to(vectors.dtype)
            out = _heads(
                model,
                inference,
                model.embed_queries(features),
                None,
                q,
                (candidate, vectors, projection),
                shape,
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


def _past_vocabulary(
    spec: FeatureSpec, key: str, ids: pl.Series, start: int
) -> tuple[Tensor, pl.Series]:
    """``[n]`` int64 indices of raw ``ids`` in ``key``'s vocabulary, the unknown
    ones numbered from ``start`` on in order of first appearance, and those
    distinct unknown IDs (:meth:`RankingRun.with_items`, ``with_users``)."""
    index = spec.vocabulary(key).transform(ids).astype("int64")
    unknown = pl.Series(index == 0)
    new = ids.filter(unknown).unique(maintain_order=True)
    if len(new):
        codes = pl.DataFrame({key: new}).with_row_index("k")
        index[unknown.to_numpy()] = start + (
            pl.DataFrame({key: ids.filter(unknown)})
            .join(codes, on=key, how="left", maintain_order="left")["k"]
            .to_numpy()
        )
    return torch.from_numpy(index), new


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


def _per_query(
    run: RankingRun,
    inference: _Inference,
    user_idx: Tensor,
    candidate: EmbeddedSide,
    vectors: Tensor | None,
    projection: Tensor | None,
    width: int,
) -> dict[str, Tensor]:
    """Both heads for ``[B]`` users x ``width`` candidates each, the candidates'
    embedded side given (``[B * width, ...]``, with their retrieval embeddings where
    the ranker reads them and their projection through the first layers when
    cached), the query side from the inference caches."""
    model = run.model
    per_query = None
    if inference.users is not None and inference.per_query is not None:
        query = EmbeddedSide(*(t.index_select(0, user_idx) for t in inference.users))
        per_query = inference.per_query.index_select(0, user_idx)
    else:
        query = model.embed_queries(query_features(run.tensors, user_idx))
    q = run.retrieval_vectors()[0][user_idx] if model.extra_dim else None
    return _heads(
        model,
        inference,
        query,
        per_query,
        q,
        (candidate, vectors, projection),
        (len(user_idx), width),
    )


def _heads(
    model: RankingModel,
    inference: _Inference,
    query: EmbeddedSide,
    per_query: Tensor | None,
    q: Tensor | None,
    candidates: tuple[EmbeddedSide, Tensor | None, Tensor | None],
    shape: tuple[int, int],
) -> dict[str, Tensor]:
    """Both heads ``shape = (B, C)`` for ``B`` embedded queries (their first
    layers' part when cached, their retrieval embeddings ``q`` ``[B, D]`` where
    the ranker reads them) x their candidates: the embedded side, retrieval
    embeddings and projection through the first layers (None: computed here)."""
    candidate, vectors, projection = candidates
    score = None
    if q is not None:
        assert vectors is not None
        # (B * C, D) . (B * C, D) -> (B * C,): each candidate's retrieval score
        score = (q.repeat_interleave(shape[1], dim=0) * vectors).sum(-1)
    if projection is None:
        projection = model.project_items(inference.first, candidate, vectors)
    out = model.combine_per_query(
        query,
        candidate,
        inference.first,
        projection,
        query_embedding=q,
        candidate_embedding=vectors,
        retrieval_score=score,
        per_query=per_query,
    )
    return {k: v.view(*shape) for k, v in out.items()}


def _gathered(
    run: RankingRun, inference: _Inference, flat: Tensor
) -> tuple[EmbeddedSide, Tensor | None, Tensor | None]:
    """The candidates ``flat`` ``[B * C]`` for inference: their embedded side (from
    the cache where it fits), retrieval embeddings where the ranker reads them,
    and cached projection through the first layers (else None)."""
    model = run.model
    if inference.candidates is not None:
        candidate = EmbeddedSide(
            *(t.index_select(0, flat) for t in inference.candidates)
        )
    else:
        candidate = model.embed_candidates(
            {k: v[flat] for k, v in run.tensors.item_features.items()}
        )
    vectors = run.retrieval_vectors()[1][flat] if model.extra_dim else None
    projection = None
    if inference.projection is not None:
        projection = inference.projection.index_select(0, flat)
    return candidate, vectors, projection


def forward_pairs(
    run: RankingRun,
    user_idx: Tensor,
    item_idx: Tensor,
    *,
    exclude_target: bool,
    inference: _Inference | None = None,
    context: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Both heads for ``[B]`` users x ``[B, C]`` items -> ``[B, C]`` each.

    The query side is embedded once per user and repeated over its ``C`` candidates.
    ``exclude_target`` drops each row's first candidate from the user's history.
    ``inference``: the cached item side (:meth:`RankingRun._inference`) to gather
    from, with the first layers factored per query; None embeds the ``B * C``
    candidates here (training, with gradients). ``context``: ``{key: [B, ...]}``
    each row's encoded context, which replaces the users' unknown context in the
    ranker's query fields and in the retrieval query it reads.
    """
    num_rows, width = item_idx.shape
    model, tensors = run.model, run.tensors
    target = item_idx[:, 0] if exclude_target else None
    flat = item_idx.reshape(-1)
    if inference is not None and target is None and context is None:
        candidate, vectors, projection = _gathered(run, inference, flat)
        return _per_query(
            run, inference, user_idx, candidate, vectors, projection, width
        )
    features = query_features(tensors, user_idx, exclude_items=target)
    q = None
    if context is not None:
        features.update(context)
        if model.extra_dim:  # the retrieval query at the row's context
            q = run._context_query(user_idx, context)
    query = model.embed_queries(features)
    if model.extra_dim and q is None:
        q = run.retrieval_vectors()[0][user_idx]
    if inference is not None and target is None:  # a query's context: no cache
        gathered = _gathered(run, inference, flat)
        return _heads(model, inference, query, None, q, gathered, (num_rows, width))
    candidate = model.embed_candidates(
        {k: v[flat] for k, v in tensors.item_features.items()}
    )
    extras = None
    if model.extra_dim:
        assert q is not None
        q = q.repeat_interleave(width, dim=0)  # (B * C, D)
        c = run.retrieval_vectors()[1][flat]  # (B * C, D)
        extras = retrieval_extras((q * c).sum(-1), q, c)
    out = model.combine(query.expand(width), candidate, extras)
    return {k: v.view(num_rows, width) for k, v in out.items()}


def top_unseen(
    run: RankingRun,
    user_idx: Tensor,
    seen: UserItems,
    k: int,
    *,
    queries: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The retrieval model's best ``k`` items per user, ``seen`` and OOV excluded.

    Args:
        run: supplies the retrieval embeddings.
        user_idx: ``[B]`` user indices.
        seen: ``B`` rows of items to exclude (aligned with ``user_idx``).
        k: list length.
        queries: ``[B, D]`` retrieval query embeddings to search with instead of
            the users' own (a query's context: :meth:`RankingRun.context_queries`).

    Returns:
        ``[B, k]`` item_idx (``-1`` once the unseen items run out) and ``[B, k]``
        retrieval logits (``-inf`` there).
    """
    scores = run.retrieval_scores(user_idx, queries=queries)
    scores[:, 0] = -math.inf
    scores[torch.from_numpy(seen.row_ids()), torch.from_numpy(seen.indices)] = -math.inf
    if k > scores.shape[1]:
        scores = F.pad(scores, (0, k - scores.shape[1]), value=-math.inf)
    values, ids = scores.topk(k, dim=1)
    return ids.masked_fill(values == -math.inf, -1), values


def pairs_of(run: RetrievalRun, dataset: Dataset, *, known_only: bool) -> Pairs:
    """A dataset's pairs as vocabulary indices (0: unknown) and ratings (NaN: none)."""
    return weighted_pairs_of(run, dataset, known_only=known_only)[0]


def weighted_pairs_of(
    run: RetrievalRun, dataset: Dataset, *, known_only: bool
) -> tuple[Pairs, Tensor | None]:
    """:func:`pairs_of`, and the pairs' row weights (the log's ``weight`` column,
    read with ``weight_col``; None without one)."""
    inter = dataset.interactions
    users = torch.from_numpy(run.spec.vocabulary(USER).transform(inter[USER]))
    items = torch.from_numpy(run.spec.vocabulary(ITEM).transform(inter[ITEM]))
    ratings = torch.full((len(users),), math.nan)
    if RATING in inter.columns:
        values = inter[RATING].cast(pl.Float32).fill_null(math.nan).to_numpy()
        ratings = torch.from_numpy(values.copy())
    weights = None
    if WEIGHT in inter.columns:
        given = inter[WEIGHT].cast(pl.Float32).fill_null(1.0).to_numpy()
        weights = torch.from_numpy(given.copy())
    if not known_only:
        return (users, items, ratings), weights
    keep = (users > 0) & (items > 0)
    kept = None if weights is None else weights[keep]
    return (users[keep], items[keep], ratings[keep]), kept


def pairs_context(
    run: RetrievalRun, dataset: Dataset, *, known_only: bool
) -> dict[str, Tensor] | None:
    """``{key: [n, ...]}`` the encoded per-interaction context of the rows
    :func:`pairs_of` gives (the same filter), or None when the retrieval model
    reads no context."""
    from twostage.features.context import add_context_columns, context_frame
    from twostage.retrieval.tensors import context_keys

    keys = context_keys(run.spec)
    if not keys:
        return None
    inter = add_context_columns(dataset, keys).interactions
    encoded = run.spec.transform_context(context_frame(inter[USER], inter, keys))
    if not known_only:
        return encoded
    users = torch.from_numpy(run.spec.vocabulary(USER).transform(inter[USER]))
    items = torch.from_numpy(run.spec.vocabulary(ITEM).transform(inter[ITEM]))
    keep = (users > 0) & (items > 0)
    return {k: v[keep] for k, v in encoded.items()}


def is_pair(known: Tensor, users: Tensor, items: Tensor, num_items: int) -> Tensor:
    """Whether each (user, item) is among ``known``: sorted ``user * N + item`` keys."""
    keys = users * num_items + items
    pos = torch.searchsorted(known, keys).clamp_(max=max(len(known) - 1, 0))
    return (
        known[pos] == keys if len(known) else torch.zeros_like(keys, dtype=torch.bool)
    )
