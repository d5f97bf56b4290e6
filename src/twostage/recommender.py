"""The Recommender: retrieve over the catalogue, drop seen items, rank, return top k.

This is the one object the CLI and the HTTP server use. It holds a trained retrieval
run (towers, encoders, per-user history), the candidate embeddings, optional item
metadata and an optional ranking stage.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
import torch

from twostage.catalogue import (
    catalogue_vocabulary,
    check_added_items,
    check_removed_items,
    check_restored_items,
    item_keys,
    like_metadata,
    merged_metadata,
)
from twostage.config import IndexConfig, RankingConfig
from twostage.data.dataset import ITEM, USER
from twostage.data.user_items import UserItems
from twostage.display import display_columns, label_and_tags
from twostage.diversity import ListRules, check_diversity, diversify
from twostage.errors import ArtifactError, ConfigError, UnknownIdError
from twostage.features.sequences import parse_lists
from twostage.index import ExactIndex, Index, make_index
from twostage.inputs import (
    FAR_STANDARD_DEVIATIONS,
    NUMBER_KINDS,
    ItemFilters,
    by_path,
    candidate_items,
    check_finite_numbers,
    check_k,
    check_raw_id,
    client_values,
    encode_context,
    encode_user_features,
    excluded_items,
    exclusions_by_key,
    far_numbers,
    new_item_features,
    new_items_frame,
    refuse_stray_keys,
    session_indices,
)
from twostage.models.fields import HISTORY, HISTORY_RATINGS, HISTORY_TIMES
from twostage.ranking.rerank import rerank
from twostage.retrieval.run import RetrievalRun, encode_queries
from twostage.retrieval.tensors import context_keys, session_history

if typing.TYPE_CHECKING:
    from twostage.features.vocab import Vocabulary
    from twostage.session_batch import SessionLists

__all__ = ["Recommendation", "Recommender", "Ranker", "load"]

logger = logging.getLogger(__name__)

Path_ = Literal["personalised", "session", "cold_start_features", "popularity"]


class Ranker(Protocol):
    """What the Recommender needs of a ranking stage (see :mod:`twostage.ranking`)."""

    config: RankingConfig
    blend_weight: float
    #: Its test figures, measured after training (None: not measured).
    metrics: dict[str, Any] | None
    #: Trained with each row's own context: it reads a request's.
    reads_context: bool

    @property
    def ease(self) -> torch.nn.Module | None:
        """The EASE term's factorised matrix, if the ranker has one."""
        ...

    @property
    def predicts_ratings(self) -> bool:
        """Whether its rating head was trained (answers carry predicted ratings)."""
        ...

    def score(
        self,
        user_idx: torch.Tensor,
        item_idx: torch.Tensor,
        *,
        context: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``[B]`` users x ``[B, C]`` candidates -> ``{"rating", "click"}`` ``[B, C]``
        (``context``: each query's encoded context, read where it trained on it)."""
        ...

    def ease_scores(
        self,
        user_idx: torch.Tensor,
        item_idx: torch.Tensor,
        *,
        rows: UserItems | None = None,
    ) -> torch.Tensor | None:
        """``[B, C]`` the EASE term of the re-ranking order (of ``rows``' items
        when given, else of the users'), or None."""
        ...

    def score_features(
        self,
        user_idx: torch.Tensor,
        side: dict[str, torch.Tensor],
        vectors: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """``[1]`` user x ``C`` items given by their encoded candidate side (new
        items) -> ``{"rating", "click"}`` ``[1, C]``."""
        ...

    def user_fields(self, user_idx: int) -> dict[str, torch.Tensor]:
        """``{key: [1, ...]}`` a known user's encoded query fields and history,
        as its tables hold them (the context unknown)."""
        ...

    def score_user(
        self,
        fields: dict[str, torch.Tensor],
        query_vector: torch.Tensor | None,
        item_idx: torch.Tensor | None = None,
        *,
        item_side: dict[str, torch.Tensor] | None = None,
        item_vectors: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """A user given by its encoded query fields (a cold start) x ``[C]``
        items, or new items by their side -> ``{"rating", "click"}`` ``[1, C]``."""
        ...

    def with_items(
        self, ids: pl.Series, items: pl.DataFrame | None
    ) -> tuple[Ranker, torch.Tensor, int]:
        """This ranker with rows for the new IDs among ``ids`` (encoded from
        their rows of ``items``) after its own, their indices, and how many
        were new."""
        ...


@dataclass(frozen=True)
class _NewItems:
    """A request's new candidate items: their raw IDs and feature values as sent,
    their encoded candidate side and ``[C, D]`` retrieval embeddings."""

    ids: list[Any]
    rows: list[dict[str, Any]]
    side: dict[str, torch.Tensor]
    vectors: torch.Tensor


@dataclass
class Recommendation:
    """The answer for one user: ranked items and which path produced them."""

    user_id: Any
    path: Path_
    items: list[dict[str, Any]] = field(default_factory=list)
    #: The request's session items added to the catalogue after training
    #: (:meth:`Recommender.add_items`): excluded as seen, but not read by the
    #: model, which knows nothing of them yet.
    unread_session_items: list[Any] = field(default_factory=list)
    #: The request's ``candidates`` entries the answer cannot hold, each
    #: ``{"position", "item_id", "reason"}`` (``seen``: the query's seen items
    #: are excluded; ``filters``: the request's filters leave it out;
    #: ``repeated``: listed before, ranked once; ``excluded``: named in the
    #: request's ``exclude``).
    left_out_candidates: list[dict[str, Any]] = field(default_factory=list)
    #: The request's new items (``candidates`` sent as objects) when the model
    #: reads no item feature beside the ID: each is the unknown item's vector,
    #: so they score alike and their order among themselves means nothing.
    alike_new_items: list[Any] = field(default_factory=list)
    #: The request's ``exclude`` IDs the model does not know: nothing to leave
    #: out of the answer, which could not hold them anyway (listed, so that a
    #: mistyped ID does not pass unseen).
    unknown_excluded_items: list[Any] = field(default_factory=list)
    #: Why the answer holds fewer items than asked for (None: it does not):
    #: ``no_more_items`` (the catalogue less the seen, excluded and filtered
    #: items, or the request's ``candidates``, held no more) or ``max_per``
    #: (the limits passed over candidates of the widest pool looked at).
    short_reason: str | None = None
    #: Why the request's ``user_features`` were not read (None: they were, or
    #: none were given): ``known_user`` (the model has learned the user) or
    #: ``popularity_fallback`` (the run's fallback serves users with at most
    #: ``retrieval.popularity_fallback`` training items, a new one too).
    user_features_unread: str | None = None
    #: How many candidates the answer was picked from (the pool's size).
    pool_size: int = field(default=0, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"user_id": self.user_id, "path": self.path, "items": self.items}
        if self.unread_session_items:
            out["unread_session_items"] = self.unread_session_items
        if self.left_out_candidates:
            out["left_out_candidates"] = self.left_out_candidates
        if self.alike_new_items:
            out["alike_new_items"] = self.alike_new_items
        if self.unknown_excluded_items:
            out["unknown_excluded_items"] = self.unknown_excluded_items
        if self.short_reason:
            out["short_reason"] = self.short_reason
        if self.user_features_unread:
            out["user_features_unread"] = self.user_features_unread
        return out


def _grown(base: Index, embeddings: torch.Tensor, served: torch.Tensor) -> Index | None:
    """``base`` grown by the ``served`` items (indices into ``embeddings``) it
    lacks, or None where it holds one no longer served or cannot grow."""
    held = base.ids
    if base.dim != embeddings.shape[1] or not np.isin(held, served.numpy()).all():
        return None
    missing = served[torch.from_numpy(~np.isin(served.numpy(), held))]
    if not len(missing):
        return base
    return base.extended(embeddings[missing], missing)


def _pad_columns(values: torch.Tensor, columns: int, fill: float) -> torch.Tensor:
    """``values`` ``[B, C]`` widened to ``columns`` with ``fill``."""
    return torch.nn.functional.pad(values, (0, columns - values.shape[1]), value=fill)


def _noting(
    answer: Recommendation,
    unread: list[Any],
    left_out: list[dict[str, Any]],
    alike: list[Any],
    unknown_excluded: list[Any],
) -> Recommendation:
    """``answer`` with the session's items the model did not read listed, the
    candidates it cannot hold, the new items it cannot tell apart and the
    ``exclude`` IDs it does not know."""
    answer.unread_session_items = unread
    answer.left_out_candidates = left_out
    answer.alike_new_items = alike
    answer.unknown_excluded_items = unknown_excluded
    return answer


def _left_out_candidates(
    candidates: Sequence[Any],
    item_vocab: Vocabulary,
    seen: np.ndarray | None,
    passes: torch.Tensor | None,
    dropped: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Each entry of a request's known ``candidates`` that its answer cannot
    hold, with its position and why: ``excluded`` (in the request's
    ``exclude``, the indices ``dropped``), ``seen`` (excluded as the query's
    seen items), ``filters`` (outside the request's filters) or ``repeated`` (an
    item listed before, ranked once). New items (objects of features) are
    ranked."""
    excluded = set() if seen is None else set(seen.tolist())
    asked_out = set() if dropped is None else set(dropped.tolist())
    first: set[int] = set()
    out = []
    for position, value in enumerate(candidates):
        raw = value[ITEM] if isinstance(value, Mapping) else value
        idx = item_vocab.lookup(raw)
        if idx == 0:
            continue
        if idx in asked_out:
            reason = "excluded"
        elif idx in excluded:
            reason = "seen"
        elif passes is not None and not bool(passes[idx]):
            reason = "filters"
        elif idx in first:
            reason = "repeated"
        else:
            first.add(idx)
            continue
        out.append({"position": position, "item_id": raw, "reason": reason})
    return out


def _id_list(name: str, ids: Any, order: str) -> list[Any]:
    """``ids`` as a list, if it is a list, tuple, array or Series of IDs: a string
    would be read one character per ID, a set has no order."""
    if isinstance(ids, str | bytes | int | dict | set) or not hasattr(ids, "__iter__"):
        what = "user" if name.startswith("user") else "item"
        raise ConfigError(
            f"`{name}` should be a list of {what} IDs, in the order of the {order}. "
            f"Received: {ids!r} ({type(ids).__name__})."
        )
    return list(ids)


def _check_flag(name: str, value: bool) -> bool:
    """A switch must be a bool: ``exclude_seen="no"`` is truthy, and would have
    done the opposite of what it says."""
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(
            f"`{name}` should be True or False. Received: `{name}` = {value!r}."
        )
    return bool(value)


class Recommender:
    """Two-stage recommendations from a trained retrieval run (and optional ranker).

    Args:
        run: the trained retrieval run.
        items: item metadata keyed by ``item_id`` (title, genres...) for display and
            filters; optional.
        ranker: a ranking stage scoring (user, candidate) pairs; optional.
        index: the nearest-neighbour index over the candidate embeddings (ids are
            item indices); built from ``run.config.index`` when not given.
        added_items: items added to the catalogue after training, one row each
            (``item_id``, the item feature columns, any metadata): see
            :meth:`add_items`.
        removed_items: IDs of items no longer served (:meth:`remove_items`).
        grow: without ``index``, an approximate index of an earlier catalogue of
            this model (:meth:`add_items`) to grow by the items it lacks
            (:meth:`Index.extended`, kind and settings kept) instead of
            building one: minutes saved for a large HNSW graph. Built anew
            where it holds an item no longer served, or is exact (which costs
            nothing to build).
    """

    def __init__(
        self,
        run: RetrievalRun,
        *,
        items: pl.DataFrame | None = None,
        ranker: Ranker | None = None,
        index: Index | None = None,
        added_items: pl.DataFrame | None = None,
        removed_items: pl.Series | None = None,
        grow: Index | None = None,
    ) -> None:
        self.run = run
        self.user_vocab = run.spec.vocabulary(USER)
        #: The catalogue's items: the model's item vocabulary, then the added items.
        self.item_vocab = run.spec.vocabulary(ITEM)
        self.item_embeddings = run.item_embeddings()  # [N, D]
        self.dim = int(self.item_embeddings.shape[1])
        #: The item feature columns a new candidate item may carry.
        self._item_columns = list(
            dict.fromkeys(
                f.column
                for f in run.spec.describe(side="candidate")
                if f.column != ITEM
            )
        )
        #: Rows of the items the model trained on (the OOV row included): the
        #: catalogue's added items come after them.
        self.num_trained_items = int(self.item_embeddings.shape[0])
        #: What was given, kept to save the bundle and to add more items.
        self._trained_metadata, self._trained_ranker = items, ranker
        #: The items added after training (:meth:`add_items`), as the catalogue
        #: holds them; None when there are none.
        self.added_items: pl.DataFrame | None = None
        if added_items is not None:
            added = self._check_added(added_items)
            vectors = self._encode_added(added)
            self.item_vocab = catalogue_vocabulary(self.item_vocab, added[ITEM])
            self.item_embeddings = torch.cat([self.item_embeddings, vectors])
            if ranker is not None:
                ranker = ranker.with_items(added[ITEM], added)[0]
            items = merged_metadata(items, added)
            self.added_items = added
        self.ranker = ranker
        #: The items no longer served (:meth:`remove_items`): ``[N]`` bool by item
        #: index, and their IDs as the catalogue holds them (None: none).
        self.removed_items: pl.Series | None = None
        self._removed = torch.zeros(self.item_embeddings.shape[0], dtype=torch.bool)
        if removed_items is not None:
            self.removed_items = check_removed_items(
                removed_items, self.item_vocab, None
            )
            removed = self.item_vocab.transform(self.removed_items)
            self._removed[torch.from_numpy(removed.astype(np.int64))] = True
        served = self._served_items()
        if index is None and grow is not None and not grow.is_exact:
            index = _grown(grow, self.item_embeddings, served)
        if index is None:
            index = make_index(run.config.index).build(
                self.item_embeddings[served], served
            )
        if index.size != len(served) or index.dim != self.dim:
            raise ArtifactError(
                f"the {index.kind} index holds {index.size} vectors of width "
                f"{index.dim}; this model serves {len(served)} items of width "
                f"{self.dim}. Rebuild the index for this model."
            )
        self.index = index
        self.index_kind = index.kind
        #: How many times wider than ``num_candidates`` a pool may grow when
        #: ``max_per`` leaves a list short (:meth:`deepest_width`); 1: never,
        #: the list stays short. Not saved with a bundle (``serve --widening``).
        self.widening = 16
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
        # The metadata as columns, row = item index, for vectorised filters;
        # a set-valued feature held as text ("hats|kids", from a CSV) as the
        # values the model reads, so that a filter, a limit per value and
        # diversity by the column see "kids" in it.
        sets = {
            column: separator
            for column, separator in self._set_columns().items()
            if items is not None and items.schema.get(column) == pl.String
        }
        view = None
        if items is not None:
            view = self.item_ids.to_frame().join(
                items, on=ITEM, how="left", maintain_order="left"
            )
            view = view.with_columns(
                parse_lists(view[c], separator=s).alias(c) for c, s in sets.items()
            )
        self._filters = ItemFilters(view, sets)
        data = run.config.data
        self.display = display_columns(
            items, title=data.title_col, tags=data.tags_col, key=ITEM
        )
        if self.display.tags in sets:
            self.display = dataclasses.replace(
                self.display, separator=sets[self.display.tags]
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
        #: The path it was loaded from (``load``); None: built in this process.
        self.loaded_from: str | None = None
        popularity = run.tensors.fallback_popularity.clone()
        popularity[0] = -1.0
        self._popular = torch.argsort(popularity, descending=True, stable=True)
        self._popular = self._popular[~self._removed[self._popular]]
        self._query_cache: torch.Tensor | None = None

    @property
    def trained_ranker(self) -> Ranker | None:
        """The ranking stage as trained: :attr:`ranker` without the rows of the
        items added to the catalogue."""
        return self._trained_ranker

    @property
    def has_trained_metadata(self) -> bool:
        """Whether the trained items came with metadata (:attr:`items` may also
        hold only the added items' rows)."""
        return self._trained_metadata is not None

    @property
    def item_feature_columns(self) -> list[str]:
        """The item feature columns the model reads: what a new item among a
        request's ``candidates`` may carry beside its ``item_id``."""
        return list(self._item_columns)

    @property
    def item_filters(self) -> ItemFilters:
        """The catalogue's metadata filters (what ``filters=`` reads)."""
        return self._filters

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
        """``[U, D]`` query embeddings of every known user, computed once, a
        chunk of users at a time (:func:`~twostage.retrieval.run.encode_queries`)."""
        if self._query_cache is None:
            tensors = self.run.tensors
            features = dict(tensors.user_features)
            features.update(tensors.history_features(slice(None)))  # views
            self._query_cache = encode_queries(self.run.model, features)
        return self._query_cache

    # -- the catalogue ------------------------------------------------------------
    def seen_items(self, user_idx: int) -> np.ndarray:
        """The sorted item indices a known user (``user_idx`` > 0) trained on
        and served as history: what ``exclude_seen`` leaves out for them."""
        return self._seen.row(user_idx)

    @property
    def removed_mask(self) -> torch.Tensor:
        """``[N]`` bool: True for the catalogue rows no longer served
        (:meth:`remove_items`)."""
        return self._removed

    def add_items(self, items: Any) -> Recommender:
        """A copy whose catalogue also holds ``items``: items the model never
        trained on (a shop's new products, the day's news), added without
        retraining (:mod:`twostage.catalogue`).

        Each item is embedded from its feature values by the candidate tower, its
        ID at the unknown row (as a new item among a request's ``candidates``
        is), and indexed beside the trained items (an exact index is built
        again; an approximate one is grown: a copy with their vectors added, its
        settings kept). From then on it is retrieved, filtered by its
        metadata, shown with it, found by :meth:`similar_items`, and ranked by
        the ranking stage from the same features; the EASE term, the
        transition counts and the session-kNN term, which learned from the
        training log, give it 0, and the popularity fallback never serves it
        (it has no rows in the log). In a request's ``session`` it counts as
        seen but is not read (the model reads a session's items by what it
        learned of them), and the answer lists it under
        ``unread_session_items``.
        :meth:`save` keeps the added items; the model's weights are unchanged.

        Args:
            items: a table (polars, pandas or pyarrow) of one row per item:
                ``item_id`` (an ID the catalogue does not hold; the column may
                instead have the name the training item table's IDs had,
                ``data.item_col`` or ``data.item_table_key``), every column of :attr:`item_feature_columns` in the layout
                of the training item table (null where unknown), and any metadata
                columns (title, tags, a filter's column...).

        Raises:
            ConfigError: naming the rows or IDs at fault (see
                :func:`twostage.catalogue.check_added_items`), or a value the
                encoders cannot read.
        """
        added = self._check_added(items)
        if not self._item_columns:
            logger.warning(
                "this model reads no item feature beside the ID: each of the %d "
                "added item(s) is the unknown item's vector, the same for all, so "
                "nothing tells them apart in retrieval; train with item features "
                "(`data.item_features`) to add items by what they are.",
                added.height,
            )
        if self.added_items is not None:
            added = merged_metadata(self.added_items, added)
        return Recommender(
            self.run,
            items=self._trained_metadata,
            ranker=self._trained_ranker,
            added_items=added,
            removed_items=self.removed_items,
            grow=self.index,
        )

    def remove_items(self, item_ids: Sequence[Any] | pl.Series) -> Recommender:
        """A copy that no longer serves ``item_ids`` (discontinued products,
        expired news), without retraining: they leave the index, the popularity
        fallback, the answers of :meth:`recommend` and :meth:`similar_items`, and
        a request's ``candidates`` (where one is an error that names it). The
        model still reads them where they are history: a user's training items,
        a session's items, an item whose similar items are asked for.

        Raises:
            ConfigError: an ID the catalogue does not hold, one already removed
                or listed twice, or every item of the catalogue.
        """
        removed = check_removed_items(item_ids, self.item_vocab, self.removed_items)
        if self.removed_items is not None:
            removed = pl.concat([self.removed_items, removed])
        return Recommender(
            self.run,
            items=self._trained_metadata,
            ranker=self._trained_ranker,
            added_items=self.added_items,
            removed_items=removed,
        )

    def restore_items(self, item_ids: Sequence[Any] | pl.Series) -> Recommender:
        """A copy that serves again items :meth:`remove_items` took out (a
        product back in stock, a seasonal one), as before their removal: in
        the index, the popularity fallback and every answer. An exact index is
        built again; an approximate one is grown by their vectors, as
        :meth:`add_items` grows it.

        Raises:
            ConfigError: an ID the catalogue does not hold, one listed twice, or
                one that was not removed.
        """
        back = check_restored_items(item_ids, self.item_vocab, self.removed_items)
        assert self.removed_items is not None  # else every ID was refused
        left = self.removed_items.filter(~self.removed_items.is_in(back.implode()))
        return Recommender(
            self.run,
            items=self._trained_metadata,
            ranker=self._trained_ranker,
            added_items=self.added_items,
            removed_items=left if len(left) else None,
            grow=self.index,
        )

    def _served_items(self) -> torch.Tensor:
        """``[M]`` the item indices the index holds: every item but the OOV row
        (never a candidate) and the removed ones."""
        served = ~self._removed
        served[0] = False
        return torch.nonzero(served)[:, 0]

    def _set_columns(self) -> dict[str, str]:
        """Each set-valued (multi-hot) item feature column and its separator."""
        return {
            f.column: getattr(self.run.spec.encoder(f.key), "separator", "|")
            for f in self.run.spec.describe(side="candidate")
            if f.kind == "multi_hot"
        }

    def _check_added(self, items: Any) -> pl.DataFrame:
        fields = self.run.spec.describe(side="candidate")
        numeric = [f.column for f in fields if f.kind in NUMBER_KINDS]
        added = check_added_items(
            items,
            self.item_vocab,
            self._item_columns,
            numeric,
            keys=item_keys(self.run.config.data),
            # none yet while the constructor reads the bundle's added items
            removed=getattr(self, "removed_items", None),
        )
        for column in numeric:
            far = far_numbers(self.run.spec, column, added[column])
            if far:
                rows = ", ".join(str(row + 1) for row, _ in far[:10])
                raise ConfigError(
                    f"`items`[{column!r}]: rows {rows} hold values more than "
                    f"{FAR_STANDARD_DEVIATIONS:g} standard deviations from the mean "
                    f"of the values this model trained on (the farthest "
                    f"{max(z for _, z in far):.3g}): it would read them as noise."
                )
        return like_metadata(added, self._trained_metadata, self._set_columns())

    def _encode_added(self, added: pl.DataFrame) -> torch.Tensor:
        """``[A, D]`` the candidate embeddings of items to add to the catalogue."""
        ids = added[ITEM].to_list()
        named = {"items": ids[:5] + (["..."] if len(ids) > 5 else [])}
        with client_values("items", named, self._item_columns):
            side = self.run.spec.transform_items(
                added.select(ITEM, *self._item_columns)
            )
        with torch.no_grad():
            vectors = self.run.model.encode_items(side)
        _refuse_non_finite(vectors, "items", f"the items {named['items']}")
        return vectors

    # -- queries -----------------------------------------------------------------
    def encode_context(
        self, context: Mapping[str, Any] | None
    ) -> dict[str, torch.Tensor]:
        """``{key: [1, ...]}`` one request's encoded context (unknown where
        missing; empty for a model that reads none).

        Raises:
            ConfigError: context given to a model that reads none, or a value its
                column cannot hold.
        """
        return encode_context(self.run.spec, self._context_keys, context)

    def _encode_user_features(
        self, user_features: dict[str, Any], columns: list[str]
    ) -> dict[str, torch.Tensor]:
        return encode_user_features(
            self.run.spec, self._context_keys, user_features, columns
        )

    def user_feature_columns(self) -> list[str]:
        """The user feature columns a request's ``user_features`` may carry."""
        return [
            f.column
            for f in self.run.spec.describe(side="query")
            if f.column != USER and f.column not in self._context_keys
        ]

    def _query(
        self,
        user_id: Any,
        user_features: dict[str, Any] | None,
        encoded: dict[str, torch.Tensor],
        *,
        session: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, int, Path_, dict[str, torch.Tensor] | None]:
        """(query embedding [D] or None, user_idx, path, the encoded query fields
        when the request gives them: a new user's features, or a session's history
        with the user's fields). ``encoded``: the request's encoded context
        (:meth:`encode_context`); ``session``: ``[S]`` item indices of the current
        session, oldest first, their times and ratings (NaN: none)."""
        user_idx = self.user_vocab.lookup(user_id) if user_id is not None else 0
        columns = self.user_feature_columns()
        if user_features:  # nested as in the log: {"geo": {"country": "NO"}}
            user_features = by_path(user_features)
        fields = None
        if user_features:  # a client's mistake is reported on every path
            unknown = sorted(set(user_features) - set(columns))
            if unknown:
                raise ConfigError(
                    f"unknown user feature(s) {unknown}; this model reads {columns}."
                )
            fields = self._encode_user_features(user_features, columns)
        if session is not None:
            return self._session_query(user_idx, fields, encoded, session)
        if self._popular_users[user_idx]:
            # The run's validated fallback: with this few interactions (none for an
            # unknown user) most-popular did better on validation.
            return None, user_idx, "popularity", None
        if user_idx > 0 and encoded:
            tensors = self.run.tensors
            row = slice(user_idx, user_idx + 1)
            features = {k: v[row] for k, v in tensors.user_features.items()}
            features.update(encoded)
            features.update(tensors.history_features(row))
            with torch.no_grad():
                query = self.run.model.encode_queries(features)[0]
            _refuse_non_finite(query, "context", "the request's context")
            return query, user_idx, "personalised", None
        if user_idx > 0:
            return self._known_queries()[user_idx], user_idx, "personalised", None
        if fields is not None:
            features = dict(fields)
            features.update(encoded)
            features[HISTORY] = torch.zeros(
                1, self.run.tensors.history.shape[1], dtype=torch.long
            )
            with torch.no_grad():
                query = self.run.model.encode_queries(features)[0]
            _refuse_non_finite(query, "user_features", "this user's features")
            return query, 0, "cold_start_features", fields
        return None, 0, "popularity", None

    def _session_query(
        self,
        user_idx: int,
        fields: dict[str, torch.Tensor] | None,
        encoded: dict[str, torch.Tensor],
        session: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, int, Path_, dict[str, torch.Tensor]]:
        """The query of a session: the user's history (none when anonymous) then the
        session's items, the last ``history_length`` of them (with their times when
        the model reads time gaps, their ratings when it reads ratings), and the
        encoded query fields the ranker reads (the same, less the request's
        context, which the ranker never trains on).
        ``fields``: an anonymous user's encoded features."""
        tensors = self.run.tensors
        length = tensors.history.shape[1]
        items, times, ratings = session_history(tensors, user_idx, session)
        if user_idx > 0:
            row = slice(user_idx, user_idx + 1)
            features = {k: v[row] for k, v in tensors.user_features.items()}
        else:
            if fields is not None:
                features = dict(fields)
            else:  # row 0: every query field unknown
                features = {k: v[:1] for k, v in tensors.user_features.items()}
        recent, times, ratings = items[-length:], times[-length:], ratings[-length:]
        features.update(encoded)
        history = torch.zeros(1, length, dtype=torch.long)
        if len(recent):
            history[0, -len(recent) :] = recent
        features[HISTORY] = history
        if tensors.history_times.numel():
            features[HISTORY_TIMES] = torch.zeros(1, length, dtype=torch.long)
            if len(recent):
                features[HISTORY_TIMES][0, -len(recent) :] = times
        if tensors.history_ratings.numel():
            features[HISTORY_RATINGS] = torch.zeros(1, length, dtype=torch.long)
            if len(recent):
                features[HISTORY_RATINGS][0, -len(recent) :] = ratings
        with torch.no_grad():
            query = self.run.model.encode_queries(features)[0]
        _refuse_non_finite(query, "session", "the session's features and context")
        path: Path_ = "personalised" if user_idx > 0 else "session"
        # The request's context joins the ranker's fields only where the ranker
        # trained with each row's own (`recommend`): not here.
        ranked = {k: v for k, v in features.items() if k not in encoded}
        return query, user_idx, path, ranked

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
        candidates: Sequence[Any] | None = None,
        exclude: Sequence[Any] | None = None,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
    ) -> Recommendation:
        """Top ``k`` items for a user.

        Args:
            user_id: a raw user ID, an integer or a string (digits also find an
                integer ID); unknown or None means cold start.
            k: how many items to return.
            user_features: raw feature values (e.g. ``{"age": 30, "gender": "F"}``)
                for an unknown user, read by both stages (``cold_start_features``).
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
                or ``{"item_id": ..., "timestamp": ..., "rating": ...}`` mappings
                (ordered by timestamp when every one has one; a rating is read by
                a model with ``retrieval.sequence_ratings``). They follow the
                user's training history (the model reads the last
                ``retrieval.history_length`` items) and count as seen; an anonymous session is a query of its
                own (``path="session"``), so it needs no user. The ranker reads the
                session as the query's history too, and its EASE term the
                session's items. Unknown item IDs are an error that names them;
                an item added after training (:meth:`add_items`) is seen but not
                read, and listed in the answer's ``unread_session_items`` (a
                session of such items alone is answered as if there were none).
            candidates: rank these items only (raw item IDs, e.g. the list of a
                retrieval of your own): the answer orders them as the whole
                catalogue would be ordered, ranker included, and
                ``exclude_seen`` and ``filters`` still apply; ask for ``k`` as
                long as the list to get every one back. Unknown item IDs are an
                error that names them, unless an entry is an object of the
                item's features, ``{"item_id": ..., "<feature>": ...}``: a new
                item (an ID the model never trained on), ranked by both stages
                from those features (``new_item`` in its answer; no ``filters``
                with new items). A known item sent as an object is the known item.
                The entries the answer cannot hold (seen, outside the filters, or
                listed twice) are in its ``left_out_candidates``. A model that
                reads no item feature beside the ID cannot tell new items apart:
                they are listed in its ``alike_new_items``.
            exclude: raw item IDs to leave out of this answer (the items of a
                basket, those shown on the page before): dropped as seen items
                are, and not read as history (``session`` is for that). IDs the
                model does not know cannot be in the answer; they are listed in
                its ``unknown_excluded_items``.
            diversity: from 0 (the default: the list as scored) to 1: the
                answer's ``k`` items are re-picked from the candidates by
                maximal marginal relevance (:func:`twostage.diversity.diversify`),
                trading each item's score against its likeness, in the candidate
                embedding space, to the items picked before it. The items keep
                their scores, so a diverse answer is not in score order.
            max_per: ``{metadata column: n}``, at most ``n`` items of the
                answer sharing a value of the column (``{"brand": 2}``; a list
                column's item counts towards each of its values): an item
                past the limit gives its place to the next candidate. When
                the limits pass over so many that the answer runs short, it
                is picked again from a pool four times as wide, up to
                :attr:`widening` (16) times ``num_candidates`` or the
                catalogue (:meth:`deepest_width`); past that it stays short
                (``rec.widening = 1``: never wider). New items
                in ``candidates`` have no metadata and count towards none.
            diversity_by: a metadata column (``"genres"``) whose values make
                two items alike for ``diversity``, in place of their candidate
                embeddings: the cosine of their multi-hot rows, ``shared /
                sqrt(n_a * n_b)`` (an item without a value, or a new item, is
                like none). Read only when ``diversity`` is above 0.

        Returns:
            A :class:`Recommendation`; ``path`` says whether the answer is personalised,
            from an anonymous session, a cold start from features, or the popularity
            fallback.
        """
        k = check_k("k", k)
        width = self.candidate_width(num_candidates, k)
        deepest = self.deepest_width(width)
        while True:
            answer = self._recommend(
                user_id,
                k,
                user_features=user_features,
                exclude_seen=exclude_seen,
                num_candidates=width,
                filters=filters,
                context=context,
                use_ranker=use_ranker,
                explain=explain,
                session=session,
                candidates=candidates,
                exclude=exclude,
                diversity=diversity,
                max_per=max_per,
                diversity_by=diversity_by,
            )
            if len(answer.items) < k:  # the pool held too few, or the limits
                limited = bool(max_per) and answer.pool_size > len(answer.items)
                answer.short_reason = "max_per" if limited else "no_more_items"
            if user_features and answer.path in ("personalised", "popularity"):
                # given, checked, and not read: the client should know why
                known = answer.path == "personalised" or (
                    user_id is not None and self.user_vocab.lookup(user_id) > 0
                )
                answer.user_features_unread = (
                    "known_user" if known else "popularity_fallback"
                )
            if not max_per or len(answer.items) >= k or width >= deepest:
                return answer
            if candidates is not None and width >= len(candidates):
                return answer  # the pool held every candidate given
            width = min(4 * width, deepest)  # the limits passed over too many

    def _recommend(
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
        candidates: Sequence[Any] | None = None,
        exclude: Sequence[Any] | None = None,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
    ) -> Recommendation:
        """:meth:`recommend` from a pool of ``num_candidates``, once."""
        k = check_k("k", k)
        exclude_seen = _check_flag("exclude_seen", exclude_seen)
        use_ranker = _check_flag("use_ranker", use_ranker)
        explain = _check_flag("explain", explain)
        rules = self.list_rules(diversity, max_per, diversity_by)
        if isinstance(user_id, list | tuple | set | dict):
            raise ConfigError(
                "`user_id` should be one user ID. Received a "
                f"{type(user_id).__name__}; use recommend_batch(user_ids, k) for many."
            )
        if user_id is not None:
            check_raw_id("user_id", user_id)
        num_candidates = self.candidate_width(num_candidates, k)
        bounds = self.run.tensors.rating_range.tolist()
        read = session_indices(
            session,
            self.item_vocab,
            history_length=int(self.run.tensors.history.shape[1]),
            rating_range=(bounds[0], bounds[1]) if bounds else None,
        )
        if (
            read is not None
            and not self.run.tensors.reads_ratings
            and not bool(read[2].isnan().all())
        ):
            raise ConfigError(
                "`session` entries carry a `rating`, which this model does not read "
                "(it was trained without `retrieval.sequence_ratings`); leave the "
                "ratings out."
            )
        unread: list[Any] = []
        session_all = None if read is None else read[0]  # seen, added items too
        if read is not None and session_all is not None:
            # Items added after training are seen but not read: the model reads a
            # session's items by what it learned of them, and knows nothing of
            # these yet (the answer lists them).
            added = session_all >= self.num_trained_items
            if bool(added.any()):
                ids = self.item_vocab.inverse_transform(session_all[added].numpy())
                unread = ids.unique(maintain_order=True).to_list()
                kept = ~added
                read = (
                    (read[0][kept], read[1][kept], read[2][kept])
                    if bool(kept.any())
                    else None
                )
        session_idx = None if read is None else read[0]
        encoded = self.encode_context(context)  # once: a polars frame, 0.3 ms
        query, user_idx, path, fields = self._query(
            user_id, user_features, encoded, session=read
        )
        seen = self._seen.row(user_idx) if exclude_seen and user_idx > 0 else None
        if exclude_seen and session_all is not None:
            seen = np.union1d(seen if seen is not None else [], session_all.numpy())
            seen = seen.astype(np.int64)
        dropped, unknown_excluded = excluded_items(exclude, self.item_vocab)
        if dropped is not None:  # left out as seen items are
            seen = np.union1d(seen if seen is not None else [], dropped)
            seen = seen.astype(np.int64)
        mask = self._filters.mask(filters)
        asked = candidate_items(
            candidates, self.item_vocab, self._item_columns, self._set_columns()
        )
        new = None
        left_out: list[dict[str, Any]] = []
        alike: list[Any] = []
        if asked is not None:  # the client's own candidates: the catalogue shrinks
            left_out = _left_out_candidates(
                candidates or [], self.item_vocab, seen, mask, dropped
            )
            chosen, frame = asked
            gone = torch.as_tensor(chosen, dtype=torch.long)
            gone = gone[self._removed[gone]]
            if len(gone):
                names = self.item_vocab.inverse_transform(gone.numpy()).to_list()
                raise UnknownIdError(
                    f"`candidates` holds item(s) removed from the catalogue: "
                    f"{names[:5]}. They are no longer served; leave them out."
                )
            only = torch.zeros(self.item_embeddings.shape[0], dtype=torch.bool)
            only[chosen] = True
            mask = only if mask is None else mask & only
            if frame is not None:
                if filters:
                    raise ConfigError(
                        "`filters` read the catalogue's metadata, which new items "
                        "in `candidates` do not have; filter the candidates before "
                        "sending them, or leave the filters out."
                    )
                new = self._new_items(frame)
                if not self._item_columns:  # each the unknown item's vector
                    alike = list(new.ids)
                named = set(map(str, unknown_excluded)) & set(map(str, new.ids))
                if named:
                    raise ConfigError(
                        "`exclude` names new item(s) sent in `candidates`: "
                        f"{sorted(named)[:10]}; leave them out of the candidates "
                        "instead."
                    )
        exact = self.run.scores_exactly
        if query is None or mask is not None or exact:
            excluded = self._removed.clone()
            excluded[0] = True
            if seen is not None:
                excluded[torch.from_numpy(seen)] = True
            if mask is not None:
                excluded |= ~mask
        notes = (unread, left_out, alike, unknown_excluded)
        width = max(num_candidates, k)
        if query is None:
            pool = width if rules else k
            order = self._popular[~excluded[self._popular]][:pool]
            scores = self.run.tensors.fallback_popularity[order]
            if new is not None:  # no popularity yet: after the known items
                extra = self._new_range(new)[: pool - len(order)]
                order = torch.cat([order, extra])
                scores = torch.cat([scores, torch.zeros(len(extra))])
            pool_size = len(order)
            order, scores = self._picked_in_order(order, scores, k, rules, new=new)
            answer = self._answer(user_id, path, order, scores, None, new=new)
            answer.pool_size = pool_size
            return _noting(answer, *notes)
        if mask is None and not exact:
            top_scores, top_idx = self.index.search(query[None], width, exclude=[seen])
            found = top_idx[0] >= 0  # rows run short only when the catalogue does
            top_scores, top_idx = top_scores[0][found], top_idx[0][found]
        else:
            # A metadata filter restricts the catalogue, or the session-kNN term
            # (which no index holds) joins the scores: exact search over what passes.
            scores = self._exact_scores(
                query[None],
                torch.tensor([user_idx]),
                excluded[None],
                sessions=None if session_idx is None else session_idx[None],
            )[0]
            available = int((~excluded).sum())
            if new is not None:  # scored as the catalogue is, after its rows
                scores = torch.cat([scores, new.vectors @ query])
                available += len(new.ids)
            width = min(width, available)
            top_scores, top_idx = torch.topk(scores, width)
        ranker = self.ranker if use_ranker else None
        pool_size = len(top_idx)
        if ranker is None or path == "popularity" or not len(top_idx):
            # (Nothing passed the filters: an empty answer, not a ranker error.)
            top_idx, top_scores = self._picked_in_order(
                top_idx, top_scores, k, rules, new=new
            )
            answer = self._answer(user_id, path, top_idx, top_scores, None, new=new)
            answer.pool_size = pool_size
            if explain:
                answer = self._explained(answer, user_idx, top_idx, new)
            return _noting(answer, *notes)
        user = torch.tensor([user_idx])
        cold = None
        if fields is not None:  # the ranker reads the same fields (and history)
            cold = (fields, query)
        if context and ranker.reads_context:  # and the request's context
            base = fields if fields is not None else ranker.user_fields(user_idx)
            cold = ({**base, **encoded}, query)
        basket = None
        if session_idx is not None:  # the EASE term reads the session's items too
            stored = self._seen.row(user_idx) if user_idx > 0 else np.zeros(0)
            basket = np.union1d(stored, session_idx.numpy()).astype(np.int64)
        out, ease = self._rank(ranker, user, top_idx, new, cold, basket)
        # The rule evaluation scores: click logit plus a validated share of the
        # retrieval logit (and the EASE term when the ranker has one).
        logits = top_scores / float(self.run.model.temperature)
        order, keys = rerank(
            out["click"],
            logits[None, :],
            blend_weight=ranker.blend_weight,
            ease=ease,
            ease_weight=ranker.config.ease_weight,
        )
        order, keys = self.picked(order, keys, top_idx[None], k, rules, new=new)
        order, keys = order[0], keys[0]
        answer = self._answer(
            user_id, path, top_idx[order], top_scores[order], keys, new=new
        )
        if ranker.predicts_ratings:  # an untrained rating head says nothing
            ratings = out["rating"][0][order].tolist()
            for entry, rating in zip(answer.items, ratings, strict=True):
                entry["predicted_rating"] = rating
        answer.pool_size = pool_size
        if explain:
            answer = self._explained(answer, user_idx, top_idx[order], new)
        return _noting(answer, *notes)

    def deepest_width(self, width: int) -> int:
        """The widest pool a list under ``max_per`` is picked from when the
        limits pass over so many candidates that it runs short: the pool
        widens fourfold at a time, up to :attr:`widening` (16) times ``width``
        or the catalogue.

        Raises:
            ConfigError: :attr:`widening` is not a positive integer.
        """
        factor = check_k("widening", self.widening)
        catalogue = int(self.item_embeddings.shape[0]) - 1
        return max(width, min(factor * width, catalogue))

    def candidate_width(self, num_candidates: int | None, k: int) -> int:
        """How many candidates a list of ``k`` is picked from: ``num_candidates``
        (default: :attr:`num_candidates`, the ranking stage's), at least ``k``."""
        if num_candidates is None:
            num_candidates = self.num_candidates
        return max(check_k("num_candidates", num_candidates), k)

    def list_rules(
        self,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
    ) -> ListRules:
        """A request's ``diversity``, ``max_per`` and ``diversity_by``,
        checked (the columns against the item metadata)."""
        return ListRules(
            diversity=check_diversity(diversity),
            max_per=self._filters.check_max_per(max_per),
            diversity_by=self._filters.check_column("diversity_by", diversity_by),
        )

    def picked(
        self,
        order: torch.Tensor,
        keys: torch.Tensor,
        candidates: torch.Tensor,
        k: int,
        rules: ListRules,
        *,
        new: _NewItems | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, k'], [B, k'])`` the answer's places among each row's
        candidates and their keys: the first ``k`` of ``order`` and ``keys``
        (``[B, W]``, a row's candidates best first, as
        :func:`~twostage.ranking.rerank.rerank` gives them), or under
        ``rules`` the ``k`` that :func:`~twostage.diversity.diversify` picks
        from them (compared by their candidate embeddings, capped by their
        metadata's groups); a single row is cut where it ran short, a batch's
        slots left empty hold a ``-inf`` key after the picks.

        Args:
            candidates: ``[B, W]`` each row's item indices in their first order
                (-1: an empty slot; new items past the catalogue's rows).
            new: the request's new items, whose vectors follow the catalogue's.
        """
        if not rules:
            return order[:, :k], keys[:, :k]
        items = candidates.gather(1, order)
        filled = items >= 0
        # a new item, past the catalogue, has no metadata
        catalogued = items.masked_fill(items >= len(self._item_id_list), -1)
        vectors = values = None
        if rules.diversity and rules.diversity_by:  # alike by their values
            values, _ = self._filters.groups(catalogued, {rules.diversity_by: 1})
        elif rules.diversity:
            table = self.item_embeddings
            if new is not None:
                table = torch.cat([table, new.vectors])
            # (B, W) indices -> (B, W, D); an empty slot reads row 0, unpicked
            vectors = table[items.clamp_min(0)]
        groups = limits = None
        if rules.max_per:
            groups, limits = self._filters.groups(catalogued, rules.max_per)
        at = diversify(
            keys.masked_fill(~filled, -torch.inf),
            vectors,
            k,
            weight=rules.diversity,
            groups=groups,
            limits=limits,
            values=values,
        )
        got = at >= 0
        if len(at) == 1:  # one answer: as long as its picks
            at = at[:, : int(got.sum())]
            return order.gather(1, at), keys.gather(1, at)
        at = at.clamp_min(0)
        return order.gather(1, at), keys.gather(1, at).masked_fill(~got, -torch.inf)

    def _new_items(self, frame: pl.DataFrame, name: str = "candidates") -> _NewItems:
        """New items (``item_id`` and the item feature columns; the request's
        field ``name``), encoded as the candidate tower reads an item: its ID at
        the unknown row, its features as sent (unknown where left out)."""
        rows = frame.drop(ITEM).to_dicts()
        for item_id, row in zip(frame[ITEM].to_list(), rows, strict=True):
            try:  # a NaN would encode as missing: the client's mistake
                check_finite_numbers(self.run.spec, name, row)
            except ConfigError as e:  # which of many (a file's rows) it was
                raise ConfigError(f"{e} (new item {item_id!r})") from e
        with client_values(
            name, {"new items": frame[ITEM].to_list()}, self._item_columns
        ):
            side = self.run.spec.transform_items(frame)
        with torch.no_grad():
            vectors = self.run.model.encode_items(side)
        ids = frame[ITEM].to_list()
        _refuse_non_finite(vectors, name, f"the new item(s) {ids[:10]}")
        return _NewItems(ids, rows, side, vectors)

    def _new_range(self, new: _NewItems) -> torch.Tensor:
        """The indices new items take in an answer: past the catalogue's rows."""
        start = self.item_embeddings.shape[0]
        return torch.arange(start, start + len(new.ids))

    def _rank(
        self,
        ranker: Ranker,
        user: torch.Tensor,
        idx: torch.Tensor,
        new: _NewItems | None,
        cold: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None,
        basket: np.ndarray | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The ranker's heads ``[1, C]`` for the candidates ``idx`` (new items past
        the catalogue's rows, scored from their features) and the EASE term (0
        for a new item: it has no rows in the item-to-item matrix). ``cold``: a
        query given by its encoded fields (a new user's features, or a session's
        history) and its retrieval query; ``basket``: the items the EASE term
        reads (a session's, with the user's), in place of the user's (none for
        an unknown user: the term is then 0)."""
        known = idx < self.item_embeddings.shape[0]

        def of_known(items: torch.Tensor) -> dict[str, torch.Tensor]:
            if cold is None:
                return ranker.score(user, items[None, :])
            return ranker.score_user(cold[0], cold[1], items)

        def ease_of(items: torch.Tensor) -> torch.Tensor | None:
            if ranker.ease is None:  # no term: nothing to build its rows for
                return None
            rows = None
            if basket is not None:
                rows = UserItems.from_pairs(
                    np.zeros(len(basket), dtype=np.int64), basket, num_rows=1
                )
            return ranker.ease_scores(user, items[None, :], rows=rows)

        with torch.no_grad():
            if new is None or bool(known.all()):
                return of_known(idx), ease_of(idx)
            out = {name: torch.zeros(1, len(idx)) for name in ("rating", "click")}
            ease = None if ranker.ease is None else torch.zeros(1, len(idx))
            if known.any():
                scored = of_known(idx[known])
                for name in out:
                    out[name][0, known] = scored[name][0]
                term = ease_of(idx[known])
                if ease is not None and term is not None:
                    ease[0, known] = term[0].to(ease.dtype)
            rows = idx[~known] - self.item_embeddings.shape[0]
            side = {key: value[rows] for key, value in new.side.items()}
            if cold is None:
                scored = ranker.score_features(user, side, new.vectors[rows])
            else:
                scored = ranker.score_user(
                    cold[0], cold[1], item_side=side, item_vectors=new.vectors[rows]
                )
            for values in scored.values():
                _refuse_non_finite(values, "candidates", "the new items' features")
            for name in out:
                out[name][0, ~known] = scored[name][0]
        return out, ease

    def _closest_seen(
        self, user_idx: int, idx: torch.Tensor, new: _NewItems | None = None
    ) -> list[int] | None:
        """For each item of ``idx`` (new items past the catalogue's rows), the
        user's training item closest to it (inner product of the candidate
        embeddings); None for a user without history."""
        seen = self._seen.row(user_idx) if user_idx > 0 else np.zeros(0, np.int64)
        if not len(seen) or not len(idx):
            return None
        history = torch.from_numpy(seen.astype(np.int64))
        vectors = self.item_embeddings
        if new is not None:
            vectors = torch.cat([vectors, new.vectors])
        # (K, D) @ (D, H) -> (K, H): each recommended item against the history.
        similarity = vectors[idx] @ self.item_embeddings[history].T
        return history[similarity.argmax(dim=1)].tolist()

    def _explained(
        self,
        answer: Recommendation,
        user_idx: int,
        idx: torch.Tensor,
        new: _NewItems | None = None,
    ) -> Recommendation:
        """Each item's closest training item of the user; nothing for a user
        without history."""
        best = self._closest_seen(user_idx, idx, new)
        if best is None:
            return answer
        for entry, index in zip(answer.items, best, strict=True):
            entry["because"] = {
                "item_id": self._item_id_list[index],
                "label": self._labels[index]["label"] if self.items else None,
            }
        return answer

    def search_items(self, text: str, limit: int = 10) -> list[dict[str, Any]]:
        """Items whose label (or ID) contains ``text``, case-insensitive, in
        catalogue order: what a client offers to pick an item by its title."""
        limit = check_k("limit", limit)
        if not isinstance(text, str):
            raise ConfigError(
                f"`text` should be a string to look for. Received: {text!r} "
                f"({type(text).__name__})."
            )
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
        self, user_ids: Sequence[Any], k: int = 10, **options: Any
    ) -> list[Recommendation]:
        """:meth:`recommend` for many users (a list, tuple or array of IDs)."""
        given = _id_list("user_ids", user_ids, "answers")
        return [self.recommend(user_id, k, **options) for user_id in given]

    def recommend_sessions(
        self,
        sessions: Any,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        use_ranker: bool = True,
        filters: dict[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
        num_candidates: int | None = None,
        exclude: Mapping[Any, Sequence[Any]] | None = None,
    ) -> SessionLists:
        """A list for every session of a table (polars, pandas or pyarrow) with
        a row per session item (``session_id``, ``item_id``; optionally
        ``timestamp``, ``rating`` and ``user_id``), as :meth:`recommend` answers one ``session`` each, and the
        rows it could not read with their reasons
        (:func:`twostage.session_batch.recommend_sessions`); ``context``: one
        moment for every list, for a model that reads per-request context;
        ``diversity``, ``max_per``, ``diversity_by``, ``num_candidates``: as
        :meth:`recommend` takes them; ``exclude``: ``{session_id: item IDs}``,
        each session's items to leave out, as :meth:`recommend_table` takes
        them per user."""
        from twostage.session_batch import recommend_sessions

        return recommend_sessions(
            self,
            sessions,
            k,
            exclude_seen=_check_flag("exclude_seen", exclude_seen),
            use_ranker=_check_flag("use_ranker", use_ranker),
            filters=filters,
            context=context,
            rules=self.list_rules(diversity, max_per, diversity_by),
            num_candidates=num_candidates,
            exclude=exclude,
        )

    def recommend_table(
        self,
        user_ids: Sequence[Any],
        k: int = 10,
        *,
        exclude_seen: bool = True,
        use_ranker: bool = True,
        filters: dict[str, Any] | None = None,
        explain: bool = False,
        context: Mapping[str, Any] | None = None,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
        num_candidates: int | None = None,
        exclude: Mapping[Any, Sequence[Any]] | None = None,
        user_features: Mapping[Any, Mapping[str, Any]] | None = None,
    ) -> pl.DataFrame:
        """:meth:`recommend_batch` as one long table, for batch scoring (an email
        campaign, a cache to fill, offline analysis): a row per user and rank.

        Columns: ``user_id`` (as given: text where the IDs mix types), ``rank``
        (1 is the best), ``item_id``, ``score`` (the key the list is ordered by:
        the two-stage key with a ranker, else the retrieval score),
        ``retrieval_score`` and ``path`` (``personalised``, ``popularity`` for an
        unknown user...). A user whose list is shorter than ``k`` (the catalogue
        is almost all seen) has fewer rows; none is dropped silently, as the
        ``path`` and rank counts show.

        Known users on the personalised path are answered 512 at a time (one
        index search, or one exact scoring of the catalogue where the
        session-kNN term joins the scores, and one ranker call per chunk; the
        lists :meth:`recommend` gives, up to float rounding in the scores), the
        others one by one.

        Args:
            user_ids: a list, tuple or array of user IDs (unknown ones get the
                cold-start answer).
            k: list length.
            exclude_seen, use_ranker, filters: as :meth:`recommend` (with
                ``filters``, the items that pass are searched exactly, as
                :meth:`recommend` searches them).
            explain: add ``because_item_id``, the user's training item closest
                to each recommended one (null for a user without history), as
                :meth:`recommend` names it with ``explain=True``.
            context: one moment for every list (a campaign sent at 9:00,
                ``{"timestamp": ...}``), for a model that reads per-interaction
                context, as :meth:`recommend` takes it.
            diversity, max_per, diversity_by: as :meth:`recommend` takes
                them (each list picked from its own candidates).
            num_candidates: as :meth:`recommend` takes it (more candidates
                for rules that pass over many).
            exclude: ``{user ID: item IDs}``, each user's items to leave out
                of their list (those sent in last week's campaign, bought
                since training), as :meth:`recommend` takes ``exclude``; a
                user ID matches as text (``42`` and ``"42"`` alike). IDs the
                model does not know leave nothing out
                (:meth:`unknown_item_ids` names them).
            user_features: ``{user ID: {column: value}}``, the features of
                users the model does not know (a campaign's new sign-ups),
                whose lists are then the cold-start answer from them, as
                :meth:`recommend` takes ``user_features`` (``path``
                ``cold_start_features``); matched as text as ``exclude`` is.
                A known user's entry is not read: the model has learned them.

        Raises:
            ConfigError: ``exclude`` is not a mapping of lists, or names a user
                who is not in ``user_ids`` (the first few named); the same of
                ``user_features``, or a feature value it cannot read (named
                with the user).
        """
        k = check_k("k", k)
        rules = self.list_rules(diversity, max_per, diversity_by)
        width = self.candidate_width(num_candidates, k)
        self.encode_context(context)  # a mistake is named before any list
        exclude_seen = _check_flag("exclude_seen", exclude_seen)
        use_ranker = _check_flag("use_ranker", use_ranker)
        search = self.batch_index(filters)
        given = _id_list("user_ids", user_ids, "rows")
        for user_id in given:
            if user_id is not None:
                check_raw_id("user_id", user_id)
        idx = np.array(
            [self.user_vocab.lookup(u) if u is not None else 0 for u in given],
            dtype=np.int64,
        )
        asked, left_out = exclusions_by_key(given, exclude, self.item_vocab)
        features = self._features_by_user(given, user_features)
        # The chunked path: what recommend() does for these users, vectorised.
        fast = (idx > 0) & ~self._popular_users[idx]
        if self._context_keys:
            fast[:] = False  # per-request context
        lists: dict[int, tuple[list[int], list[float], list[float], str]] = {}
        positions = np.flatnonzero(fast)
        for part in np.array_split(positions, max(1, -(-len(positions) // 512))):
            if len(part):
                lists.update(
                    zip(
                        part.tolist(),
                        self._personalised_lists(
                            idx[part],
                            k,
                            exclude_seen,
                            use_ranker,
                            search,
                            filters,
                            rules,
                            width,
                            left_out=[left_out[p] for p in part.tolist()],
                        ),
                        strict=True,
                    )
                )
        users: list[Any] = []
        ranks: list[int] = []
        items: list[int] = []
        scores: list[float] = []
        retrieval: list[float] = []
        paths: list[str] = []
        because: list[int | None] = []
        explain = _check_flag("explain", explain)
        for position, user_id in enumerate(given):
            if position in lists:
                item_idx, keys, plain, path = lists[position]
            else:
                given_features = (
                    features.get(str(user_id)) if idx[position] == 0 else None
                )
                own = None if given_features is None else dict(given_features)
                try:
                    answer = self.recommend(
                        user_id,
                        k,
                        user_features=own,
                        exclude_seen=exclude_seen,
                        use_ranker=use_ranker,
                        filters=filters,
                        context=context,
                        diversity=rules.diversity,
                        max_per=rules.max_per,
                        diversity_by=rules.diversity_by,
                        num_candidates=width,
                        exclude=asked[position],
                    )
                except ConfigError as e:
                    if own is None:
                        raise
                    raise ConfigError(f"user {user_id!r}: {e}") from e
                item_idx = [self.item_vocab.lookup(i["item_id"]) for i in answer.items]
                plain = [i["score"] for i in answer.items]
                keys = [i.get("rank_score", i["score"]) for i in answer.items]
                path = answer.path
            users.extend([user_id] * len(item_idx))
            ranks.extend(range(1, len(item_idx) + 1))
            items.extend(item_idx)
            scores.extend(keys)
            retrieval.extend(plain)
            paths.extend([path] * len(item_idx))
            if explain:
                best = self._closest_seen(
                    int(idx[position]), torch.tensor(item_idx, dtype=torch.long)
                )
                because.extend(best if best is not None else [None] * len(item_idx))
        table = pl.DataFrame(
            {
                USER: pl.Series(users, strict=False),
                "rank": pl.Series(ranks, dtype=pl.Int32),
                ITEM: self.item_vocab.inverse_transform(
                    np.array(items, dtype=np.int64)
                ),
                "score": pl.Series(scores, dtype=pl.Float32),
                "retrieval_score": pl.Series(retrieval, dtype=pl.Float32),
                "path": pl.Series(paths, dtype=pl.String),
            }
        )
        if not explain:
            return table
        named = self.item_vocab.inverse_transform(
            np.array([0 if b is None else b for b in because], dtype=np.int64)
        )
        known = pl.Series([b is not None for b in because])
        return table.with_columns(
            pl.when(known).then(named).otherwise(None).alias("because_item_id")
        )

    def _features_by_user(
        self,
        given: list[Any],
        user_features: Mapping[Any, Mapping[str, Any]] | None,
    ) -> dict[str, Mapping[str, Any]]:
        """:meth:`recommend_table`'s ``user_features`` by the user ID as text.

        Raises:
            ConfigError: not a mapping of mappings, or a user without a list here.
        """
        if user_features is None:
            return {}
        if not isinstance(user_features, Mapping) or not all(
            isinstance(v, Mapping) for v in user_features.values()
        ):
            raise ConfigError(
                "`user_features` should map user IDs to their features "
                '({"u1": {"country": "NO"}}). Received: a '
                f"{type(user_features).__name__}."
            )
        refuse_stray_keys("user_features", user_features, given)
        return {str(user): values for user, values in user_features.items()}

    def exact_search(
        self,
        queries: torch.Tensor,
        user_idx: torch.Tensor,
        k: int,
        *,
        exclude: Sequence[np.ndarray | None],
        sessions: torch.Tensor | None = None,
        filters: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, k], [B, k])`` scores and item indices (-1 past what is left) of
        the whole catalogue, as :meth:`recommend` scores it when the session-kNN
        term joins the dot products (no index holds the term).

        Args:
            queries: ``[B, D]`` the queries.
            user_idx: ``[B]`` their users (0: none): a known user's stored items
                are the term's query.
            k: how many to keep.
            exclude: each query's item indices to leave out (None: none).
            sessions: ``[B, S]`` items the term reads after the user's (most
                recent last, 0 = padding).
            filters: as :meth:`recommend` takes them: only the items that
                pass are kept.
        """
        excluded = self._removed.expand(len(queries), -1).clone()
        excluded[:, 0] = True
        allowed = self._filters.mask(filters)
        if allowed is not None:
            excluded |= ~allowed
        for row, taken in enumerate(exclude):
            if taken is not None:
                excluded[row, torch.from_numpy(taken)] = True
        scores = self._exact_scores(queries, user_idx, excluded, sessions=sessions)
        top_scores, top_idx = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return top_scores, top_idx.masked_fill(top_scores == -torch.inf, -1)

    def _exact_scores(
        self,
        queries: torch.Tensor,
        user_idx: torch.Tensor,
        excluded: torch.Tensor,
        *,
        sessions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, N]`` every item's score for ``queries [B, D]``: the dot product,
        plus the session-kNN term where the run adds it (``user_idx``,
        ``sessions``: as :meth:`exact_search` takes them), ``-inf`` where
        ``excluded [B, N]``."""
        scores = queries @ self.item_embeddings.T  # (B, D) @ (D, N) -> (B, N)
        if self.run.scores_exactly:  # added items have no term
            term = self.run.neighbour_term(user_idx, sessions=sessions)
            scores[:, : term.shape[1]] += term
        return scores.masked_fill(excluded, -torch.inf)

    def filtered_index(self, filters: dict[str, Any] | None) -> Index | None:
        """The index to search: the bundle's, or with ``filters`` an exact index
        of the items that pass (None: none does), searched as :meth:`recommend`
        searches them."""
        mask = self._filters.mask(filters)
        if mask is None:
            return self.index
        # Never the padding row, nor a removed item.
        allowed = torch.nonzero(mask[1:] & ~self._removed[1:])[:, 0] + 1
        if not len(allowed):
            return None
        return ExactIndex().build(self.item_embeddings[allowed], allowed)

    def batch_index(self, filters: dict[str, Any] | None) -> Index | None:
        """The index batched lists search (None: no item passes ``filters``):
        :meth:`filtered_index`, but the bundle's own where the session-kNN term
        scores every item exactly (:meth:`exact_search` applies the filters
        itself, so no index of the items that pass is built for nothing)."""
        if not self.run.scores_exactly:
            return self.filtered_index(filters)
        mask = self._filters.mask(filters)  # a bad filter: named here too
        if mask is not None and not bool((mask[1:] & ~self._removed[1:]).any()):
            return None
        return self.index

    def _personalised_lists(
        self,
        user_idx: np.ndarray,
        k: int,
        exclude_seen: bool,
        use_ranker: bool,
        index: Index | None,
        filters: dict[str, Any] | None = None,
        rules: ListRules | None = None,
        width: int | None = None,
        deepest: int | None = None,
        left_out: Sequence[np.ndarray | None] | None = None,
    ) -> list[tuple[list[int], list[float], list[float], str]]:
        """``(item indices, keys, retrieval scores, path)`` of known users on the
        personalised path, as :meth:`recommend` orders them, in one search of
        ``index`` (None: no item passed the filters), or one exact scoring of the
        items that pass ``filters`` where the session-kNN term joins the scores,
        and one ranker call (and again, wider, for the lists ``max_per`` left
        short, up to ``deepest``: :meth:`deepest_width` of ``width``);
        ``left_out``: per user, items to leave out beside the seen ones."""
        if index is None:
            return [([], [], [], "personalised") for _ in user_idx]
        users = torch.from_numpy(user_idx)
        queries = self._known_queries()[users]
        seen = [self._seen.row(int(u)) if exclude_seen else None for u in user_idx]
        if left_out is not None:
            seen = [
                own
                if extra is None
                else np.union1d(own if own is not None else [], extra).astype(np.int64)
                for own, extra in zip(seen, left_out, strict=True)
            ]
        width = width or max(self.num_candidates, k)
        if self.run.scores_exactly:
            top_scores, top_idx = self.exact_search(
                queries, users, width, exclude=seen, filters=filters
            )
        else:
            top_scores, top_idx = index.search(queries, width, exclude=seen)
        valid = top_idx >= 0  # rows run short only when the catalogue does
        ranker = self.ranker if use_ranker else None
        if ranker is None:
            order = torch.arange(top_idx.shape[1]).expand_as(top_idx)
            keys = top_scores
        else:
            candidates = top_idx.clamp_min(0)
            with torch.no_grad():
                out = ranker.score(users, candidates)
            logits = top_scores.masked_fill(~valid, 0.0) / float(
                self.run.model.temperature
            )
            order, keys = rerank(
                out["click"],
                logits,
                blend_weight=ranker.blend_weight,
                valid=valid,
                ease=ranker.ease_scores(users, candidates),
                ease_weight=ranker.config.ease_weight,
            )
        order, keys = self.picked(order, keys, top_idx, k, rules or ListRules())
        chosen = top_idx.gather(1, order)
        plain = top_scores.gather(1, order)
        kept = (chosen >= 0) & torch.isfinite(keys)  # (the rules' empty slots)
        lists = [
            (
                chosen[row][kept[row]].tolist(),
                keys[row][kept[row]].tolist(),
                plain[row][kept[row]].tolist(),
                "personalised",
            )
            for row in range(len(user_idx))
        ]
        deepest = deepest or self.deepest_width(width)
        if rules is not None and rules.max_per and width < deepest:
            # Lists the limits left short, from a full pool: picked again from
            # a wider one, as recommend() picks them.
            short = np.flatnonzero(
                (kept.sum(dim=1) < k).numpy() & valid.all(dim=1).numpy()
            )
            if len(short):
                wider = self._personalised_lists(
                    user_idx[short],
                    k,
                    exclude_seen,
                    use_ranker,
                    index,
                    filters,
                    rules,
                    min(4 * width, deepest),
                    deepest,
                    None if left_out is None else [left_out[r] for r in short.tolist()],
                )
                for row, found in zip(short.tolist(), wider, strict=True):
                    lists[row] = found
        return lists

    def similar_table(
        self,
        item_ids: Sequence[Any],
        k: int = 10,
        *,
        filters: dict[str, Any] | None = None,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
        num_candidates: int | None = None,
        exclude: Mapping[Any, Sequence[Any]] | None = None,
    ) -> pl.DataFrame:
        """:meth:`similar_items` for many items as one long table (an "also liked"
        table for a shop's pages): a row per item and rank with ``item_id``,
        ``rank`` (1 is the closest), ``similar_item_id`` and ``score``; searched
        4,096 items at a time (``filters``, ``diversity``, ``max_per``,
        ``diversity_by``, ``num_candidates``: as :meth:`similar_items`).
        ``exclude``: ``{item ID: item IDs}``, each item's similar items to
        leave out (the pairs shown last week, the accessories linked by
        hand), as :meth:`similar_items` takes ``exclude``; an item ID matches
        as text (``42`` and ``"42"`` alike), and IDs the model does not know
        leave nothing out.

        Raises:
            UnknownIdError: an item is not in the catalogue (the first few named).
            ConfigError: ``exclude`` is not a mapping of lists, or names an
                item without a list here.
        """
        k = check_k("k", k)
        given = _id_list("item_ids", item_ids, "rows")
        for item_id in given:
            check_raw_id("item_id", item_id)
        idx = torch.tensor([self.item_vocab.lookup(i) for i in given], dtype=torch.long)
        unknown = [given[i] for i in torch.nonzero(idx == 0)[:, 0].tolist()]
        if unknown:
            raise UnknownIdError(
                f"{len(unknown)} of the `item_ids` are not in the catalogue of this "
                f"model ({self.item_vocab.size - 1} items): {unknown[:5]!r}"
                f"{' ...' if len(unknown) > 5 else ''}."
            )
        rules = self.list_rules(diversity, max_per, diversity_by)
        width = self.candidate_width(num_candidates, k) if rules else k
        _, left_out = exclusions_by_key(
            given, exclude, self.item_vocab, noun="item", field="item_ids"
        )
        index = self.filtered_index(filters)
        parts = idx.split(4096) if index is not None else ()  # None: nothing passes
        sources, ranks, similar, scores = [], [], [], []
        start = 0
        for part in parts:
            # Each item leaves itself out, and the items `exclude` gives it.
            leave = [
                [int(i), *([] if out is None else out.tolist())]
                for i, out in zip(
                    part, left_out[start : start + len(part)], strict=True
                )
            ]
            start += len(part)
            top_idx, top_scores = self._similar_picks(
                typing.cast(Index, index),
                self.item_embeddings[part],
                leave,
                k,
                rules,
                width,
            )
            found = top_idx >= 0
            rows, cols = torch.nonzero(found, as_tuple=True)
            sources.append(part[rows])
            ranks.append(cols + 1)
            similar.append(top_idx[found])
            scores.append(top_scores[found])
        at = torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long)
        names = self.item_vocab.inverse_transform
        return pl.DataFrame(
            {
                ITEM: names(at.numpy()),
                "rank": pl.Series(
                    torch.cat(ranks).numpy() if ranks else [], dtype=pl.Int32
                ),
                "similar_item_id": names(
                    torch.cat(similar).numpy() if similar else np.zeros(0, np.int64)
                ),
                "score": pl.Series(
                    torch.cat(scores).numpy() if scores else [], dtype=pl.Float32
                ),
            }
        )

    def similar_items(
        self,
        item_id: Any,
        k: int = 10,
        *,
        filters: dict[str, Any] | None = None,
        item_features: Mapping[str, Any] | None = None,
        diversity: float = 0.0,
        max_per: Mapping[str, int] | None = None,
        diversity_by: str | None = None,
        num_candidates: int | None = None,
        exclude: Sequence[Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Items whose candidate embeddings are closest to this item's; with
        ``filters`` (as :meth:`recommend` takes them, e.g. ``{"in_stock": True}``)
        only those whose metadata matches, searched exactly. ``diversity`` and
        ``max_per`` pick the ``k`` from the ``num_candidates`` closest
        (default: the ranking stage's number) as
        :meth:`recommend` picks an answer (similar, and not all alike; at most
        2 of a brand; ``diversity_by``: alike by a metadata column's values).

        An item the model never trained on may be described by its
        ``item_features`` (the columns of :attr:`item_feature_columns`; nested
        objects by path): it is embedded as a new candidate is (its ID at the
        unknown row), and the catalogue items closest to it come back, for a new
        product's "more like this". A known item is the item as trained (the
        features given are not read).

        ``exclude`` (raw item IDs: the basket, the items already on the page)
        leaves those items out of the answer; IDs the model does not know
        cannot be in it (:meth:`unknown_item_ids` names them).

        Raises:
            UnknownIdError: the item is not in the catalogue and comes without
                features.
            ConfigError: a filter names no metadata column, or a value it cannot
                hold; a feature the model does not read.
        """
        k = check_k("k", k)
        check_raw_id("item_id", item_id)
        rules = self.list_rules(diversity, max_per, diversity_by)
        width = self.candidate_width(num_candidates, k) if rules else k
        if item_features is not None and not isinstance(item_features, Mapping):
            raise ConfigError(
                "`item_features` should map feature columns to values. Received: "
                f"{item_features!r} ({type(item_features).__name__})."
            )
        item_idx = self.item_vocab.lookup(item_id)
        if item_idx == 0 and item_features is None:
            raise UnknownIdError(
                f"`item_id` {item_id!r} is not in the catalogue of this model "
                f"({self.item_vocab.size - 1} items). Give its `item_features` "
                f"(this model reads {self.item_feature_columns}) to find the "
                "items like a new one."
            )
        index = self.filtered_index(filters)
        if index is None:  # nothing passes the filters: an empty answer
            return []
        if item_idx:
            query = self.item_embeddings[item_idx][None]
        else:
            features = new_item_features(
                "item_features", item_features or {}, self._item_columns
            )
            frame = new_items_frame(
                "item_features",
                {item_id: features},
                self._item_columns,
                self._set_columns(),
            )
            query = self._new_items(frame, "item_features").vectors
        dropped, _ = excluded_items(exclude, self.item_vocab)
        left_out = [item_idx, *([] if dropped is None else dropped.tolist())]
        # (a new item is index 0 here, the unknown row, which no index holds)
        top_idx, top_scores = self._similar_picks(
            index, query, [left_out], k, rules, width
        )
        kept = top_idx[0] >= 0
        return self._answer(
            item_id, "personalised", top_idx[0][kept], top_scores[0][kept], None
        ).items

    def _similar_picks(
        self,
        index: Index,
        queries: torch.Tensor,
        exclude: list[list[int]],
        k: int,
        rules: ListRules,
        width: int,
        deepest: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, k]`` items (-1 past the picks) and scores: what ``rules``
        pick from the ``width`` items closest to each query, less ``exclude``;
        rows ``max_per`` left short of a full pool picked again from a pool
        four times as wide, up to ``deepest`` (:meth:`deepest_width`)."""
        top_scores, top_idx = index.search(queries, width, exclude=exclude)
        full = (top_idx >= 0).all(dim=1)
        items, keys = self._picked_in_order(top_idx, top_scores, k, rules)
        deepest = deepest or self.deepest_width(width)
        if rules.max_per and width < deepest:
            short = torch.nonzero(((items >= 0).sum(dim=1) < k) & full)[:, 0]
            if len(short):
                wider = self._similar_picks(
                    index,
                    queries[short],
                    [exclude[row] for row in short.tolist()],
                    k,
                    rules,
                    min(4 * width, deepest),
                    deepest,
                )
                # (one row's picks come cut to their number: the widest rules)
                columns = max(items.shape[1], wider[0].shape[1])
                items = _pad_columns(items, columns, -1)
                keys = _pad_columns(keys, columns, -torch.inf)
                items[short] = _pad_columns(wider[0], columns, -1)
                keys[short] = _pad_columns(wider[1], columns, -torch.inf)
        return items, keys

    def unknown_item_ids(self, item_ids: Sequence[Any]) -> list[Any]:
        """The IDs among ``item_ids`` this model does not know, each once, in
        their order (an ``exclude`` naming them leaves nothing out: a typo
        should not pass unseen)."""
        return excluded_items(item_ids, self.item_vocab)[1]

    def _picked_in_order(
        self,
        top_idx: torch.Tensor,
        top_scores: torch.Tensor,
        k: int,
        rules: ListRules,
        *,
        new: _NewItems | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The items ``rules`` pick from lists already in score order (a
        search's, popularity's) and their scores: ``[B, W]`` in, ``[B, k]``
        out with -1 and ``-inf`` past the picks; one list ``[W]`` in, its
        ``[k']`` picks out."""
        if top_idx.dim() == 1:
            items, keys = self._picked_in_order(
                top_idx[None], top_scores[None], k, rules, new=new
            )
            kept = items[0] >= 0
            return items[0][kept], keys[0][kept]
        keys = top_scores.masked_fill(top_idx < 0, -torch.inf)
        order = torch.arange(top_idx.shape[1]).expand_as(top_idx)
        order, keys = self.picked(order, keys, top_idx, k, rules, new=new)
        items = top_idx.gather(1, order).masked_fill(~torch.isfinite(keys), -1)
        return items, keys

    def history(self, user_id: Any) -> list[dict[str, Any]]:
        """Every distinct training item of the user (with metadata), none left out.

        The most recent ``retrieval.history_length`` items come last, in time order
        (the bundle keeps time order only for that window); older items come first, in
        catalogue order. An unknown user has no history.
        """
        check_raw_id("user_id", user_id)
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
        *,
        new: _NewItems | None = None,
    ) -> Recommendation:
        """The answer's items: IDs, scores and metadata (a new candidate item, past
        the catalogue's rows, shows the features it was sent with and
        ``new_item``)."""
        indices = idx.tolist()
        scores = retrieval_scores.tolist()
        ranks = None if rank_scores is None else rank_scores.tolist()
        items = []
        known = len(self._item_id_list)
        for position, index in enumerate(indices):
            if index >= known:
                assert new is not None
                row = new.rows[index - known]
                entry = {"item_id": new.ids[index - known], "score": scores[position]}
                if ranks is not None:
                    entry["rank_score"] = ranks[position]
                entry.update(row)
                entry.update(label_and_tags(row, self.display))
                entry["new_item"] = True
                items.append(entry)
                continue
            entry = {
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
        served = self._served_items()
        index = make_index(config).build(self.item_embeddings[served], served)
        other = copy.copy(self)
        other.run = dataclasses.replace(
            self.run, config=dataclasses.replace(self.run.config, index=config)
        )
        other.index, other.index_kind = index, index.kind
        return other

    def index_recall(self, k: int = 100, num_queries: int = 1000) -> float:
        """How much of exact search the index finds: the mean share of each
        query's top ``k`` by exact inner product (over the vectors the index
        holds) that the index's top ``k`` holds, for ``num_queries`` known
        users spread evenly over the vocabulary (all of them where there are
        fewer). 1.0 for the exact index. ``twostage index build`` prints it.

        Raises:
            ConfigError: ``k`` or ``num_queries`` below 1, or no known user.
        """
        from twostage.index.measure import recall_at_k

        if k < 1 or num_queries < 1:
            raise ConfigError(
                f"`k` and `num_queries` should be >= 1. Received: k={k!r}, "
                f"num_queries={num_queries!r}."
            )
        queries = self._queries_of(self._spread_users(num_queries))
        served = self._served_items()
        width = min(k, len(served))
        exact = ExactIndex().build(self.item_embeddings[served], served)
        truth = exact.search(queries, width)[1]
        return recall_at_k(self.index.search(queries, width)[1], truth)

    def _spread_users(self, count: int) -> torch.Tensor:
        """Up to ``count`` known users' indices spread evenly over the vocabulary
        (all of them where there are fewer)."""
        num_users = self.user_vocab.size - 1
        if num_users < 1:
            raise ConfigError("the model knows no user to measure the index with.")
        spread = np.linspace(1, num_users, min(count, num_users)).round()
        return torch.from_numpy(np.unique(spread).astype(np.int64))

    def _queries_of(self, users: torch.Tensor) -> torch.Tensor:
        """``[len(users), D]`` query embeddings of known users (indices > 0),
        without encoding every user's where they are not cached."""
        if self._query_cache is not None:
            return self._query_cache[users]
        tensors = self.run.tensors
        features = {name: v[users] for name, v in tensors.user_features.items()}
        features.update(tensors.history_features(users))
        return encode_queries(self.run.model, features)

    # -- persistence -------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write a versioned bundle (see :mod:`twostage.artifacts`,
        :func:`twostage.bundles.save_recommender`)."""
        from twostage.bundles import save_recommender

        return save_recommender(self, directory, overwrite=overwrite)


def load(directory: str | Path) -> Recommender:
    """The Recommender of a saved model, whatever the CLI accepts there: a bundle
    (every checksum verified), ``models/<name>/`` (its newest version), or the
    ``--out`` directory of ``twostage train retrieval``
    (:func:`twostage.bundles.load_recommender`).

    Raises:
        ArtifactError: none of these is found at ``directory``.
    """
    from twostage.bundles import load_recommender

    return load_recommender(directory)


def _refuse_non_finite(values: torch.Tensor, field: str, what: str) -> None:
    """A request's values that the model turns into infinities or NaNs (a number
    far outside anything it trained on, such as a price of 1e20) are the
    client's mistake: refused, never answered with a server error or NaN scores.

    Raises:
        ConfigError: naming the request's ``field``.
    """
    if not bool(torch.isfinite(values).all()):
        raise ConfigError(
            f"`{field}`: {what} give non-finite scores in this model: a number "
            "far outside the range it trained on? Send values of the range the "
            "training data held (or leave a value out when unknown)."
        )
