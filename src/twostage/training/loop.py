"""The training loop of both stages: reads top to bottom, seeded, resumable.

Per epoch: shuffle the examples with a generator seeded by (seed, epoch); per step:
learning rate, the stage's batch loss, backward, clip, step. After each epoch: a no-grad
validation, early stopping, the best weights, and a checkpoint. Because all randomness
of an epoch derives from (seed, epoch), resuming from the last checkpoint reproduces an
uninterrupted run exactly.

A stage supplies only what differs: its model, the loss of a batch of example numbers,
and its validation (:func:`twostage.retrieval.fit.train_retrieval`,
:func:`twostage.ranking.fit.fit_ranking`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from twostage import distributed
from twostage.config import TrainConfig
from twostage.errors import ConfigError, TwostageError
from twostage.training import ProgressFn, TrainResult
from twostage.training.checkpoint import DATA_KEY, load_checkpoint, save_checkpoint
from twostage.training.optim import learning_rate, make_optimizer

__all__ = [
    "BatchLoss",
    "TrainingDiverged",
    "TrainingInterrupted",
    "Validate",
    "request_stop",
    "data_digest",
    "resume_fingerprint",
    "run_training",
]

logger = logging.getLogger(__name__)

#: ``(batch, generator) -> scalar loss``: ``batch`` holds ``[B]`` example numbers (on
#: the training device); ``generator`` is the epoch's seeded random source.
BatchLoss = Callable[[Tensor, torch.Generator], Tensor]
#: ``model -> {"metric": value to maximise, other figures...}``, run under no_grad with
#: the model in eval mode on the CPU.
Validate = Callable[[nn.Module], dict[str, float]]

#: Set by :func:`request_stop` (the CLI's SIGTERM handler): the loop finishes the
#: epoch, writes its checkpoint and stops.
_STOP = threading.Event()
#: Settings that may change between a run and its resumption.
_MAY_CHANGE = ("train.epochs", "train.num_threads", "train.device", "ranking.epochs")


class TrainingInterrupted(TwostageError, RuntimeError):
    """Training stopped on request (SIGTERM) after finishing an epoch."""


class TrainingDiverged(TwostageError, ArithmeticError):
    """The loss stopped being a finite number: the weights after it are not a
    model, so training stops rather than saving them."""


def request_stop() -> None:
    """Ask the running loop to stop after the current epoch (signal-safe)."""
    _STOP.set()


def resume_fingerprint(
    values: dict[str, Any], *, data: str | None = None
) -> dict[str, Any]:
    """``section.key -> value`` of a config dict, less the settings that may change
    when a run is resumed (more epochs, other threads or device), and with ``data``
    the digest of the rows trained on (:func:`data_digest`, under
    :data:`~twostage.training.checkpoint.DATA_KEY`): the same config over a log
    that changed since the checkpoint is not the same run."""
    flat = {
        f"{section}.{key}": value
        for section, entries in values.items()
        if isinstance(entries, dict)
        for key, value in entries.items()
    }
    out = {k: v for k, v in flat.items() if k not in _MAY_CHANGE}
    if data is not None:
        out[DATA_KEY] = data
    return out


def data_digest(*tensors: Tensor | None) -> str:
    """A SHA-256 (hex, 16 digits) of tensors' shapes, dtypes and values: equal for
    equal training data, whatever process or machine computed it. It reads every
    byte (about 0.7 s per GB on the 2-core VM), so callers compute it only for
    checkpoints."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none;")
            continue
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(flat.shape)}:{flat.dtype};".encode())
        digest.update(flat.numpy().data)  # the buffer itself: no copy
    return digest.hexdigest()[:16]


class _StepLoss(nn.Module):
    """The batch loss as a module's forward, so that DistributedDataParallel can wrap
    it (DDP synchronises gradients of what its forward computed)."""

    def __init__(self, model: nn.Module, batch_loss: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, batch: Tensor, generator: torch.Generator) -> Tensor:
        return self.batch_loss(batch, generator)


