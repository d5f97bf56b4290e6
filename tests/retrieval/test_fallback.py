"""The most-popular fallback for users with few interactions."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.book_crossing import write_book_crossing
from twostage.data.dataset import Dataset
from twostage.data.split import ExperimentSplit
from twostage.data.user_items import UserItems
from twostage.recommender import Recommender, load
from twostage.retrieval.fallback import choose_popularity_fallback
from twostage.retrieval.fit import fit_retrieval
from twostage.retrieval.run import spec_for
from twostage.retrieval.tensors import build_tensors, with_history_of
from twostage.two_stage import fit_two_stage


def test_threshold_is_picked_where_popularity_wins() -> None:
    """20 items; item 1 is the most popular, item 5 among the least. Users 0-1 (one
    training item) want item 1, and their queries rank it last; users 2-3 (five
    training items) want item 5, and their queries rank it first. Popularity serves
    0-1, the model 2-3: threshold 1."""
    items = torch.eye(20)
    probs = torch.full((20,), 0.03)
    probs[0], probs[1], probs[5] = 0.0, 0.5, 0.001
    queries = torch.stack([-items[1], -items[1], items[5], items[5]])
    relevant = UserItems.from_pairs([0, 1, 2, 3], [1, 1, 5, 5], num_rows=4)
    seen = UserItems.from_pairs([0, 1, 2, 3], [2, 2, 4, 4], num_rows=4)
    choice = choose_popularity_fallback(
        queries,
        items,
        probs,
        relevant=relevant,
        seen=seen,
        num_train_items=np.array([1, 1, 5, 5]),
    )
    assert choice.max_interactions == 1
    assert choice.model == pytest.approx(0.5)  # users 2-3 hit at rank 1
    assert choice.popularity == pytest.approx(0.5)  # users 0-1 hit at rank 1
    assert choice.combined == pytest.approx(1.0)
    # The log line reads as a sentence, figures to 4 places.
    assert str(choice) == (
        "most-popular for users with at most 1 training items (validation NDCG@10 "
        "over 4 users: model 0.5000, most-popular 0.5000, the rule 1.0000)"
    )
    # When the model wins everywhere, nobody falls back.
    queries = torch.stack([items[1], items[1], items[5], items[5]])
    choice = choose_popularity_fallback(
        queries,
        items,
        probs,
        relevant=relevant,
        seen=seen,
        num_train_items=np.array([1, 1, 5, 5]),
    )
    assert choice.max_interactions == 0
    assert str(choice).startswith("most-popular for nobody (")


@pytest.mark.slow
def test_sparse_log_serves_popularity_to_the_least_active(tmp_path) -> None:
    """On a Book-Crossing-layout log the rule is picked, evaluated, saved and served."""
    log = write_book_crossing(tmp_path / "Preprocessed_data.csv", num_rows=6000)
    config = apply_overrides(
        ExperimentConfig(),
        [
            f"data.dataset=book-crossing:{log}",
            "data.unrated_values=0",
            "data.validation_fraction=0.1",
            "train.epochs=4",
            "train.num_threads=1",
            "retrieval.embedding_dim=16",
            "retrieval.output_dim=16",
        ],
    )
    stages = fit_two_stage(config, ranking=False)
    run = stages.retrieval
    assert run.fallback is not None
    picked = run.popularity_fallback
    validation = run.fallback["validation_ndcg_10"]
    assert validation["with_fallback"] >= validation["model"]
    rec = stages.recommender()
    rec.save(tmp_path / "models" / "books" / "1")
    loaded = load(tmp_path / "models" / "books")
    assert loaded.run.popularity_fallback == picked
    counts = run.tensors.seen().lengths()
    users = loaded.user_vocab.values.to_list()
    for index, user in enumerate(users[:200], start=1):
        expected = "popularity" if 0 < counts[index] <= picked else "personalised"
        assert loaded.recommend(user, k=5).path == expected, (user, counts[index])
    if picked:
        slice_ = run.metrics["slices"]["popularity_fallback_users"]
        assert slice_["counts"]["exclude_seen"]["num_queries"] > 0


def test_a_recent_popularity_fallback_serves_what_is_popular_at_the_end(
    tmp_path: Path,
) -> None:
    # Item 1 was the hit long ago; items 2 and 3 are what everyone meets lately.
    day = 86_400
    rows = [(u, 1, 0) for u in range(40)]
    rows += [(u, 2 + u % 2, 100 * day + u) for u in range(40, 70)]
    rows += [(u, 4 + u % 5, 50 * day) for u in range(70)]
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    dataset = Dataset("hits", frame)
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.validation_fraction=0",
            "retrieval.popularity_fallback=1",
            "retrieval.popularity_days=30",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "train.epochs=1",
            "train.num_threads=1",
        ],
    )
    run, _ = fit_retrieval(config, split=ExperimentSplit(dataset, None, dataset))
    recommender = Recommender(run)
    answer = recommender.recommend("new-user", 3)
    assert answer.path == "popularity"
    assert {item["item_id"] for item in answer.items[:2]} == {2, 3}
    # the list reloads with the run, and all-time popularity puts the old hit first
    recommender.save(tmp_path / "bundle")
    assert load(tmp_path / "bundle").recommend("new-user", 3).items == answer.items
    all_time = apply_overrides(config, ["retrieval.popularity_days=0"])
    old, _ = fit_retrieval(all_time, split=ExperimentSplit(dataset, None, dataset))
    assert Recommender(old).recommend("new-user", 1).items[0]["item_id"] == 1


def test_the_recent_list_counts_rows_of_users_the_model_does_not_know() -> None:
    # Regression: the served tables dropped the validation rows of new users from
    # the count, and under a temporal split those are most of the recent rows.
    day = 86_400
    fit = pl.DataFrame(
        [(u, 1 + u % 3, u) for u in range(30)],
        schema=["user_id", "item_id", "timestamp"],
        orient="row",
    )
    newcomers = pl.DataFrame(
        [(100 + u, 3, 60 * day) for u in range(10)],
        schema=["user_id", "item_id", "timestamp"],
        orient="row",
    )
    config = apply_overrides(ExperimentConfig(), ["retrieval.popularity_days=30"])
    spec = spec_for(Dataset("fit", fit), config).fit(Dataset("fit", fit))
    tensors = build_tensors(spec, Dataset("fit", fit), config.retrieval)
    served = with_history_of(
        tensors, spec, Dataset("all", pl.concat([fit, newcomers])), config.retrieval
    )
    item_3 = int(spec.vocabulary("item_id").transform(pl.Series([3]))[0])
    assert int(served.fallback_popularity.argmax()) == item_3
