"""Reading interaction logs and feature tables from delimited text, JSON or Parquet.

Text files (CSV, TSV, MovieLens ``.dat`` with ``::``, ...) are read in two ways that
give the same answer:

* **Fast path.** polars parses the whole file, then vectorised checks look for
  anything wrong: empty IDs, unparseable values, short rows (a null in the last
  column), blank lines (rows of nulls), duplicates to drop; too-long rows and bad
  quoting make polars raise. ID and time columns whose first records hold canonical
  integers are parsed straight to Int64 and accepted when the file size equals the
  length of the parsed text, which proves that no value was written "007" or "+7"
  (such IDs stay strings). Otherwise IDs are parsed as strings and converted when
  every one is a canonical integer.
* **Exact path.** Only when the fast path finds or suspects a problem: the decoded
  text is cut into physical lines (LF, CRLF or CR, as with ``newline=""``), tokenised
  with the :mod:`csv` module while counting physical lines through quoted newlines,
  and every record is classified. Value checks run on chunks of records with the very
  same vectorised code as the fast path, so both paths accept exactly the same rows.

A multi-character separator is replaced by a control character the file does not use
before either path reads it, and put back in the values afterwards.

Parquet files are read with :func:`polars.read_parquet` and checked the same way; their
"line numbers" are 1-based row numbers. JSON lines (``.jsonl``, ``.ndjson``) and JSON
arrays of objects (``.json``) are read line by line by ``_table_json`` and checked the
same way, with their physical line numbers.

The public functions live here; the work is done in private modules:
``_table_text`` (encoding, separator sniffing, the fast path), ``_table_lines``
(physical lines, the exact path) and ``_table_values`` (value checks, duplicates,
Parquet).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from twostage.data._table_json import JSON_SUFFIXES, load_json
from twostage.data._table_text import SEPARATORS, HeaderGivenError, load_text
from twostage.data._table_values import (
    ARG,
    BAD,
    END,
    LINE,
    MISSING_WORDS,
    TIME_UNITS,
    Options,
    Spec,
    dedupe,
    load_frame,
    load_parquet,
    make_options,
    nested_columns,
    reject_date_numbers,
)
from twostage.data.dataset import ITEM, LABEL, RATING, TIME, USER, WEIGHT, Dataset
from twostage.data.frames import FRAME_KINDS, as_polars
from twostage.data.report import LoadReport
from twostage.errors import BadRowError, ConfigError, DataError, TwostageError

__all__ = [
    "JSON_SUFFIXES",
    "PARQUET_SUFFIXES",
    "SEPARATORS",
    "HeaderGivenError",
    "join_features",
    "names_its_columns",
    "with_names_if_headerless",
    "merge_table",
    "read_feature_table",
    "read_interactions",
]

logger = logging.getLogger(__name__)

Duplicates = Literal["keep", "first", "last", "error"]
PARQUET_SUFFIXES = (".parquet", ".pq")


# --------------------------------------------------------------------------- public API


def read_interactions(
    path: str | Path | Any,
    *,
    user_col: str = USER,
    item_col: str = ITEM,
    time_col: str | None = None,
    rating_col: str | None = None,
    weight_col: str | None = None,
    label_col: str | None = None,
    user_features: Sequence[str] | None = (),
    item_features: Sequence[str] | None = (),
    separator: str | None = None,
    has_header: bool = True,
    column_names: Sequence[str] | None = None,
    encoding: str = "auto",
    quote_char: str | None = '"',
    comment_prefix: str | None = None,
    strict: bool = False,
    duplicates: Duplicates = "keep",
    time_format: str | None = None,
    time_unit: str = "s",
    weight_values: Mapping[str, float] | None = None,
    time_bounds: tuple[int, int] = (-2_208_988_800, 7_258_118_400),
    name: str | None = None,
    missing_ratings: Literal["reject", "unrated"] = "reject",
    label_threshold: float | None = None,
) -> Dataset:
    """Read an interaction log from delimited text or Parquet into a :class:`Dataset`.

    Bad rows (wrong field count, blank line, empty user or item ID, non-numeric or
    non-finite rating or weight, unparseable timestamp, unbalanced quotes) are skipped
    and counted by reason in ``Dataset.report`` with their 1-based physical line
    numbers and text; a summary is logged at WARNING. Nothing is dropped silently.

    Args:
        path: a text file, a Parquet file (suffix ``.parquet`` or ``.pq``), a
            JSON file (``.jsonl`` / ``.ndjson``: one object per line, a line that
            is not one object rejected as ``bad_json``; ``.json``: those, or an
            array of objects; the text options below do not apply), or a table
            in memory (:func:`~twostage.data.frames.as_polars`: a polars, pandas
            or pyarrow table, a polars LazyFrame collected, a dict of columns;
            checked row by row as a Parquet file is; a row's "line" is its
            1-based position).
        user_col: source column of the user IDs.
        item_col: source column of the item IDs.
        time_col: source column of the timestamps: integer seconds since the epoch
            (taken as given) or ISO 8601 dates/datetimes (naive ones read as UTC), or
            any format given by ``time_format``. ``None``: a column named
            ``timestamp``, if the file has one (and no other role takes it);
            without one, or with ``""``, the timestamp becomes the 0-based order of
            the loaded rows, so temporal order means file order.
        rating_col: source column of explicit ratings (output ``rating``, Float32);
            ``None``: a column named ``rating``, if the file has one (and no other
            role takes it); ``""``: none.
        weight_col: source column of interaction weights (output ``weight``, Float32).
        label_col: source column saying whether the user chose the item (an
            impression log: clicked or bought, or only shown): 1, true or yes for
            an interaction, 0, false or no for an item shown and not chosen (any
            case; other values are ``bad_label`` rows). The shown rows are loaded
            apart, into ``Dataset.shown`` (counted in ``report.shown_rows``), and
            are not interactions: retrieval never learns them as choices.
            With ``label_threshold``, a column of numbers instead: a row at or
            above the threshold is chosen, one below it shown and not chosen
            (KuaiRec's ``watch_ratio`` with 2; ratings of 4 and up as choices);
            a value that is not a finite number is ``bad_label``.
        user_features: columns split out into ``Dataset.users``, one row per user
            (a list of names; None or empty: none).
        item_features: columns split out into ``Dataset.items``, one row per item.
            In both tables the first occurrence of an ID wins; IDs whose values differ
            across rows are counted and logged at WARNING.
        separator: field separator, any string (e.g. ``"::"``). ``None`` sniffs one
            of ``, \\t ; | ::`` from the start of the file.
        has_header: whether the first non-blank record holds the column names.
        column_names: names for a headerless file, or to replace the header's.
        encoding: ``"auto"`` (UTF-8, with or without BOM; UTF-16 or UTF-32 with a
            BOM, as Excel's "Unicode text" writes; latin-1 when the bytes are not
            valid UTF-8) or any Python codec name.
        quote_char: quote character, or ``None`` (or ``""``) for no quoting: quotes
            are then text, as in Last.fm's tab-separated dumps, where an artist
            called ``"Weird Al" Yankovic`` would otherwise open a quoted field.
        comment_prefix: lines starting with it (where a record starts; inside a
            quoted field it is text) are comments, skipped and counted in
            ``Dataset.report.comment_lines``: SNAP's ``#`` and KONECT's ``%``
            header lines. ``None`` (or ``""``): none; a file that opens with such
            lines then gets a warning, since they are read as rows.
        strict: raise :class:`BadRowError` at the first bad row instead of skipping.
        duplicates: rows with the same user, item and timestamp (user and item when
            there is no time column): ``"keep"`` all (default; not even checked),
            keep the ``"first"`` or ``"last"`` (the others are counted as
            ``"duplicate"``), or raise (``"error"``). Duplicates are not bad rows, so
            ``strict`` does not apply to them.
        time_format: strptime-like format of the timestamps (polars syntax).
        time_unit: the unit of numeric timestamps since the epoch: ``"s"``
            (default), ``"ms"`` (Java, JavaScript), ``"us"`` or ``"ns"``; they are
            floored to whole seconds. Dates and ISO text are read as usual. A number
            that reads as 1990-2099 in another unit but not in this one is rejected
            as ``timestamp_not_in_time_unit`` (with ``"s"``:
            ``timestamp_not_in_seconds``).
        weight_values: the weight of each value of ``weight_col`` when it holds
            names such as event types (``{"view": 1, "cart": 3, "purchase": 5}``),
            matched as text; a value it does not list is rejected as
            ``weight_value_not_mapped``, an empty one as ``bad_weight``.
        time_bounds: ``(low, high)`` epoch seconds a timestamp must lie in (default:
            the years 1900 to 2199); others are bad rows (``bad_timestamp``).
        name: dataset name; the file stem by default.
        missing_ratings: what an empty or missing rating is: ``"reject"``
            (default), a ``bad_rating`` row, or ``"unrated"``, an interaction
            without a rating (null), as in a log of purchases and reviews; a rating
            that is there but not a number stays a bad row.

    Returns:
        A Dataset whose ``report`` counts every record after the header, blank lines
        included (``rows_loaded + num_rejected == rows_read``), and whose
        ``interactions`` has ``user_id`` and ``item_id`` (Int64 when
        every loaded ID is a canonical integer, else String stripped of surrounding
        whitespace; Parquet IDs keep their type), ``timestamp`` (Int64) and
        ``rating``/``weight`` (Float32) when mapped, in file order. Text feature
        columns become Int64 or Float64 when every non-empty value parses as such,
        else String; empty fields are null.

    Raises:
        DataError: the file cannot be read, a mapped column is missing, or
            ``duplicates="error"`` found a duplicate.
        BadRowError: ``strict=True`` and a row is bad.
        ConfigError: an option has an invalid value.
    """
    index = _unread_index(path)
    path = as_source(path)
    roles: dict[str, str | None] = {USER: user_col, ITEM: item_col, TIME: time_col}
    roles |= {RATING: rating_col, WEIGHT: weight_col, LABEL: label_col or None}
    feats = {
        "user_features": _column_list("user_features", user_features),
        "item_features": _column_list("item_features", item_features),
    }
    _check_choice("duplicates", duplicates, ("keep", "first", "last", "error"))
    _check_choice("missing_ratings", missing_ratings, ("reject", "unrated"))
    if label_threshold is not None:
        number = not isinstance(label_threshold, bool) and isinstance(
            label_threshold, int | float
        )
        if not number or not math.isfinite(label_threshold):
            raise ConfigError(
                "`label_threshold` should be a finite number. Received: "
                f"{label_threshold!r}."
            )
        if not label_col:
            raise ConfigError(
                "`label_threshold` sorts the values of a label column; name the "
                "column with `label_col`."
            )
    if time_unit not in TIME_UNITS:
        raise ConfigError(
            f"`time_unit` should be one of {list(TIME_UNITS)}. Received: "
            f"`time_unit` = {time_unit!r}."
        )
    if time_unit != "s" and time_format is not None:
        raise ConfigError(
            "`time_unit` applies to numbers since the epoch and `time_format` to "
            f"text; give one. Received: `time_unit` = {time_unit!r}, `time_format` "
            f"= {time_format!r}."
        )
    weights = check_weight_values(weight_values, weight_col)
    low, high = time_bounds
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or (
        low >= high
    ):  # else every row would be rejected as a bad timestamp
        raise ConfigError(
            "`time_bounds` should be (low, high) epoch seconds, integers with low < "
            f"high. Received: `time_bounds` = {time_bounds!r}."
        )

    def make_spec(names: list[str]) -> Spec:
        # None: unmapped; "" for an optional role: none, explicitly.
        mapped = {
            k: v for k, v in roles.items() if v is not None and (v or k in (USER, ITEM))
        }
        # A column already named as twostage names the time or the rating is that
        # role unless mapped otherwise or refused with "" (as the streamed reader
        # takes it); never a column another role claims.
        for role in (TIME, RATING):
            if roles[role] is None and role in names and role not in mapped.values():
                mapped[role] = role
                logger.info("column %r read as the %s (named so)", role, role)
        keys = (USER, ITEM, TIME) if TIME in mapped else (USER, ITEM)
        bounds = (int(time_bounds[0]), int(time_bounds[1]))
        spec = Spec(
            mapped,
            (),
            time_format,
            duplicates,
            keys,
            bounds,
            time_unit,
            weights,
            missing_ratings=missing_ratings,
            label_threshold=None if label_threshold is None else float(label_threshold),
        )
        # "label" is an output name only when a label column is read
        reserved = tuple(k for k in BAD if k != LABEL or LABEL in mapped)
        return _make_spec(path, names, spec, feats, reserved=reserved)

    opts = make_options(
        separator=separator,
        has_header=has_header,
        column_names=column_names,
        encoding=encoding,
        quote_char=quote_char,
        strict=strict,
        time_format=time_format,
        comment_prefix=comment_prefix,
    )
    with _index_hint(index):
        df, report, spec = _load(path, make_spec, opts)
    if TIME not in spec.roles:  # no time column: file order is the time order
        df = df.with_columns(pl.int_range(0, pl.len(), dtype=pl.Int64).alias(TIME))
    out_cols = [c for c in (USER, ITEM, TIME, RATING, WEIGHT) if c in df.columns]
    users = _feature_table(df, USER, feats["user_features"])
    items = _feature_table(df, ITEM, feats["item_features"])
    shown = None
    if LABEL in spec.roles:  # an impression log: the shown rows are kept apart
        shown = df.filter(~pl.col(LABEL)).select(USER, ITEM, TIME)
        df = df.filter(pl.col(LABEL))
        report.shown_rows = shown.height
        if shown.height:
            logger.info(
                "%d row(s) shown and not chosen (label 0) read apart from the %d "
                "interactions",
                shown.height,
                df.height,
            )
    return Dataset(
        name=name or (path.stem if isinstance(path, Path) else "frame"),
        interactions=df.select(out_cols),
        users=users,
        items=items,
        source=str(path) if isinstance(path, Path) else FRAME,
        report=report,
        has_time=TIME in spec.roles,
        shown=shown,
    )


def read_feature_table(
    path: str | Path | Any,
    *,
    key_col: str | Sequence[str],
    key_name: Literal["user_id", "item_id"] = "user_id",
    columns: Sequence[str] | None = None,
    separator: str | None = None,
    has_header: bool = True,
    column_names: Sequence[str] | None = None,
    encoding: str = "auto",
    quote_char: str | None = '"',
    comment_prefix: str | None = None,
    strict: bool = False,
    duplicates: Literal["first", "last", "error"] = "first",
) -> pl.DataFrame:
    """Read a user or item feature table (text or Parquet), one row per key.

    Rows are checked like :func:`read_interactions` checks them (an empty key is
    ``empty_user_id``/``empty_item_id``); rejected rows and duplicate keys are
    counted and the summary is logged at WARNING.

    Args:
        path: a text or Parquet file, or a table in memory (as
            :func:`read_interactions` takes it).
        key_col: source column of the key, or several names: the first the table
            has (a file keyed by the log's column name or by ``user_id``).
        key_name: output name of the key, ``"user_id"`` or ``"item_id"``.
        columns: feature columns to keep; all other columns when ``None``.
        separator: see :func:`read_interactions`.
        has_header: see :func:`read_interactions`.
        column_names: see :func:`read_interactions`.
        encoding: see :func:`read_interactions`.
        quote_char: see :func:`read_interactions`.
        comment_prefix: see :func:`read_interactions`.
        strict: raise :class:`BadRowError` at the first bad row.
        duplicates: which row of a repeated key to keep (``"first"``/``"last"``), or
            ``"error"`` to raise.

    Returns:
        A DataFrame with ``key_name`` first (typed like interaction IDs), then the
        feature columns (typed like feature columns of :func:`read_interactions`).
    """
    index = _unread_index(path)
    path = as_source(path)
    _check_choice("key_name", key_name, (USER, ITEM))
    _check_choice("duplicates", duplicates, ("first", "last", "error"))
    wanted = None if columns is None else _column_list("columns", columns)

    def make_spec(names: list[str]) -> Spec:
        keys = [key_col] if isinstance(key_col, str) else list(key_col)
        key = next((c for c in keys if c in names), None)
        if key is None:
            where = FRAME if isinstance(path, pl.DataFrame) else str(path)
            raise DataError(
                f"{where!r} should have a key column named {' or '.join(map(repr, keys))}"
                f". Available columns: {names}; rename its key column, or name it "
                f"with `data.{key_name.removesuffix('_id')}_table_key`."
            )
        rest = [c for c in names if c != key] if wanted is None else wanted
        feats = {"columns": rest}
        mapped: dict[str, str] = {key_name: key}
        spec = Spec(mapped, (), None, duplicates, (key_name,))
        return _make_spec(path, names, spec, feats, reserved=(key_name,))

    opts = make_options(
        separator=separator,
        has_header=has_header,
        column_names=column_names,
        encoding=encoding,
        quote_char=quote_char,
        strict=strict,
        time_format=None,
        comment_prefix=comment_prefix,
    )
    with _index_hint(index):
        df, _, spec = _load(path, make_spec, opts)
    return df.select([key_name, *spec.features])


def check_weight_values(
    weight_values: Mapping[str, float] | None, weight_col: str | None
) -> tuple[tuple[str, float], ...]:
    """``weight_values`` checked (names to finite non-negative numbers, with a
    ``weight_col`` to read) as the pairs a reader's spec holds."""
    if weight_values is None:
        return ()
    if not isinstance(weight_values, Mapping) or not weight_values:
        raise ConfigError(
            "`weight_values` should map each value of the weight column to its "
            f"weight, e.g. {{'view': 1, 'purchase': 5}}. Received: {weight_values!r}."
        )
    if not weight_col:
        raise ConfigError(
            "`weight_values` gives the weights of a weight column's values; name the "
            "column with `weight_col`."
        )
    pairs = []
    for name, weight in weight_values.items():
        number = not isinstance(weight, bool) and isinstance(weight, int | float)
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"`weight_values` keys should be non-empty text. Received: {name!r}."
            )
        if not number or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"`weight_values`[{name!r}] should be a finite number >= 0. "
                f"Received: {weight!r}."
            )
        pairs.append((name.strip(), float(weight)))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"`weight_values` names a value twice once stripped of spaces: {names}."
        )
    return tuple(pairs)


