"""The ranking stage: config, training data, training loop, evaluation, save/load.

The ranker re-scores the retrieval stage's candidates. It learns two objectives from
the training log, weighted by :class:`RankingConfig`:

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
excluded), then order them by ``click logit + blend_weight * retrieval logit`` (cosine
over the retrieval temperature); ``blend_weight=None`` picks the weight on the
validation carve-out. Pass the retrieval run's own carve-out (see
:func:`twostage.prepare.prepare_split`) as ``validation``: neither stage trained on
it, so neither stage's scores are inflated there.
"""

from twostage.ranking.evaluation import auc, evaluate_ranking, mae, rmse
from twostage.ranking.fit import fit_ranking
from twostage.ranking.run import (
    BLEND_GRID,
    KS,
    RankingConfig,
    RankingRun,
    build_ranking_model,
)
from twostage.ranking.saved import load_ranking, save_ranking

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
    "rmse",
    "save_ranking",
]
