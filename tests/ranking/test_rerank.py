"""The one re-rank rule: known answers, the served list equals the evaluated one, and
its EASE term (`ranking.ease_weight`): what it scores, that it moves the list, that it
reloads bit for bit and that its mistakes are named."""

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from twostage.baselines import EASE
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.errors import ArtifactError, ConfigError
from twostage.ranking import fit_ranking
from twostage.ranking.evaluation import evaluated_lists
from twostage.ranking.rerank import rerank
from twostage.recommender import load
from twostage.retrieval.fit import fit_retrieval
from twostage.two_stage import TwoStage, fit_two_stage

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


@pytest.mark.parametrize(
    ("fallback", "ease"), [(0, 0.0), (25, 0.0), (0, 1.0)], ids=["", "fallback", "ease"]
)
def test_served_list_equals_the_evaluated_list(fallback: int, ease: float) -> None:
    """For every known test user, `Recommender.recommend` serves exactly the list
    `evaluate_ranking` scores: same candidates, same re-rank rule (with the EASE
    term when there is one), same order, and the same most-popular list for the
    users the popularity fallback covers."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            f"retrieval.popularity_fallback={fallback}",
            f"ranking.ease_weight={ease}",
        ],
    )
    stages = fit_two_stage(config, evaluate_test=False)
    assert stages.ranker is not None
    recommender = stages.recommender()
    num_candidates = stages.ranker.config.num_candidates
    assert recommender.num_candidates == num_candidates
    assert (stages.ranker.ease is not None) == (ease > 0)
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


@pytest.fixture(scope="module")
def ease_stages() -> TwoStage:
    """Both stages with the EASE term, at full rank (above the catalogue)."""
    extra = ["ranking.ease_weight=2", "ranking.ease_rank=1000"]
    return fit_two_stage(
        apply_overrides(ExperimentConfig(), [*SMALL, *extra]), evaluate_test=False
    )


def test_rerank_adds_the_weighted_ease_term() -> None:
    click = torch.tensor([[0.0, 1.0, 0.5]])
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    ease = torch.tensor([[0.0, 0.0, 2.0]])
    order, keys = rerank(click, logits, blend_weight=0.5, ease=ease, ease_weight=1.0)
    # keys: 1.5, 1.5, 2.5
    assert order.tolist() == [[2, 0, 1]]
    assert keys.tolist() == [[2.5, 1.5, 1.5]]
    same, _ = rerank(click, logits, blend_weight=0.5, ease=ease, ease_weight=0.0)
    assert same.tolist() == rerank(click, logits, blend_weight=0.5)[0].tolist()


def test_full_rank_term_is_ease_over_its_spread(ease_stages: TwoStage) -> None:
    """At full rank each user's term is their EASE score over all of their seen
    items, divided by its spread over the catalogue, up to a constant per user."""
    ranker = ease_stages.ranker
    assert ranker is not None and ranker.ease is not None
    seen = ranker.tensors.seen()
    num_items = ranker.tensors.num_items
    ease = EASE(l2=500.0).fit(seen, num_items=num_items)
    assert ease.weights is not None
    users = torch.arange(1, 60)
    rows = seen.take(users.numpy())
    x = torch.zeros(len(users), num_items)
    x[torch.from_numpy(rows.row_ids()), torch.from_numpy(rows.indices)] = 1.0
    want = (x @ ease.weights)[:, 1:]  # (U, N) @ (N, N), the OOV column dropped
    want = want / want.std(dim=1, unbiased=False, keepdim=True)
    items = torch.arange(1, num_items).expand(len(users), -1)
    got = ranker.ease_scores(users, items)
    assert got is not None
    shift = got - want
    torch.testing.assert_close(
        shift, shift.mean(dim=1, keepdim=True).expand_as(shift), atol=2e-4, rtol=0
    )
    # the unknown user has no items: a zero term
    zero = ranker.ease_scores(torch.tensor([0]), items[:1])
    assert zero is not None and not zero.any()


def test_the_term_moves_the_served_list(ease_stages: TwoStage) -> None:
    """The same ranker without the term serves other lists: the term is applied."""
    ranker = ease_stages.ranker
    assert ranker is not None
    recommender = ease_stages.recommender()
    users = ease_stages.split.test.interactions["user_id"].unique().to_list()[:40]
    with_term = [recommender.recommend(u, k=10).to_dict()["items"] for u in users]
    ease, ranker.ease = ranker.ease, None
    try:
        without = [recommender.recommend(u, k=10).to_dict()["items"] for u in users]
    finally:
        ranker.ease = ease
    assert sum(a != b for a, b in zip(with_term, without, strict=True)) > 10


def test_the_term_reloads_bit_for_bit(ease_stages: TwoStage, tmp_path: Path) -> None:
    recommender = ease_stages.recommender()
    root = tmp_path / "models" / "ease" / "1"
    recommender.save(root)
    again = load(root)
    assert again.ranker is not None and ease_stages.ranker is not None
    for name, value in ease_stages.ranker.ease.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(again.ranker.ease.state_dict()[name], value), name  # type: ignore[union-attr]
    users = ease_stages.split.test.interactions["user_id"].unique().to_list()[:20]
    for user in users:
        assert again.recommend(user, k=10) == recommender.recommend(user, k=10)
    missing = next(root.rglob("ranking_ease.safetensors"))
    missing.unlink()
    with pytest.raises(ArtifactError, match=r"ranking_ease\.safetensors"):
        load(root)


def test_ease_term_mistakes_are_named() -> None:
    with pytest.raises(ConfigError, match="ease_weight` should be 0"):
        apply_overrides(ExperimentConfig(), ["ranking.ease_weight=-1"])
    with pytest.raises(ConfigError, match="ease_l2` should be positive"):
        apply_overrides(ExperimentConfig(), ["ranking.ease_l2=0"])
    with pytest.raises(ConfigError, match="ease_rank` should be a positive"):
        apply_overrides(ExperimentConfig(), ["ranking.ease_rank=0"])
    # a catalogue EASE cannot hold is refused before the ranker trains
    # (a random split keeps about 76% of these once-seen items in the ranker's rows:
    # some 53,000, above EASE's 50,000)
    items = np.arange(70_000)
    frame = pl.DataFrame({"user_id": items % 500, "item_id": items, "timestamp": items})
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.split=random",
            "train.max_steps=1",
            "train.num_threads=1",
            "retrieval.use_side_features=false",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "ranking.ease_weight=1",
            "ranking.rating_weight=0",  # the log has no ratings
        ],
    )
    data = Dataset("wide", frame)
    run, split = fit_retrieval(config, dataset=data, evaluate_test=False)
    with pytest.raises(ConfigError, match=r"ranking\.ease_weight=0"):
        fit_ranking(run, split.fit, validation=split.validation)