def join_features(
    dataset: Dataset,
    *,
    users: pl.DataFrame | None = None,
    items: pl.DataFrame | None = None,
) -> Dataset:
    """Attach user and/or item feature tables to a dataset.

    Args:
        dataset: the dataset to extend (not modified).
        users: a table keyed by ``user_id`` with one row per user.
        items: a table keyed by ``item_id`` with one row per item.

    Returns:
        A copy of ``dataset`` whose ``users``/``items`` hold the new columns (joined
        onto the existing tables by key, if there are any).

    Raises:
        DataError: a table lacks its key, has repeated keys, a key dtype differs from
            the interactions' (other integer widths are cast where every key fits,
            and text keys that are all integers written plainly are read as such),
            or a column already exists in the existing table.
    """
    tables = {}
    for arg, key, new, old in (
        ("users", USER, users, dataset.users),
        ("items", ITEM, items, dataset.items),
    ):
        known = dataset.interactions[key]
        tables[arg] = old if new is None else merge_table(arg, key, new, old, known)
    return Dataset(
        name=dataset.name,
        interactions=dataset.interactions,
        users=tables["users"],
        items=tables["items"],
        source=dataset.source,
        report=dataset.report,
        has_time=dataset.has_time,
        shown=dataset.shown,
    )


#: How a table given as a DataFrame is named in reports and messages.
FRAME = "<DataFrame>"


