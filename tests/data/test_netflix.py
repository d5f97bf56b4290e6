"""Tests for twostage.data.netflix: the Netflix Prize layout."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.data.netflix import read_netflix, write_netflix
from twostage.data.registry import anchored, load_dataset
from twostage.errors import BadRowError, ConfigError, DataError


def _expected(directory: Path) -> pl.DataFrame:
    """The rows of the files, unfolded line by line in plain Python."""
    rows = []
    for file in sorted(directory.glob("combined_data_*.txt")):
        movie = None
        for line in file.read_text().splitlines():
            if line.endswith(":"):
                movie = int(line[:-1])
                continue
            user, rating, date = line.split(",")
            rows.append((int(user), movie, float(rating), date))
    return pl.DataFrame(
        rows, schema=["user_id", "item_id", "rating", "date"], orient="row"
    )


def test_the_prize_layout_is_unfolded_into_rows(tmp_path: Path) -> None:
    """`movie:` lines open blocks of `customer,rating,date` lines: read as a CSV,
    every rating was a wrong_field_count row or lost its movie."""
    directory = write_netflix(tmp_path / "nf", num_users=80, num_movies=30, files=3)
    data = read_netflix(directory)
    expected = _expected(directory)
    assert data.report.ok and data.num_interactions == expected.height
    got = data.interactions
    assert got["user_id"].to_list() == expected["user_id"].to_list()
    assert got["item_id"].to_list() == expected["item_id"].to_list()
    assert got["rating"].to_list() == expected["rating"].to_list()
    days = pl.from_epoch(got["timestamp"], time_unit="s").dt.strftime("%Y-%m-%d")
    assert days.to_list() == expected["date"].to_list()
    assert got.schema["user_id"] == pl.Int64 and got.schema["item_id"] == pl.Int64
    # movie_titles.csv: latin-1, unquoted commas in titles, NULL years.
    items = data.items
    assert items is not None and items.height == 30
    titles = dict(zip(items["item_id"], items["title"], strict=True))
    assert "," in titles[4]
    assert any("é" in t or "ñ" in t for t in titles.values())
    assert items.filter(pl.col("item_id") == 6)["year"].is_null().all()  # NULL
    # The original archive: download/training_set/mv_*.txt, movie_titles.txt above.
    original = tmp_path / "download" / "training_set"
    original.mkdir(parents=True)
    (original / "mv_0000001.txt").write_text("1:\n11,3,2005-09-06\n12,4,2005-09-07\n")
    (original / "mv_0000002.txt").write_text("2:\n11,5,2005-09-08\n")
    (original.parent / "movie_titles.txt").write_text(
        "1,2003,Dinosaur Planet\n2,2004,Isle of Man TT 2004 Review\n"
    )
    old = read_netflix(original)
    assert old.interactions["item_id"].to_list() == [1, 1, 2]
    assert old.items is not None and old.items["title"][0] == "Dinosaur Planet"
    # One file reads alone; the titles beside it are found.
    one = read_netflix(directory / "combined_data_2.txt")
    assert 0 < one.num_interactions < data.num_interactions
    assert one.items is not None


def test_bad_lines_are_counted_with_their_file_and_line(tmp_path: Path) -> None:
    directory = tmp_path / "nf"
    directory.mkdir()
    (directory / "combined_data_1.txt").write_text(
        "7,3,2005-01-01\n1:\n11,3,2005-09-06\n\n12,5,2005-05-13\r\n2:\n"
    )
    (directory / "combined_data_2.txt").write_text(
        "3:\n13,x,2005-01-01\n14,4\n15,4,2005-13-01\n16,2,2004-02-02"
    )
    # Read in one frame with the others: its first rating takes no movie from them.
    (directory / "combined_data_3.txt").write_text(
        "21,2,2005-01-01\n4:\n22,3,2005-01-02\n"
    )
    data = read_netflix(directory)
    assert data.interactions["user_id"].to_list() == [11, 12, 16, 22]
    assert data.interactions["item_id"].to_list() == [1, 1, 3, 4]
    report = data.report
    assert report.rows_read == 10 and report.rows_loaded == 4
    assert report.examples == {
        "no_movie_line": [
            (1, "combined_data_1.txt: 7,3,2005-01-01"),
            (1, "combined_data_3.txt: 21,2,2005-01-01"),
        ],
        "blank_line": [(4, "combined_data_1.txt: ")],
        "bad_rating": [(2, "combined_data_2.txt: 13,x,2005-01-01")],
        "wrong_field_count": [(3, "combined_data_2.txt: 14,4")],
        "bad_timestamp": [(4, "combined_data_2.txt: 15,4,2005-13-01")],
    }
    with pytest.raises(BadRowError) as stopped:
        read_netflix(directory, strict=True)
    assert stopped.value.line == 1 and "combined_data_1.txt" in str(stopped.value)
    with pytest.raises(ConfigError, match="columns already"):
        read_netflix(directory, user_col="customer")
    with pytest.raises(DataError, match="no Netflix Prize ratings file"):
        read_netflix(tmp_path)


def test_netflix_from_the_registry_and_the_command_line(tmp_path: Path) -> None:
    directory = write_netflix(tmp_path / "nf", num_users=60, num_movies=25)
    spec = f"netflix:{directory}"
    assert (
        load_dataset(spec).num_interactions == read_netflix(directory).num_interactions
    )
    assert anchored("netflix:nf").startswith("netflix:")
    runner = CliRunner()
    described = runner.invoke(app, ["data", "describe", spec, "--json"])
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["num_interactions"] == read_netflix(directory).num_interactions
    assert summary["duplicate_rows"] == 0  # one rating per customer and movie
    assert summary["feature_kinds"]["title"] == "text"
