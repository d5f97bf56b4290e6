"""The ranking stage for a user answered from its features (a cold start): the
ranker reads the same features, with the ID at the unknown row and no history,
as evaluation scores a user it never trained on (`RankingRun.with_users`)."""

import polars as pl
import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.recommender import Recommender
from twostage.two_stage import TwoStage, fit_two_stage

CONFIG = [
    "data.dataset=synthetic:num_users=200,num_items=80,num_interactions=4000",
    "train.epochs=2",
    "train.num_threads=1",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.use_side_features=true",
    "ranking.embedding_dim=16",
    "ranking.hidden_dims=16",
    "ranking.epochs=2",
    "ranking.ease_weight=0.5",
    "retrieval.popularity_fallback=0",
]


@pytest.fixture(scope="module")
def stages() -> TwoStage:
    return fit_two_stage(apply_overrides(ExperimentConfig(), CONFIG))


@pytest.fixture(scope="module")
def recommender(stages: TwoStage) -> Recommender:
    return stages.recommender()


def test_a_cold_start_is_ranked_from_its_features(recommender: Recommender) -> None:
    rec = recommender
    ranker = rec.ranker
    assert ranker is not None
    features = {"age": 31, "segment": "s4"}
    answer = rec.recommend(99999, 20, user_features=features)
    assert answer.path == "cold_start_features"
    assert all("rank_score" in i and "predicted_rating" in i for i in answer.items)
    plain = rec.recommend(99999, 20, user_features=features, use_ranker=False)
    assert "rank_score" not in plain.items[0]
    # The same click scores as the evaluation path, which grows the ranker's
    # tables with the user's row (`with_users`).
    users = pl.DataFrame({"user_id": [99999], **{k: [v] for k, v in features.items()}})
    ids = [i["item_id"] for i in answer.items]
    grown, user_idx, added = ranker.with_users(pl.Series("user_id", [99999]), users)
    assert added == 1
    item_idx = torch.tensor([rec.item_vocab.lookup(i) for i in ids])
    expected = grown.score(user_idx, item_idx[None, :])
    query = rec.run.query_embeddings(
        pl.Series("user_id", [99999]), users=users.with_columns(pl.col("user_id"))
    )[0]
    fields = rec._encode_user_features(features, list(features))
    got = ranker.score_user(fields, query, item_idx)
    torch.testing.assert_close(got["click"], expected["click"])
    torch.testing.assert_close(got["rating"], expected["rating"])
    # The order is the two-stage key's, which differs from retrieval's.
    keys = [i["rank_score"] for i in answer.items]
    assert keys == sorted(keys, reverse=True)
    # Users of different features get different ranker scores.
    other = rec.recommend(99999, 20, user_features={"age": 60, "segment": "s9"})
    assert [i["rank_score"] for i in other.items] != keys


def test_a_cold_start_ranks_new_items_too(recommender: Recommender) -> None:
    rec = recommender
    known = [i["item_id"] for i in rec.recommend(3, 3).items]
    new = {"item_id": 9001, "category": "cat3", "price": 20.0, "title": "w1 item"}
    answer = rec.recommend(
        "stranger", 4, user_features={"age": 40}, candidates=[*known, new]
    )
    assert answer.path == "cold_start_features" and len(answer.items) == 4
    assert [i.get("new_item", False) for i in answer.items].count(True) == 1
    assert all("rank_score" in i for i in answer.items)


def test_evaluation_lists_a_new_user_as_serving_does(
    recommender: Recommender,
) -> None:
    """The two-stage figures score a test user the model never saw from the
    test's user table, as serving answers one sent with those features."""
    from twostage.data.dataset import Dataset
    from twostage.ranking.evaluation import evaluated_lists

    rec = recommender
    ranker = rec.ranker
    assert ranker is not None
    users = pl.DataFrame(
        {"user_id": [99001, 99002], "age": [25, 61], "segment": ["s1", "s7"]}
    )
    rows = pl.DataFrame(
        {
            "user_id": [99001, 99002, 3],
            "item_id": [5, 6, 7],
            "timestamp": [1, 2, 3],
            "rating": [4.0, 4.0, 4.0],
        }
    )
    test = Dataset(name="new", interactions=rows, users=users, items=None)
    user_idx, lists = evaluated_lists(ranker, test)
    assert sorted(user_idx.tolist())[:2] == [0, 0]
    for user_id in (99001, 99002, 3):
        features = users.filter(pl.col("user_id") == user_id).drop("user_id")
        given = features.to_dicts()[0] if features.height else None
        answer = rec.recommend(user_id, 20, user_features=given)
        served = [rec.item_vocab.lookup(i["item_id"]) for i in answer.items]
        position = _row_of(rec, user_idx, test, user_id)
        assert lists[position, :20].tolist() == served, user_id


