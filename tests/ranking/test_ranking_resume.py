"""The ranker trains with the shared loop: checkpoints, exact resume, clipping."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twostage.config import ExperimentConfig, RankingConfig, apply_overrides
from twostage.data.split import prepare_split
from twostage.data.synthetic import generate
from twostage.errors import ArtifactError
from twostage.ranking import fit_ranking
from twostage.retrieval.fit import fit_retrieval

RETRIEVAL = [
    "data.validation_fraction=0.1",
    "train.epochs=2",
    "train.batch_size=256",
    "train.num_threads=1",
    "retrieval.use_side_features=false",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.history_length=20",
]
RANKER = RankingConfig(
    embedding_dim=8,
    hidden_dims=(16,),
    hard_negative_pool=20,
    epochs=4,
    batch_size=256,
    early_stopping_patience=0,
    grad_clip=1.0,
    blend_weight=None,
)


@pytest.fixture(scope="module")
def retrieval():
    torch.set_num_threads(1)
    dataset = generate(num_users=150, num_items=80, num_interactions=3000)
    config = apply_overrides(ExperimentConfig(), RETRIEVAL)
    run, _ = fit_retrieval(config, dataset=dataset, evaluate_test=False)
    return run, prepare_split(dataset, config)


def test_killed_ranker_resumes_to_the_same_weights(retrieval, tmp_path: Path) -> None:
    run, split = retrieval
    options = {"config": RANKER, "validation": split.validation}
    full = fit_ranking(run, split.fit, **options)
    fit_ranking(run, split.fit, checkpoint_dir=tmp_path, stop_after_epoch=2, **options)
    resumed = fit_ranking(
        run, split.fit, checkpoint_dir=tmp_path, resume=True, **options
    )
    assert len(resumed.history) == len(full.history) == 4
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [r["train_loss"] for r in resumed.history] == [
        r["train_loss"] for r in full.history
    ]
    assert resumed.blend_weight == full.blend_weight


def test_ranker_resume_without_checkpoint_is_a_clear_error(
    retrieval, tmp_path: Path
) -> None:
    run, split = retrieval
    with pytest.raises(ArtifactError, match="no checkpoint"):
        fit_ranking(run, split.fit, config=RANKER, checkpoint_dir=tmp_path, resume=True)


def test_ranker_clipping_changes_the_updates(retrieval) -> None:
    """`ranking.grad_clip` reaches the loop: a tiny clip norm gives other weights."""
    run, split = retrieval
    one_epoch = dataclasses.replace(RANKER, epochs=1, blend_weight=0.5)
    free = fit_ranking(
        run, split.fit, config=dataclasses.replace(one_epoch, grad_clip=0)
    )
    clipped = fit_ranking(
        run, split.fit, config=dataclasses.replace(one_epoch, grad_clip=1e-4)
    )
    free_state, clipped_state = free.model.state_dict(), clipped.model.state_dict()
    assert any(not torch.equal(free_state[k], clipped_state[k]) for k in free_state)


@pytest.mark.slow
def test_killed_two_stage_run_resumes_the_ranker_exactly(tmp_path: Path) -> None:
    """Kill `twostage train` once the ranker has checkpointed, resume, compare the
    bundle with an uninterrupted run's."""
    args = [sys.executable, "-m", "twostage", "train"]
    args += ["--dataset", "synthetic:num_users=150,num_items=80,num_interactions=3000"]
    for item in [
        *RETRIEVAL,
        "ranking.embedding_dim=8",
        "ranking.hidden_dims=16",
        "ranking.hard_negative_pool=20",
        "ranking.epochs=6",
        "ranking.batch_size=64",
        "ranking.early_stopping_patience=0",
    ]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    work = tmp_path / "work"
    process = subprocess.Popen(
        [*args, "--out", str(tmp_path / "killed" / "1"), "--work-dir", str(work)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = work / "ranking" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 180
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists(), "the ranker never wrote a checkpoint"
    assert json.loads(state.read_text())["next_epoch"] < 6, "killed too late"
    resumed = tmp_path / "resumed" / "1"
    subprocess.run(
        [*args, "--out", str(resumed), "--work-dir", str(work), "--resume"],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    reference = tmp_path / "reference" / "1"
    subprocess.run(
        [*args, "--out", str(reference)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    for name in ("retrieval.safetensors", "ranking/ranking.safetensors"):
        got, want = load_file(resumed / name), load_file(reference / name)
        assert got.keys() == want.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)
