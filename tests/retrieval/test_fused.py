"""``retrieval.embedding_backend=fbgemm`` and ``torchrec``: the ID tables train in
fbgemm's kernel, alone or sharded by TorchRec (one rank here; two in
tests/training/test_distributed.py). The optional packages are installed by ``make
install-dev``; each backend's tests are skipped without its package."""

import json
import sys
from pathlib import Path

import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.split import prepare_split
from twostage.data.synthetic import generate
from twostage.errors import ConfigError
from twostage.features import FeatureSpec
from twostage.models.fused import FusedEmbedding, SelfUpdatingTable
from twostage.models.sharded import ShardedEmbedding
from twostage.retrieval.fit import train_retrieval
from twostage.retrieval.run import build_model
from twostage.retrieval.tensors import build_tensors

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
#: backend -> the module its import needs (nulled to test the install message) and
#: the message's install line.
BACKENDS = {
    "fbgemm": ("fbgemm_gpu", r"twostage\[fbgemm\]"),
    "torchrec": ("torchrec", r"--no-deps torchrec==1\.8\.0"),
}


def _backend(name: str) -> list[str]:
    pytest.importorskip(BACKENDS[name][0])
    return [*SMALL, f"retrieval.embedding_backend={name}"]


def test_one_step_is_exact_rowwise_adagrad() -> None:
    pytest.importorskip("fbgemm_gpu")
    start = torch.randn(5, 4)
    table = FusedEmbedding(start, learning_rate=0.1, eps=1e-8)
    target = torch.randn(3, 4)
    ids = torch.tensor([1, 1, 3])  # row 1 twice: its gradients add up
    (table(ids) * target).sum().backward()
    grads = {1: target[0] + target[1], 3: target[2]}
    want = start.clone()
    for row, grad in grads.items():
        accumulator = (grad**2).mean()
        want[row] -= 0.1 * grad / (accumulator.sqrt() + 1e-8)
        assert float(table.accumulator[row]) == pytest.approx(float(accumulator))
    torch.testing.assert_close(table.weight, want, rtol=1e-5, atol=1e-6)
    assert float(table.accumulator[0]) == 0.0  # untouched rows keep no state


@pytest.fixture(scope="module", params=list(BACKENDS))
def setup(request, small_training):
    return small_training(_backend(request.param))


