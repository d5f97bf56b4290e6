"""The retrieval stage's tables: everything training batches and served queries are
gathered from (:class:`RetrievalTensors`), built from a fitted ``FeatureSpec`` and the
training split, and their flat safetensors form.

``build_tensors`` turns the spec and the training split into tables;
``with_history_of`` swaps in another training set's histories and seen items (the
ranking stage and serving use more data than retrieval trained on); ``query_features``
gathers the query side of a batch of users.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor

from twostage.config import RetrievalConfig
from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT, Dataset
from twostage.data.user_items import UserItems
from twostage.errors import ConfigError
from twostage.features import FeatureSpec
from twostage.features.context import context_frame
from twostage.models.ensemble import member_kinds
from twostage.models.fields import HISTORY, HISTORY_RATINGS, HISTORY_TIMES
from twostage.models.sequence import RATING_BUCKETS
from twostage.models.session_knn import activity_ranks

__all__ = [
    "PriorHistory",
    "RetrievalTensors",
    "TimedRows",
    "build_tensors",
    "check_times",
    "history_table",
    "no_rating_column",
    "query_features",
    "rating_buckets",
    "rating_edges",
    "rating_tables",
    "rating_values",
    "recent_popularity",
    "row_order_note",
    "rows_in_vocab_order",
    "session_history",
    "tensors_from_flat",
    "tensors_to_flat",
    "timed_rows",
    "with_history_of",
    "with_history_rows",
]

logger = logging.getLogger(__name__)


class TimedRows(NamedTuple):
    """Rows of a log as indices, with their times: what the readers of each user's
    rows in time order fit on (the ``transition`` member, the ordered
    baselines). :func:`timed_rows` makes them from a table in memory; a streamed
    run from its passes over the log."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    num_users: int
    #: False where the log has no time column (``times`` is then the row order).
    has_time: bool = True


