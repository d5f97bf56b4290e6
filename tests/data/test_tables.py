"""Tests for twostage.data.tables: reading interaction logs and feature tables."""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import importlib.util
import io
import logging
import re
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from twostage.data import Dataset, _table_lines, _table_text, tables
from twostage.data.describe import describe
from twostage.data.report import REASONS
from twostage.data.tables import join_features, read_feature_table, read_interactions
from twostage.errors import BadRowError, ConfigError, DataError

HEADER = "user_id,item_id,rating,timestamp"


def write(
    tmp_path: Path, name: str, data: str | bytes, encoding: str = "utf-8"
) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode(encoding) if isinstance(data, str) else data)
    return path


@contextlib.contextmanager
def exact_path() -> Iterator[None]:
    """Within it, every text file takes the exact (csv module) path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_table_text, "read_fast", lambda *args, **kwargs: None)
        patch.setattr(_table_lines, "_CHUNK_ROWS", 3)  # many chunks, even when small
        yield


def load(path: Path, **kwargs: object) -> Dataset:
    options: dict[str, object] = {"rating_col": "rating", "time_col": "timestamp"}
    return read_interactions(path, **(options | kwargs))  # type: ignore[arg-type]


# ----------------------------------------------------------------- clean files


def test_clean_csv_types_and_values(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", f"{HEADER}\n1,10,4.5,100\n2,20,3,200\n")
    ds = load(path)
    assert ds.interactions.schema == pl.Schema(
        {
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "timestamp": pl.Int64,
            "rating": pl.Float32,
        }
    )
    assert ds.interactions.rows() == [(1, 10, 100, 4.5), (2, 20, 200, 3.0)]
    assert ds.report is not None and ds.report.ok
    assert (ds.report.rows_read, ds.report.rows_loaded) == (2, 2)
    assert ds.name == "a" and ds.source == str(path)


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_line_endings(tmp_path: Path, eol: str) -> None:
    body = eol.join([HEADER, "1,10,4,100", "2,20,5,200", '3,"x' + eol + 'y",1,300'])
    ds = load(write(tmp_path, "e.csv", body + eol))
    assert ds.interactions["item_id"].to_list() == ["10", "20", "x" + eol + "y"]
    assert ds.report is not None and ds.report.ok


@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_numbers_only_with_other_line_endings(tmp_path: Path, eol: str) -> None:
    # Regression: with no text column left to search for stray line ends, the
    # fast path indexed an empty frame.
    body = eol.join([HEADER, "1,10,4,100", "2,20,5,200"]) + eol
    ds = load(write(tmp_path, "n.csv", body))
    assert ds.interactions.rows() == [(1, 10, 100, 4.0), (2, 20, 200, 5.0)]


def test_quoted_fields_with_separators_newlines_and_quotes(tmp_path: Path) -> None:
    text = f'{HEADER}\n1,"a,b",1,1\n2,"line1\nline2",2,2\n3,"say ""hi""",3,3\n'
    ds = load(write(tmp_path, "q.csv", text))
    assert ds.interactions["item_id"].to_list() == ["a,b", "line1\nline2", 'say "hi"']


def test_utf8_bom_is_dropped(tmp_path: Path) -> None:
    ds = load(
        write(
            tmp_path,
            "bom.csv",
            b"\xef\xbb\xbf" + f"{HEADER}\n1,caf\u00e9,1,1\n".encode(),
        )
    )
    assert ds.interactions["item_id"].to_list() == ["caf\u00e9"]


def test_latin1_falls_back(tmp_path: Path) -> None:
    path = write(
        tmp_path, "l.csv", f"{HEADER}\n1,caf\u00e9,1,1\n2,na\u00efve,2,2\n", "latin-1"
    )
    ds = load(path)
    assert ds.interactions["item_id"].to_list() == ["caf\u00e9", "na\u00efve"]
    ds = load(path, encoding="latin-1")
    assert ds.interactions["item_id"].to_list() == ["caf\u00e9", "na\u00efve"]
    with pytest.raises(DataError, match="not valid"):
        load(path, encoding="utf-8")


def test_latin1_after_the_first_megabyte(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i},1,{i}\n" for i in range(120_000))
    path = write(tmp_path, "late.csv", f"{HEADER}\n{rows}7,caf\u00e9,1,1\n", "latin-1")
    ds = load(path)
    assert ds.interactions["item_id"][-1] == "caf\u00e9"
    assert ds.report is not None and ds.report.rows_loaded == 120_001


def test_headerless_with_column_names_and_double_colon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"
    )
    names = ["user_id", "item_id", "rating", "timestamp"]
    ds = load(path, has_header=False, column_names=names)
    assert ds.interactions.rows() == [
        (1, 1193, 978300760, 5.0),
        (1, 661, 978302109, 3.0),
    ]
    # Names that do not fit the lines: said at once, not every row rejected.
    with pytest.raises(DataError, match=r"has 3 names but the lines of .* have 4"):
        load(path, has_header=False, column_names=names[:3])
    # A file with a header read as headerless: its header would be a row (user
    # "user_id"), said at once where it is the names given, warned of otherwise.
    named = write(tmp_path, "named.csv", "user_id,item_id\n1,2\n3,4\n5,6\n")
    with pytest.raises(DataError, match="the file has a header"):
        read_interactions(named, has_header=False, column_names=["user_id", "item_id"])
    other = write(tmp_path, "other.csv", "uid,iid\n1,2\n3,4\n5,6\n")
    with caplog.at_level(logging.WARNING, logger="twostage.data"):
        read = read_interactions(
            other, has_header=False, column_names=["user_id", "item_id"]
        )
    assert read.num_interactions == 4 and "looks like one" in caplog.text
    # Without names, the message says the first row read as names.
    with pytest.raises(DataError, match="reads its first row as names"):
        read_interactions(write(tmp_path, "bare.csv", "1,2\n3,4\n"))
    # Parquet, JSON and frames name their columns: the options are refused.
    frame = pl.DataFrame({"column_1": [1], "column_2": [2]})
    frame.write_parquet(tmp_path / "named.parquet")
    for source in (frame, tmp_path / "named.parquet"):
        with pytest.raises(ConfigError, match="apply to delimited text files"):
            read_interactions(source, has_header=False, column_names=["a", "b"])


def test_double_colon_inside_quotes_survives(tmp_path: Path) -> None:
    path = write(tmp_path, "q.dat", 'u::i::r\n1::"a::b:"::2\n2::c:::3\n')
    ds = read_interactions(path, user_col="u", item_col="i", rating_col="r")
    assert ds.interactions["item_id"].to_list() == ["a::b:"]
    assert ds.report is not None
    assert ds.report.examples == {"bad_rating": [(3, "2::c:::3")]}


@pytest.mark.parametrize("sep", tables.SEPARATORS)
def test_separator_is_sniffed(tmp_path: Path, sep: str) -> None:
    text = "\n".join(sep.join(r) for r in [HEADER.split(","), ["1", "a b", "2", "3"]])
    ds = load(write(tmp_path, "s.txt", text + "\n"))
    assert ds.interactions.rows() == [(1, "a b", 3, 2.0)]


def test_no_time_column_means_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "n.csv", "user_id,item_id\n5,1\n\n4,2\n3,3\n")
    ds = read_interactions(path)
    assert ds.interactions["timestamp"].to_list() == [0, 1, 2]
    assert ds.interactions["user_id"].to_list() == [5, 4, 3]


def test_iso_timestamps_and_time_format(tmp_path: Path) -> None:
    text = (
        f"{HEADER}\n1,1,1,2020-01-02\n1,2,1,2020-01-02T03:04:05Z\n"
        "1,3,1,2020-01-02 03:04:05+01:00\n1,4,1,1577934245\n"
    )
    ds = load(write(tmp_path, "t.csv", text))
    day = int(datetime(2020, 1, 2, tzinfo=UTC).timestamp())
    assert ds.interactions["timestamp"].to_list() == [
        day,
        day + 11045,
        day + 7445,
        1577934245,
    ]
    path = write(tmp_path, "f.csv", f"{HEADER}\n1,1,1,02/01/2020\n")
    assert load(path, time_format="%d/%m/%Y").interactions["timestamp"][0] == day


def test_ids_with_leading_zeros_stay_strings(tmp_path: Path) -> None:
    path = write(tmp_path, "z.csv", f"{HEADER}\n007,1,1,1\n7,2,1,1\n +8 ,3,1,1\n")
    ds = load(path)
    assert ds.interactions["user_id"].to_list() == ["007", "7", "+8"]
    assert ds.interactions["item_id"].dtype == pl.Int64


# ------------------------------------------------------------------- bad rows


BAD_FILE = (
    f"{HEADER}\n"  # 1
    "1,10,4,100\n"  # 2
    "\n"  # 3 blank
    "2,,3,200\n"  # 4 empty item
    '3,"multi\nline",x,300\n'  # 5-6 bad rating
    "4,40,3\n"  # 7 too few fields
    "   \n"  # 8 blank (whitespace)
    "5,50,2,yesterday\n"  # 9 bad timestamp
    " ,60,1,600\n"  # 10 empty user
    "6,60,1,600,extra\n"  # 11 too many fields
    "7,70,1,700\n"  # 12
)
BAD_LINES = {
    "blank_line": [3, 8],
    "empty_item_id": [4],
    "bad_rating": [5],
    "wrong_field_count": [7, 11],
    "bad_timestamp": [9],
    "empty_user_id": [10],
}


def test_bad_rows_are_counted_with_exact_line_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="twostage.data.tables"):
        ds = load(write(tmp_path, "bad.csv", BAD_FILE))
    report = ds.report
    assert report is not None
    assert ds.interactions["user_id"].to_list() == [1, 7]
    assert (report.rows_read, report.rows_loaded, report.num_rejected) == (10, 2, 8)
    assert {
        r: [line for line, _ in ex] for r, ex in report.examples.items()
    } == BAD_LINES
    assert report.rejected == {r: len(v) for r, v in BAD_LINES.items()}
    assert report.examples["bad_rating"] == [(5, '3,"multi\nline",x,300')]
    assert report.examples["wrong_field_count"][0] == (7, "4,40,3")
    assert set(report.rejected) <= set(REASONS)
    assert "8 rejected" in caplog.text and "bad.csv" in caplog.text


