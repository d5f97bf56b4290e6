"""`twostage data split` of a log larger than memory: the split `train --stream`
makes, written a row group at a time (:mod:`twostage.data.streamed_split`)."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.data.streamed_split import write_streamed_split
from twostage.data.streaming import (
    Reading,
    held_out_rows,
    iter_batches,
    split_rule,
)
from twostage.data.synthetic import write_parquet
from twostage.errors import ConfigError, DataError

runner = CliRunner()
COLUMNS = ["user_id", "item_id", "timestamp", "rating"]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """Two files of several row groups, and a third with two bad rows (no item,
    a rating that is not a number)."""
    directory = tmp_path / "log"
    write_parquet(
        directory,
        num_users=80,
        num_items=40,
        num_interactions=2000,
        num_clusters=4,
        rows_per_file=1000,
        rows_per_group=300,
    )
    pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [5, None, 7],
            "timestamp": [2_000_000_000, 2_000_000_001, 2_000_000_002],
            "rating": [4.0, 3.0, float("nan")],
        },
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "timestamp": pl.Int64,
            "rating": pl.Float32,
        },
    ).write_parquet(directory / "part-99999.parquet")
    return directory


def _rows(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(COLUMNS).sort(COLUMNS)


@pytest.mark.parametrize("method", ["random", "temporal", "leave-last-out"])
def test_the_sides_are_the_rows_a_streamed_run_trains_and_is_measured_on(
    log: Path, tmp_path: Path, method: str
) -> None:
    done = write_streamed_split(
        log, tmp_path / "train.parquet", tmp_path / "test.parquet", method=method
    )
    train = pl.read_parquet(done.train)
    test = pl.read_parquet(done.test)
    assert (train.height, test.height) == (done.train_rows, done.test_rows)
    # The test side: the rows evaluation of a streamed run reads, in file order.
    rule = split_rule(log, method=method, test_fraction=0.2, seed=42)
    assert test.equals(held_out_rows(log, rule, COLUMNS))
    # Together: every good row, once; the bad ones counted with their rows.
    good = pl.concat(iter_batches(log, columns=COLUMNS))
    assert _rows(pl.concat([train, test])).equals(_rows(good))
    assert done.report.rejected == {"empty_item_id": 1, "bad_rating": 1}
    assert done.report.examples["empty_item_id"][0][0] == 2002  # its row number
    assert (done.report.rows_read, done.report.rows_loaded) == (2003, 2001)
    if method == "leave-last-out":  # each user's latest row, and only that
        assert test["user_id"].n_unique() == test.height == good["user_id"].n_unique()
        latest = good.group_by("user_id").agg(pl.col("timestamp").max())
        assert _rows(test.join(latest, on=["user_id", "timestamp"])).equals(_rows(test))
    elif method == "temporal":
        assert test["timestamp"].min() >= train["timestamp"].max()  # type: ignore[operator]
    else:
        assert 0.15 < test.height / good.height < 0.25


def test_reading_settings_and_refusals(log: Path, tmp_path: Path) -> None:
    out = (tmp_path / "a.parquet", tmp_path / "b.parquet")
    cored = write_streamed_split(log, *out, reading=Reading(min_user_rows=20))
    kept = pl.concat([pl.read_parquet(p) for p in out])
    assert kept.group_by("user_id").len()["len"].min() >= 20  # type: ignore[operator]
    assert cored.report.rows_read == 2003 > cored.report.rows_loaded == kept.height
    with pytest.raises(DataError, match=r"\['clicked'\] are not in"):
        write_streamed_split(log, *out, reading=Reading(label_col="clicked"))
    with pytest.raises(ConfigError, match="`method`"):
        write_streamed_split(log, *out, method="shuffled")
    bad = tmp_path / "bad"
    bad.mkdir()
    pl.DataFrame(
        {"user_id": [1], "item_id": [None], "timestamp": [1_700_000_000]},
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64},
    ).write_parquet(bad / "p.parquet")
    empty = (tmp_path / "c.parquet", tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no row to split.*empty_item_id"):
        write_streamed_split(bad, *empty)
    assert not any(p.exists() for p in empty)  # nothing half written


def test_row_weights_are_written_and_a_bad_one_stops_the_split(
    log: Path, tmp_path: Path
) -> None:
    plays = tmp_path / "plays"
    plays.mkdir()
    for file in sorted(log.glob("*.parquet")):
        frame = pl.read_parquet(file)
        frame.with_columns(plays=pl.col("item_id") % 3).write_parquet(
            plays / file.name, row_group_size=300
        )
    out = (tmp_path / "a.parquet", tmp_path / "b.parquet")
    done = write_streamed_split(plays, *out, weight_col="plays")
    both = pl.concat([pl.read_parquet(p) for p in out])
    assert (
        both.columns == [*COLUMNS, "weight"] and both.height == done.report.rows_loaded
    )
    assert both["weight"].to_list() == (both["item_id"] % 3).cast(pl.Float32).to_list()
    named = write_streamed_split(
        plays, *out, weight_col="plays", weight_values={"0": 1.0, "1": 2.0, "2": 5.0}
    )
    weights = pl.concat([pl.read_parquet(p) for p in out])["weight"]
    assert named.train_rows == done.train_rows and set(weights) == {1.0, 2.0, 5.0}
    bad = pl.read_parquet(plays / "part-00001.parquet")
    sixth = pl.int_range(pl.len()) == 5  # the 6th row of the 2nd file
    bad.with_columns(
        pl.when(sixth).then(-1.0).otherwise(pl.col("plays")).alias("plays")
    ).write_parquet(plays / "part-00001.parquet", row_group_size=300)
    for name in out:
        name.unlink()
    row = pl.read_parquet(plays / "part-00000.parquet").height + 6
    with pytest.raises(DataError, match=rf"row {row} has the weight -1\.0"):
        write_streamed_split(plays, *out, weight_col="plays")
    assert not any(p.exists() for p in out)  # nothing half written


def test_the_cli_splits_a_directory_as_a_stream(log: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    done = runner.invoke(
        app,
        ["data", "split", str(log), "--out", str(out), "--method", "temporal"],
        env={"COLUMNS": "300"},
    )
    assert done.exit_code == 0, done.output
    said = " ".join(done.output.split())
    assert "temporal split, streamed: " in said and "empty_item_id" in said
    assert pl.read_parquet(out / "train.parquet").height > 0
    one = tmp_path / "one.parquet"
    pl.concat(iter_batches(log, columns=COLUMNS)).write_parquet(one)
    again = runner.invoke(
        app, ["data", "split", str(one), "--out", str(tmp_path / "s2"), "--stream"]
    )
    assert again.exit_code == 0, again.output
    # The log's own column names: the same split, under ours.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for file in sorted(log.glob("*.parquet")):
        renamed = pl.read_parquet(file).rename({"user_id": "uid", "timestamp": "ts"})
        renamed.write_parquet(theirs / file.name, row_group_size=300)
    mapped = runner.invoke(
        app,
        [
            "data",
            "split",
            str(theirs),
            "--out",
            str(tmp_path / "s4"),
            "--method",
            "temporal",
            "--user-col",
            "uid",
            "--time-col",
            "ts",
        ],
    )
    assert mapped.exit_code == 0, mapped.output
    for name in ("train.parquet", "test.parquet"):
        assert pl.read_parquet(tmp_path / "s4" / name).equals(
            pl.read_parquet(out / name)
        )
    for flag, value in (
        ("--separator", ";"),
        ("--quote-char", "none"),
        ("--strict", None),
    ):
        refused = runner.invoke(
            app,
            ["data", "split", str(log), "--out", str(tmp_path / "s3"), flag]
            + ([value] if value else []),
        )
        text = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())
        assert refused.exit_code == 2 and f"drop {flag}" in text, text
    assert not (tmp_path / "s3").exists()


@pytest.mark.parametrize("method", ["random", "temporal", "leave-last-out"])
def test_an_impression_log_s_shown_rows_go_beside_their_choice(
    tmp_path: Path, method: str
) -> None:
    """With a label column, the rows shown and not chosen are written too
    (``label`` False), each on the side the streamed run places it
    (:func:`streamed_shown`); under leave-last-out, the sides of the in-memory
    split of the same log."""
    from twostage.config import DataConfig
    from twostage.data.synthetic import planted_impressions
    from twostage.retrieval.streamed import streamed_shown

    log = tmp_path / "log"
    log.mkdir()
    frame = planted_impressions(users=40, per_user=6).drop("kind")
    frame.write_parquet(log / "log.parquet", row_group_size=700)
    reading = Reading(label_col="clicked")
    out = (tmp_path / "train.parquet", tmp_path / "test.parquet")
    done = write_streamed_split(log, *out, method=method, reading=reading)
    sides = [pl.read_parquet(p) for p in out]
    assert sides[0].columns == ["user_id", "item_id", "timestamp", "label"]
    assert done.report.shown_rows == int((frame["clicked"] == 0).sum())
    assert done.report.rows_loaded == frame.height == sum(s.height for s in sides)
    rule = split_rule(log, method=method, test_fraction=0.2, seed=42, reading=reading)
    placed = streamed_shown(log, rule, DataConfig(label_col="clicked"))
    key = ["user_id", "item_id", "timestamp"]
    for side, expected in zip(sides, (placed.train, placed.test), strict=True):
        shown = side.filter(~pl.col("label")).select(key)
        assert shown.sort(key).equals(expected.select(key).sort(key))
    test_chosen = sides[1].filter(pl.col("label")).select(key)
    assert test_chosen.equals(held_out_rows(log, rule, key, reading=reading))
    if method == "leave-last-out":  # the in-memory split's sides, row for row
        whole = tmp_path / "whole.parquet"
        frame.write_parquet(whole)
        in_memory = tmp_path / "memory"
        said = runner.invoke(
            app,
            [
                "data",
                "split",
                str(whole),
                "--out",
                str(in_memory),
                "--method",
                method,
                "--label-col",
                "clicked",
            ],
        )
        assert said.exit_code == 0, said.output
        for name, side in zip(("train", "test"), sides, strict=True):
            theirs = pl.read_parquet(in_memory / f"{name}.parquet")
            columns = [*key, "label"]
            assert (
                theirs.select(columns)
                .sort(columns)
                .equals(side.select(columns).sort(columns))
            ), name