def timed_rows(spec: FeatureSpec, data: Dataset) -> TimedRows:
    """``data``'s rows as :class:`TimedRows`, the users and items indexed by
    ``spec``'s vocabularies (0: unknown)."""
    rows = data.interactions
    users = spec.vocabulary(USER)
    return TimedRows(
        users=users.transform(rows[USER]),
        items=spec.vocabulary(ITEM).transform(rows[ITEM]),
        times=rows[TIME].to_numpy(),
        num_users=users.size,
        has_time=data.has_time,
    )


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
        context: ``[n, ...]`` each training row's own context fields, which replace
            the per-user (unknown) values when a batch names its rows; empty when
            the model reads no context. Training-only: not saved.
    """

    user_features: dict[str, Tensor]
    item_features: dict[str, Tensor]
    history: Tensor
    users: Tensor
    items: Tensor
    weights: Tensor | None
    item_probs: Tensor
    user_id_field: str | None = "user_id"
    context: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    sequences: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long)
    )
    sequence_users: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    popularity: Tensor | None = None
    history_times: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long)
    )
    sequence_times: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long)
    )
    #: ``[U, L]`` and ``[W, L + 1]``: the rating bucket of each ``history`` and
    #: ``sequences`` entry (0 = not known), with ``retrieval.sequence_ratings``;
    #: ``[0, 0]`` without.
    history_ratings: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long)
    )
    sequence_ratings: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, 0, dtype=torch.long)
    )
    #: The bucket edges of those ratings (:func:`rating_edges`); empty without.
    rating_edges: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.float64)
    )
    #: ``[2]`` the lowest and highest training rating, the range a session's
    #: ratings must lie in; empty without ``retrieval.sequence_ratings`` (and in
    #: bundles saved before it was kept).
    rating_range: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.float64)
    )
    #: What the session-kNN term finds neighbours in, stored ragged: ``[U]``
    #: each user's number of items (its latest ``retrieval.session_knn_length``
    #: training items) and ``[sum]`` those items end to end, each user's oldest
    #: first; both empty without that term (weight 0, or 0 picked on validation).
    #: Ragged, as a dense table would hold users x the longest history.
    neighbour_lengths: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    neighbour_items: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    #: ``[U]`` each user's rank by the time of their latest kept item (0: the
    #: earliest; users without items first), what ``retrieval.session_knn_sample``
    #: samples the latest active neighbours by; empty where the sequences are
    #: (and in bundles saved before it was kept).
    neighbour_latest: Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )

    @property
    def has_neighbours(self) -> bool:
        """Whether the tables hold the session-kNN term's sequences."""
        return bool(self.neighbour_lengths.numel())

    def without_neighbours(self) -> RetrievalTensors:
        """These tables less the session-kNN term's sequences."""
        return dataclasses.replace(
            self,
            neighbour_lengths=torch.zeros(0, dtype=torch.long),
            neighbour_items=torch.zeros(0, dtype=torch.long),
            neighbour_latest=torch.zeros(0, dtype=torch.long),
        )

    def history_features(self, users: Tensor | slice) -> dict[str, Tensor]:
        """The history entries of a query feature dict for these users (rows):
        their items, and their times and ratings when the model reads them."""
        features = {HISTORY: self.history[users]}
        if self.history_times.numel():
            features[HISTORY_TIMES] = self.history_times[users]
        if self.history_ratings.numel():
            features[HISTORY_RATINGS] = self.history_ratings[users]
        return features

    @property
    def reads_ratings(self) -> bool:
        """Whether the history carries ratings (``retrieval.sequence_ratings``;
        :attr:`rating_edges` is empty also where the log has one rating level)."""
        return bool(self.history_ratings.numel())

    @property
    def fallback_popularity(self) -> Tensor:
        """``[N]`` what the most-popular fallback ranks by."""
        return self.item_probs if self.popularity is None else self.popularity

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
            context=move(self.context),
            sequences=self.sequences.to(device),
            sequence_users=self.sequence_users.to(device),
            popularity=None if self.popularity is None else self.popularity.to(device),
            history_times=self.history_times.to(device),
            sequence_times=self.sequence_times.to(device),
            history_ratings=self.history_ratings.to(device),
            sequence_ratings=self.sequence_ratings.to(device),
            rating_edges=self.rating_edges,
            neighbour_lengths=self.neighbour_lengths.to(device),
            neighbour_items=self.neighbour_items.to(device),
            neighbour_latest=self.neighbour_latest.to(device),
        )

    def seen(self) -> UserItems:
        """Every user's distinct training items (row = ``user_idx``): what evaluation
        and serving exclude as seen."""
        return UserItems.from_pairs(
            self.users.numpy(), self.items.numpy(), num_rows=int(self.history.shape[0])
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
    rows: Tensor | None = None,
) -> dict[str, Tensor]:
    """Gather the query features of a batch of users.

    Args:
        tensors: the prepared tables.
        users: ``[B]`` user indices.
        rows: ``[B]`` the training rows of the batch, whose own context replaces the
            users' unknown context (when the model reads context).
        exclude_items: ``[B]`` item per row to remove from that row's history (the
            training target, so the model cannot see the answer).
        drop_ids: ``[B]`` bool; where True, the user ID becomes OOV (0) and the history
            is emptied, which trains the cold-start path.
    """
    features = {name: values[users] for name, values in tensors.user_features.items()}
    if rows is not None:
        features.update(
            {name: values[rows] for name, values in tensors.context.items()}
        )
    history = tensors.history[users]
    if exclude_items is not None and history.shape[1]:
        history = history.masked_fill(history == exclude_items[:, None], 0)
    if drop_ids is not None:
        if tensors.user_id_field in features:
            ids = features[tensors.user_id_field]
            features[tensors.user_id_field] = ids.masked_fill(drop_ids, 0)
        history = history.masked_fill(drop_ids[:, None], 0)
    features[HISTORY] = history
    if tensors.history_times.numel():
        features[HISTORY_TIMES] = tensors.history_times[users]
    if tensors.history_ratings.numel():
        features[HISTORY_RATINGS] = tensors.history_ratings[users]
    return features


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
    if tensors.popularity is not None:
        flat["popularity"] = tensors.popularity
    if tensors.history_times.numel():
        flat["history_times"] = tensors.history_times
    if tensors.history_ratings.numel():
        flat["history_ratings"] = tensors.history_ratings
        flat["rating_edges"] = tensors.rating_edges
        if tensors.rating_range.numel():
            flat["rating_range"] = tensors.rating_range
    if tensors.has_neighbours:
        flat["neighbour_lengths"] = tensors.neighbour_lengths
        flat["neighbour_items"] = tensors.neighbour_items
        if tensors.neighbour_latest.numel():
            flat["neighbour_latest"] = tensors.neighbour_latest
    flat.update({f"user.{k}": v for k, v in tensors.user_features.items()})
    flat.update({f"item.{k}": v for k, v in tensors.item_features.items()})
    return {k: v.contiguous() for k, v in flat.items()}


