"""The Recommender: retrieve over the catalogue, drop seen items, rank, return top k.

This is the one object the CLI and the HTTP server use. It holds a trained retrieval
run (towers, encoders, per-user history), the candidate embeddings, optional item
metadata and an optional ranking stage.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file

from twostage.artifacts import MANIFEST, resolve_bundle, verify_bundle, write_bundle
from twostage.config import IndexConfig, RankingConfig, save_config
from twostage.data.dataset import ITEM, USER
from twostage.display import display_columns, label_and_tags
from twostage.errors import ArtifactError, ConfigError, UnknownIdError
from twostage.features.context import context_frame
from twostage.index import Index, load_index, make_index
from twostage.models.towers import HISTORY
from twostage.ranking.rerank import rerank
from twostage.retrieval.run import (
    RUN_WEIGHTS,
    RetrievalRun,
    load_run,
    read_records,
    read_retrieval,
    write_records,
    write_serving,
)
from twostage.retrieval.tensors import context_keys, tensors_to_flat

__all__ = ["Recommendation", "Recommender", "Ranker", "load"]

logger = logging.getLogger(__name__)

Path_ = Literal["personalised", "session", "cold_start_features", "popularity"]


class Ranker(Protocol):
    """What the Recommender needs of a ranking stage (see :mod:`twostage.ranking`)."""

    config: RankingConfig
    blend_weight: float

    def score(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``[B]`` users x ``[B, C]`` candidates -> ``{"rating", "click"}`` ``[B, C]``."""
        ...


@dataclass
class Recommendation:
    """The answer for one user: ranked items and which path produced them."""

    user_id: Any
    path: Path_
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "path": self.path, "items": self.items}


def _check_k(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"`{name}` should be a positive integer. Received: `{name}` = {value!r}."
        )


