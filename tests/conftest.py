"""Shared fixtures: one small trained recommender saved as a servable bundle."""

from pathlib import Path

import pytest

from twostage.config import ExperimentConfig, apply_overrides
from twostage.recommender import Recommender
from twostage.retrieval.fit import fit_retrieval

SMALL_MODEL = [
    "data.dataset=synthetic:num_users=200,num_items=80,num_interactions=4000",
    "train.epochs=2",
    "train.num_threads=1",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.history_length=10",
    # These fixtures test the model's paths (cold start included), not the
    # sparse-log fallback, which a 2-epoch model on 4,000 rows would trigger.
    "retrieval.popularity_fallback=0",
]


@pytest.fixture(scope="module")
def small_recommender() -> Recommender:
    """A recommender trained for two epochs on 4,000 synthetic interactions."""
    run, split = fit_retrieval(apply_overrides(ExperimentConfig(), SMALL_MODEL))
    return Recommender(run, items=split.train.items)


@pytest.fixture
def models_dir(small_recommender: Recommender, tmp_path: Path) -> Path:
    """``models/`` with one model, ``synthetic``, at version 1."""
    small_recommender.save(tmp_path / "models" / "synthetic" / "1")
    return tmp_path / "models"
