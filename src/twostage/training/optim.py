"""Optimisers, the learning-rate schedule and the device, shared by both stages."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from twostage.config import TrainConfig
from twostage.errors import ConfigError

__all__ = [
    "Optimizers",
    "RowSparseAdam",
    "learning_rate",
    "make_optimizer",
    "resolve_device",
]

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

    def __init__(
        self, optimizers: list[torch.optim.Optimizer], fused: list[Any] | None = None
    ) -> None:
        self.optimizers = optimizers
        #: Tables that update themselves inside backward
        #: (:class:`twostage.models.fused.SelfUpdatingTable`): they take the learning
        #: rate.
        self.fused = fused or []

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def set_learning_rate(self, value: float) -> None:
        """This step's learning rate, for every optimiser and fused table."""
        for group in self.param_groups:
            group["lr"] = value
        for table in self.fused:
            table.set_learning_rate(value)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


class RowSparseAdam(torch.optim.Optimizer):
    """``torch.optim.SparseAdam``'s update (same state, same arithmetic up to float
    rounding), with the moments read and written as rows.

    SparseAdam masks both moment tables with the gradient's sparsity pattern and adds
    sparse tensors back, which costs several coalescing passes per table; here each
    moment is one row gather and one row scatter at the gradient's (coalesced) rows.
    On a 1M x 64 table with 20k looked-up rows a step takes about a third less time
    (``benchmarks/retrieval_speed.py`` measures the training effect). The state
    (``step``, ``exp_avg``, ``exp_avg_sq``) is SparseAdam's, so checkpoints written
    with either load into the other.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise ConfigError(
                        "RowSparseAdam takes sparse gradients only (embedding tables "
                        f"with sparse=True). Received: a dense gradient of shape "
                        f"{tuple(param.grad.shape)}."
                    )
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                grad = param.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # m <- m + (1 - b1)(g - m); v <- v + (1 - b2)(g^2 - v), row by row.
                first = exp_avg.index_select(0, rows).lerp_(values, 1 - beta1)
                second = exp_avg_sq.index_select(0, rows)
                second.lerp_(values * values, 1 - beta2)
                exp_avg.index_copy_(0, rows, first)
                exp_avg_sq.index_copy_(0, rows, second)
                correction1 = 1 - beta1 ** state["step"]
                correction2 = 1 - beta2 ** state["step"]
                step_size = group["lr"] * math.sqrt(correction2) / correction1
                update = first.div_(second.sqrt_().add_(group["eps"]))
                param.index_add_(0, rows, update, alpha=-step_size)


def _sparse_parameters(model: torch.nn.Module) -> list[Tensor]:
    return [
        module.weight
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag)
        and module.sparse
    ]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> Optimizers:
    from twostage.models.fused import fused_modules

    fused = fused_modules(model)
    sparse = _sparse_parameters(model)
    # Fused tables update themselves in backward: no optimiser may touch them.
    skipped = {id(p) for p in sparse} | {
        id(p) for table in fused for p in table.parameters()
    }
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in skipped]
    lr, decay = config.learning_rate, config.weight_decay
    optimizers: list[torch.optim.Optimizer] = []
    # An ID-only model with sparse tables has no dense parameter at all.
    if config.optimizer == "adam":
        if dense:
            optimizers.append(torch.optim.Adam(dense, lr=lr, weight_decay=decay))
        if sparse:
            optimizers.append(RowSparseAdam(sparse, lr=config.learning_rate))
    elif config.optimizer == "adamw":
        if dense:
            optimizers.append(torch.optim.AdamW(dense, lr=lr, weight_decay=decay))
        if sparse:
            optimizers.append(RowSparseAdam(sparse, lr=config.learning_rate))
    elif config.optimizer == "adagrad":
        # Adagrad takes sparse gradients itself (as in the TFRS tutorials).
        if dense or sparse:
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
    return Optimizers(optimizers, fused)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
        return (
            config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        )
    return config.learning_rate
