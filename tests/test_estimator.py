"""The estimator API end to end, as a notebook would drive it: pandas frames in,
both stages fitted without re-splitting, answers, figures, save and reload."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

import twostage
from twostage.data.synthetic import generate
from twostage.errors import ConfigError, DataError

pd = pytest.importorskip("pandas")

SETTINGS = {
    "train.epochs": 2,
    "train.num_threads": 1,
    "retrieval.embedding_dim": 16,
    "retrieval.output_dim": 16,
    "retrieval.history_length": 10,
    "ranking.epochs": 1,
}


@pytest.fixture(scope="module")
def frames() -> tuple["pd.DataFrame", "pd.DataFrame"]:
    data = generate(num_users=120, num_items=90, num_interactions=3000, seed=3)
    log = data.interactions.rename(
        {"user_id": "uid", "item_id": "movie", "rating": "stars", "timestamp": "ts"}
    ).to_pandas()
    log["ts"] = pd.to_datetime(log["ts"], unit="s")  # as a notebook would hold it
    train, test = twostage.random_split(
        twostage.read_interactions(
            log, user_col="uid", item_col="movie", rating_col="stars", time_col="ts"
        ),
        test_fraction=0.2,
        seed=0,
    )
    back = {"user_id": "uid", "item_id": "movie", "rating": "stars"}
    return (
        train.interactions.rename(back).drop("timestamp").to_pandas(),
        test.interactions.rename(back).drop("timestamp").to_pandas(),
    )


def test_estimator_from_pandas_to_reload(frames, tmp_path: Path, caplog) -> None:
    train, test = frames
    steps: list[dict] = []
    model = twostage.TwoStageModel(
        settings=SETTINGS, progress=False, on_step=steps.append
    )
    assert "not fitted" in repr(model)
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    model.fit(train, **columns)
    # Trained on the rows given, minus the validation carve-out: nothing re-split.
    assert model.split_.fit.num_interactions + model.split_.validation.num_interactions
    assert (
        model.split_.fit.num_interactions + model.split_.validation.num_interactions
        == len(train)
    )
    assert model.split_.test.num_interactions == 0
    assert {s["stage"] for s in steps} == {"retrieval", "ranking"}
    assert "fitted" in repr(model) and "users" in repr(model)

    users = sorted(train["uid"].unique())[:3]
    item_ids, scores = model.recommend(users, k=5)
    assert item_ids.shape == scores.shape == (3, 5)
    assert item_ids.dtype == np.int64
    # Seen items are excluded, as served.
    for row, user in enumerate(users):
        seen = set(train.loc[train["uid"] == user, "movie"])
        assert not seen & set(item_ids[row].tolist())
    one = model.recommend(users[0], k=5)
    assert [e["item_id"] for e in one.items] == item_ids[0].tolist()

    ratings = model.predict([users[0], users[1], users[0]], [item_ids[0, 0], 1, -99])
    assert ratings.shape == (3,) and math.isnan(ratings[2])  # -99: not in catalogue
    assert 1.0 <= ratings[0] <= 5.0  # the ranker's rating, clipped to the data's
    assert len(model.similar_items(int(item_ids[0, 0]), k=4)) == 4
    _check_id_arguments(model, int(users[0]), int(item_ids[0, 0]))

    result = model.evaluate(test, **columns)
    # The names fit was given are remembered: they had to be passed again.
    assert model.evaluate(test).ndcg == result.ndcg
    assert 0 < result.ndcg[10] <= 1 and 0 < result.recall[10] <= 1
    assert result.rmse is not None and result.rmse < 4
    assert 0 <= result.factorized_top_k[100] <= 1
    assert "ndcg@10=" in repr(result)
    # the served list's figures carry their standard errors (the ranker's list)
    served_errors = result.ranking["standard_errors"]["two_stage"]["ndcg"]
    assert result.standard_errors["ndcg"][10] == served_errors["10"] > 0
    assert result.to_dict()["standard_errors"]["hit_rate"]["10"] > 0
    assert f" ± {served_errors['10']:.4f}, recall@10=" in repr(result)
    # num_users counted every test user, the ones the figures leave out too
    counts = result.retrieval.counts["exclude_seen"]
    assert result.num_users == counts["num_queries_with_relevant"] > 0
    # per_user: the served list's figures of each of those users, under the
    # user column's own name, each the user's own.
    table = model.evaluate(test, per_user=True).per_user
    assert result.per_user is None and table is not None
    assert table.height == result.num_users and table.columns[:2] == ["uid", "query"]
    assert table["query"].n_unique() == table.height  # no per-row context: a user each
    assert table["ndcg@10"].mean() == pytest.approx(result.ndcg[10], rel=1e-5)
    row = table.row(0, named=True)
    listed = {e["item_id"] for e in model.recommend(row["uid"], k=10).items}
    seen = set(train.loc[train["uid"] == row["uid"], "movie"])
    wanted = set(test.loc[test["uid"] == row["uid"], "movie"]) - seen
    assert row["recall@10"] == pytest.approx(len(listed & wanted) / len(wanted))
    assert "per_user" not in result.to_dict()
    trained_on = model.evaluate(train.head(20))  # every pair a training row
    assert trained_on.num_users == 0 and math.isnan(trained_on.ndcg[10])

    bundle = model.save(tmp_path / "models" / "mine" / "1")
    again = twostage.TwoStageModel.load(tmp_path / "models" / "mine")
    ids_again, scores_again = again.recommend(users, k=5)
    assert (ids_again == item_ids).all()
    np.testing.assert_allclose(scores_again, scores, rtol=0, atol=0)
    np.testing.assert_array_equal(
        again.predict([users[0]], [item_ids[0, 0]]), ratings[:1]
    )
    assert again.evaluate(test, **columns).ndcg == result.ndcg
    assert bundle.exists()

    # Items the model never trained on join its catalogue (no item features
    # here: each is the unknown item's vector, which a warning says) and are
    # scored, not NaN.
    with caplog.at_level("WARNING", logger="twostage.recommender"):
        assert again.add_items(pd.DataFrame({"item_id": [9001, 9002]})) is again
    assert "each of the 2 added item(s) is the unknown item's vector" in caplog.text
    assert not np.isnan(again.predict([users[0], users[0]], [9001, 9002])).any()
    everything = again.recommend(users[0], k=200, exclude_seen=False)
    assert {9001, 9002} <= {e["item_id"] for e in everything.items}
    grown = again.save(tmp_path / "models" / "mine" / "2")
    reloaded = twostage.TwoStageModel.load(grown)
    assert reloaded.recommender.added_items["item_id"].to_list() == [9001, 9002]
    assert reloaded.remove_items(np.array([9001])) is reloaded
    everything = reloaded.recommend(users[0], k=200, exclude_seen=False)
    assert 9001 not in {e["item_id"] for e in everything.items}
    assert reloaded.restore_items([9001]) is reloaded  # back in stock
    everything = reloaded.recommend(users[0], k=200, exclude_seen=False)
    assert 9001 in {e["item_id"] for e in everything.items}
    closest = [e["item_id"] for e in reloaded.similar_items(9002, 3)]
    others = reloaded.similar_items(9002, 3, exclude=closest[:1])
    assert [e["item_id"] for e in others][:2] == closest[1:]


def test_estimator_takes_explicit_validation_and_test(frames) -> None:
    train, test = frames
    model = twostage.TwoStageModel(settings=SETTINGS, ranking=False, progress=False)
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    half = len(test) // 2
    model.fit(train, validation=test[:half], test=test[half:], **columns)
    assert model.split_.fit.num_interactions == len(train)
    assert model.split_.validation.num_interactions == half
    assert model.test_metrics_ is not None and model.test_metrics_.ndcg[10] > 0
    # No ranker: predict is the retrieval score, recommend's first score.
    ids, scores = model.recommend([train["uid"].iloc[0]], k=3)
    predicted = model.predict([train["uid"].iloc[0]], [ids[0, 0]])
    assert predicted[0] == pytest.approx(scores[0, 0], abs=1e-5)
    _check_id_arguments(model, int(train["uid"].iloc[0]), int(ids[0, 0]))


def test_users_left_out_of_the_figures_are_said(frames, caplog) -> None:
    """Evaluating on training rows gave NaN figures and num_users 0 without a
    word (the CLI said it; Python did not): the users whose test items were
    all seen are now counted in a warning, and all of them is said as such."""
    train, test = frames
    model = twostage.TwoStageModel(settings=SETTINGS, ranking=False, progress=False)
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    model.fit(train, **columns)
    with caplog.at_level(logging.WARNING, logger="twostage"):
        seen = model.evaluate(train.head(200))
    assert seen.num_users == 0 and np.isnan(seen.ndcg[10])
    users = train.head(200)["uid"].nunique()
    assert f"none of the {users} test users" in caplog.text
    caplog.clear()
    mixed = pd.concat([test, train.head(200)])
    with caplog.at_level(logging.WARNING, logger="twostage"):
        both = model.evaluate(mixed)
    left = both.retrieval.counts["exclude_seen"]["num_queries_without_relevant"]
    assert left > 0 and both.num_users > 0
    total = mixed["uid"].nunique()
    assert f"{left} of {total} test users are left out" in caplog.text


def _check_id_arguments(model: "twostage.TwoStageModel", user: int, item: int) -> None:
    """IDs are taken as recommend() takes them: integers or strings (digits find
    integer IDs), unknown ones as unknown; other types and empty or empty test
    tables are clear errors. `predict([True], ...)` scored user 1 by its dtype,
    `predict([], [])` and `evaluate(<no rows>)` ended in a reshape RuntimeError,
    and an unknown string user in a DataError."""
    known = model.predict([user, str(user)], [item, str(item)])
    assert known[0] == known[1]
    cold = model.predict([None, "nobody", 10**6], [item, item, item])
    assert cold[0] == cold[1] == cold[2]
    assert np.isnan(model.predict([user], ["no-such-item"])[0])
    assert model.predict([], []).shape == (0,)
    for users, message in [
        ([True], r"`user_ids\[0\]` should be an integer or string ID"),
        ([user, 1.0], r"`user_ids\[1\]` should be an integer or string ID"),
        ([float("nan")], r"`user_ids\[0\]`"),
    ]:
        with pytest.raises(twostage.TwostageError, match=message):
            model.predict(users, [item] * len(users))
    with pytest.raises(twostage.TwostageError, match=r"`item_ids\[0\]`"):
        model.predict([user], [float(item)])
    with pytest.raises(twostage.TwostageError, match="a set"):
        model.recommend({user}, k=3)
    with pytest.raises(twostage.TwostageError, match="the test table has no rows"):
        model.evaluate(pd.DataFrame({"uid": [], "movie": [], "stars": []}))


def test_feature_tables_are_checked_against_the_log(
    frames, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """`fit(users=...)` attached the table unchecked: keys written "0001" for the
    log's 1 matched no user, and the feature trained as unknown for everyone."""
    train, _ = frames
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    ids = sorted(train["uid"].unique())
    ages = pd.DataFrame({"uid": [str(u) for u in ids], "age": range(len(ids))})
    model = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1}, ranking=False, progress=False
    )
    model.fit(train, users=ages, **columns)  # text keys written plainly: matched
    users = model.split_.fit.users
    assert users["user_id"].dtype == model.split_.fit.interactions["user_id"].dtype
    tables = model.recommender.run.tensors.user_features
    assert float(tables["age"][1:].float().std()) > 0  # the values reached the model
    padded = ages.assign(uid=[f"{u:05d}" for u in ids])
    with pytest.raises(twostage.TwostageError, match="'00001' is not an integer"):
        model.fit(train, users=padded, **columns)
    strangers = ages.assign(uid=[str(u + 10**6) for u in ids])
    with caplog.at_level("WARNING", logger="twostage"):
        model.fit(train, users=strangers, **columns)
    assert "0 of" in caplog.text and "do its keys match the log's?" in caplog.text

    # A file keyed user_id (not the log's "uid"), named by the setting
    # `data.user_table` (it was read by the CLI only), and not twice.
    path = tmp_path / "ages.csv"
    ages.rename(columns={"uid": "user_id"}).to_csv(path, index=False)
    named = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1, "data.user_table": str(path)},
        ranking=False,
        progress=False,
    )
    named.fit(train, **columns)
    assert named.split_.fit.users is not None
    assert "age" in named.split_.fit.users.columns
    with pytest.raises(twostage.TwostageError, match="both name a feature table"):
        named.fit(train, users=ages, **columns)

    # A table keyed otherwise (Steam's games: `id`), named by `data.user_table_key`.
    keyed = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1, "data.user_table_key": "customer"},
        ranking=False,
        progress=False,
    )
    keyed.fit(train, users=ages.rename(columns={"uid": "customer"}), **columns)
    assert keyed.split_.fit.users is not None
    assert keyed.split_.fit.users["age"].to_list() == list(range(len(ids)))
    with pytest.raises(twostage.TwostageError, match="none was given"):
        keyed.fit(train, **columns)
    # A file without a header, its columns named by `data.user_table_columns`.
    bare = tmp_path / "ages.dat"
    ages.to_csv(bare, index=False, header=False)
    named_columns = twostage.TwoStageModel(
        settings={
            **SETTINGS,
            "train.epochs": 1,
            "data.user_table_columns": ["uid", "age"],
        },
        ranking=False,
        progress=False,
    )
    named_columns.fit(train, users=str(bare), **columns)
    assert named_columns.split_.fit.users is not None
    assert named_columns.split_.fit.users["age"].to_list() == list(range(len(ids)))


