"""Optimisers, the learning-rate schedule and the device, shared by both stages."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from twostage.config import TrainConfig
from twostage.errors import ConfigError

__all__ = ["Optimizers", "learning_rate", "make_optimizer", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(
            f"`train.device` should be auto, cpu or cuda[:n]. Received: {name!r}."
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "`train.device` asks for CUDA but torch sees no GPU here. "
            "Use --set train.device=cpu (or auto)."
        )
    return device


class Optimizers:
    """One or two optimisers stepped together: dense parameters, sparse embeddings.

    With ``retrieval.sparse_embeddings`` the embedding tables produce sparse gradients
    (only the rows a batch touched), which pays off for large ID spaces: a dense Adam
    step would otherwise read and write every row of a 1M-row table on every step.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def _sparse_parameters(model: torch.nn.Module) -> list[Tensor]:
    return [
        module.weight
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag)
        and module.sparse
    ]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> Optimizers:
    sparse = _sparse_parameters(model)
    sparse_ids = {id(p) for p in sparse}
    dense = [
        p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids
    ]
    lr, decay = config.learning_rate, config.weight_decay
    optimizers: list[torch.optim.Optimizer] = []
    # An ID-only model with sparse tables has no dense parameter at all.
    if config.optimizer == "adam":
        if dense:
            optimizers.append(torch.optim.Adam(dense, lr=lr, weight_decay=decay))
        if sparse:
            optimizers.append(torch.optim.SparseAdam(sparse, lr=config.learning_rate))
    elif config.optimizer == "adamw":
        if dense:
            optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=decay))
        if sparse:
            optimizers.append(torch.optim.SparseAdam(sparse, lr=config.learning_rate))
    elif config.optimizer == "adagrad":
        # Adagrad takes sparse gradients itself (as in the TFRS tutorials).
        optimizers.append(
            torch.optim.Adagrad(dense + sparse, lr=lr, weight_decay=decay)
        )
    else:
        raise ConfigError(
            "`train.optimizer` should be one of adam, adamw, adagrad. "
            f"Received: {config.optimizer!r}."
        )
    if sparse and config.weight_decay and config.optimizer != "adagrad":
        logger.warning("weight decay is not applied to sparse embedding tables")
    return Optimizers(optimizers)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
        return (
            config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        )
    return config.learning_rate
