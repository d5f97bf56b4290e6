"""Checkpoints survive a crash at any point; resume checks the config; a stop
request (SIGTERM, Ctrl-C) checkpoints the step; checkpoints within an epoch resume
exactly; a full disk keeps the previous checkpoint."""

import dataclasses
import errno
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from twostage.errors import ArtifactError, ConfigError
from twostage.retrieval.fit import train_retrieval
from twostage.training import checkpoint as checkpoint_module
from twostage.training.loop import TrainingInterrupted, request_stop

SMALL = [
    "train.epochs=4",
    "train.early_stopping_patience=0",
    "train.num_threads=1",
    "train.batch_size=128",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
    "retrieval.history_length=10",
]


@pytest.fixture(scope="module")
def setup(small_training):
    config, tensors, fresh = small_training(SMALL)
    full = fresh()
    train_retrieval(full, tensors, config.train)
    return config, tensors, fresh, full.state_dict()


def _equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("crash", ["stale_old", "between_renames", "half_written_tmp"])
def test_resume_after_a_crash_at_any_point(setup, tmp_path: Path, crash: str) -> None:
    config, tensors, fresh, want = setup
    after_two, after_three = tmp_path / "two", tmp_path / "three"
    train_retrieval(
        fresh(), tensors, config.train, checkpoint_dir=after_two, stop_after_epoch=2
    )
    train_retrieval(
        fresh(), tensors, config.train, checkpoint_dir=after_three, stop_after_epoch=3
    )
    work = tmp_path / "work"
    work.mkdir()
    if crash == "stale_old":  # a crash while the replaced checkpoint was removed
        shutil.copytree(after_three / "checkpoint", work / "checkpoint")
        shutil.copytree(after_two / "checkpoint", work / ".checkpoint.old")
        (work / ".checkpoint.old" / "model.safetensors").unlink()
    elif crash == "between_renames":  # old moved away, new not yet in place
        shutil.copytree(after_two / "checkpoint", work / ".checkpoint.old")
        shutil.copytree(after_three / "checkpoint", work / ".checkpoint.tmp")
    else:  # the new one was being written: no state.json yet
        shutil.copytree(after_two / "checkpoint", work / "checkpoint")
        shutil.copytree(after_three / "checkpoint", work / ".checkpoint.tmp")
        (work / ".checkpoint.tmp" / "state.json").unlink()
    resumed = fresh()
    result = train_retrieval(
        resumed, tensors, config.train, checkpoint_dir=work, resume=True
    )
    assert len(result.history) == 4
    assert _equal(resumed, want), crash
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint"]  # cleaned up


def _train(setup, directory: Path, fingerprint: dict, **options):
    """Train the setup's fresh towers with checkpoints in ``directory``."""
    config, tensors, fresh, _ = setup
    return train_retrieval(
        fresh(),
        tensors,
        config.train,
        checkpoint_dir=directory,
        fingerprint=fingerprint,
        **options,
    )


def test_resume_refuses_a_changed_config_unless_told(setup, tmp_path: Path) -> None:
    fingerprint = {"train.learning_rate": 0.005, "retrieval.embedding_dim": 8}
    _train(setup, tmp_path, fingerprint, stop_after_epoch=1)
    changed = {**fingerprint, "train.learning_rate": 0.1}
    with pytest.raises(ConfigError, match=r"train\.learning_rate differ"):
        _train(setup, tmp_path, changed, resume=True)
    result = _train(setup, tmp_path, changed, resume=True, allow_config_change=True)
    assert len(result.history) == 4


def test_a_setting_added_since_the_checkpoint_resumes(setup, tmp_path: Path) -> None:
    # A config key added in a later version (unset: None) made every older
    # checkpoint "trained with another config: ... differ", naming nothing.
    fingerprint = {"train.learning_rate": 0.005}
    _train(setup, tmp_path, fingerprint, stop_after_epoch=1)
    grown = {**fingerprint, "data.weight_col": None}
    assert len(_train(setup, tmp_path, grown, resume=True).history) == 4


def test_resume_refuses_other_training_rows(setup, tmp_path: Path) -> None:
    # A log edited since the checkpoint, with the same users and items, resumed
    # silently on other rows: only shapes were compared, by load_state_dict.
    from twostage.training.loop import data_digest, resume_fingerprint

    tensors = setup[1]
    settings = {"train": {"learning_rate": 0.005}}
    first = resume_fingerprint(settings, data=data_digest(tensors.users, tensors.items))
    _train(setup, tmp_path, first, stop_after_epoch=1)
    shuffled = tensors.items.roll(1)  # same items, other pairs
    with pytest.raises(ConfigError, match="on other training rows"):
        _train(
            setup,
            tmp_path,
            resume_fingerprint(settings, data=data_digest(tensors.users, shuffled)),
            resume=True,
        )
    same = resume_fingerprint(
        settings, data=data_digest(tensors.users.clone(), tensors.items.clone())
    )
    assert len(_train(setup, tmp_path, same, resume=True).history) == 4
    # A checkpoint written before the digest existed is compared on its config.
    old = tmp_path / "old"
    _train(setup, old, resume_fingerprint(settings), stop_after_epoch=1)
    assert len(_train(setup, old, same, resume=True).history) == 4