def check_neighbour_sequences(
    lengths: torch.Tensor,
    sequences: torch.Tensor,
    *,
    num_users: int,
    num_items: int,
    latest: torch.Tensor | None = None,
) -> None:
    """Raise ValueError unless ``lengths`` and ``sequences`` are the session-kNN
    term's sequences of ``num_users`` users over ``num_items`` items (or both
    empty), and ``latest`` (if not empty) ranks those users, each once: what a
    saved bundle's tables must hold to be served."""
    if (
        latest is not None
        and latest.numel()
        and (
            latest.shape != (num_users,)
            or not torch.equal(
                torch.sort(latest.long()).values, torch.arange(num_users)
            )
        )
    ):
        raise ValueError(
            "the session-kNN users' ranks by latest activity should hold 0 to "
            f"{num_users - 1}, each once"
        )
    if not lengths.numel() and not sequences.numel():
        return
    if (
        lengths.ndim != 1
        or sequences.ndim != 1
        or lengths.is_floating_point()
        or sequences.is_floating_point()
    ):
        raise ValueError("the session-kNN sequences should be 1-D integer tensors")
    if len(lengths) != num_users or bool((lengths < 0).any()):
        raise ValueError(
            f"the session-kNN sequences should have one length >= 0 for each of the "
            f"{num_users} users; they have {len(lengths)}"
        )
    if int(lengths.sum()) != len(sequences):
        raise ValueError(
            "the session-kNN sequences' lengths should sum to their number of items "
            f"({len(sequences)}); they sum to {int(lengths.sum())}"
        )
    if len(sequences) and (sequences.min() < 1 or sequences.max() >= num_items):
        raise ValueError(
            f"the session-kNN sequences should hold item indices 1 to {num_items - 1}"
        )


def tensors_from_flat(flat: dict[str, torch.Tensor]) -> RetrievalTensors:
    """Inverse of :func:`tensors_to_flat` (and of its form before the session-kNN
    term's sequences were stored ragged: a ``neighbour_history`` table)."""
    lengths = flat.get("neighbour_lengths", torch.zeros(0, dtype=torch.long))
    sequences = flat.get("neighbour_items", torch.zeros(0, dtype=torch.long))
    latest = flat.get("neighbour_latest", torch.zeros(0, dtype=torch.long))
    if "neighbour_history" in flat:  # [U, M], 0 = padding
        table = flat["neighbour_history"]
        lengths, sequences = (table > 0).sum(dim=1), table[table > 0]
    check_neighbour_sequences(
        lengths,
        sequences,
        num_users=int(flat["history"].shape[0]),
        num_items=int(flat["item_probs"].shape[0]),
        latest=latest,
    )
    return RetrievalTensors(
        user_features={k[5:]: v for k, v in flat.items() if k.startswith("user.")},
        item_features={k[5:]: v for k, v in flat.items() if k.startswith("item.")},
        history=flat["history"],
        users=flat["users"],
        items=flat["items"],
        weights=flat.get("weights"),
        item_probs=flat["item_probs"],
        popularity=flat.get("popularity"),
        history_times=flat.get("history_times", torch.zeros(0, 0, dtype=torch.long)),
        history_ratings=flat.get(
            "history_ratings", torch.zeros(0, 0, dtype=torch.long)
        ),
        rating_edges=flat.get("rating_edges", torch.zeros(0, dtype=torch.float64)),
        rating_range=flat.get("rating_range", torch.zeros(0, dtype=torch.float64)),
        neighbour_lengths=lengths,
        neighbour_items=sequences,
        neighbour_latest=latest,
    )


def rows_in_vocab_order(
    spec: FeatureSpec, key: str, side: str, table: pl.DataFrame | None
) -> dict[str, torch.Tensor]:
    """Feature rows for index 0 (OOV) and every vocabulary entry, in index order."""
    vocab = spec.vocabulary(key)
    ids = pl.concat(
        [pl.Series(key, [None], dtype=vocab.values.dtype), vocab.values.rename(key)]
    )
    if side == "query":
        # No context belongs to a user: those columns encode as unknown here.
        return spec.transform_queries(
            context_frame(ids, None, context_keys(spec)), users=table
        )
    return spec.transform_items(ids, items=table)


