"""Training from a Parquet log that is never loaded as a table: the same weights as
the in-memory path on the same training rows, and a servable run."""

import importlib.util
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import Dataset
from twostage.data.split import ExperimentSplit, leave_last_out
from twostage.data.streaming import (
    Reading,
    count_values,
    held_out_mask,
    iter_batches,
    split_rule,
)
from twostage.data.synthetic import planted_impressions, write_parquet
from twostage.errors import ConfigError, DataError
from twostage.recommender import Recommender, load
from twostage.retrieval.fit import fit_retrieval
from twostage.retrieval.streamed import check_data_options, fit_streamed_retrieval

ID_ONLY = [
    "retrieval.use_side_features=false",
    "retrieval.history_length=0",
    "retrieval.popularity_fallback=0",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "data.validation_fraction=0",
    "train.epochs=2",
    "train.batch_size=256",
    "train.num_threads=1",
]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log")
    write_parquet(
        path,
        num_users=400,
        num_items=150,
        num_interactions=12_000,
        num_clusters=5,
        rows_per_file=5_000,
        rows_per_group=1_000,
        seed=2,
    )
    return path


def _in_memory_split(data: Dataset, split: str = "random") -> ExperimentSplit:
    """The split the streamed path draws, made in memory on ``data``'s rows (in
    file order): the same rows on each side."""
    table = data.interactions
    if split == "leave-last-out":
        held = leave_last_out(data)
        assert 0 < held.test.num_interactions <= data.num_users
        return ExperimentSplit(fit=held.train, validation=None, test=held.test)
    if split == "temporal":
        cut = table["timestamp"].quantile(0.8, interpolation="lower")
        test = (table["timestamp"] >= cut).to_numpy()
    else:
        test = held_out_mask(table, method="random", test_fraction=0.2, seed=42)
    return ExperimentSplit(
        fit=data.with_interactions(table.filter(pl.Series(~test))),
        validation=None,
        test=data.with_interactions(table.filter(pl.Series(test))),
    )


def _two_files(table: pl.DataFrame, directory: Path, at: int, groups: int) -> Path:
    """``table`` as two Parquet files cut at row ``at``, in row groups of ``groups``
    and ``groups // 2`` rows."""
    directory.mkdir()
    table.slice(0, at).write_parquet(directory / "a.parquet", row_group_size=groups)
    table.slice(at).write_parquet(directory / "b.parquet", row_group_size=groups // 2)
    return directory


WEIGHTED = ["retrieval.rating_weights=true", "retrieval.popularity_days=30"]
#: The GRU trained on every position of each user's windows, with time gaps and
#: the history items' ratings.
SEQUENCES = [
    "retrieval.query_encoder=gru",
    "retrieval.examples=sequences",
    "retrieval.negatives=full",
    "retrieval.sequence_time_gaps=true",
    "retrieval.sequence_ratings=true",
]


@pytest.mark.parametrize(
    ("split", "history", "extra"),
    [
        ("random", 0, []),
        ("temporal", 0, []),
        ("random", 8, []),
        ("temporal", 8, WEIGHTED),
        ("leave-last-out", 8, []),
        ("leave-last-out", 6, SEQUENCES),
        ("random", 6, ["retrieval.examples=users"]),
    ],
)
def test_streamed_training_equals_the_in_memory_path(
    log: Path, split: str, history: int, extra: list[str]
) -> None:
    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            f"data.split={split}",
            f"retrieval.history_length={history}",
            *extra,
        ],
    )
    streamed = fit_streamed_retrieval(config, log)

    # The same training rows, loaded and split in memory, in file order.
    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    parts = _in_memory_split(Dataset(name="log", interactions=table), split)
    in_memory, _ = fit_retrieval(config, split=parts, evaluate_test=False)

    assert torch.equal(streamed.tensors.users, in_memory.tensors.users)
    assert torch.equal(streamed.tensors.items, in_memory.tensors.items)
    assert streamed.tensors.history.shape == (in_memory.tensors.history.shape)
    assert torch.equal(streamed.tensors.history, in_memory.tensors.history)
    for name in (
        "sequences",
        "sequence_users",
        "history_times",
        "sequence_times",
        "history_ratings",
        "sequence_ratings",
        "rating_edges",
        "rating_range",
    ):
        mine_s, theirs_s = (
            getattr(streamed.tensors, name),
            getattr(in_memory.tensors, name),
        )
        assert torch.equal(mine_s, theirs_s), name
        assert (mine_s.numel() > 0) == (extra == SEQUENCES), name
    for name in ("weights", "popularity"):  # rating weights, recent popularity
        mine_t, theirs_t = (
            getattr(streamed.tensors, name),
            getattr(in_memory.tensors, name),
        )
        assert (mine_t is None) == (theirs_t is None) == (extra != WEIGHTED), name
        if mine_t is not None:
            assert torch.equal(mine_t, theirs_t), name
    if history:  # every user with 8+ training rows has a full history
        assert int((streamed.tensors.history > 0).sum(1).max()) == history
    mine, theirs = streamed.model.state_dict(), in_memory.model.state_dict()
    assert set(mine) == set(theirs)
    for name, weights in theirs.items():
        torch.testing.assert_close(mine[name], weights, msg=name)


def test_a_streamed_ensemble_equals_the_in_memory_one(
    log: Path, tmp_path: Path
) -> None:
    """`retrieval.ensemble` trains from a stream (it was refused): a trained
    member beside EASE and the transition counts, validated on each user's last
    training row and the closed-form members refitted with those rows, gives the
    in-memory run's weights, factors and lists on the same split; the run saves
    and answers."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            *SEQUENCES,
            "data.split=leave-last-out",
            "data.validation_fraction=0.1",
            "retrieval.history_length=6",
            "retrieval.ensemble=ease,transition",
            "retrieval.ensemble_weights=1,0.05,0.02",
            "retrieval.ease_rank=16",
        ],
    )
    torch.set_num_threads(2)  # `train.num_threads` applies (it did not here)
    streamed = fit_streamed_retrieval(config, log, out_dir=tmp_path / "run")
    assert torch.get_num_threads() == 1

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    held = leave_last_out(Dataset(name="log", interactions=table))
    inner = leave_last_out(held.train)
    parts = ExperimentSplit(fit=inner.train, validation=inner.test, test=held.test)
    in_memory, _ = fit_retrieval(config, split=parts, evaluate_test=False)

    assert torch.equal(streamed.tensors.history, in_memory.tensors.history)
    mine, theirs = streamed.model.state_dict(), in_memory.model.state_dict()
    assert set(mine) == set(theirs) and any(".left" in name for name in mine)
    for name, weights in theirs.items():
        torch.testing.assert_close(mine[name], weights, msg=name)
    assert streamed.metrics == in_memory.evaluate(held.test).to_dict()
    rec = load(tmp_path / "run")
    user = table["user_id"][0]
    answer = rec.recommend(user, 5)
    assert len(answer.items) == 5
    assert answer.items == Recommender(in_memory).recommend(user, 5).items


@pytest.mark.parametrize("history", [0, 8])
def test_a_streamed_run_saves_loads_and_answers(
    log: Path, tmp_path: Path, history: int
) -> None:
    config = apply_overrides(
        ExperimentConfig(), [*ID_ONLY, f"retrieval.history_length={history}"]
    )
    run = fit_streamed_retrieval(config, log, out_dir=tmp_path / "run")
    rec = load(tmp_path / "run")
    user = rec.user_vocab.values[0]
    answer = rec.recommend(user, 10)
    assert answer.path == "personalised" and len(answer.items) == 10
    assert answer.items == Recommender(run).recommend(user, 10).items


def _three_sides(
    log: Path, split: str, missing_ratings: str = "reject"
) -> ExperimentSplit:
    """The streamed split's test side and validation carve-out (10% of the
    training rows), made in memory on the log's rows in file order."""
    from twostage.data.split import validation_split
    from twostage.data.streaming import VALIDATION_SEED_OFFSET

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(
        iter_batches(
            log, columns=columns, reading=Reading(missing_ratings=missing_ratings)
        )
    )
    parts = _in_memory_split(Dataset(name="log", interactions=table), split)
    train = parts.fit.interactions
    if split == "leave-last-out":
        fit, held = validation_split(parts.fit, method="leave-last-out")
        return ExperimentSplit(fit=fit, validation=held, test=parts.test)
    if split == "random":
        carved = held_out_mask(
            train,
            method="random",
            test_fraction=0.1,
            seed=42 + VALIDATION_SEED_OFFSET,
        )
    else:
        cut = train["timestamp"].quantile(0.9, interpolation="lower")
        carved = (train["timestamp"] >= cut).to_numpy()
    return ExperimentSplit(
        fit=parts.fit.with_interactions(train.filter(pl.Series(~carved))),
        validation=parts.fit.with_interactions(train.filter(pl.Series(carved))),
        test=parts.test,
    )


