"""The retrieval training loop: reads top to bottom, seeded, resumable.

Per epoch: shuffle with a generator seeded by (seed, epoch); per step: learning rate,
gather the batch from tensors, forward both towers, loss, backward, clip, step. After each
epoch: a no-grad validation metric, early stopping, and a checkpoint. Because all
randomness of an epoch derives from (seed, epoch), resuming from the last checkpoint
reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from twostage.batches import (
    RetrievalTensors,
    UserExamples,
    interaction_loss,
    user_loss,
)
from twostage.config import RetrievalConfig, TrainConfig
from twostage.errors import ArtifactError, ConfigError
from twostage.models.retrieval import RetrievalModel

__all__ = ["ProgressFn", "TrainResult", "train_retrieval"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a training run produced: per-epoch history and the best epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = -math.inf
    seconds: float = 0.0
    stopped_early: bool = False


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
        if isinstance(module, torch.nn.Embedding) and module.sparse
    ]


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> Optimizers:
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


def _learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
        return (
            config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        )
    return config.learning_rate


def train_retrieval(
    model: RetrievalModel,
    tensors: RetrievalTensors,
    config: TrainConfig,
    *,
    validate: Callable[[RetrievalModel], float | dict[str, float]] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train a retrieval model in place; the best validated weights are kept.

    Args:
        model: the two towers (its config says loss options).
        tensors: the training tables.
        config: optimisation settings.
        validate: returns a metric to maximise (e.g. Recall@100 on a validation carve
            out), or a dict whose ``"metric"`` entry is that metric and whose other
            entries (e.g. ``"loss"``) are recorded as ``validation_<name>``;
            out); without it every epoch counts as the best.
        checkpoint_dir: where a checkpoint is written after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        on_step: called after every step with ``{"epoch", "step", "loss", "examples"}``.
        stop_after_epoch: stop (as if killed) after this many epochs; for tests.
    """
    model_config: RetrievalConfig = model.config
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    host_tensors, tensors = tensors, tensors.to(device)
    optimizer = _make_optimizer(model, config)
    if not 0.0 <= model_config.history_dropout < 1.0:
        raise ConfigError(
            "`retrieval.history_dropout` should be in [0, 1). "
            f"Received: {model_config.history_dropout!r}."
        )
    if model_config.max_positives_per_user < 0:
        raise ConfigError(
            "`retrieval.max_positives_per_user` should be 0 (no cap) or positive. "
            f"Received: {model_config.max_positives_per_user!r}."
        )
    by_user = UserExamples.of(tensors) if model_config.examples == "users" else None
    num_examples = tensors.num_examples if by_user is None else len(by_user.users)
    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    result = TrainResult()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bad_epochs, start_epoch = 0, 0
    if resume:
        if checkpoint_dir is None:
            raise ConfigError("`resume` needs a `checkpoint_dir`. Received: None.")
        start_epoch, bad_epochs, best_state = _load_checkpoint(
            checkpoint_dir, model, optimizer, result
        )
        logger.info("resumed from %s at epoch %d", checkpoint_dir, start_epoch)
    started = time.perf_counter() - result.seconds
    for epoch in range(start_epoch, config.epochs):
        if bad_epochs >= config.early_stopping_patience > 0:
            break
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout masks
        order = torch.randperm(num_examples, generator=generator)
        epoch_loss, seen = 0.0, 0
        for step_in_epoch in range(steps_per_epoch):
            step = epoch * steps_per_epoch + step_in_epoch
            if step >= total_steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step, total_steps)
            start = step_in_epoch * config.batch_size
            batch = order[start : start + config.batch_size].to(device)
            if by_user is None:
                loss = interaction_loss(model, model_config, tensors, batch, generator)
            else:
                loss = user_loss(
                    model, model_config, tensors, by_user, batch, generator
                )
            optimizer.zero_grad()
            loss.backward()
            if config.grad_clip > 0:
                # Sparse embedding gradients are left out of the norm.
                torch.nn.utils.clip_grad_norm_(
                    [
                        p
                        for p in model.parameters()
                        if p.grad is not None and not p.grad.is_sparse
                    ],
                    config.grad_clip,
                )
            optimizer.step()
            epoch_loss += loss.item() * len(batch)
            seen += len(batch)
            if on_step is not None:
                on_step(
                    {
                        "epoch": epoch,
                        "step": step,
                        "loss": loss.item(),
                        "examples": seen,
                    }
                )
        record = {"epoch": epoch, "train_loss": epoch_loss / max(seen, 1)}
        model.eval()
        if validate is not None:
            with torch.no_grad():
                model.cpu()  # evaluation runs beside the host tables
                outcome = validate(model)
                if isinstance(outcome, dict):
                    record["validation"] = float(outcome["metric"])
                    record.update(
                        {
                            f"validation_{k}": float(v)
                            for k, v in outcome.items()
                            if k != "metric"
                        }
                    )
                else:
                    record["validation"] = float(outcome)
                model.to(device)
        metric = record.get("validation", -record["train_loss"])
        if metric > result.best_metric:
            result.best_metric, result.best_epoch, bad_epochs = metric, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        record["seconds"] = time.perf_counter() - started
        result.history.append(record)
        logger.info("epoch %d: %s", epoch, record)
        result.seconds = record["seconds"]
        if checkpoint_dir is not None:
            _save_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                result,
                epoch + 1,
                bad_epochs,
                best_state,
            )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            model.cpu()
            return result
        if config.max_steps > 0 and (epoch + 1) * steps_per_epoch >= total_steps:
            break
    result.stopped_early = bad_epochs >= config.early_stopping_patience > 0 and (
        len(result.history) < config.epochs
    )
    model.load_state_dict(best_state)
    model.cpu().eval()
    del host_tensors
    return result


