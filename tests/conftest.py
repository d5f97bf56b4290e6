"""Shared fixtures: one small trained recommender saved as a servable bundle, and the
untrained tables and towers of a small synthetic log."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.split import prepare_split
from twostage.data.synthetic import generate
from twostage.features import FeatureSpec
from twostage.recommender import Recommender
from twostage.retrieval.fit import fit_retrieval
from twostage.retrieval.run import build_model
from twostage.retrieval.tensors import build_tensors

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


@pytest.fixture(scope="session")
def small_training() -> Callable[[list[str]], tuple[Any, Any, Callable[[], Any]]]:
    """Builds ``(config, tensors, fresh)`` for config overrides: the training tables
    of 1,500 synthetic interactions (80 users, 60 items) and ``fresh()``, which makes
    the same untrained towers every time (seed 7)."""

    def build(overrides: list[str]) -> tuple[Any, Any, Callable[[], Any]]:
        config = apply_overrides(ExperimentConfig(), overrides)
        dataset = generate(num_users=80, num_items=60, num_interactions=1500)
        train = prepare_split(dataset, config).fit
        spec = FeatureSpec.default_for(train).fit(train)
        tensors = build_tensors(spec, train, config.retrieval)

        def fresh() -> torch.nn.Module:
            torch.manual_seed(7)
            return build_model(spec, config.retrieval)

        return config, tensors, fresh

    return build