def names_its_columns(data: Any) -> bool:
    """Whether ``data`` names its columns itself, so that ``column_names`` (the
    names of a headerless text file) cannot apply: a frame, a Dataset, a Parquet
    or JSON lines file, a directory of Parquet files."""
    if not isinstance(data, str | Path):
        return True
    path = Path(data)
    if path.suffix.lower() in (".gz", ".zip"):  # what it holds: ratings.jsonl.gz
        path = path.with_suffix("")
    return path.is_dir() or path.suffix.lower() in (*PARQUET_SUFFIXES, *JSON_SUFFIXES)


def with_names_if_headerless(
    data: Any, names: Sequence[str], read: Callable[[list[str] | None], Dataset]
) -> Dataset:
    """``read(names)`` where ``data`` is a headerless text file, else ``read(None)``:
    for new rows of a log whose training file had no header (a later week may come
    with one, or as Parquet)."""
    if not names or names_its_columns(data):
        return read(None)
    try:
        return read(list(names))
    except HeaderGivenError:  # its first line holds these names: a header
        return read(None)


def _unread_index(data: Any) -> list[str]:
    """A pandas frame's named index levels that are not columns: polars, and so
    :func:`~twostage.data.frames.as_polars`, leaves the index out."""
    if type(data).__module__.split(".")[0] != "pandas" or not hasattr(data, "index"):
        return []
    names = [n for n in data.index.names if n is not None]
    return [str(n) for n in names if n not in data.columns]


