"""The one seam that trains both stages: :func:`fit_two_stage`.

``twostage train``, ``twostage demo`` and the benchmarks call it, so every ranker is
trained the same way: on the rows the retrieval model trained on, validated (early
stopping, the blend weight) on the carve-out that neither stage trained on. Its
streamed twin, :func:`twostage.retrieval.streamed.fit_streamed_two_stage` (``twostage
train --stream``), trains the same way on a log that is never loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage import distributed
from twostage.config import ExperimentConfig
from twostage.config import to_dict as config_dict
from twostage.data.dataset import Dataset
from twostage.data.split import ExperimentSplit
from twostage.ranking.evaluation import evaluate_ranking
from twostage.ranking.fit import fit_ranking
from twostage.ranking.run import RankingRun
from twostage.retrieval.fit import fit_retrieval
from twostage.retrieval.run import RetrievalRun
from twostage.training import ProgressFn

if TYPE_CHECKING:
    import polars as pl

    from twostage.recommender import Recommender

__all__ = ["TwoStage", "fit_two_stage"]


@dataclass
class TwoStage:
    """Both trained stages and the split they were trained and measured on.

    Attributes:
        retrieval: the retrieval run; ``retrieval.metrics`` holds its test metrics.
        ranker: the ranker, or None when the ranking stage was not trained.
        split: ``fit`` (both stages trained on it), ``validation`` (neither did),
            ``test``. From a stream, ``fit`` holds no rows (they stayed in the log),
            only the feature tables.
        ranking_metrics: :func:`twostage.ranking.evaluate_ranking` on the test split
            (None without a ranker or without test evaluation).
        ranking_queries: with ``keep_queries``, each test query's figures of
            each of the ranking report's lists (``two_stage``...), as
            ``evaluate_ranking(..., keep_queries=True)`` returns them; the
            retrieval run's are ``retrieval.test_queries``.
    """

    retrieval: RetrievalRun
    ranker: RankingRun | None
    split: ExperimentSplit
    ranking_metrics: dict[str, Any] | None = None
    ranking_queries: dict[str, Any] | None = None

    def recommender(self, *, items: pl.DataFrame | None = None) -> Recommender:
        """The served object of both stages (item metadata: ``items``, else the
        training data's item table)."""
        from twostage.recommender import Recommender

        if items is None:
            items = self.split.fit.items
        return Recommender(self.retrieval, items=items, ranker=self.ranker)


def fit_two_stage(
    config: ExperimentConfig,
    dataset: Dataset | None = None,
    *,
    split: ExperimentSplit | None = None,
    ranking: bool = True,
    work_dir: str | Path | None = None,
    resume: bool = False,
    evaluate_test: bool = True,
    keep_queries: bool = False,
    on_step: ProgressFn | None = None,
    on_ranking_step: ProgressFn | None = None,
    on_epoch: ProgressFn | None = None,
    on_ranking_epoch: ProgressFn | None = None,
    allow_config_change: bool = False,
    retrieval: tuple[RetrievalRun, ExperimentSplit] | None = None,
    warm_from: Recommender | None = None,
) -> TwoStage:
    """Split, train retrieval, then the ranker on the same split, and evaluate both.

    Args:
        config: every setting, the ``ranking`` section included (saved with each run).
        dataset: the data; loaded from ``config.data`` when None.
        split: the parts to use as they are (``fit``, ``validation``, ``test``)
            instead of splitting ``dataset`` by the config.
        ranking: train the ranking stage too.
        work_dir: checkpoints (and the finished retrieval run) go to
            ``work_dir/retrieval`` and ``work_dir/ranking``.
        resume: continue both stages from the checkpoints in ``work_dir``.
        evaluate_test: measure both stages on the test split.
        keep_queries: keep each test query's figures of both stages' lists too
            (``retrieval.test_queries``, ``ranking_queries``), for paired
            comparisons without measuring the test split again.
        on_step: progress callback of retrieval training; ``on_ranking_step``: of
            ranking training.
        on_epoch: called with each of retrieval's epoch records
            (:func:`~twostage.retrieval.fit.fit_retrieval`); ``on_ranking_epoch``
            with the ranker's (:func:`~twostage.ranking.fit.fit_ranking`).
        allow_config_change: resume although the config differs from the
            checkpoints' (beyond epochs, threads and device).
        retrieval: a retrieval run trained by an earlier call on the same data
            with a config that differs from ``config`` in the ``ranking``
            section at most, and its split: only the ranker trains (what
            tuning the ranker's settings repeats). Its test figures are the
            earlier call's.
        warm_from: a fitted model (both stages) whose weights the new stages
            start from, as ``train.warm_start`` does with a saved one, which it
            replaces (:mod:`twostage.training.warm`).

    Raises:
        ConfigError: ``retrieval`` trained with other settings than ``config``'s.
    """
    work = Path(work_dir) if work_dir is not None else None
    if warm_from is None and config.train.warm_start and retrieval is None:
        from twostage.training.warm import load_warm_start

        # Loaded once for both stages.
        warm_from = load_warm_start(config.train.warm_start)
    if retrieval is not None:
        run, split = retrieval
        _same_retrieval(run.config, config)
        run = dataclasses.replace(run, config=config)  # the ranker reads its own
    else:
        run, split = fit_retrieval(
            config,
            dataset=dataset,
            split=split,
            out_dir=None if work is None else work / "retrieval",
            resume=resume,
            on_step=on_step,
            on_epoch=on_epoch,
            evaluate_test=evaluate_test,
            keep_queries=keep_queries,
            allow_config_change=allow_config_change,
            warm_from=warm_from,
        )
    result = TwoStage(retrieval=run, ranker=None, split=split)
    if not ranking:
        return result
    ranker_dir = None if work is None else work / "ranking"
    result.ranker = fit_ranking(
        run,
        split.fit,
        config=config.ranking,
        validation=split.validation,
        checkpoint_dir=ranker_dir,
        resume=resume
        and ranker_dir is not None
        and (ranker_dir / "checkpoint").exists(),
        on_step=on_ranking_step,
        on_epoch=on_ranking_epoch,
        allow_config_change=allow_config_change,
        warm_from=warm_from,
    )
    if evaluate_test and split.test.num_interactions and distributed.is_main():
        result.ranking_metrics = evaluate_ranking(
            result.ranker, split.test, keep_queries=keep_queries
        )
        if keep_queries:
            result.ranking_queries = result.ranking_metrics.pop("queries")
        result.ranker.metrics = result.ranking_metrics  # saved with the bundle
    return result


def _same_retrieval(trained: ExperimentConfig, config: ExperimentConfig) -> None:
    """Refuses a retrieval run trained with settings other than ``config``'s
    outside its ``ranking`` section."""
    was, now = config_dict(trained), config_dict(config)
    changed = sorted(
        k
        for k in was.keys() | now.keys()
        if k != "ranking" and was.get(k) != now.get(k)
    )
    if changed:
        from twostage.errors import ConfigError

        raise ConfigError(
            "`retrieval` was trained with other settings than `config` outside its "
            f"`ranking` section (the sections {changed} differ); train retrieval "
            "anew for this config."
        )
