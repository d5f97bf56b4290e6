"""Lists for many sessions at once (`Recommender.recommend_sessions`, `twostage
recommend --sessions`): each session answered as `recommend(session=...)` answers
it, and every row the model cannot read counted with its reason and row."""

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.split import ExperimentSplit
from twostage.errors import ConfigError
from twostage.recommender import Recommender
from twostage.retrieval.fit import fit_retrieval
from twostage.session_batch import _batched_lists
from twostage.session_evaluation import evaluate_sessions
from twostage.two_stage import fit_two_stage

RATED = [
    "data.dataset=synthetic:num_users=60,num_items=40,num_interactions=900",
    "data.split=leave-last-out",
    "retrieval.query_encoder=transformer",
    "retrieval.examples=sequences",
    "retrieval.negatives=full",
    "retrieval.sequence_ratings=true",
    "retrieval.sequence_time_gaps=true",
    "retrieval.history_length=8",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
    "retrieval.popularity_fallback=0",
    "train.epochs=1",
    "train.num_threads=1",
]


@pytest.fixture(scope="module")
def rated_split() -> tuple[Recommender, ExperimentSplit]:
    """A transformer that reads a session's times and ratings (1 to 5), and the
    split it trained on."""
    run, split = fit_retrieval(apply_overrides(ExperimentConfig(), RATED))
    return Recommender(run, items=split.train.items), split


@pytest.fixture(scope="module")
def rated(rated_split: tuple[Recommender, ExperimentSplit]) -> Recommender:
    return rated_split[0]


@pytest.fixture(scope="module")
def with_neighbours() -> Recommender:
    """The same with the session-kNN term: every item scored exactly."""
    config = apply_overrides(
        ExperimentConfig(), [*RATED, "retrieval.session_knn_weight=0.05"]
    )
    run, split = fit_retrieval(config)
    assert run.scores_exactly
    return Recommender(run, items=split.train.items)