def test_fit_reads_the_training_rows_weights(frames) -> None:
    """`weight_col`: the estimator had no way to pass a log's weights."""
    train, test = frames
    weighted = train.assign(w=(train["movie"] % 3).astype(float))
    model = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1}, ranking=False, progress=False
    )
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    half = len(test) // 2  # held-out frames without the column: read unweighted
    model.fit(
        weighted,
        validation=test[:half],
        test=test[half:],
        weight_col="w",
        **columns,
    )
    fitted = model.split_.fit.interactions
    assert fitted["weight"].to_list() == weighted["w"].astype("float32").tolist()
    assert "weight" not in model.split_.validation.interactions.columns
    assert model.evaluate(test[half:]).num_users > 0  # read without `w`


def test_per_user_figures_of_a_per_row_context_model_carry_each_query() -> None:
    """A model that reads per-row context has a query per test row, so a user
    has several rows in `per_user`: they carried the user ID alone, and two such
    tables could only be joined on position."""
    data = generate(num_users=60, num_items=40, num_interactions=1500, seed=5)
    train, test = twostage.random_split(data, test_fraction=0.2, seed=0)
    settings = {**SETTINGS, "train.epochs": 1, "retrieval.query_fields": ["timestamp"]}
    model = twostage.TwoStageModel(settings=settings, ranking=False, progress=False)
    model.fit(train.interactions.to_pandas(), time_col="timestamp")
    result = model.evaluate(test.interactions.to_pandas(), per_user=True)
    table = result.per_user
    assert table is not None and table.columns[:2] == ["user_id", "query"]
    assert (
        table.height == result.num_users and table["query"].n_unique() == table.height
    )
    assert table["user_id"].n_unique() < table.height  # users with several test rows
    assert table["ndcg@10"].mean() == pytest.approx(result.ndcg[10], rel=1e-5)


