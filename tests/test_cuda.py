"""The CUDA path: both stages train on the GPU (bf16 included), exact search and
evaluation on the GPU give the CPU's answers. Skipped, with the reason, without CUDA;
``benchmarks/gpu.sh`` runs them on a GPU machine."""

import numpy as np
import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.user_items import UserItems
from twostage.evaluate import evaluate_embeddings
from twostage.index import ExactIndex

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (benchmarks/gpu.sh runs these)",
)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_stages_train_on_the_gpu(precision: str) -> None:
    from twostage.two_stage import fit_two_stage

    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=300,num_items=120,num_interactions=6000",
            "train.epochs=2",
            "train.device=cuda",
            f"train.precision={precision}",
            "ranking.epochs=1",
        ],
    )
    stages = fit_two_stage(config)
    history = stages.retrieval.train_result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert stages.ranking_metrics is not None and stages.ranking_metrics["auc"] > 0.5
    rec = stages.recommender()
    assert len(rec.recommend(rec.user_vocab.values[0], 10).items) == 10


def test_exact_search_on_the_gpu_matches_the_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(20_000, 64, generator=generator))
    queries = torch.nn.functional.normalize(torch.randn(50, 64, generator=generator))
    ids = torch.arange(1, len(items) + 1)
    cpu = ExactIndex(chunk_size=4096).build(items, ids).search(queries, 100)
    gpu = (
        ExactIndex(chunk_size=4096, device="cuda")
        .build(items, ids)
        .search(queries, 100)
    )
    assert torch.equal(gpu[1], cpu[1])
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-5)


def test_evaluation_on_the_gpu_matches_the_cpu() -> None:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(2_000, 32, generator=generator)
    items = torch.randn(5_000, 32, generator=generator)
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(2_000), 3)
    relevant = UserItems.from_pairs(rows, rng.integers(0, 5_000, len(rows)))
    seen = UserItems.from_pairs(rows, rng.integers(0, 5_000, len(rows)))
    cpu = evaluate_embeddings(queries, items, relevant=relevant, seen=seen)
    gpu = evaluate_embeddings(
        queries.cuda(), items.cuda(), relevant=relevant, seen=seen
    )
    for mode, metrics in cpu.metrics.items():
        for name, per_k in metrics.items():
            for k, value in per_k.items():
                assert gpu.metrics[mode][name][k] == pytest.approx(value, abs=1e-6)


def test_the_randomized_factorisation_on_the_gpu_leaves_its_random_stream() -> None:
    from twostage.models.linear_items import leading_svd

    generator = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(600, 600, generator=generator)).Q
    spectrum = 1.0 / (1.0 + torch.arange(600, dtype=torch.float32))
    matrix = (basis * spectrum) @ basis.T  # a decaying spectrum, as EASE's
    state = torch.cuda.get_rng_state()
    gpu = leading_svd(matrix.cuda(), 32, exact_up_to=0)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert gpu[0].device.type == "cuda"
    torch.testing.assert_close(gpu[1].cpu(), spectrum[:32], rtol=0.02, atol=0.0)
