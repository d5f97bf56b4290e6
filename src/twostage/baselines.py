"""Non-neural baselines, scored by the same evaluation code as the trained models.

Each baseline has a ``name``, ``fit(train, *, num_items, weights=None)`` on a
:class:`~twostage.metrics.UserItems` of training items per ``user_idx``, and
``score(user_idx) -> [B, num_items]`` float scores, which plugs straight into
:func:`twostage.evaluate.evaluate_scores` as ``score_fn=model.score``. Scores are raw:
seen and invalid items are masked by the evaluation, not here.

:class:`RecentPopularity` (fitted on the training rows' times),
:class:`Transition`, :class:`SessionKNN` and :class:`RecencyEASE` (fitted on the
time-ordered training rows) need what a
:class:`~twostage.metrics.UserItems` does not hold, and have their own ``fit_*``.

Users with no training history (an empty row, or a ``user_idx`` at or beyond
``train.num_rows``) get the popularity list from :class:`Popularity` and all-zero
scores from :class:`EASE` and :class:`ItemKNN` (no fallback: mixing in popularity would
be a different model, and a zero row makes the cold-start gap visible in a slice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Literal, Protocol

import numpy as np
import polars as pl
import torch

from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError, NotFittedError
from twostage.models.session_knn import (
    SessionNeighbours,
    activity_ranks,
    check_options,
    quiet_sparse,
)

__all__ = [
    "BASELINES",
    "EASE",
    "Baseline",
    "ItemKNN",
    "Popularity",
    "RecencyEASE",
    "RecentPopularity",
    "SessionKNN",
    "Transition",
]

# Rows of a dense [rows, num_items] block built at a time: about 2**24 floats.
_BLOCK_ELEMENTS = 1 << 24

#: Catalogues above this many items fit :class:`ItemKNN` from sparse blocks (the
#: pairs that share a user) instead of dense ones (every pair): 17 s against
#: about 200 s at 200,000 items (docs/scaling.md). Below it the dense path
#: stays, which every figure in docs/benchmarks.md was measured with.
DENSE_ITEMS = 50_000
#: Items a sparse block of ``X^T X`` holds.
_SPARSE_BLOCK = 2048


class Baseline(Protocol):
    """What the evaluation and the CLI need from a baseline."""

    name: str

    def fit(
        self, train: UserItems, *, num_items: int, weights: np.ndarray | None = None
    ) -> Baseline: ...

    def score(self, user_idx: torch.Tensor) -> torch.Tensor: ...

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor: ...


def _values(
    train: UserItems, num_items: int, weights: np.ndarray | None
) -> torch.Tensor:
    """Checks the training data; returns ``[num_pairs]`` float64 values of ``X``."""
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ConfigError(
            f"`num_items` should be a positive integer. Received: {num_items!r}."
        )
    if train.num_pairs and int(train.indices.max()) >= num_items:
        raise DataError(
            f"`train` should hold item indices < num_items = {num_items}. "
            f"Received: an item index {int(train.indices.max())}."
        )
    if weights is None:
        return torch.ones(train.num_pairs, dtype=torch.float64)
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (train.num_pairs,) or not np.isfinite(values).all():
        raise DataError(
            "`weights` should be finite, one per stored pair of `train` "
            f"([{train.num_pairs}], aligned with train.indices). "
            f"Received: shape={values.shape}."
        )
    return torch.from_numpy(values)


def _check_users(user_idx: torch.Tensor) -> np.ndarray:
    if user_idx.ndim != 1 or user_idx.is_floating_point() or user_idx.is_complex():
        raise DataError(
            "`user_idx` should be a 1-D integer tensor. "
            f"Received: dtype={user_idx.dtype}, shape={tuple(user_idx.shape)}."
        )
    users = user_idx.cpu().numpy().astype(np.int64)
    if users.size and users.min() < 0:
        raise DataError(f"`user_idx` should be >= 0. Received: min={users.min()}.")
    return users


def _in_time_order(
    user_idx: np.ndarray, item_idx: np.ndarray, timestamps: np.ndarray, num_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training rows' ``(users, items)``, checked, sorted by user, then time
    (ties: row order), as the retrieval tables order histories."""
    users = np.asarray(user_idx, dtype=np.int64)
    items = np.asarray(item_idx, dtype=np.int64)
    times = np.asarray(timestamps)
    if not users.shape == items.shape == times.shape or users.ndim != 1:
        raise DataError(
            "`user_idx`, `item_idx` and `timestamps` should have one entry per "
            f"training row. Received: shapes {users.shape}, {items.shape} and "
            f"{times.shape}."
        )
    if len(users) and (users.min() < 0 or users.max() >= num_users):
        raise DataError(
            f"`user_idx` should lie in [0, {num_users}). Received: values from "
            f"{users.min()} to {users.max()}."
        )
    order = _user_time_order(users, times)
    return users[order], items[order]


