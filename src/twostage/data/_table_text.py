"""Reading delimited text: encoding, separator sniffing and the polars fast path.

polars parses the whole file and vectorised checks look for anything wrong; only when
they find or suspect a problem does the file go to the exact path of
:mod:`twostage.data._table_lines`.
"""

from __future__ import annotations

import codecs
import csv
import logging
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from twostage.data._table_lines import (
    EOL,
    Layout,
    Uncommented,
    clean_line,
    dialect,
    iter_lines,
    physical_lines,
    placeholder,
    read_exact,
    restore,
    substitute,
)
from twostage.data._table_values import (
    END,
    LINE,
    Options,
    Spec,
    canonical_ints,
    has_date_numbers,
    parse_columns,
    repeats,
    text_lengths,
    type_text_columns,
)
from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT
from twostage.data.report import COMMENT_MARKS, LoadReport
from twostage.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Separators tried, in order of preference, when ``separator=None``.
SEPARATORS = (",", "\t", ";", "|", "::")
_SAMPLE_BYTES = 1 << 20
_SNIFF_CHARS = 1 << 16
_SNIFF_LINES = 100
_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")
_CANONICAL = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
#: RecBole's atomic files name each column with its type: ``item_id:token``.
_RECBOLE_NAME = re.compile(r"(.+):(token|token_seq|float|float_seq)")


class _Source:
    """The bytes of a text file and the codec that decodes them."""

    def __init__(self, path: Path, encoding: str) -> None:
        self.path = path
        self.auto = encoding.lower() == "auto"
        with path.open("rb") as f:
            self.head = f.read(_SAMPLE_BYTES)
        self.complete = len(self.head) < _SAMPLE_BYTES
        if self.auto:
            self.codec = (
                "utf-8-sig" if self.head.startswith(codecs.BOM_UTF8) else "utf-8"
            )
            # Excel's "Unicode text" and PowerShell write UTF-16 with a BOM; read
            # as latin-1 its NULs made every column name and ID garbage.
            for bom, codec in (
                (codecs.BOM_UTF32_LE, "utf-32"),
                (codecs.BOM_UTF32_BE, "utf-32"),
                (codecs.BOM_UTF16_LE, "utf-16"),
                (codecs.BOM_UTF16_BE, "utf-16"),
            ):
                if self.head.startswith(bom):
                    self.codec = codec
                    break
            try:
                self._decode_head()
            except UnicodeDecodeError:
                self.fall_back_to_latin1(path.read_bytes())
        else:
            try:
                name = codecs.lookup(encoding).name
            except LookupError as err:
                raise ConfigError(
                    f"`encoding` should be 'auto' or a Python codec name. "
                    f"Received: {encoding!r}."
                ) from err
            self.codec = "utf-8-sig" if name == "utf-8" else name  # drop a BOM

    def _decode_head(self) -> str:
        decoder = codecs.getincrementaldecoder(self.codec)()
        return decoder.decode(self.head, final=self.complete)

    def sample(self) -> str:
        try:
            return self._decode_head()
        except UnicodeDecodeError as err:
            raise DataError(f"{self.path}: not valid {self.codec}: {err}") from err

    @property
    def is_utf8(self) -> bool:
        return self.codec in ("utf-8", "utf-8-sig")

    def text(self) -> str:
        """The whole file, decoded; in auto mode, latin-1 when it is not UTF-8."""
        data = self.path.read_bytes()
        try:
            return data.decode(self.codec)
        except UnicodeDecodeError as err:
            if not (self.auto and self.is_utf8):
                raise DataError(f"{self.path}: not valid {self.codec}: {err}") from err
        self.fall_back_to_latin1(data)
        return data.removeprefix(codecs.BOM_UTF8).decode("latin-1")

    def fall_back_to_latin1(self, data: bytes) -> None:
        """Decode an invalid-UTF-8 file as latin-1, unless it mixes encodings.

        A file whose other lines hold real UTF-8 (multi-byte characters) is not a
        latin-1 file with a few odd rows: decoding all of it as latin-1 would turn
        ``usér`` into ``usÃ©r``, a second user. Such a file is refused, naming the
        lines that are not UTF-8.

        Raises:
            DataError: the file mixes UTF-8 and other bytes.
        """
        bad, utf8_text = [], False
        for number, line in enumerate(data.split(b"\n"), start=1):
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(number)
                continue
            utf8_text = utf8_text or not decoded.isascii()
        if utf8_text and bad:
            shown = ", ".join(str(n) for n in bad[:5])
            raise DataError(
                f"{self.path} mixes encodings: most lines are UTF-8, but {len(bad)} "
                f"line(s) are not (first: {shown}). Re-encode those lines as UTF-8, "
                "or read the whole file as latin-1 with encoding='latin-1' if that is "
                "what it is."
            )
        logger.info("%s is not valid UTF-8; decoding it as latin-1.", self.path)
        self.codec = "latin-1"