@pytest.mark.parametrize(
    ("split", "extra"),
    [
        ("random", []),
        ("temporal", WEIGHTED),
        ("leave-last-out", []),
        ("leave-last-out", ["retrieval.session_knn_weight=-1"]),
    ],
)
def test_a_streamed_validation_carve_out_trains_as_the_in_memory_one(
    log: Path, split: str, extra: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """With `data.validation_fraction`, the carve-out's rows leave training, pick
    the best epoch, the fallback threshold (and the session-kNN weight), then join
    the history and seen items: the in-memory run on the same three sides, epoch
    by epoch."""

    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            f"data.split={split}",
            "data.validation_fraction=0.1",
            "retrieval.popularity_fallback=-1",
            "retrieval.history_length=8",
            "train.epochs=3",
            *extra,
        ],
    )
    with caplog.at_level("WARNING"):
        streamed = fit_streamed_retrieval(config, log)
    assert not caplog.records  # both settings are used

    three = _three_sides(log, split)
    fit, held = three.fit, three.validation
    assert held is not None
    in_memory, _ = fit_retrieval(config, split=three)

    train_rows = fit.num_interactions + held.num_interactions
    assert held.num_interactions >= 0.03 * train_rows  # loo: one row a user
    history = streamed.train_result.history
    assert [e["validation"] for e in history] == [
        e["validation"] for e in in_memory.train_result.history
    ]
    assert len({e["validation"] for e in history}) > 1  # the epochs differ
    assert streamed.fallback == in_memory.fallback is not None
    assert streamed.popularity_fallback == in_memory.popularity_fallback
    assert streamed.session_knn == in_memory.session_knn
    assert streamed.session_knn_weight == in_memory.session_knn_weight
    # the served tables hold the carve-out's rows again
    assert len(streamed.tensors.users) == fit.num_interactions + held.num_interactions
    for name in (
        "users",
        "items",
        "history",
        "neighbour_lengths",
        "neighbour_items",
        "neighbour_latest",
    ):
        assert torch.equal(
            getattr(streamed.tensors, name), getattr(in_memory.tensors, name)
        ), name
    if extra == WEIGHTED:
        assert streamed.tensors.popularity is not None
        assert torch.equal(streamed.tensors.popularity, in_memory.tensors.popularity)
    mine, theirs = streamed.model.state_dict(), in_memory.model.state_dict()
    for name, weights in theirs.items():
        torch.testing.assert_close(mine[name], weights, msg=name)
    torch.testing.assert_close(
        streamed.metrics["metrics"], in_memory.metrics["metrics"]
    )


@pytest.mark.parametrize(
    ("split", "context"),
    [("random", False), ("leave-last-out", False), ("random", True)],
)
def test_the_streamed_ranker_is_the_in_memory_one(
    log: Path, split: str, context: bool
) -> None:
    """Both stages from a stream: the ranker trains on the towers' training rows
    and their ratings (and each row's own context, where the towers read some),
    stops early and picks its blend on the carve-out, and both are measured on
    the test side, as `fit_two_stage` does on the same three sides."""
    from twostage.retrieval.streamed import fit_streamed_two_stage
    from twostage.two_stage import fit_two_stage

    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            f"data.split={split}",
            "data.validation_fraction=0.1",
            "retrieval.history_length=8",
            "ranking.epochs=3",
            "ranking.hidden_dims=[32]",
            *(["retrieval.query_fields=user_id,hour_of_day"] if context else []),
        ],
    )
    streamed = fit_streamed_two_stage(config, log)
    in_memory = fit_two_stage(config, split=_three_sides(log, split))

    mine, theirs = streamed.ranker, in_memory.ranker
    assert mine is not None and theirs is not None
    assert mine.reads_context == theirs.reads_context == context
    assert [e["validation"] for e in mine.history] == [
        e["validation"] for e in theirs.history
    ]
    assert mine.blend_weight == theirs.blend_weight
    assert torch.equal(mine.tensors.history, theirs.tensors.history)
    for name, weights in theirs.model.state_dict().items():
        torch.testing.assert_close(mine.model.state_dict()[name], weights, msg=name)
    assert streamed.ranking_metrics is not None
    assert in_memory.ranking_metrics is not None
    assert streamed.ranking_metrics["num_test_pairs"] == (
        in_memory.split.test.num_interactions
    )
    torch.testing.assert_close(streamed.ranking_metrics, in_memory.ranking_metrics)
    torch.testing.assert_close(
        streamed.retrieval.metrics["metrics"], in_memory.retrieval.metrics["metrics"]
    )
    rec = streamed.recommender()  # both stages serve
    answer = rec.recommend(rec.user_vocab.values[0], 5)
    assert len(answer.items) == 5 and answer.items == (
        in_memory.recommender().recommend(rec.user_vocab.values[0], 5).items
    )


def test_a_context_column_the_log_lacks_is_a_clear_error(log: Path) -> None:
    from twostage.errors import DataError

    context = apply_overrides(ExperimentConfig(), ["retrieval.query_fields=device"])
    with pytest.raises(ConfigError, match="device"):  # not a column of the log
        fit_streamed_retrieval(context, log)
    with pytest.raises(DataError, match="not in the log"):
        count_values(
            log, split_rule(log, method="random", test_fraction=0.2, seed=0), ["device"]
        )


def test_a_streamed_split_that_leaves_a_side_empty_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from twostage.errors import DataError

    tied = tmp_path / "tied.parquet"  # every row at one time: all after the cut
    pl.DataFrame(
        {"user_id": [1, 2, 3, 4], "item_id": [1, 2, 1, 2], "timestamp": [7] * 4}
    ).write_parquet(tied)
    temporal = apply_overrides(ExperimentConfig(), ["data.split=temporal"])
    with pytest.raises(DataError, match="streamed temporal split of 4 rows left none"):
        fit_streamed_retrieval(temporal, tied)
    once = apply_overrides(
        ExperimentConfig(), ["data.split=leave-last-out", "data.test_fraction=0.3"]
    )
    with (
        caplog.at_level("WARNING", logger="twostage"),
        pytest.raises(DataError, match="left none to test on"),  # one item a user
    ):
        fit_streamed_retrieval(once, tied)
    # as in memory: the fraction sizes no leave-last-out test, and the run says so
    assert "data.test_fraction=0.3 is not used by the leave-last-out" in caplog.text
    millis = tmp_path / "millis.parquet"  # every row rejected: say why, as in memory
    pl.DataFrame(
        {"user_id": [1, 2], "item_id": [1, 2], "timestamp": [1700000000123] * 2}
    ).write_parquet(millis)
    with pytest.raises(DataError, match=r"every row read was rejected.*--time-unit ms"):
        fit_streamed_retrieval(temporal, millis)


