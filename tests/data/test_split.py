import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data import Dataset
from twostage.data.dataset import ITEM, TIME, USER
from twostage.data.split import (
    ExperimentSplit,
    leave_last_out,
    prepare_split,
    random_split,
    split_dataset,
    temporal_split,
    validation_split,
)
from twostage.data.synthetic import generate
from twostage.errors import ConfigError, DataError


def _rows(frame: pl.DataFrame) -> list[tuple]:
    return sorted(frame.rows())


def _tagged(dataset: Dataset) -> Dataset:
    """Add a row id so disjointness is checked on rows, not on values."""
    return dataset.with_interactions(dataset.interactions.with_row_index("row"))


@pytest.fixture(scope="module")
def data() -> Dataset:
    return _tagged(generate(num_users=200, num_items=100, num_interactions=3000))


def _check_partition(data: Dataset, train: Dataset, test: Dataset) -> None:
    train_rows = set(train.interactions["row"].to_list())
    test_rows = set(test.interactions["row"].to_list())
    assert not train_rows & test_rows
    assert len(train_rows) + len(test_rows) == data.num_interactions
    assert _rows(pl.concat([train.interactions, test.interactions])) == _rows(
        data.interactions
    )


def test_random_split_sizes_disjoint_and_seeded(data: Dataset) -> None:
    a = random_split(data, test_fraction=0.2, seed=7)
    b = random_split(data, test_fraction=0.2, seed=7)
    c = random_split(data, test_fraction=0.2, seed=8)
    _check_partition(data, *a)
    assert a.test.num_interactions == 600
    assert a.test.interactions.equals(b.test.interactions)
    assert not a.test.interactions.equals(c.test.interactions)
    assert a.train.users is data.users  # side tables are shared, not copied


def test_temporal_split_orders_time(data: Dataset) -> None:
    train, test = temporal_split(data, test_fraction=0.25)
    _check_partition(data, train, test)
    assert train.interactions["timestamp"].max() < test.interactions["timestamp"].min()
    assert abs(test.num_interactions - 750) <= 5
    cutoff = int(test.interactions["timestamp"].min())
    by_cutoff = temporal_split(data, cutoff=cutoff)
    assert by_cutoff.test.interactions.equals(test.interactions)


def test_leave_last_out_takes_each_users_latest(data: Dataset) -> None:
    train, test = leave_last_out(data, n=2, min_train=1)
    _check_partition(data, train, test)
    counts = data.interactions.group_by("user_id").len()
    eligible = counts.filter(pl.col("len") >= 3).height
    assert test.num_interactions == 2 * eligible
    latest_train = train.interactions.group_by("user_id").agg(pl.col("timestamp").max())
    earliest_test = test.interactions.group_by("user_id").agg(pl.col("timestamp").min())
    joined = latest_train.join(earliest_test, on="user_id", suffix="_test")
    assert (joined["timestamp"] <= joined["timestamp_test"]).all()


def test_validation_carve_out_stays_inside_train(data: Dataset) -> None:
    train, _ = random_split(data, seed=1)
    fit, valid = validation_split(train, fraction=0.1, seed=2)
    _check_partition(train, fit, valid)


def test_bad_arguments_name_the_problem(data: Dataset) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        random_split(data, test_fraction=1.5)
    with pytest.raises(ConfigError, match="exactly one"):
        temporal_split(data)
    with pytest.raises(ConfigError, match="method"):
        split_dataset(data, method="shuffle")
    with pytest.raises(ConfigError, match="`seed` should be a non-negative integer"):
        split_dataset(data, seed=-1)  # as `twostage data split --seed -1` asks
    for seed in ("7", 1.5, True):  # a TypeError from numpy, or True taken for 1
        with pytest.raises(ConfigError, match="`seed` should be a non-negative"):
            random_split(data, seed=seed)  # type: ignore[arg-type]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 300),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
    duplicates=st.booleans(),
)
def test_random_split_partitions_any_table(
    n: int, fraction: float, seed: int, duplicates: bool
) -> None:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 5 if duplicates else 1000, n)
    frame = pl.DataFrame(
        {
            "user_id": users,
            "item_id": users % 3,
            "timestamp": np.zeros(n, dtype=np.int64),
        }
    ).with_row_index("row")
    data = Dataset("t", frame)
    train, test = random_split(data, test_fraction=fraction, seed=seed)
    _check_partition(data, train, test)
    assert test.num_interactions == round(n * fraction)