@pytest.mark.parametrize("eol", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_line_numbers_with_other_line_endings(tmp_path: Path, eol: str) -> None:
    ds = load(write(tmp_path, "bad.csv", BAD_FILE.replace("\n", eol)))
    assert ds.report is not None
    assert {r: [n for n, _ in ex] for r, ex in ds.report.examples.items()} == BAD_LINES


def test_strict_raises_at_the_first_bad_row(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.csv", BAD_FILE)
    with pytest.raises(
        BadRowError, match=r"bad\.csv:3: bad row \(blank_line\)"
    ) as info:
        load(path, strict=True)
    assert (info.value.line, info.value.reason) == (3, "blank_line")
    later = BAD_FILE.replace("\n\n", "\n").replace("\n   \n", "\n")
    with pytest.raises(BadRowError, match=r":3: bad row \(empty_item_id\): '2,,3,200'"):
        load(write(tmp_path, "b2.csv", later), strict=True)


def test_strict_value_error_before_a_later_shape_error(tmp_path: Path) -> None:
    path = write(tmp_path, "s.csv", f"{HEADER}\n1,1,oops,1\n1,2\n")
    with pytest.raises(BadRowError) as info:
        load(path, strict=True)
    assert (info.value.line, info.value.reason, info.value.content) == (
        2,
        "bad_rating",
        "1,1,oops,1",
    )


def test_non_finite_ratings_and_weights(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,rating,weight\n1,1,nan,1\n1,2,1e39,1\n1,3,2,inf\n1,4,2,0.5\n"
    )
    ds = read_interactions(
        write(tmp_path, "n.csv", text), rating_col="rating", weight_col="weight"
    )
    assert ds.report is not None
    assert ds.report.rejected == {"bad_rating": 2, "bad_weight": 1}
    assert ds.interactions.rows() == [(1, 4, 0, 2.0, 0.5)]


def test_bad_quoting_is_reported_and_reading_resumes(tmp_path: Path) -> None:
    text = f'{HEADER}\n1,"a"b,1,1\n2,x,1,1\n3,"open,1,1\n4,y,1,1\n'
    ds = load(write(tmp_path, "q.csv", text))
    assert ds.report is not None
    assert ds.report.rejected == {"bad_quoting": 2}
    assert [n for n, _ in ds.report.examples["bad_quoting"]] == [2, 4]
    assert ds.interactions["user_id"].to_list() == [2, 4]


def test_rejected_rows_over_line_breaks_say_how_many_lines_they_took(
    tmp_path: Path,
) -> None:
    """A quote that opens a field runs on to the next quote, lines below: the
    report counted one bad row where several lines of the file were lost, and the
    reader could not tell 3 rejected rows in a file of 9 from 3 bad lines."""
    text = (
        f"{HEADER}\n"
        '1,"open,1,1\n2,x,1,1\n3,y,1,1\n4,z"a,1,1\n'  # lines 2-5: bad_quoting
        "5,w,1,1\n"
        '6,"two\nlines",x,1\n'  # lines 7-8: a good record with a bad rating
        "7,v,y,1\n"  # line 9: bad rating on one line
        '8,"u"t,1,1\n'  # line 10: bad_quoting on one line
    )
    ds = load(write(tmp_path, "q.csv", text))
    report = ds.report
    assert report is not None
    assert report.rejected == {"bad_quoting": 2, "bad_rating": 2}
    assert report.spanned_lines == {"bad_quoting": 5, "bad_rating": 3}
    assert [n for n, _ in report.examples["bad_quoting"]] == [2, 10]
    assert "bad_quoting: 2 over 5 lines (first lines: 2, 10)" in report.summary()
    assert report.to_dict()["spanned_lines"] == {"bad_quoting": 5, "bad_rating": 3}
    assert ds.interactions["user_id"].to_list() == [5]
    one_line = load(write(tmp_path, "one.csv", f'{HEADER}\n1,"a"b,1,1\n2,x,1,1\n'))
    assert one_line.report is not None and one_line.report.spanned_lines == {}
    assert "bad_quoting: 1 (first lines: 2)" in one_line.report.summary()


def test_lone_cr_in_a_lf_file_ends_a_line(tmp_path: Path) -> None:
    ds = load(write(tmp_path, "m.csv", f"{HEADER}\n1,a\rb,1,1\n2,c,1,1\n"))
    assert ds.report is not None
    assert ds.report.examples["wrong_field_count"] == [(2, "1,a"), (3, "b,1,1")]


def test_missing_column_names_it_and_lists_the_others(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", f"{HEADER}\n1,1,1,1\n")
    with pytest.raises(
        DataError, match=r"`time_col` = 'ts'.*Available columns: \['user_id'"
    ):
        read_interactions(path, time_col="ts")
    with pytest.raises(DataError, match="`item_features` lists 'genre'"):
        read_interactions(path, item_features=["genre"])
    # MovieLens's own ratings.csv: both IDs named otherwise, both said at once,
    # with the columns that likely hold them (never mapped unasked).
    ratings = write(tmp_path, "r.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError) as raised:
        read_interactions(ratings)
    said = str(raised.value)
    assert "`user_col` = 'user_id' and `item_col` = 'item_id' are not columns" in said
    assert "Likely: `user_col` = 'userId', `item_col` = 'movieId'." in said
    # Two columns that could be the user's: no guess.
    both = write(tmp_path, "b.csv", "user,uid,item_id\n1,2,3\n")
    with pytest.raises(DataError) as raised:
        read_interactions(both)
    assert "Likely" not in str(raised.value)
    assert (
        read_interactions(
            ratings, user_col="userId", item_col="movieId"
        ).num_interactions
        == 1
    )


def test_feature_columns_are_a_list_of_names(tmp_path: Path) -> None:
    """`item_features="genre"` was read as its letters ("lists 'g'"), and None,
    which says "none" elsewhere in the API, was a TypeError."""
    path = write(tmp_path, "a.csv", "user_id,item_id,genre\n1,1,x\n2,1,x\n")
    plain = read_interactions(path, item_features=None, user_features=None)
    assert plain.items is None and plain.users is None
    for options in (
        {"item_features": "genre"},
        {"user_features": ["genre", 2]},
    ):
        with pytest.raises(ConfigError, match="should be a list of column names"):
            read_interactions(path, **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`columns` should be a list of column"):
        read_feature_table(path, key_col="item_id", columns="genre")
    items = read_interactions(path, item_features=["genre"]).items
    assert items is not None and items["genre"].to_list() == ["x"]


def test_bad_options_raise_config_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", f"{HEADER}\n1,1,1,1\n")
    with pytest.raises(ConfigError, match="duplicates"):
        read_interactions(path, duplicates="most")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="separator"):
        read_interactions(path, separator="")
    with pytest.raises(ConfigError, match="quote_char"):
        read_interactions(path, quote_char="''")


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        read_interactions(write(tmp_path, "e.csv", ""))
    ds = load(write(tmp_path, "h.csv", HEADER + "\n"))
    assert ds.interactions.height == 0
    assert ds.report is not None and ds.report.rows_read == 0


# ----------------------------------------------------------------- duplicates


DUPS = f"{HEADER}\n1,1,5,10\n1,2,4,10\n1,1,3,10\n2,1,2,10\n1,1,1,10\n"


@pytest.mark.parametrize(
    ("policy", "ratings", "dropped"),
    [
        ("keep", [5, 4, 3, 2, 1], []),
        ("first", [5, 4, 2], [4, 6]),
        ("last", [4, 2, 1], [2, 4]),
    ],
)
def test_duplicate_policies(
    tmp_path: Path, policy: str, ratings: list[int], dropped: list[int]
) -> None:
    ds = load(write(tmp_path, "d.csv", DUPS), duplicates=policy)
    assert ds.interactions["rating"].to_list() == ratings
    assert ds.report is not None and ds.report.duplicate_policy == policy
    assert [n for n, _ in ds.report.examples.get("duplicate", [])] == dropped
    assert ds.report.rejected.get("duplicate", 0) == len(dropped)
    assert ds.report.rows_read == ds.report.rows_loaded + ds.report.num_rejected


def test_duplicate_error_names_both_lines(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"d\.csv:4: duplicate.*'1,1,3,10'.*first seen at line 2"
    ):
        load(write(tmp_path, "d.csv", DUPS), duplicates="error")


def test_duplicates_without_time_column_are_user_item_pairs(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", "user_id,item_id\n1,1\n1,2\n1,1\n")
    ds = read_interactions(path, duplicates="first")
    assert ds.interactions.rows() == [(1, 1, 0), (1, 2, 1)]


# -------------------------------------------------------------------- Parquet


def test_a_parquet_struct_s_fields_are_columns_by_their_paths(tmp_path: Path) -> None:
    """GA4's BigQuery export and Spark write nested structs (`geo.country`,
    `device.category`): a struct was one value, not usable as a feature."""
    from twostage.data.streaming import feature_tables

    frame = pl.DataFrame(
        {
            "user_id": [1, 2, 3, 1],
            "item_id": [1, 2, 2, 3],
            "timestamp": [10, 20, 30, 40],
            "geo": [
                {"country": "NO", "city": {"name": "Oslo"}},
                {"country": "FI", "city": None},
                None,
                {"country": "NO", "city": {"name": "Oslo"}},
            ],
        }
    )
    path = tmp_path / "events.parquet"
    frame.write_parquet(path)
    ds = read_interactions(
        path, time_col="timestamp", user_features=["geo.country", "geo.city.name"]
    )
    assert ds.report is not None and ds.report.ok
    assert ds.users is not None
    assert ds.users.sort("user_id").rows() == [
        (1, "NO", "Oslo"),
        (2, "FI", None),
        (3, None, None),
    ]
    table = read_feature_table(path, key_col="user_id", columns=None)
    assert table.columns[-3:] == ["timestamp", "geo.country", "geo.city.name"]
    users, _ = feature_tables(path, user_features=["geo.country", "geo.city.name"])
    assert users is not None and users.equals(ds.users)  # streamed runs read them too
    frame.with_columns(pl.lit("x").alias("geo.country")).write_parquet(path)
    with pytest.raises(DataError, match=r"'geo\.country' and the field 'country'"):
        read_interactions(path)


def test_parquet_round_trip(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "u": ["a", "b", None, "c"],
            "i": [1, 2, 3, 4],
            "r": [1.0, float("nan"), 2.0, 3.0],
            "t": [datetime(2020, 1, 1, tzinfo=UTC)] * 4,
            "g": ["x", "y", "z", "w"],
        }
    )
    path = tmp_path / "f.parquet"
    frame.write_parquet(path)
    ds = read_interactions(
        path,
        user_col="u",
        item_col="i",
        rating_col="r",
        time_col="t",
        item_features=["g"],
    )
    assert ds.interactions.rows() == [
        ("a", 1, 1577836800, 1.0),
        ("c", 4, 1577836800, 3.0),
    ]
    assert ds.report is not None
    assert ds.report.rejected == {"bad_rating": 1, "empty_user_id": 1}
    assert [n for n, _ in ds.report.examples["empty_user_id"]] == [3]
    assert ds.items is not None and ds.items["g"].to_list() == ["x", "w"]
    clean = tmp_path / "clean.pq"
    ds.interactions.write_parquet(clean)
    again = read_interactions(clean, time_col="timestamp", rating_col="rating")
    assert_frame_equal(again.interactions, ds.interactions)


# --------------------------------------------------------------- Book-Crossing


BX_COLUMNS = [
    "user_id",
    "location",
    "age",
    "isbn",
    "rating",
    "book_title",
    "book_author",
    "year_of_publication",
    "publisher",
    "img_s",
    "img_m",
    "img_l",
    "Summary",
    "Language",
    "Category",
    "city",
    "state",
    "country",
]


BX_ROWS = [  # user, age, isbn, rating, title, category, country
    (2, 18.0, "0195153448", 0, "Classical Mythology", "['Social Science']", "usa"),
    (8, 34.7439, "0002005018", 5, "Clara Callan", "['Actresses']", "canada"),
    (8, 34.7439, "0060973129", 0, "Decision in Normandy, A", "['1940-1949']", "canada"),
    (11400, 49.0, "0195153448", 7, "Classical Mythology", "['Social Science']", "usa"),
]


def test_book_crossing_preprocessed_data(tmp_path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(BX_COLUMNS)
    for user, age, isbn, rating, title, category, country in BX_ROWS:
        img = f"http://images.amazon.com/images/P/{isbn}.01.THUMBZZZ.jpg"
        book = ["Mark P. O. Morford", 2002, "Oxford University Press", img, img, img]
        summary = ['A "classic" summary, with commas', "en", category]
        place = ["stockton", "california", country]
        location = f"stockton, california, {country}"
        writer.writerow(
            [user, location, age, isbn, rating, title, *book, *summary, *place]
        )
    path = write(tmp_path, "Preprocessed_data.csv", buffer.getvalue())
    ds = read_interactions(
        path,
        user_col="user_id",
        item_col="isbn",
        rating_col="rating",
        user_features=["age", "country"],
        item_features=["book_title", "book_author", "Category"],
    )
    assert ds.interactions.rows() == [
        (2, "0195153448", 0, 0.0),
        (8, "0002005018", 1, 5.0),
        (8, "0060973129", 2, 0.0),
        (11400, "0195153448", 3, 7.0),
    ]
    assert ds.users is not None and ds.items is not None
    assert ds.users.rows() == [
        (2, 18.0, "usa"),
        (8, 34.7439, "canada"),
        (11400, 49.0, "usa"),
    ]
    assert ds.users.schema["age"] == pl.Float64
    assert ds.items.columns == ["item_id", "book_title", "book_author", "Category"]
    assert ds.items.height == 3
    assert ds.items.row(0) == (
        "0195153448",
        "Classical Mythology",
        "Mark P. O. Morford",
        "['Social Science']",
    )


def test_book_crossing_raw_ratings(tmp_path: Path) -> None:
    text = (
        '"User-ID";"ISBN";"Book-Rating"\r\n"276725";"034545104X";"0"\r\n'
        '"276726";"0155061224";"5"\r\n"276727";"3442\u00e9";"0"\r\n'
    )
    ds = read_interactions(
        write(tmp_path, "BX-Book-Ratings.csv", text, "latin-1"),
        user_col="User-ID",
        item_col="ISBN",
        rating_col="Book-Rating",
    )
    assert ds.interactions.rows() == [
        (276725, "034545104X", 0, 0.0),
        (276726, "0155061224", 1, 5.0),
        (276727, "3442\u00e9", 2, 0.0),
    ]


# -------------------------------------------------------------- feature tables


def test_read_feature_table_and_join(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users = write(
        tmp_path,
        "users.csv",
        "id,age,city\n1,30,Paris\n2,,Oslo\n1,31,Rome\n,40,Nowhere\n",
    )
    with caplog.at_level(logging.WARNING, logger="twostage.data.tables"):
        table = read_feature_table(users, key_col="id")
    assert table.rows() == [(1, 30, "Paris"), (2, None, "Oslo")]
    assert "duplicate: 1" in caplog.text and "empty_user_id: 1" in caplog.text
    ds = read_interactions(write(tmp_path, "i.csv", "user_id,item_id\n1,5\n2,6\n"))
    joined = join_features(ds, users=table)
    assert joined.users is not None and joined.users.columns == [
        "user_id",
        "age",
        "city",
    ]
    # Text keys that are integers written plainly match the log's integers; one
    # that is not ("01": which user?) leaves the dtypes apart, said so.
    as_text = join_features(
        ds, users=table.with_columns(pl.col("user_id").cast(pl.String))
    )
    assert as_text.users is not None and as_text.users.equals(joined.users)
    zeros = table.with_columns(pl.Series("user_id", ["01", "2"]))
    with pytest.raises(DataError, match="'01' is not an integer written as"):
        join_features(ds, users=zeros)
    with pytest.raises(DataError, match="one row per"):
        join_features(ds, users=pl.concat([table, table]))
    # Another integer width (pandas' int32) holds the same keys; a key that the
    # log's dtype cannot hold is named.
    narrow = join_features(
        ds, users=table.with_columns(pl.col("user_id").cast(pl.Int32))
    )
    assert narrow.users is not None and narrow.users.equals(joined.users)
    huge = pl.DataFrame({"user_id": [1, 2**63]}, schema={"user_id": pl.UInt64})
    with pytest.raises(DataError, match=r"cannot, e\.g\. 9223372036854775808"):
        join_features(ds, users=huge)
    items = read_feature_table(
        write(tmp_path, "it.csv", "item,name\n5,a\n"),
        key_col="item",
        key_name="item_id",
    )
    assert join_features(joined, items=items).items is not None


# ------------------------------------------------------------ property tests

ID_ALPHABET = st.sampled_from(list("abcXYZ019 ,;|:\t\"'é中😀-+."))
TEXT_IDS = st.text(ID_ALPHABET, min_size=1, max_size=6).filter(lambda s: s == s.strip())
INT_IDS = st.integers(-(10**12), 10**12).map(str)
NOTES = st.text(st.sampled_from(list('ab ,;|:"\r\n\x1f')), max_size=6)
RATINGS = st.floats(-1e6, 1e6, allow_nan=False, width=32)
TIMES = st.one_of(
    # Good times lie in the reader's default bounds (the years 1900 to 2199), out
    # of the band where a column of them all reads as dates written as numbers
    # (20240301: timestamp_as_date_number, tested on its own).
    st.integers(0, 7_258_118_399)
    .filter(lambda t: not 19_000_101 <= t <= 21_001_231)
    .map(lambda t: (str(t), t)),
    st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1)).map(
        lambda d: (
            d.replace(microsecond=0).isoformat(),
            int(d.replace(microsecond=0, tzinfo=UTC).timestamp()),
        )
    ),
)
BAD_KINDS = {
    "blank": "blank_line",
    "spaces": "blank_line",
    "few": "wrong_field_count",
    "many": "wrong_field_count",
    "no_user": "empty_user_id",
    "no_item": "empty_item_id",
    "rating": "bad_rating",
    "time": "bad_timestamp",
}


@st.composite
def tables_with_bad_rows(draw: st.DrawFn, bad: bool = True) -> dict[str, object]:
    ids = draw(st.sampled_from([TEXT_IDS, INT_IDS]))
    good = st.tuples(ids, ids, RATINGS, TIMES, NOTES).map(lambda r: ("good", r))
    kinds = st.sampled_from(sorted(BAD_KINDS)) if bad else st.nothing()
    broken = st.tuples(kinds, st.tuples(ids, ids, RATINGS, TIMES, NOTES))
    rows = draw(st.lists(st.one_of(good, good, broken), max_size=25))
    return {
        "rows": rows,
        "sep": draw(st.sampled_from(tables.SEPARATORS)),
        "eol": draw(st.sampled_from(["\n", "\r\n", "\r"])),
        "final_eol": draw(st.booleans()),
    }


def quote(field: str, sep: str) -> str:
    if any(c in field for c in (*sep, '"', "\r", "\n")) or field != field.strip():
        return '"' + field.replace('"', '""') + '"'
    return field


def render(
    table: dict[str, object],
) -> tuple[str, list[tuple[object, ...]], dict[str, list[int]]]:
    """File text, expected good rows, expected line numbers per rejection reason."""
    sep, eol = str(table["sep"]), str(table["eol"])
    records = [sep.join(["user_id", "item_id", "note", "rating", "timestamp"])]
    good: list[tuple[object, ...]] = []
    bad: dict[str, list[int]] = {}
    line = 2
    for kind, (user, item, rating, (time_text, seconds), note) in table["rows"]:  # type: ignore[attr-defined]
        fields = [user, item, note, repr(rating), time_text]
        if kind == "good":
            good.append((user, item, seconds, rating))
        elif kind == "no_user":
            fields[0] = blank_id(user)
        elif kind == "no_item":
            fields[1] = ""
        elif kind == "rating":
            fields[3] = "n/a"
        elif kind == "time":
            fields[4] = "2020-13-45"
        text = sep.join(quote(f, sep) for f in fields)
        if kind == "few":
            text = sep.join(quote(f, sep) for f in fields[:3])
        elif kind == "many":
            text += sep + "extra"
        elif kind in ("blank", "spaces"):
            text = "" if kind == "blank" else "  "
        if kind != "good":
            bad.setdefault(BAD_KINDS[kind], []).append(line)
        records.append(text)
        line += 1 + len(re.findall(r"\r\n|\r|\n", text))
    body = eol.join(records)
    if table["final_eol"] or records[-1] == "":
        body += eol
    return body, good, bad


def blank_id(user: str) -> str:
    return " " if len(user) % 2 else ""


def expected_frame(good: list[tuple[object, ...]]) -> pl.DataFrame:
    def as_ids(values: list[str]) -> pl.Series:
        canonical = all(
            re.fullmatch(r"0|-?[1-9][0-9]*", v) and -(2**63) <= int(v) < 2**63
            for v in values
        )
        return pl.Series([int(v) for v in values] if canonical and values else values)

    columns: list[tuple[object, ...]] = [()] * 4
    if good:
        columns = list(zip(*good, strict=True))
    return pl.DataFrame(
        {
            "user_id": as_ids([str(v) for v in columns[0]]),
            "item_id": as_ids([str(v) for v in columns[1]]),
            "timestamp": pl.Series(columns[2], dtype=pl.Int64),
            "rating": pl.Series(
                np.array(columns[3], dtype=np.float32), dtype=pl.Float32
            ),
        }
    )


def check_table(
    path: Path, table: dict[str, object], read: Callable[[Path], Dataset]
) -> None:
    body, good, bad = render(table)
    path.write_bytes(body.encode("utf-8"))
    ds = read(path)
    report = ds.report
    assert report is not None
    assert report.rows_read == len(table["rows"])  # type: ignore[arg-type]
    assert report.rows_loaded == len(good) == ds.interactions.height
    assert report.rows_loaded + report.num_rejected == report.rows_read
    assert report.rejected == {r: len(lines) for r, lines in bad.items()}
    assert {r: [n for n, _ in ex] for r, ex in report.examples.items()} == {
        r: v[:5] for r, v in bad.items()
    }
    expected = expected_frame(good)
    if ds.interactions.height == 0:
        return
    assert_frame_equal(ds.interactions, expected, check_dtypes=bool(good))


def read_table(path: Path, table: dict[str, object]) -> Dataset:
    return read_interactions(
        path, rating_col="rating", time_col="timestamp", separator=str(table["sep"])
    )


PROPERTY = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(table=tables_with_bad_rows())
def test_property_every_row_is_loaded_or_rejected(
    tmp_path: Path, table: dict[str, object]
) -> None:
    check_table(tmp_path / "p.csv", table, lambda p: read_table(p, table))


@PROPERTY
@given(table=tables_with_bad_rows())
def test_property_exact_path_agrees(tmp_path: Path, table: dict[str, object]) -> None:
    with exact_path():
        check_table(tmp_path / "p.csv", table, lambda p: read_table(p, table))


@PROPERTY
@given(table=tables_with_bad_rows(bad=False))
def test_property_clean_tables_take_the_fast_path_when_possible(
    tmp_path: Path, table: dict[str, object]
) -> None:
    path = tmp_path / "c.csv"
    check_table(path, table, lambda p: read_table(p, table))
    fast = read_table(path, table)
    with exact_path():
        exact = read_table(path, table)
    assert_frame_equal(fast.interactions, exact.interactions)


# ------------------------------------------------- integer IDs on the fast path


@pytest.fixture
def size_checks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The results of the fast path's file-size checks, in order."""
    results: list[bool] = []
    original = _table_text.sizes_match

    def spy(
        df: pl.DataFrame, shape: _table_text.Shape, layout: _table_lines.Layout
    ) -> bool:
        results.append(original(df, shape, layout))
        return results[-1]

    monkeypatch.setattr(_table_text, "sizes_match", spy)
    return results


PLAIN_ROWS = "".join(f"{i},{i % 7},{i % 5}.5,{1_000_000 + i}\n" for i in range(300))


@pytest.mark.parametrize(
    ("odd_row", "user"),
    [
        ("007,1,1,1\n", "007"),
        ("+7,1,1,1\n", "+7"),
        ("-0,1,1,1\n", "-0"),
        ('"7",1,1,1\n', None),
        (" 7,1,1,1\n", None),
    ],
)
@pytest.mark.parametrize("final_eol", [True, False])
def test_a_late_non_canonical_id_keeps_strings(
    tmp_path: Path,
    size_checks: list[bool],
    odd_row: str,
    user: str | None,
    final_eol: bool,
) -> None:
    text = f"{HEADER}\n{PLAIN_ROWS}{odd_row}{PLAIN_ROWS}"
    ds = load(write(tmp_path, "late.csv", text if final_eol else text.rstrip("\n")))
    assert size_checks == [
        False
    ]  # the sample looked canonical; the sizes did not add up
    users = ds.interactions["user_id"]
    if user is None:  # quotes and padding are not part of the value: still integers
        assert users.dtype == pl.Int64 and users[300] == 7
    else:
        assert users.dtype == pl.String and users[300] == user and users[301] == "0"
    assert ds.interactions.height == 601


def test_plain_integer_file_is_proven_canonical(
    tmp_path: Path, size_checks: list[bool]
) -> None:
    for final_eol in (True, False):
        text = f"\ufeff{HEADER}\n{PLAIN_ROWS}"
        ds = load(
            write(tmp_path, "plain.csv", text if final_eol else text.rstrip("\n"))
        )
        assert (
            ds.interactions["user_id"].dtype == pl.Int64
            and ds.interactions.height == 300
        )
    path = write(tmp_path, "plain.dat", f"{HEADER}\n{PLAIN_ROWS}".replace(",", "::"))
    assert load(path).interactions.height == 300
    assert size_checks == [True, True, True]


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 1)), max_size=20
    ),
    policy=st.sampled_from(["first", "last"]),
    with_time=st.booleans(),
)
def test_property_duplicates(
    tmp_path_factory: pytest.TempPathFactory,
    keys: list[tuple[int, int, int]],
    policy: str,
    with_time: bool,
) -> None:
    rows = [(u, i, t, n) for n, (u, i, t) in enumerate(keys)]
    text = "user_id,item_id,timestamp,rating\n" + "".join(
        f"{u},{i},{t},{n}\n" for u, i, t, n in rows
    )
    path = tmp_path_factory.mktemp("dups") / "d.csv"
    path.write_text(text)
    key = (lambda r: r[:3]) if with_time else (lambda r: r[:2])
    ordered = rows if policy == "first" else rows[::-1]
    seen: set[tuple[int, ...]] = set()
    kept = []
    for row in ordered:
        if key(row) not in seen:
            seen.add(key(row))
            kept.append(row)
    kept.sort(key=lambda r: r[3])
    dropped = sorted(set(r[3] for r in rows) - {r[3] for r in kept})
    ds = read_interactions(
        path,
        rating_col="rating",
        time_col="timestamp" if with_time else "",  # "": file order, not the column
        duplicates=policy,  # type: ignore[arg-type]
    )
    assert ds.interactions["rating"].to_list() == [float(r[3]) for r in kept]
    assert ds.report is not None
    assert ds.report.rejected.get("duplicate", 0) == len(dropped)
    assert [n for n, _ in ds.report.examples.get("duplicate", [])] == [
        n + 2 for n in dropped[:5]
    ]


