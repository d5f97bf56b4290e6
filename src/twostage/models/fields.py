"""Embedding the fields of one side: the one module both retrieval towers and the
ranker build on.

Every field becomes one ``dim`` vector: an ID or a categorical by a table, a bag of
indices (genres, words) by the mean of its entries (index 0 is padding), a number by
a linear map; the query side may also pool the user's recent items. What a model does
with the vectors differs: a tower sums or concatenates them
(:class:`~twostage.models.towers.Tower`), the ranker keeps them apart
(:class:`~twostage.models.ranking.SideEmbedding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from twostage.models.names import FieldModules
from twostage.models.sharded import lookup_together

__all__ = [
    "HISTORY",
    "HISTORY_RATINGS",
    "HISTORY_TIMES",
    "UNKNOWN_TIME",
    "FieldEmbedding",
    "FieldInfo",
    "history_inputs",
]

#: Key of the history field in a query feature dict: ``[B, L]`` item indices, 0 = padding.
HISTORY = "history"
#: Key of the history's times (``[B, L]`` int64 seconds, aligned with ``history``), read
#: by ordered histories with ``retrieval.sequence_time_gaps``.
HISTORY_TIMES = "history_times"
#: Key of the history's rating buckets (``[B, L]`` int64 aligned with ``history``, 0 =
#: not known), read by ordered histories with ``retrieval.sequence_ratings``.
HISTORY_RATINGS = "history_ratings"
#: A history time that is not known (a session entry without a timestamp).
UNKNOWN_TIME = -(2**62)


def history_inputs(history: nn.Module, features: dict[str, Tensor]) -> dict[str, Any]:
    """The keyword arguments beside the items that ``history`` (an encoder) reads
    from a query feature dict: the times with ``reads_times``, the rating buckets
    with ``reads_ratings`` (None where the dict has none: not known)."""
    inputs: dict[str, Any] = {}
    if getattr(history, "reads_times", False):
        inputs["times"] = features.get(HISTORY_TIMES)
    if getattr(history, "reads_ratings", False):
        inputs["ratings"] = features.get(HISTORY_RATINGS)
    return inputs


@dataclass(frozen=True)
class FieldInfo:
    """What a model needs to know about one input field.

    Attributes:
        name: key of the field in the feature dict.
        kind: ``index`` (``[B]`` int64), ``indices`` (``[B, L]`` int64, 0 = padding) or
            ``dense`` (``[B]`` or ``[B, width]`` float32).
        num_embeddings: rows of the embedding table for index kinds.
        width: number of floats for the dense kind.
    """

    name: str
    kind: Literal["index", "indices", "dense"]
    num_embeddings: int = 0
    width: int = 1


class FieldEmbedding(nn.Module):
    """One ``[B, dim]`` vector per field of a side (and the pooled history).

    Args:
        fields: the side's fields.
        dim: width of every field vector.
        history: pools the ``history`` entry of the feature dict as one more part.
        init_std: standard deviation of the tables' initial values.
        sparse: the tables produce sparse gradients (only the rows a batch touched).
    """

    def __init__(
        self,
        fields: Sequence[FieldInfo],
        *,
        dim: int,
        history: nn.Module | None = None,
        init_std: float,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.fields = list(fields)
        self.embeddings = FieldModules()
        for info in self.fields:
            module: nn.Module
            if info.kind == "index":
                module = nn.Embedding(info.num_embeddings, dim, sparse=sparse)
                nn.init.normal_(module.weight, std=init_std)
            elif info.kind == "indices":
                module = nn.EmbeddingBag(
                    info.num_embeddings, dim, mode="mean", padding_idx=0, sparse=sparse
                )
                nn.init.normal_(module.weight, std=init_std)
                with torch.no_grad():
                    module.weight[0].zero_()
            else:
                module = nn.Linear(info.width, dim)
            self.embeddings[info.name] = module
        self.history = history
        self.num_parts = len(self.fields) + (history is not None)
        self._index_names = [f.name for f in self.fields if f.kind == "index"]
        self._register_load_state_dict_pre_hook(_rename_bag_weights)

    def parts(
        self, features: dict[str, Tensor], *, with_history: bool = True
    ) -> list[Tensor]:
        """``features``: field name -> ``[B]`` / ``[B, L]`` / ``[B, width]``.

        Returns:
            ``num_parts`` tensors ``[B, dim]``: the fields in order, then the history
            (left out when ``with_history`` is False).
        """
        # Tables sharded by TorchRec are looked up together: one exchange.
        looked = lookup_together(self.embeddings, self._index_names, features)
        parts = []
        for info in self.fields:
            if info.name in looked:
                parts.append(looked[info.name])
                continue
            value = features[info.name]
            if info.kind == "dense" and value.dim() == 1:
                value = value.unsqueeze(-1)
            parts.append(self.embeddings[info.name](value))
        if self.history is not None and with_history:
            parts.append(
                self.history(
                    features[HISTORY], **history_inputs(self.history, features)
                )
            )
        return parts


def _rename_bag_weights(
    state: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
) -> None:
    """Towers saved before this module kept a bag's table one level deeper
    (``embeddings.<field>.embedding.weight``): load them as ``embeddings.<field>.weight``."""
    for key in [k for k in state if k.startswith(f"{prefix}embeddings.")]:
        if key.endswith(".embedding.weight"):
            state[key.removesuffix(".embedding.weight") + ".weight"] = state.pop(key)