@pytest.fixture(scope="module")
def ranked() -> Recommender:
    """The transformer with a ranking stage that reads the history, the
    retrieval query and an EASE term (blend 1)."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            *RATED,
            "ranking.epochs=1",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.hard_negative_pool=20",
            "ranking.ease_weight=0.5",
            "ranking.blend_weight=1.0",
        ],
    )
    return fit_two_stage(config, evaluate_test=False).recommender()


def _items(answer: object) -> list[int]:
    return [item["item_id"] for item in answer.items]  # type: ignore[attr-defined]


def test_each_session_gets_the_list_recommend_gives_it(rated: Recommender) -> None:
    table = pl.DataFrame(
        {
            "session_id": ["b", "a", "b", "a", "c", "b"],
            "item_id": [3, 5, 7, 9, 11, 2],
            # session b's rows are read in time order: 2 (row 6) comes first
            "timestamp": [200, 10, 300, 20, None, 100],
            "rating": [4.0, 5.0, None, 1.0, 2.0, 3.0],
        }
    )
    found = rated.recommend_sessions(table, 5)
    assert found.unread.height == 0 and found.num_sessions == 3
    assert found.lists["session_id"].unique(maintain_order=True).to_list() == [
        "b",
        "a",
        "c",
    ]
    expected = {
        "b": [
            {"item_id": 3, "timestamp": 200, "rating": 4.0},
            {"item_id": 7, "timestamp": 300},
            {"item_id": 2, "timestamp": 100, "rating": 3.0},
        ],
        "a": [
            {"item_id": 5, "timestamp": 10, "rating": 5.0},
            {"item_id": 9, "timestamp": 20, "rating": 1.0},
        ],
        "c": [{"item_id": 11, "rating": 2.0}],
    }
    for session, entries in expected.items():
        mine = found.lists.filter(pl.col("session_id") == session)
        answer = rated.recommend(None, 5, session=entries)
        assert mine["item_id"].to_list() == _items(answer), session
        assert mine["rank"].to_list() == [1, 2, 3, 4, 5]
        assert set(mine["path"]) == {"session"}
        scores = [item["score"] for item in answer.items]
        assert mine["score"].to_list() == pytest.approx(scores, rel=1e-6)
    # A session of a known user follows that user's history.
    user = rated.user_vocab.values[0]
    mine = rated.recommend_sessions(
        pl.DataFrame({"session_id": [1], "item_id": [5], "user_id": [user]}), 4
    ).lists
    known = rated.recommend(user, 4, session=[5])
    assert mine["item_id"].to_list() == _items(known)
    assert mine["path"].to_list() == ["personalised"] * 4
    # Times as a Date or Datetime column (Parquet's, pandas') are their seconds
    # since 1970, naive ones as UTC: they were "should hold numbers".
    moments = table.with_columns(
        pl.from_epoch(pl.col("timestamp"), time_unit="s").alias("timestamp")
    )
    assert moments["timestamp"].dtype == pl.Datetime("us")
    same = rated.recommend_sessions(moments, 5).lists
    assert same.equals(found.lists)
    aware = moments.with_columns(pl.col("timestamp").dt.replace_time_zone("UTC"))
    assert rated.recommend_sessions(aware, 5).lists.equals(found.lists)
    days = table.with_columns(
        pl.from_epoch(pl.col("timestamp") * 86_400, time_unit="s").dt.date()
    )
    assert rated.recommend_sessions(days, 5).lists.height == found.lists.height
    clock = table.with_columns(
        pl.from_epoch(pl.col("timestamp"), time_unit="s").dt.time()
    )
    with pytest.raises(ConfigError, match="should hold moments"):
        rated.recommend_sessions(clock, 5)


def test_rows_the_model_cannot_read_are_counted_with_their_reasons(
    rated: Recommender,
) -> None:
    table = pl.DataFrame(
        {
            "session_id": ["a", "a", None, "b", "b", "c", "c", "d"],
            "item_id": [5, 99999, 7, 9, None, 11, 12, 99999],
            "timestamp": [1.0, 2.0, 3.0, 4.0, 5.0, float("inf"), 7.0, 8.0],
            "rating": [5.0, 4.0, 3.0, 10.0, 2.0, 2.0, float("nan"), 1.0],
        }
    )
    found = rated.recommend_sessions(table, 3)
    assert found.unread.to_dicts() == [
        {
            "row": 2,
            "session_id": "a",
            "item_id": 99999,
            "reason": "item not known to the model",
        },
        {"row": 3, "session_id": None, "item_id": 7, "reason": "no session_id"},
        {
            "row": 4,
            "session_id": "b",
            "item_id": 9,
            "reason": "rating outside the training ratings, 1 to 5",
        },
        {"row": 5, "session_id": "b", "item_id": None, "reason": "no item_id"},
        {
            "row": 6,
            "session_id": "c",
            "item_id": 11,
            "reason": "timestamp is not a finite number of seconds",
        },
        {
            "row": 7,
            "session_id": "c",
            "item_id": 12,
            "reason": "rating is not a finite number",
        },
        {
            "row": 8,
            "session_id": "d",
            "item_id": 99999,
            "reason": "item not known to the model",
        },
    ]
    lists = found.lists
    # a: its readable row; b, c, d: no row read, answered as an empty session is
    assert lists.filter(pl.col("session_id") == "a")["item_id"].to_list() == _items(
        rated.recommend(
            None, 3, session=[{"item_id": 5, "timestamp": 1, "rating": 5.0}]
        )
    )
    for session in ("b", "c", "d"):
        mine = lists.filter(pl.col("session_id") == session)
        assert mine["path"].to_list() == ["popularity"] * 3
        assert mine["item_id"].to_list() == _items(rated.recommend(None, 3))


def test_an_item_added_after_training_is_seen_and_reported(
    small_recommender: Recommender,
) -> None:
    grown = small_recommender.add_items(
        pl.DataFrame(
            {"item_id": [901], "title": ["new"], "category": ["cat1"], "price": [9.5]}
        )
    )
    found = grown.recommend_sessions(
        pl.DataFrame({"session_id": [7, 7], "item_id": [901, 3]}), 80
    )
    assert found.unread.to_dicts() == [
        {
            "row": 1,
            "session_id": 7,
            "item_id": 901,
            "reason": "added after training: seen, not read",
        }
    ]
    listed = found.lists["item_id"].to_list()
    assert 901 not in listed and 3 not in listed  # both seen
    assert listed == _items(grown.recommend(None, 80, session=[901, 3]))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pl.DataFrame({"item_id": [1]}), "it lacks ['session_id']"),
        (
            pl.DataFrame({"session_id": [1], "item_id": [1], "when": [3]}),
            "it has ['when'], which nothing reads",
        ),
        (
            pl.DataFrame({"session_id": [1], "item_id": [1], "timestamp": ["noon"]}),
            "'timestamp' column should hold numbers",
        ),
        (
            pl.DataFrame({"session_id": [1], "item_id": [1.0]}),
            "'item_id' column should hold IDs",
        ),
        (
            pl.DataFrame({"session_id": [1, 1], "item_id": [1, 2], "user_id": [3, 4]}),
            "session 1 has rows of two users, 3 and 4 (row 2)",
        ),
    ],
)
def test_a_table_the_model_cannot_read_is_refused(
    rated: Recommender, table: pl.DataFrame, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        rated.recommend_sessions(table, 3)


def test_k_is_checked_before_any_list(rated: Recommender) -> None:
    empty = pl.DataFrame(
        {"session_id": [], "item_id": []},
        schema={"session_id": pl.Int64, "item_id": pl.Int64},
    )
    with pytest.raises(ConfigError, match="`k` should be a positive integer"):
        rated.recommend_sessions(empty, 0)
    assert rated.recommend_sessions(empty, 3).lists.height == 0


def test_a_model_without_history_refuses_sessions_before_any_list() -> None:
    run, _ = fit_retrieval(
        apply_overrides(
            ExperimentConfig(),
            [
                "data.dataset=synthetic:num_users=40,num_items=30,num_interactions=400",
                "retrieval.history_length=0",
                "train.epochs=1",
            ],
        )
    )
    table = pl.DataFrame({"session_id": [1, 1], "item_id": [3, 4]})
    with pytest.raises(ConfigError, match="reads no history"):
        Recommender(run).recommend_sessions(table, 3)


def test_ratings_for_a_model_that_reads_none_are_refused(
    small_recommender: Recommender,
) -> None:
    table = pl.DataFrame({"session_id": [1], "item_id": [3], "rating": [4.0]})
    with pytest.raises(ConfigError, match="does not read"):
        small_recommender.recommend_sessions(table, 3)


def test_the_cli_writes_every_sessions_list_and_reports_the_rows_not_read(
    rated: Recommender, tmp_path: Path
) -> None:
    rated.save(tmp_path / "bundle")
    path = tmp_path / "sessions.csv"
    path.write_text(
        "session_id,item_id,timestamp,rating\n"
        # an ISO 8601 time is its seconds (20 here), as over HTTP
        "s1,5,10,5\ns1,9,1970-01-01T00:00:20Z,1\ns2,99999,5,\n,7,,\ns3,0012,,\n"
    )
    runner = CliRunner()
    out = tmp_path / "lists.parquet"
    done = runner.invoke(
        app,
        [
            *("recommend", str(tmp_path / "bundle"), "--sessions", str(path)),
            *("--out", str(out), "-k", "4", "--json"),
        ],
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["sessions"] == 3 and summary["rows"] == 12
    assert summary["unread_rows"] == 2
    assert summary["unread_reasons"] == {
        "item not known to the model": 1,
        "no session_id": 1,
    }
    assert [u["row"] for u in summary["unread"]] == [3, 4]  # the file's data rows
    written = pl.read_parquet(out)
    expected = rated.recommend_sessions(
        pl.DataFrame(
            {
                "session_id": ["s1", "s1", "s2", "s3"],
                "item_id": [5, 9, 99999, 12],  # 0012 as the CLI reads an ID
                "timestamp": [10, 20, 5, None],
                "rating": [5.0, 1.0, None, None],
            }
        ),
        4,
    ).lists
    assert written["item_id"].to_list() == expected["item_id"].to_list()
    assert written["session_id"].to_list() == expected["session_id"].to_list()
    # The console says how many rows were not read, and why.
    shown = runner.invoke(
        app,
        [
            *("recommend", str(tmp_path / "bundle"), "--sessions", str(path)),
            *("--out", str(out), "-k", "4", "--overwrite"),
        ],
    )
    said = " ".join(shown.output.split())
    assert shown.exit_code == 0, said
    assert "12 rows for 3 sessions (lists by path: session 2, popularity 1)" in said
    assert "2 rows of --sessions were not read" in said
    # the IDs as the file holds them: text, since 0012 is not written plainly
    assert "data row 3 ('s2', item '99999'): item not known to the model" in said


@pytest.mark.parametrize(
    ("extra", "contents", "message"),
    [
        (["--users", "u.csv"], None, "give --sessions FILE or --users FILE"),
        (["--session", "5"], None, "--session shapes one request"),
        (["--explain"], None, "--explain shapes one request"),
        (
            [],
            "session_id,item_id,timestamp\na,5,noon\n",
            "have a timestamp that is not a number of seconds or an ISO 8601 "
            "date-time (data rows [1]",
        ),
        ([], "item_id\n5\n", "has no session_id column"),
    ],
)
def test_the_cli_names_a_sessions_mistake(
    rated: Recommender,
    tmp_path: Path,
    extra: list[str],
    contents: str | None,
    message: str,
) -> None:
    rated.save(tmp_path / "bundle")
    path = tmp_path / "sessions.csv"
    path.write_text(contents or "session_id,item_id\na,5\n")
    (tmp_path / "u.csv").write_text("user_id\n1\n")
    done = CliRunner().invoke(
        app,
        [
            *("recommend", str(tmp_path / "bundle"), "--sessions", str(path)),
            *("--out", str(tmp_path / "lists.csv"), *extra),
        ],
        catch_exceptions=False,
    )
    said = " ".join(done.output.replace("│", " ").split())
    assert done.exit_code == 2, said
    assert message in said, said
    assert not (tmp_path / "lists.csv").exists()


def test_a_bad_k_is_the_requests_mistake_not_the_files(
    rated: Recommender, tmp_path: Path
) -> None:
    rated.save(tmp_path / "bundle")
    path = tmp_path / "sessions.csv"
    path.write_text("session_id,item_id\na,5\n")
    done = CliRunner().invoke(
        app,
        [
            *("recommend", str(tmp_path / "bundle"), "--sessions", str(path)),
            *("--out", str(tmp_path / "lists.csv"), "-k", "0"),
        ],
    )
    # main() names it `-k` (CliRunner calls the app beneath it)
    assert isinstance(done.exception, ConfigError), done.output
    assert str(done.exception).startswith("`k` should be a positive integer")
    assert not (tmp_path / "lists.csv").exists()


def _reference(rec: Recommender, sessions: dict[Any, list[dict[str, Any]]], k: int):
    """HR@k, NDCG@k and MRR@k of `recommend` on each session's earlier items,
    its last held out, the plain way, and whether each session's list held it."""
    hits, gains, ranks = [], [], []
    for entries in sessions.values():
        *query, target = entries
        listed = _items(rec.recommend(None, k, session=query))
        rank = listed.index(target["item_id"]) + 1 if target["item_id"] in listed else 0
        hits.append(rank > 0)
        gains.append(1 / math.log2(rank + 1) if rank else 0.0)
        ranks.append(1 / rank if rank else 0.0)
    means = (sum(hits) / len(hits), sum(gains) / len(gains), sum(ranks) / len(ranks))
    return (*means, hits)