class HeaderGivenError(DataError):
    """A file read with ``column_names`` has those names on its first line."""


def load_text(
    path: Path, make_spec: Callable[[list[str]], Spec], opts: Options
) -> tuple[pl.DataFrame, LoadReport, Spec, Callable[[pl.DataFrame], list[str]]]:
    """Read and check a delimited text file: the fast path, else the exact path.

    Returns:
        The good rows (parsed and typed; with ``__line``/``__end`` from the exact
        path), the report, the resolved spec, and a function giving the text of rows
        for messages.
    """
    src = _Source(path, opts.encoding)
    layout = _sniff_layout(src, opts)
    spec = make_spec(layout.names)
    report = LoadReport(path=str(path))
    parsed = None if layout.leading_blank else read_fast(src, layout, spec, report)
    if parsed is not None and has_date_numbers(parsed, spec):
        parsed = None  # their rows are rejected: the exact path has their lines
    text = ""
    if parsed is None:
        text = substitute(src.text(), layout)
        parsed = read_exact(text, layout, spec, report, opts.strict)
    else:
        report.rows_read = parsed.height
    parsed = type_text_columns(parsed, spec)
    parsed = _as_lists(parsed, layout.sequences, spec)

    def describe(rows: pl.DataFrame) -> list[str]:
        if not text:  # the fast path never drops rows, so it never gets here
            return [""] * rows.height
        spans = list(zip(rows[LINE].to_list(), rows[END].to_list(), strict=True))
        found = physical_lines(text, spans)
        return [clean_line(found[s], layout) for s in spans]

    return parsed, report, spec, describe