@contextlib.contextmanager
def _index_hint(index: list[str]) -> Iterator[None]:
    """A missing column's error names the pandas frame's index where it has a
    named one (``set_index("user_id")``), which is not read."""
    try:
        yield
    except DataError as e:
        said = str(e)
        if not index or not ("not a column" in said or "key column" in said):
            raise
        raise DataError(
            f"{said} The pandas frame's index {index} is not read (as polars reads "
            "a pandas frame): `frame.reset_index()` makes it a column."
        ) from e


def as_source(data: Any) -> Path | pl.DataFrame:
    """A path, or a polars frame (any table :func:`~twostage.data.frames.as_polars`
    reads: pandas and pyarrow tables through Arrow, a LazyFrame collected)."""
    if isinstance(data, str | Path):
        return Path(data)
    frame = as_polars(data)
    if frame is None:
        raise DataError(
            f"`path` should be a file path or {FRAME_KINDS}. Received: "
            f"{type(data).__name__}."
        )
    return frame


def _load(
    path: Path | pl.DataFrame,
    make_spec: Callable[[list[str]], Spec],
    opts: Options,
    label: str | None = None,
) -> tuple[pl.DataFrame, LoadReport, Spec]:
    """Read, check, type and de-duplicate the mapped columns of a file or frame
    (``label``: the name reports give the file; its path by default)."""
    named = isinstance(path, pl.DataFrame) or path.suffix.lower() in (
        *PARQUET_SUFFIXES,
        *JSON_SUFFIXES,
    )
    if named and (opts.column_names is not None or not opts.has_header):
        raise ConfigError(
            "`column_names` and `has_header` apply to delimited text files; "
            f"{'a DataFrame' if isinstance(path, pl.DataFrame) else str(path)} "
            "names its columns itself (map them with `user_col`, `item_col`...)."
        )
    if isinstance(path, pl.DataFrame):  # a struct's fields named as Parquet's are
        fields = nested_columns(path.schema, FRAME)
        spec = make_spec(list(fields))
        df, report, spec, describe = load_frame(
            path.select(fields[name].expr.alias(name) for name in spec.sources),
            FRAME,
            spec,
            opts,
        )
        return _finish(df, report, spec, describe, FRAME, opts.strict)
    if path.is_dir():
        raise DataError(
            f"{str(path)!r} is a directory; a log in memory is one CSV or Parquet "
            "file. A directory of Parquet files is read one row group at a time: "
            "`twostage train --stream`, `data describe`, `data split` "
            "(docs/scaling.md); `twostage data sample` writes some of its users' "
            "rows to one file."
        )
    if not path.is_file():
        raise DataError(f"`path` should be an existing file. Received: {str(path)!r}.")
    with path.open("rb") as f:
        magic = f.read(4)
    if path.suffix.lower() in (".xlsx", ".xlsm", ".xls", ".ods"):
        raise DataError(
            f"{path} is a spreadsheet workbook, not a log file: save its sheet as CSV "
            "(UTF-8) or Parquet, e.g. `pl.read_excel(path).write_parquet(...)`, and "
            "read that."
        )
    if magic[:2] == b"\x1f\x8b" or magic == b"PK\x03\x04":
        with _decompressed(path, zipped=magic[:2] == b"PK") as plain:
            try:
                return _load(plain, make_spec, opts, label=str(path))
            except TwostageError as e:  # name the file the user gave
                if isinstance(e, BadRowError):
                    e.path = str(path)
                e.args = tuple(
                    a.replace(str(plain), str(path)) if isinstance(a, str) else a
                    for a in e.args
                )
                raise
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES or magic == b"PAR1":
            df, report, spec, describe = load_parquet(path, make_spec, opts)
        elif path.suffix.lower() in JSON_SUFFIXES:
            df, report, spec, describe = load_json(path, make_spec, opts)
        else:
            df, report, spec, describe = load_text(path, make_spec, opts)
    except pl.exceptions.PanicException as e:  # a BaseException: not Exception
        # polars stops at some damaged files (a Parquet page whose lengths lie)
        # with a Rust panic, where it stops at most with an error.
        raise DataError(
            f"{label or path}: not a readable file: polars stopped reading it "
            f"({str(e).splitlines()[0][:200]}). Is it damaged or cut short? Write it "
            "again from its source."
        ) from e
    report.path = label or str(path)
    return _finish(df, report, spec, describe, report.path, opts.strict)


