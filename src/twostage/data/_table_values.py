"""Value checks shared by every reader of :mod:`twostage.data.tables`.

Whichever way a file was tokenised (polars, the :mod:`csv` module, Parquet), its mapped
columns go through the same vectorised parsing here, so a row is accepted or rejected
for the same reason on every path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl

from twostage.data.dataset import ITEM, LABEL, RATING, TIME, USER, WEIGHT
from twostage.data.report import MAX_EXAMPLES, LoadReport
from twostage.errors import BadRowError, ConfigError, DataError

logger = logging.getLogger(__name__)

LINE, END = "__line", "__end"  # first and last physical line of a record
ARG = {USER: "user_col", ITEM: "item_col", TIME: "time_col", RATING: "rating_col"}
ARG |= {WEIGHT: "weight_col", LABEL: "label_col"}
# Checked in this order: a row with several problems is counted under the first.
BAD = {USER: "empty_user_id", ITEM: "empty_item_id", RATING: "bad_rating"}
BAD |= {WEIGHT: "bad_weight", LABEL: "bad_label", TIME: "bad_timestamp"}
#: The values of a label column (``label_col``), as text stripped and lower-cased:
#: chosen (clicked, bought) or shown and not chosen.
LABEL_TEXT = {"1": True, "true": True, "yes": True, "0": False, "false": False}
LABEL_TEXT |= {"no": False}
#: Units of numeric timestamps since the epoch, as divisors to seconds.
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_LINE_BREAK = re.compile(r"[\r\n]")
# Numbers and times may be padded with these, never with line breaks: a stray CR in
# such a field makes it unparseable on every path instead of being stripped.
PADDING = " \t"
_ISO_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
)


@dataclass(frozen=True)
class Spec:
    """Which source column plays which role, and what to do with duplicates."""

    roles: dict[str, str]  # output name -> source column, in BAD order
    features: tuple[str, ...]  # source columns kept (feature tables)
    time_format: str | None
    duplicates: str
    keys: tuple[str, ...]  # output columns that define a duplicate
    time_bounds: tuple[int, int] = (-2_208_988_800, 7_258_118_400)  # 1900 .. 2200
    time_unit: str = "s"  # of numeric timestamps: a key of TIME_UNITS
    # the weight of each value of the weight column, matched as text (event types)
    weight_values: tuple[tuple[str, float], ...] = ()
    # "unrated": an empty or missing rating is an interaction without one
    missing_ratings: str = "reject"
    # a label column of numbers: at or above it, chosen (None: 1/0, true/false)
    label_threshold: float | None = None

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys([*self.roles.values(), *self.features]))


@dataclass(frozen=True)
class Options:
    """How to read a file; built by :func:`make_options`, which checks the values."""

    separator: str | None
    has_header: bool
    column_names: list[str] | None
    encoding: str
    quote_char: str | None
    strict: bool
    time_format: str | None
    comment_prefix: str | None = None


def make_options(
    *,
    separator: str | None,
    has_header: bool,
    column_names: Sequence[str] | None,
    encoding: str,
    quote_char: str | None,
    strict: bool,
    time_format: str | None,
    comment_prefix: str | None = None,
) -> Options:
    """Check the reading options shared by every reader; see ``read_interactions``."""
    if quote_char == "":  # as a config or the CLI writes "no quoting"
        quote_char = None
    if separator is not None and (
        not isinstance(separator, str) or not separator or _LINE_BREAK.search(separator)
    ):
        raise ConfigError(
            "`separator` should be a non-empty string without line breaks, or None "
            f"to detect it. Received: `separator` = {separator!r}."
        )
    if quote_char is not None and (
        not isinstance(quote_char, str)
        or len(quote_char) != 1
        or quote_char in (separator or "")
        or _LINE_BREAK.search(quote_char)
    ):
        raise ConfigError(
            "`quote_char` should be one character that is not in the separator, or "
            f"None. Received: `quote_char` = {quote_char!r}."
        )
    if column_names is not None and (isinstance(column_names, str) or not column_names):
        raise ConfigError(
            "`column_names` should be a non-empty list of names. "
            f"Received: `column_names` = {column_names!r}."
        )
    if comment_prefix == "":
        comment_prefix = None
    if comment_prefix is not None and (
        not isinstance(comment_prefix, str)
        or len(comment_prefix) > 5  # polars' limit
        or not comment_prefix.strip()
        or _LINE_BREAK.search(comment_prefix)
        or comment_prefix == quote_char
        or (separator is not None and comment_prefix.startswith(separator))
    ):
        raise ConfigError(
            "`comment_prefix` should be 1 to 5 characters that start comment lines "
            "(such as '#' or '%'): not only spaces, and without a line break, the "
            "quote character or the separator. Received: `comment_prefix` = "
            f"{comment_prefix!r}."
        )
    names = None if column_names is None else [str(n) for n in column_names]
    return Options(
        separator,
        has_header,
        names,
        encoding,
        quote_char,
        strict,
        time_format,
        comment_prefix,
    )


def parse_columns(
    df: pl.DataFrame, spec: Spec, ready: dict[str, pl.Series] | None = None
) -> tuple[pl.DataFrame, pl.Series | None]:
    """Parse the mapped columns of ``df`` (source names) into output columns.

    Returns:
        The parsed frame (outputs, features, and ``__line``/``__end`` if present) and
        the reason each row is bad (null when good), or ``None`` when all rows are good.
    """
    out: dict[str, pl.Series] = {}
    bad: dict[str, pl.Series] = {}
    for target, src in spec.roles.items():
        if ready and target in ready:
            out[target] = ready[target].alias(target)
            continue
        s = df[src]
        if target == TIME:
            value, mask = _parse_time(s, spec.time_format)
            low, high = spec.time_bounds  # year 9999 or int64 max: not a time
            seconds = spec.time_unit == "s"
            if seconds:
                outside = ((value < low) | (value >= high)).fill_null(False)
                # Milliseconds or microseconds since the epoch (Java, JavaScript
                # logs): their own reason, so the report says what the numbers are.
                # Only where the scaled time is 1990-2099, so a sentinel such as
                # 253402300799 (9999-12-31 in seconds) stays a bad timestamp.
                scaled = outside & (
                    _within(value // 1000, *_RECENT)
                    | _within(value // 1_000_000, *_RECENT)
                )
                misread = "timestamp_not_in_seconds"
            else:  # numbers in the unit given, floored to whole seconds
                value, scaled = _from_unit(s, value, TIME_UNITS[spec.time_unit])
                outside = ((value < low) | (value >= high)).fill_null(False)
                misread = "timestamp_not_in_time_unit"
            if scaled.any():
                bad[misread] = scaled
                outside = outside & ~scaled
            # Seconds with a fraction (time.time()) are refused, not cut: their own
            # reason, so the report says how to make them whole.
            fraction = mask & _with_fraction(s, low, high) if seconds else None
            if fraction is not None and fraction.any():
                bad["timestamp_with_fraction"] = fraction
                mask = mask & ~fraction
            # (Dates written as numbers, 20240301, are found over the whole
            # column, once every block is parsed: reject_date_numbers.)
            value = value.set(outside | scaled, None)
            mask = mask | outside
        elif target == LABEL and spec.label_threshold is not None:
            number, mask = _parse_number(s, LABEL)
            value = (number >= spec.label_threshold).fill_null(False)
        elif target == LABEL:
            value, mask = parse_label(s)
        elif target == WEIGHT and spec.weight_values:
            value, mask, unlisted = weights_from_names(s, dict(spec.weight_values))
            if unlisted.any():
                bad["weight_value_not_mapped"] = unlisted
        elif target in (RATING, WEIGHT):
            value, mask = _parse_number(s, target)
            if target == RATING and spec.missing_ratings == "unrated":
                missing = s.is_null()
                if s.dtype == pl.String:
                    missing = missing | (s.str.strip_chars(PADDING) == "")
                mask = mask & ~missing.fill_null(True)
            if target == WEIGHT:  # a weight scales a row's share of the loss
                mask = mask | (value < 0).fill_null(False)
            if s.dtype == pl.String:  # "4,5" (European exports): its own reason
                comma = mask & s.str.strip_chars(PADDING).str.contains(
                    r"^-?\d+,\d+$"
                ).fill_null(False)
                if comma.any():  # ratings and weights share the reason
                    key = "number_with_decimal_comma"
                    bad[key] = bad.get(key, comma) | comma
                    mask = mask & ~comma
        else:
            value, mask = parse_ids(s, target)
        out[target] = value.alias(target)
        if mask.any():
            bad[BAD[target]] = mask.fill_null(True)
        if target in (USER, ITEM) and value.dtype == pl.String:
            nul = value.str.contains("\x00", literal=True).fill_null(False)
            if nul.any():  # invisible in every display: never an ID
                bad["nul_in_id"] = bad.get("nul_in_id", nul) | nul
    for col in spec.features:
        s = df[col]
        if s.dtype == pl.String:  # quoted "" and missing both mean no value
            s = s.set(s.str.len_bytes() == 0, None)
        out[col] = s
    for col in (LINE, END):
        if col in df.columns:
            out[col] = df[col]
    parsed = pl.DataFrame(out)
    if not bad:
        return parsed, None
    # A row of separators only is reported on its own, not as a missing ID, so the
    # genuinely malformed rows stay easy to find among thousands of empty ones.
    empty = _all_fields_empty(df)
    if empty is not None and empty.any():
        bad = {"empty_row": empty, **bad}
    masks = pl.DataFrame(bad)
    reason = masks.select(
        pl.coalesce([pl.when(pl.col(r)).then(pl.lit(r)) for r in masks.columns])
    ).to_series()
    return parsed, reason


def _with_fraction(s: pl.Series, low: int, high: int) -> pl.Series:
    """Where ``s`` holds a finite number of seconds with a fraction, in bounds."""
    if s.dtype == pl.String:
        number = s.str.strip_chars(PADDING).cast(pl.Float64, strict=False)
    elif s.dtype.is_float():
        number = s.cast(pl.Float64)
    else:
        return pl.repeat(False, len(s), eager=True)
    return (
        number.is_finite() & (number != number.floor()) & _within(number, low, high)
    ).fill_null(False)


_RECENT = (631_152_000, 4_102_444_800)  # 1990-01-01 .. 2100-01-01, epoch seconds


def _from_unit(
    s: pl.Series, value: pl.Series, divisor: int
) -> tuple[pl.Series, pl.Series]:
    """``value`` (parsed from ``s``) with its numbers divided by ``divisor`` down to
    whole seconds (dates and ISO text are seconds already), and where a number is
    in another unit: read in the unit given it falls outside 1990-2099, read in
    another it falls inside (seconds given as milliseconds read as January 1970)."""
    if s.dtype == pl.String:  # an integer, or one written as a float ("17.0")
        number = s.str.strip_chars(PADDING).str.contains(r"^[+-]?[0-9]+(\.0*)?$")
        number = number.fill_null(False)
    else:
        number = pl.repeat(s.dtype.is_numeric(), len(s), eager=True)
    number = number & value.is_not_null()
    frame = pl.DataFrame({"v": value, "n": number})
    seconds = frame.select(
        pl.when(pl.col("n")).then(pl.col("v") // divisor).otherwise(pl.col("v"))
    ).to_series()
    elsewhere = pl.repeat(False, len(s), eager=True)
    for other in TIME_UNITS.values():
        if other != divisor:
            elsewhere = elsewhere | _within(value // other, *_RECENT)
    return seconds, number & elsewhere & ~_within(seconds, *_RECENT)


def _within(value: pl.Series, low: int, high: int) -> pl.Series:
    return ((value >= low) & (value < high)).fill_null(False)


def parse_ids(s: pl.Series, target: str) -> tuple[pl.Series, pl.Series]:
    """``(IDs, missing)``: a column of IDs as the readers take them (integers as
    Int64, text trimmed, whole floats as integers) and which are missing or
    blank; ``target`` (``user_id``, ``item_id``) names the column in errors.

    Raises:
        DataError: a column of another type, fractional numbers, or integers
            beyond int64."""
    dtype = s.dtype
    if dtype.is_integer():
        value = s.cast(pl.Int64, strict=False)
        beyond = value.is_null() & s.is_not_null()  # UInt64 above 2**63 - 1
        if beyond.any():
            raise DataError(
                f"the {target} column holds {s.filter(beyond)[0]}, beyond the int64 "
                "range integer IDs are read in (an unsigned 64-bit hash?). Cast the "
                "column to text before loading, e.g. `.cast(pl.String)`; IDs are "
                "then strings."
            )
        return value, value.is_null()
    if dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum):
        value = s.cast(pl.String).str.strip_chars()
        return value, value.is_null() | (value.str.len_bytes() == 0)
    if dtype.is_float():
        # pandas holds an integer ID column with a missing value as floats (1.0,
        # NaN): whole numbers are the IDs, a NaN is a missing ID like a null; a
        # fraction means the column holds no IDs at all.
        known = s.is_not_null() & s.is_not_nan()
        whole = known & (s == s.floor()) & (s.abs() < 2.0**53)
        odd = s.filter(known & ~whole)
        if len(odd):
            raise DataError(
                f"`{ARG.get(target, 'key_col')}` = {s.name!r} holds numbers that "
                "are not whole (or beyond 2**53, where floats skip integers), e.g. "
                f"{odd.head(3).to_list()}; expected integer or string IDs. Is it "
                "the right column?"
            )
        value = s.cast(pl.Int64, strict=False).set(~known.fill_null(False), None)
        return value, value.is_null()
    raise DataError(
        f"`{ARG.get(target, 'key_col')}` = {s.name!r} has dtype {dtype}; expected "
        "integer or string IDs. Cast the column before loading."
    )


def _parse_number(s: pl.Series, target: str) -> tuple[pl.Series, pl.Series]:
    dtype = s.dtype
    if dtype == pl.String:
        value = _select(s, pl.first().cast(pl.Float64, strict=False))
        if value.null_count() > s.null_count():  # maybe padded with spaces
            value = _select(
                s, pl.first().str.strip_chars(PADDING).cast(pl.Float64, strict=False)
            )
        value = value.cast(pl.Float32)
    elif dtype.is_numeric() or dtype in (pl.Boolean, pl.Null):
        value = _select(s, pl.first().cast(pl.Float32, strict=False))
    else:
        raise DataError(
            f"`{ARG[target]}` = {s.name!r} has dtype {dtype}; expected numbers."
        )
    return value, (~value.is_finite()).fill_null(True)  # Float32 overflow is bad too


def parse_label(s: pl.Series) -> tuple[pl.Series, pl.Series]:
    """A label column as Boolean (True: chosen), and where a value is missing or
    not a label: booleans, the numbers 0 and 1, or the words of :data:`LABEL_TEXT`
    (any case; ``1.0`` as pandas writes a column with gaps)."""
    if isinstance(s.dtype, pl.Categorical | pl.Enum):
        s = s.cast(pl.String)
    if s.dtype == pl.Boolean:
        value = s
    elif s.dtype.is_numeric() or s.dtype == pl.Null:
        number = _select(s, pl.first().cast(pl.Float64, strict=False))
        value = _select(
            number,
            pl.when(pl.first() == 1.0)
            .then(True)
            .when(pl.first() == 0.0)
            .then(False)
            .otherwise(None),
        )
    elif s.dtype == pl.String:
        text = _select(s, pl.first().str.strip_chars(PADDING).str.to_lowercase())
        text = _select(text, pl.first().str.replace(r"^([01])\.0*$", "$1"))
        value = _select(
            text,
            pl.first().replace_strict(
                list(LABEL_TEXT),
                list(LABEL_TEXT.values()),
                default=None,
                return_dtype=pl.Boolean,
            ),
        )
    else:
        raise DataError(
            f"`label_col` = {s.name!r} has dtype {s.dtype}; a label is 1 (chosen) or "
            "0 (shown, not chosen), true/false or yes/no."
        )
    return value.cast(pl.Boolean), value.is_null()


def weights_from_names(
    s: pl.Series, weights: dict[str, float]
) -> tuple[pl.Series, pl.Series, pl.Series]:
    """Each value of ``s`` (as text, stripped) looked up in ``weights``: the weights
    (Float32, null where none), where the value is missing or empty, and where it
    is a value ``weights`` does not list."""
    if isinstance(s.dtype, pl.Categorical | pl.Enum):  # pandas' category, a dictionary
        s = s.cast(pl.String)
    if not (s.dtype == pl.String or s.dtype.is_integer() or s.dtype == pl.Null):
        raise DataError(
            f"`weight_col` = {s.name!r} has dtype {s.dtype}; with `weight_values` it "
            "should hold names (text) or integer codes."
        )
    text = _select(s, pl.first().cast(pl.String).str.strip_chars(PADDING))
    text = text.set(text.str.len_bytes() == 0, None)
    found = _select(
        text,
        pl.first().replace_strict(
            list(weights), list(weights.values()), default=None, return_dtype=pl.Float32
        ),
    )
    return found, text.is_null(), found.is_null() & text.is_not_null()


def _select(s: pl.Series, expr: pl.Expr) -> pl.Series:
    """``expr`` applied to ``s`` (an expression runs on the chunks in parallel)."""
    return s.to_frame().select(expr.alias(s.name)).to_series()


def _all_fields_empty(df: pl.DataFrame) -> pl.Series | None:
    """``[n]`` bool: every column read (mapped or a feature) is missing or empty text
    in the row; columns the reader does not read are not looked at."""
    columns = [c for c in df.columns if c not in (LINE, END)]
    if not columns:
        return None
    return df.select(
        pl.all_horizontal(
            [
                pl.col(c).cast(pl.String).str.len_bytes().fill_null(0) == 0
                for c in columns
            ]
        )
    ).to_series()


def has_date_numbers(parsed: pl.DataFrame, spec: Spec) -> bool:
    """Whether the parsed timestamps of ``parsed`` (the good rows) are dates written
    as numbers (20240301): every one, two or more, a yyyymmdd date of 1900-2100.

    Read as seconds they are a log of August 1970. A property of the whole column,
    not of a row, so the readers ask it once every block of a file is parsed (a
    block of two such values in a log of seconds is no such column).
    """
    if spec.time_format is not None or spec.time_unit != "s":
        return False
    if TIME not in spec.roles or TIME not in parsed.columns:
        return False
    return _date_numbers(parsed[TIME])


def reject_date_numbers(
    parsed: pl.DataFrame,
    spec: Spec,
    report: LoadReport,
    describe: Callable[[pl.DataFrame], list[str]],
    strict: bool,
) -> pl.DataFrame:
    """``parsed`` without its rows when its timestamps are dates written as numbers
    (:func:`has_date_numbers`): each counted as ``timestamp_as_date_number`` with
    its line (``__line``), or the first raised with ``strict``."""
    if not has_date_numbers(parsed, spec):
        return parsed
    head = parsed.head(MAX_EXAMPLES)
    texts = describe(head)
    reason = "timestamp_as_date_number"
    if strict:
        raise BadRowError(report.path, int(head[LINE][0]), reason, texts[0])
    report.add_many(reason, parsed.height, list(zip(head[LINE], texts, strict=True)))
    return parsed.clear()


def _date_numbers(value: pl.Series) -> bool:
    """Whether every value (two or more) is a yyyymmdd date of 1900-2100."""
    given = value.drop_nulls()
    if given.len() < 2:
        return False
    month, day = (given // 100) % 100, given % 100
    return bool(
        ((given >= 19000101) & (given <= 21001231)).all()
        & ((month >= 1) & (month <= 12)).all()
        & ((day >= 1) & (day <= 31)).all()
    )


def _parse_time(s: pl.Series, time_format: str | None) -> tuple[pl.Series, pl.Series]:
    if time_format is not None and s.dtype != pl.String and s.dtype.is_numeric():
        s = s.cast(pl.String)  # 20240301 with time_format="%Y%m%d"
    dtype = s.dtype
    if dtype == pl.String:
        value = _parse_time_text(s.str.strip_chars(PADDING), time_format)
    elif dtype.is_integer() or dtype == pl.Null:
        value = s.cast(pl.Int64, strict=False)
    elif isinstance(dtype, pl.Datetime):
        value = s.dt.epoch("s")
    elif dtype == pl.Date:
        value = s.cast(pl.Datetime("us")).dt.epoch("s")
    elif dtype.is_float():  # whole seconds only: a fraction is not silently cut
        whole = s.is_finite() & (s == s.floor())
        value = s.cast(pl.Int64, strict=False).set(~whole.fill_null(False), None)
    else:
        raise DataError(
            f"`time_col` = {s.name!r} has dtype {dtype}; expected integer seconds, "
            "dates or datetimes."
        )
    return value, value.is_null()


def _parse_time_text(s: pl.Series, time_format: str | None) -> pl.Series:
    """Integer epoch seconds, else ISO 8601 (or ``time_format``), else null."""
    if time_format is not None:
        try:
            return _strptime_seconds(s, (time_format,))
        except pl.exceptions.PolarsError as err:
            raise DataError(
                f"`time_format` = {time_format!r} could not be used: {err}"
            ) from err
    value = s.cast(pl.Int64, strict=False)
    todo = value.is_null() & s.is_not_null()
    if todo.any():  # whole seconds written as a float ("881250949.0": pandas writes
        # a column with a missing value so), as a float column of them is read
        whole = s.str.extract(r"^([+-]?[0-9]+)\.0*$", 1).cast(pl.Int64, strict=False)
        value = value.fill_null(whole)
        todo = value.is_null() & s.is_not_null()
    if todo.any():
        idx = todo.arg_true()
        value = value.scatter(idx, _strptime_seconds(s.gather(idx), _ISO_FORMATS))
    return value


def _strptime_seconds(s: pl.Series, formats: Iterable[str]) -> pl.Series:
    col = pl.col(s.name)
    tries = [
        col.str.strptime(pl.Datetime("us"), f, strict=False).dt.epoch("s")
        for f in formats
    ]
    return s.to_frame().select(pl.coalesce(tries).cast(pl.Int64)).to_series()


def text_lengths(df: pl.DataFrame) -> dict[str, int | None]:
    """Per column, the length of its values written plainly, summed over the rows.

    String columns count their UTF-8 bytes (nulls count 0). Int64 columns count the
    digits and minus signs of their values written canonically (None when a value is
    null): one comparison pass per power of ten that splits the column's range.
    """
    texts = [c for c, t in df.schema.items() if t == pl.String]
    ints = [c for c, t in df.schema.items() if t == pl.Int64]
    if not df.height:
        return dict.fromkeys(df.columns, 0)
    stats = df.select(
        pl.col(texts).str.len_bytes().sum(),
        pl.col(ints).null_count().name.suffix("#nulls"),
        pl.col(ints).min().name.suffix("#min"),
        pl.col(ints).max().name.suffix("#max"),
        (pl.col(ints) < 0).sum().name.suffix("#neg"),
    ).row(0, named=True)
    totals: dict[str, int | None] = {c: stats[c] for c in texts}
    digits = []
    for c in ints:
        if stats[f"{c}#nulls"]:
            totals[c] = None
            continue
        low, high, n = stats[f"{c}#min"], stats[f"{c}#max"], df.height
        terms = [pl.lit(n + stats[f"{c}#neg"], dtype=pl.Int64)]
        for k in range(1, 19):  # one more digit for each power of ten reached
            power = 10**k
            if low >= power:  # every value reaches it
                terms.append(pl.lit(n, dtype=pl.Int64))
            elif high >= power:
                terms.append((pl.col(c) >= power).sum())
            if high <= -power:
                terms.append(pl.lit(n, dtype=pl.Int64))
            elif low <= -power:
                terms.append((pl.col(c) <= -power).sum())
        digits.append(pl.sum_horizontal(terms).alias(c))
    if digits:
        totals |= df.select(digits).row(0, named=True)
    return totals


def canonical_ints(df: pl.DataFrame, cols: Iterable[str]) -> dict[str, pl.Series]:
    """The String columns of ``cols`` whose values are all canonical integers, as Int64.

    "007", "+7", " 7" and "-0" are not canonical: keeping such a column as strings
    keeps "7" and "007" apart. A value's canonical text is never longer than the text
    it was parsed from, so comparing the total text length of a column with the total
    length of its values written canonically checks every row at once.
    """
    cols = [c for c in cols if df.schema[c] == pl.String]
    if not cols or not df.height:
        return {}
    ints = df.select(pl.col(cols).cast(pl.Int64, strict=False).name.suffix("#int"))
    lengths = text_lengths(pl.concat([df.select(cols), ints], how="horizontal"))
    return {
        c: ints[f"{c}#int"].alias(c) for c in cols if lengths[f"{c}#int"] == lengths[c]
    }


def type_text_columns(df: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """Integer IDs become Int64; feature columns get the narrowest type that fits.
    A column with a number written with leading zeros (H&M's colour_group_code
    "09", a product code "0042") stays text: a code, which as a number would lose
    its zeros (and "09" would become "9")."""
    ids = [t for t in (USER, ITEM) if t in spec.roles]
    cols = canonical_ints(df, ids)
    for col in ids:
        if col not in cols and df.schema[col] == pl.String and df.height:
            # "196.0" in every row: pandas' text of an integer column with gaps, as
            # a float column of them is read (else user "196.0" is not user 196).
            whole = df[col].str.extract(r"^(0|-?[1-9][0-9]{0,17})\.0+$", 1)
            if not whole.null_count():
                cols[col] = whole.cast(pl.Int64)
                logger.info(
                    "the %s column holds integers written as floats (%r): read as "
                    "integers",
                    col,
                    df[col][0],
                )
    df = missing_as_null(df, spec)
    for col in spec.features:
        s = df[col]
        if s.dtype != pl.String or s.null_count() == s.len():
            continue
        stripped = s.drop_nulls().str.strip_chars()
        if canonical_ints(stripped.to_frame(), [col]):
            cols[col] = s.str.strip_chars().cast(pl.Int64)
        elif stripped.str.contains(r"^[+-]?0\d").any():
            continue
        elif not stripped.cast(pl.Float64, strict=False).null_count():
            cols[col] = s.str.strip_chars().cast(pl.Float64)
    return df.with_columns(**cols) if cols else df


#: Words that stand for a missing value in exports (R's NA, Python's None,
#: Excel's #N/A, SQL's NULL): read as missing in a column of numbers.
MISSING_WORDS = (
    "None",
    "none",
    "NULL",
    "null",
    "NaN",
    "nan",
    "NA",
    "N/A",
    "n/a",
    "#N/A",
)


def missing_as_null(df: pl.DataFrame, spec: Spec) -> pl.DataFrame:
    """Feature columns of text whose every value is a number or a word for a
    missing one (Amazon's metadata writes price "None", R writes NA) as numbers,
    those words missing; each such column and count is logged. A column with
    other text keeps its words ("NA" a region), as does one with a number written
    with leading zeros (a code)."""
    cols = {}
    for col in spec.features:
        s = df[col]
        if s.dtype != pl.String:
            continue
        stripped = s.str.strip_chars()
        words = stripped.is_in(MISSING_WORDS).fill_null(False)
        if not words.any():
            continue
        rest = stripped.filter(~words).drop_nulls()
        numbers = rest.cast(pl.Float64, strict=False)
        if (
            not len(rest)
            or numbers.null_count()
            or rest.str.contains(r"^[+-]?0\d").any()
        ):
            continue
        shown = sorted(set(stripped.filter(words).to_list()))
        count = int(words.sum())
        logger.warning(
            "feature column %r: %d value%s %s read as missing (every other value "
            "is a number)",
            col,
            count,
            "" if count == 1 else "s",
            " / ".join(repr(w) for w in shown),
        )
        kept = stripped.set(words, None)
        whole = canonical_ints(rest.to_frame(col), [col])
        cols[col] = kept.cast(pl.Int64 if whole else pl.Float64)
    return df.with_columns(**cols) if cols else df


def dedupe(
    df: pl.DataFrame,
    spec: Spec,
    report: LoadReport,
    describe: Callable[[pl.DataFrame], list[str]],
    path: Path | str,
) -> pl.DataFrame:
    """Apply the duplicates policy; dropped rows are counted as "duplicate"."""
    report.duplicate_policy = spec.duplicates
    if spec.duplicates == "keep":
        return df
    drop = repeats(df, spec.keys, last=spec.duplicates == "last")
    if drop is None:
        return df
    if spec.duplicates == "error":
        row = df.filter(drop).head(1)
        same = [pl.col(k) == row[k][0] for k in spec.keys]
        first = df.filter(*same).head(1)
        text, first_text = describe(row)[0], describe(first)[0]
        raise DataError(
            f"{path}:{row[LINE][0]}: duplicate {spec.keys} {text!r}, first seen "
            f"at line {first[LINE][0]} ({first_text!r}). duplicates='error' was "
            "requested; use duplicates='first', 'last' or 'keep' to load anyway."
        )
    dropped = df.filter(drop)
    head = dropped.head(MAX_EXAMPLES)
    examples = list(zip(head[LINE].to_list(), describe(head), strict=True))
    report.add_many("duplicate", dropped.height, examples)
    return df.filter(~drop)


def kept_in_groups(
    frame: pl.DataFrame, keys: Sequence[str], *, last: bool
) -> pl.Series:
    """Per row, whether it is the one its group of equal ``keys`` keeps: the first
    in frame order (``last``: the last), of the rows labelled chosen where the
    group holds one. An impression logged with its click at the same moment is a
    choice, whichever line came first."""
    key = pl.struct(list(keys))
    if LABEL not in frame.columns:
        chosen = key.is_last_distinct() if last else key.is_first_distinct()
        return frame.select(chosen).to_series()
    ranked = (
        frame.select(key.alias("key"), pl.col(LABEL).fill_null(False).alias("chosen"))
        .with_row_index("row")
        .sort(["chosen", "row"], descending=[True, last])
    )
    kept = ranked.filter(pl.col("key").is_first_distinct())["row"]
    return pl.int_range(frame.height, eager=True).is_in(kept.implode())


def repeats(df: pl.DataFrame, keys: Sequence[str], *, last: bool) -> pl.Series | None:
    """Rows repeating the ``keys`` of another row (all but the one each group keeps:
    :func:`kept_in_groups`), or None when there are none.

    Rows are first told apart by a 64-bit hash of their keys, which is cheap; only rows
    whose hash repeats are compared exactly.
    """
    if df.height < 2:
        return None
    key = pl.struct(list(keys))
    hashes = df.select(key.hash(seed=0)).to_series()
    if hashes.n_unique() == df.height:  # faster than is_duplicated when all differ
        return None
    maybe = hashes.is_duplicated()
    idx = maybe.arg_true()
    repeated = ~kept_in_groups(df[idx], keys, last=last)
    if not repeated.any():
        return None
    flags = pl.repeat(False, df.height, eager=True)
    return flags.scatter(idx.filter(repeated), True)


def load_parquet(
    path: Path, make_spec: Callable[[list[str]], Spec], opts: Options
) -> tuple[pl.DataFrame, LoadReport, Spec, Callable[[pl.DataFrame], list[str]]]:
    """Read and check a Parquet file; a row's "line" is its 1-based row number.

    Returns:
        The good rows (parsed, with ``__line`` when lines may be needed later), the
        report, the resolved spec, and a function describing rows for messages.
    """
    try:
        fields = nested_columns(pl.read_parquet_schema(path), str(path))
        spec = make_spec(list(fields))
        raw = (
            pl.scan_parquet(path)
            .select(fields[name].expr.alias(name) for name in spec.sources)
            .collect()
        )
    except (OSError, pl.exceptions.PolarsError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from err
    return load_frame(raw, str(path), spec, opts)


class NestedColumn(NamedTuple):
    """A column as :func:`nested_columns` names it: the expression that reads it
    from a frame of the file's columns, and the file's column it reads."""

    expr: pl.Expr
    root: str


def nested_columns(
    schema: Mapping[str, pl.DataType], label: str
) -> dict[str, NestedColumn]:
    """Each column of ``schema`` by name, a struct's fields in its place named by
    their paths (``geo.country``, at any depth, in the schema's order), each with
    the expression that reads it.

    Raises:
        DataError: two columns would have one name (``"a.b"`` beside a struct
            ``a`` with a field ``b``).
    """
    found: dict[str, NestedColumn] = {}

    def add(name: str, dtype: Any, expr: pl.Expr, root: str) -> None:
        if isinstance(dtype, pl.Struct):
            for inner in dtype.fields:
                field = expr.struct.field(inner.name)
                add(f"{name}.{inner.name}", inner.dtype, field, root)
            return
        if name in found:
            raise DataError(
                f"{label}: the column {name!r} and the field "
                f"{name.rsplit('.', 1)[-1]!r} of the struct {name.rsplit('.', 1)[0]!r} "
                f"would both be the column {name!r}; rename one of them."
            )
        found[name] = NestedColumn(expr, root)

    for name, dtype in schema.items():
        add(name, dtype, pl.col(name), name)
    return found


def load_frame(
    raw: pl.DataFrame,
    label: str,
    spec: Spec,
    opts: Options,
    *,
    lines: pl.Series | None = None,
) -> tuple[pl.DataFrame, LoadReport, Spec, Callable[[pl.DataFrame], list[str]]]:
    """Check an in-memory table (a Parquet file's, a JSON file's, or a caller's
    frame) as a file is checked; a row's "line" is its 1-based row number, or its
    entry of ``lines`` (a JSON file's physical lines), and ``label`` names the table
    in the report."""
    report = LoadReport(path=label, rows_read=raw.height)
    parsed, reason = parse_columns(raw, spec)
    numbers = (
        pl.int_range(1, raw.height + 1, dtype=pl.Int64, eager=True).alias(LINE)
        if lines is None
        else lines.cast(pl.Int64).alias(LINE)
    )
    if (
        reason is not None
        or spec.duplicates != "keep"
        or has_date_numbers(parsed, spec)  # rejected once parsed: lines name them
    ):
        parsed = parsed.with_columns(numbers)
    if reason is not None:
        bad = raw.with_columns(numbers).filter(reason.is_not_null())
        bad_reasons = reason.drop_nulls()
        if opts.strict:
            row = bad.row(0, named=True)
            line = row.pop(LINE)
            raise BadRowError(label, line, bad_reasons[0], repr(row))
        for r in bad_reasons.unique(maintain_order=True):
            rows = bad.filter(bad_reasons == r)
            head = rows.head(MAX_EXAMPLES)
            text = [repr(d) for d in head.drop(LINE).to_dicts()]
            report.add_many(r, rows.height, list(zip(head[LINE], text, strict=True)))
        parsed = parsed.filter(reason.is_null())

    def describe(rows: pl.DataFrame) -> list[str]:
        return [repr(d) for d in rows.drop(LINE).to_dicts()]

    return parsed, report, spec, describe