def test_fit_reads_unrated_values(frames) -> None:
    """`data.unrated_values` was refused by `fit`: Goodreads' 0 ("not rated") had
    to be nulled by hand, or the ranker learned 0 as a rating."""
    train, test = frames
    zeros = train.assign(stars=train["stars"].where(train["movie"] % 4 != 0, 0.0))
    settings = {**SETTINGS, "train.epochs": 1, "data.unrated_values": [0.0]}
    model = twostage.TwoStageModel(settings=settings, progress=False)
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    half = len(test) // 2
    model.fit(zeros, validation=test[:half].assign(stars=0.0), **columns)
    fitted = model.split_.fit.interactions
    assert fitted.height == len(zeros)  # the rows stay
    assert fitted["rating"].null_count() == int((zeros["stars"] == 0).sum()) > 0
    assert model.split_.validation.interactions["rating"].null_count() == half
    assert model.evaluate(test[half:]).num_users > 0


def test_unfitted_and_mismatched_calls_are_clear_errors() -> None:
    model = twostage.TwoStageModel(progress=False)
    with pytest.raises(twostage.TwostageError, match="not fitted"):
        model.recommend([1], k=3)
    with pytest.raises(twostage.TwostageError, match=r"train\.epochs"):
        twostage.TwoStageModel(settings={"train.epoch": 3})
    # `data` settings the estimator does not read were ignored without a word.
    unread = twostage.TwoStageModel(
        settings={"data.split": "temporal", "data.test_users": 5}, progress=False
    )
    with pytest.raises(twostage.TwostageError) as refused:
        unread.fit(pl.DataFrame({"user_id": [1], "item_id": [2]}))
    message = str(refused.value)
    assert "`data.split` (it fits on the rows given" in message
    assert "`data.test_users` (pass test=" in message
    # Column settings are fit's defaults (a saved config keeps them); a column
    # given beside a different setting is refused.
    named = twostage.TwoStageModel(settings={"data.user_col": "uid"}, progress=False)
    with pytest.raises(twostage.TwostageError, match="name different columns"):
        named.fit(pl.DataFrame({"u": [1], "item_id": [2]}), user_col="u")


