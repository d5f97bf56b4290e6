"""The sequence-aware user neighbourhood (session-kNN): the session-kNN baseline
(:class:`twostage.baselines.SessionKNN`) and the retrieval score term
``retrieval.session_knn_weight``.

STAN (Garg et al., SIGIR 2019), without its decay by the neighbour's age. For a query
sequence ``s`` (most recent last, ``L`` items):

- each of its items weighs ``exp(-d / recency)``, ``d`` its distance in items from
  the end of ``s`` (the latest occurrence of a repeated item);
- every stored user ``n`` is a candidate neighbour (with ``sample`` > 0, only the
  ``sample`` most recently active users who share an item with ``s``, as V-SKNN
  samples the most recent sessions), with similarity the summed weights of the
  items ``s`` and ``n``'s sequence share, divided by ``sqrt(L * len(n))``; the
  ``neighbours`` most similar are kept;
- neighbour ``n`` adds ``similarity * exp(-|q - m| / proximity)`` to the item at each
  position ``q`` of its sequence, ``m`` being the position in ``n`` of the most
  recent item of ``s`` that ``n`` holds (before and after it alike).

It reads order at both ends, where EASE and item-kNN read sets and the transition
counts one pair of items, so it errs differently from the ordered towers too.
Scoring costs one sparse product over the stored users and the neighbours' sequences,
or with ``sample`` > 0 a walk of at most ``sample + 1`` of each query item's users
(the latest active first) and the neighbours' sequences: a cost that no longer grows
with the stored users. Nothing is trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import polars as pl
import torch
from torch import Tensor

from twostage.errors import ConfigError, DataError
from twostage.scratch import Scratch

__all__ = [
    "BLOCK_CELLS",
    "SessionNeighbours",
    "activity_ranks",
    "check_options",
    "quiet_sparse",
]

#: Stored users from which an exact session-kNN (every user a candidate
#: neighbour) is slow: about 21 ms a query at 10^6 on 2 cores (docs/scaling.md).
#: Training warns at it where the term is exact, and the baseline samples there.
EXACT_TERM_USERS = 1_000_000

#: The candidate neighbours the session-kNN baseline samples from
#: :data:`EXACT_TERM_USERS` stored users on: the 1,000 latest active, the
#: default of the published V-SKNN implementation (session-rec's ``SessionKNN``).
SCALE_SAMPLE = 1000

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
        batch_size: queries scored at a time (each holds ``[batch, num_items]`` and,
            without ``sample``, ``[batch, U]`` floats, plus its neighbours'
            sequences); fewer where those would pass :data:`BLOCK_CELLS` cells
            (:attr:`block_size`).
        sample: candidate neighbours per query: the ``sample`` users who share an
            item with it and were active last (by ``latest``); 0: every stored user.
        latest: ``[U]`` each stored user's rank by the time of their latest item
            (higher: later; distinct), which ``sample`` > 0 reads.
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
        sample: int = 0,
        latest: Tensor | None = None,
    ) -> None:
        check_options(
            neighbours=neighbours,
            recency=recency,
            proximity=proximity,
            batch_size=batch_size,
            sample=sample,
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
        self.neighbours, self.batch_size, self.sample = neighbours, batch_size, sample
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
        ).coalesce()  # a repeated item is one shared item
        if sample:  # the users of each item, not the items of each user
            self._postings(pairs.indices(), latest, num_users=len(lengths))
            return
        with quiet_sparse():
            self.matrix = torch.sparse_coo_tensor(
                pairs.indices(),
                torch.ones(pairs.indices().shape[1]),
                pairs.shape,
                check_invariants=False,
            ).to_sparse_csr()

    def _postings(
        self, pairs: Tensor, latest: Tensor | None, *, num_users: int
    ) -> None:
        """Each item's users, the latest active first (``post_ptr [N + 1]``,
        ``post_users``): where ``sample`` > 0 draws candidate neighbours."""
        if (
            latest is None
            or latest.shape != (num_users,)
            or not torch.equal(
                torch.sort(latest.long()).values, torch.arange(num_users)
            )
        ):
            raise DataError(
                "`sample` > 0 reads `latest`: each stored user's rank by the time of "
                f"their latest item, 0 to {num_users - 1} each once. Received: "
                + ("None" if latest is None else f"shape {tuple(latest.shape)}")
                + "."
            )
        users, items = pairs[0], pairs[1]
        latest = latest.long()
        order = torch.argsort(items * num_users + (num_users - 1 - latest[users]))
        self.post_users = users[order]
        self.post_ptr = torch.zeros(self.num_items + 1, dtype=torch.int64)
        self.post_ptr[1:] = torch.bincount(items, minlength=self.num_items).cumsum(0)
        self.latest = latest
        self.by_rank = torch.argsort(latest)  # the user at each rank

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
        scratch = Scratch()  # memory the blocks reuse
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
                row, position, item, batch=len(block), exclude=block, scratch=scratch
            )
        return out

    @property
    def block_size(self) -> int:
        """Queries scored at a time: ``batch_size``, fewer where the stored users
        or the catalogue are so many that a block's ``[batch, U]`` similarities
        or ``[batch, num_items]`` scores would pass :data:`BLOCK_CELLS` cells."""
        # A sampled block holds [batch, sample] candidates, not [batch, U].
        widest = max(self.sample or self.num_users, self.num_items, 1)
        return max(1, min(self.batch_size, BLOCK_CELLS // widest))

    def score_sequences(
        self, queries: Tensor, *, exclude: Tensor | None = None
    ) -> Tensor:
        """``queries [B, L]`` item sequences, most recent last, 0 = padding ->
        ``[B, num_items]``; ``exclude [B]``: a stored user each query may not take
        as a neighbour (its own row; -1 or past the end: none)."""
        out = torch.zeros(len(queries), self.num_items)
        step = self.block_size
        scratch = Scratch()  # memory the blocks reuse
        for start in range(0, len(queries), step):
            block = queries[start : start + step]
            kept = block > 0
            row = kept.nonzero()[:, 0]
            position = kept.long().cumsum(dim=1)[kept] - 1
            skip = None if exclude is None else exclude[start : start + len(block)]
            out[start : start + len(block)] = self._score(
                row,
                position,
                block[kept],
                batch=len(block),
                exclude=skip,
                scratch=scratch,
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
        scratch: Scratch | None = None,
    ) -> Tensor:
        """``[batch, num_items]`` float64 scores of the queries given as ``(row,
        position, item)`` triplets, each query's items in order; ``scratch``:
        memory kept between the blocks of one call (here and in
        :meth:`_similar`), which the scores are written in: copy them out before
        the next block."""
        num_items = self.num_items
        scratch = Scratch() if scratch is None else scratch
        # The queries: each item's weight and recency (its latest occurrence).
        lengths = torch.bincount(row, minlength=batch)
        back = (lengths[row] - 1 - position).double()
        flat = row * num_items + item
        size = batch * num_items
        weights = scratch.block("weights", (size,), torch.float64).zero_()
        weights.scatter_reduce_(0, flat, torch.exp(-back / self.recency), "amax")
        recent = scratch.block("recent", (size,), torch.int64).zero_()
        recent.scatter_reduce_(0, flat, position + 1, "amax")
        weights, recent = weights.view(batch, num_items), recent.view(batch, num_items)
        if self.sample:
            sim_k, nb = self._sampled(weights, lengths, exclude=exclude)
        else:
            sim_k, nb = self._similar(
                weights, lengths, exclude=exclude, scratch=scratch
            )
        # The neighbours' sequences; the anchor: where each holds the query's
        # latest item (its latest position there).
        k = nb.shape[1]
        segment, place, held = self._segments(nb.reshape(-1), sim_k.reshape(-1) > 0)
        owner = segment // k
        span = int(place.max()) + 1 if len(place) else 1
        best = torch.zeros(batch * k, dtype=torch.int64)
        best.scatter_reduce_(0, segment, recent[owner, held] * span + place, "amax")
        anchor = best[segment] % span
        vote = sim_k.reshape(-1)[segment] * torch.exp(
            -(place - anchor).abs().double() / self.proximity
        )
        out = scratch.block("votes", (size,), torch.float64).zero_()
        out.index_add_(0, owner * num_items + held, vote)
        return out.view(batch, num_items)

    def _similar(
        self,
        weights: Tensor,
        lengths: Tensor,
        *,
        exclude: Tensor | None,
        scratch: Scratch | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(similarity [B, k], user [B, k])``: each query's ``k`` nearest stored
        users, every one a candidate (similarity 0: none shares an item).

        Its ``[U, B]`` and ``[B, U]`` blocks are written into ``scratch``'s
        memory where one is given, kept from the call's block before
        (:class:`~twostage.scratch.Scratch`: 128 MiB each at 10^6 users)."""
        batch, num_users = len(weights), self.num_users
        scratch = Scratch() if scratch is None else scratch
        # Similarity to every stored user: shared items' weights over sqrt(L * len).
        product = scratch.block("product", (num_users, batch), torch.float32)
        columns = scratch.block("columns", (weights.shape[1], batch), torch.float32)
        columns.copy_(weights.T)
        with quiet_sparse():
            # (U, N) @ (N, B) -> (U, B). `mm(out=)` computes into fresh memory of
            # its own and copies (20,000 page faults a block at 10^6 users);
            # `addmm` with beta 0 (the old values ignored, NaN included) writes in
            # place, in half the time, to the same bits.
            torch.addmm(product, self.matrix, columns, beta=0, out=product)
        sim = scratch.block("sim", (batch, num_users), torch.float64)
        sim.copy_(product.T)
        sizes = (self.indptr[1:] - self.indptr[:-1]).double()
        scale = scratch.block("scale", (batch, num_users), torch.float64)
        torch.mul(sizes[None, :], lengths[:, None].double(), out=scale)
        sim.div_(scale.sqrt_().clamp_min_(1))
        if exclude is not None:
            own = (exclude >= 0) & (exclude < num_users)
            sim[torch.arange(batch)[own], exclude[own]] = 0.0
        return sim.topk(min(self.neighbours, num_users), dim=1)

    def _sampled(
        self, weights: Tensor, lengths: Tensor, *, exclude: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_similar` among each query's ``sample`` candidates: the users who
        share one of its items and were active last. Walks at most ``sample`` users
        of each query item (the latest first), so the cost does not grow with the
        stored users; the sampled users' similarities are exact."""
        batch, sample = len(weights), self.sample
        owner, users, rank, shared = self._candidates(weights, exclude=exclude)
        sizes = (self.indptr[users + 1] - self.indptr[users]).double()
        sim = torch.zeros(batch, sample, dtype=torch.float64)
        sim[owner, rank] = shared / (sizes * lengths[owner].double()).sqrt().clamp_min(
            1
        )
        held = torch.zeros(batch, sample, dtype=torch.int64)
        held[owner, rank] = users
        sim_k, at_k = sim.topk(min(self.neighbours, sample), dim=1)
        return sim_k, held.gather(1, at_k)

    def _candidates(
        self, weights: Tensor, *, exclude: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(query [C], user [C], rank [C], shared [C])``: each query's
        candidates, the latest active first (rank 0), at most ``sample`` a query,
        with the summed weights of the items they share with it. Queries are walked
        a few at a time, so that no step reads more than :data:`BLOCK_CELLS` users.

        A candidate is among the latest ``sample`` users of every item it shares
        with the query, the query's own user aside (all later users of that item
        share it too, so are candidates before it): walking each item's first
        ``sample + 1`` users finds every candidate, and every item it shares."""
        query, item = weights.nonzero(as_tuple=True)
        start = self.post_ptr[item]
        count = (self.post_ptr[item + 1] - start).clamp(max=self.sample + 1)
        walked = torch.bincount(query, count, minlength=len(weights)).cumsum(0)
        found: list[tuple[Tensor, ...]] = []
        first = 0
        while first < len(weights):
            done = int(walked[first - 1]) if first else 0
            last = int(torch.searchsorted(walked, done + BLOCK_CELLS, right=True))
            last = max(last, first + 1)
            rows = (query >= first) & (query < last)
            found.append(
                self._latest(
                    query[rows],
                    weights[query[rows], item[rows]],
                    start[rows],
                    count[rows],
                    exclude=exclude,
                )
            )
            first = last
        owner, users, rank, shared = (
            torch.cat(parts) for parts in zip(*found, strict=True)
        )
        return owner, users, rank, shared

    def _latest(
        self,
        query: Tensor,
        weight: Tensor,
        start: Tensor,
        count: Tensor,
        *,
        exclude: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`_candidates` of the queries' items (``weight``: each one's in its
        query) whose users, the latest first, begin at ``start`` in the postings,
        ``count`` of each read."""
        num_users, sample = self.num_users, self.sample
        pair = torch.repeat_interleave(torch.arange(len(count)), count)
        offset = torch.arange(len(pair)) - (torch.cumsum(count, 0) - count)[pair]
        # One sort: by query, then the latest active first, each user once.
        later = num_users - 1 - self.latest[self.post_users[start[pair] + offset]]
        key, inverse = torch.unique(
            query[pair] * num_users + later, return_inverse=True
        )
        shared = torch.zeros(len(key), dtype=torch.float64)
        shared.index_add_(0, inverse, weight[pair])
        owner, users = key // num_users, self.by_rank[num_users - 1 - key % num_users]
        if exclude is not None:
            keep = users != exclude[owner]
            owner, users, shared = owner[keep], users[keep], shared[keep]
        per_query = torch.bincount(
            owner, minlength=int(owner.max()) + 1 if len(owner) else 0
        )
        rank = (
            torch.arange(len(owner)) - (torch.cumsum(per_query, 0) - per_query)[owner]
        )
        keep = rank < sample
        return owner[keep], users[keep], rank[keep], shared[keep]


def activity_ranks(users: np.ndarray, times: np.ndarray, *, num_users: int) -> Tensor:
    """``[num_users]`` each user's rank by the time of their latest row (``users
    [n]``, ``times [n]`` in any orderable dtype): 0 the earliest, ties by user
    index, users without rows first (in index order). What ``latest`` of
    :class:`SessionNeighbours` holds."""
    times = np.asarray(times)
    if times.dtype.kind in "mM":  # any unit, in its order
        times = times.view(np.int64)
    active = (
        pl.DataFrame({"u": np.asarray(users, dtype=np.int64), "t": times})
        .group_by("u")
        .agg(pl.col("t").max())
        .sort(["t", "u"])["u"]
        .to_numpy()
    )
    idle = np.ones(num_users, dtype=bool)
    idle[active] = False
    ranks = np.empty(num_users, dtype=np.int64)
    ranks[np.flatnonzero(idle)] = np.arange(num_users - len(active))
    ranks[active] = np.arange(num_users - len(active), num_users)
    return torch.from_numpy(ranks)


def check_options(
    *,
    neighbours: int,
    recency: float,
    proximity: float,
    batch_size: int,
    sample: int = 0,
) -> None:
    """Raise ConfigError unless every option of :class:`SessionNeighbours` is
    positive (the counts, integers; ``sample`` may be 0)."""
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
    if not (isinstance(sample, int) and sample >= 0):
        raise ConfigError(
            "`sample` should be an integer >= 0 (0: every stored user). "
            f"Received: `sample` = {sample!r}."
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
