"""The ranking stage: config, training data, training, evaluation, save/load.

The ranker re-scores the retrieval stage's candidates. It learns two objectives from
the training log, weighted by :class:`~twostage.config.RankingConfig` (the ``ranking``
section of the experiment config):

* ``rating``: mean squared error on the explicit ratings of the training pairs;
* ``click``: binary cross-entropy of observed pairs (label 1) against negatives
  (label 0): hard ones drawn from the retrieval model's top ``hard_negative_pool``
  unseen items of the user, and uniform ones. A draw that is a training pair of the
  user, or the OOV item, is masked out of the loss.

During training the user's history leaves out the target item (as in retrieval
training), so a training pair looks like a test pair: a candidate outside the history.
A narrow hard-negative pool hurts on a random split: the retrieval model's best unseen
items are where the held-out positives are, so the ranker learns to push them down.

Two-stage lists retrieve the top ``num_candidates`` items per user (training items
excluded), then order them by the one rule in :mod:`twostage.ranking.rerank`;
``blend_weight=None`` picks the weight on the validation carve-out. ``ease_weight``
> 0 adds an EASE term to that rule: the user's standardised EASE score of each
candidate, fitted in closed form on the ranker's rows (the item-to-item signal; on
MovieLens-100k's random split it lifts the served list above EASE's own). Pass the retrieval
run's own carve-out as ``validation`` (:func:`twostage.two_stage.fit_two_stage` does):
neither stage trained on it, so neither stage's scores are inflated there.

Modules: :mod:`~twostage.ranking.run` (the trained ranker and inference),
:mod:`~twostage.ranking.rerank`, :mod:`~twostage.ranking.fit`,
:mod:`~twostage.ranking.evaluation`, :mod:`~twostage.ranking.saved`. Names load on
first use: loading a saved ranker imports no fitting code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twostage._lazy import lazy_exports

if TYPE_CHECKING:
    from twostage.config import KS, RankingConfig
    from twostage.ranking.evaluation import auc, evaluate_ranking, mae, rmse
    from twostage.ranking.fit import fit_ranking
    from twostage.ranking.rerank import BLEND_GRID, rerank
    from twostage.ranking.run import RankingRun, build_ranking_model
    from twostage.ranking.saved import load_ranking, save_ranking

_EXPORTS = {
    "BLEND_GRID": "twostage.ranking.rerank",
    "KS": "twostage.config",
    "RankingConfig": "twostage.config",
    "RankingRun": "twostage.ranking.run",
    "auc": "twostage.ranking.evaluation",
    "build_ranking_model": "twostage.ranking.run",
    "evaluate_ranking": "twostage.ranking.evaluation",
    "fit_ranking": "twostage.ranking.fit",
    "load_ranking": "twostage.ranking.saved",
    "mae": "twostage.ranking.evaluation",
    "rerank": "twostage.ranking.rerank",
    "rmse": "twostage.ranking.evaluation",
    "save_ranking": "twostage.ranking.saved",
}
__all__ = [
    "BLEND_GRID",
    "KS",
    "RankingConfig",
    "RankingRun",
    "auc",
    "build_ranking_model",
    "evaluate_ranking",
    "fit_ranking",
    "load_ranking",
    "mae",
    "rerank",
    "rmse",
    "save_ranking",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
