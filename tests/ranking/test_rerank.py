"""The one re-rank rule: known answers, and the served list equals the evaluated one."""

import math

import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import ITEM, USER
from twostage.ranking.evaluation import evaluated_lists
from twostage.ranking.rerank import rerank
from twostage.two_stage import fit_two_stage

SMALL = [
    "data.dataset=synthetic:num_users=120,num_items=150,num_interactions=3000",
    "data.validation_fraction=0.1",
    "train.epochs=2",
    "train.batch_size=256",
    "train.num_threads=1",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.history_length=20",
    "ranking.embedding_dim=8",
    "ranking.hidden_dims=16",
    "ranking.epochs=2",
    "ranking.hard_negative_pool=20",
]


def test_rerank_orders_by_click_plus_blended_logit() -> None:
    click = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 4.0]])
    order, keys = rerank(click, logits, blend_weight=0.5)
    # keys: [1.5, 1.5, 0.5] (a tie keeps retrieval order) and [2.0, 0.5, 2.0]
    assert order.tolist() == [[0, 1, 2], [0, 2, 1]]
    assert keys.tolist() == [[1.5, 1.5, 0.5], [2.0, 2.0, 0.5]]
    # blend weight 0: the ranker alone decides
    order, _ = rerank(click, logits, blend_weight=0.0)
    assert order.tolist() == [[1, 2, 0], [0, 1, 2]]
    # an empty slot goes last, whatever its scores
    valid = torch.tensor([[False, True, True], [True, True, True]])
    order, keys = rerank(click, logits, blend_weight=0.5, valid=valid)
    assert order[0].tolist() == [1, 2, 0] and keys[0, 2] == -math.inf


@pytest.mark.parametrize("fallback", [0, 25])
def test_served_list_equals_the_evaluated_list(fallback: int) -> None:
    """For every known test user, `Recommender.recommend` serves exactly the list
    `evaluate_ranking` scores: same candidates, same re-rank rule, same order, and
    the same most-popular list for the users the popularity fallback covers."""
    config = apply_overrides(
        ExperimentConfig(), [*SMALL, f"retrieval.popularity_fallback={fallback}"]
    )
    stages = fit_two_stage(config, evaluate_test=False)
    assert stages.ranker is not None
    recommender = stages.recommender()
    num_candidates = stages.ranker.config.num_candidates
    assert recommender.num_candidates == num_candidates
    user_idx, lists = evaluated_lists(stages.ranker, stages.split.test)
    users = stages.retrieval.spec.vocabulary(USER)
    items = stages.retrieval.spec.vocabulary(ITEM)
    known = user_idx > 0
    assert known.sum() > 50
    popular = stages.retrieval.uses_popularity(user_idx.numpy())
    assert popular.any() == (fallback > 0)
    for index, ranked in zip(user_idx[known], lists[known], strict=True):
        evaluated = items.inverse_transform(ranked[ranked >= 0].numpy()).to_list()
        user_id = users.inverse_transform(index.reshape(1).numpy())[0]
        served = recommender.recommend(user_id, k=num_candidates)
        covered = popular[user_idx.numpy().tolist().index(int(index))]
        assert served.path == ("popularity" if covered else "personalised")
        assert [entry[ITEM] for entry in served.items] == evaluated, user_id
