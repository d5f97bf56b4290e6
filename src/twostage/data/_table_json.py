"""Reading JSON logs: JSON lines (one object per line; ``.jsonl``, ``.ndjson``) and
JSON arrays of objects (``[{...}, {...}]``).

A line that is not one JSON object (malformed, cut short, an array or a number, a
``NaN`` that JSON does not have, a key given twice whose values would have to be
picked from, a number beyond a 64-bit float or a 128-bit integer, a lone surrogate)
is rejected and counted on its own line as ``bad_json``, and the other lines load.
A key read as a column whose values are of kinds that cannot share one (a list in
some rows and a number in others, an object and a string) keeps its most common
kind, and the rows holding another are rejected as ``json_type_mismatch``; ``true``
beside numbers makes the column text (``"true"``), which the column's checks then
judge (a rating ``"true"`` is ``bad_rating``), rather than the number 1.
A nested object's keys become columns of their own, named by their path
(``"details": {"brand": "x"}`` is the column ``details.brand``, at any depth;
the keys inside an object in alphabetical order), so that a catalogue's nested
attributes can be features; a list of objects stays one value (not a feature).

polars' NDJSON reader reads the file at once when every line is good (the fast
path). It keeps the first of two equal keys without a word, reads a lone surrogate
as NUL, writes a list beside text as text (``"[1]"``) and fails the whole file at
one bad line, so the lines where any of that may happen are checked with the
standard library's :mod:`json` first, and any doubt sends the file to the exact
path. That one finds the bad lines (polars parses the lines a block at a time,
:mod:`json` each line of a block polars cannot) and reads the good ones with polars
the same way; only where polars cannot type them as they are are the keys' kinds
reconciled line by line. Both give the same frame (a property test checks it), then
checked as every other table is (:func:`twostage.data._table_values.load_frame`),
with its physical line numbers.

Measured on the 2-core VM (``benchmarks/data_load.py --rows 1000000``, medians of
3): a million good lines of four fields in 0.95 s, 1.60 s with one malformed line
(2.44 s and 2.43 s when :mod:`json` read every line); docs/guide.md has the rest.
polars also splits the lines, so that no Python string is made per line: 0.35 GiB
at peak for that file, 0.40 GiB with ``str.split``.
"""

from __future__ import annotations

import codecs
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from twostage.data._table_values import LINE, Options, Spec, load_frame, missing_as_null
from twostage.data.report import LoadReport
from twostage.errors import BadRowError, DataError

__all__ = ["JSON_SUFFIXES", "load_json"]

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")

#: Lines polars parses in one batch.
CHUNK = 100_000
#: Lines polars tries at once to find the lines of a file it cannot read.
BLOCK = 20_000


