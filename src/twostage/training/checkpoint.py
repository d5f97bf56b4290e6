"""The training checkpoint: weights, best weights, optimiser state and the loop's
counters, written atomically after every epoch so ``--resume`` continues exactly.

Weights and optimiser tensors are safetensors; everything else is JSON (no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from twostage.errors import ArtifactError
from twostage.training import TrainResult
from twostage.training.optim import Optimizers

__all__ = ["CHECKPOINT", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint"


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
    model: torch.nn.Module,
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


def load_checkpoint(
    directory: Path,
    model: torch.nn.Module,
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