def test_a_streamed_logs_weights_train_as_in_memory(log: Path, tmp_path: Path) -> None:
    """`data.weight_col` was refused under --stream: a streamed log read no weights."""
    from twostage.errors import DataError
    from twostage.retrieval.streamed import fit_streamed_two_stage

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    plays = table.with_columns(plays=(pl.col("item_id") % 4).cast(pl.Int32))
    weighted = _two_files(plays, tmp_path / "weighted", 7_000, 1_000)
    config = apply_overrides(
        ExperimentConfig(), [*ID_ONLY, "data.weight_col=plays", *WEIGHTED]
    )
    streamed = fit_streamed_retrieval(config, weighted)
    in_memory_log = Dataset(
        name="log",
        interactions=plays.rename({"plays": "weight"}).with_columns(
            pl.col("weight").cast(pl.Float32)
        ),
    )
    parts = _in_memory_split(in_memory_log)
    in_memory, _ = fit_retrieval(config, split=parts, evaluate_test=False)
    assert (
        streamed.tensors.weights is not None and in_memory.tensors.weights is not None
    )
    assert torch.equal(streamed.tensors.weights, in_memory.tensors.weights)
    assert float(streamed.tensors.weights.min()) == 0.0  # item_id % 4 == 0 rows
    for name, weights in in_memory.model.state_dict().items():
        torch.testing.assert_close(streamed.model.state_dict()[name], weights)
    # A column of event names weighed by `data.weight_values` trains the same.
    kinds = ["view", "cart", "fav", "buy"]
    events = plays.with_columns(
        event=pl.col("plays").map_elements(lambda n: kinds[n], return_dtype=pl.String)
    ).drop("plays")
    by_name = ["data.weight_col=event", "data.weight_values=view=0,cart=1,fav=2,buy=3"]
    named = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), [*ID_ONLY, *WEIGHTED, *by_name]),
        _two_files(events, tmp_path / "events", 7_000, 1_000),
    )
    assert named.tensors.weights is not None
    assert torch.equal(named.tensors.weights, streamed.tensors.weights)
    unlisted = _two_files(events, tmp_path / "unlisted", 7_000, 1_000)
    with pytest.raises(DataError, match=r"which `data\.weight_values` gives no weight"):
        fit_streamed_retrieval(
            apply_overrides(
                config, ["data.weight_col=event", "data.weight_values=view=0,cart=1"]
            ),
            unlisted,
        )
    # The ranker reads them too, and a bad weight stops the run at its row.
    ranked = fit_streamed_two_stage(
        apply_overrides(config, ["ranking.epochs=1", "ranking.max_steps=2"]),
        weighted,
        evaluate_test=False,
    )
    assert ranked.ranker is not None
    held = held_out_mask(plays, method="random", test_fraction=0.2, seed=42)
    at = int(pl.Series(~held).arg_true()[100])  # a training row
    broken = plays.with_columns(
        plays=pl.when(pl.int_range(pl.len()) == at).then(-1).otherwise(pl.col("plays"))
    )
    bad = _two_files(broken, tmp_path / "bad", 7_000, 1_000)
    with pytest.raises(DataError, match=f"row {at + 1} has the weight -1"):
        fit_streamed_retrieval(config, bad)


#: Both stages, small, with rating weights: what the unrated-row tests train.
TWO_STAGES = [
    *ID_ONLY,
    *WEIGHTED,
    "data.validation_fraction=0.1",
    "retrieval.history_length=8",
    "train.epochs=1",
    "ranking.epochs=2",
    "ranking.hidden_dims=[16]",
]


def _assert_same_run(read: Any, expected: Any) -> None:
    """Two retrieval runs have the same weights and test figures."""
    for name, weights in expected.model.state_dict().items():
        torch.testing.assert_close(read.model.state_dict()[name], weights, msg=name)
    assert read.metrics["metrics"] == expected.metrics["metrics"]


def _assert_same_weights(streamed: Any, in_memory: Any) -> None:
    """Both stages of a streamed run have the in-memory run's weights."""
    for name, weights in in_memory.retrieval.model.state_dict().items():
        torch.testing.assert_close(
            streamed.retrieval.model.state_dict()[name], weights, msg=name
        )
    mine, theirs = streamed.ranker, in_memory.ranker
    assert mine is not None and theirs is not None
    for name, weights in theirs.model.state_dict().items():
        torch.testing.assert_close(mine.model.state_dict()[name], weights, msg=name)


def test_a_streamed_log_with_unrated_rows_trains_both_stages_as_in_memory(
    log: Path, tmp_path: Path
) -> None:
    """`data.missing_ratings=unrated` was refused under --stream: a Parquet log
    whose purchases carry no rating lost them as bad rows in every pass."""
    from twostage.retrieval.streamed import fit_streamed_two_stage
    from twostage.two_stage import fit_two_stage

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    nulled = table.with_columns(
        rating=pl.when(pl.col("item_id") % 4 == 0).then(None).otherwise("rating")
    )
    unrated = _two_files(nulled, tmp_path / "unrated", 7_000, 1_000)
    settings = TWO_STAGES
    rejected = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), settings), unrated
    )
    config = apply_overrides(
        ExperimentConfig(), [*settings, "data.missing_ratings=unrated"]
    )
    streamed = fit_streamed_two_stage(config, unrated)
    kept = int(streamed.retrieval.tensors.users.numel())
    assert kept > int(rejected.tensors.users.numel())  # the unrated rows train
    sides = _three_sides(unrated, "random", missing_ratings="unrated")
    assert sides.fit.interactions["rating"].null_count() > 0
    in_memory = fit_two_stage(config, split=sides)
    _assert_same_weights(streamed, in_memory)
    torch.testing.assert_close(streamed.ranking_metrics, in_memory.ranking_metrics)


def test_streamed_unrated_values_train_both_stages_as_in_memory(log: Path) -> None:
    """`data.unrated_values` (Goodreads' 0 for "not rated") was refused under
    --stream; the ranker learned nothing else from a log of such rows."""
    from twostage.retrieval.streamed import fit_streamed_two_stage
    from twostage.two_stage import fit_two_stage

    settings = [*TWO_STAGES, "data.unrated_values=[1,2]"]
    config = apply_overrides(ExperimentConfig(), settings)
    streamed = fit_streamed_two_stage(config, log)
    sides = _three_sides(log, "random")
    unrated = ExperimentSplit(
        fit=sides.fit.with_unrated((1, 2)),
        validation=sides.validation.with_unrated((1, 2)),
        test=sides.test.with_unrated((1, 2)),  # as prepare_split makes them
    )
    in_memory = fit_two_stage(config, split=unrated)
    _assert_same_weights(streamed, in_memory)
    assert streamed.ranking_metrics is not None
    assert in_memory.ranking_metrics is not None
    assert streamed.ranking_metrics["rmse"] == pytest.approx(
        in_memory.ranking_metrics["rmse"]
    )


def test_a_streamed_log_of_milliseconds_trains_as_the_one_of_seconds(
    log: Path, tmp_path: Path
) -> None:
    """`data.time_unit` was refused under --stream: a Parquet log of epoch
    milliseconds (Kafka, JavaScript events) had to be rewritten first. Every pass
    (the temporal cuts, the validation carve-out, the histories, the held-out side)
    reads its times, so one pass left in seconds would split or order otherwise."""
    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    millis = table.with_columns(pl.col("timestamp") * 1000 + 7)
    ms_log = _two_files(millis, tmp_path / "ms", 7_000, 1_000)
    settings = [
        *ID_ONLY,
        "data.split=temporal",
        "data.validation_fraction=0.1",
        "retrieval.history_length=8",
        "train.epochs=1",
    ]
    seconds = fit_streamed_retrieval(apply_overrides(ExperimentConfig(), settings), log)
    ms_config = apply_overrides(ExperimentConfig(), [*settings, "data.time_unit=ms"])
    read = fit_streamed_retrieval(ms_config, ms_log)
    assert torch.equal(read.tensors.history, seconds.tensors.history)
    _assert_same_run(read, seconds)
    # Read as seconds, every row is a time only in milliseconds: the run says so.
    with pytest.raises(DataError, match="timestamp_not_in_seconds"):
        fit_streamed_retrieval(apply_overrides(ExperimentConfig(), settings), ms_log)


def test_streamed_runs_read_time_format(log: Path, tmp_path: Path) -> None:
    """`data.time_format` was refused under --stream, while a streamed pass
    rejected dates written as numbers (20240301) with a hint to set it: a Parquet
    log of timestamps as text other than ISO had to be rewritten first."""
    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    written = pl.from_epoch("timestamp", time_unit="s").dt.strftime("%d/%m/%Y %H:%M:%S")
    text_log = _two_files(table.with_columns(written), tmp_path / "text", 7_000, 1_000)
    settings = [*ID_ONLY, "data.split=temporal", "train.epochs=1"]
    seconds = fit_streamed_retrieval(apply_overrides(ExperimentConfig(), settings), log)
    formatted = [*settings, "data.time_format=%d/%m/%Y %H:%M:%S"]
    read = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), formatted), text_log
    )
    _assert_same_run(read, seconds)
    with pytest.raises(DataError, match="bad_timestamp"):  # read without the format
        fit_streamed_retrieval(apply_overrides(ExperimentConfig(), settings), text_log)


