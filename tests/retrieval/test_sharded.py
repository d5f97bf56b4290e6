"""``retrieval.embedding_backend=torchrec``: the ID tables sharded by TorchRec over the
run's ranks (the optional ``torchrec`` package, installed by ``make install-dev``).
The 2-rank run is in tests/training/test_distributed.py."""

import json
import sys
from pathlib import Path

import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.errors import ConfigError
from twostage.models.sharded import ShardedEmbedding
from twostage.retrieval.fit import train_retrieval

SMALL = [
    "train.epochs=3",
    "train.early_stopping_patience=0",
    "train.num_threads=1",
    "train.batch_size=128",
    "train.learning_rate=0.05",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
    "retrieval.history_length=10",
]


@pytest.fixture(scope="module")
def setup(small_training):
    pytest.importorskip("torchrec")
    return small_training([*SMALL, "retrieval.embedding_backend=torchrec"])


def test_one_rank_trains_what_the_fbgemm_kernel_trains(setup) -> None:
    """One rank holds every row: the same kernel and update as the fbgemm backend
    in one process, so the same weights, and plain tables afterwards."""
    config, tensors, fresh = setup
    sharded = fresh()
    swapped: list[int] = []
    result = train_retrieval(
        sharded,
        tensors,
        config.train,
        on_step=lambda _: swapped.append(
            sum(isinstance(m, ShardedEmbedding) for m in sharded.modules())
        ),
    )
    assert swapped[0] >= 3  # user and item IDs, and the categorical fields
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not any(isinstance(m, ShardedEmbedding) for m in sharded.modules())
    fused = fresh()
    fused.config = apply_overrides(
        ExperimentConfig(), [*SMALL, "retrieval.embedding_backend=fbgemm"]
    ).retrieval
    train_retrieval(fused, tensors, config.train)
    before = fresh().state_dict()
    assert sharded.state_dict().keys() == before.keys()
    ids = "query_tower.embeddings.user_id.weight"
    assert not torch.equal(sharded.state_dict()[ids], before[ids])
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(
            sharded.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key
        )


def test_resume_continues_the_shards_exactly(setup, tmp_path: Path) -> None:
    """The checkpoint holds every table whole with its Adagrad accumulators:
    stopping after one epoch and resuming gives the uninterrupted run's weights."""
    config, tensors, fresh = setup
    whole = fresh()
    train_retrieval(whole, tensors, config.train)
    train_retrieval(
        fresh(), tensors, config.train, checkpoint_dir=tmp_path, stop_after_epoch=1
    )
    resumed = fresh()
    train_retrieval(
        resumed, tensors, config.train, checkpoint_dir=tmp_path, resume=True
    )
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_shared_item_table_is_refused(setup) -> None:
    config, tensors, fresh = setup
    model = fresh()
    model.config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "retrieval.embedding_backend=torchrec",
            "retrieval.query_encoder=transformer",
            "retrieval.share_item_embeddings=true",
        ],
    ).retrieval
    with pytest.raises(ConfigError, match="share_item_embeddings=false"):
        train_retrieval(model, tensors, config.train)


def test_without_torchrec_the_error_says_how_to_install(setup, monkeypatch) -> None:
    config, tensors, fresh = setup
    monkeypatch.setitem(sys.modules, "torchrec", None)  # import now fails
    with pytest.raises(ConfigError, match=r"--no-deps torchrec==1\.8\.0"):
        train_retrieval(fresh(), tensors, config.train)


def test_cli_trains_with_torchrec_and_the_run_serves_without_it(
    tmp_path: Path, monkeypatch
) -> None:
    pytest.importorskip("torchrec")
    from typer.testing import CliRunner

    from twostage.cli import app
    from twostage.recommender import load

    result = CliRunner().invoke(
        app,
        [
            *("train", "retrieval", "--dataset"),
            "synthetic:num_users=60,num_items=80,num_interactions=1500",
            *("--out", str(tmp_path / "run")),
            *("--set", "retrieval.embedding_backend=torchrec"),
            *("--set", "train.epochs=2", "--set", "train.batch_size=128"),
            *("--set", "retrieval.embedding_dim=8", "--set", "retrieval.output_dim=8"),
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["retrieval"]["embedding_backend"] == "torchrec"
    monkeypatch.setitem(sys.modules, "torchrec", None)  # serving needs no TorchRec
    answer = load(tmp_path / "run").recommend(user_id="1", k=5)
    assert len(answer.items) == 5
