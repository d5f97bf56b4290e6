"""Mixed precision: train.precision=bf16 runs the forward pass under autocast."""

import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.two_stage import fit_two_stage


def _config(extra: list[str]) -> ExperimentConfig:
    return apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=150,num_items=90,num_interactions=3000",
            "train.epochs=2",
            "train.num_threads=1",
            "retrieval.embedding_dim=16",
            "retrieval.output_dim=16",
            *extra,
        ],
    )


def test_bf16_autocast_trains_both_stages_on_cpu() -> None:
    """train.precision=bf16: the forward pass under autocast (the GPU setting) still
    learns; the weights stay float32."""
    config = _config(["train.precision=bf16", "ranking.epochs=2"])
    stages = fit_two_stage(config)
    history = stages.retrieval.train_result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in stages.retrieval.model.parameters())
    assert stages.ranker is not None and stages.ranking_metrics["auc"] > 0.5
