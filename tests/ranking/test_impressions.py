"""Impression logs (``label_col``): the rows shown and not chosen are read apart,
follow their choices across a split, and train the ranker as negatives."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import Dataset
from twostage.data.split import prepare_split, split_dataset
from twostage.data.synthetic import planted_impressions
from twostage.data.tables import read_interactions
from twostage.errors import ConfigError
from twostage.estimator import TwoStageModel
from twostage.ranking.fit import _Negatives
from twostage.two_stage import fit_two_stage

runner = CliRunner()

SMALL = [
    "train.epochs=4",
    "train.num_threads=1",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "ranking.embedding_dim=16",
    "ranking.hidden_dims=16",
    "ranking.epochs=4",
    "ranking.hard_negative_pool=20",
]


def write_impressions(path: Path, *, users: int = 150, per_user: int = 12) -> Path:
    """The planted impression log (:func:`planted_impressions`: only the rows
    shown and not chosen tell its good items from its bad ones) as a CSV."""
    frame = planted_impressions(users=users, per_user=per_user).drop("kind")
    frame.rename({"user_id": "user", "item_id": "item", "timestamp": "ts"}).write_csv(
        path
    )
    return path


def test_label_values_are_read_and_bad_ones_counted(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "user,item,ts,clicked\n"
        "1,10,100,1\n1,11,100,0\n1,12,100,FALSE\n2,10,200,true\n2,13,200, no \n"
        "3,14,300,maybe\n3,15,300,\n4,16,400,1.0\n4,17,400,2\n"
    )
    data = read_interactions(
        path, user_col="user", item_col="item", time_col="ts", label_col="clicked"
    )
    assert data.interactions.rows() == [(1, 10, 100), (2, 10, 200), (4, 16, 400)]
    assert data.shown is not None
    assert data.shown.rows() == [(1, 11, 100), (1, 12, 100), (2, 13, 200)]
    report = data.report
    assert report is not None and report.rejected == {"bad_label": 3}
    assert [line for line, _ in report.examples["bad_label"]] == [7, 8, 10]
    assert report.shown_rows == 3 and report.rows_loaded == 6
    # Booleans in a frame (Parquet, pandas) read alike; a column of floats too.
    frame = pl.DataFrame(
        {"user_id": [1, 1, 2], "item_id": [1, 2, 3], "seen": [True, False, None]}
    )
    data = read_interactions(frame, label_col="seen")
    assert data.interactions["item_id"].to_list() == [1]
    assert data.shown is not None and data.shown["item_id"].to_list() == [2]
    assert data.report is not None and data.report.rejected == {"bad_label": 1}
    # Without label_col a column named "label" is an ordinary feature.
    frame = pl.DataFrame({"user_id": [1], "item_id": [2], "label": ["drama"]})
    data = read_interactions(frame, item_features=["label"])
    assert data.shown is None and data.items is not None
    assert data.items["label"].to_list() == ["drama"]


def _log() -> Dataset:
    inter = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2],
            "item_id": [10, 11, 12, 20, 21],
            "timestamp": [100, 200, 300, 100, 200],
        }
    )
    shown = pl.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 3],
            "item_id": [90, 91, 92, 93, 94, 95],
            "timestamp": [100, 150, 300, 400, 50, 10],
        }
    )
    return Dataset("log", inter, shown=shown)


def test_shown_rows_follow_the_choice_of_their_impression() -> None:
    data = _log()
    train, test = split_dataset(data, method="leave-last-out")
    assert test.interactions["item_id"].to_list() == [12, 21]
    # 92 was shown with the test choice 12, 93 after it: both test; the others
    # (and user 3's, who chose nothing) with the training choices.
    assert test.shown is not None and train.shown is not None
    assert test.shown["item_id"].to_list() == [92, 93]
    assert sorted(train.shown["item_id"].to_list()) == [90, 91, 94, 95]
    # Temporal: by the rows' own time against the cut.
    train, test = split_dataset(data, method="temporal", test_fraction=0.4)
    cut = test.interactions["timestamp"].min()
    assert test.shown is not None and train.shown is not None
    assert (test.shown["timestamp"] >= cut).all()
    assert (train.shown["timestamp"] < cut).all()
    assert train.shown.height + test.shown.height == 6
    # Random: each shown row goes where its user's next choice went.
    train, test = split_dataset(data, method="random", test_fraction=0.4, seed=1)
    test_choices = set(test.interactions.select("user_id", "timestamp").rows())
    assert test.shown is not None and train.shown is not None
    for user, _, time in test.shown.rows():
        later = [t for u, t in test_choices if u == user and t >= time]
        assert later or user == 1  # user 1's last choice (300) is a test row
    assert train.shown.height + test.shown.height == 6


def test_experiment_sides_never_share_a_shown_row() -> None:
    data = _log()
    for split in ("random", "temporal", "leave-last-out"):
        config = apply_overrides(
            ExperimentConfig(),
            [f"data.split={split}", "data.validation_fraction=0.3"],
        )
        parts = prepare_split(data, config)
        sides = [parts.fit, parts.validation, parts.test]
        rows = [r for side in sides if side is not None for r in side.shown.rows()]
        assert sorted(rows) == sorted(_log().shown.rows()), split  # type: ignore[union-attr]


def test_shown_negatives_come_from_the_users_own_shown_items() -> None:
    negatives = _Negatives(
        pool=torch.zeros(4, 1, dtype=torch.long),
        known=torch.tensor([1 * 10 + 5]),  # user 1 chose item 5
        num_items=10,
        num_hard=0,
        num_random=0,
        shown_start=torch.tensor([0, 0, 3, 3, 4]),  # user 1: 3 items, user 3: one
        shown_items=torch.tensor([5, 6, 7, 9]),
        num_shown=50,
    )
    items, usable = negatives.sample(torch.tensor([1, 2, 3]), torch.Generator())
    assert set(items[0].tolist()) == {5, 6, 7}
    assert usable[0].tolist() == [i != 5 for i in items[0].tolist()]  # chosen too
    assert not usable[1].any()  # user 2 was shown nothing
    assert items[2].tolist() == [9] * 50 and usable[2].all()


def test_the_ranker_learns_what_was_shown_and_not_chosen(tmp_path: Path) -> None:
    path = write_impressions(tmp_path / "impressions.csv")
    data = read_interactions(
        path, user_col="user", item_col="item", time_col="ts", label_col="clicked"
    )
    figures = {}
    for shown in (0, 4):
        config = apply_overrides(
            ExperimentConfig(),
            [*SMALL, "ranking.batch_size=128", f"ranking.num_shown_negatives={shown}"],
        )
        stages = fit_two_stage(config, data)
        assert stages.ranking_metrics is not None
        figures[shown] = stages.ranking_metrics["shown_auc"]
        assert stages.ranking_metrics["shown_auc_users"] > 100
    # Good and bad items are chosen about equally often: without the shown rows
    # the ranker cannot order them (AUC near 0.5); with them it nears the planted
    # ceiling (0.725: a chosen item is good half the time, a shown one 1 in 20).
    assert figures[0] < 0.58 < 0.65 < figures[4], figures


def test_label_col_end_to_end_from_the_cli_and_python(tmp_path: Path) -> None:
    path = write_impressions(tmp_path / "impressions.csv", users=60, per_user=8)
    columns = ["--user-col", "user", "--item-col", "item", "--time-col", "ts"]
    described = runner.invoke(
        app,
        ["data", "describe", str(path), *columns, "--label-col", "clicked", "--json"],
    )
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["shown"]["rows"] + summary["num_interactions"] == 60 * 8 * 11
    assert summary["bad_rows"]["shown_rows"] == summary["shown"]["rows"]
    # Without --label-col every row shown would be an interaction.
    plain = json.loads(
        runner.invoke(app, ["data", "describe", str(path), *columns, "--json"]).stdout
    )
    assert plain["num_interactions"] == 60 * 8 * 11

    out = tmp_path / "bundle"
    args = [*columns, "--label-col", "clicked", "--out", str(out), "--json"]
    sets = [a for s in SMALL for a in ("--set", s)]
    result = runner.invoke(app, ["train", "--dataset", str(path), *args, *sets])
    assert result.exit_code == 0, result.output
    ranking = json.loads(result.stdout)["ranking"]
    assert 0 <= ranking["shown_auc"] <= 1 and ranking["shown_auc_users"] > 0
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    saved = json.loads(info.stdout)["ranking"]["test"]
    assert saved["shown_auc"] == pytest.approx(ranking["shown_auc"])
    # The bundle keeps the setting: new rows are read with it.
    evaluated = runner.invoke(
        app, ["evaluate", str(out), "--test", str(path), "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "shown_auc" in json.dumps(json.loads(evaluated.stdout))
    # data split writes the shown rows with a label column; a run reads them back.
    split_dir = tmp_path / "split"
    made = runner.invoke(
        app,
        [
            *("data", "split", str(path), "--out", str(split_dir), *columns),
            *("--label-col", "clicked", "--method", "leave-last-out"),
        ],
    )
    assert made.exit_code == 0, made.output
    written = pl.read_parquet(split_dir / "train.parquet")
    assert set(written["label"].unique().to_list()) == {True, False}
    from twostage.data.split import read_split_file

    side = read_split_file(str(split_dir / "test.parquet"), like=_int_log())
    assert side.shown is not None and side.shown.height > 0
    assert (
        side.num_interactions
        == pl.read_parquet(split_dir / "test.parquet")["label"].sum()
    )

    model = TwoStageModel(apply_overrides(ExperimentConfig(), SMALL), progress=False)
    frame = pl.read_csv(path)
    model.fit(
        frame, user_col="user", item_col="item", time_col="ts", label_col="clicked"
    )
    assert model.split_ is not None and model.split_.fit.shown is not None
    # The estimator's carve-out keeps the shown rows of validation out of fit.
    held = model.split_.validation
    assert held is not None and held.shown is not None
    assert (
        held.shown.height + model.split_.fit.shown.height
        == frame.filter(pl.col("clicked") == 0).height
    )
    figures = model.evaluate(frame.tail(2000))
    assert figures.ranking is not None and "shown_auc" in figures.ranking


def _int_log() -> Dataset:
    return Dataset(
        "like",
        pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": [0]}),
    )


@pytest.mark.parametrize("context", ["", "hour_of_day", "timestamp"])
def test_impression_figures_match_a_naive_reference(
    tmp_path: Path, context: str
) -> None:
    """MIND's per-impression AUC, MRR and nDCG, computed again impression by
    impression in Python from the ranker's own click scores; with a ranker that
    reads context, each impression scored at its own moment."""
    import math

    from twostage.ranking.evaluation import shown_auc

    path = write_impressions(tmp_path / "impressions.csv", users=40, per_user=6)
    data = read_interactions(
        path, user_col="user", item_col="item", time_col="ts", label_col="clicked"
    )
    extra = [f"retrieval.query_fields=user_id,{context}"] if context else []
    config = apply_overrides(ExperimentConfig(), [*SMALL, "ranking.epochs=1", *extra])
    stages = fit_two_stage(config, data)
    ranker, test = stages.ranker, stages.split.test
    assert ranker is not None and test.shown is not None
    assert ranker.reads_context == bool(context)
    figures = shown_auc(ranker, test)
    users = ranker.retrieval.spec.vocabulary("user_id")
    items = ranker.retrieval.spec.vocabulary("item_id")
    # An item the ranker never trained on takes the next index past the
    # vocabulary, in order of first appearance; with no item table it scores as
    # the unknown item (row 0).
    new: dict[object, int] = {}
    groups: dict[tuple[int, int], dict[int, bool]] = {}
    for frame, chosen in ((test.interactions, True), (test.shown, False)):
        u = users.transform(frame["user_id"])
        i = items.transform(frame["item_id"])
        for user, item, raw, time in zip(
            u, i, frame["item_id"], frame["timestamp"], strict=True
        ):
            assert user  # every test user is known here
            if not item:
                item = new.setdefault(raw, items.size + len(new))
            group = groups.setdefault((int(user), int(time)), {})
            group[int(item)] = group.get(int(item), False) or chosen
    assert figures["shown_cold_users"] == 0
    assert figures["shown_cold_items"] == len(new) > 0
    aucs, mrrs, ndcgs = [], [], {5: [], 10: []}
    for (user, time), labels in sorted(groups.items()):
        if len(set(labels.values())) < 2:
            continue
        order = sorted(labels)  # ties keep the item order
        rows = [i if i < items.size else 0 for i in order]
        moment = None
        if context:  # the impression's own hour
            moment = ranker.encode_context(pl.DataFrame({"timestamp": [time]}))
        scores = ranker.score(
            torch.tensor([user]), torch.tensor([rows]), context=moment
        )["click"][0].tolist()
        pos = [s for s, i in zip(scores, order, strict=True) if labels[i]]
        neg = [s for s, i in zip(scores, order, strict=True) if not labels[i]]
        wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
        aucs.append(wins / (len(pos) * len(neg)))
        ranked = sorted(range(len(order)), key=lambda k: (-scores[k], k))
        hits = [r + 1 for r, k in enumerate(ranked) if labels[order[k]]]
        mrrs.append(sum(1 / r for r in hits) / len(hits))
        for k in (5, 10):
            dcg = sum(1 / math.log2(r + 1) for r in hits if r <= k)
            ideal = sum(1 / math.log2(j + 2) for j in range(min(k, len(hits))))
            ndcgs[k].append(dcg / ideal)
    got = figures["impressions"]
    assert got["count"] == len(aucs) > 10
    # With context the ranker scores each row in a batch of rows, here one
    # impression at a time: float noise of 1e-8 may order a near tie otherwise
    # (one impression of the 40, which moves a mean by under 5e-3).
    close = 5e-3 if context else 1e-6
    assert got["auc"] == pytest.approx(sum(aucs) / len(aucs), abs=close)
    assert got["mrr"] == pytest.approx(sum(mrrs) / len(mrrs), abs=close)
    for k in (5, 10):
        assert got[f"ndcg@{k}"] == pytest.approx(
            sum(ndcgs[k]) / len(ndcgs[k]), abs=close
        )


def test_users_and_items_the_ranker_never_saw_are_scored_not_dropped(
    tmp_path: Path,
) -> None:
    """MIND's test day shows news published after training, to users the model may
    not know: every impression counts, a new item scored from its features and a
    new user as a cold start, and the figures say how many there were."""
    from twostage.cli_output import impressions_line
    from twostage.ranking.evaluation import shown_auc

    path = tmp_path / "impressions.csv"
    planted_impressions().write_csv(path)
    data = read_interactions(path, label_col="clicked", item_features=["kind"])
    config = apply_overrides(ExperimentConfig(), [*SMALL, "ranking.batch_size=128"])
    ranker = fit_two_stage(config, data).ranker
    assert ranker is not None
    # New items 201..240 (the first 20 good), new users 1001..1020, each shown one
    # good and three bad new items and a known one, choosing the good one.
    rng = np.random.default_rng(1)
    chosen, shown = [], []
    for user in range(1001, 1021):
        good, bad = 201 + rng.integers(20), 221 + rng.choice(20, 3, replace=False)
        chosen.append((user, int(good), 1))
        shown += [(user, int(item), 1) for item in (*bad, 41 + user % 40)]
    frame = lambda rows: pl.DataFrame(  # noqa: E731
        rows, schema=["user_id", "item_id", "timestamp"], orient="row"
    )
    ids = list(range(1, 81)) + list(range(201, 241))
    good = [i <= 40 or 201 <= i <= 220 for i in ids]
    items = pl.DataFrame(
        {"item_id": ids, "kind": ["good" if g else "bad" for g in good]}
    )
    test = Dataset("new", frame(chosen), items=items, shown=frame(shown))
    figures = shown_auc(ranker, test)
    assert figures["shown_cold_users"] == 20 == figures["shown_auc_users"]
    assert figures["shown_cold_items"] == len({r[1] for r in chosen + shown}) - 20
    assert figures["impressions"]["count"] == 20
    # The good new items are told from the bad ones by their kind alone.
    assert figures["shown_auc"] > 0.8, figures
    line = impressions_line(figures)
    cold = figures["shown_cold_items"]
    assert f"(20 users new to the model, {cold} items new to it)" in line
    # Known items keep their scores; without an item table every new item is the
    # unknown item, and they all score alike.
    ids = pl.Series("item_id", [3, 50, 205, 230])
    run, index, new = ranker.with_items(ids, items)
    known = ranker.retrieval.spec.vocabulary("item_id").transform(ids[:2])
    assert new == 2 and index[:2].tolist() == known.tolist()
    assert index[2:].tolist() == [
        ranker.tensors.num_items,
        ranker.tensors.num_items + 1,
    ]
    user = torch.tensor([5])
    before = ranker.score(user, index[None, :2])["click"]
    torch.testing.assert_close(run.score(user, index[None, :2])["click"], before)
    good, bad = run.score(user, index[None, 2:])["click"][0].tolist()
    assert good > bad
    blind, index, _ = ranker.with_items(ids, None)
    scores = blind.score(user, index[None, 2:])["click"][0]
    assert scores[0] == scores[1]


def test_a_new_user_is_scored_from_the_test_s_user_table(tmp_path: Path) -> None:
    """Half the users choose good items, half bad ones, and each user's `taste`
    says which. A test user the model never saw is scored from its row of the
    test's user table, as retrieval scores a cold user: without that row every
    new user looks alike and the order is the items' alone."""
    from twostage.ranking.evaluation import shown_auc

    rng = np.random.default_rng(0)
    rows = []
    time = 1_600_000_000
    for user in range(1, 201):
        taste = "good" if user % 2 else "bad"
        for _ in range(8):
            time += 60
            for item in rng.choice(np.arange(1, 81), 6, replace=False):
                kind = "good" if item <= 40 else "bad"
                chance = 0.5 if kind == taste else 0.05
                rows.append((user, int(item), time, int(rng.random() < chance), taste))
    path = tmp_path / "tastes.csv"
    pl.DataFrame(
        rows, schema=["user", "item", "ts", "clicked", "taste"], orient="row"
    ).with_columns(
        kind=pl.when(pl.col("item") <= 40).then(pl.lit("good")).otherwise(pl.lit("bad"))
    ).write_csv(path)
    data = read_interactions(
        path,
        user_col="user",
        item_col="item",
        time_col="ts",
        label_col="clicked",
        user_features=["taste"],
        item_features=["kind"],
    )
    config = apply_overrides(ExperimentConfig(), [*SMALL, "ranking.batch_size=128"])
    ranker = fit_two_stage(config, data).ranker
    assert ranker is not None
    # New users 1001..1040, half of each taste, shown three items of each kind,
    # choosing one of their taste.
    chosen, shown = [], []
    for user in range(1001, 1041):
        taste = "good" if user % 2 else "bad"
        mine, other = (range(1, 41), range(41, 81))[:: 1 if taste == "good" else -1]
        picks = [int(rng.choice(mine)), *rng.choice(other, 3, replace=False)]
        picks += [int(i) for i in rng.choice([i for i in mine if i != picks[0]], 2)]
        chosen.append((user, picks[0], 1))
        shown += [(user, int(item), 1) for item in picks[1:]]
    frame = lambda rows: pl.DataFrame(  # noqa: E731
        rows, schema=["user_id", "item_id", "timestamp"], orient="row"
    )
    users = pl.DataFrame(
        {
            "user_id": range(1001, 1041),
            "taste": ["good" if u % 2 else "bad" for u in range(1001, 1041)],
        }
    )
    test = Dataset(
        "new", frame(chosen), users=users, items=data.items, shown=frame(shown)
    )
    told = shown_auc(ranker, test)
    blind = shown_auc(ranker, dataclasses.replace(test, users=None))
    assert told["shown_cold_users"] == blind["shown_cold_users"] == 40
    assert told["shown_auc"] > 0.7 and blind["shown_auc"] < 0.6, (told, blind)


