"""The one training loop both stages run (:mod:`twostage.training.loop`) and what it
returns. Importing this package loads neither the loop nor any loss: a served model
only needs :class:`TrainResult`, the record it was saved with."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ProgressFn", "TrainResult", "main_member", "merge_results"]

#: Called after every optimiser step with ``{"epoch", "step", "loss", "examples"}``.
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a training run produced: per-epoch history and the best epoch.

    Attributes:
        history: one record per epoch: ``epoch``, ``train_loss``, ``seconds`` and,
            with validation, ``validation`` (the metric maximised) and
            ``validation_<name>`` for the other validation figures.
        best_epoch: 0-based epoch whose weights were kept (-1: none yet).
        best_metric: its validation metric (minus the training loss without one).
        seconds: wall time of the loop, resumed runs included.
        stopped_early: whether early stopping ended the run.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = -math.inf
    seconds: float = 0.0
    stopped_early: bool = False


def merge_results(results: list[TrainResult]) -> TrainResult:
    """One record of members trained one after another (``retrieval.ensemble``): every
    member's epochs, each record tagged with its ``member`` (0-based), the best epoch
    and metric of the first, the seconds of all."""
    history = [
        {**record, "member": i}
        for i, one in enumerate(results)
        for record in one.history
    ]
    first = results[0]
    return TrainResult(
        history=history,
        best_epoch=first.best_epoch,
        best_metric=first.best_metric,
        seconds=sum(r.seconds for r in results),
        stopped_early=first.stopped_early,
    )


def main_member(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of a run's first model: all of them but an ensemble's other
    members' (:func:`merge_results`)."""
    return [record for record in history if not record.get("member")]