def _experiment(data: Dataset, split: str) -> ExperimentSplit:
    config = apply_overrides(
        ExperimentConfig(),
        [
            f"data.split={split}",
            "data.test_fraction=0.2",
            "data.validation_fraction=0.1",
        ],
    )
    return prepare_split(data, config)


@pytest.mark.parametrize("split", ["random", "temporal", "leave-last-out"])
def test_protocols_partition_the_rows_into_fit_validation_and_test(
    data: Dataset, split: str
) -> None:
    parts = _experiment(data, split)
    assert parts.validation is not None
    rows = [
        set(p.interactions["row"].to_list())
        for p in (parts.fit, parts.validation, parts.test)
    ]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert sum(map(len, rows)) == data.num_interactions


def test_leave_last_out_holds_out_the_last_item_and_validates_on_the_second_last(
    data: Dataset,
) -> None:
    parts = _experiment(data, "leave-last-out")
    assert parts.validation is not None
    ordered = data.interactions.sort(["user_id", "timestamp", "row"]).with_columns(
        pl.int_range(pl.len()).reverse().over("user_id").alias("from_end")
    )
    rank = dict(
        zip(ordered["row"].to_list(), ordered["from_end"].to_list(), strict=True)
    )
    assert {rank[r] for r in parts.test.interactions["row"]} == {0}
    assert {rank[r] for r in parts.validation.interactions["row"]} == {1}
    # one test row per user with at least two rows, one validation row per user
    # with at least three
    counts = data.interactions.group_by("user_id").len()
    assert parts.test.num_interactions == counts.filter(pl.col("len") >= 2).height
    assert parts.validation.num_interactions == counts.filter(pl.col("len") >= 3).height