def test_a_column_that_is_no_label_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user,item,rating\n1,2,4.5\n1,3,1\n")
    data = read_interactions(
        path, user_col="user", item_col="item", label_col="rating", rating_col=""
    )
    report = data.report
    assert report is not None and report.rejected == {"bad_label": 1}
    assert data.interactions.height == 1  # the 1 is a label: chosen
    assert "--label-col" in report.hint and "--rating-col" in report.hint


def test_a_label_threshold_reads_a_column_of_numbers(tmp_path: Path) -> None:
    """KuaiRec's watch_ratio: a row watched twice over or more is a choice, the
    others were shown and not chosen; before, such a column could only weigh
    rows (`--weight-col`), every row an interaction."""
    path = tmp_path / "kuairec.csv"
    path.write_text(
        "user_id,video_id,timestamp,watch_ratio\n"
        "1,10,100,2.5\n1,11,101,0.3\n1,12,102,2.0\n2,10,103,1.9\n2,13,104,\n"
        "2,14,105,n/a\n3,10,106,7\n"
    )
    data = read_interactions(
        path, item_col="video_id", label_col="watch_ratio", label_threshold=2
    )
    assert data.interactions["item_id"].to_list() == [10, 12, 10]
    assert data.shown is not None and data.shown["item_id"].to_list() == [11, 10]
    assert data.report is not None and data.report.rejected == {"bad_label": 2}
    with pytest.raises(ConfigError, match="label_col"):
        read_interactions(path, item_col="video_id", label_threshold=2)
    with pytest.raises(ConfigError, match="finite number"):
        read_interactions(
            path, item_col="video_id", label_col="watch_ratio", label_threshold=True
        )
    described = runner.invoke(
        app,
        [
            *("data", "describe", str(path), "--item-col", "video_id", "--json"),
            *("--label-col", "watch_ratio", "--label-threshold", "2"),
        ],
    )
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["num_interactions"] == 3 and summary["shown"]["rows"] == 2
    # A streamed log reads the setting too.
    from twostage.data.describe import describe_streamed
    from twostage.data.streaming import Reading

    pl.read_csv(path).rename({"video_id": "item_id"}).write_parquet(
        tmp_path / "kuairec.parquet"
    )
    summary, report = describe_streamed(
        tmp_path / "kuairec.parquet",
        reading=Reading(label_col="watch_ratio", label_threshold=2.0),
    )
    assert summary["num_interactions"] == 3 and report.shown_rows == 2
    with pytest.raises(ConfigError, match="label_col"):
        describe_streamed(
            tmp_path / "kuairec.parquet", reading=Reading(label_threshold=2.0)
        )
