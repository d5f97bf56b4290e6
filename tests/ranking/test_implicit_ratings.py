"""Implicit feedback: rows whose rating means "no rating" train retrieval, never the
rating head."""

import polars as pl
import pytest

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import RATING
from twostage.data.synthetic import generate
from twostage.ranking import evaluate_ranking
from twostage.two_stage import fit_two_stage

SMALL = [
    "train.epochs=1",
    "train.num_threads=1",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
    "ranking.embedding_dim=8",
    "ranking.hidden_dims=8",
    "ranking.epochs=2",
    "ranking.hard_negative_pool=10",
]


@pytest.fixture(scope="module")
def book_crossing_like():
    """Ratings 1-5, and every third row a 0: "interacted, did not rate"."""
    data = generate(num_users=80, num_items=120, num_interactions=2400)
    inter = data.interactions.with_row_index("row").with_columns(
        pl.when(pl.col("row") % 3 == 0)
        .then(0.0)
        .otherwise(pl.col(RATING))
        .cast(pl.Float32)
        .alias(RATING)
    )
    return data.with_interactions(inter.drop("row"))


def test_unrated_values_are_interactions_without_a_rating(book_crossing_like) -> None:
    data = book_crossing_like
    unrated = data.with_unrated([0])
    assert unrated.num_interactions == data.num_interactions
    assert unrated.interactions[RATING].null_count() == 800
    assert data.with_unrated([]) is data

    config = apply_overrides(ExperimentConfig(), [*SMALL, "data.unrated_values=0"])
    stages = fit_two_stage(config, data)
    assert stages.ranker is not None and stages.ranking_metrics is not None
    assert stages.ranker.rating_bounds[0] >= 1.0  # the zeros were not fitted
    # Retrieval trained on every row, the zeros included.
    assert stages.retrieval.tensors.num_examples == stages.split.train.num_interactions
    rated_test = stages.split.test.interactions[RATING].drop_nulls().len()
    assert 0 < rated_test < stages.split.test.num_interactions

    naive = fit_two_stage(apply_overrides(ExperimentConfig(), SMALL), data)
    assert naive.ranker is not None and naive.ranker.rating_bounds[0] == 0.0
    # On the same test rows' real ratings, the ranker that fitted the zeros as
    # ratings is far off.
    naive_rmse = evaluate_ranking(naive.ranker, stages.split.test)["rmse"]
    assert stages.ranking_metrics["rmse"] < 1.5 < naive_rmse


def test_a_log_without_ratings_trains_a_click_ranker(
    book_crossing_like, caplog: pytest.LogCaptureFixture
) -> None:
    """An implicit log (no rating column) with the default ranking settings ended
    in "should hold ... ratings when rating_weight > 0", after retrieval trained;
    and a ranker whose rating head never trained still answered predicted ratings."""
    from twostage.estimator import TwoStageModel
    from twostage.recommender import Recommender

    data = book_crossing_like.with_interactions(
        book_crossing_like.interactions.drop(RATING)
    )
    served = [*SMALL, "retrieval.popularity_fallback=0"]  # the ranker's path
    with caplog.at_level("WARNING", logger="twostage.ranking"):
        stages = fit_two_stage(apply_overrides(ExperimentConfig(), served), data)
    assert "the ranker learns clicks only" in caplog.text
    ranker = stages.ranker
    assert ranker is not None and ranker.config.rating_weight == 0
    assert not ranker.predicts_ratings
    assert stages.ranking_metrics is not None and "auc" in stages.ranking_metrics
    rec = Recommender(stages.retrieval, ranker=ranker, items=data.items)
    user = data.interactions["user_id"][0]
    answer = rec.recommend(user, 5)
    items = answer.items
    assert answer.path == "personalised"
    assert items and all("predicted_rating" not in item for item in items)
    # With ratings the answers carry them, as before.
    rated = fit_two_stage(
        apply_overrides(ExperimentConfig(), served), book_crossing_like
    )
    assert rated.ranker is not None and rated.ranker.predicts_ratings
    answer = Recommender(rated.retrieval, ranker=rated.ranker).recommend(user, 5)
    assert all("predicted_rating" in item for item in answer.items)
    # predict() gives click probabilities for the implicit model.
    model = TwoStageModel(settings={k: v for k, v in (s.split("=") for s in SMALL)})
    model.fit(data.interactions.select("user_id", "item_id", "timestamp"))
    scores = model.predict([user, user], data.interactions["item_id"][:2].to_list())
    assert ((scores >= 0) & (scores <= 1)).all()


def test_one_rating_for_every_row_is_named(
    book_crossing_like, caplog: pytest.LogCaptureFixture
) -> None:
    """An implicit log written with a rating of 1 on every row: the ranker printed
    RMSE 0.0000 and MAE 0.0000, figures that say nothing, without a word."""
    ones = book_crossing_like.with_interactions(
        book_crossing_like.interactions.with_columns(pl.lit(1.0).alias(RATING))
    )
    with caplog.at_level("WARNING", logger="twostage.ranking"):
        fit_two_stage(apply_overrides(ExperimentConfig(), SMALL), ones)
    assert "every training rating is 1: the rating head has nothing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage.ranking"):
        fit_two_stage(apply_overrides(ExperimentConfig(), SMALL), book_crossing_like)
    assert "every training rating" not in caplog.text


def test_an_epoch_of_few_steps_is_said(
    book_crossing_like, caplog: pytest.LogCaptureFixture
) -> None:
    """About 1,600 training pairs at the default batch of 1,024 are two steps an
    epoch: the ranker may stop early having learned little, and the run says so
    with a batch that gives it more."""
    config = apply_overrides(ExperimentConfig(), [*SMALL, "ranking.epochs=1"])
    with caplog.at_level("WARNING", logger="twostage.ranking"):
        fit_two_stage(config, book_crossing_like, evaluate_test=False)
    assert "the ranker's epoch is 2 step(s)" in caplog.text
    assert "--set ranking.batch_size=" in caplog.text
    caplog.clear()
    smaller = apply_overrides(config, ["ranking.batch_size=64"])
    with caplog.at_level("WARNING", logger="twostage.ranking"):
        fit_two_stage(smaller, book_crossing_like, evaluate_test=False)
    assert "the ranker's epoch" not in caplog.text