def test_feature_table_from_parquet_and_merging(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    pl.DataFrame({"sku": ["a", "b", "a"], "price": [1.0, 2.0, 3.0]}).write_parquet(path)
    items = read_feature_table(path, key_col="sku", key_name="item_id")
    assert items.rows() == [("a", 1.0), ("b", 2.0)]
    ds = read_interactions(
        write(tmp_path, "i.csv", "user_id,item_id,genre\n1,a,x\n2,b,y\n"),
        item_features=["genre"],
    )
    merged = join_features(ds, items=items)
    assert merged.items is not None
    assert merged.items.rows() == [("a", "x", 1.0), ("b", "y", 2.0)]
    with pytest.raises(DataError, match="repeats columns"):
        join_features(merged, items=items)


def test_compressed_files_are_read(tmp_path: Path) -> None:
    """Logs ship as .csv.gz, .jsonl.gz or a zip of one file (Amazon's reviews,
    Goodreads, Kaggle downloads): they were refused, to be decompressed by hand."""
    text = f"{HEADER}\n1,1,1,1\n2,2\n3,3,3,3\n"
    plain = tmp_path / "r.csv"
    plain.write_text(text)
    want = read_interactions(plain)
    path = tmp_path / "r.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    got = read_interactions(path)
    assert_frame_equal(got.interactions, want.interactions)
    assert got.report.path == str(path) and got.source == str(path)
    assert got.report.examples == want.report.examples  # the lines of the file
    with pytest.raises(BadRowError, match=r"r\.csv\.gz:3: bad row") as caught:
        read_interactions(path, strict=True)
    assert caught.value.path == str(path)
    lines = tmp_path / "r.jsonl.gz"
    lines.write_bytes(gzip.compress(b'{"user_id": 1, "item_id": 2}\n'))
    assert read_interactions(lines).interactions["item_id"].to_list() == [2]
    zipped = tmp_path / "r.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.write(plain, "ratings/r.csv")
    assert_frame_equal(read_interactions(zipped).interactions, want.interactions)
    with zipfile.ZipFile(zipped, "a") as archive:
        archive.write(plain, "ratings/movies.csv")
    with pytest.raises(DataError, match=r"zip archive of 2 files"):
        read_interactions(zipped)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzip.compress(text.encode())[:-12])
    with pytest.raises(DataError, match="could not be decompressed"):
        read_interactions(cut)
    # A workbook is a zip too: "decompress it" sent users the wrong way.
    book = tmp_path / "log.xlsx"
    book.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(DataError, match=r"spreadsheet workbook.*save its sheet as CSV"):
        read_interactions(book)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.sampled_from(list('ab,\r\n"')), max_size=60),
    block=st.integers(1, 8),
)
def test_property_lines_match_python_newline_handling(text: str, block: int) -> None:
    expected = list(io.StringIO(text, newline=""))
    assert list(_table_lines.iter_lines(text, block)) == expected


