"""The training checkpoint: weights, best weights, optimiser state and the loop's
counters, written atomically after every epoch (and, with ``train.checkpoint_steps``
or on a stop request, within one) so ``--resume`` continues exactly.

Weights and optimiser tensors are safetensors; everything else is JSON (no pickle).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from twostage.artifacts import read_safetensors
from twostage.errors import ArtifactError, ConfigError
from twostage.training import TrainResult
from twostage.training.optim import Optimizers

__all__ = [
    "CHECKPOINT",
    "DATA_KEY",
    "InEpoch",
    "Restored",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE = "state.json"
#: The fingerprint key of the digest of the rows a run trains on
#: (:func:`twostage.training.loop.resume_fingerprint`).
DATA_KEY = "data.training_rows"
#: The checkpoint, the one being written, the one being replaced.
_NAMES = (CHECKPOINT, f".{CHECKPOINT}.tmp", f".{CHECKPOINT}.old")


@dataclass
class InEpoch:
    """Where a checkpoint written within an epoch stands: the next step of the
    epoch, the loss summed over its examples so far and their number, the random
    states the rest of the epoch draws from (``name -> [ranks, bytes]``, one row
    per rank), and how many ranks wrote it."""

    step: int
    loss_sum: float
    seen: int
    rng: dict[str, Tensor] = field(default_factory=dict)
    world: int = 1


@dataclass
class Restored:
    """What :func:`load_checkpoint` restores beside the weights: the epoch to run
    next (the one in progress for a checkpoint within an epoch), the epochs
    without improvement, the best weights, and where within the epoch it stands
    (None: at its start)."""

    next_epoch: int
    bad_epochs: int
    best: dict[str, Tensor]
    in_epoch: InEpoch | None = None


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


def save_checkpoint(
    directory: Path,
    model_state: dict[str, Tensor],
    optimizer: Optimizers,
    result: TrainResult,
    next_epoch: int,
    bad_epochs: int,
    best_state: dict[str, Tensor],
    *,
    fingerprint: dict[str, Any] | None = None,
    in_epoch: InEpoch | None = None,
) -> None:
    """Write the checkpoint so that a crash at any point leaves a loadable one.

    ``next_epoch`` is the epoch to run next: for a checkpoint within an epoch
    (``in_epoch``), the one in progress.

    The new checkpoint is written in full to ``.checkpoint.tmp`` (``state.json``
    last, everything flushed to disk), the current one is renamed to
    ``.checkpoint.old``, the new one renamed into place, and the old one removed.
    :func:`load_checkpoint` takes the newest complete one of the three, whichever
    step a crash interrupted. A failed write (a full disk) raises
    :class:`ArtifactError` and keeps the previous checkpoint.

    ``model_state`` is the model's state dict, taken by the caller on every rank (a
    sharded table gathers its rows to give it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    final, temp, old = (directory / name for name in _NAMES)
    try:
        if temp.exists():  # a crash while writing left half a checkpoint
            shutil.rmtree(temp)
        temp.mkdir()
        save_file(
            {k: v.contiguous() for k, v in model_state.items()},
            temp / "model.safetensors",
        )
        save_file(
            {k: v.contiguous() for k, v in best_state.items()},
            temp / "best.safetensors",
        )
        optim_tensors, optim_meta = _flatten_optimizer(optimizer)
        save_file(optim_tensors, temp / "optimizer.safetensors")
        files = ["model.safetensors", "best.safetensors", "optimizer.safetensors"]
        if in_epoch is not None:
            save_file(
                {k: v.contiguous() for k, v in in_epoch.rng.items()},
                temp / "rng.safetensors",
            )
            files.append("rng.safetensors")
        meta = {
            "next_epoch": next_epoch,
            "next_step": 0 if in_epoch is None else in_epoch.step,
            "loss_sum": 0.0 if in_epoch is None else in_epoch.loss_sum,
            "seen": 0 if in_epoch is None else in_epoch.seen,
            "world": 1 if in_epoch is None else in_epoch.world,
            "bad_epochs": bad_epochs,
            "optimizer": optim_meta,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_metric": result.best_metric,
            "seconds": result.seconds,
            "fingerprint": fingerprint,
        }
        for name in files:
            _fsync(temp / name)
        (temp / STATE).write_text(json.dumps(meta))  # last: marks it complete
        _fsync(temp / STATE)
        if final.exists():
            if old.exists():  # a crash while removing it left a stale one
                shutil.rmtree(old)
            final.rename(old)
        temp.rename(final)
        _fsync(directory)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        shutil.rmtree(temp, ignore_errors=True)
        raise ArtifactError(
            f"cannot write the checkpoint in {str(directory)!r}: {e} (disk full?). "
            "The previous checkpoint, if any, is kept."
        ) from e


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: Optimizers,
    result: TrainResult,
    *,
    fingerprint: dict[str, Any] | None = None,
    allow_changes: bool = False,
) -> Restored:
    """Restore the newest complete checkpoint into ``model``, ``optimizer``, ``result``.

    Args:
        fingerprint: what the run's results depend on (its config, less what may
            change on resume); compared with the checkpoint's.
        allow_changes: resume even when the fingerprints differ.

    Returns:
        The epoch to run next, the epochs without improvement, the best weights,
        and where within the epoch the checkpoint was written (if it was).

    Raises:
        ArtifactError: no complete checkpoint, or it cannot be read.
        ConfigError: the fingerprint differs and ``allow_changes`` is False.
    """
    path, meta = _newest_complete(directory)
    saved = meta.get("fingerprint")
    if isinstance(saved, dict) and fingerprint is not None:
        # A checkpoint from before the data digest existed is compared on its config.
        fingerprint = {
            k: v for k, v in fingerprint.items() if k in saved or k != DATA_KEY
        }
    changed: list[str] = []
    if fingerprint is not None and saved is not None and saved != fingerprint:
        # A setting added since the checkpoint was written is absent from it: at
        # None (unset) it is the same run, not "a config change" of no names.
        changed = sorted(
            k
            for k in set(saved) | set(fingerprint)
            if saved.get(k) != fingerprint.get(k)
        )
    if changed:
        if not allow_changes:
            data = DATA_KEY in changed
            raise ConfigError(
                f"the checkpoint in {str(directory)!r} was trained "
                + (
                    "on other training rows (the log, or its split, changed since)"
                    if data
                    else "with another config"
                )
                + f": {', '.join(changed)} differ. Resume with the same "
                + ("data and " if data else "")
                + "settings, train into a new directory, or allow the change "
                "explicitly (--allow-config-change)."
            )
        logger.warning("resuming with changed settings: %s", ", ".join(changed))
    try:
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        # Adam's moments are used in place: read into aligned memory, as the
        # uninterrupted run holds them (artifacts.read_safetensors).
        _load_optimizer(
            optimizer,
            read_safetensors(path / "optimizer.safetensors"),
            meta["optimizer"],
        )
        best = load_file(path / "best.safetensors")
        in_epoch = None
        if meta.get("next_step", 0) > 0:
            in_epoch = InEpoch(
                step=int(meta["next_step"]),
                loss_sum=float(meta["loss_sum"]),
                seen=int(meta["seen"]),
                rng=load_file(path / "rng.safetensors"),
                world=int(meta["world"]),
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"cannot resume from checkpoint {str(path)!r}: {e}") from e
    result.history = meta["history"]
    result.best_epoch = meta["best_epoch"]
    result.best_metric = meta["best_metric"]
    result.seconds = meta["seconds"]
    return Restored(meta["next_epoch"], meta["bad_epochs"], best, in_epoch)


def _newest_complete(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The complete checkpoint (``state.json`` written) with the most steps done."""
    found = []
    for name in _NAMES:
        state = directory / name / STATE
        try:
            meta = json.loads(state.read_text())
        except (OSError, ValueError):
            continue  # absent, or interrupted before its state was written
        if isinstance(meta, dict) and isinstance(meta.get("next_epoch"), int):
            done = (meta["next_epoch"], meta.get("next_step", 0))
            found.append((done, directory / name, meta))
    if not found:
        raise ArtifactError(
            f"no checkpoint to resume from in {str(directory)!r} (expected "
            f"{str(directory / CHECKPOINT / STATE)!r}). Train without --resume first."
        )
    _, path, meta = max(found, key=lambda entry: entry[0])
    return path, meta


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
