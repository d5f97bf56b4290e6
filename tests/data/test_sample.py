"""A sample of a Parquet log's users written to one file
(:mod:`twostage.data.sample`, `twostage data sample`)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.data.registry import load_dataset
from twostage.data.sample import sample_log_users
from twostage.data.split import sample_users
from twostage.data.synthetic import write_parquet
from twostage.errors import ConfigError, DataError

runner = CliRunner()


def _log(directory: Path) -> pl.DataFrame:
    """Three files of several row groups; string user IDs, some padded with
    blanks, two rows without a user ID. Returns the whole log."""
    written = write_parquet(
        directory,
        num_users=200,
        num_items=50,
        num_interactions=3000,
        num_clusters=5,
        rows_per_file=1000,
        rows_per_group=300,
    )
    assert len(written) == 3
    for number, file in enumerate(written):
        frame = pl.read_parquet(file)
        user = pl.format("u{}", pl.col("user_id"))
        if number == 1:  # the same users, written with blanks around them
            user = pl.format(" u{} ", pl.col("user_id"))
        frame = frame.with_columns(user.alias("user_id"))
        if number == 2:  # a missing and a blank user ID
            frame = frame.with_columns(
                pl.when(pl.int_range(pl.len()) == 5)
                .then(None)
                .when(pl.int_range(pl.len()) == 9)
                .then(pl.lit("  "))
                .otherwise(pl.col("user_id"))
                .alias("user_id")
            )
        frame.write_parquet(file, row_group_size=300)
    return pl.concat([pl.read_parquet(f) for f in written])


def _drawn(frame: pl.DataFrame) -> set[str]:
    return set(frame["user_id"].str.strip_chars().unique().to_list())


def test_a_count_of_users_gets_every_row_of_the_users_the_reader_draws(
    tmp_path: Path,
) -> None:
    whole = _log(tmp_path / "log")
    out = tmp_path / "sample.parquet"
    sample = sample_log_users(tmp_path / "log", out, users=30, seed=7)
    rows = pl.read_parquet(out)
    assert rows.schema == whole.schema  # every column, as it was
    assert (sample.users, sample.log_users, sample.files) == (30, 200, 3)
    assert (sample.log_rows, sample.rows_without_user) == (3000, 2)
    drawn = _drawn(rows)
    assert len(drawn) == 30 and sample.rows == rows.height
    # Every row of theirs, padded or not, and no other row.
    key = pl.col("user_id").str.strip_chars()
    assert rows.sort(pl.all()).equals(whole.filter(key.is_in(drawn)).sort(pl.all()))
    # The users the in-memory draw takes from the whole log with that seed.
    whole.write_parquet(tmp_path / "whole.parquet")
    in_memory = sample_users(load_dataset(str(tmp_path / "whole.parquet")), 30, seed=7)
    assert drawn == set(in_memory.interactions["user_id"].unique().to_list())
    other = sample_log_users(tmp_path / "log", tmp_path / "o.parquet", users=30)
    assert _drawn(pl.read_parquet(other.out)) != drawn  # another seed, others
    every = sample_log_users(tmp_path / "log", tmp_path / "a.parquet", users=500)
    assert (every.users, every.rows) == (200, 2998)  # all but the two without


def test_a_fraction_of_users_in_one_pass(tmp_path: Path) -> None:
    whole = _log(tmp_path / "log")
    out = tmp_path / "sample.parquet"
    sample = sample_log_users(tmp_path / "log", out, fraction=0.25)
    rows = pl.read_parquet(out)
    drawn = _drawn(rows)
    assert sample.log_users is None and sample.users == len(drawn)
    assert 30 <= len(drawn) <= 70  # about a quarter of 200
    key = pl.col("user_id").str.strip_chars()
    assert rows.height == whole.filter(key.is_in(drawn)).height == sample.rows
    again = sample_log_users(tmp_path / "log", tmp_path / "b.parquet", fraction=0.25)
    assert _drawn(pl.read_parquet(again.out)) == drawn
    more = sample_log_users(tmp_path / "log", tmp_path / "c.parquet", fraction=0.5)
    assert drawn < _drawn(pl.read_parquet(more.out))  # a larger share holds it


def test_refusals_leave_no_file(tmp_path: Path) -> None:
    log = tmp_path / "log"
    _log(log)
    out = tmp_path / "s.parquet"
    with pytest.raises(ConfigError, match="one of `users`"):
        sample_log_users(log, out)
    with pytest.raises(ConfigError, match="one of `users`"):
        sample_log_users(log, out, users=3, fraction=0.5)
    for wrong in (0, True, 2.5):
        with pytest.raises(ConfigError, match="`users` should be"):
            sample_log_users(log, out, users=wrong)  # type: ignore[arg-type]
    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="`fraction` should be"):
            sample_log_users(log, out, fraction=share)
    with pytest.raises(ConfigError, match="inside the log's directory"):
        sample_log_users(log, log / "s.parquet", users=3)
    with pytest.raises(DataError, match="no 'uid' column"):
        sample_log_users(log, out, users=3, user_col="uid")
    text = tmp_path / "log.csv"
    text.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match="--sample-users N"):
        sample_log_users(text, out, users=3)
    text.unlink()
    with pytest.raises(DataError, match="raise the fraction"):
        sample_log_users(log, out, fraction=1e-9)
    # A file of other columns, read after rows were written.
    odd = pl.read_parquet(log / "part-00002.parquet").rename({"rating": "stars"})
    odd.write_parquet(log / "part-00002.parquet")
    with pytest.raises(DataError, match="'stars'"):
        sample_log_users(log, out, fraction=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # no partial file
    one = log / "part-00000.parquet"
    with pytest.raises(ConfigError, match="the log itself"):
        sample_log_users(one, one, users=3, overwrite=True)
    # User IDs the readers refuse, or read as integers in one file, text in another.
    odd = tmp_path / "odd"
    odd.mkdir()
    pl.DataFrame({"user_id": [[1], [2]], "item_id": [1, 2]}).write_parquet(
        odd / "a.parquet"
    )
    with pytest.raises(DataError, match="expected integer or string IDs"):
        sample_log_users(odd, out, users=1)
    pl.DataFrame({"user_id": [1.0, 2.0], "item_id": [1, 2]}).write_parquet(
        odd / "a.parquet"
    )
    pl.DataFrame({"user_id": ["u"], "item_id": [3]}).write_parquet(odd / "b.parquet")
    with pytest.raises(DataError, match="one kind of type"):
        sample_log_users(odd, out, users=1)
    (odd / "b.parquet").unlink()
    whole = sample_log_users(odd, tmp_path / "w.parquet", users=1)  # 1.0 reads as 1
    assert whole.users == 1 and whole.rows == 1
    assert not out.exists()
    out.write_bytes(b"kept")
    with pytest.raises(ConfigError, match="already exists"):
        sample_log_users(log, out, users=3)
    assert out.read_bytes() == b"kept"


def test_the_cli_writes_the_sample(tmp_path: Path) -> None:
    log = tmp_path / "log"
    _log(log)
    out = tmp_path / "s.parquet"
    said = runner.invoke(
        app, ["data", "sample", str(log), "--out", str(out), "--users", "30", "--json"]
    )
    assert said.exit_code == 0, said.output
    counts = json.loads(said.stdout)
    assert counts["users"] == 30 and counts["rows"] == pl.read_parquet(out).height
    assert counts["rows_without_user"] == 2
    again = runner.invoke(
        app, ["data", "sample", str(log), "--out", str(out), "--fraction", "0.5"]
    )
    assert again.exit_code == 2 and "--overwrite" in again.output
    neither = runner.invoke(
        app, ["data", "sample", str(log), "--out", str(tmp_path / "n.parquet")]
    )
    assert neither.exit_code == 2 and "--fraction" in neither.output
    line = runner.invoke(
        app,
        [
            "data",
            "sample",
            str(log),
            "--out",
            str(out),
            "--users",
            "30",
            "--overwrite",
            "--seed",
            "7",
        ],
        env={"COLUMNS": "300"},
    )
    assert line.exit_code == 0, line.output
    assert "Drew 30 of 200 users" in line.output
    assert "2 row(s) without a user ID not drawn" in line.output