def test_leave_last_out_reports_an_unused_test_fraction(
    data: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """The fraction does not size a leave-last-out test; a config that sets it
    is told so (and still loads, as saved configs do)."""
    config = apply_overrides(
        ExperimentConfig(), ["data.split=leave-last-out", "data.test_fraction=0.3"]
    )
    with caplog.at_level("WARNING", logger="twostage"):
        parts = prepare_split(data, config)
    assert "data.test_fraction=0.3 is not used by the leave-last-out split" in (
        caplog.text
    )
    assert (
        parts.test.num_interactions
        == _experiment(data, "leave-last-out").test.num_interactions
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage"):
        _experiment(data, "leave-last-out")
        _experiment(data, "random")
    assert "test_fraction" not in caplog.text


def test_temporal_protocol_validates_on_the_latest_training_rows(data: Dataset) -> None:
    parts = _experiment(data, "temporal")
    assert parts.validation is not None
    fit_times = parts.fit.interactions["timestamp"]
    valid_times = parts.validation.interactions["timestamp"]
    test_times = parts.test.interactions["timestamp"]
    # no row is judged on a future the model trained on
    assert fit_times.max() <= valid_times.min()
    assert valid_times.max() <= test_times.min()


def test_a_log_without_times_is_cut_in_file_order_said_so(
    data: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    untimed = dataclasses.replace(data, has_time=False, source="log.csv")
    for method, said in (("temporal", "the latest rows"), ("random", None)):
        caplog.clear()
        config = apply_overrides(ExperimentConfig(), [f"data.split={method}"])
        with caplog.at_level("WARNING"):
            parts = prepare_split(untimed, config)
        assert parts.fit.has_time is parts.test.has_time is False
        if said is None:
            assert "no time column" not in caplog.text
            continue
        assert f"'log.csv' has no time column: the {method} split takes {said}" in (
            caplog.text
        )
    with caplog.at_level("WARNING"):
        prepare_split(data, config)
    assert "no time column" not in caplog.text


def test_split_files_without_times_read_as_a_log_without_times(
    data: Dataset, tmp_path: Path
) -> None:
    """The files' rows carried the dataset's `has_time`, so a file without a
    `timestamp` column had its row numbers read as seconds."""
    halves = split_dataset(data, method="random", seed=1)
    for side, name in zip(halves, ("train", "test"), strict=True):
        side.interactions.drop("timestamp", "row").write_parquet(
            tmp_path / f"{name}.pq"
        )
    config = apply_overrides(
        ExperimentConfig(),
        [
            f"data.train_file={tmp_path / 'train.pq'}",
            f"data.test_file={tmp_path / 'test.pq'}",
        ],
    )
    parts = prepare_split(data, config)
    assert parts.fit.has_time is parts.test.has_time is False
    for side, name in zip(halves, ("train", "test"), strict=True):
        side.interactions.drop("row").write_parquet(tmp_path / f"{name}.pq")
    assert prepare_split(data, config).fit.has_time


def test_test_users_evaluates_a_fixed_sample_and_trains_on_the_same_rows(
    data: Dataset,
) -> None:
    """`data.test_users=N`: N test users, the same whatever the row order; the other
    test rows leave evaluation but do not join training."""
    from twostage.data.split import sample_users

    whole = prepare_split(data, apply_overrides(ExperimentConfig(), []))
    config = apply_overrides(ExperimentConfig(), ["data.test_users=30"])
    parts = prepare_split(data, config)
    assert parts.test.interactions["user_id"].n_unique() == 30
    assert parts.fit.interactions.equals(whole.fit.interactions)
    chosen = set(parts.test.interactions["user_id"].to_list())
    kept = whole.test.interactions.filter(pl.col("user_id").is_in(list(chosen)))
    assert _rows(parts.test.interactions) == _rows(kept)  # every row of those users
    shuffled = whole.test.with_interactions(
        whole.test.interactions.sample(fraction=1.0, shuffle=True, seed=3)
    )
    again = sample_users(shuffled, 30, seed=42)
    assert set(again.interactions["user_id"].to_list()) == chosen
    other = sample_users(whole.test, 30, seed=7)
    assert set(other.interactions["user_id"].to_list()) != chosen
    assert sample_users(whole.test, 0, seed=42) is whole.test  # 0: every user
    with pytest.raises(ConfigError, match="test_users"):
        apply_overrides(ExperimentConfig(), ["data.test_users=-1"])


def test_a_split_that_leaves_a_side_empty_says_why() -> None:
    def log(users: list[int], times: list[int]) -> Dataset:
        frame = pl.DataFrame({USER: users, ITEM: list(range(len(users))), TIME: times})
        return Dataset("tiny", frame)

    def prepared(dataset: Dataset, *overrides: str) -> ExperimentSplit:
        config = apply_overrides(ExperimentConfig(), list(overrides))
        return prepare_split(dataset, config)

    tied = log([1, 2, 3, 4, 5], [7] * 5)
    with pytest.raises(DataError, match="temporal split of 5 rows left none to train"):
        prepared(tied, "data.split=temporal")
    with pytest.raises(DataError, match="no user has the 2 interactions"):
        prepared(tied, "data.split=leave-last-out")
    with pytest.raises(DataError, match="of 1 row left none to test on"):
        prepared(log([1], [7]), "data.split=random")
    # The test side is fine, but validation's own temporal cut takes every row left.
    late = log([1, 2, 3, 4, 5], [1, 1, 1, 1, 2])
    with pytest.raises(DataError, match="took all 4 training rows"):
        prepared(late, "data.split=temporal")
    split = prepared(late, "data.split=temporal", "data.validation_fraction=0")
    assert (split.fit.num_interactions, split.test.num_interactions) == (4, 1)
    with pytest.raises(DataError, match="held out 5 of 5 users first"):
        prepared(late, "data.cold_user_fraction=0.99")


def test_a_damaged_split_file_is_a_data_error(data: Dataset, tmp_path: Path) -> None:
    """`data.train_file` / `test_file` pointing at a damaged Parquet file: its
    schema read ended in polars' ComputeError rather than a DataError naming it."""
    from twostage.data.split import read_split_file

    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1" + bytes(range(256)) * 2 + b"PAR1")
    with pytest.raises(DataError, match=r"test\.parquet: not a readable Parquet"):
        read_split_file(str(path), like=data)