def test_tensorboard_logs_both_stages(frames, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    train, _ = frames
    model = twostage.TwoStageModel(
        settings=SETTINGS, progress=False, tensorboard=tmp_path / "tb"
    )
    model.fit(train, user_col="uid", item_col="movie", rating_col="stars")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"retrieval/step_loss", "retrieval/train_loss", "ranking/train_loss"} <= tags
    epochs = [e.step for e in events.Scalars("retrieval/train_loss")]
    assert epochs == [1, 2]  # 1-based, one point per epoch


def test_tensorboard_keeps_an_ensembles_members_apart(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    from twostage.tracking import TensorBoardLogger

    history = [
        {"epoch": e, "train_loss": 1.0 + e + m, "member": m}
        for m in (0, 1)
        for e in (0, 1)
    ]
    logger = TensorBoardLogger(tmp_path / "tb", every=1)
    logger.log_epochs("retrieval", history)
    for member in (0, 1):
        logger.on_step({"step": 0, "loss": 5.0 + member, "member": member})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {
        "retrieval/train_loss",
        "retrieval/member-1/train_loss",
        "retrieval/step_loss",
        "retrieval/member-1/step_loss",
    }
    losses = [e.value for e in events.Scalars("retrieval/member-1/train_loss")]
    assert losses == [2.0, 3.0]


def test_a_model_fitted_on_tables_is_not_evaluated_on_another_dataset(
    frames, tmp_path: Path
) -> None:
    """A bundle saved by TwoStageModel.fit kept `data.dataset` = "movielens-100k"
    (the default), and `twostage evaluate` / `report` rebuilt a "test split" of
    MovieLens-100k for it: figures of another dataset, without a word."""
    from typer.testing import CliRunner

    from twostage.cli import app

    train, test = frames
    columns = {"user_col": "uid", "item_col": "movie", "rating_col": "stars"}
    model = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1}, ranking=False, progress=False
    )
    model.fit(train, **columns)
    bundle = model.save(tmp_path / "bundle")
    runner = CliRunner()
    refused = runner.invoke(app, ["evaluate", str(bundle)])
    assert refused.exit_code != 0
    assert "fitted on tables given in Python (TwoStageModel.fit" in str(
        refused.exception
    )
    rows = tmp_path / "test.csv"  # as the training rows came (the bundle says so)
    test.to_csv(rows, index=False)
    measured = runner.invoke(
        app, ["evaluate", str(bundle), "--test", str(rows), "--json"]
    )
    assert measured.exit_code == 0, measured.output
    counts = json.loads(measured.stdout)["retrieval"]["twostage"]["counts"]
    assert counts["include_seen"]["num_queries"] > 0


