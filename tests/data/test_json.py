"""JSON logs: polars' reader and the line-by-line one give the same rows, and
values of mixed kinds are judged, not coerced."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from twostage.data import _table_json, tables
from twostage.data.tables import read_interactions
from twostage.errors import BadRowError, TwostageError


def read_both(
    path: Path, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> tuple[Any, Any]:
    """The file read as it is (polars where it can) and line by line only; each
    a dataset or the error raised."""
    found = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            m.setattr(
                tables, "load_json", functools.partial(_table_json._load, fast=fast)
            )
            m.setattr(_table_json, "BLOCK", 3)  # blocks of lines polars parses
            try:
                found.append(read_interactions(path, **options))
            except TwostageError as e:
                found.append(e)
    return found[0], found[1]


def assert_same(fast: Any, exact: Any) -> None:
    if isinstance(exact, Exception):
        assert type(fast) is type(exact) and str(fast) == str(exact)
        return
    assert not isinstance(fast, Exception), fast
    assert_frame_equal(fast.interactions, exact.interactions)
    for table in ("items", "users"):
        if getattr(exact, table) is None:
            assert getattr(fast, table) is None
        else:
            assert_frame_equal(getattr(fast, table), getattr(exact, table))
    assert fast.report.to_dict() == exact.report.to_dict()


def test_polars_reads_a_plain_log_as_the_exact_path_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        '{"user_id": 1, "item_id": "a", "rating": 4, "ts": 1600000000, '
        # escapes as Python's json.dumps writes them, an emoji as a surrogate pair
        '"genres": ["x", "y"], "price": 19.99, '
        '"title": "Caf\\u00e9 \\"noir\\" \\ud83d\\ude00"}',
        "",  # blank lines hold no row and keep the numbers physical
        '{"item_id": "b", "user_id": 2, "rating": 3.5, "ts": 1600000001, '
        '"genres": [], "price": "None", "title": "rating"}\r',
        '{"user_id" : 3, "item_id": "a", "ts": 1600000002, "rating": 5, '
        '"genres": null, "title": "user_id"}',
        "   ",
        '{"user_id": 4, "item_id": "c", "rating": 1, '
        '"ts": 1600000003, "price": 99999999999999999999, "title": "\\u00e9"}',
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    texts = [line.removesuffix("\r") for line in lines if line.strip()]
    assert _table_json._read_fast(pl.Series(texts)) is not None  # the fast path
    options = {"time_col": "ts", "item_features": ["genres", "price", "title"]}
    fast, exact = read_both(path, monkeypatch, **options)
    assert_same(fast, exact)
    assert fast.report.ok and fast.interactions.height == 4
    array = tmp_path / "log.json"
    array.write_text(json.dumps([json.loads(t) for t in texts]))
    assert_same(*read_both(array, monkeypatch, **options))


@pytest.mark.parametrize(
    "line",
    [
        '{"user_id": 2, "item_id": "b", "user_id": 3}',  # polars keeps the first
        '{"user_id": 2, "item_id": "b", "user_\\u0069d": 3}',  # the same key
        '{"user_id": 2, "item_id": "b", "meta": {"k": 1, "k": 2}}',
    ],
)
def test_a_key_given_twice_is_not_read_as_its_first_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str
) -> None:
    """polars' NDJSON reader keeps the first of two equal keys without a word."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"user_id": 1, "item_id": "a"}\n' + line + "\n")
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert fast.report.rejected == {"bad_json": 1}
    assert [n for n, _ in fast.report.examples["bad_json"]] == [2]
    # A key's name as another key's value, or in a nested object, is no repeat.
    path.write_text(
        '{"user_id": 1, "item_id": "user_id"}\n'
        '{"user_id": 2, "item_id": "b", "meta": {"user_id": 5}}\n'
    )
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert fast.report.ok and fast.interactions.height == 2