def _flatten_optimizer(
    optimizer: Optimizers,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    groups = []
    for number, single in enumerate(optimizer.optimizers):
        state = single.state_dict()
        groups.append(state["param_groups"])
        for index, values in state["state"].items():
            for name, value in values.items():
                key = f"{number}.{index}.{name}"
                if isinstance(value, Tensor):
                    tensors[key] = value.detach().clone().contiguous()
                else:
                    scalars[key] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(
    optimizer: Optimizers, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    states: list[dict[int, dict[str, Any]]] = [{} for _ in optimizer.optimizers]
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        number, index, name = key.split(".", 2)
        states[int(number)].setdefault(int(index), {})[name] = value
    if len(meta["param_groups"]) != len(optimizer.optimizers):
        raise ArtifactError(
            "the checkpoint's optimiser does not match this config (sparse embeddings "
            "on in one and off in the other?)."
        )
    for single, state, groups in zip(
        optimizer.optimizers, states, meta["param_groups"], strict=True
    ):
        single.load_state_dict({"state": state, "param_groups": groups})


def _save_checkpoint(
    directory: Path,
    model: RetrievalModel,
    optimizer: Optimizers,
    result: TrainResult,
    next_epoch: int,
    bad_epochs: int,
    best_state: dict[str, Tensor],
) -> None:
    """Write the checkpoint to a temp dir, then rename it over the old one (atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT
    temp = directory / f".{CHECKPOINT}.tmp"
    temp.mkdir(exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        temp / "model.safetensors",
    )
    save_file(
        {k: v.contiguous() for k, v in best_state.items()}, temp / "best.safetensors"
    )
    optim_tensors, optim_meta = _flatten_optimizer(optimizer)
    save_file(optim_tensors, temp / "optimizer.safetensors")
    meta = {
        "next_epoch": next_epoch,
        "bad_epochs": bad_epochs,
        "optimizer": optim_meta,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_metric": result.best_metric,
        "seconds": result.seconds,
    }
    (temp / "state.json").write_text(json.dumps(meta))
    old = directory / f".{CHECKPOINT}.old"
    if final.exists():
        final.rename(old)
    temp.rename(final)
    if old.exists():
        for path in old.iterdir():
            path.unlink()
        old.rmdir()


def _load_checkpoint(
    directory: Path,
    model: RetrievalModel,
    optimizer: Optimizers,
    result: TrainResult,
) -> tuple[int, int, dict[str, Tensor]]:
    path = directory / CHECKPOINT
    if not (path / "state.json").exists():
        raise ArtifactError(
            f"no checkpoint to resume from in {str(directory)!r} (expected "
            f"{str(path / 'state.json')!r}). Train without --resume first."
        )
    try:
        meta = json.loads((path / "state.json").read_text())
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        _load_optimizer(
            optimizer, load_file(path / "optimizer.safetensors"), meta["optimizer"]
        )
        best = load_file(path / "best.safetensors")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"cannot resume from checkpoint {str(path)!r}: {e}") from e
    result.history = meta["history"]
    result.best_epoch = meta["best_epoch"]
    result.best_metric = meta["best_metric"]
    result.seconds = meta["seconds"]
    return meta["next_epoch"], meta["bad_epochs"], best
