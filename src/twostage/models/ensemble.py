"""Several two-tower models served as one: ``retrieval.ensemble``.

Each member is a whole :class:`~twostage.models.retrieval.RetrievalModel` with its own
query encoder, trained apart. The ensemble scores an item by the members' weighted
mean score, ``sum_m w_m * <q_m, i_m>`` with the weights summing to 1, which is still
one dot product: the query is the concatenation of ``sqrt(w_m) * q_m`` and the item
of ``sqrt(w_m) * i_m``. Both stay unit vectors when every member's are, so an
item-to-item similarity is the same weighted mean of the members' similarities, and
everything that reads embeddings (the index, evaluation, export, serving) takes the
ensemble as it takes one model. An ``ease`` or ``transition`` member
(:class:`~twostage.models.linear_items.LinearItemsModel`) is fitted in closed form
instead of trained; its vectors are not unit norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from twostage.config import RetrievalConfig
from twostage.models.linear_items import LinearItemsModel
from twostage.models.retrieval import RetrievalModel

__all__ = [
    "EnsembleModel",
    "Member",
    "member_configs",
    "member_kinds",
    "member_weights",
    "member_seeds",
    "member_shares",
]

#: One model of an ensemble: a trained pair of towers or the closed-form EASE member.
Member = RetrievalModel | LinearItemsModel


MemberKind = Literal["pooling", "transformer", "gru", "ease", "transition"]


def member_kinds(config: RetrievalConfig) -> list[MemberKind]:
    """Each member's kind: ``query_encoder``, then each ``ensemble`` entry."""
    return [config.query_encoder, *config.ensemble]


def member_weights(config: RetrievalConfig) -> list[tuple[MemberKind, float]]:
    """Each member's kind and weight as configured (1 each without
    ``ensemble_weights``), in :func:`member_kinds`' order."""
    weights = config.ensemble_weights or (1.0,) * (1 + len(config.ensemble))
    return list(zip(member_kinds(config), weights, strict=True))


def member_configs(config: RetrievalConfig) -> list[RetrievalConfig]:
    """One config per member: ``query_encoder``'s, then each ``ensemble`` entry's,
    every other setting shared, but a ``pooling`` member goes without the
    settings only an ordered history reads. A closed-form member's (``ease``,
    ``transition``) is the first member's (it reads ``ease_l2``, ``ease_rank`` and
    ``history_length``)."""
    configs = []
    for encoder in member_kinds(config):
        if encoder == "ease" or encoder == "transition":  # CLOSED_FORM_MEMBERS
            configs.append(
                dataclasses.replace(config, ensemble=(), ensemble_weights=())
            )
            continue
        member = dataclasses.replace(
            config, query_encoder=encoder, ensemble=(), ensemble_weights=()
        )
        if encoder == "pooling" and config.ensemble:
            member = dataclasses.replace(
                member,
                share_item_embeddings=False,
                sequence_item_features=False,
                sequence_time_gaps=False,
                sequence_ratings=False,
            )
        configs.append(member)
    return configs


def member_seeds(config: RetrievalConfig, seed: int) -> list[int]:
    """Each member's training seed: ``seed`` for the first member of each encoder,
    ``seed + 1``, ``seed + 2``... for the same encoder's later ones (a repeated encoder
    is another draw of the same model, not a copy)."""
    seen: dict[str, int] = {}
    seeds = []
    for encoder in member_kinds(config):
        seeds.append(seed + seen.get(encoder, 0))
        seen[encoder] = seen.get(encoder, 0) + 1
    return seeds


def member_shares(config: RetrievalConfig) -> list[float]:
    """Each member's weight, normalised to sum to 1 (equal when none are given)."""
    weights = config.ensemble_weights or (1.0,) * (1 + len(config.ensemble))
    total = sum(weights)
    return [w / total for w in weights]


class EnsembleModel(nn.Module):
    """Members trained apart, scoring items by their weighted mean score.

    Args:
        members: one model per :func:`member_configs` entry, in that order.
        config: the run's retrieval config (``ensemble`` and its weights).
    """

    shares: Tensor

    def __init__(self, members: Sequence[Member], config: RetrievalConfig) -> None:
        super().__init__()
        shares = member_shares(config)
        if len(members) != len(shares):
            raise ValueError(f"{len(shares)} members expected, received {len(members)}")
        self.config = config
        self.members = nn.ModuleList(members)
        # From the config, which the saved run holds: not weights.
        self.register_buffer("shares", torch.tensor(shares), persistent=False)

    def _models(self) -> list[Member]:
        return list(self.members)  # type: ignore[arg-type]

    @property
    def reads_item_features(self) -> bool:
        return any(m.reads_item_features for m in self._models())

    def attach_item_features(self, item_features: dict[str, Tensor]) -> None:
        for member in self._models():
            member.attach_item_features(item_features)

    @property
    def temperature(self) -> Tensor:
        """The trained members' temperatures' weighted mean (all equal unless
        learned; an ``ease`` member has none)."""
        pairs = [
            (share, m.temperature)
            for share, m in zip(self.shares, self._models(), strict=True)
            if isinstance(m, RetrievalModel)
        ]
        shares = torch.stack([share for share, _ in pairs])
        temperatures = torch.stack([t for _, t in pairs])
        return (shares * temperatures).sum() / shares.sum()

    def _join(self, parts: list[Tensor]) -> Tensor:
        scales = self.shares.sqrt()
        return torch.cat([s * p for s, p in zip(scales, parts, strict=True)], dim=-1)

    def encode_queries(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, M * output_dim]`` unit query embeddings."""
        return self._join([m.encode_queries(features) for m in self._models()])

    def encode_query_positions(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, L, M * output_dim]`` unit queries after each history position."""
        return self._join([m.encode_query_positions(features) for m in self._models()])

    def encode_items(self, features: dict[str, Tensor]) -> Tensor:
        """``[N, M * output_dim]`` unit candidate embeddings."""
        return self._join([m.encode_items(features) for m in self._models()])