def test_held_out_session_items_are_measured_as_recommend_lists_them(
    rated: Recommender,
) -> None:
    table = pl.DataFrame(
        {
            "session_id": [1, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5, 5],
            "item_id": [3, 5, 7, 9, 11, 13, 15, 17, 99999, 2, 4, 6],
            # session 5 is read in time order: its last item is 2 (time 30)
            "timestamp": [1, 2, 3, 4, 5, 6, 7, 8, 9, 30, 10, 20],
        }
    )
    found = evaluate_sessions(rated, table, ks=(5, 20))
    assert found["sessions"] == 4  # session 3 has one item: nothing to predict from
    assert found["single_item_sessions"] == 1
    assert found["unknown_targets"] == 1  # session 4's held-out item: a miss
    # Each session in reading order, with its times (the model reads their gaps).
    held = {
        session: [
            {"item_id": item, "timestamp": time}
            for item, time in rows.sort("timestamp")
            .select("item_id", "timestamp")
            .rows()
        ]
        for (session,), rows in table.group_by("session_id", maintain_order=True)
        if rows.height > 1
    }
    assert [e["item_id"] for e in held[5]] == [4, 6, 2]
    for k in (5, 20):
        hr, ndcg, mrr, ours = _reference(rated, held, k)
        assert found["twostage"]["hit_rate"][k] == pytest.approx(hr)
        assert found["twostage"]["recall"][k] == pytest.approx(hr)
        assert found["twostage"]["ndcg"][k] == pytest.approx(ndcg)
        assert found["twostage"]["mrr"][k] == pytest.approx(mrr)
        # one held-out item a session: a hit rate's standard error is binomial
        n = found["sessions"]
        assert found["standard_errors"]["twostage"]["hit_rate"][k] == pytest.approx(
            math.sqrt(hr * (1 - hr) / (n - 1))
        )
    # The popularity row: the fallback's list, each session's earlier items out.
    popular = _items(rated.recommend(None, 30))
    hits = []
    for entries in held.values():
        *query, target = entries
        seen = {e["item_id"] for e in query}
        hits.append(target["item_id"] in [i for i in popular if i not in seen][:20])
    assert found["popularity"]["hit_rate"][20] == pytest.approx(sum(hits) / len(hits))
    # The model against its fallback, paired over the same sessions: the spread
    # of the per-session differences.
    differences = np.array(ours, float) - np.array(hits, float)
    assert found["paired_standard_errors"]["popularity"]["hit_rate"][
        20
    ] == pytest.approx(differences.std(ddof=1) / math.sqrt(len(differences)))