def _sniff_layout(src: _Source, opts: Options) -> Layout:
    """Separator, column names and a few records from the first megabyte."""
    sample = src.sample()
    head = sample[:_SNIFF_CHARS]
    lines = EOL.split(head)
    if not src.complete or len(head) < len(sample):
        lines = lines[:-1]  # probably cut short
    prefix = opts.comment_prefix
    if prefix is None:
        _warn_of_comments(src.path, lines)
    else:  # (for the sniffing only: a comment inside a quoted field is text)
        lines = [x for x in lines if not x.startswith(prefix)]
    filled = [x for x in lines if x.strip()]
    sep = opts.separator or (_sniff_separator(filled, opts) if filled else ",")
    token = sep if len(sep) == 1 else placeholder(sample, sep)
    text = sample.replace(sep, token) if len(sep) > 1 else sample
    records = _sample_records(text, token, opts)
    if len(sep) > 1:
        records = [[f.replace(token, sep) for f in r] for r in records]
    if not src.complete:
        records = records[:-1] or records  # the last one may be cut short
    names: list[str] = []
    if opts.has_header:
        if not records:
            raise DataError(f"{src.path}: the file is empty; expected a header line.")
        names = [n.strip() or f"column_{i}" for i, n in enumerate(records[0], 1)]
        rows = records[1:]
        if (
            opts.column_names is None
            and rows
            and all(len(r) == len(names) + 1 and not r[-1].strip() for r in rows)
        ):  # "1,2,3," under "a,b,c": else every row would be a wrong_field_count
            names.append(f"column_{len(names) + 1}")
            logger.info(
                "%s: the lines end in a separator the header lacks; read as an "
                "empty last column",
                src.path,
            )
        if opts.column_names is not None and len(opts.column_names) != len(names):
            raise DataError(
                f"`column_names` has {len(opts.column_names)} names but the header of "
                f"{src.path} has {len(names)}: {names}."
            )
    elif opts.column_names is None:
        if not records:
            raise DataError(
                f"{src.path}: the file is empty; pass `column_names` to read it."
            )
        names = [f"column_{i}" for i in range(1, len(records[0]) + 1)]
    elif records and all(len(r) != len(opts.column_names) for r in records):
        raise DataError(  # else every row would be a wrong_field_count
            f"`column_names` has {len(opts.column_names)} names but the lines of "
            f"{src.path} have {len(records[0])} fields (the first: {records[0]})."
        )
    elif records and [f.strip().lower() for f in records[0]] == [
        n.strip().lower() for n in opts.column_names
    ]:  # else the header would be read as a row: user "user_id", item "item_id"
        raise HeaderGivenError(
            f"the first line of {src.path} holds the names given as `column_names` "
            f"({records[0]}): the file has a header. Read it without `column_names`."
        )
    sequences: dict[str, str] = {}
    typed = [_RECBOLE_NAME.fullmatch(n) for n in names]
    if opts.column_names is None and names and all(typed):
        names = [m[1] for m in typed if m]
        sequences = {m[1]: m[2] for m in typed if m and m[2].endswith("_seq")}
        logger.info(
            "%s: a RecBole atomic header (name:type); columns read by their names%s",
            src.path,
            f", {sorted(sequences)} as lists of their space-separated values "
            "(titles and names as text)"
            if sequences
            else "",
        )
    names = list(opts.column_names or names)
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:  # which one would a mapping mean? Say so rather than pick one.
        where = {n: [i + 1 for i, m in enumerate(names) if m == n] for n in repeated}
        raise DataError(
            f"{src.path}: the header names {repeated} more than once (columns "
            f"{where}); a column mapping could not tell them apart. Rename them in the "
            "file, or pass `column_names` with distinct names."
        )
    if not opts.has_header and _looks_like_a_header(records):
        logger.warning(
            "%s: read without a header, its first line %s looks like one (text "
            "where the lines below hold numbers); it is read as a row. If it is "
            "a header, read the file with it (without `column_names`).",
            src.path,
            records[0],
        )
    leading_blank = not (lines and lines[0].strip())
    samples = records[1:] if opts.has_header else records
    eol = "\r" if "\r" in sample and "\n" not in sample else "\n"
    return Layout(
        sep,
        token,
        opts.quote_char,
        opts.has_header,
        names,
        leading_blank,
        eol,
        samples,
        prefix,
        sequences,
    )


def _as_lists(df: pl.DataFrame, sequences: dict[str, str], spec: Spec) -> pl.DataFrame:
    """RecBole's ``token_seq`` / ``float_seq`` feature columns as lists of their
    space-separated values (multi-hot features), except titles and names, which are
    text (RecBole types a movie title ``token_seq`` too)."""
    lists = []
    for name, kind in sequences.items():
        if name not in spec.features or re.search("title|name", name.lower()):
            continue
        words = (
            pl.col(name)
            .cast(pl.String)
            .str.split(" ")
            .list.eval(pl.element().filter(pl.element() != ""))
        )
        if kind == "float_seq":
            words = words.list.eval(pl.element().cast(pl.Float64, strict=False))
        lists.append(words.alias(name))
    return df.with_columns(lists) if lists else df