def test_a_missing_cr_cannot_hide_a_leading_zero(
    tmp_path: Path, size_checks: list[bool]
) -> None:
    # One LF-only line is one byte short, "07" one byte long: the sizes alone agree.
    crlf = PLAIN_ROWS.replace("\n", "\r\n")
    text = f"{HEADER}\r\n{crlf}07,1,1,1\n{crlf}"
    ds = load(write(tmp_path, "mixed.csv", text))
    assert size_checks == [False]
    assert ds.interactions["user_id"].dtype == pl.String
    assert ds.interactions["user_id"][300] == "07"
    assert ds.interactions.height == 601
    assert load(write(tmp_path, "crlf.csv", f"{HEADER}\r\n{crlf}")).report is not None
    assert size_checks == [False, True]


def test_separator_only_rows_have_their_own_count(tmp_path: Path) -> None:
    """Regression: 900k `,,` rows were all reported as empty_user_id, hiding the few
    genuinely malformed rows among them."""
    rows = ["user_id,item_id,rating", "1,2,3"]
    rows += [",,"] * 50 + ["7,,4", ",9,4"] + [",,"] * 50 + ["2,3,4"]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    report = read_interactions(path, duplicates="keep").report
    assert report is not None
    assert report.rejected == {"empty_row": 100, "empty_item_id": 1, "empty_user_id": 1}
    assert [line for line, _ in report.examples["empty_item_id"]] == [53]
    assert [line for line, _ in report.examples["empty_user_id"]] == [54]