def test_the_cli_measures_held_out_session_items(
    rated: Recommender, tmp_path: Path
) -> None:
    rated.save(tmp_path / "bundle")
    path = tmp_path / "sessions.csv"
    path.write_text(
        "session_id,item_id,timestamp\n"
        "1,3,1\n1,5,2\n1,7,3\n2,9,4\n2,11,5\n3,13,6\n4,15,7\n4,,8\n4,17,9\n"
    )
    runner = CliRunner()
    done = runner.invoke(
        app, ["evaluate", str(tmp_path / "bundle"), "--sessions", str(path), "--json"]
    )
    assert done.exit_code == 0, done.output
    said = json.loads(done.stdout)
    table = pl.read_csv(path)
    expected = evaluate_sessions(rated, table)
    assert said["twostage"]["ndcg"]["10"] == pytest.approx(
        expected["twostage"]["ndcg"][10]
    )
    assert said["sessions"] == 3 and said["single_item_sessions"] == 1
    assert said["unread_reasons"] == {"no item_id": 1}
    shown = runner.invoke(
        app, ["evaluate", str(tmp_path / "bundle"), "--sessions", str(path)]
    )
    text = " ".join(shown.output.replace("│", " ").split())
    assert shown.exit_code == 0 and "Next item of 3 sessions" in text, text
    assert (
        "1 one-item session left out" in text
        and "1 row not read (no item_id: 1)" in text
    )
    refused = runner.invoke(
        app,
        ["evaluate", str(tmp_path / "bundle"), "--sessions", str(path), "--test", "x"],
    )
    assert refused.exit_code == 2 and "--sessions" in refused.output
    alone = runner.invoke(app, ["evaluate", str(tmp_path / "bundle"), "--no-ranker"])
    assert alone.exit_code == 2 and "goes with --sessions" in " ".join(
        alone.output.split()
    )