def _warn_of_comments(path: Path, lines: list[str]) -> None:
    """Warn when a file read without ``comment_prefix`` opens with lines that look
    like comments (SNAP's ``#``, KONECT's ``%``): they are read as rows, and a
    KONECT line such as ``% 3000 300 200`` even parses as one."""
    filled = [x for x in lines if x.strip()]
    if not filled or not filled[0].startswith(COMMENT_MARKS):
        return
    mark = filled[0][0]
    count = next(
        (i for i, x in enumerate(filled) if not x.startswith(mark)), len(filled)
    )
    logger.warning(
        "%s: its first %d line(s) start with %r, as comment lines do (SNAP's and "
        "KONECT's files open with some): they are read as rows. Skip them with "
        "comment_prefix=%r (--comment-prefix '%s').",
        path,
        count,
        mark,
        mark,
        mark,
    )


def _looks_like_a_header(records: list[list[str]]) -> bool:
    """Whether the first record has text in a column where every other sampled
    record has a number (``uid,iid`` above ``1,2``)."""
    if len(records) < 3:
        return False
    first, rest = records[0], records[1:]

    def number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    return any(
        not number(first[c]) and all(c < len(r) and number(r[c]) for r in rest)
        for c in range(len(first))
    )


def _sniff_separator(lines: list[str], opts: Options) -> str:
    """The candidate giving the most consistent field count (>= 2) per line; a
    space only when no candidate splits the lines (SNAP's and LibRec's
    ``user item rating`` files), since text fields hold spaces; a comma where
    no line holds any of them (one column)."""
    lines = lines[:_SNIFF_LINES]
    choice = _most_consistent(lines, SEPARATORS, opts)
    if not choice:
        choice = _most_consistent(lines, (" ",), opts)
        if choice:
            logger.info("fields separated by a space (no other separator found)")
    if not choice and not any(
        sep in line for line in lines for sep in (*SEPARATORS, " ")
    ):
        # No line holds any separator: one column (a list of IDs, such as an
        # items file without features), which any separator reads alike.
        logger.info("one column (no separator in any line)")
        return ","
    if not choice:
        raise DataError(
            f"could not detect the separator among {[*SEPARATORS, ' ']}. "
            "Pass it with `separator`."
        )
    return choice


def _most_consistent(
    lines: list[str], candidates: tuple[str, ...], opts: Options
) -> str:
    """The candidate giving the most consistent field count (>= 2), "" if none."""
    best: tuple[float, int, int] | None = None
    choice = ""
    for rank, sep in enumerate(candidates):
        if len(sep) > 1:
            counts = [len(x.split(sep)) for x in lines]
        else:
            try:
                counts = [
                    len(r)
                    for r in csv.reader(
                        lines, dialect(sep, opts.quote_char, strict=False)
                    )
                ]
            except csv.Error:
                continue
        if not counts:
            continue
        fields, freq = Counter(counts).most_common(1)[0]
        score = (freq / len(counts), fields, -rank)
        if fields >= 2 and (best is None or score > best):
            best, choice = score, sep
    return choice


def _sample_records(sample: str, token: str, opts: Options) -> list[list[str]]:
    """The first non-blank records of the sample (fields as read, quotes removed),
    comment lines left out."""
    fmt = dialect(token, opts.quote_char, strict=False)
    records = []
    lines = Uncommented(iter_lines(sample), opts.comment_prefix)
    try:
        for row in csv.reader(lines, fmt):
            lines.record_ended()
            if row and any(x.strip() for x in row):
                records.append(row)
                if len(records) > _SNIFF_LINES:
                    break
    except csv.Error as err:
        logger.debug("stopped sampling records at a csv error: %s", err)
    return records