def test_a_loaded_model_evaluates_rows_without_their_feature_columns(
    models_dir: Path,
) -> None:
    """TwoStageModel.load(...).evaluate(rows) of a model with side features ended
    in "`frame` lacks column(s) ['age', ...]": its feature tables are read from
    its training data, as `twostage evaluate --test` reads them."""
    from twostage.data.synthetic import generate

    model = twostage.TwoStageModel.load(models_dir / "synthetic")
    rows = generate(num_users=200, num_items=80, num_interactions=400, seed=9)
    result = model.evaluate(rows.interactions.select("user_id", "item_id", "timestamp"))
    assert result.num_users > 0


def test_fit_reads_a_file_with_the_data_reading_settings(tmp_path: Path) -> None:
    """`data.time_unit`, `data.weight_values` (and `separator`, `time_format`)
    were refused by `fit`, so a RetailRocket-style log had to be read by hand; a
    bundle now records them, and `evaluate --test` reads new rows the same way."""
    from typer.testing import CliRunner

    from twostage.cli import app

    data = generate(num_users=60, num_items=40, num_interactions=1500, seed=5)
    kinds = ["view", "view", "transaction"]
    log = data.interactions.select(
        visitor=pl.col("user_id"),
        item=pl.col("item_id"),
        timestamp=pl.col("timestamp") * 1000 + 123,  # milliseconds
        event=pl.Series([kinds[n % 3] for n in range(data.interactions.height)]),
    )
    path = tmp_path / "events.csv"
    log.head(1200).write_csv(path, separator=";")
    settings = {
        **SETTINGS,
        "train.epochs": 1,
        "data.separator": ";",
        "data.time_unit": "ms",
        "data.weight_values": ["view=1", "transaction=5"],
    }
    model = twostage.TwoStageModel(settings=settings, ranking=False, progress=False)
    model.fit(path, user_col="visitor", item_col="item", weight_col="event")
    fitted = model.split_.fit.interactions
    assert fitted["timestamp"].max() < 4_102_444_800  # seconds, not milliseconds
    assert set(fitted["weight"].unique().to_list()) == {1.0, 5.0}
    bundle = model.save(tmp_path / "bundle")
    rows = tmp_path / "week.csv"
    log.tail(300).drop("event").write_csv(rows, separator=";")  # named as in training
    measured = CliRunner().invoke(
        app, ["evaluate", str(bundle), "--test", str(rows), "--json"]
    )
    assert measured.exit_code == 0, measured.output
    # Without the weight column named, or with a Dataset already read: refused.
    unnamed = twostage.TwoStageModel(settings=settings, progress=False)
    with pytest.raises(twostage.TwostageError, match=r"fit\(weight_col=\.\.\.\)"):
        unnamed.fit(path, user_col="visitor", item_col="item")
    read = twostage.read_interactions(
        path, user_col="visitor", item_col="item", separator=";", time_unit="ms"
    )
    unweighted = {k: v for k, v in settings.items() if k != "data.weight_values"}
    with pytest.raises(twostage.TwostageError, match="this Dataset was read already"):
        twostage.TwoStageModel(settings=unweighted, progress=False).fit(read)