@pytest.mark.parametrize(
    "line",
    [
        '{"user_id": 2, "item_id": "\\ud800"}',  # polars reads it as NUL
        '{"user_id": 2, "item_id": "b", "rating": 1e400}',  # not a float
        '{"user_id": 2, "item_id": "b", "n": 1' + "0" * 40 + "}",  # beyond 128 bits
        '{"user_id": 2, "item_id": "b", "tags": ["\\udc00"]}',
    ],
)
def test_values_beyond_a_column_are_bad_json_in_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str
) -> None:
    """A lone surrogate became NUL (and the column's other numbers text), and a
    number beyond 64-bit floats or 128-bit integers failed the file."""
    path = tmp_path / "log.jsonl"
    good = '{"user_id": 1, "item_id": "a", "rating": 4, "n": 1, "tags": ["x"]}'
    path.write_text(good + "\n" + line + "\n" + good.replace('"a"', '"c"') + "\n")
    fast, exact = read_both(path, monkeypatch, item_features=["tags"])
    assert_same(fast, exact)
    assert fast.report.rejected == {"bad_json": 1}
    assert [n for n, _ in fast.report.examples["bad_json"]] == [2]
    assert fast.interactions["item_id"].to_list() == ["a", "c"]
    # A pair of surrogates is one character, and reads in both.
    path.write_text(good.replace('"a"', '"\\ud83d\\ude00"') + "\n")
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert fast.interactions["item_id"].to_list() == ["\U0001f600"]


def test_true_beside_numbers_is_not_the_number_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`"rating": true` among numbers loaded as a rating of 1, without a word."""
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"user_id": 1, "item_id": 2, "rating": 4}\n'
        '{"user_id": 2, "item_id": 3, "rating": true}\n'
        '{"user_id": 3, "item_id": 3, "rating": 5}\n'
    )
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert fast.interactions["rating"].to_list() == [4, 5]
    assert fast.report.rejected == {"bad_rating": 1}
    assert [n for n, _ in fast.report.examples["bad_rating"]] == [2]


def test_a_list_beside_a_number_is_a_counted_row_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list in some rows and a number in another, or a list mixing numbers and
    text, ended in a polars traceback."""
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"user_id": 1, "item_id": 2, "tags": [1, 2]}\n'
        '{"user_id": 2, "item_id": 3, "tags": 7}\n'
        '{"user_id": 3, "item_id": 3, "tags": [1, "x"]}\n'
        '{"user_id": 4, "item_id": 2, "tags": null}\n'
    )
    fast, exact = read_both(path, monkeypatch, item_features=["tags"])
    assert_same(fast, exact)
    assert fast.interactions["user_id"].to_list() == [1, 3, 4]
    assert fast.report.rejected == {"json_type_mismatch": 1}
    assert [n for n, _ in fast.report.examples["json_type_mismatch"]] == [2]
    assert "a list of one" in fast.report.hint
    items = fast.items.sort("item_id")
    assert items["tags"].to_list()[0] in (["1", "2"], None)
    with pytest.raises(BadRowError) as stopped:
        read_interactions(path, item_features=["tags"], strict=True)
    assert (stopped.value.line, stopped.value.reason) == (2, "json_type_mismatch")
    # Without the number, polars reads the mixed list as the exact path does.
    path.write_text(
        '{"user_id": 1, "item_id": 2, "tags": [1, 2]}\n'
        '{"user_id": 3, "item_id": 3, "tags": [1, "x"]}\n'
    )
    fast, exact = read_both(path, monkeypatch, item_features=["tags"])
    assert_same(fast, exact)
    assert fast.items.sort("item_id")["tags"].to_list() == [["1", "2"], ["1", "x"]]


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.text(max_size=6)
    | st.sampled_from(["user_id", "a", '"a": 1', "\\", "None", "1.5"])
)
VALUES = SCALARS | st.lists(SCALARS, max_size=3)
# A nested object (read as columns by path); "a.b" beside "a": {"b": ...} collides.
NESTED = VALUES | st.dictionaries(
    st.sampled_from(["b", "c"]),
    VALUES | st.dictionaries(st.sampled_from(["b", "d"]), VALUES, max_size=2),
    max_size=2,
)


def _flat_keys(row: dict[str, Any], prefix: str = "") -> list[str]:
    """The columns a row's keys give: a nested object's by their paths."""
    keys = []
    for key, value in row.items():
        if isinstance(value, dict):
            keys += _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.sampled_from(["i1", "i2", "i3"]),
            st.dictionaries(
                st.sampled_from(["a", "b", "é", "a.b"]), NESTED, max_size=3
            ),
            st.sampled_from(["", "\n", "  \n", "\r"]),
        ),
        min_size=1,
        max_size=8,
    )
)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_both_paths_agree_on_any_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[Any]
) -> None:
    """Whatever the values, polars' reader and the exact one give the same rows,
    report and error."""
    text = "".join(
        json.dumps({"user_id": user, "item_id": item, **extra}) + after + "\n"
        for user, item, extra, after in rows
    )
    path = tmp_path / "any.jsonl"
    path.write_text(text)
    keys = sorted({key for _, _, extra, _ in rows for key in _flat_keys(extra)})
    assert_same(*read_both(path, monkeypatch, item_features=keys))
    array = tmp_path / "any.json"
    objects = [
        {"user_id": user, "item_id": item, **extra} for user, item, extra, _ in rows
    ]
    array.write_text(json.dumps(objects, indent=1))
    assert_same(*read_both(array, monkeypatch, item_features=keys))


