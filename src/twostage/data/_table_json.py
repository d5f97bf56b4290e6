"""Reading JSON logs: JSON lines (one object per line; ``.jsonl``, ``.ndjson``) and
JSON arrays of objects (``[{...}, {...}]``).

Each line is parsed with the standard library's :mod:`json`, so that a line that is
not one JSON object (malformed, cut short, an array or a number, a ``NaN`` that JSON
does not have, a key given twice whose values would have to be picked from) is
rejected and counted on its own line as ``bad_json``, and the other lines load.
polars' NDJSON reader stops at the first malformed line and keeps the first of two
equal keys without a word, so it is not used here. The good objects become a polars
frame a chunk at a time and are checked as every other table is
(:func:`twostage.data._table_values.load_frame`), with their physical line numbers.

Measured on the 2-core VM (``benchmarks/data_load.py --rows 1000000``): 4.5 s for a
million lines of four fields, against 0.17 s for the same log as CSV (almost all of
it in :mod:`json`); a log of tens of millions of rows is better written to Parquet
once (``pl.scan_ndjson``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from twostage.data._table_values import LINE, Options, Spec, load_frame, missing_as_null
from twostage.data.report import LoadReport
from twostage.errors import BadRowError, DataError

__all__ = ["JSON_SUFFIXES", "load_json"]

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")

#: Objects turned into a frame at once: memory holds one chunk of Python dicts.
CHUNK = 100_000


class _Unreadable(ValueError):
    """A line that is valid JSON but not one row: a key given twice, NaN."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Unreadable(f"the key {key!r} is given twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Unreadable(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # RFC 8259: JSON text is UTF-8
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: JSON should be UTF-8, but line {line} holds the byte "
            f"{data[e.start : e.start + 1]!r}; re-encode the file as UTF-8."
        ) from e


def _records(text: str, path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of each record: a JSON array's elements, numbered by
    position (1-based), or a JSON lines file's non-blank lines."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text, object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, _Unreadable) as e:
            raise DataError(
                f"{path}: not a readable JSON array of objects: {e}. A log of one "
                "object per line (JSON lines) is read line by line, with bad lines "
                "counted rather than failing the file."
            ) from e
        if not isinstance(items, list):
            raise DataError(f"{path}: a JSON log should be an array of objects.")
        return [(n, json.dumps(item)) for n, item in enumerate(items, 1)]
    # JSON lines are separated by "\n" (with "\r\n" allowed); str.splitlines would
    # also cut at U+2028, which JSON strings may hold unescaped.
    return [
        (n, line.removesuffix("\r"))
        for n, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]


def load_json(
    path: Path, make_spec: Callable[[list[str]], Spec], opts: Options
) -> tuple[pl.DataFrame, LoadReport, Spec, Callable[[pl.DataFrame], list[str]]]:
    """Read and check a JSON lines file or a JSON array of objects; a row's "line"
    is its physical line (an array's: its element's 1-based position).

    Returns:
        The good rows (parsed, with ``__line``), the report, the resolved spec, and a
        function describing rows for messages.

    Raises:
        DataError: the file is not UTF-8, or a JSON array that does not parse.
        BadRowError: with ``opts.strict``, at the first line that is not one object.
    """
    label = str(path)
    records = _records(_decode(path), path)
    report = LoadReport(path=label, rows_read=len(records))
    frames, lines = [], []
    for start in range(0, len(records), CHUNK):
        objects, numbers = [], []
        for number, line in records[start : start + CHUNK]:
            try:
                value = _DECODER.decode(line)
                if not isinstance(value, dict):
                    raise _Unreadable(f"a JSON {type(value).__name__}, not an object")
            except (json.JSONDecodeError, _Unreadable, RecursionError) as e:
                if opts.strict:
                    raise BadRowError(label, number, "bad_json", line[:200]) from e
                report.add("bad_json", number, line)
                continue
            objects.append(value)
            numbers.append(number)
        if objects:
            frames.append(pl.from_dicts(objects, infer_schema_length=None))
            lines.extend(numbers)
    if not frames:
        raise DataError(
            f"{path}: no JSON object to read"
            + (f" ({report.summary()})" if report.num_rejected else " (empty file).")
        )
    raw = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    spec = make_spec(list(raw.columns))  # the keys the objects hold between them
    parsed, checked, spec, describe = load_frame(
        raw.select(spec.sources), label, spec, opts, lines=pl.Series(LINE, lines)
    )
    parsed = missing_as_null(parsed, spec)  # price: 19.99 or "None"
    checked.rows_read = report.rows_read
    for reason, count in report.rejected.items():
        checked.add_many(reason, count, report.examples[reason])
    return parsed, checked, spec, describe