def test_new_rows_of_a_headerless_log_may_name_their_columns(tmp_path: Path) -> None:
    """`data.column_names` (a headerless training log, as Amazon's) was applied to
    every later file: `evaluate --test week.parquet` and a week's CSV with a header
    were refused, and `fit(validation=frame)` too."""
    from typer.testing import CliRunner

    from twostage.cli import app

    data = generate(num_users=60, num_items=40, num_interactions=1500, seed=6)
    rows = data.interactions.select(
        u=pl.col("user_id"), i=pl.col("item_id"), r=pl.col("rating"), t="timestamp"
    )
    log = tmp_path / "ratings.csv"
    rows.head(1000).write_csv(log, include_header=False)
    settings = {
        **SETTINGS,
        "train.epochs": 1,
        "data.column_names": ["u", "i", "r", "t"],
    }
    columns = {"user_col": "u", "item_col": "i", "rating_col": "r", "time_col": "t"}
    model = twostage.TwoStageModel(settings=settings, ranking=False, progress=False)
    model.fit(log, validation=rows.slice(1000, 200).to_pandas(), **columns)
    bundle = model.save(tmp_path / "bundle")
    week = rows.tail(300)
    files = {
        "week.parquet": week.write_parquet,
        "week.csv": week.write_csv,
        "headerless.csv": lambda p: week.write_csv(p, include_header=False),
    }
    loaded = twostage.TwoStageModel.load(bundle)
    figures = set()
    for name, write in files.items():
        write(tmp_path / name)
        measured = CliRunner().invoke(
            app, ["evaluate", str(bundle), "--test", str(tmp_path / name), "--json"]
        )
        assert measured.exit_code == 0, (name, measured.output)
        figures.add(loaded.evaluate(tmp_path / name).ndcg[10])
    assert len(figures) == 1  # the same rows, however they came
    # A new model from the saved config refits on the same file as it was read.
    again = twostage.TwoStageModel(loaded.config, ranking=False, progress=False)
    again.fit(log)
    assert again.split_ is not None and again.split_.fit.report is not None
    assert again.split_.fit.report.rows_loaded == 1000
    # The training file itself is still read by the names given.
    with pytest.raises(twostage.TwostageError, match="names its columns itself"):
        model.fit(tmp_path / "week.parquet", **columns)