def read_fast(
    src: _Source, layout: Layout, spec: Spec, report: LoadReport
) -> pl.DataFrame | None:
    """Parse and check with polars; None when the file needs the exact path.

    ``report.comment_lines`` gets the comment lines polars skipped.
    """
    parsed = None
    for _ in range(2):
        source = _polars_input(src, layout)
        parsed = _polars_parse(source, Shape.of(source, layout), layout, spec)
        if parsed is not None or not (src.auto and src.codec == "utf-8"):
            break
        data = src.path.read_bytes()
        try:  # polars rejects invalid UTF-8: is that why it failed?
            data.decode("utf-8")
            break
        except UnicodeDecodeError:
            src.fall_back_to_latin1(data)
    if parsed is None:
        return None
    df, shape, verified = parsed
    if df.width != len(layout.names) or df[layout.names[-1]].null_count():
        return None  # a short row, or an empty last field: only csv can tell
    if shape.comments:  # counted by line start: is one a line inside a quoted field?
        marks = [f"\n{layout.comment}", f"\r{layout.comment}"]
        texts = [c for c, t in df.schema.items() if t == pl.String]
        inside = pl.any_horizontal(
            pl.col(c).str.contains_any(marks).any() for c in texts
        )
        if texts and df.select(inside).item():
            return None
    df = restore(df, layout)
    ids = {spec.roles[t]: t for t in (USER, ITEM) if t in spec.roles}
    ready = {ids[c]: df[c] for c in ids if c in verified}
    rest = [c for c in ids if c not in verified]
    ready |= {ids[c]: v for c, v in canonical_ints(df, rest).items()}
    if shape.other_eol:  # a lone CR (or a LF in a CR file) ends a line for csv
        # Integers cannot hold one, and numbers or times holding one fail to parse.
        done = {spec.roles[t] for t in ready}
        done |= {c for t, c in spec.roles.items() if t in (TIME, RATING, WEIGHT)}
        texts = [c for c, t in df.schema.items() if t == pl.String and c not in done]
        eol = "\r" if layout.eol == "\n" else "\n"
        if texts:
            found = df.select(pl.col(texts).str.contains(eol, literal=True).any())
            if True in found.row(0):
                return None
    parsed_df, reason = parse_columns(df, spec, ready)
    if reason is not None:
        return None
    report.comment_lines = shape.comments
    if (
        spec.duplicates != "keep"
        and repeats(parsed_df, spec.keys, last=False) is not None
    ):
        return None  # dropped duplicates need line numbers
    return parsed_df


def _polars_input(src: _Source, layout: Layout) -> str | bytes:
    """What polars should read: the path, or the text as UTF-8 bytes."""
    if src.is_utf8 and len(layout.sep) == 1:  # polars skips a UTF-8 BOM itself
        return str(src.path)
    return substitute(src.text(), layout).encode("utf-8")


@dataclass(frozen=True)
class Shape:
    """Byte facts about what polars reads."""

    size: int
    header: int  # bytes before the first data row, BOM included; -1 if unknown
    ends_with_eol: bool
    other_eol: bool  # a CR in a LF/CRLF file, or a LF in a CR file
    crs: int  # how many CRs a LF/CRLF file holds (0 in a CR file)
    comments: int = 0  # lines starting with the layout's comment prefix

    @classmethod
    def of(cls, source: str | bytes, layout: Layout) -> Shape:
        if isinstance(source, bytes):
            return cls._of(source, layout)
        with open(source, "rb") as f:
            if not os.fstat(f.fileno()).st_size:
                return cls(0, -1, False, False, 0, 0)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return cls._of(buf, layout)

    @classmethod
    def _of(cls, buf: bytes | mmap.mmap, layout: Layout) -> Shape:
        eol, other = layout.eol.encode(), (b"\r" if layout.eol == "\n" else b"\n")
        header = (buf.find(eol) + 1 or -1) if layout.has_header else 0
        ends = buf[len(buf) - 1 :] == eol
        other_eol = buf.find(other) >= 0
        crs = _count_cr(buf) if other_eol and layout.eol == "\n" else 0
        comments = 0
        if layout.comment:  # at the start, after a LF, or after a CR not before one
            mark = re.escape(layout.comment.encode("utf-8"))
            start = re.compile(rb"(?:\A|\n|\r(?!\n))" + mark)
            comments = sum(1 for _ in start.finditer(buf))
        return cls(len(buf), header, ends, other_eol, crs, comments)