class Recommender:
    """Two-stage recommendations from a trained retrieval run (and optional ranker).

    Args:
        run: the trained retrieval run.
        items: item metadata keyed by ``item_id`` (title, genres...) for display and
            filters; optional.
        ranker: a ranking stage scoring (user, candidate) pairs; optional.
        index: the nearest-neighbour index over the candidate embeddings (ids are
            item indices); built from ``run.config.index`` when not given.
    """

    def __init__(
        self,
        run: RetrievalRun,
        *,
        items: pl.DataFrame | None = None,
        ranker: Ranker | None = None,
        index: Index | None = None,
    ) -> None:
        self.run = run
        self.ranker = ranker
        self.user_vocab = run.spec.vocabulary(USER)
        self.item_vocab = run.spec.vocabulary(ITEM)
        self.item_embeddings = run.item_embeddings()  # [N, D]
        self.dim = int(self.item_embeddings.shape[1])
        if index is None:
            # Row 0 is the OOV item: never a candidate, so never indexed.
            num_items = self.item_embeddings.shape[0]
            index = make_index(run.config.index).build(
                self.item_embeddings[1:], torch.arange(1, num_items)
            )
        if index.size != self.item_embeddings.shape[0] - 1 or index.dim != self.dim:
            raise ArtifactError(
                f"the {index.kind} index holds {index.size} vectors of width "
                f"{index.dim}; this model has {self.item_embeddings.shape[0] - 1} "
                f"items of width {self.dim}. Rebuild the index for this model."
            )
        self.index = index
        self.index_kind = index.kind
        # One default, what the ranking stage was evaluated with.
        self.num_candidates = (
            run.config.ranking.num_candidates
            if ranker is None
            else ranker.config.num_candidates
        )
        self.item_ids = pl.concat(
            [
                pl.Series(ITEM, [None], dtype=self.item_vocab.values.dtype),
                self.item_vocab.values.rename(ITEM),
            ]
        )
        self.items = self._align_items(items)
        # The metadata as columns, row = item index, for vectorised filters.
        self._item_frame = (
            None
            if items is None
            else self.item_ids.to_frame().join(
                items, on=ITEM, how="left", maintain_order="left"
            )
        )
        self._masks: dict[tuple[str, Any], torch.Tensor] = {}
        data = run.config.data
        self.display = display_columns(
            items, title=data.title_col, tags=data.tags_col, key=ITEM
        )
        self._labels = [
            label_and_tags(row, self.display) for row in (self.items or [{}])
        ]
        self._item_id_list = (
            self.item_ids.to_list()
        )  # index -> raw ID, no polars per call
        self._seen = run.tensors.seen()  # row = user_idx
        self._popular_users = run.uses_popularity(np.arange(self.user_vocab.size))
        self._context_keys = context_keys(run.spec)
        #: The bundle's manifest (version, creation time, checksums) when loaded.
        self.manifest: dict[str, Any] = {}
        popularity = run.tensors.fallback_popularity.clone()
        popularity[0] = -1.0
        self._popular = torch.argsort(popularity, descending=True, stable=True)
        self._query_cache: torch.Tensor | None = None

    # -- construction -------------------------------------------------------------
    def _align_items(self, items: pl.DataFrame | None) -> list[dict[str, Any]] | None:
        """Item metadata as one dict per item index (None for the OOV row)."""
        if items is None:
            return None
        ids = self.item_ids.to_frame()
        aligned = ids.join(items, on=ITEM, how="left", maintain_order="left")
        rows = aligned.drop(ITEM).to_dicts()
        rows[0] = {}
        return rows

    def _known_queries(self) -> torch.Tensor:
        """``[U, D]`` query embeddings of every known user, computed once."""
        if self._query_cache is None:
            tensors = self.run.tensors
            features = dict(tensors.user_features)
            features[HISTORY] = tensors.history
            with torch.no_grad():
                self._query_cache = self.run.model.encode_queries(features)
        return self._query_cache

    # -- queries -----------------------------------------------------------------
    def _context(self, context: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """``{key: [1, ...]}`` the encoded context of one request (unknown where
        missing); empty for a model that reads no context.

        Raises:
            ConfigError: context is given to a model that reads none, or names a
                column the model does not read.
        """
        if not self._context_keys:
            if context:
                raise ConfigError(
                    "`context` is given, but this model reads no context "
                    f"(received {sorted(context)})."
                )
            return {}
        frame = context_frame(pl.Series(USER, [None]), context, self._context_keys)
        with _client_values("context", dict(context or {}), self._context_keys):
            return {
                info.key: torch.from_numpy(
                    np.require(
                        self.run.spec.encoder(info.key).transform(frame[info.column]),
                        requirements=["C", "W"],
                    )
                )
                for info in self.run.spec.describe(side="query")
                if info.column in self._context_keys
            }

    def _encode_user_features(
        self, user_features: dict[str, Any], columns: list[str]
    ) -> dict[str, torch.Tensor]:
        """``{key: [1, ...]}`` the query fields of a user described by features.

        Raises:
            ConfigError: a value is of the wrong kind for its column.
        """
        values = {c: [user_features.get(c)] for c in columns}
        with _client_values("user_features", user_features, columns):
            frame = pl.DataFrame({USER: [None], **values})
            frame = frame.with_columns(
                pl.lit(None).alias(c) for c in self._context_keys
            )
            return self.run.spec.transform_queries(frame)

    def _query(
        self,
        user_id: Any,
        user_features: dict[str, Any] | None,
        context: Mapping[str, Any] | None = None,
        *,
        session: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, int, Path_]:
        """(query embedding [D] or None, user_idx, path). ``session``: ``[S]`` item
        indices of the current session, oldest first."""
        user_idx = self.user_vocab.lookup(user_id) if user_id is not None else 0
        encoded = self._context(context)
        columns = [
            f.column
            for f in self.run.spec.describe(side="query")
            if f.column != USER and f.column not in self._context_keys
        ]
        if user_features:  # a client's mistake is reported on every path
            unknown = sorted(set(user_features) - set(columns))
            if unknown:
                raise ConfigError(
                    f"unknown user feature(s) {unknown}; this model reads {columns}."
                )
            self._encode_user_features(user_features, columns)
        if session is not None:
            return self._session_query(
                user_idx, user_features, columns, encoded, session
            )
        if self._popular_users[user_idx]:
            # The run's validated fallback: with this few interactions (none for an
            # unknown user) most-popular did better on validation.
            return None, user_idx, "popularity"
        if user_idx > 0 and encoded:
            tensors = self.run.tensors
            row = slice(user_idx, user_idx + 1)
            features = {k: v[row] for k, v in tensors.user_features.items()}
            features.update(encoded)
            features[HISTORY] = tensors.history[row]
            with torch.no_grad():
                query = self.run.model.encode_queries(features)[0]
            return query, user_idx, "personalised"
        if user_idx > 0:
            return self._known_queries()[user_idx], user_idx, "personalised"
        if user_features:
            features = self._encode_user_features(user_features, columns)
            features.update(encoded)
            features[HISTORY] = torch.zeros(
                1, self.run.tensors.history.shape[1], dtype=torch.long
            )
            with torch.no_grad():
                return (
                    self.run.model.encode_queries(features)[0],
                    0,
                    "cold_start_features",
                )
        return None, 0, "popularity"

    def _session_items(self, session: Sequence[Any] | None) -> torch.Tensor | None:
        """``[S]`` item indices of a request's session, oldest first, or None.

        Raises:
            ConfigError: the model reads no history, or the session is malformed.
            UnknownIdError: item IDs the model does not know (the first ten named).
        """
        if session is None or (isinstance(session, list | tuple) and not session):
            return None  # an empty session says nothing: the usual answer
        if isinstance(session, str | bytes | Mapping) or not isinstance(
            session, Sequence
        ):
            raise ConfigError(
                "`session` should be a list of item IDs or of "
                '{"item_id": ..., "timestamp": ...} objects, oldest first. '
                f"Received a {type(session).__name__}."
            )
        if self.run.tensors.history.shape[1] == 0:
            raise ConfigError(
                "`session` is given, but this model reads no history "
                "(`retrieval.history_length` = 0)."
            )
        entries = [e if isinstance(e, Mapping) else {"item_id": e} for e in session]
        bad = [n for n, e in enumerate(entries) if set(e) - {"item_id", "timestamp"}]
        if bad or any("item_id" not in e for e in entries):
            raise ConfigError(
                "each `session` entry should be an item ID or an object with "
                "`item_id` and an optional `timestamp`. Received: "
                f"{[session[n] for n in bad][:3] or session[:3]}."
            )
        times = [e.get("timestamp") for e in entries]
        if all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            order = sorted(range(len(entries)), key=lambda n: float(times[n]))  # type: ignore[arg-type]
            entries = [entries[n] for n in order]
        ids = [e["item_id"] for e in entries]
        indices = [self.item_vocab.lookup(i) for i in ids]
        unknown = [i for i, idx in zip(ids, indices, strict=True) if idx == 0]
        if unknown:
            raise UnknownIdError(
                f"`session` holds item IDs this model does not know: {unknown[:10]}"
                + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                + ". Leave them out (items added after training have no embedding)."
            )
        return torch.tensor(indices, dtype=torch.long)

    def _session_query(
        self,
        user_idx: int,
        user_features: dict[str, Any] | None,
        columns: list[str],
        encoded: dict[str, torch.Tensor],
        session: torch.Tensor,
    ) -> tuple[torch.Tensor, int, Path_]:
        """The query of a session: the user's history (none when anonymous) then the
        session's items, the last ``history_length`` of them."""
        tensors = self.run.tensors
        length = tensors.history.shape[1]
        if user_idx > 0:
            row = slice(user_idx, user_idx + 1)
            features = {k: v[row] for k, v in tensors.user_features.items()}
            stored = tensors.history[user_idx]
            recent = torch.cat([stored[stored > 0], session])[-length:]
        else:
            if user_features:
                features = self._encode_user_features(user_features, columns)
            else:  # row 0: every query field unknown
                features = {k: v[:1] for k, v in tensors.user_features.items()}
            recent = session[-length:]
        features.update(encoded)
        history = torch.zeros(1, length, dtype=torch.long)
        if len(recent):
            history[0, -len(recent) :] = recent
        features[HISTORY] = history
        with torch.no_grad():
            query = self.run.model.encode_queries(features)[0]
        return query, user_idx, "personalised" if user_idx > 0 else "session"

    def _filter_mask(self, filters: dict[str, Any] | None) -> torch.Tensor | None:
        """``[N]`` bool of items that pass every filter (metadata equality, or
        membership for a list column), computed column-wise and cached per filter.

        Raises:
            ConfigError: no metadata, an unknown column, or a value that is not a
                single string, number or bool of the column's kind.
        """
        if not filters:
            return None
        frame = self._item_frame
        if frame is None:
            raise ConfigError(
                "`filters` need item metadata, and this recommender has none."
            )
        columns = [c for c in frame.columns if c != ITEM]
        unknown = sorted(set(filters) - set(columns))
        if unknown:
            raise ConfigError(
                f"unknown filter column(s) {unknown}; the item metadata has {columns}."
            )
        mask = torch.ones(frame.height, dtype=torch.bool)
        for key, wanted in filters.items():
            mask &= self._one_filter(frame, key, wanted)
        return mask

    def _one_filter(self, frame: pl.DataFrame, key: str, wanted: Any) -> torch.Tensor:
        if not isinstance(wanted, str | int | float | bool):
            raise ConfigError(
                f"`filters[{key!r}]` should be one string, number or bool. "
                f"Received: {wanted!r}."
            )
        cached = self._masks.get((key, wanted))
        if cached is not None:
            return cached
        column = pl.col(key)
        is_list = isinstance(frame.schema[key], pl.List)
        expr = column.list.contains(wanted) if is_list else column == wanted
        try:
            values = frame.select(expr.fill_null(False)).to_series().to_numpy()
        except (pl.exceptions.PolarsError, TypeError, ValueError) as e:
            raise ConfigError(
                f"`filters[{key!r}]` = {wanted!r} cannot be compared with the "
                f"{frame.schema[key]} column {key!r}: {e}"
            ) from e
        mask = torch.from_numpy(values.astype(bool))
        if len(self._masks) < 1024:  # a bounded cache of the filters clients use
            self._masks[(key, wanted)] = mask
        return mask

    def recommend(
        self,
        user_id: Any = None,
        k: int = 10,
        *,
        user_features: dict[str, Any] | None = None,
        exclude_seen: bool = True,
        num_candidates: int | None = None,
        filters: dict[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        use_ranker: bool = True,
        explain: bool = False,
        session: Sequence[Any] | None = None,
    ) -> Recommendation:
        """Top ``k`` items for a user.

        Args:
            user_id: a raw user ID; unknown or None means cold start.
            k: how many items to return.
            user_features: raw feature values (e.g. ``{"age": 30, "gender": "F"}``)
                for an unknown user.
            exclude_seen: drop the user's training items.
            num_candidates: how many items retrieval passes to ranking; default:
                ``ranking.num_candidates``, the number the ranking stage was
                evaluated with.
            filters: keep only items whose metadata matches, e.g.
                ``{"genres": "Comedy"}`` (a list column matches by membership).
            context: the moment of the request, for a model that reads
                per-interaction context, e.g. ``{"timestamp": 1700000000}`` (which
                also gives ``hour_of_day`` and ``day_of_week``); missing values
                encode as unknown.
            use_ranker: apply the ranking stage (False: retrieval's order, e.g. to show
                both lists side by side).
            explain: add ``because`` to each item of a known user: the training item
                of theirs closest to it in the candidate embedding space ("because
                you watched ...").
            session: the items of the current session, oldest first: raw item IDs,
                or ``{"item_id": ..., "timestamp": ...}`` mappings (ordered by
                timestamp when every one has one). They follow the user's training
                history (the model reads the last ``retrieval.history_length``
                items) and count as seen; an anonymous session is a query of its
                own (``path="session"``), so it needs no user. Unknown item IDs
                are an error that names them.

        Returns:
            A :class:`Recommendation`; ``path`` says whether the answer is personalised,
            from an anonymous session, a cold start from features, or the popularity
            fallback.
        """
        _check_k("k", k)
        if isinstance(user_id, list | tuple | set | dict):
            raise ConfigError(
                "`user_id` should be one user ID. Received a "
                f"{type(user_id).__name__}; use recommend_batch(user_ids, k) for many."
            )
        if num_candidates is None:
            num_candidates = self.num_candidates
        _check_k("num_candidates", num_candidates)
        session_idx = self._session_items(session)
        query, user_idx, path = self._query(
            user_id, user_features, context, session=session_idx
        )
        seen = self._seen.row(user_idx) if exclude_seen and user_idx > 0 else None
        if exclude_seen and session_idx is not None:
            seen = np.union1d(seen if seen is not None else [], session_idx.numpy())
            seen = seen.astype(np.int64)
        mask = self._filter_mask(filters)
        if query is None or mask is not None:
            excluded = torch.zeros(self.item_embeddings.shape[0], dtype=torch.bool)
            excluded[0] = True
            if seen is not None:
                excluded[torch.from_numpy(seen)] = True
            if mask is not None:
                excluded |= ~mask
        if query is None:
            order = self._popular[~excluded[self._popular]][:k]
            scores = self.run.tensors.fallback_popularity[order]
            return self._answer(user_id, path, order, scores, None)
        width = max(num_candidates, k)
        if mask is None:
            top_scores, top_idx = self.index.search(query[None], width, exclude=[seen])
            found = top_idx[0] >= 0  # rows run short only when the catalogue does
            top_scores, top_idx = top_scores[0][found], top_idx[0][found]
        else:
            # A metadata filter restricts the catalogue: exact search over what passes.
            scores = self.item_embeddings @ query  # (N, D) @ (D,) -> (N,)
            scores = scores.masked_fill(excluded, -torch.inf)
            width = min(width, int((~excluded).sum()))
            top_scores, top_idx = torch.topk(scores, width)
        ranker = self.ranker if use_ranker else None
        if ranker is None or path != "personalised" or not len(top_idx):
            # (Nothing passed the filters: an empty answer, not a ranker error.)
            answer = self._answer(user_id, path, top_idx[:k], top_scores[:k], None)
            return self._explained(answer, user_idx, top_idx[:k]) if explain else answer
        with torch.no_grad():
            out = ranker.score(torch.tensor([user_idx]), top_idx[None, :])
        # The rule evaluation scores: click logit plus a validated share of the
        # retrieval logit.
        logits = top_scores / float(self.run.model.temperature)
        order, keys = rerank(
            out["click"], logits[None, :], blend_weight=ranker.blend_weight
        )
        order, keys = order[0, :k], keys[0, :k]
        answer = self._answer(user_id, path, top_idx[order], top_scores[order], keys)
        ratings = out["rating"][0][order].tolist()
        for entry, rating in zip(answer.items, ratings, strict=True):
            entry["predicted_rating"] = rating
        return self._explained(answer, user_idx, top_idx[order]) if explain else answer

    def _explained(
        self, answer: Recommendation, user_idx: int, idx: torch.Tensor
    ) -> Recommendation:
        """Each item's closest training item of the user (cosine of the candidate
        embeddings); nothing for a user without history."""
        seen = self._seen.row(user_idx) if user_idx > 0 else np.zeros(0, np.int64)
        if not len(seen) or not len(idx):
            return answer
        history = torch.from_numpy(seen.astype(np.int64))
        # (K, D) @ (D, H) -> (K, H): each recommended item against the history.
        similarity = self.item_embeddings[idx] @ self.item_embeddings[history].T
        best = history[similarity.argmax(dim=1)].tolist()
        for entry, index in zip(answer.items, best, strict=True):
            entry["because"] = {
                "item_id": self._item_id_list[index],
                "label": self._labels[index]["label"] if self.items else None,
            }
        return answer

    def search_items(self, text: str, limit: int = 10) -> list[dict[str, Any]]:
        """Items whose label (or ID) contains ``text``, case-insensitive, in
        catalogue order: what a client offers to pick an item by its title."""
        _check_k("limit", limit)
        needle = text.strip().lower()
        found = []
        for index in range(1, len(self._item_id_list)):
            label = self._labels[index]["label"] if self.items else None
            haystack = f"{label or ''} {self._item_id_list[index]}".lower()
            if needle and needle in haystack:
                found.append(index)
                if len(found) == limit:
                    break
        idx = torch.tensor(found, dtype=torch.long)
        items = self._answer(None, "personalised", idx, torch.zeros(len(idx)), None)
        for entry in items.items:
            del entry["score"]  # a match, not a scored recommendation
        return items.items

    def recommend_batch(
        self, user_ids: list[Any], k: int = 10, **options: Any
    ) -> list[Recommendation]:
        """:meth:`recommend` for many users."""
        return [self.recommend(user_id, k, **options) for user_id in user_ids]

    def similar_items(self, item_id: Any, k: int = 10) -> list[dict[str, Any]]:
        """Items whose candidate embeddings are closest to this item's.

        Raises:
            UnknownIdError: the item is not in the catalogue.
        """
        _check_k("k", k)
        item_idx = self.item_vocab.lookup(item_id)
        if item_idx == 0:
            raise UnknownIdError(
                f"`item_id` {item_id!r} is not in the catalogue of this model "
                f"({self.item_vocab.size - 1} items)."
            )
        query = self.item_embeddings[item_idx][None]
        top_scores, top_idx = self.index.search(query, k, exclude=[[item_idx]])
        found = top_idx[0] >= 0
        top_scores, top_idx = top_scores[0][found], top_idx[0][found]
        return self._answer(item_id, "personalised", top_idx, top_scores, None).items

    def history(self, user_id: Any) -> list[dict[str, Any]]:
        """Every distinct training item of the user (with metadata), none left out.

        The most recent ``retrieval.history_length`` items come last, in time order
        (the bundle keeps time order only for that window); older items come first, in
        catalogue order. An unknown user has no history.
        """
        user_idx = self.user_vocab.lookup(user_id)
        if user_idx == 0:
            return []
        row = self.run.tensors.history[user_idx]
        recent = row[row > 0].numpy()
        # Distinct items, each at its latest position in the window.
        _, last = np.unique(recent[::-1], return_index=True)
        recent = recent[::-1][np.sort(last)][::-1]
        older = np.setdiff1d(self._seen.row(user_idx), recent, assume_unique=False)
        idx = torch.from_numpy(np.concatenate([older, recent]).astype(np.int64))
        return self._answer(
            user_id, "personalised", idx, torch.zeros(len(idx)), None
        ).items

    def _answer(
        self,
        user_id: Any,
        path: Path_,
        idx: torch.Tensor,
        retrieval_scores: torch.Tensor,
        rank_scores: torch.Tensor | None,
    ) -> Recommendation:
        indices = idx.tolist()
        scores = retrieval_scores.tolist()
        ranks = None if rank_scores is None else rank_scores.tolist()
        items = []
        for position, index in enumerate(indices):
            entry: dict[str, Any] = {
                "item_id": self._item_id_list[index],
                "score": scores[position],
            }
            if ranks is not None:
                entry["rank_score"] = ranks[position]
            if self.items is not None:
                entry.update(self.items[index])
                entry.update(self._labels[index])
            else:
                entry.update(label=None, tags=[])
            items.append(entry)
        return Recommendation(user_id=user_id, path=path, items=items)

    def with_index(self, config: IndexConfig) -> Recommender:
        """A copy that retrieves with a new index built from ``config``.

        Everything else (model, encoders, metadata, ranker) is shared; the copy's
        saved config records the new index settings.
        """
        num_items = self.item_embeddings.shape[0]
        index = make_index(config).build(
            self.item_embeddings[1:], torch.arange(1, num_items)
        )
        other = copy.copy(self)
        other.run = dataclasses.replace(
            self.run, config=dataclasses.replace(self.run.config, index=config)
        )
        other.index, other.index_kind = index, index.kind
        return other

    # -- persistence -------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write a versioned bundle (see :mod:`twostage.artifacts`)."""
        run = self.run

        def write(temp: Path) -> dict[str, Any]:
            save_config(run.config, temp / "config.json")
            run.spec.save(temp / "features.json")
            state = {k: v.contiguous() for k, v in run.model.state_dict().items()}
            save_file(state, temp / "retrieval.safetensors")
            save_file(tensors_to_flat(run.tensors), temp / "tables.safetensors")
            write_serving(run, temp)
            write_records(run, temp)
            if self.items is not None:
                metadata = pl.DataFrame(self.items[1:]).with_columns(
                    self.item_ids[1:].alias(ITEM)
                )
                metadata.write_parquet(temp / "items.parquet")
            self.index.save(temp / "index")
            if self.ranker is not None:
                from twostage.ranking import save_ranking

                save_ranking(self.ranker, temp / "ranking")  # type: ignore[arg-type]
            return {"kind": "recommender", "ranking": self.ranker is not None}

        return write_bundle(directory, write, overwrite=overwrite)


@contextlib.contextmanager
def _client_values(
    name: str, values: Mapping[str, Any], columns: list[str]
) -> Iterator[None]:
    """Turn an encoder's failure on a request's values into the client's error."""
    try:
        yield
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(
            f"`{name}` {dict(values)!r} cannot be encoded for this model's columns "
            f"{columns} (a value of the wrong kind?): {e}"
        ) from e


def load(directory: str | Path) -> Recommender:
    """The Recommender of a saved model, whatever the CLI accepts there.

    Args:
        directory: a bundle saved by :meth:`Recommender.save` (every checksum is
            verified), ``models/<name>/`` (its newest version), or the ``--out``
            directory of ``twostage train retrieval`` (a retrieval run: no ranker, and
            the item metadata it was trained with).

    Raises:
        ArtifactError: none of these is found at ``directory``.
    """
    path = Path(directory)
    if (path / RUN_WEIGHTS).exists() and not (path / MANIFEST).exists():
        return _load_run_dir(path)
    if path.is_dir() and not any(p.name.isdigit() for p in path.iterdir()):
        return _load_bundle(path)  # a version directory: says what it lacks
    try:
        bundle = resolve_bundle(path)
    except ArtifactError as e:
        raise ArtifactError(
            f"{e} Or pass the --out directory of `twostage train retrieval` (it holds "
            f"{RUN_WEIGHTS})."
        ) from e
    return _load_bundle(bundle)


def _load_run_dir(path: Path) -> Recommender:
    """A retrieval run (``twostage train retrieval --out``) as a Recommender."""
    return Recommender(load_run(path), items=_read_items(path / "items.parquet"))


def _read_items(path: Path) -> pl.DataFrame | None:
    try:
        return pl.read_parquet(path) if path.exists() else None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e}") from e


def _load_bundle(root: Path) -> Recommender:
    manifest = verify_bundle(root)
    run = read_retrieval(
        root, weights="retrieval.safetensors", hint="a bundle saved by Recommender.save"
    )
    read_records(run, root)
    items = _read_items(root / "items.parquet")
    ranker = None
    if manifest.get("ranking"):
        from twostage.ranking import load_ranking

        ranker = load_ranking(root / "ranking", run)
    index = load_index(root / "index") if (root / "index").is_dir() else None
    recommender = Recommender(run, items=items, ranker=ranker, index=index)
    recommender.manifest = manifest
    return recommender
