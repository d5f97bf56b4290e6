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

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from twostage import distributed
from twostage.config import TrainConfig
from twostage.errors import ConfigError, TwostageError
from twostage.training import ProgressFn, TrainResult
from twostage.training.checkpoint import (
    DATA_KEY,
    InEpoch,
    load_checkpoint,
    save_checkpoint,
)
from twostage.training.optim import learning_rate, make_optimizer

__all__ = [
    "BatchLoss",
    "TrainingDiverged",
    "TrainingInterrupted",
    "Validate",
    "request_stop",
    "data_digest",
    "few_steps",
    "resume_fingerprint",
    "run_training",
]

logger = logging.getLogger(__name__)

#: Fewer steps an epoch than this, and a run is told its batch is large for its data.
FEW_STEPS = 10


def few_steps(who: str, examples: int, batch_size: int, key: str) -> str | None:
    """The warning for an epoch of fewer than :data:`FEW_STEPS` steps (None when it
    has more): ``who`` trains on ``examples`` at ``key`` = ``batch_size``, and may
    stop early having learned little; the message names a batch that gives it
    more. A planted log of 720 pairs at the ranker's default 1,024 stopped early
    at an AUC of 0.49 on its own training rows (0.99 at batches of 32)."""
    steps = -(-examples // batch_size)  # ceil
    if steps >= FEW_STEPS:
        return None
    return (
        f"{who}'s epoch is {steps} step(s) ({examples} training examples at "
        f"{key}={batch_size}): it may stop early having learned little; a smaller "
        f"batch gives it more steps (e.g. --set {key}="
        f"{max(1, examples // (2 * FEW_STEPS))})"
    )


#: ``(batch, generator) -> scalar loss``: ``batch`` holds ``[B]`` example numbers (on
#: the training device); ``generator`` is the epoch's seeded random source.
BatchLoss = Callable[[Tensor, torch.Generator], Tensor]
#: ``model -> {"metric": value to maximise, other figures...}``, run under no_grad with
#: the model in eval mode on the CPU.
Validate = Callable[[nn.Module], dict[str, float]]

#: Set by :func:`request_stop` (the CLI's SIGTERM and first Ctrl-C): the loop
#: finishes the step, writes a checkpoint and stops.
_STOP = threading.Event()
#: Set while :func:`run_training` runs (where a stop request is honoured).
_RUNNING = threading.Event()
#: Settings that may change between a run and its resumption.
_MAY_CHANGE = (
    "train.epochs",
    "train.num_threads",
    "train.device",
    "train.checkpoint_steps",
    "train.checkpoint_minutes",
    "ranking.epochs",
)


class TrainingInterrupted(TwostageError, RuntimeError):
    """Training stopped on request (SIGTERM, Ctrl-C) after finishing a step, with
    a checkpoint of it where the run has a checkpoint directory."""


class TrainingDiverged(TwostageError, ArithmeticError):
    """The loss stopped being a finite number: the weights after it are not a
    model, so training stops rather than saving them."""


def request_stop() -> None:
    """Ask the running loop to stop after the current step, checkpointed
    (signal-safe)."""
    _STOP.set()


def stop_requested() -> bool:
    """Whether a stop was requested and not yet honoured."""
    return _STOP.is_set()


def cancel_stop() -> None:
    """Forget a stop request no loop honoured (the run ended first)."""
    _STOP.clear()


def training_running() -> bool:
    """Whether :func:`run_training` is running, to honour a stop request."""
    return _RUNNING.is_set()


@contextlib.contextmanager
def _running() -> Iterator[None]:
    """Mark :func:`run_training` as running; a stop request it honours (by
    raising :class:`TrainingInterrupted`) is cleared."""
    _RUNNING.set()
    try:
        yield
    except TrainingInterrupted:
        _STOP.clear()
        raise
    finally:
        _RUNNING.clear()


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
    on_epoch: ProgressFn | None = None,
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
        checkpoint_dir: where a checkpoint is written after every epoch, every
            ``config.checkpoint_steps`` steps or ``config.checkpoint_minutes``
            minutes within one, and on a stop request.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        on_step: called after every step with ``{"epoch", "step", "loss",
            "examples", "num_epochs", "total_steps"}`` (``epoch`` and ``step`` are
            0-based; ``step`` counts across epochs; ``examples`` within the epoch).
        on_epoch: called after every epoch (its checkpoint written) with the
            epoch's history record (``epoch``, ``train_loss``, ``validation``...);
            an exception it raises ends training there (a tuner pruning a trial).
            On the main rank only.
        stop_after_epoch: stop (as if killed) after this many epochs; for tests.
        fingerprint: what the run's results depend on (:func:`resume_fingerprint`),
            saved in the checkpoint; resuming with another one is refused unless
            ``allow_config_change``.

    Raises:
        TrainingInterrupted: :func:`request_stop` was called; the step in progress
            was finished and checkpointed first (with ``checkpoint_dir``).
        ConfigError: resuming a checkpoint written within an epoch by another
            number of ranks.
    """
    with _running():
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
        in_epoch: InEpoch | None = None
        if resume:
            if checkpoint_dir is None:
                raise ConfigError("`resume` needs a `checkpoint_dir`. Received: None.")
            restored = load_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                result,
                fingerprint=fingerprint,
                allow_changes=allow_config_change,
            )
            start_epoch, bad_epochs = restored.next_epoch, restored.bad_epochs
            best_state, in_epoch = restored.best, restored.in_epoch
            ranks = 1 if world is None else world.size
            if in_epoch is not None and in_epoch.world != ranks:
                raise ConfigError(
                    f"the checkpoint in {str(checkpoint_dir)!r} was written within epoch "
                    f"{start_epoch + 1} by {in_epoch.world} rank(s), and the rest of "
                    f"that epoch draws from their random states: resume it on "
                    f"{in_epoch.world} rank(s), not {ranks}."
                )
            logger.info(
                "resumed from %s at epoch %d%s",
                checkpoint_dir,
                start_epoch + 1,
                "" if in_epoch is None else f", step {in_epoch.step + 1}",
            )
        started = time.perf_counter() - result.seconds
        saved_at = time.perf_counter()  # of the last checkpoint (checkpoint_minutes)
        for epoch in range(start_epoch, config.epochs):
            if bad_epochs >= config.early_stopping_patience > 0:
                break
            model.train()
            generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
            torch.manual_seed(config.seed * 100_003 + epoch)  # dropout masks
            order = torch.randperm(num_examples, generator=generator)
            epoch_loss, seen, first_step = 0.0, 0, 0
            if in_epoch is not None:  # resumed within this epoch
                first_step, epoch_loss, seen = (
                    in_epoch.step,
                    in_epoch.loss_sum,
                    in_epoch.seen,
                )
                _set_random_states(in_epoch.rng, generator, device)
                in_epoch = None
            for step_in_epoch in range(first_step, steps_per_epoch):
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
                if step_in_epoch + 1 >= steps_per_epoch or step + 1 >= total_steps:
                    break  # the epoch's end: validated and checkpointed below
                late = (
                    checkpoint_dir is not None
                    and config.checkpoint_minutes > 0
                    and time.perf_counter() - saved_at >= 60 * config.checkpoint_minutes
                )
                stop, late = _agreed([_STOP.is_set(), late], device)
                due = late or (
                    config.checkpoint_steps > 0
                    and (step_in_epoch + 1) % config.checkpoint_steps == 0
                )
                if checkpoint_dir is not None and (stop or due):
                    current = model.state_dict()  # a collective for a sharded table
                    rng = _random_states(generator, device)
                    if main:
                        save_checkpoint(
                            checkpoint_dir,
                            current,
                            optimizer,
                            result,
                            epoch,
                            bad_epochs,
                            best_state if best_state is not None else current,
                            fingerprint=fingerprint,
                            in_epoch=InEpoch(
                                step_in_epoch + 1,
                                epoch_loss,
                                seen,
                                rng,
                                1 if world is None else world.size,
                            ),
                        )
                    del current
                    saved_at = time.perf_counter()
                if stop:
                    model.cpu()
                    raise TrainingInterrupted(
                        f"training stopped on request after step {step_in_epoch + 1} "
                        f"of {steps_per_epoch} in epoch {epoch + 1} of {config.epochs}; "
                        + _where(checkpoint_dir)
                    )
            record = {"epoch": epoch, "train_loss": epoch_loss / max(seen, 1)}
            model.eval()
            if validate is not None:
                with torch.no_grad():
                    model.cpu()  # evaluation runs beside the host tables
                    outcome = validate(model)
                    record["validation"] = float(outcome["metric"])
                    record.update(
                        {f"validation_{k}": float(v) for k, v in outcome.items()}
                    )
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
                if (
                    not last
                    or checkpoint_dir is not None
                    or stop_after_epoch is not None
                ):
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
                saved_at = time.perf_counter()
            if on_epoch is not None and main:
                on_epoch(dict(record))
            if _agreed([_STOP.is_set()], device)[0]:
                model.cpu()
                raise TrainingInterrupted(
                    f"training stopped on request after epoch {epoch + 1} of "
                    f"{config.epochs}; " + _where(checkpoint_dir)
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


def _where(checkpoint_dir: Path | None) -> str:
    if checkpoint_dir is None:
        return "nothing was saved (no checkpoint directory)."
    return f"its checkpoint is in {str(checkpoint_dir)!r}: continue with --resume."


def _agreed(flags: list[bool], device: torch.device) -> list[bool]:
    """Each of ``flags`` (a stop request, a checkpoint due by the clock) as any rank
    has it (as they are in a single process): every rank then stops, or writes
    its share of a checkpoint, after the same step, as the global batch and the
    checkpoint's collectives need them all."""
    if distributed.current() is None:
        return flags
    import torch.distributed as dist

    together = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(together, op=dist.ReduceOp.MAX)
    return [bool(f) for f in together.tolist()]


def _random_states(
    generator: torch.Generator, device: torch.device
) -> dict[str, Tensor]:
    """The random states the rest of an epoch draws from, one row per rank: the
    epoch's generator (shuffling, negatives) and torch's own (dropout; CUDA's too
    on a GPU)."""
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if distributed.current() is None:
        return {k: v[None] for k, v in states.items()}
    return {  # the same length on every rank: gathered as rows
        k: distributed.gather_rows(
            v[None].to(device), distributed.gather_sizes(1)
        ).cpu()
        for k, v in states.items()
    }


def _set_random_states(
    states: dict[str, Tensor], generator: torch.Generator, device: torch.device
) -> None:
    """This rank's row of :func:`_random_states`, restored."""
    world = distributed.current()
    rank = 0 if world is None else world.rank
    # Each row copied: set_state on a row of the stacked table (a view at an
    # offset into its storage) crashed rank 1 with a segmentation fault.
    generator.set_state(states["generator"][rank].clone())
    torch.set_rng_state(states["torch"][rank].clone())
    if "cuda" in states and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["cuda"][rank].clone(), device)


def _mean_over_ranks(value: Tensor) -> float:
    """The global batch's loss: the ranks' shares are scaled to sum to W times it."""
    import torch.distributed as dist

    total = value.clone()
    dist.all_reduce(total)
    world = distributed.current()
    return float(total) / (world.size if world is not None else 1)


def _clone(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
