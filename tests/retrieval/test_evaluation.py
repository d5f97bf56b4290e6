"""Retrieval evaluation against a naive reference, cold test items included."""

import copy
import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import ITEM, USER
from twostage.errors import ConfigError
from twostage.retrieval.evaluation import eval_queries, evaluate_baselines
from twostage.retrieval.fit import fit_retrieval

SMALL = [
    "data.dataset=synthetic:num_users=60,num_items=80,num_interactions=1500",
    "data.validation_fraction=0",
    "train.epochs=1",
    "train.num_threads=1",
    "retrieval.use_side_features=false",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
]


@pytest.fixture(scope="module")
def run_and_test():
    run, split = fit_retrieval(
        apply_overrides(ExperimentConfig(), SMALL), evaluate_test=False
    )
    test = split.test.interactions
    # Three users each get test items that no training row has: two distinct cold
    # items for the first user (one of them twice), one for the others.
    users = test[USER].unique().sort()[:3].to_list()
    cold_ids = [10_001, 10_002, 10_002, 10_003, 10_004]
    cold = pl.DataFrame(
        {USER: [users[0], users[0], users[0], users[1], users[2]], ITEM: cold_ids}
    ).with_columns(
        pl.col(USER).cast(test[USER].dtype), pl.col(ITEM).cast(test[ITEM].dtype)
    )
    extra = test.head(len(cold)).with_columns(cold[USER], cold[ITEM])
    return run, split.test.with_interactions(pl.concat([test, extra]))


def _naive(run, test, k: int) -> dict[str, float]:
    """Per-user recall/NDCG@k and per-pair FTopK@k (seen excluded), in plain Python."""
    inter = test.interactions
    users = inter[USER].unique().sort()
    queries = run.query_embeddings(users, users=test.users)
    items = run.item_embeddings()
    vocab = run.spec.vocabulary(ITEM)
    seen = run.tensors.seen()
    recall, ndcg, hits_total, pairs = [], [], 0, 0
    for row, user in enumerate(users.to_list()):
        relevant = set(inter.filter(pl.col(USER) == user)[ITEM].to_list())
        user_idx = int(run.spec.vocabulary(USER).lookup(user))
        seen_idx = set(seen.row(user_idx).tolist()) if user_idx else set()
        seen_ids = set(vocab.inverse_transform(np.array(sorted(seen_idx))).to_list())
        relevant -= seen_ids
        if not relevant:
            continue
        scores = (items @ queries[row]).tolist()
        ranked = [
            i
            for i in sorted(range(1, len(scores)), key=lambda i: -scores[i])
            if i not in seen_idx
        ][:k]
        top = vocab.inverse_transform(np.array(ranked)).to_list()
        hits = [item in relevant for item in top]
        recall.append(sum(hits) / len(relevant))
        dcg = sum(1 / np.log2(r + 2) for r, h in enumerate(hits) if h)
        idcg = sum(1 / np.log2(r + 2) for r in range(min(len(relevant), k)))
        ndcg.append(dcg / idcg)
        hits_total += sum(hits)
        pairs += len(relevant)
    return {
        "recall": float(np.mean(recall)),
        "ndcg": float(np.mean(ndcg)),
        "ftopk": hits_total / pairs,
        "pairs": pairs,
    }


def test_cold_test_items_each_count_as_a_miss(run_and_test) -> None:
    """Regression: every test item unseen in training mapped to the OOV row, so a
    user's cold items collapsed into one relevant entry and recall was inflated."""
    run, test = run_and_test
    queries = eval_queries(run, test)
    vocab = run.spec.vocabulary(ITEM)
    inter = test.interactions
    unknown = inter.filter(pl.Series(vocab.transform(inter[ITEM]) == 0))
    cold_pairs = unknown.select(USER, ITEM).unique().height
    assert {10_001, 10_002, 10_003, 10_004} <= set(unknown[ITEM].to_list())
    assert queries.num_cold_items == unknown[ITEM].n_unique()
    assert queries.num_items == vocab.size + queries.num_cold_items
    assert not queries.valid_items[vocab.size :].any()
    got = run.evaluate(test, ks=(10,)).to_dict()
    want = _naive(run, test, 10)
    metrics = got["metrics"]["exclude_seen"]
    assert metrics["recall"]["10"] == pytest.approx(want["recall"], abs=1e-9)
    assert metrics["ndcg"]["10"] == pytest.approx(want["ndcg"], abs=1e-9)
    assert metrics["factorized_top_k"]["10"] == pytest.approx(want["ftopk"], abs=1e-9)
    assert got["counts"]["exclude_seen"]["num_test_interactions"] == want["pairs"]
    # The cold-item slice holds every distinct (user, cold item) pair, none ever hit.
    cold = got["slices"]["cold_items"]
    assert cold["counts"]["include_seen"]["num_test_interactions"] == cold_pairs
    assert cold["metrics"]["include_seen"]["recall"]["10"] == 0.0