@pytest.mark.parametrize("split", ["random", "leave-last-out"])
def test_streamed_minimum_counts_train_as_the_filtered_log(
    log: Path, tmp_path: Path, split: str
) -> None:
    """`data.min_user_rows` / `min_item_rows` were refused under --stream: a log
    had to be cut to its k-core and written again first. The run on the whole log
    with the minimums is the run on the log min_counts filtered in memory."""
    from twostage.data.filtering import min_counts

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    kept, removed = min_counts(
        Dataset(name="log", interactions=table), users=20, items=40
    )
    assert removed.rows > 0
    filtered = _two_files(kept.interactions, tmp_path / "kept", 4_000, 1_000)
    settings = [*ID_ONLY, f"data.split={split}", "train.epochs=1"]
    plain = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), settings), filtered
    )
    minimums = [*settings, "data.min_user_rows=20", "data.min_item_rows=40"]
    read = fit_streamed_retrieval(apply_overrides(ExperimentConfig(), minimums), log)
    assert torch.equal(read.tensors.items, plain.tensors.items)
    _assert_same_run(read, plain)


def test_streamed_duplicates_train_as_the_cleaned_log(
    log: Path, tmp_path: Path
) -> None:
    """`data.duplicates=first` was refused under --stream: a log with events
    written twice had to be cleaned and written again first."""
    import numpy as np

    from twostage.data.tables import read_interactions

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    twice = table.gather(np.random.default_rng(1).choice(table.height, 500))
    doubled = pl.concat([table, twice]).sort("timestamp", maintain_order=True)
    (tmp_path / "one").mkdir()
    doubled.write_parquet(tmp_path / "one" / "log.parquet")
    cleaned = read_interactions(tmp_path / "one" / "log.parquet", duplicates="first")
    clean_log = _two_files(cleaned.interactions, tmp_path / "clean", 6_000, 1_000)
    doubled_log = _two_files(doubled, tmp_path / "doubled", 6_000, 1_000)
    settings = [*ID_ONLY, "data.split=leave-last-out", "train.epochs=1"]
    plain = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), settings), clean_log
    )
    first = [*settings, "data.duplicates=first"]
    read = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), first), doubled_log
    )
    _assert_same_run(read, plain)


def test_a_streamed_impression_log_trains_on_its_choices(
    log: Path, tmp_path: Path
) -> None:
    """`data.label_col` was refused under --stream. The rows shown and not chosen
    are left out of every pass: the run equals one on the chosen rows alone."""
    import numpy as np

    from twostage.data.describe import describe_streamed

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    rng = np.random.default_rng(3)
    picked = table.gather(rng.choice(table.height, 3_000))
    shown = picked.with_columns(
        pl.Series("item_id", rng.integers(0, 150, 3_000), dtype=table["item_id"].dtype),
        pl.lit(0).alias("clicked"),
    )
    mixed = pl.concat([table.with_columns(pl.lit(1).alias("clicked")), shown]).sort(
        "timestamp", maintain_order=True
    )
    chosen_log = _two_files(table, tmp_path / "chosen", 6_000, 1_000)
    mixed_log = _two_files(mixed, tmp_path / "mixed", 7_000, 1_000)
    settings = [*ID_ONLY, "data.split=leave-last-out", "train.epochs=1"]
    plain = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), settings), chosen_log
    )
    labelled = [*settings, "data.label_col=clicked", "data.duplicates=first"]
    read = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), labelled), mixed_log
    )
    _assert_same_run(read, plain)
    summary, report = describe_streamed(mixed_log, reading=Reading(label_col="clicked"))
    assert summary["num_interactions"] == table.height
    assert summary["shown"]["rows"] == report.shown_rows == 3_000
    assert report.rows_read == mixed.height


def test_a_streamed_run_measures_cold_users(log: Path) -> None:
    """`data.cold_user_fraction` was refused under --stream: cold-start figures
    needed the log in memory. The held-out users are measured apart."""
    settings = [*ID_ONLY, "train.epochs=1", "data.cold_user_fraction=0.1"]
    run = fit_streamed_retrieval(apply_overrides(ExperimentConfig(), settings), log)
    slices = run.metrics["slices"]
    assert {"warm_users", "cold_users"} <= set(slices)
    counts = slices["cold_users"]["counts"]["exclude_seen"]
    assert counts["num_queries"] == 40  # 10% of the 400 users, every one measured


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["data.time_col="], "`time_col` = ''"),
        (["data.separator=;"], "data.separator"),
        (["data.comment_prefix=#"], "data.comment_prefix"),
        (["data.column_names=user_id,item_id,timestamp"], "data.column_names"),
    ],
)
def test_data_options_a_stream_does_not_read_are_refused(
    log: Path, overrides: list[str], refused: str
) -> None:
    # Each once trained as if unset (`--user-col uid --stream` read user_id anyway,
    # before the log's own names were read).
    config = apply_overrides(ExperimentConfig(), overrides)
    with pytest.raises(ConfigError, match=re.escape(refused)):
        fit_streamed_retrieval(config, log)
    named = apply_overrides(
        ExperimentConfig(), ["data.user_col=user_id", "data.time_col=timestamp"]
    )
    check_data_options(named.data)  # the names it reads anyway: fine


def test_a_log_with_its_own_column_names_streams_as_one_with_ours(
    log: Path, tmp_path: Path
) -> None:
    """`--stream --user-col uid` was refused: a log had to be rewritten with our
    column names first. Every pass now reads the log's names, and the run is the
    run of the same log under ours; `rating_col=""` leaves its ratings unread."""
    import pyarrow.parquet as pq

    from twostage.data.streaming import parquet_files

    theirs = {"user_id": "uid", "item_id": "sku", "timestamp": "ts", "rating": "stars"}
    renamed, unrated = tmp_path / "renamed", tmp_path / "unrated"
    for folder in (renamed, unrated):
        folder.mkdir()
    for file in parquet_files(log):
        table = pq.read_table(file)
        names = [theirs[n] for n in table.column_names]
        pq.write_table(table.rename_columns(names), renamed / file.name, 1_000)
        pq.write_table(table.drop(["rating"]), unrated / file.name, 1_000)
    settings = [
        *ID_ONLY,
        "retrieval.history_length=5",
        "data.split=leave-last-out",
        "data.validation_fraction=0.05",
        "train.epochs=1",
    ]
    mapped = ["data.user_col=uid", "data.item_col=sku", "data.time_col=ts"]
    mapped += ["data.rating_col=stars"]

    def run(folder: Path, *more: str) -> Any:
        return fit_streamed_retrieval(
            apply_overrides(ExperimentConfig(), [*settings, *more]), folder
        )

    ours, read = run(log), run(renamed, *mapped)
    assert read.metrics["metrics"] == ours.metrics["metrics"]
    for key, value in ours.model.state_dict().items():
        assert torch.equal(read.model.state_dict()[key], value), key
    assert run(log, "data.rating_col=").metrics == run(unrated).metrics