def test_a_log_without_time_has_no_time_range(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n1,2\n2,3\n")
    dataset = read_interactions(path)
    assert not dataset.has_time
    assert describe(dataset)["time_range"] is None
    timed = tmp_path / "timed.csv"
    timed.write_text("user_id,item_id,timestamp\n1,2,86400\n2,3,172800\n")
    assert describe(read_interactions(timed, time_col="timestamp"))["time_range"][
        "min"
    ].startswith("1970-01-02")


def test_strict_message_speaks_to_cli_and_python_users(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n1,2\n,3\n")
    with pytest.raises(BadRowError) as error:
        read_interactions(path, strict=True)
    assert "--strict" in str(error.value) and "strict=False" in str(error.value)


def test_reader_refuses_what_it_cannot_take_faithfully(tmp_path: Path) -> None:
    """Regression (issue 15): a UTF-8 file with one latin-1 row was decoded entirely
    as latin-1 ('usér' became 'usÃ©r', a second user); a duplicated header name
    silently used the first column; NUL bytes stayed inside IDs; timestamps of year
    9999 or int64 max were accepted and crashed `data describe`; a header-only file
    crashed it too."""
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes("user_id,item_id\nusér,2\n".encode() + b"us\xe9r,3\nbob,4\n")
    with pytest.raises(DataError, match=r"mixes encodings.*first: 3"):
        read_interactions(mixed)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"user_id,item_id\nbob,2\nus\xe9r,3\n")
    assert read_interactions(latin).interactions["user_id"].to_list() == ["bob", "usér"]
    twice = tmp_path / "twice.csv"
    twice.write_text("user_id,item_id,item_id\n1,2,3\n")
    with pytest.raises(DataError, match=r"\['item_id'\] more than once"):
        read_interactions(twice)
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"user_id,item_id\nu\x001,2\nbob,3\n")
    report = read_interactions(nul).report
    assert report is not None and report.rejected == {"nul_in_id": 1}
    times = tmp_path / "times.csv"
    times.write_text(
        "user_id,item_id,timestamp\n1,2,253402300799\n2,3,9223372036854775807\n"
        "3,4,1700000000\n4,5,4611686018427387904\n"
    )
    dataset = read_interactions(times, time_col="timestamp")
    assert dataset.report is not None
    assert dataset.report.rejected == {"bad_timestamp": 3}
    assert describe(dataset)["time_range"]["min"].startswith("2023-11-14")
    # reversed or fractional bounds rejected every row as a bad timestamp
    for bounds in ((2**40, 0), (0.5, 2**40)):
        with pytest.raises(ConfigError, match="`time_bounds` should be"):
            read_interactions(times, time_bounds=bounds)  # type: ignore[arg-type]
    wide = read_interactions(times, time_col="timestamp", time_bounds=(0, 2**63 - 1))
    assert wide.num_interactions == 3  # int64 max is the (excluded) upper bound
    assert "out of the calendar" in describe(wide)["time_range"]["max"]
    header_only = tmp_path / "empty.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    summary = describe(read_interactions(header_only, time_col="timestamp"))
    assert summary["num_interactions"] == 0 and summary["time_range"] is None


def test_timestamps_in_milliseconds_have_their_own_reason_and_hint(
    tmp_path: Path,
) -> None:
    """A log of milliseconds (Java, JavaScript) lost every row as `bad_timestamp`,
    and training then said "the random split of 0 rows left none to train on"."""
    from twostage.config import ExperimentConfig
    from twostage.data.split import prepare_split

    log = tmp_path / "ms.csv"
    log.write_text(
        "user_id,item_id,timestamp\n1,2,1700000000\n2,3,1700000000123\n"
        "3,4,1700000000123456\n4,5,253402300799\n"
    )
    report = read_interactions(log).report
    assert report is not None
    # milliseconds and microseconds named; the year-9999 sentinel stays bad
    assert report.rejected == {"timestamp_not_in_seconds": 2, "bad_timestamp": 1}
    assert [line for line, _ in report.examples["timestamp_not_in_seconds"]] == [3, 4]
    assert "time_unit='ms'" in report.summary()
    frame = pl.DataFrame(
        {"user_id": [1, 2], "item_id": [3, 4], "timestamp": [1700000000123] * 2}
    )
    every = read_interactions(frame)
    assert every.report is not None
    assert every.report.rejected == {"timestamp_not_in_seconds": 2}
    summary = describe(every)  # no rows left: it ended in a TypeError
    assert summary["num_interactions"] == 0 and "rating_histogram" not in summary
    with pytest.raises(DataError, match=r"every row read was rejected.*--time-unit ms"):
        prepare_split(every, ExperimentConfig())
    # seconds with a fraction (time.time()), as text or floats: refused, not cut,
    # under their own reason
    fractions = tmp_path / "fractions.csv"
    fractions.write_text(
        "user_id,item_id,timestamp\n1,2,1700000000.25\n2,3,1700000001\n3,4,noon\n"
    )
    report = read_interactions(fractions).report
    assert report is not None
    assert report.rejected == {"timestamp_with_fraction": 1, "bad_timestamp": 1}
    assert "floor the column to whole seconds" in report.summary()
    floats = pl.DataFrame(
        {"user_id": [1, 2], "item_id": [3, 4], "timestamp": [1.7e9 + 0.5, 1.7e9]}
    )
    loaded = read_interactions(floats)
    assert loaded.report is not None
    assert loaded.report.rejected == {"timestamp_with_fraction": 1}
    assert loaded.interactions["timestamp"].to_list() == [1_700_000_000]


def test_time_unit_reads_milliseconds_and_names_numbers_in_another_unit(
    tmp_path: Path,
) -> None:
    """RetailRocket-style logs (milliseconds) had to be rewritten before any run:
    `time_unit` reads them, floored to whole seconds."""
    log = tmp_path / "events.csv"
    log.write_text(
        "visitorid,itemid,timestamp\n1,2,1433221332117\n2,3,1433221332999\n"
        "3,4,2015-06-02T05:02:12\n4,5,1433221332\n5,6,-1\n6,7,\n"
    )
    ds = read_interactions(log, user_col="visitorid", item_col="itemid", time_unit="ms")
    times = ds.interactions["timestamp"].to_list()
    assert times == [1433221332, 1433221332, 1433221332, -1]
    report = ds.report
    assert report is not None
    # seconds given as milliseconds would read as January 1970: named, not loaded
    assert report.rejected == {"timestamp_not_in_time_unit": 1, "bad_timestamp": 1}
    assert [line for line, _ in report.examples["timestamp_not_in_time_unit"]] == [5]
    assert "give the unit of the column" in report.summary()
    # (-1 ms is 1969-12-31T23:59:59.999: floored, as every unit is, within bounds)
    # a float column of microseconds (whole ones); datetimes stay as they are
    frame = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [1, 2, 3],
            "timestamp": [1_700_000_000_500_000.0, 1_700_000_001_000_000.0, 1.4e12],
        }
    )
    us = read_interactions(frame, time_unit="us")
    assert us.interactions["timestamp"].to_list() == [1_700_000_000, 1_700_000_001]
    assert us.report is not None and us.report.rejected == {
        "timestamp_not_in_time_unit": 1  # 1.4e12 is 2014 in milliseconds
    }
    dated = pl.DataFrame(
        {"user_id": [1], "item_id": [1], "timestamp": [datetime(2024, 3, 1)]}
    )
    assert read_interactions(dated, time_unit="ns").interactions["timestamp"][0] == (
        1709251200
    )
    for options, message in [
        ({"time_unit": "sec"}, "should be one of"),
        ({"time_unit": "ms", "time_format": "%Y"}, "give one"),
    ]:
        with pytest.raises(ConfigError, match=message):
            read_interactions(log, **options)