def test_baselines_see_the_same_cold_items(run_and_test) -> None:
    run, test = run_and_test
    ours = run.evaluate(test, ks=(10,)).to_dict()["counts"]
    for name, result in evaluate_baselines(run, test, ks=(10,)).items():
        assert result.to_dict()["counts"] == ours, name


def test_unknown_or_unavailable_baselines_are_named(run_and_test) -> None:
    # An unknown name gave an empty table, as if there were nothing to compare.
    run, test = run_and_test
    with pytest.raises(ConfigError, match=r"unknown baselines \['eease'\]"):
        evaluate_baselines(run, test, names=("eease",))
    assert list(evaluate_baselines(run, test, names=("popularity",), ks=(10,))) == [
        "popularity"
    ]
    short = copy.copy(run)  # one recent item a user: nothing to order
    short.tensors = dataclasses.replace(
        run.tensors, history=run.tensors.history[:, -1:]
    )
    with pytest.raises(ConfigError, match="pass `train=`"):
        evaluate_baselines(short, test, names=("session-knn",))


def test_transition_baseline_reads_the_log_not_the_runs_window() -> None:
    run, split = fit_retrieval(
        apply_overrides(ExperimentConfig(), [*SMALL, "retrieval.history_length=50"]),
        evaluate_test=False,
    )
    short = copy.copy(run)
    short.tensors = dataclasses.replace(
        run.tensors, history=run.tensors.history[:, -2:]
    )

    def transition(r, **kwargs):
        return evaluate_baselines(r, split.test, names=("transition",), **kwargs)[
            "transition"
        ].to_dict()["metrics"]

    with_log = transition(run, train=split.train)
    assert transition(short, train=split.train) == with_log
    # Without the log it falls back to each run's recent items, which differ here.
    assert transition(short) != transition(run)


def test_prior_rows_are_each_query_s_history_in_time_order(run_and_test) -> None:
    """``PriorHistory``: a query's user's prior rows of items the model knows,
    oldest first (ties in row order), padded on the left to the tables' layout;
    without a time column, in row order."""
    from twostage.retrieval.tensors import PriorHistory

    run, _ = run_and_test
    vocab = run.spec.vocabulary(ITEM)
    known = vocab.values[1:5].to_list()
    users = pl.Series(USER, [9_001, 9_002, 9_003], dtype=vocab.values.dtype)
    prior = pl.DataFrame(
        {
            USER: [9_001, 9_001, 9_002, 9_001, 9_001],
            ITEM: [known[0], known[1], known[2], 10**9, known[3]],
            "timestamp": [5, 3, 1, 4, 3],
        }
    ).with_columns(pl.col(USER, ITEM).cast(vocab.values.dtype))
    history = PriorHistory.of(run.spec, users, prior)
    assert history.lengths().tolist() == [3, 1, 0]  # the unknown item left out
    items, times = history.padded(np.arange(3), 4)
    index = [vocab.lookup(i) for i in known]
    assert items.tolist() == [
        [0, index[1], index[3], index[0]],  # times 3, 3 (row order), 5
        [0, 0, 0, index[2]],
        [0, 0, 0, 0],
    ]
    assert times[0].tolist() == [0, 3, 3, 5]
    assert history.padded(np.array([0]), 2)[0].tolist() == [[index[3], index[0]]]
    assert history.padded(np.array([1, 0]))[0].shape == (2, 3)  # the longest row
    assert history.seen().row(0).tolist() == sorted([index[0], index[1], index[3]])
    only = PriorHistory.of(run.spec, users, prior, reads=np.array([False, True, True]))
    assert only.lengths().tolist() == [0, 1, 0]
    untimed = PriorHistory.of(run.spec, users, prior.drop("timestamp"))
    assert untimed.padded(np.array([0]))[0].tolist() == [[index[0], index[1], index[3]]]


def test_recent_popularity_is_left_out_of_a_log_without_times(
    run_and_test, caplog
) -> None:
    """Its "last 30 days" of a log without a time column were 2.6 million rows of
    file order, shown as recent popularity."""
    run, test = run_and_test
    rows = test  # any rows of known items stand for the training log here
    timed = evaluate_baselines(
        run, test, names=("recent-popularity",), train=rows, ks=(10,)
    )
    assert list(timed) == ["recent-popularity"]
    untimed = dataclasses.replace(rows, has_time=False)
    with caplog.at_level("WARNING"):
        left = evaluate_baselines(
            run, test, names=("recent-popularity", "popularity"), train=untimed
        )
    assert list(left) == ["popularity"]
    assert "skipping baseline recent-popularity" in caplog.text
    assert "no time column" in caplog.text