def test_cli_stream_trains_and_saves(log: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from twostage.cli import app

    out = tmp_path / "run"
    # the defaults' validation carve-out (5%) and the fallback chosen on it
    defaults = ("data.validation_fraction", "retrieval.popularity_fallback")
    settings = [
        a for item in ID_ONLY if not item.startswith(defaults) for a in ("--set", item)
    ]
    result = CliRunner().invoke(
        app,
        [
            *("train", "retrieval", "--stream", "--dataset", str(log)),
            *("--out", str(out), "--json", *settings),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["training_rows"] > 9_000 and (out / "model.safetensors").exists()
    assert 0.03 * 9_600 < summary["validation_rows"] < 0.07 * 9_600
    rows = summary["training_rows"] + summary["validation_rows"] + summary["test_rows"]
    assert rows == 12_000
    assert load(out).run.fallback is not None  # chosen on the carve-out
    assert summary["retrieval"]["counts"]["exclude_seen"]["num_queries"] > 300
    assert json.loads((out / "metrics.json").read_text()) == summary["retrieval"]
    # `twostage evaluate` reads the stream's own split again, not an in-memory one,
    # for the run and for a bundle saved from it
    bundle = load(out).save(tmp_path / "bundle")
    assert load(bundle).run.stream == str(log.resolve())
    for where in (out, bundle):
        again = CliRunner().invoke(app, ["evaluate", str(where), "--json"])
        assert again.exit_code == 0, again.output
        got = json.loads(again.stdout)["retrieval"]["twostage"]
        assert got == summary["retrieval"], where
    # Beside the baselines, fitted on the training rows read again (it was refused)
    beside = CliRunner().invoke(app, ["evaluate", str(out), "--baselines"])
    assert beside.exit_code == 0, beside.output
    said = " ".join(beside.output.replace("│", " ").split())
    assert all(name in said for name in ("itemknn", "session-knn", "recent-popular"))
    # and says where the served list stands against each, noise guarded
    ours = summary["retrieval"]["metrics"]["exclude_seen"]["ndcg"]["10"]
    assert (
        "Our served list is " in said
        and f"session-knn on NDCG@10: {ours:.4f} vs" in said
    )
    assert said.count("- Our served list is ") == said.count(" excl ") - 1
    assert "is a baseline." not in said  # each is said what it is


def test_a_streamed_run_s_baselines_are_the_in_memory_run_s(
    log: Path, tmp_path: Path
) -> None:
    """`evaluate --baselines` on a streamed run reads its training rows again,
    as indices with their times: every baseline's figures are the in-memory
    run's on the same split, recent popularity and the ordered ones included,
    for the test split and for new sessions."""
    import json

    from typer.testing import CliRunner

    from twostage.cli import app
    from twostage.retrieval.evaluation import evaluate_baselines
    from twostage.retrieval.streamed import streamed_training_rows

    config = apply_overrides(
        ExperimentConfig(), [*ID_ONLY, "retrieval.history_length=4"]
    )
    streamed = fit_streamed_retrieval(config, log, out_dir=tmp_path / "run")
    table = pl.concat(iter_batches(log, columns=["user_id", "item_id", "timestamp"]))
    parts = _in_memory_split(Dataset(name="log", interactions=table))
    in_memory, _ = fit_retrieval(config, split=parts, evaluate_test=False)
    rows = streamed_training_rows(streamed)
    assert len(rows.users) == parts.fit.num_interactions
    want = {
        name: result.to_dict()
        for name, result in evaluate_baselines(
            in_memory, parts.test, train=parts.fit
        ).items()
    }
    assert {"recent-popularity", "transition", "session-knn", "ease-recency"} <= set(
        want
    )
    got = CliRunner().invoke(
        app, ["evaluate", str(tmp_path / "run"), "--baselines", "--json"]
    )
    assert got.exit_code == 0, got.output
    found = json.loads(got.stdout)["retrieval"]
    assert {k: v for k, v in found.items() if k != "twostage"} == want

    sessions = tmp_path / "sessions.csv"
    items = table["item_id"].unique().sort().to_list()
    pl.DataFrame(
        {
            "session_id": [i // 3 for i in range(60)],
            "item_id": [items[(7 * i) % len(items)] for i in range(60)],
        }
    ).write_csv(sessions)
    from twostage.cli_batch import read_sessions
    from twostage.session_evaluation import evaluate_sessions

    command = ["evaluate", str(tmp_path / "run"), "--sessions", str(sessions)]
    measured = CliRunner().invoke(app, [*command, "--baselines", "--json"])
    assert measured.exit_code == 0, measured.output
    by_hand = evaluate_sessions(
        Recommender(in_memory), read_sessions(sessions), train=parts.fit
    )
    baselines = json.loads(measured.stdout)["baselines"]
    assert baselines == json.loads(json.dumps(by_hand["baselines"]))
    assert {"recent-popularity", "session-knn"} <= set(baselines)


def test_cli_trains_both_stages_from_a_stream(log: Path, tmp_path: Path) -> None:
    """`twostage train --stream` saves a two-stage bundle; `twostage evaluate`
    measures both stages again on the stream's test side, with the same figures."""
    import json

    from typer.testing import CliRunner

    from twostage.cli import app

    settings = [
        *ID_ONLY,
        "data.validation_fraction=0.1",
        "retrieval.history_length=4",
        "ranking.epochs=2",
    ]
    options = [a for item in settings for a in ("--set", item)]
    command = ["train", "--stream", "--dataset", str(log), "--json", *options]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "models")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ranking"]["num_test_pairs"] > 2_000 and "rmse" in summary["ranking"]
    bundle = Path(summary["bundle"])
    assert load(bundle).ranker is not None
    again = CliRunner().invoke(app, ["evaluate", str(bundle), "--json"])
    assert again.exit_code == 0, again.output
    measured = json.loads(again.stdout)
    assert measured["retrieval"]["twostage"] == summary["retrieval"]
    assert measured["ranking"] == summary["ranking"]
    refused = CliRunner().invoke(
        app, [*command, "--out", str(tmp_path / "m2"), "--train", str(log)]
    )
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())
    assert refused.exit_code == 2 and "drop --train/--test" in said
    # Checkpoints (they were refused): both stages write theirs, --resume reads them.
    work = tmp_path / "work"
    kept = CliRunner().invoke(
        app, [*command, "--out", str(tmp_path / "m3"), "--work-dir", str(work)]
    )
    assert kept.exit_code == 0, kept.output
    for stage in ("retrieval", "ranking"):
        assert (work / stage / "checkpoint" / "state.json").exists(), stage
    resumed = CliRunner().invoke(
        app,
        [*command, "--out", str(tmp_path / "m4"), "--work-dir", str(work), "--resume"],
    )
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["retrieval"] == summary["retrieval"]


def test_a_stopped_streamed_run_resumes_to_the_weights_of_one_never_stopped(
    log: Path, tmp_path: Path
) -> None:
    """A streamed run had no checkpoint at all, while a log of 10^8 rows is where
    an epoch is longest: a stop request within an epoch, then --resume (the passes
    run again and find the same rows), gives the uninterrupted weights."""
    from twostage.training.loop import TrainingInterrupted, request_stop

    config = apply_overrides(
        ExperimentConfig(), [*ID_ONLY, "retrieval.history_length=4"]
    )
    whole = fit_streamed_retrieval(config, log, evaluate_test=False)

    def stop(info: dict) -> None:
        if info["epoch"] == 1 and info["step"] == 38 + 3:  # 38 steps an epoch
            request_stop()

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="after step 4 of 38 in epoch 2"):
        fit_streamed_retrieval(
            config, log, out_dir=out, on_step=stop, evaluate_test=False
        )
    resumed = fit_streamed_retrieval(
        config, log, out_dir=out, resume=True, evaluate_test=False
    )
    for name, weights in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weights), name
    other = apply_overrides(config, ["data.test_fraction=0.3"])  # other rows
    with pytest.raises(ConfigError, match="on other training rows"):
        fit_streamed_retrieval(
            other, log, out_dir=out, resume=True, evaluate_test=False
        )