def test_weight_values_weigh_a_column_of_event_types(tmp_path: Path) -> None:
    """E-commerce logs name their events (view, addtocart, transaction); a weight
    column had to be numbers, so every row of such a log was a bad weight."""
    log = tmp_path / "events.csv"
    log.write_text(
        "user,item,event\n1,1,view\n1,2, transaction\n2,1,addtocart\n"
        "2,2,click\n3,1,\n3,3,view\n"
    )
    weights = {"view": 1, "addtocart": 3, "transaction": 5.5}
    ds = read_interactions(
        log, user_col="user", item_col="item", weight_col="event", weight_values=weights
    )
    assert ds.interactions["weight"].to_list() == [1.0, 5.5, 3.0, 1.0]
    report = ds.report
    assert report is not None
    assert report.rejected == {"weight_value_not_mapped": 1, "bad_weight": 1}
    assert report.examples["weight_value_not_mapped"][0][0] == 5
    assert "--weight-values" in report.summary()
    # The exact path and a Parquet file of integer codes read the same way.
    with exact_path():
        again = read_interactions(
            log,
            user_col="user",
            item_col="item",
            weight_col="event",
            weight_values=weights,
        )
    assert_frame_equal(again.interactions, ds.interactions)
    codes = pl.DataFrame({"user_id": [1, 2], "item_id": [1, 1], "kind": [0, 2]})
    coded = read_interactions(codes, weight_col="kind", weight_values={"0": 1, "2": 4})
    assert coded.interactions["weight"].to_list() == [1.0, 4.0]
    # A categorical column (pandas' category, a Parquet dictionary) holds names too.
    category = codes.with_columns(pl.Series("kind", ["view", "buy"], pl.Categorical))
    typed = read_interactions(
        category, weight_col="kind", weight_values={"buy": 3, "view": 1}
    )
    assert typed.interactions["weight"].to_list() == [1.0, 3.0]
    for values, message in [
        ({"view": -1}, "finite number >= 0"),
        ({"view": True}, "finite number >= 0"),
        ({}, "should map each value"),
        ({"view": 1, " view": 2}, "twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            read_interactions(log, weight_col="event", weight_values=values)
    with pytest.raises(ConfigError, match="name the column with `weight_col`"):
        read_interactions(log, user_col="user", item_col="item", weight_values=weights)
    floats = pl.DataFrame({"user_id": [1], "item_id": [1], "kind": [0.5]})
    with pytest.raises(DataError, match=r"names \(text\) or integer codes"):
        read_interactions(floats, weight_col="kind", weight_values={"0.5": 1})


def test_unsigned_ids_beyond_int64_are_refused_not_lost(tmp_path: Path) -> None:
    """A UInt64 ID above 2**63 - 1 (a 64-bit hash) became null on the cast to
    Int64, and its row was rejected as an empty ID."""
    frame = pl.DataFrame(
        {
            "user_id": pl.Series([2**64 - 1, 5], dtype=pl.UInt64),
            "item_id": [1, 2],
        }
    )
    with pytest.raises(DataError, match="holds 18446744073709551615, beyond the int64"):
        read_interactions(frame)
    small = frame.with_columns(pl.Series("user_id", [7, 5], dtype=pl.UInt64))
    assert read_interactions(small).interactions["user_id"].to_list() == [7, 5]


def test_columns_named_timestamp_and_rating_play_those_roles(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,rating,timestamp\n1,10,5,300\n1,11,4,100\n")
    ds = read_interactions(path)
    assert ds.has_time and ds.interactions["timestamp"].to_list() == [300, 100]
    assert ds.interactions["rating"].to_list() == [5.0, 4.0]
    # A bad value there is now a counted bad row, not a column passed over.
    path.write_text("user_id,item_id,rating,timestamp\n1,10,5,300\n1,11,x,y\n")
    ds = read_interactions(path)
    assert ds.report is not None and ds.report.rows_loaded == 1
    # "" refuses the role; another role may take the column instead.
    plain = read_interactions(path, time_col="", rating_col="")
    assert not plain.has_time and plain.interactions["timestamp"].to_list() == [0, 1]
    assert "rating" not in plain.interactions.columns
    swapped = read_interactions(path, time_col="", weight_col="rating")
    assert "rating" not in swapped.interactions.columns
    assert swapped.interactions["weight"].to_list()[0] == 5.0
    # The streamed reader of a Parquet log takes the columns by these names too.
    from twostage.data.streaming import iter_row_groups

    parquet = tmp_path / "log.parquet"
    pl.DataFrame(
        {
            "user_id": [1, 1],
            "item_id": [10, 11],
            "rating": [5.0, 4.0],
            "timestamp": [300, 100],
        }
    ).write_parquet(parquet)
    in_memory = read_interactions(parquet).interactions
    groups = iter_row_groups(parquet, columns=["timestamp", "rating"])
    streamed = pl.concat([batch for _, batch in groups])
    for column in ("timestamp", "rating"):
        assert in_memory[column].to_list() == streamed[column].to_list()


def test_float_ids_with_missing_values_read_as_integers(tmp_path: Path) -> None:
    # pandas turns an integer ID column with a gap into floats (1.0, NaN): the
    # whole frame was refused for its dtype. Now the gaps are the rejected rows.
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(
        {"user_id": [1.0, 2.0, np.nan, 4.0, None], "item_id": [5, 6, 7, 8, 9]}
    )
    data = read_interactions(frame)
    assert data.interactions["user_id"].dtype == pl.Int64
    assert data.interactions["user_id"].to_list() == [1, 2, 4]
    assert data.report.rejected == {"empty_user_id": 2}
    assert [line for line, _ in data.report.examples["empty_user_id"]] == [3, 5]
    for bad in ([1.5, 2.0], [2.0**60, 1.0], [float("inf"), 1.0]):
        odd = pandas.DataFrame({"user_id": bad, "item_id": [1, 2]})
        with pytest.raises(DataError, match="not whole"):
            read_interactions(odd)
    # The streamed reader parses a file's IDs the same way.
    from twostage.data.streaming import iter_batches

    frame.assign(timestamp=range(5)).to_parquet(tmp_path / "log.parquet")
    rows = pl.concat(
        iter_batches(tmp_path / "log.parquet", columns=["user_id", "item_id"])
    )
    assert rows["user_id"].to_list() == [1, 2, 4]


def test_json_lines_and_arrays_read_as_the_same_log_as_csv(tmp_path: Path) -> None:
    """A JSON log (event exports are JSON lines) was read as CSV: one column per
    `"key":value` fragment, and every row rejected."""
    rows = pl.DataFrame(
        {
            "user": [1, 1, 2, 3],
            "item": ["a", "b", "a", "c"],
            "ts": [1_600_000_000 + i for i in range(4)],
            "rating": [4.0, 3.5, 5.0, 1.0],
            "genres": [["x"], ["x", "y"], ["x"], []],
        }
    )
    rows.drop("genres").write_csv(tmp_path / "log.csv")
    rows.write_ndjson(tmp_path / "log.jsonl")
    (tmp_path / "log.json").write_text(rows.write_json())  # an array of objects
    options = {"user_col": "user", "item_col": "item", "time_col": "ts"}
    expected = read_interactions(tmp_path / "log.csv", **options)
    for name in ("log.jsonl", "log.json"):
        found = read_interactions(tmp_path / name, **options, item_features=["genres"])
        assert found.report is not None and found.report.ok, name
        assert_frame_equal(found.interactions, expected.interactions)
        assert found.items is not None
        assert found.items.sort("item_id")["genres"].to_list() == [
            ["x"],
            ["x", "y"],
            [],
        ]
    users = read_feature_table(tmp_path / "log.jsonl", key_col="user", columns=["ts"])
    assert users["user_id"].to_list() == [1, 2, 3]


def test_bad_json_lines_are_counted_on_their_lines(tmp_path: Path) -> None:
    text = "\n".join(
        [
            '{"user": 1, "item": 10, "timestamp": 1600000000}',
            "",  # a blank line holds no row: skipped, and the numbers stay physical
            '{"user": 2, "item": 11, "timestamp": 1600000001',  # cut short
            '{"user": 3, "item": 12, "timestamp": NaN}',  # not JSON
            "[1, 2, 3]",  # not an object
            '{"user": 4, "item": 13, "timestamp": 1600000003, "user": 5}',  # which?
            '{"user": null, "item": 14, "timestamp": 1600000004}',
            '{"user": 6, "item": 15, "timestamp": 1600000005}',
        ]
    )
    path = write(tmp_path, "events.jsonl", text + "\n")
    data = read_interactions(path, user_col="user", item_col="item")
    assert data.interactions["user_id"].to_list() == [1, 6]
    report = data.report
    assert report is not None and report.rows_read == 7 and report.rows_loaded == 2
    assert report.rejected == {"bad_json": 4, "empty_user_id": 1}
    assert [line for line, _ in report.examples["bad_json"]] == [3, 4, 5, 6]
    assert [line for line, _ in report.examples["empty_user_id"]] == [7]
    assert "bad_json" in REASONS
    with pytest.raises(BadRowError) as stopped:
        read_interactions(path, user_col="user", item_col="item", strict=True)
    assert (stopped.value.line, stopped.value.reason) == (3, "bad_json")
    for content, message in [
        (b'[{"user": 1}, {"user": 2', "not a readable JSON array"),
        (b'{"user": 1, "item": "caf\xe9"}\n', "line 1 holds the byte"),
        (b"\n\n", "no JSON object to read"),
    ]:
        with pytest.raises(DataError, match=message):
            read_interactions(write(tmp_path, "x.json", content), user_col="user")


def test_dates_written_as_numbers_are_not_read_as_1970(tmp_path: Path) -> None:
    """20240301 read as 20,240,301 seconds: a log of August 1970, without a word."""
    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.data.registry import load_dataset_for

    text = "user_id,item_id,day\n1,1,20240301\n1,2,20240302\n2,1,20240315\n"
    path = write(tmp_path, "days.csv", text)
    refused = read_interactions(path, time_col="day")
    assert refused.report is not None and refused.num_interactions == 0
    assert refused.report.rejected == {"timestamp_as_date_number": 3}
    assert "time_format='%Y%m%d'" in refused.report.summary()
    read = read_interactions(path, time_col="day", time_format="%Y%m%d")
    assert read.interactions["timestamp"].to_list() == [
        int(datetime(2024, 3, d, tzinfo=UTC).timestamp()) for d in (1, 2, 15)
    ]
    # From a config (`--time-format`), and as Parquet integers too.
    pl.read_csv(path).write_parquet(tmp_path / "days.parquet")
    config = apply_overrides(
        ExperimentConfig(),
        [f"data.dataset={tmp_path / 'days.parquet'}", "data.time_col=day"],
    )
    assert load_dataset_for(config).num_interactions == 0
    dated = apply_overrides(config, ["data.time_format=%Y%m%d"])
    assert load_dataset_for(dated).interactions["timestamp"].to_list() == (
        read.interactions["timestamp"].to_list()
    )
    # Seconds that merely fall in that band (a relative clock) stay seconds.
    mixed = write(tmp_path, "mixed.csv", "user_id,item_id,t\n1,1,20240301\n1,2,5\n")
    assert read_interactions(mixed, time_col="t").num_interactions == 2
    # The whole column decides, not a block of it: the exact path parses a file
    # in blocks (here of 3 rows), and a block of dates alone was rejected.
    blocks = "user_id,item_id,t\n1,1,5\n1,2,6\n1,3,7\n2,1,20240301\n2,2,20240302\n"
    blocked = write(tmp_path, "blocks.csv", blocks)
    with exact_path():
        assert read_interactions(blocked, time_col="t").num_interactions == 5
        assert read_interactions(path, time_col="day").report.rejected == {
            "timestamp_as_date_number": 3
        }
    with pytest.raises(BadRowError, match="timestamp_as_date_number"):
        read_interactions(path, time_col="day", strict=True)


def test_numbers_with_a_decimal_comma_have_their_own_reason(tmp_path: Path) -> None:
    """European exports write 4,5: counted as bad ratings, with no word of why."""
    text = "user;item;rating;plays\n1;1;4,5;1\n1;2;3;2,5\n2;1;5;1\n2;2;x;1\n"
    path = write(tmp_path, "eu.csv", text)
    data = read_interactions(
        path, user_col="user", item_col="item", rating_col="rating", weight_col="plays"
    )
    assert data.report is not None and data.num_interactions == 1
    assert data.report.rejected == {"number_with_decimal_comma": 2, "bad_rating": 1}
    assert [line for line, _ in data.report.examples["number_with_decimal_comma"]] == [
        2,
        3,
    ]
    assert "str.replace(',', '.')" in data.report.summary()


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be-bom", "utf-32"])
def test_utf16_and_utf32_files_with_a_bom_are_read(tmp_path: Path, codec: str) -> None:
    """Excel's "Unicode text" export (UTF-16) was decoded as latin-1: every column
    name came out as 'ÿþu\\x00s\\x00e\\x00r...', and nothing could be read."""
    text = "user_id\titem_id\trating\n1\tcafé\t4\n2\tthé\t5\n"
    data = (
        codecs.BOM_UTF16_BE + text.encode("utf-16-be")
        if codec == "utf-16-be-bom"
        else text.encode(codec)
    )
    found = read_interactions(write(tmp_path, "export.txt", data))
    assert found.interactions["item_id"].to_list() == ["café", "thé"]
    assert found.interactions["rating"].to_list() == [4.0, 5.0]


def test_missing_ratings_unrated_keeps_rows_without_a_rating(tmp_path: Path) -> None:
    """A log of purchases and reviews rates only the reviews: its purchases were
    bad_rating rows, dropped, with no way to keep them as interactions."""
    text = "user_id,item_id,rating\n1,10,4\n1,11,\n2,10, \n2,12,abc\n3,11,5\n"
    path = tmp_path / "mixed.csv"
    path.write_text(text)
    rejected = read_interactions(path)
    assert rejected.report.rejected == {"bad_rating": 3}
    assert "--missing-ratings unrated" in rejected.report.hint
    kept = read_interactions(path, missing_ratings="unrated")
    assert kept.report.rejected == {"bad_rating": 1}  # "abc" is there, not missing
    assert kept.interactions["rating"].to_list() == [4.0, None, None, 5.0]
    assert describe(kept)["unrated_rows"] == 2
    # The exact path (a quoted field) and JSON lines (a key absent or null) alike.
    path.write_text(text.replace("1,10,4", '1,"10",4'))
    assert read_interactions(path, missing_ratings="unrated").report.rejected == {
        "bad_rating": 1
    }
    lines = tmp_path / "mixed.jsonl"
    lines.write_text(
        '{"user_id": 1, "item_id": 10, "rating": 4}\n'
        '{"user_id": 1, "item_id": 11}\n'
        '{"user_id": 2, "item_id": 10, "rating": null}\n'
    )
    read = read_interactions(lines, rating_col="rating", missing_ratings="unrated")
    assert read.report.ok and read.interactions["rating"].null_count() == 2
    frame = pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4], "rating": [None, 2.0]})
    assert read_interactions(frame, missing_ratings="unrated").report.ok
    with pytest.raises(ConfigError, match="missing_ratings"):
        read_interactions(frame, missing_ratings="keep")