def test_a_model_fitted_on_feature_tables_measures_new_rows_after_a_reload(
    tmp_path: Path,
) -> None:
    """A model fitted on tables given in Python records no data to read them from:
    `evaluate --test` and `TwoStageModel.load(...).evaluate(rows)` stopped with "the
    new rows carry no feature columns", and `predict` of a retrieval-only model
    ended in "lacks column(s)". Known users read the features they trained with."""
    from typer.testing import CliRunner

    from twostage.cli import app

    data = generate(num_users=80, num_items=60, num_interactions=2000, seed=6)
    train, test = twostage.random_split(data, test_fraction=0.2, seed=1)
    model = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1}, ranking=False, progress=False
    )
    model.fit(train.interactions, users=data.users, items=data.items)
    assert model.recommender.run.reads_user_table
    rows = test.interactions.select("user_id", "item_id", "timestamp")
    known = rows.filter(
        pl.col("user_id").is_in(train.interactions["user_id"].implode())
    )
    in_memory = model.evaluate(known)
    bundle = model.save(tmp_path / "bundle")
    loaded = twostage.TwoStageModel.load(bundle)
    again = loaded.evaluate(known)
    # The same features, the same figures.
    assert (again.ndcg, again.recall) == (in_memory.ndcg, in_memory.recall)
    assert again.num_users == in_memory.num_users > 0
    pairs = known.head(5)
    scores = loaded.predict(pairs["user_id"].to_list(), pairs["item_id"].to_list())
    assert np.isfinite(scores).all()
    assert np.allclose(
        scores, model.predict(pairs["user_id"].to_list(), pairs["item_id"].to_list())
    )
    path = tmp_path / "week.csv"
    rows.with_columns(
        pl.col("user_id") + 10_000 * (pl.int_range(pl.len()) % 2)
    ).write_csv(path)  # every other row from a user the model never saw
    measured = CliRunner().invoke(
        app, ["evaluate", str(bundle), "--test", str(path), "--json"]
    )
    assert measured.exit_code == 0, measured.output
    said = " ".join(measured.stderr.split())
    assert "test users are unknown to the model and are scored without features" in said
    assert "fitted on tables given in Python" in said