def test_the_json_of_one_session_is_strict_json(
    rated: Recommender, tmp_path: Path
) -> None:
    # One session has no spread: its standard errors are NaN, which --json wrote
    # as `NaN`, a token strict JSON readers (jq, JSON.parse) refuse.
    rated.save(tmp_path / "bundle")
    path = tmp_path / "one.csv"
    path.write_text("session_id,item_id,timestamp\n1,3,1\n1,5,2\n1,7,3\n")
    done = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "bundle"), "--sessions", str(path), "--json"]
    )
    assert done.exit_code == 0, done.output

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    said = json.loads(done.stdout, parse_constant=refuse)
    assert said["sessions"] == 1
    assert said["standard_errors"]["twostage"]["ndcg"]["10"] is None


@pytest.mark.parametrize("filters", [None, {"category": "cat3"}, {"category": "none"}])
@pytest.mark.parametrize("model", ["rated", "with_neighbours", "ranked"])
def test_sessions_answered_in_batches_match_recommend_one_by_one(
    model: str, filters: dict[str, Any] | None, request: pytest.FixtureRequest
) -> None:
    """Sessions share one query pass, one index search (or one exact scoring,
    with the session-kNN term) and one ranker call per batch; every list must
    be the one `recommend` gives alone, anonymous or after a known user's
    history, past the history's length (8), with times and ratings read, and
    with filters (one that no item passes: every list empty)."""
    rated: Recommender = request.getfixturevalue(model)
    rng = np.random.default_rng(5)
    known = rated.item_vocab.values.to_list()[1:]
    people = rated.user_vocab.values.to_list()[1:]
    owner = {s: people[s] if s % 3 == 0 else None for s in range(40)}
    rows = []
    for session in range(40):
        for step in range(int(rng.integers(1, 14))):
            rows.append(
                {
                    "session_id": session,
                    "item_id": int(rng.choice(known)),
                    "timestamp": int(1000 * session + rng.integers(0, 500)),
                    "rating": float(rng.integers(1, 6)) if step % 3 else None,
                    "user_id": owner[session],
                }
            )
    table = pl.DataFrame(rows)
    ids = table["session_id"].unique(maintain_order=True).to_list()
    entries = {
        s: [
            {k: v for k, v in r.items() if k in ("item_id", "timestamp", "rating")}
            for r in rows
            if r["session_id"] == s
        ]
        for s in ids
    }
    for listed in entries.values():
        for entry in listed:
            if entry["rating"] is None:
                del entry["rating"]
    users = {s: rated.user_vocab.lookup(u) for s, u in owner.items() if u is not None}
    batched = _batched_lists(rated, ids, entries, users, 6, True, rated.ranker, filters)
    assert set(batched) == set(ids)  # every one answered in the batch
    found = rated.recommend_sessions(table, 6, filters=filters).lists
    for session in ids:
        alone = rated.recommend(
            owner[session], 6, session=entries[session], filters=filters
        )
        assert alone.path == ("personalised" if owner[session] else "session")
        mine = found.filter(pl.col("session_id") == session)
        assert mine["path"].to_list() == [alone.path] * len(alone.items)
        assert mine["item_id"].to_list() == _items(alone), session
        assert batched[session][0] == _items(alone)
        scores = [item["score"] for item in alone.items]
        keys = [item.get("rank_score", item["score"]) for item in alone.items]
        close = {"rel": 1e-5, "abs": 1e-5}
        assert mine["retrieval_score"].to_list() == pytest.approx(scores, **close)
        assert mine["score"].to_list() == pytest.approx(keys, **close)
    if filters == {"category": "none"}:  # no item passes
        assert found.height == 0
        assert rated.batch_index(filters) is None
    elif model == "with_neighbours":  # exact scoring: no filtered index built
        assert rated.batch_index(filters) is rated.index
    if model == "ranked" and filters is None:  # the ranker reorders the list
        plain = rated.recommend_sessions(
            table, 6, use_ranker=False, filters=filters
        ).lists
        assert plain["item_id"].to_list() != found["item_id"].to_list()
    # A session reading an item added after training goes to `recommend`.
    grown = rated.add_items(
        pl.DataFrame(
            {"item_id": [9001], "title": ["new"], "category": ["cat1"], "price": [3.0]}
        )
    )
    assert _batched_lists(grown, [0], {0: [{"item_id": 9001}]}, {}, 6, True) == {}