def _user_time_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """The stable order by user, then time: one stable sort of the int64 key
    ``user * span + (time - earliest)`` where integer times let it fit (2.8 times
    faster than lexsort at 8M rows), else lexsort (stable too)."""
    if users.size and np.issubdtype(times.dtype, np.integer):
        earliest, latest = int(times.min()), int(times.max())
        span = latest - earliest + 1
        if latest < 2**63 and (int(users.max()) + 1) * span < 2**62:
            offsets = times.astype(np.int64) - np.int64(earliest)
            return np.argsort(users * np.int64(span) + offsets, kind="stable")
    return np.lexsort((times, users))


def _best_first(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, num_cols: int
) -> np.ndarray:
    """The order by row, then value (highest first), then column, of distinct
    ``(row, col)`` pairs with rows in ``[0, 2**31)`` and ``float32`` values > 0:
    ``np.lexsort((cols, -values, rows))``, 5 times faster as one stable sort of
    an int64 key (a positive float32's bits order as its value does), after a
    sort by ``(row, col)`` where the columns are not already in order."""
    in_order = (np.diff(cols) > 0) | (np.diff(rows) != 0)
    first = np.arange(len(rows))
    if not in_order.all():
        first = np.argsort(rows * np.int64(num_cols) + cols)  # distinct keys
    bits = values[first].astype(np.float32).view(np.int32).astype(np.int64)
    key = rows[first] * np.int64(2**31) + (2**31 - 1 - bits)
    return first[np.argsort(key, kind="stable")]


def _distinct_pairs_csr(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: int
) -> torch.Tensor:
    """A ``[size, size]`` sparse CSR matrix of pairs that are distinct, sorted by
    one int64 key (what coalescing a COO tensor does, without summing: 3.4 s a
    coalesce for item-kNN's 18.8M pairs over 200,000 items)."""
    order = torch.from_numpy(np.argsort((rows * size + cols).numpy()))
    indptr = torch.zeros(size + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows, minlength=size), 0, out=indptr[1:])
    with quiet_sparse():
        return torch.sparse_csr_tensor(
            indptr,
            cols[order],
            values[order],
            (size, size),
            check_invariants=False,  # sorted, distinct by construction
        )


def _check_table(history: torch.Tensor) -> None:
    """A ``[U, L]`` table of recent items must be a 2-D integer tensor."""
    if history.ndim != 2 or history.is_floating_point():
        raise DataError(
            "`history` should be a [U, L] integer tensor. "
            f"Received: dtype={history.dtype}, shape={tuple(history.shape)}."
        )


