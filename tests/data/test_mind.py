"""MIND's impression logs (``mind:PATH``): clicks, news shown and not clicked,
each user's history, and the news features."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from twostage.cli import app
from twostage.data.mind import read_mind
from twostage.data.registry import load_dataset
from twostage.errors import BadRowError, ConfigError, DataError
from twostage.models.fields import HISTORY

runner = CliRunner()

BEHAVIORS = (
    "1\tU13740\t11/11/2019 9:05:58 AM\tN55189 N42782 N34694\tN55689-1 N35729-0\n"
    "2\tU91836\t11/12/2019 6:11:30 PM\tN31739 N6072\tN20678-0 N39317-0 N58114-1\n"
    "3\tU13740\t11/13/2019 7:00:00 AM\tN55189 N42782 N34694\tN35729-1 N33632-0 N55689\n"
    "4\tU73700\tyesterday\t\tN1-1\n"
    "\n"
    "5\tU73700\t11/14/2019 1:00:00 PM\n"
    "6\tU73700\t11/14/2019 1:00:00 PM\t\tN23414-1\n"
)
NEWS = (
    'N55689\tsports\tfootball_nfl\tThe "Brady" story\tOne\thttps://a\t[]\t[]\n'
    "N35729\tnews\tnewsus\tTitle two\t\thttps://b\t[]\t[]\n"
)


@pytest.fixture
def mind(tmp_path: Path) -> Path:
    (tmp_path / "behaviors.tsv").write_text(BEHAVIORS)
    (tmp_path / "news.tsv").write_text(NEWS)
    return tmp_path


def test_impressions_history_and_news_are_read(mind: Path) -> None:
    data = load_dataset(f"mind:{mind}")
    rows = data.interactions.rows()
    start = 1573463158  # 2019-11-11 09:05:58 UTC
    # The history, oldest first, in the seconds before the user's first line.
    assert rows[:4] == [
        ("U13740", "N55189", start - 3),
        ("U13740", "N42782", start - 2),
        ("U13740", "N34694", start - 1),
        ("U13740", "N55689", start),
    ]
    # U13740's second line repeats the history: read once.
    assert (
        data.interactions.filter(data.interactions["item_id"] == "N55189").height == 1
    )
    assert ("U13740", "N35729", 1573628400) in rows
    assert ("U73700", "N23414", 1573736400) in rows
    assert data.shown is not None
    assert sorted(data.shown["item_id"].to_list()) == [
        "N20678",
        "N33632",
        "N35729",
        "N39317",
    ]
    report = data.report
    assert report is not None
    assert report.rejected == {
        "bad_label": 1,  # "N55689" without -1 / -0
        "bad_timestamp": 1,
        "blank_line": 1,
        "wrong_field_count": 1,
    }
    assert report.examples["bad_label"][0][0] == 3  # the line it is on
    assert report.examples["wrong_field_count"][0][0] == 6
    assert report.rows_loaded == data.num_interactions + data.num_shown
    assert report.rows_loaded + report.num_rejected == report.rows_read
    assert report.shown_rows == 4
    items = data.items
    assert items is not None
    assert items.columns == ["item_id", "category", "subcategory", "title", "abstract"]
    assert items.row(0) == (
        "N55689",
        "sports",
        "football_nfl",
        'The "Brady" story',
        "One",
    )


def test_a_strict_read_stops_at_the_first_bad_line(mind: Path) -> None:
    with pytest.raises(BadRowError) as caught:
        read_mind(mind, strict=True)
    assert caught.value.line == 3 and caught.value.reason == "bad_label"
    assert "N55689" in caught.value.content
    with pytest.raises(ConfigError, match="user_col"):
        read_mind(mind, user_col="user")
    with pytest.raises(DataError, match=r"behaviors\.tsv"):
        read_mind(mind / "elsewhere")


def test_mind_trains_end_to_end(tmp_path: Path) -> None:
    """A planted MIND log: each user reads one of four categories."""
    rng = np.random.default_rng(0)
    lines = []
    for user in range(60):
        topic = user % 4
        history = " ".join(f"N{topic}{int(i)}" for i in rng.integers(0, 30, 3))
        for k in range(6):
            shown = [f"N{topic}{int(rng.integers(0, 30))}-1"]
            shown += [
                f"N{(topic + 1 + j) % 4}{int(rng.integers(0, 30))}-0" for j in range(3)
            ]
            time = f"11/{11 + k}/2019 {1 + user % 12}:00:00 PM"
            lines.append(f"{len(lines)}\tU{user}\t{time}\t{history}\t{' '.join(shown)}")
    (tmp_path / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    described = runner.invoke(app, ["data", "describe", f"mind:{tmp_path}", "--json"])
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["shown"]["rows"] == 60 * 6 * 3
    assert summary["num_interactions"] == 60 * (6 + 3)
    result = runner.invoke(
        app,
        [
            *("train", "--dataset", f"mind:{tmp_path}", "--out", str(tmp_path / "b")),
            *("--set", "data.split=temporal", "--json"),
            *("--set", "train.epochs=2", "--set", "ranking.epochs=30"),
            *("--set", "ranking.batch_size=32"),
            *("--set", "retrieval.embedding_dim=8", "--set", "retrieval.output_dim=8"),
        ],
    )
    assert result.exit_code == 0, result.output
    ranking = json.loads(result.stdout)["ranking"]
    # The clicked news is of the user's category, the others not: learnable
    # (0.98 measured; it read 0.5 and passed when the ranker had 2 epochs of 1
    # step, as the test only asked for a figure between 0 and 1).
    assert ranking["shown_auc_users"] > 0 and ranking["shown_auc"] > 0.8
    # MIND's protocol: a model of the training file measured on another file.
    evaluated = runner.invoke(
        app, ["evaluate", str(tmp_path / "b"), "--test", f"mind:{tmp_path}", "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert '"impressions"' in evaluated.stdout
    # The dev file's histories are clicks from before its period: no test rows
    # (they were 3 a user more, 540 pairs, each user's history counted as chosen).
    measured = json.loads(evaluated.stdout)
    assert measured["ranking"]["num_test_pairs"] == 60 * 6


def _planted_lines(users: range, days: int, rng: np.random.Generator) -> str:
    """Each user reads one of four categories (its history too): a clicked news of
    its own, three of the others shown and not clicked, on each of ``days`` days."""
    lines = []
    for user in users:
        topic = user % 4
        history = " ".join(f"N{topic}{int(i)}" for i in rng.integers(0, 30, 3))
        for k in range(days):
            shown = [f"N{topic}{int(rng.integers(0, 30))}-1"]
            shown += [
                f"N{(topic + 1 + j) % 4}{int(rng.integers(0, 30))}-0" for j in range(3)
            ]
            time = f"11/{11 + k}/2019 {1 + user % 12}:00:00 PM"
            lines.append(f"{len(lines)}\tU{user}\t{time}\t{history}\t{' '.join(shown)}")
    return "\n".join(lines) + "\n"


def _planted_news() -> str:
    """``news.tsv`` of the planted log's news: each one's category is its topic."""
    return "".join(
        f"N{topic}{i}\tc{topic}\tsub\tnews {topic} {i}\t\thttps://x\t[]\t[]\n"
        for topic in range(4)
        for i in range(30)
    )


def test_a_dev_file_s_new_users_are_read_from_their_history(tmp_path: Path) -> None:
    """MIND's dev file: users the model never trained on come with their click
    history. It is kept apart (`Dataset.prior`), never counted as test choices,
    and the ranker reads it as the new user's history, as serving reads a
    session: the impressions are then ordered by the user's category."""
    import dataclasses

    from twostage.ranking.evaluation import shown_auc
    from twostage.recommender import load
    from twostage.retrieval.evaluation import read_test_log

    rng = np.random.default_rng(0)
    train, dev = tmp_path / "train", tmp_path / "dev"
    train.mkdir()
    dev.mkdir()
    (train / "behaviors.tsv").write_text(_planted_lines(range(80), 6, rng))
    (dev / "behaviors.tsv").write_text(_planted_lines(range(1000, 1040), 1, rng))
    for folder in (train, dev):
        (folder / "news.tsv").write_text(_planted_news())
    read = read_mind(dev, history=False)
    assert read.num_interactions == 40 and read.prior is not None
    assert read.prior.height == 40 * 3
    assert set(read.prior["user_id"]) == set(read.interactions["user_id"])
    bundle = tmp_path / "b"
    trained = runner.invoke(
        app,
        [
            *("train", "--dataset", f"mind:{train}", "--out", str(bundle)),
            *("--set", "train.epochs=5", "--set", "ranking.epochs=30"),
            *("--set", "train.batch_size=32", "--set", "ranking.batch_size=32"),
            *("--set", "ranking.embedding_dim=8"),
            *("--set", "retrieval.embedding_dim=8", "--set", "retrieval.output_dim=8"),
        ],
    )
    assert trained.exit_code == 0, trained.output
    rec = load(bundle)
    assert rec.ranker is not None
    test = read_test_log(rec.run, f"mind:{dev}")
    assert test.prior is not None and test.prior.height == 40 * 3
    read_from = shown_auc(rec.ranker, test)
    blind = shown_auc(rec.ranker, dataclasses.replace(test, prior=None))
    assert read_from["shown_cold_users"] == 40 == blind["shown_cold_users"]
    assert read_from["shown_cold_users_with_history"] == 40
    assert blind["shown_cold_users_with_history"] == 0
    # Their history says their category: the impressions are ordered by it
    # (0.92 measured; 0.79 when retrieval trained two steps an epoch), where
    # without it the new users are told apart by nothing.
    assert read_from["impressions"]["auc"] > 0.7
    assert blind["impressions"]["auc"] < 0.6
    # A new user is scored from its history as serving scores a session of those
    # items: the ranker's fields at the unknown user's row, the history filled.
    user = test.interactions["user_id"][0]
    grown, index, added = rec.ranker.with_users(
        pl.Series("user_id", [user]), None, test.prior
    )
    assert added == 1
    items = torch.tensor([rec.item_vocab.lookup(f"N{t}1") for t in range(4)])
    got = grown.score(index, items[None, :])["click"][0]
    history = grown.tensors.history[index]
    seen = test.prior.filter(pl.col("user_id") == user)["item_id"].to_list()
    assert history[0, -3:].tolist() == [rec.item_vocab.lookup(i) for i in seen]
    fields = {k: v[:1] for k, v in rec.run.tensors.user_features.items()}
    query = rec.run.model.encode_queries({**fields, HISTORY: history})[0]
    served = rec.ranker.score_user({HISTORY: history}, query, items)["click"][0]
    torch.testing.assert_close(got, served)
    without = rec.ranker.score(torch.tensor([0]), items[None, :])["click"][0]
    assert not torch.allclose(got, without)  # the history is read
    evaluated = runner.invoke(app, ["evaluate", str(bundle), "--test", f"mind:{dev}"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "40 of them read from their history" in evaluated.output
    said = " ".join(evaluated.output.split())
    assert "answered as cold starts (40 of them read from their history)" in said
    _retrieval_reads_the_history(rec, test, dataclasses.replace(test, prior=None))


def _retrieval_reads_the_history(rec: Any, test: Any, blind: Any) -> None:
    """The retrieval figures, the baselines' and the two-stage lists read the new
    users' histories too: their category comes first, and the items of the
    history are seen (never listed)."""
    from twostage.ranking.evaluation import evaluate_ranking, evaluated_lists
    from twostage.retrieval.evaluation import eval_queries, evaluate_on

    figures = evaluate_on(rec.run, test, baselines=True)
    without = evaluate_on(rec.run, blind, baselines=True)

    def hit(result: dict[str, Any]) -> float:
        return float(result["metrics"]["exclude_seen"]["hit_rate"]["50"])

    slices = figures["twostage"]["slices"]
    counts = slices["cold_users_with_history"]["counts"]["exclude_seen"]
    assert counts["num_queries"] == 40
    assert "cold_users_with_history" not in without["twostage"]["slices"]
    # A category holds 30 of the 120 news: from the history, the clicked one is
    # in the top 50 most of the time (0.86 to 0.92 measured); without it, about
    # as often as 50 of 120 (0.28 to 0.43).
    for name in ("twostage", "ease", "itemknn", "session-knn", "ease-recency"):
        assert hit(figures[name]) > 0.75, name
        assert hit(without[name]) < 0.5, name
    queries = eval_queries(rec.run, test)
    assert queries.reads_prior().all()
    first = test.prior.filter(pl.col("user_id") == queries.user_ids[0])
    known = [rec.item_vocab.lookup(i) for i in first["item_id"]]
    assert set(known) <= set(queries.seen.row(0).tolist())
    ranked = evaluate_ranking(rec.ranker, test)["two_stage"]["hit_rate"]["50"]
    ranked_blind = evaluate_ranking(rec.ranker, blind)["two_stage"]["hit_rate"]["50"]
    assert ranked > 0.75 and ranked_blind < 0.5, (ranked, ranked_blind)
    _, lists = evaluated_lists(rec.ranker, test)
    assert not set(known) & set(lists[0].tolist())  # the history is seen