def test_a_known_users_session_batched_for_a_model_without_ratings() -> None:
    """A model that keeps no ratings (nor times) with its histories: a known
    user's stored items lead the session's in a batch too. The batch once
    wrote the session's ratings alone where the stored items and the session's
    were read, and failed on every such session."""
    plain = [s for s in RATED if "sequence_ratings" not in s and "time_gaps" not in s]
    run, split = fit_retrieval(apply_overrides(ExperimentConfig(), plain))
    rec = Recommender(run, items=split.train.items)
    assert not run.tensors.history_ratings.numel()
    people = rec.user_vocab.values.to_list()[1:]
    known = rec.item_vocab.values.to_list()[1:]
    walks = {s: known[3 * s : 3 * s + 1 + s % 4] for s in range(6)}
    owner = {s: people[s] if s % 2 == 0 else None for s in walks}
    table = pl.DataFrame(
        [
            {"session_id": s, "item_id": i, "user_id": owner[s]}
            for s, items in walks.items()
            for i in items
        ]
    )
    entries = {s: [{"item_id": i} for i in items] for s, items in walks.items()}
    users = {s: rec.user_vocab.lookup(u) for s, u in owner.items() if u is not None}
    batched = _batched_lists(rec, list(walks), entries, users, 5, True)
    assert set(batched) == set(walks)
    found = rec.recommend_sessions(table, 5).lists
    for session, items in walks.items():
        alone = rec.recommend(owner[session], 5, session=items)
        assert batched[session][0] == _items(alone), session
        mine = found.filter(pl.col("session_id") == session)["item_id"].to_list()
        assert mine == _items(alone), session


def _baseline_reference(
    rec: Recommender,
    model: Any,
    by_history: bool,
    held: dict[Any, tuple[Any, list[Any]]],
    k: int,
) -> float:
    """HR@k of one baseline, one session at a time (ties in catalogue order): it
    reads a known user's stored history and then every known item of the
    session before the held-out one; the session's items, the user's seen ones
    and the padding row are out; nothing read: the run's most-popular list."""
    hits = []
    trained = rec.num_trained_items
    for user, entries in held.values():
        *query, target = entries
        user_idx = rec.user_vocab.lookup(user) if user is not None else 0
        stored = rec.run.tensors.history[user_idx]
        items = [rec.item_vocab.lookup(e) for e in query if rec.item_vocab.contains(e)]
        read = [*stored[stored > 0].tolist(), *[i for i in items if i < trained]]
        if read or not by_history:
            row = model.score_sequences(torch.tensor([read or [0]])).float()[0]
        else:
            row = rec.run.tensors.fallback_popularity.float()
        scores = torch.full((rec.item_vocab.size,), -torch.inf)
        scores[: row.shape[0]] = row
        out = {0, *items}
        if user_idx:
            out.update(rec.seen_items(user_idx).tolist())
        scores[sorted(out)] = -torch.inf
        top, idx = torch.sort(scores, descending=True, stable=True)  # ties: lowest
        listed = idx[:k][top[:k] > -torch.inf].tolist()
        hits.append(rec.item_vocab.lookup(target) in listed)
    return sum(hits) / len(hits)