def _in_time_order(
    times: np.ndarray, user_idx: np.ndarray, item_idx: np.ndarray
) -> pl.DataFrame:
    """Columns ``u``, ``i`` of the training rows sorted by user, then time (ties: row
    order), with ``from_end``: 0 for each user's most recent row, 1 before it..."""
    return (
        pl.DataFrame({"u": user_idx, "i": item_idx, "t": times})
        .with_row_index("r")
        .sort(["u", "t", "r"])
        .with_columns(pl.int_range(pl.len()).reverse().over("u").alias("from_end"))
    )


def history_table(
    times: np.ndarray,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    *,
    num_users: int,
    length: int,
) -> torch.Tensor:
    """``[U, L]`` each user's last ``length`` training items by time (ties: row
    order), most recent last, 0 = padding; from the training rows' times and indices
    (``times`` in any orderable dtype)."""
    return latest_rows(times, user_idx, item_idx, num_users=num_users, length=length)[0]


def latest_rows(
    times: np.ndarray,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    *,
    num_users: int,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, times) ``[U, L]`` of each user's last ``length`` training rows."""
    history = torch.zeros(num_users, length, dtype=torch.long)
    stamps = torch.zeros(num_users, length, dtype=torch.long)
    if length == 0:
        return history, stamps
    frame = _in_time_order(times, user_idx, item_idx).filter(
        pl.col("from_end") < length
    )
    rows = torch.tensor(frame["u"].to_numpy(), dtype=torch.long)
    cols = length - 1 - torch.tensor(frame["from_end"].to_numpy(), dtype=torch.long)
    history[rows, cols] = torch.tensor(frame["i"].to_numpy(), dtype=torch.long)
    if frame["t"].dtype.is_numeric():
        stamps[rows, cols] = torch.from_numpy(frame["t"].to_numpy().astype(np.int64))
    return history, stamps