def test_cli_stream_reads_per_row_context_and_serves_it(
    log: Path, tmp_path: Path
) -> None:
    """`--stream` with a context field and leave-last-out, then answers whose
    context changes them."""
    import json

    from typer.testing import CliRunner

    from twostage.cli import app

    out = tmp_path / "run"
    settings = [
        *ID_ONLY,
        "retrieval.use_side_features=true",
        "retrieval.query_fields=hour_of_day",
        "data.split=leave-last-out",
    ]
    result = CliRunner().invoke(
        app,
        [
            *("train", "retrieval", "--stream", "--dataset", str(log)),
            *("--out", str(out), "--json"),
            *[a for item in settings for a in ("--set", item)],
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["training_rows"] == 12_000 - 400
    rec = load(out)
    user = rec.user_vocab.values[0]
    hours = [
        rec.recommend(user, 20, context={"timestamp": 1_700_000_000 + 3_600 * h})
        for h in range(24)
    ]
    assert all(len(answer.items) == 20 for answer in hours)
    lists = {tuple(i["item_id"] for i in answer.items) for answer in hours}
    assert len(lists) > 1  # the hour matters


@pytest.fixture(scope="module")
def log_with_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log carrying its users' and items' features as columns, in 2 files of
    1,000-row groups, with one user's age changed after its first row."""
    import pyarrow.parquet as pq

    from twostage.data.synthetic import generate

    data = generate(num_users=300, num_items=120, num_interactions=8_000, seed=4)
    table = (
        data.interactions.drop("rating")
        .join(data.users, on="user_id", how="left")
        .join(data.items, on="item_id", how="left")
    )
    first_user = table["user_id"][0]
    later = (pl.col("user_id") == first_user) & (pl.int_range(pl.len()) > 0)
    table = table.with_columns(
        pl.when(later).then(pl.col("age") + 1).otherwise(pl.col("age")).alias("age")
    )
    path = tmp_path_factory.mktemp("features")
    half = table.height // 2
    for number, part in enumerate([table[:half], table[half:]]):
        pq.write_table(part.to_arrow(), path / f"part-{number}.parquet", 1_000)
    return path


def test_streamed_side_features_equal_the_in_memory_path(
    log_with_features: Path,
) -> None:
    """The feature tables (first row per ID), the encoded features and the trained
    weights are those of the in-memory path on the same training rows."""
    user_columns, item_columns = ["age", "segment"], ["title", "category", "price"]
    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            "retrieval.use_side_features=true",
            "retrieval.history_length=5",
            f"data.user_features={','.join(user_columns)}",
            f"data.item_features={','.join(item_columns)}",
        ],
    )
    streamed = fit_streamed_retrieval(config, log_with_features)

    columns = ["user_id", "item_id", "timestamp", *user_columns, *item_columns]
    table = pl.concat(iter_batches(log_with_features, columns=columns))
    users = table.select(["user_id", *user_columns]).unique(
        subset="user_id", keep="first", maintain_order=True
    )
    items = table.select(["item_id", *item_columns]).unique(
        subset="item_id", keep="first", maintain_order=True
    )
    log = table.select(["user_id", "item_id", "timestamp"])
    data = Dataset(name="log", interactions=log, users=users, items=items)
    in_memory, _ = fit_retrieval(
        config, split=_in_memory_split(data), evaluate_test=False
    )

    assert [f.key for f in streamed.spec.fields] == [
        f.key for f in in_memory.spec.fields
    ]
    assert {"age", "segment", "title", "category", "price"} <= {
        f.name for f in streamed.spec.fields
    }
    for side in ("user_features", "item_features"):
        mine, theirs = getattr(streamed.tensors, side), getattr(in_memory.tensors, side)
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), (side, key)
    assert torch.equal(streamed.tensors.history, in_memory.tensors.history)
    mine, theirs = streamed.model.state_dict(), in_memory.model.state_dict()
    assert set(mine) == set(theirs)
    for name, weights in theirs.items():
        torch.testing.assert_close(mine[name], weights, msg=name)


def test_a_feature_file_beside_a_streamed_log_trains_as_its_columns(
    log_with_features: Path, tmp_path: Path
) -> None:
    """`data.item_table`: a catalogue file gives the same item features as the
    same columns inside the log (there was no way to name a feature file)."""
    item_columns = ["title", "category", "price"]
    base = [*ID_ONLY, "retrieval.use_side_features=true", "data.user_features=age"]
    inside = fit_streamed_retrieval(
        apply_overrides(
            ExperimentConfig(), [*base, f"data.item_features={','.join(item_columns)}"]
        ),
        log_with_features,
    )
    table = pl.concat(
        iter_batches(log_with_features, columns=["item_id", *item_columns])
    )
    catalogue = tmp_path / "catalogue.parquet"
    table.unique(subset="item_id", keep="first", maintain_order=True).write_parquet(
        catalogue
    )
    beside = fit_streamed_retrieval(
        apply_overrides(ExperimentConfig(), [*base, f"data.item_table={catalogue}"]),
        log_with_features,
    )
    assert [f.key for f in beside.spec.fields] == [f.key for f in inside.spec.fields]
    for key, values in inside.tensors.item_features.items():
        assert torch.equal(beside.tensors.item_features[key], values), key
    for name, weights in inside.model.state_dict().items():
        torch.testing.assert_close(beside.model.state_dict()[name], weights, msg=name)


def test_a_struct_s_fields_stream_as_the_same_columns_written_flat(
    log_with_features: Path, tmp_path: Path
) -> None:
    """A streamed log reads a struct's fields by their paths (`meta.category`), as
    a log read whole does: the weights of the same values as flat columns."""
    import pyarrow.parquet as pq

    columns = ["user_id", "item_id", "timestamp", "age", "category", "price"]
    table = pl.concat(iter_batches(log_with_features, columns=columns))
    flat = table.rename({"category": "meta.category", "price": "meta.price"})
    nested = table.select(
        "user_id",
        "item_id",
        "timestamp",
        "age",
        pl.struct("category", "price").alias("meta"),
    )
    trained = []
    for name, frame in (("flat", flat), ("nested", nested)):
        directory = tmp_path / name
        directory.mkdir()
        half = frame.height // 2
        for number, part in enumerate([frame[:half], frame[half:]]):
            pq.write_table(part.to_arrow(), directory / f"part-{number}.parquet", 1_000)
        config = apply_overrides(
            ExperimentConfig(),
            [
                *ID_ONLY,
                "retrieval.use_side_features=true",
                "data.user_features=age",
                "data.item_features=meta.category,meta.price",
            ],
        )
        trained.append(fit_streamed_retrieval(config, directory))
    flat_run, nested_run = trained
    assert {"meta.category", "meta.price"} <= {f.name for f in nested_run.spec.fields}
    for key, values in flat_run.tensors.item_features.items():
        assert torch.equal(nested_run.tensors.item_features[key], values), key
    for name, weights in flat_run.model.state_dict().items():
        torch.testing.assert_close(
            nested_run.model.state_dict()[name], weights, rtol=0, atol=0, msg=name
        )


def test_feature_tables_keep_first_rows_and_count_the_others(
    log_with_features: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from twostage.data.streaming import feature_tables

    users, items = feature_tables(log_with_features, user_features=["age"])
    assert items is None and users is not None
    table = pl.concat(iter_batches(log_with_features, columns=["user_id", "age"]))
    assert users.equals(
        table.unique(subset="user_id", keep="first", maintain_order=True)
    )
    assert "had other values of ['age']" in caplog.text


def test_a_missing_feature_column_is_a_clear_error(log_with_features: Path) -> None:
    from twostage.data.streaming import feature_tables
    from twostage.errors import DataError

    with pytest.raises(DataError, match=r"\['colour'\] are not in"):
        feature_tables(log_with_features, item_features=["category", "colour"])


def test_cli_stream_reads_the_feature_columns_it_is_told(
    log_with_features: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from twostage.cli import app
    from twostage.features import FeatureSpec

    out = tmp_path / "run"
    settings = [a for item in ID_ONLY[2:] for a in ("--set", item)]
    result = CliRunner().invoke(
        app,
        [
            *("train", "retrieval", "--stream", "--dataset", str(log_with_features)),
            *("--user-features", "age", "--item-features", "category,price"),
            *("--out", str(out), *settings),
        ],
    )
    assert result.exit_code == 0, result.output
    spec = FeatureSpec.load(out / "features.json")
    assert {f.name for f in spec.fields} == {
        "user_id",
        "age",
        "item_id",
        "category",
        "price",
    }
    shown = pl.read_parquet(out / "items.parquet")
    assert shown.columns == ["item_id", "category", "price"]


#: The 2-rank run: history, per-row context and the leave-last-out split, whose
#: held-out rows each rank finds by row number in its own row groups.
_RANKED = apply_overrides(
    ExperimentConfig(),
    [
        *ID_ONLY,
        "retrieval.history_length=8",
        "retrieval.use_side_features=true",
        "retrieval.query_fields=hour_of_day",
        "data.split=leave-last-out",
        "data.validation_fraction=0.1",  # each user's last training row
        "retrieval.popularity_fallback=-1",
    ],
)


#: The sequence towers' 2-rank run: a GRU on each user's windows, sampled
#: negatives (the distinct targets of both ranks' shares), its dropout off (drawn
#: per rank).
_SEQUENCES = [
    "retrieval.query_fields=[]",
    "retrieval.query_encoder=gru",
    "retrieval.examples=sequences",
    "retrieval.num_extra_negatives=16",
    "retrieval.sequence_dropout=0",
]


def _ranked(backend: str) -> ExperimentConfig:
    if backend == "sequences":
        return apply_overrides(_RANKED, _SEQUENCES)
    if backend == "ensemble":  # a GRU on windows, EASE and the transitions
        return apply_overrides(
            _RANKED,
            [
                *_SEQUENCES,
                "retrieval.ensemble=ease,transition",
                "retrieval.ease_rank=16",
            ],
        )
    if backend == "users":  # one example per user, at most 5 positives drawn
        return apply_overrides(
            _RANKED,
            [
                "retrieval.query_fields=[]",
                "retrieval.examples=users",
                "retrieval.max_positives_per_user=5",
            ],
        )
    return apply_overrides(_RANKED, [f"retrieval.embedding_backend={backend}"])


def _streamed_rank(rank: int, log: str, out: str, backend: str) -> None:
    from safetensors.torch import save_file

    from twostage import distributed

    try:
        run = fit_streamed_retrieval(_ranked(backend), Path(log))
        tables = {
            "users": run.tensors.users,
            "items": run.tensors.items,
            "history": run.tensors.history,
            "validation": torch.tensor(
                [e["validation"] for e in run.train_result.history]
            ),
            "fallback": torch.tensor(run.popularity_fallback),
        }
        if backend in ("sequences", "ensemble"):
            tables["sequences"] = run.tensors.sequences
        weights = {f"model.{k}": v for k, v in run.model.state_dict().items()}
        save_file({**tables, **weights}, f"{out}.{rank}")
    finally:
        distributed.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        # The ID tables sharded by rows over the 2 ranks (every epoch's validation
        # and the fallback's choice look them up on both ranks).
        pytest.param(
            "torchrec",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torchrec") is None,
                reason="torchrec is not installed (make install-dev installs it)",
            ),
        ),
        # Not backends: the sequence towers (`_SEQUENCES`) and one example per
        # user, on the torch tables.
        "sequences",
        "users",
        "ensemble",
    ],
)
def test_two_ranks_read_their_own_row_groups_and_train_the_weights_of_one(
    log: Path, tmp_path: Path, backend: str
) -> None:
    """Each rank reads every other row group in both passes; the merged counts and
    the gathered rows (in file order) make the single process's run."""
    from safetensors.torch import load_file

    from twostage import distributed

    out = str(tmp_path / "rank")
    distributed.run_local_group(_streamed_rank, 2, str(log), out, backend)
    single = fit_streamed_retrieval(_ranked(backend), log)
    want = {
        "users": single.tensors.users,
        "items": single.tensors.items,
        "history": single.tensors.history,
        "validation": torch.tensor(
            [e["validation"] for e in single.train_result.history]
        ),
        "fallback": torch.tensor(single.popularity_fallback),
    } | {f"model.{k}": v for k, v in single.model.state_dict().items()}
    tables = ["users", "items", "history", "validation", "fallback"]
    if backend in ("sequences", "ensemble"):  # windows from the gathered rows
        want["sequences"] = single.tensors.sequences
        tables.append("sequences")
        assert single.tensors.sequences.shape[0] > 400
    assert len(single.tensors.users) == 12_000 - 400  # each user's last row held
    for rank in (0, 1):
        got = load_file(f"{out}.{rank}")
        assert got.keys() == want.keys()
        # the hour-of-day table trained on the same rows' context (the served
        # tables keep no context: the carve-out's rows joined them after training)
        if backend not in ("sequences", "users", "ensemble"):
            assert "model.query_tower.embeddings.hour_of_day.weight" in got
        for key in tables:
            assert torch.equal(got[key], want[key]), (rank, key)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, msg=f"{rank} {key}")