def test_baselines_are_measured_on_the_sessions_reading_what_the_model_reads(
    rated_split: tuple[Recommender, ExperimentSplit], tmp_path: Path
) -> None:
    """Given the training rows, every baseline is fitted on them and scores each
    session from the items the model's query reads (a known user's stored
    history first; every item, past the model's history length of 8), with the
    model's exclusions; a session with nothing read gets the most-popular list
    from the baselines that read items. The CLI's --baselines rebuilds the same
    rows from the saved config and prints the same figures."""
    from twostage.retrieval.evaluation import BY_POPULARITY, baseline_makers

    rec, split = rated_split
    rng = np.random.default_rng(3)
    known = rec.item_vocab.values.to_list()[1:]
    people = rec.user_vocab.values.to_list()[1:]
    rows = []
    for session in range(30):
        user = people[session] if session % 4 == 0 else None
        size = 14 if session == 1 else int(rng.integers(1, 6))
        for step in range(size):
            rows.append((session, int(rng.choice(known)), 100 * session + step, user))
    rows += [(30, 77777, 1, None), (30, 88888, 2, None), (30, known[0], 3, None)]
    table = pl.DataFrame(
        rows, schema=["session_id", "item_id", "timestamp", "user_id"], orient="row"
    )
    found = evaluate_sessions(rec, table, ks=(5, 20), train=split.train)
    held = {
        session: (group["user_id"][0], group["item_id"].to_list())
        for (session,), group in table.group_by("session_id", maintain_order=True)
        if group.height > 1
    }
    assert found["sessions"] == len(held) and found["unread_rows"] == 2
    names = set(found["baselines"])
    assert {"popularity", "ease", "transition", "session-knn"} <= names, names
    for name, make in baseline_makers(rec.run, split.train).items():
        model = make()
        for k in (5, 20):
            expected = _baseline_reference(
                rec, model, name not in BY_POPULARITY, held, k
            )
            got = found["baselines"][name]["hit_rate"][k]
            assert got == pytest.approx(expected), (name, k)
            error = found["standard_errors"]["baselines"][name]["hit_rate"][k]
            n = found["sessions"]
            assert error == pytest.approx(math.sqrt(got * (1 - got) / (n - 1)))
    # the figures differ between baselines: they do read the sessions
    assert len({f["hit_rate"][20] for f in found["baselines"].values()}) > 2
    rec.save(tmp_path / "bundle")
    path = tmp_path / "sessions.parquet"
    table.write_parquet(path)
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "bundle"), "--sessions", str(path)]
    done = runner.invoke(app, [*args, "--baselines", "--json"])
    assert done.exit_code == 0, done.output
    said = json.loads(done.stdout)["baselines"]
    for name, figures in found["baselines"].items():
        assert said[name]["ndcg"]["20"] == pytest.approx(figures["ndcg"][20]), name
    shown = runner.invoke(app, [*args, "--baselines"])
    text = " ".join(shown.output.replace("│", " ").split())
    assert shown.exit_code == 0 and " fallback " in text and " session-knn " in text
    errors = json.loads(done.stdout)["standard_errors"]
    assert (  # each row's standard error under the table
        "Standard error of NDCG@10 over the sessions: "
        f"twostage {errors['twostage']['ndcg']['10']:.4f}, "
        f"fallback {errors['popularity']['ndcg']['10']:.4f}, "
    ) in text
    for name, figures in errors["baselines"].items():
        assert f"{name} {figures['ndcg']['10']:.4f}" in text, name
    best = max(said, key=lambda name: said[name]["ndcg"]["10"])
    assert f"the best baseline on NDCG@10, {best}: " in text, text


def test_sessions_read_in_table_order_for_want_of_times_are_reported(
    rated: Recommender, tmp_path: Path
) -> None:
    """A session whose rows mix rows with and without a timestamp is read (and,
    measured, its held-out row chosen) in the table's order, as documented; it
    was not said which sessions that was."""
    table = pl.DataFrame(
        {
            "session_id": [1, 1, 1, 2, 2, 3, 3],
            "item_id": [3, 5, 7, 9, 11, 13, 15],
            "timestamp": [30, None, 10, 4, 5, None, None],
        }
    )
    from twostage.session_batch import recommend_sessions

    found = recommend_sessions(rated, table, 5)
    assert found.table_order == [1]  # 2 has times throughout, 3 none at all
    # Read as the table gives it: 3, 5, 7, whatever the times of 3 and 7 say.
    in_table_order = rated.recommend(
        None, 5, session=[{"item_id": 3, "timestamp": 30}, {"item_id": 5}, 7]
    )
    listed = found.lists.filter(pl.col("session_id") == 1)["item_id"].to_list()
    assert listed == _items(in_table_order)
    measured = evaluate_sessions(rated, table, ks=(5,))
    assert measured["table_order_sessions"] == 1
    assert (
        evaluate_sessions(rated, table.drop("timestamp"), ks=(5,))[
            "table_order_sessions"
        ]
        == 0
    )

    rated.save(tmp_path / "bundle")
    path = tmp_path / "sessions.csv"
    table.write_csv(path)
    for command in (
        ["recommend", str(tmp_path / "bundle"), "--sessions", str(path)],
        ["evaluate", str(tmp_path / "bundle"), "--sessions", str(path)],
    ):
        if command[0] == "recommend":
            command += ["--out", str(tmp_path / "lists.parquet")]
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
        said = " ".join(result.output.split())
        assert "1 session read in the file's order" in said, command[0]


