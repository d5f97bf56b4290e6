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
        log_t = torch.tensor(math.log(config.temperature))
        if config.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

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
