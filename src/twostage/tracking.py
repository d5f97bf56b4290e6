"""Training curves of both stages in TensorBoard (the optional ``tensorboard`` extra):
``twostage train --tensorboard DIR``, ``TwoStageModel(tensorboard=DIR)``, then
``tensorboard --logdir DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twostage.errors import ConfigError

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Writes step losses as training runs and each epoch's records after it.

    Scalars are named ``<stage>/<record>``: ``retrieval/step_loss`` (x: global
    step), ``retrieval/train_loss``, ``retrieval/validation``, ``ranking/...``
    (x: 1-based epoch).

    Args:
        log_dir: the run's directory (TensorBoard reads every run under its logdir).
        every: write the step loss every this many steps.

    Raises:
        ConfigError: TensorBoard is not installed.
    """

    def __init__(self, log_dir: str | Path, *, every: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'twostage[tensorboard]' (or pip install tensorboard)."
            ) from e
        if every < 1:
            raise ConfigError(f"`every` should be >= 1. Received: `every` = {every!r}.")
        self.log_dir = Path(log_dir)
        self.every = every
        self.writer = SummaryWriter(str(self.log_dir))

    def on_step(self, info: dict[str, Any]) -> None:
        """A training loop's step record (``stage`` defaults to retrieval; an
        ensemble's later members under ``<stage>/member-<i>/``)."""
        if info["step"] % self.every == 0:
            prefix = _prefix(info.get("stage", "retrieval"), info)
            self.writer.add_scalar(f"{prefix}/step_loss", info["loss"], info["step"])

    def log_epochs(self, stage: str, history: list[dict[str, Any]]) -> None:
        """Every numeric field of each epoch record (``TrainResult.history``); an
        ensemble's later members under ``<stage>/member-<i>/``."""
        for record in history:
            epoch = int(record["epoch"]) + 1  # 1-based, as the logs say
            prefix = _prefix(stage, record)
            for key, value in record.items():
                if key not in ("epoch", "member") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{prefix}/{key}", value, epoch)
        self.writer.flush()

    def log_stages(self, stages: Any) -> None:
        """Both stages' epoch records of a :class:`~twostage.two_stage.TwoStage`."""
        self.log_epochs("retrieval", stages.retrieval.train_result.history)
        if stages.ranker is not None:
            self.log_epochs("ranking", stages.ranker.history)

    def close(self) -> None:
        self.writer.close()


def _prefix(stage: str, record: dict[str, Any]) -> str:
    """Where a record's scalars go: the stage, or an ensemble's later member's
    ``<stage>/member-<i>``."""
    member = int(record.get("member", 0))
    return f"{stage}/member-{member}" if member else stage
