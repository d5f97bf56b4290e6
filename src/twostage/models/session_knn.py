"""The sequence-aware user neighbourhood (session-kNN): the session-kNN baseline
(:class:`twostage.baselines.SessionKNN`) and the retrieval score term
``retrieval.session_knn_weight``.

STAN (Garg et al., SIGIR 2019), without its decay by the neighbour's age. For a query
sequence ``s`` (most recent last, ``L`` items):

- each of its items weighs ``exp(-d / recency)``, ``d`` its distance in items from
  the end of ``s`` (the latest occurrence of a repeated item);
- every stored user ``n`` is a candidate neighbour, with similarity the summed
  weights of the items ``s`` and ``n``'s sequence share, divided by
  ``sqrt(L * len(n))``; the ``neighbours`` most similar are kept;
- neighbour ``n`` adds ``similarity * exp(-|q - m| / proximity)`` to the item at each
  position ``q`` of its sequence, ``m`` being the position in ``n`` of the most
  recent item of ``s`` that ``n`` holds (before and after it alike).

It reads order at both ends, where EASE and item-kNN read sets and the transition
counts one pair of items, so it errs differently from the ordered towers too.
Scoring costs one sparse product over the stored users and the neighbours' sequences;
nothing is trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from twostage.errors import ConfigError, DataError

__all__ = ["BLOCK_CELLS", "SessionNeighbours", "check_options", "quiet_sparse"]

#: Most cells of one block's ``[batch, stored users]`` similarities (and of its
#: ``[batch, num_items]`` scores): 2^24, 128 MiB in float64. A log of 10^7 users
#: scores a query at a time rather than hold 20 GiB for 256 of them.
BLOCK_CELLS = 2**24


class SessionNeighbours:
    """Users' item sequences to find neighbours among, and the scoring above.

    Args:
        lengths: ``[U]`` each stored user's number of items.
        items: ``[sum(lengths)]`` their items end to end, each user's oldest first
            (1 .. ``num_items - 1``; 0, the unknown item, is not stored).
        num_items: width of the scores (row 0: the unknown item, never scored).
        neighbours: neighbours kept per query, >= 1.
        recency: decay of the query's items, in items from its end, > 0.
        proximity: decay of a neighbour's items, in items from the shared one, > 0.
        batch_size: queries scored at a time (each holds ``[batch, num_items]`` and
            ``[batch, U]`` floats, plus its neighbours' sequences); fewer where
            those would pass :data:`BLOCK_CELLS` cells (:attr:`block_size`).
    """

    def __init__(
        self,
        lengths: Tensor,
        items: Tensor,
        *,
        num_items: int,
        neighbours: int = 50,
        recency: float = 5.0,
        proximity: float = 5.0,
        batch_size: int = 256,
    ) -> None:
        check_options(
            neighbours=neighbours,
            recency=recency,
            proximity=proximity,
            batch_size=batch_size,
        )
        lengths, items = lengths.long(), items.long()
        if int(lengths.sum()) != len(items) or (len(items) and items.min() < 1):
            raise DataError(
                "`items` should hold sum(lengths) item indices >= 1. Received: "
                f"{len(items)} items for lengths summing to {int(lengths.sum())}."
            )
        if len(items) and int(items.max()) >= num_items:
            raise DataError(
                f"item indices should be < num_items = {num_items}. "
                f"Received: an item index {int(items.max())}."
            )
        self.neighbours, self.batch_size = neighbours, batch_size
        self.recency, self.proximity = float(recency), float(proximity)
        self.num_items = num_items
        self.indptr = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        self.indptr[1:] = lengths.cumsum(0)
        self.items = items
        rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        pairs = torch.sparse_coo_tensor(
            torch.stack([rows, items]),
            torch.ones(len(items)),
            (len(lengths), num_items),
            check_invariants=False,
        ).coalesce()
        with quiet_sparse():
            # 0/1: a repeated item is one shared item.
            self.matrix = torch.sparse_coo_tensor(
                pairs.indices(),
                torch.ones(pairs.indices().shape[1]),
                pairs.shape,
                check_invariants=False,
            ).to_sparse_csr()

    @classmethod
    def from_table(
        cls,
        table: Tensor,
        *,
        num_items: int,
        neighbours: int = 50,
        recency: float = 5.0,
        proximity: float = 5.0,
        batch_size: int = 256,
    ) -> SessionNeighbours:
        """From a ``[U, M]`` table of each user's latest items, most recent last,
        0 = padding (as the retrieval tables hold histories)."""
        if table.ndim != 2 or table.is_floating_point():
            raise DataError(
                "`table` should be a [U, M] integer tensor. "
                f"Received: dtype={table.dtype}, shape={tuple(table.shape)}."
            )
        kept = table > 0
        return cls(
            kept.sum(dim=1),
            table[kept],
            num_items=num_items,
            neighbours=neighbours,
            recency=recency,
            proximity=proximity,
            batch_size=batch_size,
        )

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    def score_users(
        self, user_idx: Tensor, *, sessions: Tensor | None = None
    ) -> Tensor:
        """``[B, num_items]``: each stored user's own sequence as the query, the
        user never their own neighbour; an empty query past the stored users.

        Args:
            user_idx: ``[B]`` stored users (past the end, or negative: none).
            sessions: ``[B, S]`` items each query reads after its user's (most
                recent last, 0 = padding), or None.
        """
        out = torch.zeros(len(user_idx), self.num_items)
        step = self.block_size
        for start in range(0, len(user_idx), step):
            block = user_idx[start : start + step].long()
            row, position, item = self._segments(block)
            if sessions is not None:
                extra = sessions[start : start + step]
                kept = extra > 0
                extra_row = kept.nonzero()[:, 0]
                before = torch.bincount(row, minlength=len(block))
                extra_position = before[extra_row] + kept.long().cumsum(dim=1)[kept] - 1
                row = torch.cat([row, extra_row])
                position = torch.cat([position, extra_position])
                item = torch.cat([item, extra[kept].long()])
            out[start : start + len(block)] = self._score(
                row, position, item, batch=len(block), exclude=block
            )
        return out

    @property
    def block_size(self) -> int:
        """Queries scored at a time: ``batch_size``, fewer where the stored users
        or the catalogue are so many that a block's ``[batch, U]`` similarities
        or ``[batch, num_items]`` scores would pass :data:`BLOCK_CELLS` cells."""
        widest = max(self.num_users, self.num_items, 1)
        return max(1, min(self.batch_size, BLOCK_CELLS // widest))

    def score_sequences(
        self, queries: Tensor, *, exclude: Tensor | None = None
    ) -> Tensor:
        """``queries [B, L]`` item sequences, most recent last, 0 = padding ->
        ``[B, num_items]``; ``exclude [B]``: a stored user each query may not take
        as a neighbour (its own row; -1 or past the end: none)."""
        out = torch.zeros(len(queries), self.num_items)
        step = self.block_size
        for start in range(0, len(queries), step):
            block = queries[start : start + step]
            kept = block > 0
            row = kept.nonzero()[:, 0]
            position = kept.long().cumsum(dim=1)[kept] - 1
            skip = None if exclude is None else exclude[start : start + len(block)]
            out[start : start + len(block)] = self._score(
                row, position, block[kept], batch=len(block), exclude=skip
            )
        return out

    def _segments(
        self, users: Tensor, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The sequences of ``users`` (``[S]``; past the end: none) laid end to
        end: ``(segment [T], position in it [T], item [T])``."""
        known = (users >= 0) & (users < self.num_users)
        safe = torch.where(known, users, 0)
        starts = self.indptr[safe]
        lengths = torch.where(known, self.indptr[safe + 1] - starts, 0)
        if keep is not None:
            lengths = torch.where(keep, lengths, 0)
        segment = torch.repeat_interleave(torch.arange(len(users)), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(len(segment)) - first[segment]
        return segment, position, self.items[starts[segment] + position]

    def _score(
        self,
        row: Tensor,
        position: Tensor,
        item: Tensor,
        *,
        batch: int,
        exclude: Tensor | None,
    ) -> Tensor:
        """``[batch, num_items]`` scores of the queries given as ``(row, position,
        item)`` triplets, each query's items in order."""
        num_users, num_items = self.num_users, self.num_items
        # The queries: each item's weight and recency (its latest occurrence).
        lengths = torch.bincount(row, minlength=batch)
        back = (lengths[row] - 1 - position).double()
        flat = row * num_items + item
        weights = torch.zeros(batch * num_items, dtype=torch.float64)
        weights.scatter_reduce_(0, flat, torch.exp(-back / self.recency), "amax")
        recent = torch.zeros(batch * num_items, dtype=torch.int64)
        recent.scatter_reduce_(0, flat, position + 1, "amax")
        weights, recent = weights.view(batch, num_items), recent.view(batch, num_items)
        # Similarity to every stored user: shared items' weights over sqrt(L * len).
        with quiet_sparse():
            # (U, N) @ (N, B) -> (U, B)
            shared = (self.matrix @ weights.T.float()).T.double()
        sizes = (self.indptr[1:] - self.indptr[:-1]).double()
        sim = shared / (sizes[None, :] * lengths[:, None].double()).sqrt().clamp_min(1)
        if exclude is not None:
            own = (exclude >= 0) & (exclude < num_users)
            sim[torch.arange(batch)[own], exclude[own]] = 0.0
        k = min(self.neighbours, num_users)
        sim_k, nb = sim.topk(k, dim=1)  # (B, k)
        # The neighbours' sequences; the anchor: where each holds the query's
        # latest item (its latest position there).
        segment, place, held = self._segments(nb.reshape(-1), sim_k.reshape(-1) > 0)
        owner = segment // k
        span = int(place.max()) + 1 if len(place) else 1
        best = torch.zeros(batch * k, dtype=torch.int64)
        best.scatter_reduce_(0, segment, recent[owner, held] * span + place, "amax")
        anchor = best[segment] % span
        vote = sim_k.reshape(-1)[segment] * torch.exp(
            -(place - anchor).abs().double() / self.proximity
        )
        out = torch.zeros(batch * num_items, dtype=torch.float64)
        out.index_add_(0, owner * num_items + held, vote)
        return out.view(batch, num_items).float()


def check_options(
    *, neighbours: int, recency: float, proximity: float, batch_size: int
) -> None:
    """Raise ConfigError unless every option of :class:`SessionNeighbours` is
    positive (the counts, integers)."""
    checks = {
        "neighbours": (neighbours, isinstance(neighbours, int) and neighbours >= 1),
        "recency": (recency, recency > 0),
        "proximity": (proximity, proximity > 0),
        "batch_size": (batch_size, isinstance(batch_size, int) and batch_size >= 1),
    }
    for arg, (value, ok) in checks.items():
        if not ok:
            raise ConfigError(
                f"`{arg}` should be positive. Received: `{arg}` = {value!r}."
            )


@contextmanager
def quiet_sparse() -> Iterator[None]:
    """Silence torch's one-time warning that sparse CSR is "beta": the operations
    used here and by the baselines (products, coalescing) are stable."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta"
        )
        yield