@contextlib.contextmanager
def _decompressed(path: Path, *, zipped: bool) -> Iterator[Path]:
    """A gzip file, or a zip archive of one file, decompressed into a temporary
    file of the same name less ``.gz`` / ``.zip`` (removed afterwards); its lines
    and rows are the file's own."""
    with tempfile.TemporaryDirectory(prefix="twostage-") as tmp:
        try:
            if zipped:
                with zipfile.ZipFile(path) as archive:
                    members = [m for m in archive.infolist() if not m.is_dir()]
                    if len(members) != 1:
                        raise DataError(
                            f"{path} is a zip archive of {len(members)} files "
                            f"({[m.filename for m in members][:10]}); extract the "
                            "log to read (`unzip`) and give its path."
                        )
                    name = Path(members[0].filename).name
                    plain = Path(tmp) / name
                    with archive.open(members[0]) as src, plain.open("wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
            else:
                plain = Path(tmp) / (path.stem if path.suffix else path.name)
                with gzip.open(path, "rb") as src, plain.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise DataError(f"{path} could not be decompressed: {e}") from e
        logger.info(
            "%s decompressed into a temporary file (%.1f MB)",
            path,
            plain.stat().st_size / 1e6,
        )
        yield plain


def _finish(
    df: pl.DataFrame,
    report: LoadReport,
    spec: Spec,
    describe: Callable[[pl.DataFrame], list[str]],
    label: str,
    strict: bool,
) -> tuple[pl.DataFrame, LoadReport, Spec]:
    df = reject_date_numbers(df, spec, report, describe, strict)
    df = dedupe(df, spec, report, describe, label)
    df = df.drop([c for c in (LINE, END) if c in df.columns])
    report.rows_loaded = df.height
    if not report.ok:
        logger.warning("%s", report.summary())
    else:
        logger.debug("%s", report.summary())
    _warn_missing_words_as_ids(df, label)
    return df, report, spec


def _warn_missing_words_as_ids(df: pl.DataFrame, label: str) -> None:
    """Say where an ID is a word for a missing value (Diginetica's userId "NA" on
    anonymous sessions, R's NA): its rows are read as one user or item, people
    who cannot be told apart."""
    for key, noun in ((USER, "user"), (ITEM, "item")):
        if key not in df.columns or df.schema[key] != pl.String:
            continue
        words = df[key].is_in(MISSING_WORDS)
        if not words.any():
            continue
        found = sorted(set(df[key].filter(words).to_list()))
        logger.warning(
            "%s: %d rows have the %s ID %s, a word for a missing value; they are "
            "read as one %s. If they are rows without a %s (anonymous sessions), "
            "drop them or give each its own ID first.",
            label,
            int(words.sum()),
            noun,
            " / ".join(repr(w) for w in found),
            noun,
            noun,
        )


#: Names logs commonly give the user and item columns (lower case, letters only):
#: MovieLens's userId / movieId, Book-Crossing's User-ID / ISBN, Amazon's
#: reviewerID / asin, Retailrocket's visitorid / itemid...
_ID_NAMES = {
    USER: ("user", "userid", "uid", "customerid", "visitorid", "reviewerid"),
    ITEM: ("item", "itemid", "movieid", "productid", "isbn", "asin", "sku", "iid"),
}


def _likely_column(target: str, names: list[str]) -> str | None:
    """The one column of ``names`` named as logs name the ``target`` role (None:
    none or several), for an error to suggest; never mapped unasked."""
    found = [
        name
        for name in names
        if "".join(c for c in name.lower() if c.isalpha()) in _ID_NAMES.get(target, ())
    ]
    return found[0] if len(found) == 1 else None


def _make_spec(
    path: Path | pl.DataFrame,
    names: list[str],
    draft: Spec,
    features: dict[str, list[str]],
    *,
    reserved: tuple[str, ...],
) -> Spec:
    """Check the columns of ``draft`` against the file's; add the feature columns.

    Args:
        path: the file (or frame), for messages.
        names: its column names.
        draft: the spec with ``roles`` (output name -> source column) but no features.
        features: argument name -> feature columns it lists.
        reserved: output names a feature column may not take.
    """
    where = FRAME if isinstance(path, pl.DataFrame) else str(path)
    mapped = draft.roles
    missing = [(target, col) for target, col in mapped.items() if col not in names]
    if missing:
        said = " and ".join(
            f"`{ARG.get(target, 'key_col')}` = {col!r}" for target, col in missing
        )
        # Every missing role's likely column at once: one run to fix, not two.
        likely = [
            f"`{ARG[target]}` = {found!r}"
            for target, _ in missing
            if (found := _likely_column(target, names))
        ]
        raise DataError(
            f"{said} {'is not a column' if len(missing) == 1 else 'are not columns'} "
            f"of {where!r}. Available columns: {names}."
            + (f" Likely: {', '.join(likely)}." if likely else "")
            + " Pass one of them"
            + (
                "."
                if where == FRAME
                else "; a file without a header reads its first row as names: "
                "name its columns with `column_names`."
            )
        )
    seen = list(mapped.values())
    if len(set(seen)) != len(seen):
        raise DataError(f"each column can play one role only. Received roles {mapped}.")
    kept: list[str] = []
    for arg, cols in features.items():
        for col in cols:
            if col not in names:
                raise DataError(
                    f"`{arg}` lists {col!r}, which is not a column of {where!r}. "
                    f"Available columns: {names}."
                )
            if col in seen or col in reserved:
                raise DataError(
                    f"`{arg}` lists {col!r}, which is a mapped column or an output "
                    f"name ({list(reserved)}); rename it or drop it from `{arg}`."
                )
            kept.append(col)
    roles = {t: mapped[t] for t in (*BAD, *mapped) if t in mapped}
    return replace(draft, roles=roles, features=tuple(dict.fromkeys(kept)))


def _check_choice(arg: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"`{arg}` should be one of {allowed}. Received: {value!r}.")


def _column_list(arg: str, value: Sequence[str] | None) -> list[str]:
    """Column names given as a list (None: none). A string alone is refused: read
    as a sequence it was its letters, each then "not a column"."""
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(name, str) for name in value):
        raise ConfigError(
            f"`{arg}` should be a list of column names, e.g. ['genre', 'price']. "
            f"Received: `{arg}` = {value!r}."
        )
    return list(value)


