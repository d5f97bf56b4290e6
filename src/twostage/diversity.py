"""Diverse lists: maximal marginal relevance over the candidates' embeddings.

A list ordered by score alone can repeat one taste (five sequels of one film,
one brand's phones). :func:`diversify` re-picks the top ``k`` of a scored
candidate list greedily (Carbonell and Goldstein's maximal marginal relevance):
each next item is the one with the best

    (1 - weight) * relevance - weight * (its highest cosine to an item already picked)

where relevance is the candidate's key scaled to [0, 1] over its list (the best
is 1, the worst 0), and the cosine is of the candidate tower's embeddings (the
space retrieval searches, so "alike" means "liked by the same users"), or of
the items' values of a metadata column (``diversity_by``: two films' genres,
``|A & B| / sqrt(|A| |B|)``, the cosine of their multi-hot rows). Weight 0
keeps the order as it is; 1 picks the best item and then always the least alike.
:meth:`twostage.recommender.Recommender.recommend` and the batched lists
apply it after retrieval and the ranker, over the candidates retrieval passed.

:func:`intra_list_diversity` is the figure it trades relevance for: the mean
pairwise cosine distance within a list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from twostage.errors import ConfigError

__all__ = [
    "ListRules",
    "check_diversity",
    "diversify",
    "intra_list_diversity",
    "intra_list_value_diversity",
]


@dataclass(frozen=True)
class ListRules:
    """How an answer's ``k`` items are picked from its candidates, beyond their
    order: ``diversity`` (:func:`diversify`'s weight) and ``max_per``
    (``{metadata column: n}``, at most ``n`` items sharing a value of the
    column); ``diversity_by``: the metadata column whose values make two items
    alike (None: their candidate embeddings). Falsy when neither
    ``diversity`` nor ``max_per`` applies: the first ``k`` as ordered."""

    diversity: float = 0.0
    max_per: dict[str, int] = field(default_factory=dict)
    diversity_by: str | None = None  # a metadata column: alike by its values

    def __bool__(self) -> bool:
        return bool(self.diversity or self.max_per)


def check_diversity(value: float) -> float:
    """``value`` as a float, if it is a number from 0 to 1 (the weight of
    :func:`diversify`)."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ConfigError(
            "`diversity` should be a number from 0 (the list as scored) to 1 "
            f"(the least alike items after the best). Received: `diversity` = "
            f"{value!r}."
        )
    return float(value)


def _unit(vectors: Tensor) -> Tensor:
    """``vectors`` scaled to length 1 (a zero vector stays zero)."""
    norms = vectors.norm(dim=-1, keepdim=True)
    return vectors / norms.clamp_min(1e-12)


def _relevance(keys: Tensor, valid: Tensor) -> Tensor:
    """``[B, C]`` each row's keys scaled to [0, 1] over its valid candidates (a row
    of equal keys: 1); 0 where not valid."""
    inf = torch.tensor(math.inf, dtype=keys.dtype)
    low = torch.where(valid, keys, inf).amin(dim=1, keepdim=True)
    high = torch.where(valid, keys, -inf).amax(dim=1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (keys - low) / span.clamp_min(1e-30), 1.0)
    return torch.where(valid, scaled, 0.0)