def run_training(
    model: nn.Module,
    config: TrainConfig,
    *,
    num_examples: int,
    batch_loss: BatchLoss,
    device: torch.device,
    validate: Validate | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    stop_after_epoch: int | None = None,
    fingerprint: dict[str, Any] | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train ``model`` in place; the best validated weights are kept.

    Args:
        model: the network; moved to ``device`` for training, left on the CPU.
        config: optimisation settings (epochs, batch size, LR schedule, clipping,
            early stopping, seed).
        num_examples: how many examples an epoch shuffles (numbers ``0..n-1``).
        batch_loss: the loss of one batch of example numbers.
        device: where training runs (:func:`twostage.training.optim.resolve_device`).
        validate: the validation after each epoch; without it every epoch that
            lowers the training loss counts as the best.
        checkpoint_dir: where a checkpoint is written after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        on_step: called after every step with ``{"epoch", "step", "loss",
            "examples", "num_epochs", "total_steps"}`` (``epoch`` and ``step`` are
            0-based; ``step`` counts across epochs; ``examples`` within the epoch).
        stop_after_epoch: stop (as if killed) after this many epochs; for tests.
        fingerprint: what the run's results depend on (:func:`resume_fingerprint`),
            saved in the checkpoint; resuming with another one is refused unless
            ``allow_config_change``.

    Raises:
        TrainingInterrupted: :func:`request_stop` was called; the epoch in progress
            was finished and checkpointed first.
    """
    _STOP.clear()
    torch.manual_seed(config.seed)
    model.to(device)
    optimizer = make_optimizer(model, config)
    world = distributed.current()
    step_loss: Callable[[Tensor, torch.Generator], Tensor] = batch_loss
    if world is not None and any(p.requires_grad for p in model.parameters()):
        # Every rank takes the same global batch; batch_loss trains on the rank's
        # share (twostage.distributed) and DDP averages the gradients. (A model
        # whose every table is sharded and updates itself in backward has nothing
        # left for DDP.)
        step_loss = nn.parallel.DistributedDataParallel(
            _StepLoss(model, batch_loss), find_unused_parameters=True
        )
    main = distributed.is_main()
    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    result = TrainResult()
    # The best epoch's weights; None until an epoch ends (the weights themselves are
    # then the fallback). Not cloned up front: for a large model a copy is gigabytes.
    best_state: dict[str, Tensor] | None = None
    bad_epochs, start_epoch = 0, 0
    if resume:
        if checkpoint_dir is None:
            raise ConfigError("`resume` needs a `checkpoint_dir`. Received: None.")
        start_epoch, bad_epochs, best_state = load_checkpoint(
            checkpoint_dir,
            model,
            optimizer,
            result,
            fingerprint=fingerprint,
            allow_changes=allow_config_change,
        )
        logger.info("resumed from %s at epoch %d", checkpoint_dir, start_epoch + 1)
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
            optimizer.set_learning_rate(learning_rate(config, step, total_steps))
            start = step_in_epoch * config.batch_size
            batch = order[start : start + config.batch_size].to(device)
            with torch.autocast(
                device_type=torch.device(device).type,
                dtype=torch.bfloat16,
                enabled=config.precision == "bf16",
            ):
                loss = step_loss(batch, generator)
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
            # Adagrad builds sparse tensors from sparse gradients; torch warns unless
            # invariant checks are chosen: off, the default (torch's own gradients
            # hold them), said explicitly.
            with torch.sparse.check_sparse_tensor_invariants(enable=False):
                optimizer.step()
            value = loss.item()
            if world is not None:  # each rank holds its share of the global loss
                value = _mean_over_ranks(loss.detach())
            if not math.isfinite(value):  # every rank sees the same mean
                raise TrainingDiverged(
                    f"the loss became {value} at epoch {epoch + 1}, step "
                    f"{step_in_epoch + 1}: training diverged, and its weights are no "
                    f"model. Lower the learning rate (set to "
                    f"{config.learning_rate:g}: `train.learning_rate` for retrieval, "
                    "`ranking.learning_rate` for the ranker), or look for values far "
                    "out of scale among the ratings and numeric features."
                )
            epoch_loss += value * len(batch)
            seen += len(batch)
            if on_step is not None and main:
                on_step(
                    {
                        "epoch": epoch,
                        "step": step,
                        "loss": value,
                        "examples": seen,
                        "num_epochs": config.epochs,
                        "total_steps": total_steps,
                    }
                )
        record = {"epoch": epoch, "train_loss": epoch_loss / max(seen, 1)}
        model.eval()
        if validate is not None:
            with torch.no_grad():
                model.cpu()  # evaluation runs beside the host tables
                outcome = validate(model)
                record["validation"] = float(outcome["metric"])
                record.update({f"validation_{k}": float(v) for k, v in outcome.items()})
                del record["validation_metric"]
                model.to(device)
        metric = record.get("validation", -record["train_loss"])
        last = epoch + 1 >= config.epochs or (
            config.max_steps > 0 and (epoch + 1) * steps_per_epoch >= total_steps
        )
        if metric > result.best_metric:
            result.best_metric, result.best_epoch, bad_epochs = metric, epoch, 0
            best_state = None  # drop the old copy before taking the new one
            # After the last epoch the best weights are the model's own: no copy
            # (for a 10M-user table that is gigabytes), unless a checkpoint or a
            # stop request needs one.
            if not last or checkpoint_dir is not None or stop_after_epoch is not None:
                best_state = _clone(model)
        else:
            bad_epochs += 1
        record["seconds"] = time.perf_counter() - started
        result.history.append(record)
        # 1-based, as the progress line counts them; the record keeps 0-based epochs.
        (logger.info if main else logger.debug)(
            "epoch %d/%d: %s (%.1f s)",
            epoch + 1,
            config.epochs,
            ", ".join(
                f"{k.replace('_', ' ')} {v:.4f}"
                for k, v in record.items()
                if k not in ("epoch", "seconds")
            ),
            record["seconds"],
        )
        result.seconds = record["seconds"]
        if checkpoint_dir is not None:
            # Taken on every rank: a sharded table's state is a collective.
            current = model.state_dict()
            if main:  # one checkpoint for all ranks
                save_checkpoint(
                    checkpoint_dir,
                    current,
                    optimizer,
                    result,
                    epoch + 1,
                    bad_epochs,
                    best_state if best_state is not None else current,
                    fingerprint=fingerprint,
                )
            del current
        if _STOP.is_set():
            model.cpu()
            where = (
                f"its checkpoint is in {str(checkpoint_dir)!r}: continue with --resume"
                if checkpoint_dir is not None
                else "nothing was saved (no checkpoint directory)"
            )
            raise TrainingInterrupted(
                f"training stopped on request after epoch {epoch + 1} of "
                f"{config.epochs}; {where}."
            )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            model.cpu()
            return result
        if config.max_steps > 0 and (epoch + 1) * steps_per_epoch >= total_steps:
            break
    result.stopped_early = bad_epochs >= config.early_stopping_patience > 0 and (
        len(result.history) < config.epochs
    )
    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu().eval()
    return result


def _mean_over_ranks(value: Tensor) -> float:
    """The global batch's loss: the ranks' shares are scaled to sum to W times it."""
    import torch.distributed as dist

    total = value.clone()
    dist.all_reduce(total)
    world = distributed.current()
    return float(total) / (world.size if world is not None else 1)


def _clone(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