def _feature_table(df: pl.DataFrame, key: str, cols: list[str]) -> pl.DataFrame | None:
    """One row per ``key`` (first occurrence), warning about conflicting values."""
    if not cols:
        return None
    table = df.select([key, *dict.fromkeys(cols)])
    first = table.unique(subset=key, keep="first", maintain_order=True)
    conflicts = table.unique().height - first.height
    if conflicts:
        logger.warning(
            "%d %s values have more than one set of features %s; the first occurrence "
            "was kept.",
            conflicts,
            key,
            cols,
        )
    return first


def merge_table(
    arg: str, key: str, new: pl.DataFrame, old: pl.DataFrame | None, ids: pl.Series
) -> pl.DataFrame:
    """Check a feature table against the log's IDs ``ids`` (its ``key`` column, or
    a streamed log's vocabulary) and join it onto ``old``, the table already
    there (None: none)."""
    if key not in new.columns:
        raise DataError(
            f"`{arg}` should have a {key!r} column. Received columns: {new.columns}."
        )
    other = ITEM if key == USER else USER
    if other in new.columns:  # a feature named as the other side's ID: clashes
        raise DataError(
            f"`{arg}` has a {other!r} column beside its key {key!r}: a table of "
            f"{arg} holds one row per {key!r} and its features (is it the log?). "
            f"Drop that column, or rename it."
        )
    want = ids.dtype
    if new.schema[key] != want and new.schema[key].is_integer() and want.is_integer():
        # Another integer width (pandas' int32, a Parquet UInt32) holds the same IDs:
        # widened or narrowed where every value fits, refused where one does not.
        fits = new[key].cast(want, strict=False)
        lost = new[key].is_not_null() & fits.is_null()
        if lost.any():
            raise DataError(
                f"`{arg}`[{key!r}] holds values that the interactions' {want} "
                f"cannot, e.g. {new[key].filter(lost)[0]}; its keys cannot match "
                "the log's."
            )
        new = new.with_columns(fits)
    if new.schema[key] == pl.String and want.is_integer():
        # Keys written as text ("42", a CSV read without types): the log's integers
        # where every key is one written plainly; "0042" or "42a" could not match.
        keys = new[key]
        numbers = keys.cast(want, strict=False)
        plain = numbers.is_not_null() & (numbers.cast(pl.String) == keys)
        odd = keys.filter(~plain & keys.is_not_null())
        if odd.len():
            raise DataError(
                f"`{arg}` keys are text, and {odd[0]!r} is not an integer written as "
                f"the log's {key} values are ({want}): no row of the log would match "
                f"it. Give `{arg}` the log's IDs."
            )
        new = new.with_columns(numbers)
    if new.schema[key] != want:
        raise DataError(
            f"`{arg}`[{key!r}] has dtype {new.schema[key]} but the interactions' "
            f"{key!r} is {want}. Cast it first, e.g. "
            f"`{arg}.with_columns(pl.col({key!r}).cast(pl.{want}))`."
        )
    if new[key].is_duplicated().any():
        raise DataError(
            f"`{arg}` should have one row per {key!r}; some keys repeat. Use "
            f"`{arg}.unique(subset={key!r}, keep='first')` or read it with "
            "read_feature_table()."
        )
    known = ids.unique()
    covered = int(known.is_in(new[key].implode()).sum())
    logger.log(
        logging.WARNING if known.len() and not covered else logging.INFO,
        "%d of %d %s values have features in `%s`%s",
        covered,
        known.len(),
        key,
        arg,
        ": do its keys match the log's?" if known.len() and not covered else ".",
    )
    if old is None:
        return new
    clash = sorted((set(new.columns) & set(old.columns)) - {key})
    if clash:
        raise DataError(
            f"`{arg}` repeats columns {clash} of the dataset's existing table; drop "
            "or rename them first."
        )
    return old.join(new, on=key, how="full", coalesce=True, maintain_order="left")