def test_users_new_to_the_run_get_its_most_popular_list_from_every_baseline(
    run_and_test,
) -> None:
    """A new test user scored zeros everywhere (a list in catalogue order), and
    the training rows of users the run does not know were one user's, index 0:
    under a temporal split session-kNN served every new test user the neighbours
    of that pooled sequence (NDCG@10 0.4303 on latest-small; 0.3964 now)."""
    run, test = run_and_test
    rows = test.interactions
    user = rows[USER].dtype
    newcomer = rows.head(40).with_columns(pl.lit(10**6, user).alias(USER))
    unseen = rows.slice(40, 40).with_columns(pl.lit(10**6 + 1, user).alias(USER))
    new_test = test.with_interactions(newcomer)
    train = test.with_interactions(pl.concat([rows, unseen]))
    served = copy.copy(run)
    served.popularity_fallback = 10**9  # everyone gets the fallback's list
    want = served.evaluate(new_test, ks=(10,)).to_dict()["metrics"]["exclude_seen"]
    got = evaluate_baselines(run, new_test, train=train, ks=(10,))
    for name in ("ease", "itemknn", "transition", "session-knn", "ease-recency"):
        figures = got[name].to_dict()["metrics"]["exclude_seen"]
        for metric in ("ndcg", "recall", "hit_rate"):
            assert figures[metric]["10"] == pytest.approx(want[metric]["10"]), name
    assert want["ndcg"]["10"] > 0


def test_the_session_knn_baseline_samples_latest_active_users_on_a_large_log(
    monkeypatch, caplog
) -> None:
    """From `EXACT_TERM_USERS` users on, the baseline's candidate neighbours are
    the `SCALE_SAMPLE` latest active users sharing an item (said in the log), as
    V-SKNN samples; below it, every user, as before."""
    from twostage.baselines import SessionKNN
    from twostage.models import session_knn
    from twostage.retrieval.evaluation import baseline_makers

    run, split = fit_retrieval(
        apply_overrides(ExperimentConfig(), SMALL), evaluate_test=False
    )
    train = split.train

    def figures() -> dict:
        got = evaluate_baselines(
            run, split.test, names=("session-knn",), train=train, ks=(10,)
        )
        return got["session-knn"].to_dict()["metrics"]["exclude_seen"]

    exact = figures()
    assert baseline_makers(run, train)["session-knn"]().sample == 0
    monkeypatch.setattr(session_knn, "SCALE_SAMPLE", 2)
    monkeypatch.setattr(session_knn, "EXACT_TERM_USERS", run.spec.vocabulary(USER).size)
    with caplog.at_level("INFO", logger="twostage.retrieval.evaluation"):
        sampled = figures()
    assert "2 latest active users" in caplog.text
    assert sampled != exact
    fitted = baseline_makers(run, train)["session-knn"]()
    rows = train.interactions
    by_hand = SessionKNN(sample=2).fit_log(
        run.spec.vocabulary(USER).transform(rows[USER]),
        run.spec.vocabulary(ITEM).transform(rows[ITEM]),
        rows["timestamp"].to_numpy(),
        num_users=run.spec.vocabulary(USER).size,
        num_items=run.spec.vocabulary(ITEM).size,
    )
    users = torch.arange(1, run.spec.vocabulary(USER).size)
    assert fitted.score(users).equal(by_hand.score(users))


def test_training_keeps_the_test_queries_figures_it_measured_when_asked() -> None:
    """The demo and the quality benchmark measured the test split a second time
    to keep each user's figures; training keeps them from its own measurement."""
    from twostage.ranking import evaluate_ranking
    from twostage.two_stage import fit_two_stage

    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "data.validation_fraction=0.1",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.epochs=1",
            "ranking.hard_negative_pool=10",
        ],
    )
    stages = fit_two_stage(config, keep_queries=True)
    run = stages.retrieval
    assert run.test_queries is not None and stages.ranking_queries is not None
    ours = run.test_queries["exclude_seen"]
    again = run.evaluate(stages.split.test, keep_queries=True)
    assert run.metrics == again.to_dict()  # the figures measured as before
    np.testing.assert_array_equal(ours.rows, again.queries["exclude_seen"].rows)
    np.testing.assert_array_equal(ours.values, again.queries["exclude_seen"].values)
    assert float(np.nanmean(ours.of("ndcg", 10))) == pytest.approx(
        run.metrics["metrics"]["exclude_seen"]["ndcg"]["10"], rel=1e-5
    )
    # The ranker's lists: its report as saved (no queries in it), its figures kept.
    assert stages.ranking_metrics is not None and stages.ranker is not None
    assert "queries" not in stages.ranking_metrics
    lists = evaluate_ranking(stages.ranker, stages.split.test, keep_queries=True)
    for name, figures in lists.pop("queries").items():
        np.testing.assert_array_equal(
            stages.ranking_queries[name].values, figures.values
        )
    assert lists["two_stage"] == stages.ranking_metrics["two_stage"]
    # Not asked: nothing kept.
    plain = fit_two_stage(config)
    assert plain.retrieval.test_queries is None and plain.ranking_queries is None
    assert plain.retrieval.metrics == run.metrics
