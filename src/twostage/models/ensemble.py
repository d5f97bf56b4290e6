"""Several two-tower models served as one: ``retrieval.ensemble``.

Each member is a whole :class:`~twostage.models.retrieval.RetrievalModel` with its own
query encoder, trained apart. The ensemble scores an item by the members' weighted
mean score, ``sum_m w_m * <q_m, i_m>`` with the weights summing to 1, which is still
one dot product: the query is the concatenation of ``sqrt(w_m) * q_m`` and the item
of ``sqrt(w_m) * i_m``. Both stay unit vectors (each member's are), so an
item-to-item similarity is the same weighted mean of the members' similarities, and
everything that reads embeddings (the index, evaluation, export, serving) takes the
ensemble as it takes one model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from twostage.config import RetrievalConfig
from twostage.models.retrieval import RetrievalModel

__all__ = ["EnsembleModel", "member_configs", "member_seeds", "member_shares"]


def member_configs(config: RetrievalConfig) -> list[RetrievalConfig]:
    """One config per member: ``query_encoder``'s, then each ``ensemble`` entry's,
    every other setting shared, but a ``pooling`` member goes without the
    settings only an ordered history reads."""
    configs = []
    for encoder in (config.query_encoder, *config.ensemble):
        member = dataclasses.replace(
            config, query_encoder=encoder, ensemble=(), ensemble_weights=()
        )
        if encoder == "pooling" and config.ensemble:
            member = dataclasses.replace(
                member,
                share_item_embeddings=False,
                sequence_item_features=False,
                sequence_time_gaps=False,
            )
        configs.append(member)
    return configs


def member_seeds(config: RetrievalConfig, seed: int) -> list[int]:
    """Each member's training seed: ``seed`` for the first member of each encoder,
    ``seed + 1``, ``seed + 2``... for the same encoder's later ones (a repeated encoder
    is another draw of the same model, not a copy)."""
    seen: dict[str, int] = {}
    seeds = []
    for encoder in (config.query_encoder, *config.ensemble):
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

    def __init__(
        self, members: Sequence[RetrievalModel], config: RetrievalConfig
    ) -> None:
        super().__init__()
        shares = member_shares(config)
        if len(members) != len(shares):
            raise ValueError(f"{len(shares)} members expected, received {len(members)}")
        self.config = config
        self.members = nn.ModuleList(members)
        # From the config, which the saved run holds: not weights.
        self.register_buffer("shares", torch.tensor(shares), persistent=False)

    def _models(self) -> list[RetrievalModel]:
        return list(self.members)  # type: ignore[arg-type]

    @property
    def reads_item_features(self) -> bool:
        return any(m.reads_item_features for m in self._models())

    def attach_item_features(self, item_features: dict[str, Tensor]) -> None:
        for member in self._models():
            member.attach_item_features(item_features)

    @property
    def temperature(self) -> Tensor:
        """The members' temperatures' weighted mean (all equal unless learned)."""
        temperatures = torch.stack([m.temperature for m in self._models()])
        return (self.shares * temperatures).sum()

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