@dataclass(frozen=True)
class PriorHistory:
    """What some queries' users did before the test's period (``Dataset.prior``: a
    MIND test file's click histories), one row per query: the user's prior rows of
    items the model knows, oldest first (by time, ties in row order), to be read
    as serving reads a session. Stored ragged, as :class:`UserItems` stores sets.

    Attributes:
        indptr: ``[Q + 1]`` int64; row ``q`` holds ``items[indptr[q]:indptr[q+1]]``.
        items: ``[n]`` int64 item indices (never 0).
        times: ``[n]`` int64 seconds (0 where the prior rows' times are not numbers).
    """

    indptr: np.ndarray
    items: np.ndarray
    times: np.ndarray

    @classmethod
    def of(
        cls,
        spec: FeatureSpec,
        user_ids: pl.Series,
        prior: pl.DataFrame,
        *,
        reads: np.ndarray | None = None,
    ) -> PriorHistory:
        """The rows of ``prior`` (``user_id``, ``item_id``, ``timestamp``) of each
        of ``user_ids`` (raw IDs, one per query; ``reads [Q]`` bool: only these
        queries read theirs, the others get none); items outside the item
        vocabulary are left out."""
        queries = pl.DataFrame({USER: user_ids}).with_row_index("__q")
        if reads is not None:
            queries = queries.filter(pl.Series(reads))
        stamps = (
            prior[TIME]
            if TIME in prior.columns
            else pl.Series(np.zeros(prior.height, dtype=np.int64))
        )
        rows = (
            pl.DataFrame({USER: prior[USER], ITEM: prior[ITEM], "__t": stamps})
            .with_row_index("__r")
            .join(queries, on=USER, how="inner")
        )
        items = spec.vocabulary(ITEM).transform(rows[ITEM]).astype(np.int64)
        rows = (
            rows.select("__q", "__t", "__r")
            .with_columns(pl.Series("__i", items))
            .filter(pl.col("__i") > 0)
            .sort("__q", "__t", "__r")
        )
        times = rows["__t"]
        stamps_np = (
            times.cast(pl.Int64).to_numpy()
            if times.dtype.is_numeric()
            else np.zeros(rows.height, dtype=np.int64)
        )
        indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
        counts = np.bincount(rows["__q"].to_numpy(), minlength=len(user_ids))
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr, rows["__i"].to_numpy().astype(np.int64), stamps_np)

    def lengths(self) -> np.ndarray:
        """``[Q]`` int64 number of prior items of each query."""
        return np.diff(self.indptr)

    def seen(self) -> UserItems:
        """Each query's prior items as a set (served as seen, as a session's are)."""
        rows = np.repeat(np.arange(len(self.indptr) - 1), self.lengths())
        return UserItems.from_pairs(rows, self.items, num_rows=len(self.indptr) - 1)

    def padded(
        self, rows: np.ndarray, length: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``([B, L], [B, L])`` the latest ``length`` prior items (default: the
        longest row's count) and their times of the queries ``rows``, most recent
        last, 0 = padding: the layout of the retrieval tables' histories."""
        rows = np.asarray(rows, dtype=np.int64)
        ends = self.indptr[rows + 1]
        have = ends - self.indptr[rows]
        width = int(have.max(initial=0)) if length is None else length
        take = np.minimum(have, width)
        local = np.repeat(np.arange(len(rows)), take)
        offset = np.arange(local.size) - np.repeat(np.cumsum(take) - take, take)
        source = np.repeat(ends - take, take) + offset
        column = np.repeat(width - take, take) + offset
        items = torch.zeros(len(rows), width, dtype=torch.long)
        times = torch.zeros(len(rows), width, dtype=torch.long)
        where = (torch.from_numpy(local), torch.from_numpy(column))
        items[where] = torch.from_numpy(self.items[source])
        times[where] = torch.from_numpy(self.times[source])
        return items, times


def sequence_windows(
    times: np.ndarray, user_idx: np.ndarray, item_idx: np.ndarray, *, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([W, length + 1], [W], [W, length + 1])``: each user's training items by
    time (the training rows' ``times``, int64 seconds; ties: row order), cut from the
    most recent backwards into windows of ``length`` targets, each led by the item
    before them (see :attr:`RetrievalTensors.sequences`), and the window's times (0
    under padding)."""
    frame = _in_time_order(times, user_idx, item_idx)
    users = frame["u"].to_numpy()
    items = torch.from_numpy(frame["i"].to_numpy().astype(np.int64))
    stamps = torch.from_numpy(frame["t"].to_numpy().astype(np.int64))
    from_end = frame["from_end"].to_numpy()
    window = from_end // length  # 0 = the most recent window of the user
    column = length - from_end % length  # 1..length, most recent last
    # Number the windows: (user, window) pairs in order of appearance.
    per_user = int(window.max(initial=0)) + 1
    keys = users.astype(np.int64) * per_user + window
    distinct, row = np.unique(keys, return_inverse=True)
    sequences = torch.zeros(len(distinct), length + 1, dtype=torch.long)
    rows, cols = torch.from_numpy(row), torch.from_numpy(column)
    sequences[rows, cols] = items
    window_times = torch.zeros_like(sequences)
    window_times[rows, cols] = stamps
    # The lead of window w is the item just before its first target: the most
    # recent item (column `length`) of the user's window w + 1.
    leads = (column == length) & (window > 0)
    led = torch.from_numpy(np.searchsorted(distinct, keys[leads] - 1))
    sequences[led, 0] = items[torch.from_numpy(leads)]
    window_times[led, 0] = stamps[torch.from_numpy(leads)]
    window_users = torch.from_numpy(distinct // per_user)
    return sequences, window_users, window_times


def recent_popularity(
    times: np.ndarray, item_idx: np.ndarray, *, num_items: int, days: float
) -> torch.Tensor | None:
    """``[N]`` shares of the training rows in the log's last ``days`` (ties broken by
    all-time counts; :class:`~twostage.baselines.RecentPopularity`), or None when
    ``days`` is 0 (the fallback then ranks by ``item_probs``)."""
    if days <= 0:
        return None
    from twostage.baselines import RecentPopularity

    scores = RecentPopularity(days=days).fit_log(item_idx, times, num_items=num_items)
    assert scores.item_scores is not None
    return scores.item_scores / scores.item_scores.sum().clamp_min(1e-12)


def check_times(config: RetrievalConfig, train: Dataset) -> None:
    """Refuse the settings that read the rows' times when ``train`` has none: its
    ``timestamp`` is then the row order, and seconds or days of it mean nothing."""
    off = {"sequence_time_gaps": "false", "popularity_days": "0"}
    asked = [key for key in off if getattr(config, key)]
    if train.has_time or not asked:
        return
    what = f"'{train.source}'" if train.source else "the log"
    raise ConfigError(
        " and ".join(
            f"`retrieval.{k}` = {json.dumps(getattr(config, k))}" for k in asked
        )
        + f" read the rows' times, and {what} has no time column (its row order "
        "stands in for time). Name its time column with `data.time_col` (`--time-col`), "
        "or set " + " and ".join(f"`retrieval.{k}={off[k]}`" for k in asked) + "."
    )


def row_order_note(config: RetrievalConfig, train: Dataset) -> str | None:
    """What reads each user's items in order when ``train`` has no time column (the
    file's row order then stands for it), to warn of; None when it has times or
    nothing reads order."""
    if train.has_time:
        return None
    kinds = member_kinds(config)
    readers = [
        f"the {kind} history (`retrieval.query_encoder`, `retrieval.ensemble`)"
        for kind in ("transformer", "gru")
        if kind in kinds and config.history_length > 0
    ]
    if config.examples == "sequences" and not readers:
        readers.append("training on each next item (`retrieval.examples=sequences`)")
    if "transition" in kinds:
        readers.append("the `transition` member")
    if config.session_knn_weight != 0:
        readers.append("the session-kNN term")
    if not readers:
        return None
    what = f"'{train.source}'" if train.source else "the log"
    return (
        f"{', '.join(readers)}: each reads a user's items in order, and {what} has no "
        "time column: its row order is taken as the order. Name its time column "
        "with `data.time_col` (`--time-col`) if it has one."
    )


def build_tensors(
    spec: FeatureSpec, train: Dataset, config: RetrievalConfig
) -> RetrievalTensors:
    """Turn a fitted spec and the training split into the trainer's tensors.

    Raises:
        ConfigError: a setting that reads times (``sequence_time_gaps``,
            ``popularity_days``) on a log without a time column.
    """
    check_times(config, train)
    user_vocab, item_vocab = spec.vocabulary(USER), spec.vocabulary(ITEM)
    inter = train.interactions
    users = user_vocab.transform(inter[USER])
    items = item_vocab.transform(inter[ITEM])
    counts = np.bincount(items, minlength=item_vocab.size).astype(np.float64)
    weights = None
    if config.rating_weights and RATING in inter.columns:
        rating = inter[RATING].fill_null(0).to_numpy().astype(np.float32)
        weights = torch.from_numpy(np.maximum(rating, 0.0) + 1.0)
    if WEIGHT in inter.columns:  # the log's own weights (``weight_col``) scale too
        given = torch.tensor(
            inter[WEIGHT].fill_null(1.0).to_numpy(), dtype=torch.float32
        )
        weights = given if weights is None else weights * given
        if config.examples == "sequences":
            logger.warning(
                "the log's `weight` column is not read by `retrieval.examples="
                "sequences` (every position of a sequence counts once)"
            )
    sequences, sequence_users = torch.zeros(0, 0, dtype=torch.long), None
    sequence_times = torch.zeros(0, 0, dtype=torch.long)
    if config.examples == "sequences":
        sequences, sequence_users, sequence_times = sequence_windows(
            inter[TIME].to_numpy(), users, items, length=config.history_length
        )
    history, history_times = latest_rows(
        inter[TIME].to_numpy(),
        users,
        items,
        num_users=user_vocab.size,
        length=config.history_length,
    )
    if not config.sequence_time_gaps:
        history_times = sequence_times = torch.zeros(0, 0, dtype=torch.long)
    history_ratings, sequence_ratings, edges, rating_range = rating_tables(
        inter[TIME].to_numpy(),
        users,
        rating_values(inter) if config.sequence_ratings else None,
        num_users=user_vocab.size,
        config=config,
    )
    keys = context_keys(spec)
    context = {}
    if keys:
        # Each training row's own context; the per-user rows hold "unknown".
        rows = context_frame(inter[USER], inter, keys)
        encoded = spec.transform_queries(rows, users=train.users)
        context = {f.key: encoded[f.key] for f in _context_infos(spec)}
    neighbours = neighbour_sequences(
        inter[TIME].to_numpy(),
        users,
        items,
        num_users=user_vocab.size,
        config=config,
    )
    return RetrievalTensors(
        user_features=rows_in_vocab_order(spec, USER, "query", train.users),
        item_features=rows_in_vocab_order(spec, ITEM, "candidate", train.items),
        history=history,
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        weights=weights,
        item_probs=torch.from_numpy(counts / counts.sum()).float(),
        user_id_field=USER,
        context=context,
        popularity=recent_popularity(
            inter[TIME].to_numpy(),
            items,
            num_items=item_vocab.size,
            days=config.popularity_days,
        ),
        sequences=sequences,
        sequence_users=(
            sequence_users
            if sequence_users is not None
            else torch.zeros(0, dtype=torch.long)
        ),
        history_times=history_times,
        sequence_times=sequence_times,
        history_ratings=history_ratings,
        sequence_ratings=sequence_ratings,
        rating_edges=edges,
        rating_range=rating_range,
        neighbour_lengths=neighbours[0],
        neighbour_items=neighbours[1],
        neighbour_latest=neighbours[2],
    )


def neighbour_sequences(
    times: np.ndarray,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    *,
    num_users: int,
    config: RetrievalConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The session-kNN term's sequences (:attr:`RetrievalTensors.neighbour_lengths`,
    ``neighbour_items`` and ``neighbour_latest``): each user's latest
    ``session_knn_length`` training rows' items by time (ties: row order), oldest
    first, end to end, and the users' ranks by their latest such row (ties: user
    index); empty without the term. Memory grows with the rows kept, not users x
    the longest history."""
    if config.session_knn_weight == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    frame = _in_time_order(times, user_idx, item_idx).filter(
        (pl.col("from_end") < config.session_knn_length) & (pl.col("i") > 0)
    )
    users = frame["u"].to_numpy().astype(np.int64)
    return (
        torch.bincount(torch.from_numpy(users), minlength=num_users),
        torch.from_numpy(frame["i"].to_numpy().astype(np.int64)),
        activity_ranks(users, frame["t"].to_numpy(), num_users=num_users),
    )


def context_keys(spec: FeatureSpec) -> list[str]:
    """The query columns read from the interactions rather than the user table: the
    per-interaction context (:mod:`twostage.features.context`)."""
    return [info.column for info in _context_infos(spec)]


def _context_infos(spec: FeatureSpec) -> list[Any]:
    return [
        info
        for info in spec.describe(side="query")
        if info.source == "interactions" and info.column != USER
    ]


def with_history_of(
    tensors: RetrievalTensors,
    spec: FeatureSpec,
    train: Dataset,
    config: RetrievalConfig,
) -> RetrievalTensors:
    """The same tables with history and seen items taken from another training set."""
    inter = train.interactions
    return with_history_rows(
        tensors,
        spec.vocabulary(USER).transform(inter[USER]),
        spec.vocabulary(ITEM).transform(inter[ITEM]),
        inter[TIME].to_numpy(),
        num_users=spec.vocabulary(USER).size,
        num_items=spec.vocabulary(ITEM).size,
        config=config,
        ratings=rating_values(inter) if config.sequence_ratings else None,
    )


def with_history_rows(
    tensors: RetrievalTensors,
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    *,
    num_users: int,
    num_items: int,
    config: RetrievalConfig,
    ratings: np.ndarray | None = None,
) -> RetrievalTensors:
    """:func:`with_history_of` from the rows' vocabulary indices (0: unknown) and
    times: the history, the seen items and recent popularity of those rows, as
    served. The rows' weights and context leave (they were training batches').
    ``ratings``: the rows' rating values (NaN: none), bucketed by the tables' own
    :attr:`~RetrievalTensors.rating_edges` into the history's ratings; None keeps
    none."""
    # What is popular counts every row of a known item, new users' rows included.
    popularity = recent_popularity(
        times[items > 0],
        items[items > 0],
        num_items=num_items,
        days=config.popularity_days,
    )
    known = (users > 0) & (items > 0)
    users, items = users[known], items[known]
    history, history_times = latest_rows(
        times[known], users, items, num_users=num_users, length=config.history_length
    )
    history_ratings = torch.zeros(0, 0, dtype=torch.long)
    if ratings is not None and tensors.reads_ratings:
        buckets = rating_buckets(ratings[known], tensors.rating_edges.numpy())
        history_ratings = latest_rows(
            times[known],
            users,
            buckets,
            num_users=num_users,
            length=config.history_length,
        )[0]
    out = dataclasses.replace(
        tensors,
        history=history,
        history_times=(
            history_times
            if config.sequence_time_gaps
            else torch.zeros(0, 0, dtype=torch.long)
        ),
        history_ratings=history_ratings,
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        weights=None,
        context={},  # the rows changed; context is for training batches only
        popularity=popularity,
    )
    # Weight -1 (picked on validation) keeps the sequences only if the pick kept them.
    if not (config.session_knn_weight > 0 or tensors.has_neighbours):
        return out.without_neighbours()
    lengths, sequences, latest = neighbour_sequences(
        times[known], users, items, num_users=num_users, config=config
    )
    return dataclasses.replace(
        out,
        neighbour_lengths=lengths,
        neighbour_items=sequences,
        neighbour_latest=latest,
    )


#: Most distinct rating levels kept as one bucket each; a log with more is cut at
#: quantiles (:data:`~twostage.models.sequence.RATING_BUCKETS` less "not known").
RATING_LEVELS = RATING_BUCKETS - 1


def no_rating_column(where: str = "the log") -> str:
    """What a log without ratings says to ``retrieval.sequence_ratings``."""
    return (
        "`retrieval.sequence_ratings` reads the rating of each history item, and "
        f"{where} has no `{RATING}` column. Name one with `data.rating_col`, or set "
        "`retrieval.sequence_ratings=false`."
    )


def rating_tables(
    times: np.ndarray,
    user_idx: np.ndarray,
    ratings: np.ndarray | None,
    *,
    num_users: int,
    config: RetrievalConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(:attr:`~RetrievalTensors.history_ratings`, ``sequence_ratings``,
    ``rating_edges``, ``rating_range``) of the training rows (``ratings``: their
    values, NaN where none; None: the model reads no ratings, and all four are
    empty)."""
    empty = torch.zeros(0, 0, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.float64)
    if ratings is None:
        return empty, empty, none, none
    known = ratings[~np.isnan(ratings)]
    bounds = torch.tensor([known.min(), known.max()]) if len(known) else none
    edges = rating_edges(ratings)
    buckets = rating_buckets(ratings, edges)
    # The items' time order: the buckets in the items' place.
    length = config.history_length
    history = latest_rows(times, user_idx, buckets, num_users=num_users, length=length)
    windows = empty
    if config.examples == "sequences":
        windows = sequence_windows(times, user_idx, buckets, length=length)[0]
    return history[0], windows, torch.from_numpy(edges), bounds.double()


def session_history(
    tensors: RetrievalTensors,
    user_idx: int,
    session: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """What a session's query reads, oldest first: a known user's stored history
    (none for ``user_idx`` 0), then the session's ``[S]`` item indices, their
    times and their ratings' buckets (0: not known; from the session's rating
    values, NaN where none). The times are the session's alone where the
    tables keep none; the caller takes the last ``history_length``."""
    items, times, given = session
    ratings = torch.zeros_like(items)  # bucket 0: not known
    if tensors.reads_ratings:
        edges = tensors.rating_edges.numpy()
        ratings = torch.from_numpy(rating_buckets(given.numpy(), edges))
    if user_idx > 0:  # the stored history comes first
        stored = tensors.history[user_idx]
        kept = stored > 0
        items = torch.cat([stored[kept], items])
        if tensors.history_times.numel():
            times = torch.cat([tensors.history_times[user_idx][kept], times])
        if tensors.history_ratings.numel():
            ratings = torch.cat([tensors.history_ratings[user_idx][kept], ratings])
    return items, times, ratings


def rating_values(inter: pl.DataFrame) -> np.ndarray:
    """``[n]`` float64 the rows' ratings, NaN where a row has none."""
    if RATING not in inter.columns:
        raise ConfigError(no_rating_column())
    return inter[RATING].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def rating_edges(ratings: np.ndarray) -> np.ndarray:
    """Sorted float64 edges cutting ``ratings`` (NaN: none) into at most
    :data:`RATING_LEVELS` buckets: one per distinct value where there are that
    few (the edges halfway between neighbours), else at quantiles."""
    known = ratings[~np.isnan(ratings)]
    levels = np.unique(known)
    if len(levels) <= RATING_LEVELS:
        return (levels[1:] + levels[:-1]) / 2
    cuts = np.quantile(known, np.linspace(0, 1, RATING_LEVELS + 1)[1:-1])
    return np.unique(cuts)


def rating_buckets(ratings: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``[n]`` int64 bucket of each rating: 1 + the edges below it, 0 for NaN."""
    buckets = 1 + np.searchsorted(edges, np.nan_to_num(ratings), side="right")
    return np.where(np.isnan(ratings), 0, buckets).astype(np.int64)