def test_sessions_are_read_with_the_column_names_fit_was_given(frames) -> None:
    train, _ = frames
    model = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1}, ranking=False, progress=False
    )
    model.fit(train, user_col="uid", item_col="movie", rating_col="stars")
    visits = pd.DataFrame({"visit": ["a", "a", "b"], "movie": [3, 5, 7]})
    found = model.recommend_sessions(visits, 4, session_col="visit")
    for session, items in (("a", [3, 5]), ("b", [7])):
        mine = found.lists.filter(pl.col("session_id") == session)["item_id"]
        served = model.recommender.recommend(None, 4, session=items)
        assert mine.to_list() == [entry["item_id"] for entry in served.items]
    assert found.unread.height == 0
    with pytest.raises(DataError, match="has both 'movie' and 'item_id'"):
        model.recommend_sessions(visits.assign(item_id=1), 4, session_col="visit")
    with pytest.raises(ConfigError, match="polars, pandas or pyarrow table"):
        model.recommend_sessions([3, 5], 4)
    # A pyarrow table reads as the pandas frame did, here and one level down.
    arrow = pl.from_pandas(visits).to_arrow()
    as_arrow = model.recommend_sessions(arrow, 4, session_col="visit")
    assert as_arrow.lists.equals(found.lists)
    below = model.recommender.recommend_sessions(
        visits.rename(columns={"visit": "session_id", "movie": "item_id"}), 4
    )
    assert below.lists.equals(found.lists)
    as_dict = model.recommend_sessions(
        {"visit": ["a", "a"], "movie": [3, 5]}, 4, session_col="visit"
    )
    alone = found.lists.filter(pl.col("session_id") == "a")
    assert as_dict.lists["item_id"].to_list() == alone["item_id"].to_list()


def test_session_figures_come_with_the_baselines_fitted_on_what_fit_was_given(
    frames, tmp_path: Path
) -> None:
    """`evaluate_sessions` reads the frame with fit's column names and fits the
    baselines on fit's rows (the EASE row is EASE fitted on those rows, fed each
    session's earlier items); a loaded model keeps no rows, so it says so."""
    from twostage.baselines import EASE

    train, _ = frames
    model = twostage.TwoStageModel(
        settings={**SETTINGS, "train.epochs": 1}, ranking=False, progress=False
    )
    model.fit(train, user_col="uid", item_col="movie", rating_col="stars")
    visits = pd.DataFrame(
        {"visit": [1, 1, 1, 2, 2, 3, 3], "movie": [3, 5, 7, 9, 11, 13, 2]}
    )
    found = model.evaluate_sessions(visits, session_col="visit")
    assert found["sessions"] == 3 and "ease" in found["baselines"]
    rec = model.recommender
    ease = EASE().fit(rec.run.tensors.seen(), num_items=rec.num_trained_items)
    hits = []
    for query, target in (([3, 5], 7), ([9], 11), ([13], 2)):
        read = torch.tensor([[rec.item_vocab.lookup(i) for i in query]])
        scores = ease.score_sequences(read)[0]
        scores[[0, *read[0].tolist()]] = -torch.inf
        top = torch.sort(scores, descending=True, stable=True).indices[:10]
        hits.append(rec.item_vocab.lookup(target) in top.tolist())
    assert found["baselines"]["ease"]["hit_rate"][10] == pytest.approx(
        sum(hits) / len(hits)
    )
    alone = model.evaluate_sessions(visits, session_col="visit", baselines=False)
    assert "baselines" not in alone and alone["twostage"] == found["twostage"]
    bundle = model.save(tmp_path / "bundle")
    loaded = twostage.TwoStageModel.load(bundle)
    with pytest.raises(ConfigError, match="a loaded model keeps none"):
        loaded.evaluate_sessions(visits, session_col="visit")
    # The CLI reads the training rows again from the saved config, which names
    # none here: it says so and how to do without them.
    from typer.testing import CliRunner

    from twostage.cli import app

    path = tmp_path / "visits.csv"
    visits.rename(columns={"visit": "session_id", "movie": "item_id"}).to_csv(
        path, index=False
    )
    args = ["evaluate", str(bundle), "--sessions", str(path)]
    refused = CliRunner().invoke(app, [*args, "--baselines"])
    said = " ".join(refused.output.replace("│", " ").split())
    assert refused.exit_code == 2 and "Or drop --baselines" in said, said
    alone = CliRunner().invoke(app, [*args, "--json"])
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout)["twostage"]["ndcg"]["10"] == pytest.approx(
        found["twostage"]["ndcg"][10]
    )
