"""twostage: a two-stage recommender on PyTorch, from raw logs to an HTTP answer.

The estimator answers most needs::

    import twostage

    model = twostage.TwoStageModel(settings={"train.epochs": 5}).fit(train_frame)
    model.recommend([1, 2], k=10)  # (item_ids, scores) arrays
    model.evaluate(test_frame).ndcg[10]

and the lower-level functions are here too::

    config = twostage.apply_overrides(twostage.ExperimentConfig(), ["train.epochs=5"])
    stages = twostage.fit_two_stage(config, twostage.load_dataset("movielens-100k"))
    stages.recommender().save("models/movielens/1")
    twostage.load("models/movielens/1").recommend(42, k=10)
    twostage.tune(config, {"retrieval.temperature": "log:0.05..1"}).config  # tuned

They load on first use, so ``import twostage`` is cheap and the server imports no
training code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twostage._lazy import lazy_exports

if TYPE_CHECKING:
    from twostage.config import (
        ExperimentConfig,
        RankingConfig,
        apply_overrides,
        load_config,
    )
    from twostage.data.dataset import Dataset
    from twostage.data.registry import load_dataset
    from twostage.data.report import LoadReport
    from twostage.data.split import (
        ExperimentSplit,
        leave_last_out,
        prepare_split,
        random_split,
        temporal_split,
    )
    from twostage.data.tables import read_feature_table, read_interactions
    from twostage.errors import TwostageError
    from twostage.estimator import Evaluation, TwoStageModel
    from twostage.ranking.evaluation import evaluate_ranking
    from twostage.ranking.fit import fit_ranking
    from twostage.recommender import Recommender, load
    from twostage.retrieval.evaluation import evaluate_baselines
    from twostage.retrieval.fit import fit_retrieval
    from twostage.retrieval.run import load_run
    from twostage.tuning import TuneResult, tune
    from twostage.two_stage import TwoStage, fit_two_stage

__version__ = "0.1.0"

_EXPORTS = {
    "ExperimentConfig": "twostage.config",
    "RankingConfig": "twostage.config",
    "apply_overrides": "twostage.config",
    "load_config": "twostage.config",
    "Dataset": "twostage.data.dataset",
    "load_dataset": "twostage.data.registry",
    "LoadReport": "twostage.data.report",
    "ExperimentSplit": "twostage.data.split",
    "prepare_split": "twostage.data.split",
    "random_split": "twostage.data.split",
    "temporal_split": "twostage.data.split",
    "leave_last_out": "twostage.data.split",
    "read_interactions": "twostage.data.tables",
    "read_feature_table": "twostage.data.tables",
    "TwoStageModel": "twostage.estimator",
    "Evaluation": "twostage.estimator",
    "TwostageError": "twostage.errors",
    "evaluate_ranking": "twostage.ranking.evaluation",
    "fit_ranking": "twostage.ranking.fit",
    "Recommender": "twostage.recommender",
    "load": "twostage.recommender",
    "evaluate_baselines": "twostage.retrieval.evaluation",
    "fit_retrieval": "twostage.retrieval.fit",
    "load_run": "twostage.retrieval.run",
    "TwoStage": "twostage.two_stage",
    "fit_two_stage": "twostage.two_stage",
    "TuneResult": "twostage.tuning",
    "tune": "twostage.tuning",
}
__all__ = [
    "Dataset",
    "Evaluation",
    "TwoStageModel",
    "leave_last_out",
    "random_split",
    "read_feature_table",
    "read_interactions",
    "temporal_split",
    "ExperimentConfig",
    "ExperimentSplit",
    "LoadReport",
    "RankingConfig",
    "Recommender",
    "TwoStage",
    "TwostageError",
    "__version__",
    "apply_overrides",
    "evaluate_baselines",
    "evaluate_ranking",
    "fit_ranking",
    "fit_retrieval",
    "fit_two_stage",
    "load",
    "load_config",
    "load_dataset",
    "load_run",
    "prepare_split",
    "TuneResult",
    "tune",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