@pytest.mark.parametrize("split", ["random", "leave-last-out"])
def test_streamed_per_row_context_equals_the_in_memory_path(
    log: Path, tmp_path: Path, split: str
) -> None:
    """The log's own context columns (text and numbers) and one the timestamp gives:
    encoders fitted on the training rows' counted values, each row's context
    encoded, and the trained weights, as in memory."""
    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns)).with_columns(
        device=pl.when(pl.col("item_id") % 3 == 0)
        .then(pl.lit("phone"))
        .when(pl.col("user_id") % 4 == 0)
        .then(None)
        .otherwise(pl.lit("web")),
        dwell=(pl.col("user_id") * 7 % 13).cast(pl.Float64),
    )
    directory = _two_files(table, tmp_path / "context", 7_000, 2_000)
    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            "retrieval.use_side_features=true",
            "retrieval.query_fields=device,dwell,hour_of_day",
            f"data.split={split}",
        ],
    )
    streamed = fit_streamed_retrieval(config, directory)

    parts = _in_memory_split(Dataset(name="log", interactions=table), split)
    in_memory, _ = fit_retrieval(config, split=parts, evaluate_test=False)

    assert [f.key for f in streamed.spec.fields] == [
        f.key for f in in_memory.spec.fields
    ]
    sources = {i.column: i.source for i in streamed.spec.describe(side="query")}
    assert sources == {
        "user_id": "interactions",
        "device": "interactions",
        "dwell": "interactions",
        "hour_of_day": "interactions",
    }
    for field in ("device", "hour_of_day"):  # vocabularies: equal
        assert (
            streamed.spec.encoder(field).to_dict()
            == in_memory.spec.encoder(field).to_dict()
        ), field
    # mean and std: summed from counts, so equal up to rounding
    mine_state = streamed.spec.encoder("dwell").to_dict()["state"]
    assert mine_state == pytest.approx(
        in_memory.spec.encoder("dwell").to_dict()["state"]
    )
    assert streamed.tensors.context.keys() == in_memory.tensors.context.keys()
    assert set(streamed.tensors.context) == {"device", "dwell", "hour_of_day"}
    for key, values in in_memory.tensors.context.items():
        torch.testing.assert_close(streamed.tensors.context[key], values, msg=key)
    assert int((streamed.tensors.context["device"] == 0).sum()) > 0  # missing rows
    mine, theirs = streamed.model.state_dict(), in_memory.model.state_dict()
    assert set(mine) == set(theirs)
    for name, weights in theirs.items():
        torch.testing.assert_close(mine[name], weights, msg=name)


def test_a_streamed_run_is_evaluated_on_the_held_out_side(log: Path) -> None:
    """The metrics are the run's on the test rows the in-memory split holds out;
    `data.test_users` evaluates a fixed sample of those users."""
    from twostage.data.split import sample_users

    config = apply_overrides(
        ExperimentConfig(), [*ID_ONLY, "retrieval.history_length=8"]
    )
    run = fit_streamed_retrieval(config, log)
    table = pl.concat(iter_batches(log, columns=["user_id", "item_id", "timestamp"]))
    held = table.filter(
        pl.Series(held_out_mask(table, method="random", test_fraction=0.2, seed=42))
    )
    test = Dataset(name="log", interactions=held)
    assert run.metrics == run.evaluate(test).to_dict()
    assert (
        run.metrics["counts"]["exclude_seen"]["num_queries"]
        == held["user_id"].n_unique()
    )

    sampled = fit_streamed_retrieval(
        apply_overrides(config, ["data.test_users=50"]), log
    )
    assert sampled.metrics["counts"]["exclude_seen"]["num_queries"] == 50
    chosen = sample_users(test, 50, seed=42)
    assert sampled.metrics == sampled.evaluate(chosen).to_dict()
    assert (
        sampled.metrics["metrics"]["exclude_seen"]
        != run.metrics["metrics"]["exclude_seen"]
    )


def test_bad_rows_are_counted_and_left_out_of_every_pass(
    log: Path, tmp_path: Path
) -> None:
    """Missing IDs, a missing timestamp and a rating that is not a number are
    counted by reason with their row numbers and left out of every pass, as the
    in-memory loader leaves them out; datetime timestamps read as epoch seconds."""
    from twostage.data.tables import read_interactions

    columns = ["user_id", "item_id", "timestamp", "rating"]
    table = pl.concat(iter_batches(log, columns=columns))
    row = pl.int_range(pl.len())
    table = table.with_columns(
        user_id=pl.when(row.is_in([5, 7_777])).then(None).otherwise("user_id"),
        item_id=pl.when(row == 3_000).then(None).otherwise("item_id"),
        timestamp=pl.when(row == 4_000)
        .then(None)
        .otherwise(pl.from_epoch("timestamp", time_unit="s")),
        rating=pl.when(row == 9_000).then(float("nan")).otherwise("rating"),
    )
    directory = _two_files(table, tmp_path / "bad", 6_000, 1_000)
    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            "retrieval.history_length=8",
            "retrieval.use_side_features=true",
            "retrieval.query_fields=hour_of_day",
        ],
    )
    streamed = fit_streamed_retrieval(config, directory)

    loaded = read_interactions(
        table,
        user_col="user_id",
        item_col="item_id",
        time_col="timestamp",
        rating_col="rating",
    )
    assert loaded.report is not None
    expected = {
        "empty_user_id": 2,
        "empty_item_id": 1,
        "bad_timestamp": 1,
        "bad_rating": 1,
    }
    assert dict(loaded.report.rejected) == expected
    assert streamed.load_report is not None
    assert streamed.load_report["rejected"] == expected
    lines = {r: [e[0] for e in v] for r, v in streamed.load_report["examples"].items()}
    assert lines["empty_user_id"] == [6, 7_778]  # 1-based row numbers, file order
    assert streamed.load_report["rows_read"] == table.height

    parts = _in_memory_split(Dataset(name="log", interactions=loaded.interactions))
    in_memory, _ = fit_retrieval(config, split=parts, evaluate_test=False)
    assert torch.equal(streamed.tensors.users, in_memory.tensors.users)
    assert torch.equal(streamed.tensors.items, in_memory.tensors.items)
    assert torch.equal(streamed.tensors.history, in_memory.tensors.history)
    assert torch.equal(
        streamed.tensors.context["hour_of_day"],
        in_memory.tensors.context["hour_of_day"],
    )


