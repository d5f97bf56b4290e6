"""Serving imports no training code: loading and querying a bundle stays in the
packages a server needs."""

import json
import subprocess
import sys
from pathlib import Path

from twostage.config import ExperimentConfig, apply_overrides
from twostage.two_stage import fit_two_stage

#: Modules that fit models, compute losses, evaluate, or download data.
TRAINING_ONLY = (
    "twostage.baselines",
    "twostage.data.download",
    "twostage.data.movielens",
    "twostage.data.synthetic",
    "twostage.data.tables",
    "twostage.evaluate",
    "twostage.losses",
    "twostage.ranking.evaluation",
    "twostage.ranking.fit",
    "twostage.retrieval.evaluation",
    "twostage.retrieval.fit",
    "twostage.retrieval.task",
    "twostage.training.checkpoint",
    "twostage.training.loop",
    "twostage.training.optim",
    "twostage.two_stage",
)

SCRIPT = """
import json, sys
import twostage.serving.app
from twostage.recommender import load
recommender = load(sys.argv[1])
user = recommender.user_vocab.values[0]
assert recommender.ranker is not None
assert recommender.recommend(user, k=5).items
print(json.dumps(sorted(m for m in sys.modules if m.startswith("twostage"))))
"""


def test_server_and_bundle_load_import_no_training_code(tmp_path: Path) -> None:
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=120,num_interactions=1200",
            "train.epochs=1",
            "train.num_threads=1",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.epochs=1",
            "ranking.hard_negative_pool=10",
        ],
    )
    bundle = (
        fit_two_stage(config, evaluate_test=False).recommender().save(tmp_path / "1")
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.splitlines()[-1]))
    assert "twostage.ranking.saved" in loaded  # the ranker was really loaded
    assert not loaded & set(TRAINING_ONLY), sorted(loaded & set(TRAINING_ONLY))
