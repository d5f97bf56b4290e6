"""The two-tower retrieval model: a query tower, a candidate tower, a dot product."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from twostage.config import RetrievalConfig
from twostage.errors import ConfigError
from twostage.models.sequence import SequenceEncoder
from twostage.models.towers import FieldInfo, HistoryPooling, Tower

__all__ = ["RetrievalModel"]

#: The candidate tower's item ID field, whose table an ordered history can share.
ITEM_FIELD = "item_id"


class RetrievalModel(nn.Module):
    """Two towers whose unit-norm outputs are compared by a dot product.

    Args:
        query_fields: fields of the query (user and context) side.
        candidate_fields: fields of the candidate (item) side.
        num_items: rows of the item vocabulary (for the history embedding).
        config: the model shape; saved with the weights.
    """

    def __init__(
        self,
        query_fields: Sequence[FieldInfo],
        candidate_fields: Sequence[FieldInfo],
        *,
        num_items: int,
        config: RetrievalConfig,
    ) -> None:
        super().__init__()
        self.config = config
        if config.share_item_embeddings and (
            config.query_encoder == "pooling"
            or not any(f.name == ITEM_FIELD for f in candidate_fields)
        ):
            raise ConfigError(
                "`retrieval.share_item_embeddings` ties an ordered history's item "
                "table to the candidate tower's item IDs: it needs "
                "`retrieval.query_encoder` = 'transformer' or 'gru'. Received: "
                f"`retrieval.query_encoder` = {config.query_encoder!r}."
            )
        shape = {
            "embedding_dim": config.embedding_dim,
            "output_dim": config.output_dim,
            "hidden_dims": config.hidden_dims,
            "dropout": config.dropout,
            "combine": config.combine,
            "sparse": config.sparse_embeddings,
        }
        # Built first only when the history shares its table (the draw order of
        # the initial weights is part of a seeded run).
        candidates = None
        if config.share_item_embeddings:
            candidates = Tower(candidate_fields, **shape)  # type: ignore[arg-type]
        history: HistoryPooling | SequenceEncoder | None = None
        if config.history_length > 0 and config.query_encoder != "pooling":
            table = None
            if candidates is not None:
                table = candidates.embeddings[ITEM_FIELD]
            history = SequenceEncoder(
                num_items,
                config.embedding_dim,
                max_length=config.history_length,
                kind=config.query_encoder,
                num_layers=config.sequence_layers,
                num_heads=config.sequence_heads,
                dropout=config.sequence_dropout,
                sparse=config.sparse_embeddings,
                item_table=table,  # type: ignore[arg-type]
                time_gaps=config.sequence_time_gaps,
                ratings=config.sequence_ratings,
            )
        elif config.history_length > 0:
            history = HistoryPooling(
                num_items,
                config.embedding_dim,
                max_length=config.history_length,
                mode=config.history_pooling,
                sparse=config.sparse_embeddings,
            )
        self.query_tower = Tower(query_fields, history=history, **shape)  # type: ignore[arg-type]
        if candidates is None:
            candidates = Tower(candidate_fields, **shape)  # type: ignore[arg-type]
        self.candidate_tower = candidates
        for name, on, what in (
            ("sequence_time_gaps", config.sequence_time_gaps, "the gaps between"),
            ("sequence_ratings", config.sequence_ratings, "the ratings of"),
        ):
            if on and not isinstance(history, SequenceEncoder):
                raise ConfigError(
                    f"`retrieval.{name}` reads {what} an ordered history's items: "
                    "it needs `retrieval.query_encoder` = 'transformer' or 'gru' "
                    "and `retrieval.history_length` > 0. Received: "
                    f"`retrieval.query_encoder` = {config.query_encoder!r}, "
                    f"`retrieval.history_length` = {config.history_length}."
                )
        # Side fields of the items an ordered history reads, and their rows (index
        # order) once attach_item_features hands them over.
        self._side_fields: list[FieldInfo] = []
        self._item_rows: dict[str, Tensor] = {}
        if config.sequence_item_features:
            if not isinstance(history, SequenceEncoder):
                raise ConfigError(
                    "`retrieval.sequence_item_features` adds item features to an "
                    "ordered history: it needs `retrieval.query_encoder` = "
                    "'transformer' or 'gru' and `retrieval.history_length` > 0. "
                    f"Received: `retrieval.query_encoder` = {config.query_encoder!r}, "
                    f"`retrieval.history_length` = {config.history_length}."
                )
            self._side_fields = [f for f in candidate_fields if f.name != ITEM_FIELD]
            if self._side_fields:
                history.read_item_side(self._item_side)
        log_t = torch.tensor(math.log(config.temperature))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def reads_item_features(self) -> bool:
        """Whether the query tower reads item side features (call
        :meth:`attach_item_features` before encoding queries)."""
        return bool(self._side_fields)

    def attach_item_features(self, item_features: dict[str, Tensor]) -> None:
        """Hand over every item's feature rows (``[N, ...]`` by item index, as the
        candidate tower reads them) for the ordered history to read; a no-op when
        it reads none. Not weights: a run holds them in its tensors."""
        if self._side_fields:
            self._item_rows = {f.name: item_features[f.name] for f in self._side_fields}

    def _item_side(self, history: Tensor) -> Tensor:
        """``[B, L]`` item indices -> ``[B, L, D]``: the sum of their side-feature
        vectors, from the candidate tower's tables."""
        if not self._item_rows:
            raise RuntimeError(
                "this model's history reads item features: call "
                "`attach_item_features(tensors.item_features)` first."
            )
        flat = history.reshape(-1)
        vectors = []
        for info in self._side_fields:
            rows = self._item_rows[info.name]
            if rows.device != flat.device:  # moved once, then kept there
                rows = self._item_rows[info.name] = rows.to(flat.device)
            value = rows[flat]
            if info.kind == "dense" and value.dim() == 1:
                value = value.unsqueeze(-1)
            vectors.append(self.candidate_tower.embeddings[info.name](value))
        return torch.stack(vectors).sum(dim=0).view(*history.shape, -1)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def encode_queries(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, output_dim]`` unit query embeddings."""
        return self.query_tower(features)

    def encode_query_positions(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, L, output_dim]`` unit queries after each history position."""
        return self.query_tower.encode_positions(features)

    def encode_items(self, features: dict[str, Tensor]) -> Tensor:
        """``[N, output_dim]`` unit candidate embeddings."""
        return self.candidate_tower(features)
