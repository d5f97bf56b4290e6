"""EASE as a member of a retrieval ensemble (``retrieval.ensemble`` entry ``ease``)
and as the ranker's EASE term (``ranking.ease_weight``).

EASE (:class:`twostage.baselines.EASE`) scores item ``j`` for a user as ``(x B)[j]``,
``x`` the user's items as a multi-hot row and ``B`` an items x items matrix fitted in
closed form. As a member its scores must join the other members' in one dot product,
so ``B`` is factorised to rank ``r`` by SVD (``B ~ L R^T``, ``L = U S``, ``R = V``;
exact up to 2,048 items, randomized above: :func:`leading_svd`):
the query is the sum of ``L``'s rows over the history's items and the item vectors
are ``R``'s rows, ``r`` wide whatever the catalogue.

The learned members score by cosines, which have the same scale for every user; an
EASE score's scale grows with the history. So each query is divided by the
standard deviation of its scores over the catalogue, computed from the query alone
(``sqrt(h G h^T - (h m)^2)`` with ``G`` and ``m`` the second moment and mean of
``R``'s rows): the member adds a per-user standardised EASE score (less its mean,
which moves every item of a user alike and so changes no ranking). On leave-one-out
MovieLens-100k a transformer with this member scores about what the transformer and
GRU ensemble does, in half its training time (docs/benchmarks.md).

The member reads the query's history (``retrieval.history_length`` latest items, or
a request's session), not the whole log, like the other members.

The ``transition`` member is the same model over another matrix, read from the
history's most recent item alone (``last_item_only``): row ``j`` holds ``log(1 + n)``
for each item that followed ``j`` ``n`` times in the training users' time-ordered
logs (the first-order Markov chain of :class:`twostage.baselines.Transition`, whose
counts it takes), factorised and standardised the same way. The ordered towers learn
transitions too, but smoothed through embeddings; the counts keep the exact pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from twostage.data.user_items import UserItems
from twostage.models.fields import HISTORY
from twostage.models.retrieval import ITEM_FIELD

__all__ = ["EXACT_SVD_ITEMS", "LinearItemsModel", "leading_svd"]

#: A query's score spread below this is no spread (an empty history).
_EPS = 1e-9

#: Up to this many items the factorisation is an exact SVD (about 2 s at 1,700 items
#: on 2 cores); above it, a randomized SVD of the leading directions, since the
#: exact one grows with the cube of the catalogue (minutes at 10,000 items).
EXACT_SVD_ITEMS = 2048
#: The randomized SVD's sketch width, in multiples of the rank, and its power
#: iterations: with these its rank-128 truncation of latest-small's EASE matrix (9,682
#: items) is as close as the exact one's to 4 digits in Frobenius error, in 14 s
#: against 326 s (docs/benchmarks.md).
_SKETCH = 2
_POWER_ITERATIONS = 4


def leading_svd(
    matrix: Tensor, rank: int, *, exact_up_to: int = EXACT_SVD_ITEMS
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``rank`` leading singular triplets of a square matrix, ``M ~ U diag(S) V^T``
    (``U``, ``V``: ``[n, r]``; fewer columns when ``n < rank``).

    Exact (``torch.linalg.svd``) up to ``exact_up_to`` rows or when the sketch
    would be most of the matrix; otherwise ``torch.svd_lowrank`` (Halko et
    al.'s randomized range finder with power iterations), seeded on its own so the
    result is the same every time and the run's random stream is left as it was.
    """
    n = matrix.shape[0]
    sketch = _SKETCH * rank
    if n <= exact_up_to or 2 * sketch >= n:
        u, s, vh = torch.linalg.svd(matrix)
        r = min(rank, len(s))
        return u[:, :r], s[:r], vh[:r].T
    on_cuda = matrix.device.type == "cuda"
    with torch.random.fork_rng(devices=[matrix.device] if on_cuda else []):
        if on_cuda:  # only the generator the sketch draws from
            with torch.cuda.device(matrix.device):
                torch.cuda.manual_seed(0)
        else:
            torch.random.default_generator.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=sketch, niter=_POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank]