def test_an_array_s_elements_are_read_as_lines_of_json_lines_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON array was decoded whole: one element with a key given twice or a
    NaN failed the file, and every element was written again by json.dumps (2.5
    times the time of the same rows as JSON lines)."""
    elements = [
        '{"user_id": 1, "item_id": "a", "title": "Caf\\u00e9 \\"noir\\""}',
        '{"user_id": 2, "item_id": "b", "user_id": 3}',  # a key given twice
        '{"user_id": 4, "item_id": "c", "rating": NaN}',  # not JSON
        "5",  # not an object
        '{"user_id": null, "item_id": "d"}',
        '{"user_id": 6, "item_id": "e", "n": 1' + "0" * 40 + "}",  # beyond 128 bits
        '{"user_id": 7, "item_id": "f", "title": "x"}',
    ]
    lines = tmp_path / "log.jsonl"
    lines.write_text("\n".join(elements) + "\n")
    array = tmp_path / "log.json"
    array.write_text("[" + ",".join(elements) + "]")
    options = {"item_features": ["title"]}
    as_lines = read_interactions(lines, **options)
    fast, exact = read_both(array, monkeypatch, **options)
    assert_same(fast, exact)
    assert_frame_equal(fast.interactions, as_lines.interactions)
    assert_frame_equal(fast.items, as_lines.items)
    report = fast.report.to_dict()
    assert report == {**as_lines.report.to_dict(), "path": str(array)}
    assert report["rejected"] == {"bad_json": 4, "empty_user_id": 1}
    assert [n for n, _ in fast.report.examples["bad_json"]] == [2, 3, 4, 6]
    assert fast.items.filter(pl.col("item_id") == "a")["title"].item() == 'Café "noir"'
    # Pretty-printed, an element over several lines: the same rows.
    objects = [json.loads(elements[at]) for at in (0, 4, 6)]
    array.write_text(json.dumps(objects, indent=2))
    pretty = read_interactions(array, **options)
    assert_frame_equal(pretty.interactions, as_lines.interactions)
    assert pretty.report.rejected == {"empty_user_id": 1}
    assert [n for n, _ in pretty.report.examples["empty_user_id"]] == [2]
    for content, message in [
        ('[{"user_id": 1, "item_id": 2}] [3]', "text follows the JSON array on line 1"),
        ("[" * 100_000, "nested too deeply"),
        ('[{"user_id": 1, "item_id": 2}\n {"user_id": 2}]', "line 2 column 2"),
    ]:
        array.write_text(content)
        with pytest.raises(TwostageError, match=message):
            read_interactions(array)


@pytest.mark.parametrize(
    "content",
    [
        b'{"user_id": 1, "item_id": 2}\r\n\r\n{"user_id": 2, "item_id": 3}\r\n',
        b'\xef\xbb\xbf{"user_id": 1, "item_id": 2}\n \t\n{"user_id": 2, "item_id": 3}',
        # a lone CR is JSON whitespace inside a line, not a line's end
        b'{"user_id": 1,\r "item_id": 2}\n\n{"user_id": 2, "item_id": 3}\n',
        # U+2028 may stand unescaped in a JSON string; a blank line of U+001C
        '{"user_id": 1, "item_id": "a\u2028b"}\n\x1c\n{"user_id": 2, "item_id": 3}\n'.encode(),
    ],
)
def test_lines_are_numbered_as_the_file_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    """polars splits the lines (without a Python string per line), except where it
    would split otherwise than at "\\n"; either way the second row is on line 3."""
    path = tmp_path / "log.jsonl"
    path.write_bytes(content)
    fast, exact = read_both(path, monkeypatch, strict=True)
    assert_same(fast, exact)
    assert fast.report.ok and fast.interactions.height == 2
    path.write_bytes(content.replace(b'"user_id": 2', b'"user_id": 2, "user_id": 2'))
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert [n for n, _ in fast.report.examples["bad_json"]] == [3]


def test_a_nested_object_s_keys_are_columns_by_their_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalogue's nested attributes (Amazon's `details`, Yelp's `attributes`)
    were one struct value, not usable as features: each key inside is now a
    column named by its path, at any depth, in both paths alike."""
    lines = [
        '{"user_id": 1, "item_id": "a", "details": {"Brand": "x", "size": {"w": 2}}}',
        '{"user_id": 2, "item_id": "b", "details": null}',
        '{"user_id": 3, "item_id": "c", "details": {"weight": 1.5, "Brand": "y"}}',
        '{"user_id": 4, "item_id": "d", "details": {}}',
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    wanted = ["details.Brand", "details.size.w", "details.weight"]
    fast, exact = read_both(path, monkeypatch, item_features=wanted)
    assert_same(fast, exact)
    assert fast.report.ok
    items = fast.items.sort("item_id")
    assert items.columns == ["item_id", *wanted]
    assert items["details.Brand"].to_list() == ["x", None, "y", None]
    assert items["details.size.w"].to_list() == [2, None, None, None]
    # The same objects in an array; a line whose object is a number where the
    # others hold an object is rejected when one of its keys is read.
    array = tmp_path / "log.json"
    array.write_text(
        "[" + ",".join([*lines, '{"user_id": 5, "item_id": "e", "details": 7}']) + "]"
    )
    fast, exact = read_both(array, monkeypatch, item_features=["details.Brand"])
    assert_same(fast, exact)
    assert fast.report.rejected == {"json_type_mismatch": 1}
    assert [n for n, _ in fast.report.examples["json_type_mismatch"]] == [5]
    # Two keys that would be one column: a clear error in both paths.
    path.write_text(
        '{"user_id": 1, "item_id": "a", "m.k": 1, "m": {"k": 2}}\n'
        '{"user_id": 2, "item_id": "b", "m.k": 3, "m": {"k": 4}}\n'
    )
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert "the key 'm.k' and the key 'k' inside 'm'" in str(fast)


def test_nested_keys_train_as_features_from_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from twostage.cli import app

    path = tmp_path / "log.jsonl"
    rows = [
        {
            "user_id": user,
            "item_id": item,
            "details": {"Brand": f"b{item % 4}", "dims": {"h": item % 5}},
        }
        for user in range(30)
        for item in range(user % 7, 40, 3)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    runner = CliRunner()
    described = runner.invoke(
        app,
        [
            "data",
            "describe",
            str(path),
            "--item-features",
            "details.Brand,details.dims.h",
        ],
    )
    assert described.exit_code == 0, described.output
    said = " ".join(described.stdout.split())
    assert "details.Brand (categorical)" in said and "details.dims.h" in said
    trained = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", str(path)),
            *("--item-features", "details.Brand,details.dims.h"),
            *("--out", str(tmp_path / "run"), "--set", "train.epochs=1"),
        ],
    )
    assert trained.exit_code == 0, trained.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["item_features"] == ["details.Brand", "details.dims.h"]