def _count_cr(buf: bytes | mmap.mmap, step: int = 1 << 24) -> int:
    """How many CRs ``buf`` holds (mmap has no ``count`` before Python 3.13)."""
    data = np.frombuffer(buf, dtype=np.uint8)
    return sum(
        int(np.count_nonzero(data[i : i + step] == 13))
        for i in range(0, len(data), step)
    )


def _polars_parse(
    source: str | bytes, shape: Shape, layout: Layout, spec: Spec
) -> tuple[pl.DataFrame, Shape, set[str]] | None:
    """Parse the whole file with polars, trying the cheapest dtypes first.

    1. *Lean*: the ID and time columns whose sampled values are canonical integers
       are parsed as Int64, everything else as String. Accepted only when the file
       size equals the length of the text the frame holds (canonical integers, no
       quotes, one LF or CRLF per row), which proves no integer was written "007" or
       "+7".
    2. Ratings and weights as Float64 (and integer-looking times as Int64), the rest
       as String; the IDs are checked afterwards.
    3. All String.

    Returns:
        The frame, ``shape``, and the Int64 columns proven canonical; None when polars
        cannot parse the file.
    """
    ints = [
        c
        for t, c in spec.roles.items()
        if t in (USER, ITEM) or (t == TIME and spec.time_format is None)
    ]
    lean = [c for c in ints if _sampled(layout, c, _CANONICAL)]
    typed: dict[str, pl.DataType] = {
        c: pl.Float64()
        for t, c in spec.roles.items()
        if t == RATING or (t == WEIGHT and not spec.weight_values)  # else: names
    }
    if TIME in spec.roles and _sampled(layout, spec.roles[TIME], _INT_TEXT):
        typed[spec.roles[TIME]] = pl.Int64()
    attempts: list[tuple[dict[str, pl.DataType], bool]] = []
    if lean and layout.eol == "\n" and shape.header >= 0 and not shape.comments:
        attempts.append((dict.fromkeys(lean, pl.Int64()), True))
    if typed:
        attempts.append((typed, False))
    attempts.append(({}, False))
    for dtypes, check in attempts:
        try:
            df = pl.read_csv(
                source,
                has_header=layout.has_header,
                new_columns=layout.names,
                schema_overrides=[dtypes.get(n, pl.String()) for n in layout.names],
                infer_schema=False,
                separator=layout.token,
                quote_char=layout.quote,
                comment_prefix=layout.comment if shape.comments else None,
                eol_char=layout.eol,
                raise_if_empty=False,
            )
        except pl.exceptions.PolarsError as err:
            logger.debug("polars could not parse the file as %s: %s", dtypes, err)
            continue
        if not check:
            return df, shape, set()
        if sizes_match(df, shape, layout):
            return df, shape, set(dtypes)
    return None


def sizes_match(df: pl.DataFrame, shape: Shape, layout: Layout) -> bool:
    """Whether the file holds exactly the text of ``df`` written plainly.

    Each data row takes its fields, one separator byte between them and a line end
    (none after the last row when the file does not end with one). Any other byte
    (quotes, "007", "+7", " 7") makes the file longer. A file with CRs must hold one
    per line, so each line ends with CRLF: a CR elsewhere would sit in a field, where
    an integer column fails to parse and a text column is searched for it later.
    """
    if not df.height:
        return True
    eol_bytes = 1
    if shape.crs:
        lines = df.height + layout.has_header - (not shape.ends_with_eol)
        if shape.crs != lines:
            return False
        eol_bytes = 2
    lengths = text_lengths(df)
    if None in lengths.values():
        return False
    per_row = len(layout.names) - 1 + eol_bytes
    frame = shape.header + df.height * per_row - eol_bytes * (not shape.ends_with_eol)
    return frame + sum(n or 0 for n in lengths.values()) == shape.size


def _sampled(layout: Layout, col: str, pattern: re.Pattern[str]) -> bool:
    """Whether every sampled value of ``col`` matches ``pattern``."""
    i = layout.names.index(col)
    values = [r[i] for r in layout.samples if len(r) == len(layout.names)]
    return bool(values) and all(pattern.fullmatch(v) for v in values)