class _Unreadable(ValueError):
    """A line that is valid JSON but not one row: a key given twice, NaN, a
    number beyond what a column holds, a lone surrogate."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Unreadable(f"the key {key!r} is given twice")
        _whole_text(key, value)
        out[key] = value
    return out


def _whole_text(*texts: Any) -> None:
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # "\ud800" alone: no character
                raise _Unreadable("a lone surrogate is no character") from e
        elif isinstance(text, list):
            _whole_text(*text)


def _no_constant(name: str) -> Any:
    raise _Unreadable(f"{name} is not a JSON value")


def _int(text: str) -> int:
    value = int(text)
    if not -(2**127) <= value < 2**127:  # what polars reads, in 128 bits
        raise _Unreadable(f"the integer {text[:20]}... is beyond 128 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Unreadable(f"the number {text[:20]} is beyond a 64-bit float")
    return value


#: Every check: a key given twice, NaN, numbers beyond polars' columns, lone
#: surrogates (which polars reads as NUL without a word).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys,
    parse_constant=_no_constant,
    parse_int=_int,
    parse_float=_float,
)
#: Twice as fast, for the lines that cannot hold what only the hooks tell.
_PLAIN = json.JSONDecoder(parse_constant=_no_constant)

#: Numbers that may be beyond polars' columns: 39 digits in a row (2**127 has
#: 39), an exponent of 100 or more.
_LONG_NUMBER = r"[0-9]{39}|[eE]\+?[0-9]{3}"
#: An escape inside a key: from a backslash to the end of a string followed by
#: a colon. (A run from a value's backslash stops at the value's closing quote,
#: which no colon follows; an escaped backslash, which could shift the run, is
#: decoded anyway.)
_ESCAPED_KEY = r'\\(?:[^"\\]|\\.)*"\s*:'
#: A surrogate pair written as two escapes (one character), and a surrogate
#: escape: one left once the pairs are gone stands alone.
_PAIR = r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_SURROGATE = r"\\u[dD][89a-fA-F]"
#: One JSON string, and the colon after it when it is a key. Every string of a
#: valid line is matched in turn (no quote stands between strings), so a key is
#: never taken for a value's text.
_STRING = r'"(?:[^"\\]|\\.)*"\s*:?'


def _text(data: bytes, path: Path) -> str:
    """``data`` as text, or a DataError naming the line that is not UTF-8."""
    try:
        return data.decode("utf-8")  # RFC 8259: JSON text is UTF-8
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: JSON should be UTF-8, but line {line} holds the byte "
            f"{data[e.start : e.start + 1]!r}; re-encode the file as UTF-8."
        ) from e


#: What Python's ``str.strip`` strips (``str.isspace``): a line of only these is
#: blank. Rust's ``trim`` keeps U+001C to U+001F.
_SPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
    "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _is_array(data: bytes) -> bool:
    """Whether the JSON text opens an array (``[{...}, ...]``), not lines."""
    first = re.match(rb"[ \t\r\n]*", data)
    start = 0 if first is None else first.end()
    return data[start : start + 1] == b"["


#: JSON's whitespace (RFC 8259), which Python's ``json`` skips between values.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, at: int) -> int:
    """Where the JSON whitespace at ``at`` in ``text`` ends."""
    return at + len(_JSON_SPACE.match(text, at)[0])  # type: ignore[index]


def _elements(text: str, path: Path) -> list[str]:
    """The source text of each element of the JSON array ``text``, each checked
    to be one JSON value, as a line of JSON lines is: a bad element is then
    rejected as a bad line is, where a key given twice or a NaN failed the
    whole array. ``json`` decodes each element only to find where it ends; no
    element is re-encoded, so every one keeps its own escapes and numbers.

    Raises:
        DataError: the text is no JSON array (a syntax error, text after it).
    """
    decode = json.JSONDecoder().raw_decode
    at = _skip_space(text, text.index("[") + 1)
    found: list[str] = []
    done = text.startswith("]", at)
    try:
        while not done:
            _, end = decode(text, at)
            found.append(text[at:end])
            at = _skip_space(text, end)
            done = text.startswith("]", at)
            if not done:
                if not text.startswith(",", at):
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
                at = _skip_space(text, at + 1)
    except (json.JSONDecodeError, RecursionError) as e:
        why = e if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise DataError(
            f"{path}: not a readable JSON array of objects: {why} (after "
            f"{len(found):,} elements). A log of one object per line (JSON lines) "
            "is read line by line, with bad lines counted rather than failing the "
            "file."
        ) from e
    rest = _skip_space(text, at + 1)
    if rest != len(text):
        line = text.count("\n", 0, rest) + 1
        raise DataError(
            f"{path}: text follows the JSON array on line {line}: "
            f"{text[rest : rest + 40]!r}; a log should be one array of objects."
        )
    return found


def _records(data: bytes, path: Path) -> tuple[pl.Series, pl.Series]:
    """The line number and text of each record: a JSON array's elements, numbered
    by position (1-based), or a JSON lines file's non-blank lines."""
    if _is_array(data):
        found = _elements(_text(data, path), path)
        # An element's line breaks are whitespace (a JSON string holds none), so
        # each element becomes one line of JSON lines.
        texts = pl.Series("t", found, dtype=pl.String).str.replace_all("[\r\n]", " ")
        return pl.Series(LINE, range(1, len(found) + 1), dtype=pl.Int64), texts
    lines = _split_lines(data)
    if lines is None:
        # JSON lines are separated by "\n" (with "\r\n" allowed); str.splitlines
        # would also cut at U+2028, which JSON strings may hold unescaped.
        lines = pl.DataFrame(
            {"t": pl.Series(_text(data, path).split("\n"), dtype=pl.String)}
        ).with_row_index(LINE, offset=1)
        lines = lines.with_columns(pl.col("t").str.strip_suffix("\r"))
    lines = lines.filter(pl.col("t").str.strip_chars(_SPACE) != "").select(
        pl.col(LINE).cast(pl.Int64), "t"
    )
    return lines[LINE], lines["t"]