@pytest.mark.parametrize(
    "rules",
    [
        {"diversity": 0.6},
        {"max_per": {"category": 1}},
        {"diversity": 0.3, "max_per": {"category": 2}},
        # lists the limit leaves short of 6 picked again from wider pools
        {"max_per": {"category": 1}, "num_candidates": 6},
    ],
)
def test_diverse_lists_in_batches_are_the_lists_recommend_gives(
    ranked: Recommender, rules: dict
) -> None:
    """With a ranker, diversity and max_per pick from the ranker's order: the
    batched lists of sessions and of users are recommend()'s, each item
    keeping the two-stage key it has in the list as scored."""
    table = pl.DataFrame({"session_id": ["a", "a", "b", "c"], "item_id": [3, 5, 7, 11]})
    found = ranked.recommend_sessions(table, 6, **rules)
    sessions = {"a": [3, 5], "b": [7], "c": [11]}
    for session, items in sessions.items():
        answer = ranked.recommend(None, 6, session=items, **rules)
        mine = found.lists.filter(pl.col("session_id") == session)
        assert mine["item_id"].to_list() == _items(answer), session
        keys = {
            i["item_id"]: i["rank_score"]
            for i in ranked.recommend(None, ranked.num_candidates, session=items).items
        }
        assert [i["rank_score"] for i in answer.items] == pytest.approx(
            [keys[i] for i in _items(answer)], rel=1e-5
        )
    users = ranked.user_vocab.values.to_list()[:20]
    lists = ranked.recommend_table(users, 6, **rules)
    changed = 0
    for user in users:
        answer = ranked.recommend(user, 6, **rules)
        mine = lists.filter(pl.col("user_id") == user)
        assert mine["item_id"].to_list() == _items(answer), user
        changed += _items(answer) != _items(ranked.recommend(user, 6))
    assert changed  # the rules re-picked some lists


def test_a_session_table_leaves_out_each_session_s_own_items(
    ranked: Recommender,
) -> None:
    """`exclude` on recommend_sessions: each session's list is recommend()'s
    with its exclusions (batched, and a session of unknown items answered
    alone), under rules that widen the pool too; a session the table lacks is
    refused by name."""
    table = pl.DataFrame(
        {"session_id": ["a", "a", "b", "c"], "item_id": [3, 5, 7, 99_999]}
    )
    plain = {
        s: _items(ranked.recommend(None, 6, session=items))
        for s, items in (("a", [3, 5]), ("b", [7]))
    }
    exclude = {"a": plain["a"][:2], "b": [plain["b"][0], 88_888], "c": [1]}
    for options in ({}, {"max_per": {"category": 1}, "num_candidates": 6}):
        found = ranked.recommend_sessions(table, 6, exclude=exclude, **options)
        for session, items in (("a", [3, 5]), ("b", [7]), ("c", None)):
            answer = ranked.recommend(
                None, 6, session=items, exclude=exclude[session], **options
            )
            mine = found.lists.filter(pl.col("session_id") == session)
            assert mine["item_id"].to_list() == _items(answer), session
    assert not set(
        found.lists.filter(pl.col("session_id") == "a")["item_id"].to_list()
    ) & set(plain["a"][:2])
    with pytest.raises(ConfigError, match=r"names 1 session\(s\) without a list"):
        ranked.recommend_sessions(table, 6, exclude={"zz": [1]})


def test_the_cli_leaves_each_session_s_items_out_from_a_file(
    ranked: Recommender, tmp_path: Path
) -> None:
    """`--sessions FILE --exclude-file F`: F's session_id, item_id rows leave
    items out of that session's list (recommend_sessions with `exclude`);
    rows for sessions the file lacks are counted with their rows."""
    ranked.save(tmp_path / "bundle")
    visits = tmp_path / "visits.csv"
    visits.write_text("session_id,item_id\na,3\na,5\nb,7\n")
    first = _items(ranked.recommend(None, 4, session=[3, 5]))
    shown = tmp_path / "shown.csv"
    shown.write_text(f"session_id,item_id\na,{first[0]}\nzz,7\n")
    out = tmp_path / "lists.parquet"
    args = ["recommend", str(tmp_path / "bundle"), "--sessions", str(visits)]
    done = CliRunner().invoke(
        app,
        [*args, "--out", str(out), "-k", "4", "--exclude-file", str(shown), "--json"],
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)["exclude_file"]
    assert report["sessions"] == 1 and report["rows"] == 2
    assert report["rows_for_sessions_without_a_list"] == 1
    assert report["first_rows_for_sessions_without_a_list"] == [2]
    expected = ranked.recommend_sessions(
        pl.DataFrame({"session_id": ["a", "a", "b"], "item_id": [3, 5, 7]}),
        4,
        exclude={"a": [first[0]]},
    ).lists
    written = pl.read_parquet(out)
    assert written["item_id"].to_list() == expected["item_id"].to_list()
    assert first[0] not in written.filter(pl.col("session_id") == "a")["item_id"]
    printed = CliRunner().invoke(
        app,
        [*args, "--out", str(out), "--overwrite", "--exclude-file", str(shown)],
        env={"COLUMNS": "300"},
    )
    said = " ".join(printed.output.split())
    assert "items left out of 1 sessions' lists" in said
    assert "1 --exclude-file rows name sessions without a list here" in said