def _impression_parquet(path: Path, *, users: int = 150, per_user: int = 12) -> Path:
    """The planted impression log (:func:`planted_impressions`) as Parquet, in
    row groups of 4,000 rows."""
    frame = planted_impressions(users=users, per_user=per_user).drop("kind")
    path.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path / "log.parquet", row_group_size=4_000)
    return path


@pytest.mark.parametrize("method", ["random", "temporal", "leave-last-out"])
def test_streamed_shown_rows_follow_their_choice(tmp_path: Path, method: str) -> None:
    """Each row shown and not chosen goes to the side of its user's first chosen
    row at or after its time (else the user's last), as in memory; under a
    temporal split, by its own time. Checked row by row against a plain loop."""
    from twostage.data.dataset import LABEL, TIME, USER
    from twostage.data.streaming import iter_row_groups
    from twostage.retrieval.streamed import streamed_shown

    path = _impression_parquet(tmp_path / "log", users=60, per_user=6)
    config = apply_overrides(
        ExperimentConfig(),
        [
            f"data.split={method}",
            "data.label_col=clicked",
            "data.validation_fraction=0.1",
        ],
    )
    # the split both passes apply: the rule, and the vocabularies' pass below
    options: dict[str, Any] = {
        "method": method,
        "test_fraction": 0.2,
        "seed": 0,
        "validation_fraction": 0.1,
        "reading": Reading(label_col="clicked"),
    }
    rule = split_rule(path, **options)
    got = streamed_shown(path, rule, config.data)
    reading = Reading(label_col="clicked", keep_shown=True)
    chosen: dict[int, list[tuple[int, int]]] = {}
    shown = []
    for first, batch in iter_row_groups(
        path, columns=["user_id", "item_id", "timestamp"], reading=reading
    ):
        picked = batch.filter(pl.col(LABEL))
        test, validation = rule.sides(picked, first)
        for user, time, t, v in zip(
            picked[USER], picked[TIME], test, validation, strict=True
        ):
            chosen.setdefault(user, []).append((time, 2 if t else 1 if v else 0))
        shown += batch.filter(~pl.col(LABEL)).select(USER, "item_id", TIME).rows()

    def side(user: int, time: int) -> int:
        if method == "temporal":
            assert rule.time_cut is not None and rule.validation is not None
            cut = rule.validation.time_cut
            return 2 if time >= rule.time_cut else 1 if time >= cut else 0
        rows = sorted(
            chosen.get(user, []), key=lambda r: r[0]
        )  # stable: ties keep order
        later = next((s for t, s in rows if t >= time), None)
        if later == 2 or (later is None and rows and rows[-1][1] == 2):
            return 2
        rest = [r for r in rows if r[1] != 2]  # the carve-out splits the rest again
        later = next((s for t, s in rest if t >= time), None)
        if later is None:
            later = rest[-1][1] if rest else 0
        return later

    expected: dict[int, list[tuple[int, int, int]]] = {0: [], 1: [], 2: []}
    for row in shown:
        expected[side(row[0], row[2])].append(row)
    parts = (got.train, got.validation, got.test)
    for number, part in enumerate(parts):
        assert sorted(part.rows()) == sorted(expected[number]), number
    assert sum(p.height for p in parts) == len(shown) > 1_000
    assert all(p.height for p in parts)  # every side holds some
    # Encoded, the training side is its pairs the vocabularies know, as indices.
    from twostage.data.streaming import fit_vocabularies

    fitted = fit_vocabularies(path, **options)
    encoded = streamed_shown(path, rule, config.data, vocabularies=fitted)
    assert encoded.train.columns == ["user_idx", "item_idx"]
    assert encoded.train.dtypes == [pl.Int32, pl.Int32]
    users = fitted.users.transform(got.train[USER])
    items = fitted.items.transform(got.train["item_id"])
    known = (users > 0) & (items > 0)
    assert 0 < known.sum() < len(known)  # some shown items were never chosen
    assert sorted(encoded.train.rows()) == sorted(
        zip(users[known].tolist(), items[known].tolist(), strict=True)
    )
    assert encoded.validation.equals(got.validation)
    assert encoded.test.equals(got.test)


def test_a_streamed_ranker_learns_from_what_was_shown(tmp_path: Path) -> None:
    """A streamed run's ranker drew no shown negatives, and its test had no
    shown_auc. Both as in memory now: only the shown rows tell the good items from
    the bad ones, which are chosen about as often."""
    from twostage.retrieval.streamed import fit_streamed_two_stage

    path = _impression_parquet(tmp_path / "log")
    figures = {}
    for shown in (0, 4):
        config = apply_overrides(
            ExperimentConfig(),
            [
                "data.label_col=clicked",
                "train.epochs=4",
                "train.num_threads=1",
                "retrieval.embedding_dim=16",
                "retrieval.output_dim=16",
                "ranking.embedding_dim=16",
                "ranking.hidden_dims=16",
                "ranking.epochs=4",
                "ranking.hard_negative_pool=20",
                "ranking.batch_size=128",
                f"ranking.num_shown_negatives={shown}",
            ],
        )
        stages = fit_streamed_two_stage(config, path)
        assert stages.ranking_metrics is not None
        figures[shown] = stages.ranking_metrics["shown_auc"]
        assert stages.ranking_metrics["shown_auc_users"] > 100
        assert stages.split.test.shown is not None
    assert figures[0] < 0.58 < 0.65 < figures[4], figures


def test_the_minimum_counts_count_the_chosen_rows_when_shown_rows_are_read(
    tmp_path: Path,
) -> None:
    """The pass that places the shown rows keeps them while it reads: the users'
    minimum counted them too, keeping users with few choices and many shown
    rows that training had left out."""
    from twostage.retrieval.streamed import streamed_shown

    path = _impression_parquet(tmp_path / "log", users=80, per_user=6)
    frame = pl.read_parquet(path / "log.parquet")
    chosen = frame.filter(pl.col("clicked") == 1).group_by("user_id").len()
    kept = set(chosen.filter(pl.col("len") >= 4)["user_id"].to_list())
    shown_by = frame.filter(pl.col("clicked") == 0)["user_id"].unique().to_list()
    assert kept < set(shown_by)  # some users are shown things but choose little
    config = apply_overrides(
        ExperimentConfig(), ["data.label_col=clicked", "data.min_user_rows=4"]
    )
    rule = split_rule(
        path,
        method="random",
        test_fraction=0.2,
        seed=0,
        reading=Reading(label_col="clicked", min_user_rows=4),
    )
    got = streamed_shown(path, rule, config.data)
    users = pl.concat([got.train, got.validation, got.test])["user_id"].unique()
    assert set(users.to_list()) == kept


def test_a_streamed_exact_term_over_many_users_is_reported(
    log: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A streamed run whose session-kNN term compares each query with every one
    of many users says so, as the in-memory run does."""
    from twostage.models import session_knn

    monkeypatch.setattr(session_knn, "EXACT_TERM_USERS", 10)
    config = apply_overrides(
        ExperimentConfig(),
        [
            *ID_ONLY,
            "data.split=leave-last-out",
            "retrieval.history_length=8",
            "retrieval.session_knn_weight=0.05",
            "train.epochs=1",
        ],
    )
    with caplog.at_level("WARNING", logger="twostage.retrieval.fit"):
        fit_streamed_retrieval(config, log)
    said = [r.getMessage() for r in caplog.records if "stored users" in r.message]
    assert len(said) == 1 and "retrieval.session_knn_sample" in said[0]