def _row_of(
    rec: Recommender, user_idx: torch.Tensor, test: object, user_id: int
) -> int:
    from twostage.retrieval.evaluation import eval_queries

    queries = eval_queries(rec.run, test)  # type: ignore[arg-type]
    return queries.user_ids.to_list().index(user_id)


def test_the_blend_is_picked_on_the_lists_evaluation_reports(stages: TwoStage) -> None:
    """`pick_blend` measures each weight on the lists `evaluate_ranking` reports
    at that weight: validation users the model never trained on are scored from
    their features there too, not at the unknown user's row."""
    import dataclasses

    from twostage.data.dataset import Dataset
    from twostage.ranking.evaluation import blend_ndcg, evaluate_ranking
    from twostage.ranking.rerank import BLEND_GRID

    ranker = stages.ranker
    assert ranker is not None
    test = stages.split.test
    assert test.users is not None
    # Half the test users come back under IDs the model never saw, with the
    # same features.
    half = test.interactions["user_id"].unique().sort()[::2]
    renamed = test.users.filter(pl.col("user_id").is_in(half.to_list()))
    assert renamed.height == len(half)
    moved = set(renamed["user_id"].to_list())

    def fresh(frame: pl.DataFrame) -> pl.DataFrame:
        col = pl.col("user_id")
        return frame.with_columns(
            pl.when(col.is_in(list(moved))).then(col + 100_000).otherwise(col)
        )

    users = pl.concat([test.users, fresh(renamed)])
    data = Dataset(name="v", interactions=fresh(test.interactions), users=users)
    ndcg = blend_ndcg(ranker, data)
    assert list(ndcg) == list(BLEND_GRID)
    for weight in (0.5, 4.0):
        at = dataclasses.replace(ranker, blend_weight=weight)
        reported = evaluate_ranking(at, data)["two_stage"]["ndcg"]["10"]
        assert ndcg[weight] == pytest.approx(reported, abs=1e-12), weight
    # Read as unknown users instead, the same rows score otherwise.
    bare = dataclasses.replace(data, users=None)
    assert blend_ndcg(ranker, bare) != ndcg


def test_an_anonymous_session_is_re_ranked_from_its_items(
    recommender: Recommender,
) -> None:
    """A session's answer is re-ranked as a known user's is: the ranker reads the
    session as the query's history (no user ID, no features) and the EASE term
    the session's items, where it answered in retrieval's order."""
    from twostage.data.user_items import UserItems
    from twostage.models.fields import HISTORY

    rec = recommender
    ranker = rec.ranker
    assert ranker is not None and ranker.ease is not None
    session = [5, 6, 7]
    answer = rec.recommend(None, 10, session=session)
    assert answer.path == "session"
    keys = [i["rank_score"] for i in answer.items]
    assert keys == sorted(keys, reverse=True)
    plain = rec.recommend(None, 10, session=session, use_ranker=False)
    assert "rank_score" not in plain.items[0]
    # The keys are the ranker's click logit for the session's history, plus the
    # blend of the retrieval logit and the EASE term over the session's items.
    idx = torch.tensor([rec.item_vocab.lookup(i["item_id"]) for i in answer.items])
    items = torch.tensor([rec.item_vocab.lookup(i) for i in session])
    history = torch.zeros(1, rec.run.tensors.history.shape[1], dtype=torch.long)
    history[0, -3:] = items
    query = rec.run.model.encode_queries(
        {
            **{k: v[:1] for k, v in rec.run.tensors.user_features.items()},
            HISTORY: history,
        }
    )[0]
    click = ranker.score_user({HISTORY: history}, query, idx)["click"][0]
    basket = UserItems.from_pairs([0, 0, 0], items.tolist(), num_rows=1)
    ease = ranker.ease_scores(torch.tensor([0]), idx[None, :], rows=basket)
    assert ease is not None and bool((ease != 0).any())  # the session's items
    logits = torch.tensor([i["score"] for i in answer.items])
    logits = logits / float(rec.run.model.temperature)
    expected = click + ranker.blend_weight * logits
    expected = expected + ranker.config.ease_weight * ease[0]
    torch.testing.assert_close(torch.tensor(keys), expected, atol=1e-4, rtol=1e-4)
    # Another session, another history: the ranker scores the same items otherwise.
    other = torch.full_like(history, int(idx[-1]))
    assert not torch.allclose(
        ranker.score_user({HISTORY: other}, query, idx)["click"][0], click
    )