class LinearItemsModel(nn.Module):
    """A closed-form item-to-item model (EASE's ``B``) behind the two towers' calls.

    Args:
        num_items: rows of the item vocabulary (row 0, the OOV item, scores nothing).
        rank: width of the factorised query and item vectors.
        last_item_only: the query reads the history's most recent item alone (the
            ``transition`` member: row ``j`` of the matrix scores what follows item
            ``j``), not the set of its items.
        recency: 0 (the default) sums the history's items alike; above 0 each
            item's row is weighted ``exp(-d / recency)``, ``d`` its distance from
            the most recent item (0 for it; a repeated item at its latest place),
            so the query leans toward what the user did last.
    """

    left: Tensor
    right: Tensor
    moment: Tensor
    mean: Tensor

    def __init__(
        self,
        num_items: int,
        rank: int,
        *,
        last_item_only: bool = False,
        recency: float = 0.0,
    ) -> None:
        super().__init__()
        if not recency >= 0:
            raise ValueError(f"`recency` should be >= 0, received {recency!r}")
        self.rank = rank
        self.last_item_only = last_item_only
        self.recency = float(recency)
        # Buffers, not parameters: fitted in closed form (``fit``), never trained,
        # saved and reloaded with the run's weights.
        self.register_buffer("left", torch.zeros(num_items, rank))
        self.register_buffer("right", torch.zeros(num_items, rank))
        self.register_buffer("moment", torch.zeros(rank, rank))
        self.register_buffer("mean", torch.zeros(rank))

    @property
    def reads_item_features(self) -> bool:
        return False

    def attach_item_features(self, item_features: dict[str, Tensor]) -> None:
        """Nothing to attach: the member reads item IDs only."""

    def fit(self, weights: Tensor) -> None:
        """Take an ``[N, N]`` item-to-item matrix (EASE's ``B``, or the transition
        scores; row and column 0: the OOV item), factorised to this member's rank."""
        num_items = self.left.shape[0]
        if weights.shape != (num_items, num_items):
            raise ValueError(
                f"B should be {num_items} x {num_items}, received {tuple(weights.shape)}"
            )
        u, s, v = leading_svd(weights.to(torch.float32), self.rank)
        rank = len(s)
        left = torch.zeros_like(self.left)
        right = torch.zeros_like(self.right)
        left[:, :rank] = u * s
        right[:, :rank] = v
        left[0] = 0.0  # the OOV item (and padding) adds nothing to a query
        right[0] = 0.0  # and is never scored
        items = right[1:].double()
        self.left.copy_(left)
        self.right.copy_(right)
        self.mean.copy_(items.mean(dim=0).float())
        self.moment.copy_((items.T @ items / max(len(items), 1)).float())

    def _standardised(self, sums: Tensor) -> Tensor:
        """``[..., r]`` history sums, each divided by its scores' spread."""
        spread = (sums @ self.moment * sums).sum(-1) - (sums @ self.mean) ** 2
        scale = spread.clamp_min(0.0).sqrt()
        return torch.where(
            scale[..., None] > _EPS,
            sums / scale.clamp_min(_EPS)[..., None],
            torch.zeros_like(sums),
        )

    def encode_queries(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, r]``: the standardised EASE query of each history (0 for none)."""
        history = features.get(HISTORY)
        if history is None or history.shape[1] == 0:
            batch = next(iter(features.values())).shape[0]
            return torch.zeros(batch, self.rank, device=self.left.device)
        if self.last_item_only:  # most recent last; padding (0) reads nothing
            return self._standardised(self.left[history[:, -1]])
        if self.recency > 0:  # the last position's row of the decayed sums
            weights = _decayed(history, self.recency)[:, -1]  # (B, L)
            rows = self.left[history]  # (B, L, r)
            return self._standardised((weights[:, :, None] * rows).sum(dim=1))
        # An item repeated in a history counts once, as in EASE's 0/1 matrix.
        unique = _first_occurrence(history)
        return self._standardised(self.left[history * unique].sum(dim=1))

    def encode_item_sets(self, rows: UserItems) -> Tensor:
        """``[B, r]``: the standardised query of each row's items (a set, as the
        ranker's EASE term reads a user's seen items; 0 for an empty row)."""
        row_ids = torch.from_numpy(rows.row_ids())
        items = torch.from_numpy(rows.indices)
        sums = torch.zeros(rows.num_rows, self.rank, device=self.left.device)
        sums.index_add_(0, row_ids, self.left[items])
        return self._standardised(sums)

    def encode_query_positions(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, L, r]``: the query after each history position (running sums; with
        ``last_item_only``, each position's own item)."""
        history = features[HISTORY]
        if self.last_item_only:
            return self._standardised(self.left[history])
        if self.recency > 0:
            weights = _decayed(history, self.recency)  # (B, L, L)
            return self._standardised(weights @ self.left[history])
        unique = _first_occurrence(history)
        return self._standardised(self.left[history * unique].cumsum(dim=1))

    def encode_items(self, features: dict[str, Tensor]) -> Tensor:
        """``[M, r]`` item vectors of the items in ``features[item_id]``."""
        return self.right[features[ITEM_FIELD]]


def _decayed(history: Tensor, recency: float) -> Tensor:
    """``[B, L, L]``: row ``p`` weighs each earlier position ``j <= p`` of a
    history by ``exp(-(p - j) / recency)``, and by 0 where the same item comes
    again later up to ``p`` (a repeated item counts once, at its latest place)."""
    length = history.shape[1]
    steps = torch.arange(length, device=history.device)
    gap = (steps[:, None] - steps[None, :]).to(torch.float32)  # p - j
    decay = torch.exp(-gap.clamp_min(0) / recency) * (gap >= 0)  # (L, L)
    same = history[:, :, None] == history[:, None, :]  # (B, j, k)
    later = same & (steps[None, :] > steps[:, None])[None]  # k > j, same item
    # The first k > j holding j's item (L when none): j counts up to p < next.
    after = torch.where(later, steps, length).amin(dim=2)  # (B, L)
    alive = steps[None, :, None] < after[:, None, :]  # (B, p, j)
    return decay[None] * alive


def _first_occurrence(history: Tensor) -> Tensor:
    """``[B, L]`` long: 1 where an item appears for the first time in its row."""
    same = history[:, :, None] == history[:, None, :]  # (B, L, L)
    earlier = torch.ones_like(same[0], dtype=torch.bool).tril(-1)  # j < i
    return (~(same & earlier).any(dim=-1)).long()