def diversify(
    keys: Tensor,
    vectors: Tensor | None,
    k: int,
    *,
    weight: float,
    groups: Tensor | None = None,
    limits: Tensor | None = None,
    values: Tensor | None = None,
) -> Tensor:
    """Pick each row's ``k`` candidates by maximal marginal relevance, at most
    ``limits[g]`` of them in each group ``g``.

    Args:
        keys: ``[B, C]`` each candidate's key (higher is better); ``-inf`` or NaN
            marks an empty slot.
        vectors: ``[B, C, D]`` the candidates' embeddings (compared by cosine);
            unread at weight 0 or with ``values``.
        k: how many to pick.
        weight: from 0 (the order of ``keys``) to 1 (after the best, always the
            least alike); :func:`check_diversity`.
        groups: ``[B, C, G]`` the groups each candidate belongs to (indices into
            ``limits``; -1 pads): a candidate whose group is full is passed
            over (``max_per``: at most 3 of a brand).
        limits: ``[M]`` how many picks each group takes.
        values: ``[B, C, V]`` instead of ``vectors``, each candidate's values
            of a metadata column as codes (-1 pads): two candidates are as
            alike as the cosine of their multi-hot rows, ``shared / sqrt(n_a
            * n_b)`` (0 where either has none).

    Returns:
        ``[B, min(k, C)]`` positions into each row's candidates, picked first
        to last; -1 where nothing was left to pick (fewer filled slots than
        ``k``, or every one left in a full group), always after the picks.
    """
    weight = check_diversity(weight)
    rows, width = keys.shape
    k = min(k, width)
    valid = torch.isfinite(keys)
    if weight == 0 and groups is None:  # the order as scored, ties by place
        order = keys.masked_fill(~valid, -math.inf).argsort(
            dim=1, descending=True, stable=True
        )[:, :k]
        return order.masked_fill(~valid.gather(1, order), -1)
    relevance = _relevance(keys.float(), valid)
    base = torch.where(valid, (1 - weight) * relevance, -math.inf)
    closest = torch.zeros(rows, width)  # highest cosine to a picked item
    open_ = valid.clone()  # not picked, not in a full group
    picked = torch.full((rows, k), -1, dtype=torch.long)
    every = torch.arange(rows)
    unit = None
    if weight and values is None:
        if vectors is None:
            raise ValueError("diversify: a weight above 0 needs the vectors")
        unit = _unit(vectors.float())
    has = coded = None
    spare_value = 0
    if values is not None:
        has = (values >= 0).sum(dim=2).float()  # (B, C): each candidate's count
        spare_value = int(values.max()) + 1 if values.numel() else 0
        coded = values.masked_fill(values < 0, spare_value)  # pads: a spare code
    capped = None
    if groups is not None:
        if limits is None:
            raise ValueError("diversify: groups need their limits")
        # Pads read a group of their own that never fills.
        spare = len(limits)
        member = groups.masked_fill(groups < 0, spare)  # (B, C, G)
        room = torch.cat([limits.long(), torch.tensor([k + 1])])[member]
        counts = torch.zeros(rows, spare + 1, dtype=torch.long)
        capped = (member, room, counts, (groups >= 0).long())
    for step in range(k):
        if capped is not None:
            member, room, counts, _ = capped
            # (B, C, G): how many picks each candidate's groups hold
            held = counts.gather(1, member.flatten(1)).view_as(member)
            open_ &= ~(held >= room).any(dim=2)
        if not bool(open_.any()):
            break
        value = (base - weight * closest).masked_fill(~open_, -math.inf)
        best = value.argmax(dim=1)  # ties: the earlier slot
        found = open_[every, best]
        picked[:, step] = torch.where(found, best, -1)
        open_[every, best] = False
        if capped is not None:
            member, _, counts, real = capped
            # (B, G): the pick's groups each hold one more (not the pads')
            counts.scatter_add_(
                1, member[every, best], real[every, best] * found[:, None]
            )
        cosine = None
        if unit is not None:
            # (B, C, D) @ (B, D, 1) -> (B, C): each candidate against the new pick
            cosine = torch.bmm(unit, unit[every, best][:, :, None])[:, :, 0]
        elif weight and has is not None and coded is not None:
            # (B, M + 1): the new pick's values, a pad's in the last column
            held = torch.zeros(rows, spare_value + 1, dtype=torch.bool)
            held[every[:, None], coded[every, best]] = True
            held[:, spare_value] = False
            # (B, C, V) -> (B, C): how many of its values each candidate shares,
            # without a (B, C, V, V) comparison a long list column would swell
            shared = held.gather(1, coded.flatten(1)).view_as(coded).sum(dim=2)
            scale = (has * has[every, best][:, None]).sqrt().clamp_min(1.0)
            cosine = shared.float() / scale
        if cosine is not None:
            cosine = torch.where(found[:, None], cosine, -math.inf)
            closest = cosine if step == 0 else torch.maximum(closest, cosine)
    return picked


def intra_list_diversity(vectors: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[B]`` each list's mean cosine distance (1 - cosine) over its pairs of
    items; NaN for a list of fewer than two.

    Args:
        vectors: ``[B, k, D]`` the embeddings of each list's items.
        valid: ``[B, k]`` bool, False for an empty slot (default: all filled).
    """
    rows, k, _ = vectors.shape
    if valid is None:
        valid = torch.ones(rows, k, dtype=torch.bool)
    unit = _unit(vectors.float()) * valid[:, :, None]
    # (B, k, D) @ (B, D, k) -> (B, k, k): every pair's cosine
    cosine = torch.bmm(unit, unit.transpose(1, 2))
    counts = valid.sum(dim=1).float()
    pairs = counts * (counts - 1)  # ordered pairs, the diagonal left out
    total = cosine.sum(dim=(1, 2)) - (unit * unit).sum(dim=(1, 2))
    distance = 1 - total / pairs.clamp_min(1)
    return torch.where(pairs > 0, distance, math.nan)


def intra_list_value_diversity(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """``[B]`` each list's mean distance over its pairs of items by a metadata
    column's values, ``1 - shared / sqrt(n_a * n_b)`` (the likeness
    :func:`diversify` reads with ``values``; an item without a value is like
    none); NaN for a list of fewer than two.

    Args:
        values: ``[B, k, V]`` each item's values as codes (-1 pads).
        valid: ``[B, k]`` bool, False for an empty slot (default: all filled).
    """
    rows, k, width = values.shape
    if valid is None:
        valid = torch.ones(rows, k, dtype=torch.bool)
    # A block of lists at a time: each compares k * k * V * V pairs of values.
    block = max(1, 2**24 // max(1, k * k * width * width))
    if rows > block:
        return torch.cat(
            [
                intra_list_value_diversity(
                    values[at : at + block], valid[at : at + block]
                )
                for at in range(0, rows, block)
            ]
        )
    has = (values >= 0) & valid[:, :, None]
    # (B, k, 1, V, 1) == (B, 1, k, 1, V): the values each pair shares
    shared = (values[:, :, None, :, None] == values[:, None, :, None, :]) & (
        has[:, :, None, :, None] & has[:, None, :, None, :]
    )
    counts = has.sum(dim=2).float()  # (B, k)
    scale = (counts[:, :, None] * counts[:, None, :]).sqrt().clamp_min(1.0)
    likeness = shared.sum(dim=(3, 4)).float() / scale  # (B, k, k)
    pairs_valid = valid[:, :, None] & valid[:, None, :]
    pairs_valid &= ~torch.eye(k, dtype=torch.bool)[None]
    pairs = pairs_valid.sum(dim=(1, 2)).float()
    total = (likeness * pairs_valid).sum(dim=(1, 2))
    distance = 1 - total / pairs.clamp_min(1)
    return torch.where(pairs > 0, distance, math.nan)