def _split_lines(data: bytes) -> pl.DataFrame | None:
    """Every line of ``data`` (``"\r\n"`` ending one too; an empty line null)
    with its 1-based number, split by polars without a Python string per line
    (half the memory); None where it would split otherwise than at "\n": a
    ``"\r"`` that ends no line, a unit separator (the field polars splits at),
    or bytes that are not UTF-8 (the caller names their line)."""
    if b"\x1f" in data or data.count(b"\r") != data.count(b"\r\n"):
        return None
    try:
        lines = pl.read_csv(
            io.BytesIO(data),
            has_header=False,
            separator="\x1f",  # no valid JSON line holds one
            quote_char=None,
            schema={"t": pl.String},
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError:
        return None
    return lines.with_row_index(LINE, offset=1).with_columns(pl.col("t").fill_null(""))


def _checked(texts: pl.Series, keys: Iterable[str]) -> list[tuple[int, str]]:
    """The index and text of each line that :mod:`json` with every check
    (:data:`_DECODER`) rejects, of those that polars may read otherwise: a key
    given twice at any depth (polars reads the first value without a word), a
    number or a lone surrogate beyond what polars reads.

    The lines are sifted together, and only those left are decoded one by one.
    A line holding each of ``keys`` (the top-level ones) quoted at most once and
    no object inside cannot repeat a key; one whose keys repeat is told by
    listing them (at any depth). Escapes are mostly in values (``\\u00e9``,
    ``\\"``, emoji as surrogate pairs: Python's ``json.dumps`` writes them so),
    which polars reads as :mod:`json` does; a key written with one, a surrogate
    escape outside a pair, or an escaped backslash (which could make what follows
    look like an escape) sends the line to :mod:`json`. So does a long number.
    """
    text = pl.col("t")
    named_twice = [
        text.str.count_matches(json.dumps(k), literal=True) > 1 for k in keys
    ]
    named_twice += [  # json.dumps escapes a key's non-ASCII letters; a file may not
        text.str.count_matches(json.dumps(k, ensure_ascii=False), literal=True) > 1
        for k in keys
        if not k.isascii()
    ]
    escaped = text.str.contains("\\", literal=True)
    flags = pl.DataFrame({"t": texts}).select(
        pl.any_horizontal(
            *named_twice, text.str.count_matches("{", literal=True) > 1
        ).alias("repeat"),
        (
            escaped
            & (
                text.str.contains(_ESCAPED_KEY)
                | (
                    text.str.count_matches(_SURROGATE)
                    != 2 * text.str.count_matches(_PAIR)
                )
                | text.str.contains("\\\\", literal=True)
            )
        ).alias("escape"),
        text.str.contains(_LONG_NUMBER).alias("long"),
    )
    repeat = flags["repeat"].arg_true()
    if len(repeat):  # their keys listed: a name twice, or with an escape
        found = texts.gather(repeat).str.extract_all(_STRING)
        found = found.list.eval(
            pl.element()
            .filter(pl.element().str.ends_with(":"))
            .str.replace(r"\s*:$", "")
        )
        twice = (found.list.n_unique() < found.list.len()).fill_null(True)
        repeat = repeat.filter(twice)
    left = set(repeat.to_list())
    left |= set(flags["escape"].arg_true().to_list())
    left |= set(flags["long"].arg_true().to_list())
    rejected = []
    for n in sorted(left):
        line = texts[n]
        try:
            _DECODER.decode(line)
        except (json.JSONDecodeError, _Unreadable, RecursionError):
            rejected.append((n, line))
    return rejected


class _Object:
    """Where a flattened row had a nested object: the kind of its key."""

    __slots__ = ()


_OBJECT = _Object()


def _flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``row`` with each nested object's values under their paths
    (``details.brand``, at any depth), and each such object's own key as
    :data:`_OBJECT`, so that its kind is checked as a value's is."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out[prefix + key] = _OBJECT
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _collided(names: list[str], label: str) -> None:
    """A DataError where two keys would be one column: ``"a.b"`` and ``"b"``
    inside ``"a"``."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"{label}: the key {name!r} and the key {name.rsplit('.', 1)[-1]!r} "
                f"inside {name.rsplit('.', 1)[0]!r} would both be the column "
                f"{name!r}; rename one of them."
            )
        seen.add(name)


def _flattened(raw: pl.DataFrame, label: str) -> pl.DataFrame:
    """``raw`` with each struct column (a nested object) replaced by its fields,
    named by their paths and in alphabetical order within it, at any depth."""
    while structs := [c for c, t in raw.schema.items() if isinstance(t, pl.Struct)]:
        columns: list[pl.Expr] = []
        names: list[str] = []
        for name, dtype in raw.schema.items():
            if name not in structs:
                columns.append(pl.col(name))
                names.append(name)
                continue
            fields = sorted(f.name for f in dtype.fields)  # type: ignore[attr-defined]
            columns += [
                pl.col(name).struct.field(f).alias(f"{name}.{f}") for f in fields
            ]
            names += [f"{name}.{f}" for f in fields]
        _collided(names, label)
        raw = raw.select(columns)
    return raw


def _leaf_names(rows: Iterable[dict[str, Any]], label: str) -> list[str]:
    """The columns of ``rows`` once flattened (:func:`_flattened`'s names and
    order): their keys in the order first seen, the keys inside an object in
    alphabetical order; a key null wherever it is not an object is no column."""
    tree: dict[str, Any] = {}  # key -> {"leaf": non-null seen, "null", "inner": tree}

    def merge(node: dict[str, Any], row: dict[str, Any]) -> None:
        for key, value in row.items():
            entry = node.setdefault(key, {"leaf": False, "null": False, "inner": None})
            if isinstance(value, dict):
                entry["inner"] = entry["inner"] or {}
                merge(entry["inner"], value)
            elif value is None:
                entry["null"] = True
            else:
                entry["leaf"] = True

    def names(node: dict[str, Any], prefix: str, order: Iterable[str]) -> list[str]:
        out: list[str] = []
        for key in order:
            entry = node[key]
            if entry["leaf"] or (entry["null"] and entry["inner"] is None):
                out.append(prefix + key)
            if entry["inner"] is not None:
                inner = entry["inner"]
                out += names(inner, f"{prefix}{key}.", sorted(inner))
        return out

    for row in rows:
        merge(tree, row)
    found = names(tree, "", list(tree))
    _collided(found, label)
    return found


def _read_fast(
    texts: pl.Series, data: bytes | None = None, label: str = ""
) -> pl.DataFrame | None:
    """Every line read at once by polars and flattened (:func:`_flattened`), or
    None where a line needs the exact path: one that polars cannot read, a key
    that may be given twice, or values of kinds polars would have to choose
    between. ``data`` is the file the lines are from, where it is JSON lines:
    polars skips its blank lines itself."""
    raw = _read_polars(texts, data, label=label)
    if raw is None or _checked(texts, raw.columns):
        return None
    return _flattened(raw, label)


def _joined(texts: pl.Series) -> io.BytesIO:
    """The lines as one JSON lines text, written by polars: no Python string of
    the whole (and no second copy as bytes)."""
    out = io.BytesIO()
    texts.rename("t").to_frame().write_csv(
        out, include_header=False, quote_style="never", line_terminator="\n"
    )
    out.seek(0)
    return out


def _read_polars(
    texts: pl.Series, data: bytes | None = None, *, plain: bool = False, label: str = ""
) -> pl.DataFrame | None:
    """The lines read by polars, or None where it cannot read them or would
    have had to choose between kinds: polars writes a list or an object beside
    text as its JSON text (``"[1]"``), in a column or in a list, so a text that
    starts so sends the lines to the exact path, which tells them apart. Every
    line must be read (polars skips blank ones). ``plain``: only whether polars
    reads the lines as JSON objects."""
    try:
        raw = pl.read_ndjson(
            _joined(texts) if data is None else data,
            # a column no key names: each line parsed, no value kept or typed
            schema={"\x00": pl.String} if plain else None,
            infer_schema_length=None,
            batch_size=CHUNK,
        )
    except (
        pl.exceptions.PolarsError,
        pl.exceptions.PanicException,  # a BaseException: polars gave up in Rust
        OverflowError,
        ValueError,
    ):
        return None
    if raw.height != len(texts):
        return None
    if plain:
        return raw

    def opens(text: pl.Expr) -> pl.Expr:
        return text.str.starts_with("[") | text.str.starts_with("{")

    flat = _flattened(raw, label)  # a nested object's values too
    looks = [
        opens(pl.col(name)) for name, dtype in flat.schema.items() if dtype == pl.String
    ] + [
        pl.col(name).list.eval(opens(pl.element())).list.any()
        for name, dtype in flat.schema.items()
        if dtype == pl.List(pl.String)
    ]
    if looks and flat.select(pl.any_horizontal(looks).fill_null(False).any()).item():
        return None
    return raw


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list" if isinstance(value, list) else "object"


@dataclass
class _Kinds:
    """How many values of each kind each key holds over the whole file, and how
    many elements of each kind its lists hold."""

    values: dict[str, Counter[str]] = field(default_factory=dict)
    elements: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            kind = _kind(value)
            if kind is None:
                continue
            self.values.setdefault(key, Counter())[kind] += 1
            if kind == "list":
                inner = self.elements.setdefault(key, Counter())
                inner.update(k for k in map(_kind, value) if k is not None)

    @staticmethod
    def _kept(counts: dict[str, Counter[str]]) -> dict[str, str]:
        return {
            key: kinds.most_common(1)[0][0]
            for key, kinds in counts.items()
            if len(kinds) > 1 and {"list", "object"} & kinds.keys()
        }

    def kept(self) -> tuple[dict[str, str], dict[str, str]]:
        """For each key mixing a list or an object with another kind, the kind
        kept: the most common (of equal counts, the first seen); and the same for
        the elements of each key's lists."""
        return self._kept(self.values), self._kept(self.elements)

    def as_text(self) -> tuple[set[str], set[str]]:
        """The keys holding booleans beside numbers, whose booleans become the
        text ``"true"`` / ``"false"`` (and so the column text, as polars makes
        a column of numbers and text) rather than the numbers 1 and 0; and the
        keys whose lists hold such elements."""
        values, elements = (
            {
                key
                for key, kinds in counts.items()
                if {"boolean", "number"} <= kinds.keys()
            }
            for counts in (self.values, self.elements)
        )
        return values, elements


def _mismatched(
    row: dict[str, Any], kept: dict[str, str], kept_inside: dict[str, str]
) -> bool:
    """Whether a value of ``row``, or an element of one of its lists, is of
    another kind than its key keeps."""
    if any(_kind(row.get(key)) not in (None, kind) for key, kind in kept.items()):
        return True
    return any(
        _kind(element) not in (None, kind)
        for key, kind in kept_inside.items()
        if isinstance(row.get(key), list)
        for element in row[key]
    )


#: Objects within objects a line may nest: polars' reader overflows its stack
#: (the process dies) on a few hundred, and no log nests anywhere near this.
MAX_DEPTH = 64


def _object_depth(value: Any) -> int:
    """How deep ``value`` nests objects (through lists too); a loop, not
    recursion."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            depth += 1
            deepest = max(deepest, depth)
            pending += [(inner, depth) for inner in item.values()]
        elif isinstance(item, list):
            pending += [(inner, depth) for inner in item]
    return deepest


def _too_deep(texts: pl.Series) -> list[int]:
    """The indices of the lines that nest objects deeper than :data:`MAX_DEPTH`
    (or deeper than :mod:`json` reads): only lines with that many ``{`` are
    decoded to tell."""
    maybe = texts.str.count_matches("{", literal=True).fill_null(0) > MAX_DEPTH
    found = []
    for at in maybe.arg_true().to_list():
        try:
            value = _PLAIN.decode(texts[at])
        except RecursionError:
            found.append(at)
            continue
        except ValueError:  # not JSON: rejected as such where it is read
            continue
        if _object_depth(value) > MAX_DEPTH:
            found.append(at)
    return found


def _read_exact(
    numbers: pl.Series,
    lines: pl.Series,
    label: str,
    opts: Options,
    report: LoadReport,
    make_spec: Callable[[list[str]], Spec],
    deep: Iterable[int] = (),
) -> tuple[pl.DataFrame, pl.Series, Spec] | None:
    """The lines checked one by one, then the good ones read by polars as the
    fast path reads a file (so both paths type the values alike); None when no
    line holds an object.

    polars parses the lines a block at a time, and :mod:`json` parses each line
    of a block that polars cannot, to find the bad lines. Then the good lines
    are read at once, and those that polars may read otherwise than :mod:`json`
    checks are checked (:func:`_checked`). Where polars cannot read the good
    lines as they are, :func:`_reconciled` reads them with each key's kind
    reconciled. With ``opts.strict``, the first bad line stops the read. The
    lines ``deep`` (:func:`_too_deep`) are bad before polars sees them.
    """
    bad: list[tuple[int, str, str]] = []  # (line, reason, text), in line order
    ok = np.ones(len(lines), dtype=bool)  # the lines still good
    for at in deep:
        bad.append((numbers[at], "json_too_deep", lines[at]))
        ok[at] = False
    kept = lines.filter(pl.Series(ok)) if len(bad) else lines
    where_kept = np.flatnonzero(ok)
    for start in range(0, len(kept), BLOCK):
        block = kept.slice(start, BLOCK)
        if _read_polars(block, plain=True) is not None:
            continue
        for n, line in enumerate(block.to_list()):
            try:
                value = _PLAIN.decode(line)
                if not isinstance(value, dict):
                    raise _Unreadable(f"a JSON {type(value).__name__}, not an object")
            except (json.JSONDecodeError, _Unreadable, RecursionError):
                at = int(where_kept[start + n])
                bad.append((numbers[at], "bad_json", line))
                ok[at] = False

    def good() -> pl.Series:
        return lines.filter(pl.Series(ok))

    def drop_doubtful(keys: Iterable[str]) -> bool:
        """Reject the good lines :mod:`json` rejects of those polars may read
        otherwise; whether there were any."""
        where = np.flatnonzero(ok)
        found = _checked(good(), keys)
        for n, line in found:
            bad.append((numbers[int(where[n])], "bad_json", line))
            ok[where[n]] = False
        return bool(found)

    raw = _read_polars(good(), label=label) if ok.any() else None
    if raw is not None and drop_doubtful(raw.columns):
        raw = _read_polars(good(), label=label) if ok.any() else None
    if raw is not None:
        raw = _flattened(raw, label)
        spec = make_spec(list(raw.columns))
    elif ok.any():  # every key's kinds, and the lines that hold another
        keys: dict[str, None] = {}
        for line in good().to_list():
            keys.update(dict.fromkeys(_PLAIN.decode(line)))
        drop_doubtful(keys)
        if ok.any():
            rows = (_PLAIN.decode(line) for line in good().to_list())
            # the keys the objects hold between them, nested ones by their paths
            spec = make_spec(_leaf_names(rows, label))
            raw = _reconciled(numbers, lines, ok, set(spec.sources), bad, label)
    _count(bad, label, opts, report)
    if raw is None:
        return None
    gone = [k for k in spec.sources if k not in raw.columns]  # every value rejected
    raw = raw.with_columns(pl.lit(None).alias(k) for k in gone)
    return raw, numbers.filter(pl.Series(ok)), spec


def _dots(name: str) -> list[int]:
    return [at for at, char in enumerate(name) if char == "."]


def _reconciled(
    numbers: pl.Series,
    lines: pl.Series,
    ok: np.ndarray,
    read: set[str],
    bad: list[tuple[int, str, str]],
    label: str,
) -> pl.DataFrame | None:
    """The good lines (``ok``) that keep their keys' kinds, read by polars with
    only the keys ``read``; the others added to ``bad`` and ``ok`` cleared."""
    where = np.flatnonzero(ok)
    texts = lines.gather(where).to_list()
    kinds = _Kinds()
    for line in texts:
        kinds.add(_flat(_PLAIN.decode(line)))
    (kept, kept_inside), (as_text, inside_as_text) = kinds.kept(), kinds.as_text()
    # An object holding a key read is checked as that key is.
    checked = read | {name[:at] for name in read for at in _dots(name)}
    kept = {k: v for k, v in kept.items() if k in checked}
    kept_inside = {k: v for k, v in kept_inside.items() if k in read}
    out = []
    for i, line in zip(where, texts, strict=True):
        row = _flat(_PLAIN.decode(line))
        if _mismatched(row, kept, kept_inside):
            bad.append((numbers[int(i)], "json_type_mismatch", line))
            ok[i] = False
            continue
        row = {k: v for k, v in row.items() if k in read and v is not _OBJECT}
        for key in as_text & row.keys():
            if isinstance(row[key], bool):
                row[key] = "true" if row[key] else "false"
        for key in inside_as_text & row.keys():
            if isinstance(row[key], list):
                row[key] = [
                    ("true" if v else "false") if isinstance(v, bool) else v
                    for v in row[key]
                ]
        out.append(json.dumps(row))
    if not out:
        return None
    try:
        return pl.read_ndjson(
            "\n".join(out).encode(), infer_schema_length=None, batch_size=CHUNK
        )
    except pl.exceptions.PolarsError as err:  # e.g. lists of objects of lists
        raise DataError(
            f"{label}: the JSON objects could not be read as one table: {err}"
        ) from err


def _count(
    bad: list[tuple[int, str, str]], label: str, opts: Options, report: LoadReport
) -> None:
    """Count the rejected lines in line order, or stop at the first (strict)."""
    bad.sort()
    if bad and opts.strict:
        number, reason, line = bad[0]
        raise BadRowError(label, number, reason, line[:200])
    for number, reason, line in bad:
        report.add(reason, number, line)


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
        BadRowError: with ``opts.strict``, at the first line that is not one object
            or holds a value of another kind than the key's (``json_type_mismatch``).
    """
    return _load(path, make_spec, opts, fast=True)


def _load(
    path: Path, make_spec: Callable[[list[str]], Spec], opts: Options, *, fast: bool
) -> tuple[pl.DataFrame, LoadReport, Spec, Callable[[pl.DataFrame], list[str]]]:
    """:func:`load_json`, with the fast path allowed or not (``fast``)."""
    label = str(path)
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    numbers, texts = _records(data, path)
    whole = None if _is_array(data) else data  # JSON lines: polars reads the file
    del data
    report = LoadReport(path=label, rows_read=len(texts))
    deep = _too_deep(texts)  # polars' reader would overflow its stack on them
    quick = (
        _read_fast(texts, whole, label) if fast and len(texts) and not deep else None
    )
    del whole
    if quick is not None:
        raw, lines = quick, numbers
        spec = make_spec(list(raw.columns))  # the keys the objects hold between them
    else:
        found = _read_exact(numbers, texts, label, opts, report, make_spec, deep)
        if found is None:
            raise DataError(
                f"{path}: no JSON object to read"
                + (
                    f" ({report.summary()})"
                    if report.num_rejected
                    else " (empty file)."
                )
            )
        raw, lines, spec = found
    parsed, checked, spec, describe = load_frame(
        raw.select(spec.sources), label, spec, opts, lines=lines
    )
    parsed = missing_as_null(parsed, spec)  # price: 19.99 or "None"
    checked.rows_read = report.rows_read
    for reason, count in report.rejected.items():
        checked.add_many(reason, count, report.examples[reason])
    return parsed, checked, spec, describe
