"""The training loop keeps the best epoch's weights, copying them only when needed."""

import pytest
import torch

from twostage.config import TrainConfig
from twostage.training import loop


def _fit_linear(
    *,
    outlier: float | None = None,
    validate: loop.Validate | None = None,
    learning_rate: float = TrainConfig.learning_rate,
    on_epoch: loop.ProgressFn | None = None,
) -> torch.nn.Module:
    """Three epochs of a linear model on 40 seeded rows (``outlier``: one value
    set far out of scale)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = torch.randn(40, 3)
    if outlier is not None:
        data[17, 1] = outlier

    def batch_loss(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (model(data[batch]) - 1.0).pow(2).mean()

    config = TrainConfig(
        epochs=3,
        batch_size=8,
        early_stopping_patience=0,
        device="cpu",
        learning_rate=learning_rate,
    )
    loop.run_training(
        model,
        config,
        num_examples=40,
        batch_loss=batch_loss,
        device=torch.device("cpu"),
        validate=validate,
        on_epoch=on_epoch,
    )
    return model


def _train(
    monkeypatch: pytest.MonkeyPatch, metrics: list[float]
) -> tuple[torch.nn.Module, list[torch.Tensor], int]:
    """``_fit_linear`` where ``metrics[e]`` is epoch e's validation."""
    after_epoch: list[torch.Tensor] = []
    clones = 0
    original = loop._clone

    def counted(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        nonlocal clones
        clones += 1
        return original(module)

    monkeypatch.setattr(loop, "_clone", counted)

    def validate(module: torch.nn.Module) -> dict[str, float]:
        after_epoch.append(module.weight.detach().clone())
        return {"metric": metrics[len(after_epoch) - 1]}

    model = _fit_linear(validate=validate)
    return model, after_epoch, clones


def test_a_best_last_epoch_is_kept_without_a_copy(monkeypatch) -> None:
    model, after_epoch, clones = _train(monkeypatch, [0.1, 0.2, 0.3])
    assert clones == 2  # epochs 1 and 2; the last one's weights are the model's
    assert torch.equal(model.weight, after_epoch[2])


def test_an_earlier_best_epoch_comes_back(monkeypatch) -> None:
    model, after_epoch, clones = _train(monkeypatch, [0.1, 0.3, 0.2])
    assert clones == 2
    assert torch.equal(model.weight, after_epoch[1])
    assert not torch.equal(model.weight, after_epoch[2])


def test_a_loss_that_is_no_number_stops_training() -> None:
    """A learning rate far too high, or a value far out of scale, made the weights
    NaN; the run was saved and served NaN scores (or a silent popularity
    fallback)."""
    with pytest.raises(
        loop.TrainingDiverged, match=r"the loss became inf at epoch 1.*set to 0.001"
    ):
        _fit_linear(outlier=1e30, learning_rate=1e-3)  # squared: beyond float32


def test_on_epoch_gets_each_epoch_s_record_and_can_end_training() -> None:
    records: list[dict] = []
    validations = iter([0.1, 0.3, 0.2])
    _fit_linear(
        validate=lambda module: {"metric": next(validations)},
        on_epoch=records.append,
    )
    assert [(r["epoch"], r["validation"]) for r in records] == [
        (0, 0.1),
        (1, 0.3),
        (2, 0.2),
    ]
    assert all(r["train_loss"] > 0 for r in records)

    class Enough(Exception):
        pass

    def stop_after_two(record: dict) -> None:
        records.append(record)
        if record["epoch"] == 1:
            raise Enough

    records.clear()
    with pytest.raises(Enough):
        _fit_linear(on_epoch=stop_after_two)
    assert [r["epoch"] for r in records] == [0, 1]