def _session_rows(
    sessions: torch.Tensor, num_items: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[B, num_items]`` dense 0/1 rows of the items of ``sessions [B, L]`` (most
    recent last, 0 = padding): each a user's row of ``X`` read from their items
    rather than stored, as a request's session is read."""
    rows, _, items = _session_items(sessions, num_items)
    dense = torch.zeros(sessions.shape[0], num_items, dtype=dtype)
    dense[rows, items] = 1.0
    return dense


def _session_items(
    sessions: torch.Tensor, num_items: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row, column, item)`` of each item of ``sessions [B, L]`` that is not
    padding, checked against the catalogue's ``num_items``."""
    _check_table(sessions)
    sessions = sessions.long()
    if sessions.numel() and (sessions.min() < 0 or sessions.max() >= num_items):
        raise DataError(
            f"`sessions` should hold item indices in [0, {num_items}) (0 = padding). "
            f"Received: values from {int(sessions.min())} to {int(sessions.max())}."
        )
    rows, cols = (sessions > 0).nonzero(as_tuple=True)
    return rows, cols, sessions[rows, cols]


def _history(
    train: UserItems, values: torch.Tensor, user_idx: torch.Tensor, num_items: int
) -> torch.Tensor:
    """``[B, num_items]`` dense rows of ``X`` (zeros for users without history)."""
    local_row, pos = train.positions(_check_users(user_idx))
    dense = torch.zeros(user_idx.shape[0], num_items, dtype=values.dtype)
    dense[torch.from_numpy(local_row), torch.from_numpy(train.indices[pos])] = values[
        torch.from_numpy(pos)
    ]
    return dense


def _item_blocks(
    train: UserItems,
    values: torch.Tensor,
    num_items: int,
    dtype: torch.dtype,
    *,
    block: int | None = None,
    dense: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(start, [C, num_items])`` row blocks of ``X^T X``: dense, or as
    the sparse CSR product (``dense=False``).

    ``X`` is the ``[num_users, num_items]`` matrix of ``values``; each block is one
    sparse-by-sparse product, so the cost follows the co-occurring pairs, not
    ``num_users * num_items``. ``block``: items a block (default: as many as
    keep a dense block within 2^24 cells).
    """
    num_users = train.num_rows
    vals = values.to(dtype)
    cols = torch.from_numpy(train.indices)
    with quiet_sparse():
        x = torch.sparse_csr_tensor(
            torch.from_numpy(train.indptr),
            cols,
            vals,
            (num_users, num_items),
            check_invariants=False,  # built canonical from a validated UserItems
        )
        # X^T in CSR: pairs sorted by item; stable, so users stay sorted in a row.
        order = torch.from_numpy(np.argsort(train.indices, kind="stable"))
        users = torch.from_numpy(train.row_ids())[order]
        item_ptr = torch.zeros(num_items + 1, dtype=torch.int64)
        item_ptr[1:] = torch.bincount(cols, minlength=num_items).cumsum(0)
        block = block or max(1, _BLOCK_ELEMENTS // num_items)
        for start in range(0, num_items, block):
            stop = min(start + block, num_items)
            lo, hi = int(item_ptr[start]), int(item_ptr[stop])
            xt_block = torch.sparse_csr_tensor(
                item_ptr[start : stop + 1] - lo,
                users[lo:hi],
                vals[order[lo:hi]],
                (stop - start, num_users),
                check_invariants=False,
            )
            # (C, U) @ (U, N) -> (C, N)
            product = xt_block @ x
            yield start, product.to_dense() if dense else product


class Popularity:
    """Scores every item by its (weighted) number of training users; same for all.

    With ``train`` built by :meth:`UserItems.from_pairs` repeats count once; pass the
    counts of :meth:`UserItems.from_pairs_counted` as ``weights`` to count every event.
    """

    name = "popularity"

    def __init__(self) -> None:
        self.item_scores: torch.Tensor | None = None  # [num_items] float32

    def fit(
        self, train: UserItems, *, num_items: int, weights: np.ndarray | None = None
    ) -> Popularity:
        values = _values(train, num_items, weights)
        counts = torch.zeros(num_items, dtype=torch.float64)
        counts.index_add_(0, torch.from_numpy(train.indices), values)
        self.item_scores = counts.to(torch.float32)
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` (any ``>= 0``, known or not) -> ``[B, num_items]``."""
        if self.item_scores is None:
            raise NotFittedError("Popularity.score was called before fit.")
        users = _check_users(user_idx)
        return self.item_scores.repeat(users.size, 1)

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` (item indices, 0 = padding) -> ``[B, num_items]``:
        the same row for every session."""
        if self.item_scores is None:
            raise NotFittedError("Popularity.score_sequences was called before fit.")
        _check_table(sessions)
        return self.item_scores.repeat(sessions.shape[0], 1)


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, 2019), in closed form.

    ``P = (X^T X + l2 I)^-1`` and ``B = I - P / diag(P)`` (column ``j`` divided by
    ``P[j, j]``), i.e. ``B[i, j] = -P[i, j] / P[j, j]`` with a zero diagonal; scores are
    ``X[user] @ B``.

    Args:
        l2: ridge strength, > 0.
        max_items: largest catalogue accepted; ``B`` is a dense ``num_items**2`` matrix.
        dtype: ``torch.float32`` (default: half the memory; ``X^T X + l2 I`` has a
            condition number of at most ``(max item count + l2) / l2``, which float32
            handles for the usual ``l2`` of 100..1000) or ``torch.float64`` (for a
            small ``l2`` or to compare with a float64 reference).
    """

    name = "ease"

    def __init__(
        self,
        *,
        l2: float = 500.0,
        max_items: int = 50_000,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not l2 > 0:
            raise ConfigError(f"`l2` should be > 0. Received: `l2` = {l2!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(
                "`dtype` should be torch.float32 or torch.float64. "
                f"Received: `dtype` = {dtype!r}."
            )
        self.l2, self.max_items, self.dtype = float(l2), max_items, dtype
        self.weights: torch.Tensor | None = None  # B: [num_items, num_items]
        self._train: tuple[UserItems, torch.Tensor] | None = None

    def check_size(self, num_items: int) -> None:
        """Raises :class:`ConfigError` where ``num_items`` is above ``max_items``."""
        if num_items > self.max_items:
            gib = num_items**2 * self.dtype.itemsize / 2**30
            raise ConfigError(
                f"EASE needs a dense num_items x num_items matrix: {num_items}^2 "
                f"x {self.dtype.itemsize} bytes = {gib:.1f} GiB (twice that while "
                f"inverting), above `max_items` = {self.max_items}. Use ItemKNN "
                "(sparse top-k neighbours) or a retrieval model for this catalogue, or "
                "raise `max_items` if the memory is there."
            )

    def fit(
        self, train: UserItems, *, num_items: int, weights: np.ndarray | None = None
    ) -> EASE:
        values = _values(train, num_items, weights)
        self.check_size(num_items)
        gram = torch.empty(num_items, num_items, dtype=self.dtype)
        for start, block in _item_blocks(train, values, num_items, self.dtype):
            gram[start : start + block.shape[0]] = block
        gram.diagonal().add_(self.l2)
        # X^T X + l2 I is symmetric positive definite: Cholesky is stable and fast.
        # Two num_items^2 matrices alive at a time: (gram, L), then (L, P).
        chol = torch.linalg.cholesky(gram)
        del gram
        p = torch.cholesky_inverse(chol)
        del chol
        b = p.div_(-p.diagonal().clone())  # column j / -P[j, j], in place
        b.fill_diagonal_(0.0)
        self.weights = b
        self._train = (train, values.to(self.dtype))
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` -> ``[B, num_items]``; zeros for users without history."""
        if self.weights is None or self._train is None:
            raise NotFittedError("EASE.score was called before fit.")
        train, values = self._train
        history = _history(train, values, user_idx, self.weights.shape[0])
        return history @ self.weights  # (B, N) @ (N, N) -> (B, N)

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` (item indices, most recent last, 0 = padding) ->
        ``[B, num_items]``: each session's items as a user's row of ``X`` (1 each,
        whatever ``weights`` the fit read), times ``B``."""
        if self.weights is None:
            raise NotFittedError("EASE.score_sequences was called before fit.")
        rows = _session_rows(sessions, self.weights.shape[0], self.weights.dtype)
        return rows @ self.weights  # (B, N) @ (N, N) -> (B, N)


class ItemKNN:
    """Item-item cosine neighbours, keeping the ``k`` most similar items per item.

    ``sim(i, j) = x_i . x_j / (|x_i| |x_j| + shrink)`` over the item columns of the
    user-item matrix (binary unless ``weights`` are given), with ``sim(i, i) = 0``;
    only each item's top ``k`` positive neighbours are kept. A user's score for ``j``
    is the sum of the kept ``sim(i, j)`` over the items ``i`` in their history.

    ``neighbours_of`` says whose ``k`` neighbours are kept: each ``candidate`` item
    ``j`` keeps the ``k`` history items most like it (the usual form, as in
    RecBole's and Sarwar et al.'s item-based CF; on MovieLens-100k's random split
    it scores NDCG@10 0.386 where the other form scores 0.346), or each
    ``history`` item keeps the ``k`` candidates most like it.

    Args:
        k: neighbours kept per item.
        shrink: added to the cosine denominator; damps pairs with little support.
        neighbours_of: ``candidate`` (the default) or ``history``.
    """

    name = "itemknn"

    def __init__(
        self,
        *,
        k: int = 100,
        shrink: float = 10.0,
        neighbours_of: Literal["candidate", "history"] = "candidate",
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(
                f"`k` should be a positive integer. Received: `k` = {k!r}."
            )
        if not shrink >= 0:
            raise ConfigError(
                f"`shrink` should be >= 0. Received: `shrink` = {shrink!r}."
            )
        if neighbours_of not in ("candidate", "history"):
            raise ConfigError(
                "`neighbours_of` should be 'candidate' or 'history'. "
                f"Received: `neighbours_of` = {neighbours_of!r}."
            )
        self.k, self.shrink, self.neighbours_of = k, float(shrink), neighbours_of
        self.similarity: torch.Tensor | None = None  # sparse CSR [num_items, num_items]
        self._similarity_t: torch.Tensor | None = None
        self._train: tuple[UserItems, torch.Tensor] | None = None

    def fit(
        self, train: UserItems, *, num_items: int, weights: np.ndarray | None = None
    ) -> ItemKNN:
        values = _values(train, num_items, weights).to(torch.float32)
        norms = torch.zeros(num_items, dtype=torch.float32)
        norms.index_add_(0, torch.from_numpy(train.indices), values.square())
        norms.sqrt_()
        width = min(self.k, num_items)
        if num_items > DENSE_ITEMS:
            rows, cols, sims = self._sparse_neighbours(train, values, norms, width)
        else:
            rows, cols, sims = self._dense_neighbours(train, values, norms, width)
        row, col, sim = torch.cat(rows), torch.cat(cols), torch.cat(sims)
        self.similarity = _distinct_pairs_csr(row, col, sim, num_items)
        self._similarity_t = _distinct_pairs_csr(col, row, sim, num_items)
        self._train = (train, values)
        return self

    def _dense_neighbours(
        self, train: UserItems, values: torch.Tensor, norms: torch.Tensor, width: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Each item's ``width`` best neighbours from dense blocks of similarities
        (every item pair scored; ties as ``topk`` takes them)."""
        num_items = len(norms)
        rows, cols, sims = [], [], []
        for start, block in _item_blocks(train, values, num_items, torch.float32):
            stop = start + block.shape[0]
            denominator = norms[start:stop, None] * norms[None, :] + self.shrink
            # An item without users has a zero norm and zero co-occurrences: keep the
            # 0/0 of shrink=0 at 0 instead of a NaN that topk would rank first.
            block /= denominator.clamp_(min=torch.finfo(torch.float32).tiny)
            block[torch.arange(stop - start), torch.arange(start, stop)] = 0.0
            top, where = block.topk(width, dim=1)
            keep = top > 0
            rows.append(torch.arange(start, stop).unsqueeze(1).expand_as(top)[keep])
            cols.append(where[keep])
            sims.append(top[keep])
        return rows, cols, sims

    def _sparse_neighbours(
        self, train: UserItems, values: torch.Tensor, norms: torch.Tensor, width: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Each item's ``width`` best neighbours among the items it co-occurs with,
        from sparse blocks: the same similarities as the dense blocks, scored only
        where two items share a user (ties: the lower item index first)."""
        num_items = len(norms)
        rows, cols, sims = [], [], []
        blocks = _item_blocks(
            train, values, num_items, torch.float32, block=_SPARSE_BLOCK, dense=False
        )
        for start, product in blocks:
            row = torch.repeat_interleave(
                torch.arange(start, start + product.shape[0]),
                product.crow_indices().diff(),
            )
            col, sim = product.col_indices(), product.values()
            sim = sim / (norms[row] * norms[col] + self.shrink).clamp_(
                min=torch.finfo(torch.float32).tiny
            )
            keep = (sim > 0) & (row != col)
            r, c, v = row[keep].numpy(), col[keep].numpy(), sim[keep].numpy()
            order = _best_first(r - start, c, v, num_items)
            r, c, v = r[order], c[order], v[order]
            best = np.arange(len(r)) - np.searchsorted(r, r, side="left") < width
            rows.append(torch.from_numpy(r[best]))
            cols.append(torch.from_numpy(c[best]))
            sims.append(torch.from_numpy(v[best]))
        return rows, cols, sims

    def neighbours(self, item_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(similarities, item_idx)`` of one item's kept neighbours, best first."""
        if self.similarity is None:
            raise NotFittedError("ItemKNN.neighbours was called before fit.")
        crow = self.similarity.crow_indices()
        lo, hi = int(crow[item_idx]), int(crow[item_idx + 1])
        sims = self.similarity.values()[lo:hi]
        ids = self.similarity.col_indices()[lo:hi]
        order = sims.argsort(descending=True, stable=True)
        return sims[order], ids[order]

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` -> ``[B, num_items]``; zeros for users without history."""
        if self.similarity is None or self._similarity_t is None or self._train is None:
            raise NotFittedError("ItemKNN.score was called before fit.")
        train, values = self._train
        return self._scores(
            _history(train, values, user_idx, self._similarity_t.shape[0])
        )

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` (item indices, 0 = padding) -> ``[B, num_items]``:
        each session's items as a user's row of ``X`` (1 each)."""
        if self._similarity_t is None:
            raise NotFittedError("ItemKNN.score_sequences was called before fit.")
        num_items = self._similarity_t.shape[0]
        return self._scores(_session_rows(sessions, num_items, torch.float32))

    def _scores(self, history: torch.Tensor) -> torch.Tensor:
        """``[B, num_items]`` scores of dense rows of ``X`` (a transposed view)."""
        assert self.similarity is not None and self._similarity_t is not None
        # S keeps row i's top k (cosine is symmetric). Candidate neighbourhoods:
        # score[j] = sum_i S[j, i] x_i, i.e. X @ S^T; history ones: X @ S.
        kept = self.similarity if self.neighbours_of == "candidate" else None
        # The product's transpose, a view: a contiguous copy would be one more
        # fresh [B, N] block (its pages faulted in anew) before the caller's own.
        with quiet_sparse():
            if kept is not None:
                # S (N, N) @ X^T (N, B) -> (N, B), transposed: X @ S^T.
                return (kept @ history.T).T
            # S^T (N, N) @ X^T (N, B) -> (N, B), transposed: X @ S.
            return (self._similarity_t @ history.T).T


class RecentPopularity:
    """Popularity over the last ``days`` of the training log only: what is popular
    now (under a global temporal split it is within a few percent of far larger
    models on ML-20M, Ji et al., 2023). Same list for every user.

    Args:
        days: the window, counted back from the latest training event.
    """

    name = "recent-popularity"

    def __init__(self, *, days: float = 30.0) -> None:
        if not days > 0:
            raise ConfigError(f"`days` should be > 0. Received: `days` = {days!r}.")
        self.days = float(days)
        self.item_scores: torch.Tensor | None = None  # [num_items] float32

    def fit_log(
        self, item_idx: np.ndarray, timestamps: np.ndarray, *, num_items: int
    ) -> RecentPopularity:
        """``item_idx [n]`` and ``timestamps [n]`` (seconds) of the training rows."""
        items = np.asarray(item_idx, dtype=np.int64)
        times = np.asarray(timestamps, dtype=np.int64)
        if items.shape != times.shape:
            raise DataError(
                "`item_idx` and `timestamps` should have one entry per training row. "
                f"Received: shapes {items.shape} and {times.shape}."
            )
        recent = times >= times.max(initial=0) - self.days * 86_400
        counts = np.bincount(items[recent], minlength=num_items).astype(np.float32)
        # Older events break ties, so the list never ends in an arbitrary order.
        everything = np.bincount(items, minlength=num_items).astype(np.float32)
        scores = counts + everything / (everything.max(initial=0.0) + 1.0)
        self.item_scores = torch.from_numpy(scores)
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` -> ``[B, num_items]``, the same row for everyone."""
        if self.item_scores is None:
            raise NotFittedError("RecentPopularity.score was called before fit_log.")
        return self.item_scores.repeat(_check_users(user_idx).size, 1)

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` -> ``[B, num_items]``, the same row for every one."""
        if self.item_scores is None:
            raise NotFittedError(
                "RecentPopularity.score_sequences was called before fit_log."
            )
        _check_table(sessions)
        return self.item_scores.repeat(sessions.shape[0], 1)


class Transition:
    """The item-to-item transition baseline: scores the items that followed the
    user's last item elsewhere in the training sequences, by how often (a
    first-order Markov chain); items never seen after it score 0.

    :meth:`fit_log` reads every training row in time order (what the benchmarks and
    the CLI use, so the baseline does not depend on any model's settings);
    :meth:`fit_sequences` reads a ``[U, L]`` table of recent items, as the retrieval
    tables hold them.
    """

    name = "transition"

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # sparse CSR [num_items, num_items]
        self.last_items: torch.Tensor | None = None  # [U]

    def fit_sequences(self, history: torch.Tensor, *, num_items: int) -> Transition:
        """``history [U, L]`` item indices, most recent last, 0 = padding."""
        _check_table(history)
        before, after = history[:, :-1].reshape(-1), history[:, 1:].reshape(-1)
        last = history[:, -1].clone() if history.shape[1] else None
        return self._fit_pairs(before, after, last, num_items=num_items)

    def fit_log(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        timestamps: np.ndarray,
        *,
        num_users: int,
        num_items: int,
    ) -> Transition:
        """Every training row: ``user_idx [n]``, ``item_idx [n]`` (0 = unknown item,
        never a transition's end) and ``timestamps [n]``; each user's rows in time
        order, ties in row order, as the retrieval tables order histories."""
        users, items = _in_time_order(user_idx, item_idx, timestamps, num_users)
        same_user = users[:-1] == users[1:]
        last = torch.zeros(num_users, dtype=torch.long)
        if len(users):  # each user's last row in that order
            ends = np.flatnonzero(np.append(~same_user, True))
            last[torch.from_numpy(users[ends])] = torch.from_numpy(items[ends])
        return self._fit_pairs(
            torch.from_numpy(items[:-1][same_user]),
            torch.from_numpy(items[1:][same_user]),
            last,
            num_items=num_items,
        )

    def _fit_pairs(
        self,
        before: torch.Tensor,
        after: torch.Tensor,
        last_items: torch.Tensor | None,
        *,
        num_items: int,
    ) -> Transition:
        """Counts of ``before -> after`` (pairs with a 0 skipped) and each user's
        last item."""
        pairs = (before > 0) & (after > 0)
        before, after = before[pairs], after[pairs]
        if len(after) and int(after.max()) >= num_items:
            raise DataError(
                f"transition items should lie in [0, {num_items}). "
                f"Received: max={int(after.max())}."
            )
        # Counted as UserItems pairs (one sort of one int64 key): 5 times faster
        # than coalescing a COO tensor at 8M rows.
        follows, counts = UserItems.from_pairs_counted(
            before.numpy(), after.numpy(), num_rows=num_items
        )
        with quiet_sparse():
            self.counts = torch.sparse_csr_tensor(
                torch.from_numpy(follows.indptr),
                torch.from_numpy(follows.indices),
                torch.from_numpy(counts).float(),
                (num_items, num_items),
                check_invariants=False,  # canonical by construction
            )
        self.last_items = last_items
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` -> ``[B, num_items]``; zeros without a last item."""
        if self.counts is None:
            raise NotFittedError("Transition.score was called before fit_sequences.")
        users = torch.from_numpy(_check_users(user_idx))
        last = torch.zeros(len(users), dtype=torch.long)
        if self.last_items is not None:
            known = users < len(self.last_items)
            last[known] = self.last_items[users[known]]
        return self._after(last)

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` (item indices, most recent last, 0 = padding) ->
        ``[B, num_items]``: what followed each session's last item."""
        if self.counts is None:
            raise NotFittedError(
                "Transition.score_sequences was called before fit_sequences."
            )
        _session_items(sessions, self.counts.shape[0])
        sessions = sessions.long()
        width = sessions.shape[1]
        # Each row's latest item: the kept entry of the highest column (none: 0).
        place = (sessions > 0).long() * torch.arange(1, width + 1)
        last = sessions.gather(1, place.argmax(dim=1, keepdim=True))[:, 0]
        return self._after(last)

    def _after(self, last: torch.Tensor) -> torch.Tensor:
        """``[B, num_items]`` the counts of what followed each ``last`` item
        (0: none, zeros)."""
        assert self.counts is not None
        num_items = self.counts.shape[0]
        indptr = self.counts.crow_indices()
        starts = indptr[last]
        lengths = torch.where(last > 0, indptr[last + 1] - starts, 0)
        # The stored entries of each last item's row, copied into a dense row.
        rows = torch.repeat_interleave(torch.arange(len(last)), lengths)
        ends = torch.cumsum(lengths, 0)
        offsets = torch.arange(len(rows)) - torch.repeat_interleave(
            ends - lengths, lengths
        )
        source = torch.repeat_interleave(starts, lengths) + offsets
        scores = torch.zeros(len(last), num_items)
        scores[rows, self.counts.col_indices()[source]] = self.counts.values()[source]
        return scores


class RecencyEASE:
    """EASE read in time order: the user's row of ``X`` weighs each of their items
    by ``exp(-d / recency)``, ``d`` the number of the user's rows after it (0 for
    the latest; a repeated item at its latest place), so the scores ``x B`` lean
    toward what the user did last. ``B`` is :class:`EASE`'s, fitted on the 0/1
    matrix of the same rows.

    A closed-form peer of the ordered towers under next-item protocols: on the
    leave-one-out validation splits it scores 35% (MovieLens-100k) and 60%
    (latest-small) above EASE's NDCG@10, which reads the same items as a set
    (docs/benchmarks.md). :meth:`fit_log` reads every training row in time order
    (the benchmarks and the CLI); :meth:`fit_sequences` a ``[U, L]`` table of
    recent items, as the retrieval tables hold them. Unknown items (index 0) are
    left out.

    Args:
        l2, max_items, dtype: as :class:`EASE`.
        recency: the decay, in rows, > 0. The defaults (``l2`` 200, ``recency``
            5) scored best over the two logs' leave-one-out validation splits
            together (docs/benchmarks.md).
    """

    name = "ease-recency"

    def __init__(
        self,
        *,
        l2: float = 200.0,
        recency: float = 5.0,
        max_items: int = 50_000,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not recency > 0:
            raise ConfigError(
                f"`recency` should be > 0. Received: `recency` = {recency!r}."
            )
        self.recency = float(recency)
        self.ease = EASE(l2=l2, max_items=max_items, dtype=dtype)
        self._rows: tuple[UserItems, torch.Tensor] | None = None

    def fit_log(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        timestamps: np.ndarray,
        *,
        num_users: int,
        num_items: int,
    ) -> RecencyEASE:
        """Every training row: ``user_idx [n]``, ``item_idx [n]`` (0 = unknown, left
        out) and ``timestamps [n]``; each user's rows in time order, ties in row
        order, as the retrieval tables order histories."""
        self.ease.check_size(num_items)  # before sorting every row
        users, items = _in_time_order(user_idx, item_idx, timestamps, num_users)
        starts = np.searchsorted(users, users, side="right")  # each user's end
        after = starts - 1 - np.arange(len(users))  # the user's rows after it
        return self._fit(users, items, after, num_users, num_items)

    def fit_sequences(self, history: torch.Tensor, *, num_items: int) -> RecencyEASE:
        """``history [U, L]`` item indices, most recent last, 0 = padding."""
        _check_table(history)
        self.ease.check_size(num_items)
        rows, cols = np.indices(tuple(history.shape))
        length = history.shape[1]
        return self._fit(
            rows.ravel(),
            history.numpy().ravel(),
            (length - 1 - cols).ravel(),
            history.shape[0],
            num_items,
        )

    def _fit(
        self,
        users: np.ndarray,
        items: np.ndarray,
        after: np.ndarray,
        num_users: int,
        num_items: int,
    ) -> RecencyEASE:
        """From each row's user, item and distance from the user's latest row."""
        known = items > 0
        latest = (
            pl.DataFrame({"u": users[known], "i": items[known], "d": after[known]})
            .group_by("u", "i")
            .agg(pl.col("d").min())
            .sort("u", "i")  # the order of UserItems' pairs
        )
        rows = UserItems.from_pairs(
            latest["u"].to_numpy(), latest["i"].to_numpy(), num_rows=num_users
        )
        self.ease.fit(rows, num_items=num_items)
        decay = np.exp(-latest["d"].to_numpy().astype(np.float64) / self.recency)
        self._rows = (rows, torch.from_numpy(decay).to(self.ease.dtype))
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` -> ``[B, num_items]``; zeros for users without history."""
        if self._rows is None or self.ease.weights is None:
            raise NotFittedError("RecencyEASE.score was called before fit_log.")
        rows, weights = self._rows
        history = _history(rows, weights, user_idx, self.ease.weights.shape[0])
        return history @ self.ease.weights  # (B, N) @ (N, N) -> (B, N)

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` (item indices, most recent last, 0 = padding) ->
        ``[B, num_items]``: each session's items weighed as a user's are, by
        their distance from its latest item."""
        if self.ease.weights is None:
            raise NotFittedError(
                "RecencyEASE.score_sequences was called before fit_log."
            )
        num_items = self.ease.weights.shape[0]
        rows, cols, items = _session_items(sessions, num_items)
        kept = (sessions > 0).long()
        after = kept.flip(1).cumsum(1).flip(1) - kept  # the session's items after it
        decay = torch.exp(-after[rows, cols].double() / self.recency)
        dense = torch.zeros(sessions.shape[0] * num_items, dtype=torch.float64)
        # A repeated item counts at its latest place: the largest weight.
        dense.scatter_reduce_(0, rows * num_items + items, decay, reduce="amax")
        history = dense.view(-1, num_items).to(self.ease.weights.dtype)
        return history @ self.ease.weights  # (B, N) @ (N, N) -> (B, N)


class SessionKNN:
    """The sequence-aware neighbourhood baseline (session-kNN, STAN without its
    decay by the neighbour's age; :mod:`twostage.models.session_knn` has the
    definition): the users whose sequences share the user's recent items vote for
    the items they took near the shared ones.

    A session-based peer of the ordered towers: it reads order at both ends, where
    :class:`EASE` and :class:`ItemKNN` read sets and :class:`Transition` reads one
    pair. :meth:`fit_log` reads every training row in time order (the benchmarks and
    the CLI); :meth:`fit_sequences` a ``[U, L]`` table of recent items, as the
    retrieval tables hold them. Unknown items (index 0) are left out of the
    sequences; a user without items scores 0 everywhere.

    Args:
        neighbours, recency, proximity, batch_size: as
            :class:`~twostage.models.session_knn.SessionNeighbours`; the defaults
            scored best over the leave-one-out validation splits of MovieLens-100k
            and latest-small together (docs/benchmarks.md).
        sample: candidate neighbours per query, the users active last among
            those sharing an item with it (0: every user); :meth:`fit_log` only,
            as a table of sequences has no times.
    """

    name = "session-knn"

    def __init__(
        self,
        *,
        neighbours: int = 30,
        recency: float = 5.0,
        proximity: float = 5.0,
        batch_size: int = 256,
        sample: int = 0,
    ) -> None:
        self.neighbours, self.batch_size = neighbours, batch_size
        self.recency, self.proximity, self.sample = recency, proximity, sample
        check_options(  # now, not at fit
            neighbours=neighbours,
            recency=recency,
            proximity=proximity,
            batch_size=batch_size,
            sample=sample,
        )
        self.model: SessionNeighbours | None = None

    def _build(
        self,
        lengths: torch.Tensor,
        items: torch.Tensor,
        *,
        num_items: int,
        latest: torch.Tensor | None = None,
    ) -> SessionNeighbours:
        return SessionNeighbours(
            lengths,
            items,
            num_items=num_items,
            neighbours=self.neighbours,
            recency=self.recency,
            proximity=self.proximity,
            batch_size=self.batch_size,
            sample=self.sample,
            latest=latest,
        )

    def fit_sequences(self, history: torch.Tensor, *, num_items: int) -> SessionKNN:
        """``history [U, L]`` item indices, most recent last, 0 = padding."""
        if self.sample:
            raise ConfigError(
                "`sample` > 0 samples the users active last, and a table of "
                "sequences does not say when each was. Fit with `fit_log`, or set "
                "`sample` to 0."
            )
        self.model = SessionNeighbours.from_table(
            history,
            num_items=num_items,
            neighbours=self.neighbours,
            recency=self.recency,
            proximity=self.proximity,
            batch_size=self.batch_size,
        )
        return self

    def fit_log(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        timestamps: np.ndarray,
        *,
        num_users: int,
        num_items: int,
    ) -> SessionKNN:
        """Every training row: ``user_idx [n]``, ``item_idx [n]`` (0 = unknown, left
        out) and ``timestamps [n]``; each user's rows in time order, ties in row
        order, as the retrieval tables order histories."""
        users, items = _in_time_order(user_idx, item_idx, timestamps, num_users)
        known = items > 0
        latest = None
        if self.sample:
            kept = np.asarray(item_idx) > 0
            latest = activity_ranks(
                np.asarray(user_idx, dtype=np.int64)[kept],
                np.asarray(timestamps)[kept],
                num_users=num_users,
            )
        self.model = self._build(
            torch.from_numpy(np.bincount(users[known], minlength=num_users)),
            torch.from_numpy(items[known]),
            num_items=num_items,
            latest=latest,
        )
        return self

    def score(self, user_idx: torch.Tensor) -> torch.Tensor:
        """``user_idx [B]`` -> ``[B, num_items]``; zeros without a sequence."""
        if self.model is None:
            raise NotFittedError("SessionKNN.score was called before fit_log.")
        return self.model.score_users(torch.from_numpy(_check_users(user_idx)))

    def score_sequences(self, sessions: torch.Tensor) -> torch.Tensor:
        """``sessions [B, L]`` (item indices, most recent last, 0 = padding) ->
        ``[B, num_items]``: each session as a query of its own, every stored user
        (with ``sample``, each of the latest active sharing an item) a possible
        neighbour."""
        if self.model is None:
            raise NotFittedError(
                "SessionKNN.score_sequences was called before fit_log."
            )
        _session_items(sessions, self.model.num_items)
        return self.model.score_sequences(sessions.long())


BASELINES: dict[str, Callable[..., Baseline]] = {
    Popularity.name: Popularity,
    EASE.name: EASE,
    ItemKNN.name: ItemKNN,
    # The weaker neighbourhood form, kept beside the usual one for comparison.
    "itemknn-history": partial(ItemKNN, neighbours_of="history"),
}