def test_a_space_is_sniffed_only_when_nothing_else_splits_the_lines(
    tmp_path: Path,
) -> None:
    """SNAP's and LibRec's `user item rating` files are separated by spaces: the
    sniffer said it could not detect a separator (and named `separator=`, which
    the command line does not take)."""
    path = tmp_path / "ratings.txt"
    path.write_text("1 10 4\n1 11 5\n2 10 3\n")
    read = read_interactions(
        path, has_header=False, column_names=["user_id", "item_id", "rating"]
    )
    assert read.report.ok and read.interactions["rating"].to_list() == [4, 5, 3]
    # Spaces inside the fields of a CSV never win over its commas.
    titled = tmp_path / "titled.csv"
    titled.write_text("user_id,item_id,title\n1,10,Toy Story\n2,11,Star Wars\n")
    read = read_interactions(titled, item_features=["title"])
    assert read.items is not None and "Toy Story" in read.items["title"].to_list()
    mixed = tmp_path / "mixed.txt"  # separators, but none splits every line
    mixed.write_text("a,b\nc\nd;e;f\n")
    with pytest.raises(DataError, match=r"among \[.*' '\]\. Pass it with `separator`"):
        read_interactions(mixed)
    # No separator in any line: one column (it was "could not detect the
    # separator"), so `add-items --items` takes a file of IDs alone.
    lonely = tmp_path / "one.txt"
    lonely.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"Available columns: \['a'\]"):
        read_interactions(lonely)
    from twostage.catalogue import read_item_rows

    ids = tmp_path / "ids.csv"
    ids.write_text("item_id\n901\n902\n")
    assert read_item_rows(ids)["item_id"].to_list() == [901, 902]


def test_a_feature_table_holding_the_other_id_is_refused() -> None:
    """An item table with a `user_id` column (the log given as a catalogue) ended
    in "every field needs its own output key; ['user_id'] are used twice"."""
    log = Dataset(
        name="log",
        interactions=pl.DataFrame(
            {"user_id": [1, 2], "item_id": [3, 4], "timestamp": [0, 1]}
        ),
    )
    items = pl.DataFrame({"item_id": [3, 4], "user_id": [1, 2], "price": [1.0, 2.0]})
    with pytest.raises(DataError, match=r"`items` has a 'user_id' column beside"):
        join_features(log, items=items)
    users = pl.DataFrame({"user_id": [1, 2], "item_id": [3, 4]})
    with pytest.raises(DataError, match=r"`users` has a 'item_id' column beside"):
        join_features(log, users=users)
    assert join_features(log, items=items.drop("user_id")).items is not None


def test_feature_codes_with_leading_zeros_stay_text(tmp_path: Path) -> None:
    """H&M's articles.csv writes colour_group_code as "09": the column became
    Float64, 9.0, so "09" and "9" were one value and the code a quantity."""
    path = tmp_path / "articles.csv"
    path.write_text("article_id,colour_group_code,price\n1,09,0.5\n2,10,1.5\n3,09,2\n")
    table = read_feature_table(path, key_col="article_id", key_name="item_id")
    assert table["colour_group_code"].to_list() == ["09", "10", "09"]
    assert table.schema["price"] == pl.Float64  # "0.5" is a number


def test_python_dict_lines_are_named_as_such(tmp_path: Path) -> None:
    """Steam's review dumps hold Python dicts, not JSON: every line was bad_json,
    with no word of what the lines were or how to convert them."""
    path = tmp_path / "reviews.json"
    path.write_text("{'user_id': 'u1', 'item_id': '10', 'recommend': True}\n")
    with pytest.raises(DataError, match=r"Python dicts.*ast\.literal_eval"):
        read_interactions(path)


def test_words_for_missing_in_a_column_of_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """R writes NA and Amazon's metadata price "None": the column became text, and
    an age or a price a category of its own values."""
    path = tmp_path / "users.csv"
    path.write_text(
        "user_id,age,region,zip\n1,NA,NA,NA\n2,34,EU,02134\n3,41.5,NA,10001\n"
    )
    with caplog.at_level("WARNING"):
        table = read_feature_table(path, key_col="user_id")
    assert table["age"].to_list() == [None, 34.0, 41.5]
    assert table["region"].to_list() == ["NA", "EU", "NA"]  # text: its words stay
    assert table["zip"].to_list() == ["NA", "02134", "10001"]  # a code with zeros
    assert "feature column 'age': 1 value 'NA' read as missing" in caplog.text
    lines = tmp_path / "meta.jsonl"
    lines.write_text(
        '{"item_id": 1, "price": 19.99}\n{"item_id": 2, "price": "None"}\n'
        '{"item_id": 3, "price": 5}\n'
    )
    meta = read_feature_table(lines, key_col="item_id", key_name="item_id")
    assert meta["price"].to_list() == [19.99, None, 5.0]


def test_a_separator_ending_every_line_below_the_header(tmp_path: Path) -> None:
    """Some exports end each data line in a separator the header lacks: every row
    was a wrong_field_count, and nothing was read."""
    path = tmp_path / "export.csv"
    path.write_text("user_id,item_id,rating\n1,2,3,\n2,3,4,\n")
    read = read_interactions(path)
    assert read.report.ok and read.interactions["rating"].to_list() == [3, 4]
    # A file where only some lines end so is read by its header, the others
    # counted.
    path.write_text("user_id,item_id,rating\n1,2,3,\n2,3,4,\n3,3,5\n")
    read = read_interactions(path)
    assert read.interactions["rating"].to_list() == [5]
    assert read.report.rejected == {"wrong_field_count": 2}


def test_an_id_that_is_a_word_for_missing_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Diginetica writes userId "NA" on anonymous sessions: every one of them was
    read as one user, without a word."""
    path = tmp_path / "train-item-views.csv"
    path.write_text("sessionId;userId;itemId\n1;NA;10\n2;NA;11\n3;5;10\n")
    with caplog.at_level("WARNING"):
        read = read_interactions(path, user_col="userId", item_col="itemId")
    assert read.num_interactions == 3  # kept: a user may be called so
    assert "2 rows have the user ID 'NA', a word for a missing value" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_interactions(path, user_col="sessionId", item_col="itemId")
    assert "a word for a missing value" not in caplog.text


# -------------------------------------------------------------- comment lines

SNAP_HEAD = (
    "# Directed graph (each unordered pair of nodes is saved once): soc-Epinions1\n"
    "# Nodes: 40 Edges: 300\n"
    "# FromNodeId\tToNodeId\n"
)


def _snap_log(rows: int = 300, middle: str = "") -> str:
    """SNAP's layout: '#' lines above headerless tab-separated pairs."""
    rng = np.random.default_rng(0)
    lines = [f"{u}\t{i}\n" for u, i in rng.integers(0, 40, size=(rows, 2))]
    return SNAP_HEAD + "".join(lines[:100]) + middle + "".join(lines[100:])


@pytest.mark.parametrize("exact", [False, True])
def test_comment_prefix_skips_and_counts_comment_lines(
    tmp_path: Path, exact: bool
) -> None:
    """SNAP's '#' and KONECT's '%' header lines were read as rows: bad rows, or a
    KONECT line '% 3000 300 200' parsed as user '%'."""
    middle = '# a note with "an unclosed quote\n'
    path = write(tmp_path, "soc.txt", _snap_log(middle=middle))
    fast = []
    spy = _table_text.read_fast
    with contextlib.ExitStack() as stack:
        if exact:
            stack.enter_context(exact_path())
        else:
            stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                _table_text,
                "read_fast",
                lambda *args: fast.append(out := spy(*args)) or out,
            )
        read = read_interactions(
            path,
            column_names=["user_id", "item_id"],
            has_header=False,
            comment_prefix="#",
        )
    assert fast == [] if exact else fast[0] is not None  # which path was taken
    assert read.num_interactions == 300 and read.report.ok
    assert read.report.comment_lines == 4
    assert "4 comment line(s) skipped" in read.report.summary()
    expected = pl.read_csv(
        path, separator="\t", has_header=False, comment_prefix="#", infer_schema=False
    )
    assert read.interactions["item_id"].to_list() == [
        int(x) for x in expected["column_1"]
    ]