def test_training_leaves_plain_tables_that_moved(setup) -> None:
    config, tensors, fresh = setup
    before = fresh()
    model = fresh()
    result = train_retrieval(model, tensors, config.train)
    assert len(result.history) == 3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not any(isinstance(m, SelfUpdatingTable) for m in model.modules())
    assert model.state_dict().keys() == before.state_dict().keys()
    user_ids = "query_tower.embeddings.user_id.weight"
    assert not torch.equal(model.state_dict()[user_ids], before.state_dict()[user_ids])
    # The swap is the same model a torch-backend run builds: a reload needs neither
    # fbgemm nor TorchRec.
    reloaded = fresh()
    reloaded.load_state_dict(model.state_dict())
    assert all(
        torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_an_id_only_model_trains_with_no_other_optimiser(setup, optimizer) -> None:
    """Every table of an ID-only model is fused: no optimiser has anything left."""
    config, _, _ = setup
    overrides = [
        *_backend(config.retrieval.embedding_backend),
        "retrieval.use_side_features=false",
        "retrieval.history_length=0",
        f"train.optimizer={optimizer}",
    ]
    config = apply_overrides(ExperimentConfig(), overrides)
    dataset = generate(num_users=80, num_items=60, num_interactions=1500)
    train = prepare_split(dataset, config).fit
    spec = FeatureSpec.default_for(train).fit(train)
    tensors = build_tensors(spec, train, config.retrieval)
    model = build_model(spec, config.retrieval)
    result = train_retrieval(model, tensors, config.train)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_resume_continues_the_kernels_state_exactly(setup, tmp_path: Path) -> None:
    """The checkpoint holds the kernel's tables and Adagrad accumulators (a sharded
    table's whole, gathered from the ranks): stopping after one epoch and resuming
    gives the uninterrupted run's weights."""
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


def test_without_the_package_the_error_says_how_to_install(setup, monkeypatch) -> None:
    config, tensors, fresh = setup
    module, install = BACKENDS[config.retrieval.embedding_backend]
    monkeypatch.setitem(sys.modules, module, None)  # import now fails
    with pytest.raises(ConfigError, match=install):
        train_retrieval(fresh(), tensors, config.train)


def test_a_shared_item_table_is_refused(setup) -> None:
    """The history would keep reading the plain table the swap leaves behind."""
    config, tensors, fresh = setup
    model = fresh()
    model.config = apply_overrides(
        ExperimentConfig(),
        [
            *_backend(config.retrieval.embedding_backend),
            "retrieval.query_encoder=transformer",
            "retrieval.share_item_embeddings=true",
        ],
    ).retrieval
    with pytest.raises(ConfigError, match="share_item_embeddings=false"):
        train_retrieval(model, tensors, config.train)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_cli_trains_with_the_backend_and_the_run_serves_without_it(
    backend: str, tmp_path: Path, monkeypatch
) -> None:
    module = BACKENDS[backend][0]
    pytest.importorskip(module)
    from typer.testing import CliRunner

    from twostage.cli import app
    from twostage.recommender import load

    result = CliRunner().invoke(
        app,
        [
            *("train", "retrieval", "--dataset"),
            "synthetic:num_users=60,num_items=80,num_interactions=1500",
            *("--out", str(tmp_path / "run")),
            *("--set", f"retrieval.embedding_backend={backend}"),
            *("--set", "train.epochs=2", "--set", "train.batch_size=128"),
            *("--set", "retrieval.embedding_dim=8", "--set", "retrieval.output_dim=8"),
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["retrieval"]["embedding_backend"] == backend
    monkeypatch.setitem(sys.modules, module, None)  # serving needs neither package
    answer = load(tmp_path / "run").recommend(user_id="1", k=5)
    assert len(answer.items) == 5


def test_one_rank_trains_what_the_fbgemm_kernel_trains(small_training) -> None:
    """One rank holds every row: the same kernel and update as the fbgemm backend
    in one process, so the same weights, and plain tables afterwards."""
    pytest.importorskip("torchrec")
    config, tensors, fresh = small_training(
        [*SMALL, "retrieval.embedding_backend=torchrec"]
    )
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


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_a_feature_named_with_a_dot_trains_saves_and_serves(
    backend: str, tmp_path: Path
) -> None:
    """torch names no submodule with a "." in it: a column such as
    `details.Brand` (a nested JSON key) ended training in a KeyError."""
    if backend in BACKENDS:
        pytest.importorskip(BACKENDS[backend][0])
    import polars as pl
    from safetensors import safe_open
    from typer.testing import CliRunner

    from twostage.cli import app
    from twostage.recommender import load

    data = generate(num_users=60, num_items=80, num_interactions=1500).interactions
    log = tmp_path / "log.csv"
    data.select("user_id", "item_id", "rating").with_columns(
        ("b" + (pl.col("item_id").cast(pl.Int64) % 7).cast(pl.String)).alias(
            "details.Brand"
        ),
        ("c%" + (pl.col("item_id").cast(pl.Int64) % 3).cast(pl.String)).alias("a%2Eb"),
    ).write_csv(log)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            *("train", "--dataset", str(log), "--out", str(run)),
            *("--item-features", "details.Brand,a%2Eb"),
            *("--set", f"retrieval.embedding_backend={backend}"),
            *("--set", "train.epochs=1", "--set", "ranking.epochs=1"),
            *("--set", "retrieval.embedding_dim=8", "--set", "retrieval.output_dim=8"),
        ],
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(run / "retrieval.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    # Two names that escaping could make one stay apart.
    assert "candidate_tower.embeddings.details%2EBrand.weight" in keys
    assert "candidate_tower.embeddings.a%252Eb.weight" in keys
    answer = load(run).recommend(user_id=str(data["user_id"][0]), k=5)
    assert len(answer.items) == 5
