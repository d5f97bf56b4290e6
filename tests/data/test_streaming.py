"""Logs larger than memory: Parquet written a chunk at a time, split row by row,
shared by rank, vocabularies fitted in one streaming pass."""

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from twostage.data.streaming import (
    fit_vocabularies,
    held_out_mask,
    iter_batches,
    iter_row_groups,
    parquet_files,
    split_rule,
)
from twostage.data.synthetic import write_parquet
from twostage.errors import ConfigError, DataError
from twostage.features.vocab import Vocabulary

COLUMNS = ["user_id", "item_id", "timestamp"]


def _write(directory: Path, rows_per_group: int) -> list[Path]:
    return write_parquet(
        directory,
        num_users=300,
        num_items=120,
        num_interactions=20_000,
        num_clusters=6,
        rows_per_file=7_000,
        rows_per_group=rows_per_group,
        seed=5,
    )


def _all(path: Path) -> pl.DataFrame:
    return pl.concat(iter_batches(path, columns=COLUMNS))


def test_writer_writes_every_row_in_files_and_row_groups(tmp_path: Path) -> None:
    files = _write(tmp_path, 1_000)
    assert len(files) == 3 and parquet_files(tmp_path) == files
    log = pl.concat(pl.read_parquet(f) for f in files)
    assert log.height == 20_000
    assert log["timestamp"].is_sorted()
    # The planted structure: most rows are in the user's favoured cluster.
    favoured = (log["item_id"] % 6 == log["user_id"] % 6).mean()
    assert favoured > 0.75
    assert log["rating"].min() >= 1 and log["rating"].max() <= 5


def test_random_side_is_decided_by_the_row_alone(tmp_path: Path) -> None:
    """The same rows are test rows however the log is cut into batches or files."""
    _write(tmp_path, 500)
    log = _all(tmp_path)
    whole = held_out_mask(log, method="random", test_fraction=0.2, seed=1)
    for size in (333, 4_000):
        parts = [
            held_out_mask(
                log.slice(start, size), method="random", test_fraction=0.2, seed=1
            )
            for start in range(0, log.height, size)
        ]
        assert (np.concatenate(parts) == whole).all(), size
    shuffled = log.sample(fraction=1.0, shuffle=True, seed=0)
    again = held_out_mask(shuffled, method="random", test_fraction=0.2, seed=1)
    assert (
        shuffled.filter(pl.Series(again))
        .sort(COLUMNS)
        .equals(log.filter(pl.Series(whole)).sort(COLUMNS))
    )
    assert 0.18 < whole.mean() < 0.22
    other_seed = held_out_mask(log, method="random", test_fraction=0.2, seed=2)
    assert (other_seed != whole).mean() > 0.2


def test_string_ids_hash_too() -> None:
    batch = pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(4_000)],
            "item_id": [f"i{i % 50}" for i in range(4_000)],
            "timestamp": list(range(4_000)),
        }
    )
    mask = held_out_mask(batch, method="random", test_fraction=0.3, seed=0)
    assert 0.26 < mask.mean() < 0.34
    again = held_out_mask(batch.reverse(), method="random", test_fraction=0.3, seed=0)
    assert (again[::-1] == mask).all()


def test_ranks_share_the_row_groups_disjointly(tmp_path: Path) -> None:
    _write(tmp_path, 1_000)
    whole = _all(tmp_path).with_row_index("row")
    key = ["user_id", "item_id", "timestamp"]
    shares = [
        pl.concat(iter_batches(tmp_path, columns=COLUMNS, rank=r, world=3))
        for r in range(3)
    ]
    assert sum(s.height for s in shares) == whole.height
    assert all(s.height > 0 for s in shares)
    together = pl.concat(shares).sort(key)
    assert together.equals(whole.drop("row").sort(key))
    with pytest.raises(ConfigError, match="rank"):
        next(iter_batches(tmp_path, columns=COLUMNS, rank=3, world=3))