#: Random draws within each step (the history's dropout), which a checkpoint
#: written within an epoch must restore for the rest of the epoch.
NOISY = [*SMALL, "retrieval.history_dropout=0.3"]


@pytest.fixture(scope="module")
def noisy(small_training):
    config, tensors, fresh = small_training(NOISY)
    full = fresh()
    losses = [
        r["train_loss"] for r in train_retrieval(full, tensors, config.train).history
    ]
    return config, tensors, fresh, full.state_dict(), losses


def test_a_stop_request_checkpoints_the_step_then_resumes_exactly(
    noisy, tmp_path: Path
) -> None:
    """What the CLI's SIGTERM and first Ctrl-C do: the step in progress is finished
    and checkpointed, the run says so and stops; --resume continues exactly, the
    rest of the epoch drawing what it would have drawn. (They used to finish the
    epoch, which on a log of 10^8 rows is hours.)"""
    config, tensors, fresh, want, losses = noisy

    def stop_soon(info: dict) -> None:
        if info["epoch"] == 1 and info["step"] == 9 + 4:  # 9 steps an epoch
            request_stop()

    with pytest.raises(TrainingInterrupted, match="after step 5 of 9 in epoch 2 of 4"):
        train_retrieval(
            fresh(), tensors, config.train, checkpoint_dir=tmp_path, on_step=stop_soon
        )
    # Written by one process: 2 ranks would each need a row of random states.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "checkpoint", other / "checkpoint")
    state = other / "checkpoint" / "state.json"
    state.write_text(state.read_text().replace('"world": 1', '"world": 2'))
    with pytest.raises(ConfigError, match=r"by 2 rank\(s\).*resume it on 2"):
        train_retrieval(
            fresh(), tensors, config.train, checkpoint_dir=other, resume=True
        )
    resumed, result, first = _resume(noisy, tmp_path)
    assert first == 9 + 5 and len(result.history) == 4
    assert _equal(resumed, want)
    # The epoch's loss counts the steps before the stop too.
    assert [r["train_loss"] for r in result.history] == pytest.approx(losses)
    # A stop request on an epoch's last step ends the epoch, validated.
    with pytest.raises(TrainingInterrupted, match="after epoch 1 of 4"):
        train_retrieval(
            fresh(),
            tensors,
            config.train,
            checkpoint_dir=tmp_path / "end",
            on_step=lambda info: info["step"] == 8 and request_stop(),
        )


@pytest.mark.parametrize(
    ("every", "resumes_at"),
    [
        ({"checkpoint_steps": 3}, 9 + 6),  # the checkpoint of step 6 of epoch 2
        ({"checkpoint_minutes": 1e-9}, 9 + 7),  # one after every step, by the clock
    ],
)
def test_checkpoints_within_an_epoch_lose_at_most_their_steps(
    noisy, tmp_path: Path, every: dict, resumes_at: int
) -> None:
    """train.checkpoint_steps / checkpoint_minutes: a run killed in the middle of
    an epoch resumes from the last checkpoint within it, to the weights of the
    run never killed."""
    config, tensors, fresh, want, _ = noisy

    def crash(info: dict) -> None:
        if info["step"] == 9 + 7:  # trained, not yet checkpointed
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_retrieval(
            fresh(),
            tensors,
            dataclasses.replace(config.train, **every),
            checkpoint_dir=tmp_path,
            on_step=crash,
        )
    resumed, _, first = _resume(noisy, tmp_path)  # without them now
    assert first == resumes_at
    assert _equal(resumed, want)


def _resume(noisy, directory: Path) -> tuple[torch.nn.Module, Any, int]:
    """Fresh towers resumed from ``directory`` (how often to checkpoint is the
    fixture's, which may differ from the stopped run's): them, the result, and
    the first step trained."""
    config, tensors, fresh, _, _ = noisy
    steps: list[int] = []
    resumed = fresh()
    result = train_retrieval(
        resumed,
        tensors,
        config.train,
        checkpoint_dir=directory,
        resume=True,
        on_step=lambda info: steps.append(info["step"]),
    )
    return resumed, result, steps[0]


def test_a_full_disk_keeps_the_previous_checkpoint(
    setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, tensors, fresh, _ = setup
    train_retrieval(
        fresh(), tensors, config.train, checkpoint_dir=tmp_path, stop_after_epoch=1
    )
    real = checkpoint_module.save_file

    def full(tensors: dict, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(ArtifactError, match="disk full"):
        train_retrieval(
            fresh(), tensors, config.train, checkpoint_dir=tmp_path, resume=True
        )
    monkeypatch.setattr(checkpoint_module, "save_file", real)
    result = train_retrieval(
        fresh(), tensors, config.train, checkpoint_dir=tmp_path, resume=True
    )
    assert len(result.history) == 4  # resumed from epoch 1, which was kept