def test_comment_lines_keep_physical_line_numbers(tmp_path: Path) -> None:
    """A bad row after comment lines is named by its line in the file; a line that
    starts with the prefix inside a quoted field is text, not a comment."""
    text = (
        "% bip weighted\n"
        "user_id,item_id,rating\n"
        "1,2,3\n"
        '2,"line one\n'
        '% still the item",4\n'
        "% 3 3 3\n"
        "3,,5\n"
        "4,5,1\n"
    )
    path = write(tmp_path, "konect.csv", text)
    read = read_interactions(path, comment_prefix="%")
    assert read.report.comment_lines == 2
    assert read.report.rejected == {"empty_item_id": 1}
    assert read.report.examples["empty_item_id"] == [(7, "3,,5")]
    assert read.interactions["item_id"].to_list() == [
        "2",
        "line one\n% still the item",
        "5",
    ]


def test_comment_like_lines_without_a_prefix_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Read without comment_prefix, a file opening with '%' lines gets a warning
    and its bad rows a hint that name the option."""
    rows = "".join(f"{u} {u % 7} 4 {900000000 + u}\n" for u in range(1, 60))
    path = write(tmp_path, "out.ratings", "% bip weighted\n% 59 59 7\n" + rows)
    names = ["user_id", "item_id", "rating", "timestamp"]
    with caplog.at_level(logging.WARNING, logger="twostage.data"):
        read = read_interactions(path, column_names=names, has_header=False)
    assert "first 2 line(s) start with '%'" in caplog.text
    assert "--comment-prefix '%'" in caplog.text
    assert read.report.rejected == {"wrong_field_count": 1}  # '% bip weighted'
    assert "comment_prefix='%'" in read.report.hint
    skipped = read_interactions(
        path, column_names=names, has_header=False, comment_prefix="%"
    )
    assert skipped.num_interactions == 59 and skipped.report.ok
    assert set(skipped.interactions["user_id"].to_list()) == set(range(1, 60))


@pytest.mark.parametrize("prefix", [" ", "\n", "######", '"', ","])
def test_comment_prefix_is_checked(tmp_path: Path, prefix: str) -> None:
    path = write(tmp_path, "log.csv", "user_id,item_id\n1,2\n")
    with pytest.raises(ConfigError, match="comment_prefix"):
        read_interactions(path, comment_prefix=prefix, separator=",")


def test_whole_seconds_written_as_floats(tmp_path: Path) -> None:
    """pandas writes a timestamp column that has a missing value as floats
    ("881250949.0"): such a text was a bad_timestamp, while a float column of the
    same whole seconds loads. A real fraction stays timestamp_with_fraction."""
    text = (
        "user_id,item_id,timestamp\n1,2,881250949.0\n3,4,881250950\n5,6,881250951.5\n"
    )
    read = read_interactions(write(tmp_path, "floats.csv", text))
    assert read.interactions["timestamp"].to_list() == [881250949, 881250950]
    assert read.report.rejected == {"timestamp_with_fraction": 1}
    floats = pl.DataFrame(
        {"user_id": [1, 3], "item_id": [2, 4], "timestamp": [881250949.0, 881250950.0]}
    )
    assert read_interactions(floats).interactions.equals(read.interactions)
    millis = "user_id,item_id,timestamp\n1,2,881250949000.0\n3,4,881250950000\n"
    in_ms = read_interactions(write(tmp_path, "ms.csv", millis), time_unit="ms")
    assert in_ms.interactions["timestamp"].to_list() == [881250949, 881250950]


def test_integer_ids_written_as_floats(tmp_path: Path) -> None:
    """pandas writes an integer ID column with a gap as floats ("196.0"): read as
    text, user "196.0" was not user 196 of the next file or of a feature table.
    Such a column is read as the integers, as a float column of them is; one value
    with a real fraction keeps the column text."""
    text = "user_id,item_id\n196.0,242.0\n186.0,302.0\n0.0,7.0\n"
    read = read_interactions(write(tmp_path, "floats.csv", text))
    assert read.interactions["user_id"].to_list() == [196, 186, 0]
    assert read.interactions.schema["item_id"] == pl.Int64
    floats = pl.DataFrame(
        {"user_id": [196.0, 186.0, 0.0], "item_id": [242.0, 302.0, 7.0]}
    )
    assert (
        read_interactions(floats)
        .interactions.drop("timestamp")
        .equals(read.interactions.drop("timestamp"))
    )
    mixed = "user_id,item_id\n196.0,242.0\n186.5,302.0\n"
    kept = read_interactions(write(tmp_path, "mixed.csv", mixed))
    assert kept.interactions["user_id"].to_list() == ["196.0", "186.5"]


def test_recbole_atomic_files(tmp_path: Path) -> None:
    """RecBole's datasets come as `name.inter` / `.user` / `.item` with typed
    headers (`user_id:token`): the log was refused ("`user_col` = 'user_id' is
    not a column") and `genre:token_seq` was one string."""
    from twostage.data.registry import anchored, load_dataset

    folder = tmp_path / "shop"
    folder.mkdir()
    rows = "".join(
        f"{u}\t{i}\t{1 + (u + i) % 5}\t{900000000 + u * 50 + i}\n"
        for u in range(1, 30)
        for i in range(1, 12)
        if (u * i) % 3
    )
    write(
        folder,
        "shop.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + rows,
    )
    write(
        folder,
        "shop.item",
        "item_id:token\titem_title:token_seq\tgenre:token_seq\tprice:float\n"
        + "".join(
            f"{i}\tThe Item {i}\tgenre{i % 3} genre{i % 4}\t{i}.5\n"
            for i in range(1, 12)
        ),
    )
    write(
        folder,
        "shop.user",
        "user_id:token\tcountry:token\n"
        + "".join(f"{u}\tc{u % 4}\n" for u in range(1, 30)),
    )
    log = read_interactions(folder / "shop.inter")
    assert log.report.ok and log.interactions.columns == [
        "user_id",
        "item_id",
        "timestamp",
        "rating",
    ]
    data = load_dataset(f"recbole:{folder}")
    assert data.num_interactions == log.num_interactions
    assert data.items is not None and data.users is not None
    assert data.items.schema["genre"] == pl.List(pl.String)
    assert data.items.filter(pl.col("item_id") == 5)["genre"].to_list() == [
        ["genre2", "genre1"]
    ]
    assert data.items.schema["item_title"] == pl.String  # a title stays text
    assert data.items.schema["price"] == pl.Float64
    assert data.users["country"].to_list()[:2] == ["c1", "c2"]
    assert load_dataset(f"recbole:{folder / 'shop.inter'}").num_interactions == (
        log.num_interactions
    )
    assert anchored("recbole:shop").startswith("recbole:")
    with pytest.raises(DataError, match=r"no \.inter file"):
        load_dataset(f"recbole:{tmp_path}")


def test_tables_of_every_frame_library_read_as_the_polars_frame(
    tmp_path: Path,
) -> None:
    """A log given as a pyarrow table, a polars LazyFrame or a dict of columns
    was refused ("should be a file path or a polars or pandas DataFrame"); each
    now reads as the same rows, bad rows counted alike."""
    pa = pytest.importorskip("pyarrow")
    frame = pl.DataFrame(
        {
            "uid": ["a", "a", "b", None],
            "sku": [1, 2, 3, 4],
            "stars": [5.0, None, 4.0, 3.0],
            "ts": [10, 20, 30, 40],
        }
    )
    columns = {"user_col": "uid", "item_col": "sku", "rating_col": "stars"}
    expected = read_interactions(frame, time_col="ts", **columns)
    assert expected.report.num_rejected == 2
    given = [
        frame.to_arrow(),
        frame.to_arrow().to_batches()[0],
        frame.lazy(),
        frame.to_dict(as_series=False),
    ]
    if importlib.util.find_spec("pandas") is not None:
        given.append(frame.to_pandas())
    for data in given:
        read = read_interactions(data, time_col="ts", **columns)
        assert read.interactions.equals(expected.interactions), type(data)
        assert read.report.rejected == expected.report.rejected
        assert read.report.examples == expected.report.examples
    # A lazy query that fails names the frame and the reason.
    broken = pl.LazyFrame({"uid": [1]}).select(pl.col("nope"))
    with pytest.raises(DataError, match="LazyFrame could not be read as a table"):
        read_interactions(broken, user_col="uid", item_col="sku")
    with pytest.raises(DataError, match="could not be read as a table"):
        read_interactions({"uid": [1, 2], "sku": [1]}, user_col="uid")
    with pytest.raises(DataError, match="polars, pandas or pyarrow table"):
        read_interactions([("a", 1)])
    with pytest.raises(DataError, match="LazyFrame could not be read"):
        read_interactions(pl.scan_parquet(tmp_path / "none.parquet"))
    if importlib.util.find_spec("pandas") is not None:
        twice = frame.to_pandas().set_axis(["uid", "uid", "stars", "ts"], axis=1)
        with pytest.raises(DataError, match=r"names the column\(s\) \['uid'\] more"):
            read_interactions(twice, user_col="uid")
        # A named index is not read (polars' rule); the error says where it is.
        indexed = frame.to_pandas().set_index("uid")
        with pytest.raises(DataError, match=r"index \['uid'\] is not read"):
            read_interactions(indexed, user_col="uid", item_col="sku")
        keyed = pl.DataFrame({"sku": [1, 2], "g": ["x", "y"]}).to_pandas()
        with pytest.raises(DataError, match=r"reset_index\(\)"):
            read_feature_table(keyed.set_index("sku"), key_col="sku")
        plain = read_interactions(indexed.reset_index(), user_col="uid", item_col="sku")
        assert plain.num_interactions == 3
    # A struct column's fields are columns named by their paths, as in a
    # Parquet file (a frame read the struct as one column it could not map).
    nested = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [7, 8, 7],
            "meta": [
                {"genre": "x", "year": 1990},
                {"genre": "y", "year": 2001},
                {"genre": "x", "year": 1990},
            ],
        }
    )
    nested.write_parquet(tmp_path / "nested.parquet")
    wanted = {"item_features": ["meta.genre", "meta.year"]}
    from_file = read_interactions(tmp_path / "nested.parquet", **wanted)
    for data in (nested, nested.to_arrow()):
        from_frame = read_interactions(data, **wanted)
        assert from_frame.interactions.equals(from_file.interactions)
        assert from_frame.items is not None and from_file.items is not None
        assert from_frame.items.equals(from_file.items)
        assert from_frame.items.columns == ["item_id", "meta.genre", "meta.year"]
    table = pa.table({"item_id": [1, 2], "genre": ["x", "y"]})
    as_arrow = read_feature_table(table, key_col="item_id", key_name="item_id")
    as_polars = read_feature_table(
        pl.from_arrow(table), key_col="item_id", key_name="item_id"
    )
    assert as_arrow.equals(as_polars)