@pytest.mark.parametrize("flush_rows", [4_000_000, 50])
@pytest.mark.parametrize("method", ["random", "temporal"])
def test_streaming_vocabularies_equal_in_memory_ones(
    tmp_path: Path, method: str, flush_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merged once at the end, or many times as the batches come (flush_rows=50)."""
    from twostage.data import streaming

    monkeypatch.setattr(streaming.RunningCounts, "FLUSH_ROWS", flush_rows)
    _write(tmp_path, 1_000)
    fitted = fit_vocabularies(tmp_path, method=method, test_fraction=0.2, seed=3)
    log = _all(tmp_path)
    if method == "temporal":
        cut = log["timestamp"].quantile(0.8, interpolation="lower")
        test = (log["timestamp"] >= cut).to_numpy()
        train_times = log.filter(pl.Series(~test))["timestamp"]
        assert train_times.max() < log.filter(pl.Series(test))["timestamp"].min()
    else:
        test = held_out_mask(log, method="random", test_fraction=0.2, seed=3)
    train = log.filter(pl.Series(~test))
    assert fitted.num_train_rows == train.height
    assert fitted.num_test_rows == int(test.sum())
    for name, vocabulary in (("user_id", fitted.users), ("item_id", fitted.items)):
        expected = Vocabulary().fit(train[name])
        assert vocabulary.values.to_list() == expected.values.to_list(), name
        np.testing.assert_array_equal(vocabulary.counts, expected.counts)
    probs = fitted.item_probs()
    assert probs[0] == 0 and probs.sum() == pytest.approx(1.0)


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Parquet"):
        parquet_files(tmp_path / "missing")
    with pytest.raises(DataError, match=r"no \*\.parquet"):
        parquet_files(tmp_path)
    # A CSV or JSON log under --stream ended in pyarrow's "magic bytes" traceback.
    log = tmp_path / "log.jsonl"
    log.write_text('{"user_id": 1, "item_id": 2, "timestamp": 3}\n')
    with pytest.raises(DataError, match=r"not a Parquet file.*pl\.scan_ndjson"):
        parquet_files(log)
    batch = pl.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [3]})
    with pytest.raises(ConfigError, match="method"):
        held_out_mask(batch, method="by-user", test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="method"):
        split_rule(tmp_path, method="by-user", test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="held_rows"):
        held_out_mask(batch, method="leave-last-out", test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="time_cut"):
        held_out_mask(batch, method="temporal", test_fraction=0.2, seed=0)


def test_files_that_disagree_on_a_column_are_named_before_a_row_is_read(
    tmp_path: Path,
) -> None:
    # A later file with text IDs once ended a pass in polars' SchemaError, one
    # without a column in ColumnNotFoundError.
    log = pl.DataFrame(
        {
            "user_id": [1, 2, 3, 4],
            "item_id": [5, 6, 7, 8],
            "timestamp": [10, 20, 30, 40],
            "rating": [1.0, 2.0, 3.0, 4.0],
            "genre": ["a", "b", "a", "b"],
        }
    )

    def dataset(name: str, second: pl.DataFrame) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        log.head(2).write_parquet(directory / "a.parquet")
        second.write_parquet(directory / "b.parquet")
        return directory

    later = log.tail(2)
    text_ids = dataset("text", later.with_columns(pl.col("user_id").cast(pl.String)))
    with pytest.raises(DataError, match=r"b\.parquet' types 'user_id' as large_string"):
        _all(text_ids)
    no_rating = dataset("no_rating", later.drop("rating"))
    with pytest.raises(
        DataError, match=r"b\.parquet' lacks the column\(s\) \['rating'\]"
    ):
        _all(no_rating)
    number_genre = dataset("genre", later.with_columns(pl.lit(3).alias("genre")))
    with pytest.raises(DataError, match="'genre' as int32 \\(number\\)"):
        pl.concat(iter_batches(number_genre, columns=[*COLUMNS, "genre"]))
    # Widths, timestamps as datetimes and ratings as text are read as one type.
    readable = dataset(
        "readable",
        later.with_columns(
            pl.col("user_id").cast(pl.Int32),
            pl.from_epoch("timestamp").alias("timestamp"),
            pl.col("rating").cast(pl.String),
        ),
    )
    rows = pl.concat(iter_batches(readable, columns=[*COLUMNS, "rating"]))
    assert rows["user_id"].to_list() == [1, 2, 3, 4]
    assert rows["timestamp"].to_list() == [10, 20, 30, 40]
    assert rows["rating"].to_list() == [1.0, 2.0, 3.0, 4.0]


def _tied_log(directory: Path) -> pl.DataFrame:
    """Users whose last timestamp is shared by several rows (the later row is the
    last), spread over two files of several row groups, and a user with one row."""
    rng = np.random.default_rng(0)
    rows = 3_000
    log = pl.DataFrame(
        {
            "user_id": rng.integers(0, 200, rows),
            "item_id": rng.integers(0, 80, rows),
            # few distinct times: most users' last time is tied with another row
            "timestamp": rng.integers(0, 20, rows),
        }
    ).vstack(pl.DataFrame({"user_id": [999], "item_id": [1], "timestamp": [5]}))
    directory.mkdir(parents=True, exist_ok=True)
    log.slice(0, 1_700).write_parquet(directory / "a.parquet", row_group_size=400)
    log.slice(1_700).write_parquet(directory / "b.parquet", row_group_size=300)
    return log


def test_leave_last_out_streamed_holds_out_the_in_memory_rows(tmp_path: Path) -> None:
    """Each user's last row by time (ties: the later row), as the in-memory split
    picks it, found by row number in every batch and in every rank's share."""
    from twostage.data.dataset import Dataset
    from twostage.data.split import leave_last_out

    log = _tied_log(tmp_path)
    rule = split_rule(tmp_path, method="leave-last-out", test_fraction=0.2, seed=0)
    assert rule.held_rows is not None and (np.diff(rule.held_rows) > 0).all()
    held = leave_last_out(Dataset(name="log", interactions=log)).test.interactions
    numbered_rows = pl.concat(
        batch.filter(pl.Series(rule.mask(batch, first)))
        for first, batch in iter_row_groups(tmp_path, columns=COLUMNS)
    )
    assert numbered_rows["__row"].to_list() == rule.held_rows.tolist()
    streamed = numbered_rows.drop("__row")
    assert streamed.sort(COLUMNS).equals(held.select(COLUMNS).sort(COLUMNS))
    # the rows themselves, not just equal values: the row numbers are the last ones
    numbered = log.with_row_index("row")
    last = numbered.sort(["user_id", "timestamp", "row"]).group_by("user_id").last()
    counts = log.group_by("user_id").len()
    expected = last.join(counts.filter(pl.col("len") >= 2), on="user_id", how="semi")
    assert rule.held_rows.tolist() == sorted(expected["row"].to_list())
    assert 999 not in streamed["user_id"].to_list()  # one row: kept for training
    # ranks: every other row group each, the same rows in all
    shares = [
        batch.filter(pl.Series(rule.mask(batch, first))).drop("__row")
        for rank in (0, 1)
        for first, batch in iter_row_groups(
            tmp_path, columns=COLUMNS, rank=rank, world=2
        )
    ]
    assert pl.concat(shares).sort(COLUMNS).equals(streamed.sort(COLUMNS))
    fitted = fit_vocabularies(
        tmp_path, method="leave-last-out", test_fraction=0.2, seed=0
    )
    assert fitted.num_test_rows == held.height
    assert fitted.num_train_rows == log.height - held.height


def test_temporal_cut_reads_times_as_the_loader_does(tmp_path: Path) -> None:
    """ISO text and datetimes become epoch seconds, bad rows are left out, and the
    cut is the "lower" quantile of what is left, as in memory."""
    from twostage.data.streaming import temporal_cut
    from twostage.data.tables import read_interactions

    times = [
        f"2021-03-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00" for i in range(900)
    ]
    log = pl.DataFrame(
        {
            "user_id": [i % 37 for i in range(900)],
            "item_id": [None if i % 50 == 0 else i % 11 for i in range(900)],
            "timestamp": [None if i == 7 else t for i, t in enumerate(times)],
        }
    )
    log.write_parquet(tmp_path / "log.parquet", row_group_size=200)
    loaded = read_interactions(
        log, user_col="user_id", item_col="item_id", time_col="timestamp"
    )
    expected = loaded.interactions["timestamp"].quantile(0.8, interpolation="lower")
    assert temporal_cut(tmp_path, test_fraction=0.2) == expected
    as_datetimes = log.with_columns(pl.col("timestamp").str.to_datetime())
    as_datetimes.write_parquet(tmp_path / "log.parquet", row_group_size=200)
    assert temporal_cut(tmp_path, test_fraction=0.2) == expected


@pytest.mark.parametrize("method", ["random", "temporal", "leave-last-out"])
def test_the_validation_carve_out_is_the_in_memory_split_of_the_training_rows(
    tmp_path: Path, method: str
) -> None:
    """The carve-out is drawn from the training rows only, by the in-memory
    method: a second hash for random, the training times' "lower" quantile for
    temporal, each user's last training row for leave-last-out (ties: the later
    row); the three sides are disjoint and counted."""
    from twostage.data.dataset import Dataset
    from twostage.data.split import leave_last_out
    from twostage.data.streaming import VALIDATION_SEED_OFFSET

    path = tmp_path / "log"
    path.mkdir()
    log = _tied_log(path) if method == "leave-last-out" else None
    if log is None:
        _write(tmp_path / "raw", rows_per_group=1_500)
        log = _all(tmp_path / "raw")
        if method == "temporal":  # coarse times: many rows tie at both cuts
            log = log.with_columns(pl.col("timestamp") // 100_000 * 100_000)
        log.write_parquet(path / "log.parquet", row_group_size=1_500)
    rule = split_rule(
        path, method=method, test_fraction=0.2, seed=3, validation_fraction=0.1
    )
    sides = [
        rule.sides(batch, first)
        for first, batch in iter_row_groups(path, columns=COLUMNS)
    ]
    test = np.concatenate([t for t, _ in sides])
    validation = np.concatenate([v for _, v in sides])
    assert not (test & validation).any() and validation.any()
    assert (rule.test_mask(log, 0) == test).all()  # the test side is unchanged
    train = log.filter(pl.Series(~test))
    carved = log.filter(pl.Series(validation))
    if method == "random":
        expected = held_out_mask(
            train, method="random", test_fraction=0.1, seed=3 + VALIDATION_SEED_OFFSET
        )
        assert 0.07 < expected.mean() < 0.13
    elif method == "temporal":
        cut = train["timestamp"].quantile(0.9, interpolation="lower")
        expected = (train["timestamp"] >= cut).to_numpy()
        ties = log["timestamp"] == rule.time_cut
        assert ties.sum() > 20 and (log["timestamp"] == cut).sum() > 20
    else:
        held = leave_last_out(Dataset(name="log", interactions=train))
        expected = np.zeros(train.height, dtype=bool)
        numbered = train.with_row_index("row").join(
            held.test.interactions.with_row_index("held"), on=COLUMNS, how="semi"
        )
        expected[numbered["row"].to_numpy()] = True
        assert expected.sum() == held.test.num_interactions
    assert carved.equals(train.filter(pl.Series(expected)))
    fitted = fit_vocabularies(
        path,
        method=method,
        test_fraction=0.2,
        seed=3,
        validation_fraction=0.1,
    )
    assert fitted.num_test_rows == int(test.sum())
    assert fitted.num_validation_rows == carved.height
    assert fitted.num_train_rows == log.height - test.sum() - carved.height
    # the vocabularies count the rows left for training only
    left = log.filter(pl.Series(~(test | validation)))
    assert fitted.items.size - 1 == left["item_id"].n_unique()
    assert int(fitted.items.counts.sum()) == left.height


def test_a_streamed_description_is_the_in_memory_one(tmp_path: Path) -> None:
    from twostage.data.describe import describe, describe_streamed
    from twostage.data.tables import read_interactions

    rng = np.random.default_rng(3)
    rows = 2_000
    log = pl.DataFrame(
        {
            "user_id": rng.integers(0, 90, rows),
            "item_id": rng.integers(0, 70, rows),
            "timestamp": rng.integers(1_500_000_000, 1_600_000_000, rows),
            "rating": rng.integers(1, 6, rows).astype(float),
            "device": rng.choice(["ios", "web"], rows),
        }
    ).with_columns(  # two bad rows: a NaN rating and a missing item
        pl.when(pl.int_range(rows) == 10)
        .then(float("nan"))
        .otherwise(pl.col("rating"))
        .alias("rating"),
        pl.when(pl.int_range(rows) == 1_500)
        .then(None)
        .otherwise(pl.col("item_id"))
        .alias("item_id"),
    )
    file = tmp_path / "log.parquet"
    log.write_parquet(file, row_group_size=300)
    in_memory = read_interactions(file)
    expected = describe(in_memory)
    summary, report = describe_streamed(file)
    for key in (
        "num_interactions",
        "num_users",
        "num_items",
        "density",
        "interactions_per_user",
        "interactions_per_item",
        "time_range",
        "rating_histogram",
    ):
        assert summary[key] == expected[key], key
    assert summary["rating_mean"] == pytest.approx(expected["rating_mean"])
    assert summary["duplicate_rows"] is None and summary["other_columns"] == ["device"]
    assert (
        report.rejected
        == in_memory.report.rejected
        == {
            "bad_rating": 1,
            "empty_item_id": 1,
        }
    )
    assert [line for line, _ in report.examples["bad_rating"]] == [11]
    assert (report.rows_read, report.rows_loaded) == (2_000, 1_998)
    # Row weights: the spread the in-memory description gives (its median aside),
    # and where a streamed run would stop on a bad one.
    plays = rng.integers(0, 9, rows).astype(float)
    weighted = log.with_columns(plays=pl.Series(plays))
    weighted.write_parquet(file, row_group_size=300)
    expected = describe(read_interactions(file, weight_col="plays"))["weights"]
    got = describe_streamed(file, weight_col="plays")[0]["weights"]
    for key in ("min", "max", "zero"):
        assert got[key] == expected[key], key
    assert got["mean"] == pytest.approx(expected["mean"])
    assert (got["median"], got["bad"], got["first_bad_row"]) == (None, 0, None)
    plays[[700, 40]] = [-1.0, float("inf")]
    log.with_columns(plays=pl.Series(plays)).write_parquet(file, row_group_size=300)
    got = describe_streamed(file, weight_col="plays")[0]["weights"]
    assert (got["bad"], got["first_bad_row"]) == (2, 41)
    # Names weighed by `weight_values`; a value it does not list is a bad weight.
    kinds = ["view", "buy"] * (rows // 2)
    kinds[5] = "zap"
    log.with_columns(event=pl.Series(kinds)).write_parquet(file, row_group_size=300)
    got = describe_streamed(
        file, weight_col="event", weight_values={"view": 1.0, "buy": 5.0}
    )[0]["weights"]
    assert (got["min"], got["max"], got["bad"], got["first_bad_row"]) == (1, 5, 1, 6)


def test_min_counts_of_a_stream_are_the_in_memory_k_core(tmp_path: Path) -> None:
    """`data.min_user_rows` / `min_item_rows` (the 5-core) were refused under
    --stream; the streamed rounds keep the rows min_counts keeps in memory."""
    from twostage.data.dataset import Dataset
    from twostage.data.filtering import min_counts
    from twostage.data.streaming import Reading, min_count_ids

    _write(tmp_path, 1_000)
    log = _all(tmp_path)
    data = Dataset(name="log", interactions=log)
    for users, items in ((60, 0), (0, 150), (50, 80)):
        reading = Reading(min_user_rows=users, min_item_rows=items)
        kept, removed = min_counts(data, users=users, items=items)
        streamed = pl.concat(iter_batches(tmp_path, columns=COLUMNS, reading=reading))
        assert streamed.equals(kept.interactions.select(COLUMNS))
        found = min_count_ids(tmp_path, reading).removed
        assert found == removed and removed.rows > 0
    assert removed.rounds > 1  # both minimums: users left items short, or back
    with pytest.raises(DataError, match="every row of the log"):
        min_count_ids(tmp_path, Reading(min_user_rows=10**6))
    with pytest.raises(ConfigError, match="min_item_rows"):
        list(iter_batches(tmp_path, columns=COLUMNS, reading=Reading(min_item_rows=-1)))


def test_duplicates_of_a_stream_are_dropped_as_in_memory(tmp_path: Path) -> None:
    """`data.duplicates` was refused under --stream: an event log with rows written
    twice had to be cleaned first. The streamed policy drops the rows the
    in-memory loader drops, counted as `duplicate`, before the minimum counts."""
    from twostage.data.dataset import Dataset
    from twostage.data.filtering import min_counts
    from twostage.data.report import LoadReport
    from twostage.data.streaming import Reading, duplicate_rows
    from twostage.data.tables import read_interactions

    source = tmp_path / "source"
    _write(source, 1_000)
    log = pl.concat(pl.read_parquet(f) for f in parquet_files(source))
    again = log.gather(np.random.default_rng(0).choice(log.height, 300))
    again = again.with_columns(pl.col("rating").reverse())  # same keys, other values
    doubled = pl.concat([log.head(9_000), again, log.tail(log.height - 9_000)])
    whole = tmp_path / "whole.parquet"
    doubled.write_parquet(whole)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    doubled.head(8_000).write_parquet(streamed / "a.parquet", row_group_size=700)
    doubled.slice(8_000).write_parquet(streamed / "b.parquet", row_group_size=1_500)
    columns = [*COLUMNS, "rating"]
    for policy in ("first", "last"):
        read = read_interactions(whole, duplicates=policy)
        report = LoadReport(path=str(streamed))
        rows = pl.concat(
            iter_batches(
                streamed,
                columns=columns,
                report=report,
                reading=Reading(duplicates=policy),
            )
        )
        assert rows.equals(read.interactions.select(columns))
        assert report.rejected == read.report.rejected  # {"duplicate": n}
        assert report.rejected["duplicate"] >= 250
        assert (
            duplicate_rows(streamed, Reading(duplicates=policy)).size
            == (report.rejected["duplicate"])
        )
        # Before the minimum counts, as in memory.
        cored, _ = min_counts(
            Dataset(name="x", interactions=read.interactions), users=60
        )
        both = Reading(duplicates=policy, min_user_rows=60)
        rows = pl.concat(iter_batches(streamed, columns=columns, reading=both))
        assert rows.equals(cored.interactions.select(columns))
    with pytest.raises(DataError, match="repeats the user, item and timestamp of row"):
        list(
            iter_batches(streamed, columns=COLUMNS, reading=Reading(duplicates="error"))
        )
    with pytest.raises(ConfigError, match="duplicates"):
        list(iter_batches(streamed, columns=COLUMNS, reading=Reading(duplicates="all")))


def _expected_sides(
    log: pl.DataFrame, method: str, seed: int
) -> dict[str, pl.DataFrame]:
    """The streamed split with cold users, made in memory: the users
    hold_out_users draws, then the streamed rule on the other users' rows (a hash
    per row, or the times' quantile), with a validation tenth carved the same way."""
    from twostage.data.dataset import Dataset
    from twostage.data.split import hold_out_users, leave_last_out
    from twostage.data.streaming import VALIDATION_SEED_OFFSET

    rest, cold = hold_out_users(
        Dataset(name="log", interactions=log), fraction=0.1, seed=seed
    )
    rows = rest.interactions

    def cut(times: np.ndarray, fraction: float) -> int:
        return int(np.sort(times)[int(np.floor((1 - fraction) * (len(times) - 1)))])

    if method == "random":
        test = held_out_mask(rows, method="random", test_fraction=0.2, seed=seed)
        train = rows.filter(pl.Series(~test))
        held = held_out_mask(
            train,
            method="random",
            test_fraction=0.1,
            seed=seed + VALIDATION_SEED_OFFSET,
        )
    elif method == "temporal":
        test = rows["timestamp"].to_numpy() >= cut(rows["timestamp"].to_numpy(), 0.2)
        train = rows.filter(pl.Series(~test))
        times = train["timestamp"].to_numpy()
        held = times >= cut(times, 0.1)
    else:
        parts = leave_last_out(rest)
        inner = leave_last_out(parts.train, min_train=2)
        return {
            "test": pl.concat([parts.test.interactions, cold.interactions]),
            "fit": inner.train.interactions,
            "validation": inner.test.interactions,
        }
    return {
        "test": pl.concat([rows.filter(pl.Series(test)), cold.interactions]),
        "fit": train.filter(pl.Series(~held)),
        "validation": train.filter(pl.Series(held)),
    }


@pytest.mark.parametrize("method", ["random", "temporal", "leave-last-out"])
def test_cold_users_of_a_stream_are_the_in_memory_ones(
    tmp_path: Path, method: str
) -> None:
    """`data.cold_user_fraction` was refused under --stream. The streamed split
    holds out the users hold_out_users draws in memory, every row of theirs a test
    row, and splits the other users' rows alone (a temporal cut is their times'
    quantile), validation carve-out included."""
    _write(tmp_path, 1_000)
    log = _all(tmp_path)
    rule = split_rule(
        tmp_path,
        method=method,
        test_fraction=0.2,
        seed=42,
        validation_fraction=0.1,
        cold_user_fraction=0.1,
    )
    assert rule.cold is not None and rule.cold.len() == 30  # of 300 users
    sides: dict[str, list[pl.DataFrame]] = {"fit": [], "validation": [], "test": []}
    for first, batch in iter_row_groups(tmp_path, columns=COLUMNS):
        test, validation = rule.sides(batch, first)
        sides["test"].append(batch.filter(pl.Series(test)))
        sides["validation"].append(batch.filter(pl.Series(validation)))
        sides["fit"].append(batch.filter(pl.Series(~(test | validation))))
    expected = _expected_sides(log, method, seed=42)
    for side, frames in sides.items():
        want = expected[side].select(COLUMNS).sort(COLUMNS)
        assert pl.concat(frames).select(COLUMNS).sort(COLUMNS).equals(want), side
    cold = set(rule.cold.to_list())
    assert not cold & set(pl.concat(sides["fit"])["user_id"].to_list())


def _rules(log: str, *, ranks: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """What the split rules found: a temporal cut with cold users and a validation
    cut, each user's last rows and the validation's last rows."""
    import torch

    from twostage.data.streaming import Reading

    reading = Reading(duplicates="first")
    temporal = split_rule(
        log,
        method="temporal",
        test_fraction=0.2,
        seed=3,
        validation_fraction=0.1,
        cold_user_fraction=0.1,
        reading=reading,
        ranks=ranks,
    )
    last = split_rule(
        log,
        method="leave-last-out",
        test_fraction=0.2,
        seed=3,
        validation_fraction=0.1,
        reading=reading,
        ranks=ranks,
    )
    assert temporal.cold is not None and temporal.validation is not None
    assert last.held_rows is not None and last.validation is not None
    assert last.validation.held_rows is not None
    return {
        "cuts": torch.tensor([temporal.time_cut, temporal.validation.time_cut]),
        "cold": torch.from_numpy(temporal.cold.sort().to_numpy().copy()),
        "last": torch.from_numpy(last.held_rows.copy()),
        "validation_last": torch.from_numpy(last.validation.held_rows.copy()),
    }


def _filtered_rank(rank: int, log: str, out: str) -> None:
    """One rank of a gloo group: its share of a pass with the duplicates and the
    minimum counts, which the ranks compute together."""
    import torch
    from safetensors.torch import save_file

    from twostage import distributed
    from twostage.data.streaming import Reading, min_count_ids

    distributed.init_from_env()
    try:
        reading = Reading(duplicates="first", min_user_rows=50, min_item_rows=80)
        rows = [
            batch["__row"].to_numpy()
            for _, batch in iter_row_groups(
                log, columns=COLUMNS, rank=rank, world=2, reading=reading
            )
        ]
        kept = min_count_ids(log, reading, ranks=(rank, 2))  # as the pass found
        rules = _rules(log, ranks=(rank, 2))
        save_file(
            {
                "rows": torch.from_numpy(np.concatenate(rows)),
                "read": torch.tensor([kept.local_rows]),
                **rules,
            },
            f"{out}.{rank}",
        )
    finally:
        distributed.shutdown()


def test_two_ranks_share_the_passes_of_the_filters(tmp_path: Path) -> None:
    """Under torchrun every rank read the whole log for the duplicates and every
    round of the k-core; now each reads its row groups and the ranks merge what
    they found, and the rows kept are the single process's."""
    import torch
    from safetensors.torch import load_file

    from twostage import distributed
    from twostage.data.streaming import Reading, min_count_ids

    source = tmp_path / "source"
    _write(source, 1_000)
    log = pl.concat(pl.read_parquet(f) for f in parquet_files(source))
    again = log.gather(np.random.default_rng(0).choice(log.height, 300))
    doubled = pl.concat([log.head(9_000), again, log.tail(log.height - 9_000)])
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    doubled.head(8_000).write_parquet(streamed / "a.parquet", row_group_size=700)
    doubled.slice(8_000).write_parquet(streamed / "b.parquet", row_group_size=1_500)
    out = str(tmp_path / "rank")
    distributed.run_local_group(_filtered_rank, 2, str(streamed), out)
    reading = Reading(duplicates="first", min_user_rows=50, min_item_rows=80)
    single = pl.concat(
        batch
        for _, batch in iter_row_groups(streamed, columns=COLUMNS, reading=reading)
    )["__row"].to_numpy()
    saved = [load_file(f"{out}.{rank}") for rank in (0, 1)]
    # The split rules the ranks found together are the single process's.
    alone = _rules(str(streamed))
    for part in saved:
        for key, value in alone.items():
            assert torch.equal(part[key], value), key
    shares = [part["rows"].numpy() for part in saved]
    assert all(len(share) > 0 for share in shares)
    assert np.array_equal(np.sort(np.concatenate(shares)), single)
    # Each rank counted its own row groups: together, the log once.
    whole = min_count_ids(streamed, reading).local_rows
    read = [int(part["read"][0]) for part in saved]
    assert min(read) > 0 and sum(read) == whole
    assert len(single) < doubled.unique(COLUMNS).height  # the k-core removed rows


def test_a_choice_outranks_its_impression_among_duplicates(tmp_path: Path) -> None:
    """An impression and its click logged at the same moment are one user, item and
    time: `duplicates=first` kept whichever line came first, so a shown row could
    drop the choice. The chosen row is kept, in memory and streamed alike."""
    from twostage.data.dataset import LABEL
    from twostage.data.streaming import Reading, duplicate_rows
    from twostage.data.tables import read_interactions

    rows = [  # user, item, time, clicked
        (1, 10, 100, 0),  # shown ...
        (1, 10, 100, 1),  # ... and chosen at once: the choice stays
        (2, 11, 100, 1),  # chosen, then logged again as shown
        (2, 11, 100, 0),
        (3, 12, 100, 0),  # shown twice: the first (or last) of them
        (3, 12, 100, 0),
        (4, 13, 100, 1),  # chosen twice
        (4, 13, 100, 1),
        (5, 14, 100, 1),
    ]
    log = pl.DataFrame(
        rows, schema=["user_id", "item_id", "timestamp", "clicked"], orient="row"
    )
    path = tmp_path / "impressions.parquet"
    log.write_parquet(path, row_group_size=4)
    expected = {"first": [0, 3, 5, 7], "last": [0, 3, 4, 6]}  # 0-based rows dropped
    for policy, dropped in expected.items():
        read = read_interactions(
            path, time_col="timestamp", label_col="clicked", duplicates=policy
        )
        assert read.report is not None
        assert read.report.rejected == {"duplicate": 4}
        lines = sorted(n for n, _ in read.report.examples["duplicate"])
        assert lines == [row + 1 for row in dropped], policy
        chosen = read.interactions.select("user_id", "item_id").rows()
        assert chosen == [(1, 10), (2, 11), (4, 13), (5, 14)]
        assert read.shown is not None and read.shown["user_id"].to_list() == [3]
        reading = Reading(duplicates=policy, label_col="clicked")
        assert duplicate_rows(path, reading).tolist() == dropped, policy
    plain = read_interactions(path, time_col="timestamp", duplicates="first")
    assert LABEL not in plain.interactions.columns
    assert plain.report is not None and plain.report.rejected == {"duplicate": 4}


def test_a_damaged_parquet_file_is_a_clear_error_never_a_crash(tmp_path: Path) -> None:
    """Bytes flipped in a Parquet file: pyarrow's OSError, ArrowInvalid or
    UnicodeDecodeError, or a polars panic (a BaseException), ended streamed and
    in-memory reads in a traceback; each is now a DataError naming the file, or
    the file still reads. Seeds 100 and 159 made polars panic."""
    import random

    from twostage.data.tables import read_interactions
    from twostage.errors import TwostageError

    frame = pl.DataFrame(
        {
            "user_id": list(range(2000)),
            "item_id": [i % 97 for i in range(2000)],
            "timestamp": list(range(2000)),
            "rating": [float(i % 5) for i in range(2000)],
        }
    )
    good = tmp_path / "good.parquet"
    frame.write_parquet(good, row_group_size=500)
    data = good.read_bytes()
    folder = tmp_path / "log"
    folder.mkdir()
    damaged = folder / "part-0.parquet"
    outcomes = {"read": 0, "refused": 0}
    for seed in [*range(30), 100, 135, 159]:
        rng = random.Random(seed)
        flipped = bytearray(data)
        for _ in range(rng.choice([1, 5, 50])):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        damaged.write_bytes(bytes(flipped))
        for read in (
            lambda: read_interactions(
                damaged, time_col="timestamp", rating_col="rating"
            ),
            lambda: sum(
                batch.height
                for batch in iter_batches(folder, columns=[*COLUMNS, "rating"])
            ),
        ):
            try:
                read()
                outcomes["read"] += 1
            except TwostageError as e:
                assert str(damaged) in str(e), e
                outcomes["refused"] += 1
    assert outcomes["refused"] > 10 and outcomes["read"] > 0