@pytest.mark.parametrize("container", ["lines", "array"])
def test_a_line_nesting_objects_too_deep_is_rejected_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container: str
) -> None:
    """polars' reader overflows its stack on a few hundred nested objects, and the
    process died (SIGSEGV) reading such a line: it is now `json_too_deep`."""

    def nested(depth: int, user: int) -> str:
        inner = '{"a": ' * depth + "1" + "}" * depth
        return f'{{"user_id": {user}, "item_id": 2, "m": {inner}}}'

    texts = [
        '{"user_id": 1, "item_id": 2}',
        nested(_table_json.MAX_DEPTH - 1, 2),  # 64 objects deep with the line's own
        nested(700, 3),  # polars' reader died here
        '{"user_id": 4, "item_id": 2, "m": [' + "[" * 700 + "]" * 700 + "]}",
        nested(_table_json.MAX_DEPTH, 5),
        '{"user_id": 6, "item_id": 2, "t": "' + "{" * 100 + '"}',  # text, not objects
    ]
    path = tmp_path / ("log.jsonl" if container == "lines" else "log.json")
    body = "\n".join(texts) if container == "lines" else "[" + ",\n".join(texts) + "]"
    path.write_text(body + "\n")
    fast, exact = read_both(path, monkeypatch)
    assert_same(fast, exact)
    assert fast.report.rejected == {"json_too_deep": 2}
    assert [n for n, _ in fast.report.examples["json_too_deep"]] == [3, 5]
    assert "more than 64 deep" in fast.report.hint
    assert fast.interactions["user_id"].to_list() == [1, 2, 4, 6]
    with pytest.raises(BadRowError) as stopped:
        read_interactions(path, strict=True)
    assert (stopped.value.line, stopped.value.reason) == (3, "json_too_deep")
