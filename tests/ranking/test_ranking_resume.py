"""The ranker trains with the shared loop: checkpoints, exact resume, clipping."""

import dataclasses
from pathlib import Path

import pytest
import torch

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
