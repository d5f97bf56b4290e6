"""Physical lines of delimited text, and the exact (csv module) reading path.

Lines end at LF, CRLF or CR, as Python reads them with ``newline=""``. The exact path
tokenises records with :mod:`csv`, counts physical lines through quoted newlines, and
classifies every record; values are checked a chunk at a time by
:func:`twostage.data._table_values.parse_columns`.
"""

from __future__ import annotations

import csv
import gc
import io
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import polars as pl

from twostage.data._table_values import END, LINE, Spec, parse_columns
from twostage.data.report import MAX_EXAMPLES, LoadReport
from twostage.errors import BadRowError, DataError

EOL = re.compile(r"\r\n|\r|\n")
_PLACEHOLDERS = ("\x1f", "\x1e", "\x1d", "\x1c", "\x01", "\x02", "\x03")
_CHUNK_ROWS = 200_000


@dataclass
class Layout:
    """How a text file is cut into fields."""

    sep: str  # as in the file, e.g. "::"
    token: str  # single character the tokenisers split on (a placeholder for "::")
    quote: str | None
    has_header: bool
    names: list[str]
    leading_blank: bool  # blank lines before the first record
    eol: str  # "\r" when the sample has CRs but no LF, else "\n" (LF or CRLF)
    samples: list[list[str]]  # the first data records, to choose dtypes
    comment: str | None = None  # a record starting with it is a comment line
    # RecBole's typed header ("class:token_seq"): the columns of space-separated
    # lists, by name, and their kind ("token_seq" or "float_seq")
    sequences: dict[str, str] = field(default_factory=dict)


class Uncommented:
    """Physical lines for :mod:`csv`, with comment lines given as blank ones.

    A line is a comment when it starts with ``prefix`` where a record starts: inside
    a quoted field it is text, as polars reads it. The reader says where records
    start by calling :meth:`record_ended` after each one (csv pulls the lines of one
    record, then returns it). A comment's quotes are never tokenised, so an
    unbalanced one cannot swallow the lines after it.
    """

    def __init__(self, lines: Iterator[str], prefix: str | None, number: int = 0):
        self.lines, self.prefix = lines, prefix
        self.number = number  # physical lines handed out so far
        self.at_start = True
        self.last_comment = 0  # the line number of the last comment handed out

    def __iter__(self) -> Uncommented:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.number += 1
        if self.at_start and self.prefix and line.startswith(self.prefix):
            self.last_comment = self.number
            return "\n"  # csv reads an empty record
        self.at_start = False
        return line

    def record_ended(self) -> None:
        self.at_start = True


def dialect(token: str, quote: str | None, strict: bool = True) -> type[csv.Dialect]:
    """A csv dialect splitting on ``token``; ``strict`` rejects bad quoting."""

    class Dialect(csv.Dialect):
        delimiter = token
        quotechar = quote or '"'
        quoting = csv.QUOTE_NONE if quote is None else csv.QUOTE_MINIMAL
        doublequote = True
        skipinitialspace = False
        lineterminator = "\n"

    Dialect.strict = strict
    return Dialect


def iter_lines(text: str, block: int = 1 << 20) -> Iterator[str]:
    """Physical lines with their endings (LF, CRLF or CR, as ``newline=""`` reads).

    The text goes to :class:`io.StringIO` a block at a time: a whole file would be
    copied as 4-byte characters.
    """
    return itertools.chain.from_iterable(
        io.StringIO(part, newline="") for part in _blocks(text, block)
    )


def _blocks(text: str, block: int) -> Iterator[str]:
    """Cut ``text`` into pieces of about ``block`` characters, after a line end."""
    pos, n = 0, len(text)
    while pos < n:
        end = min(pos + block, n)
        if end < n:  # cut after a line end, never inside "\r\n"
            j = text.rfind("\n", pos, end)
            if j < 0:
                j = text.rfind("\r", pos, end - 1)
            if j >= 0:
                end = j + 1
            else:
                m = EOL.search(text, end)
                end = m.end() if m else n
        yield text[pos:end]
        pos = end


def physical_lines(
    text: str, spans: list[tuple[int, int]]
) -> dict[tuple[int, int], str]:
    """The text of 1-based inclusive line spans."""
    if not spans:
        return {}
    last = max(end for _, end in spans)
    lines: dict[int, str] = {}
    wanted = {i for start, end in spans for i in range(start, end + 1)}
    for number, line in enumerate(iter_lines(text), 1):
        if number in wanted:
            lines[number] = line
        if number >= last:
            break
    return {
        (s, e): "".join(lines.get(i, "") for i in range(s, e + 1)) for s, e in spans
    }


def clean_line(raw: str, layout: Layout) -> str:
    """A record's text for messages: no final line end, the real separator."""
    raw = raw.rstrip("\r\n")
    return raw.replace(layout.token, layout.sep) if len(layout.sep) > 1 else raw


def placeholder(text: str, sep: str) -> str:
    """A control character absent from ``text``, to stand in for ``sep``."""
    for ch in _PLACEHOLDERS:
        if ch not in text and ch not in sep:
            return ch
    raise DataError(
        f"separator {sep!r} has several characters and the file uses every control "
        f"character twostage could stand in for it ({_PLACEHOLDERS!r})."
    )


def substitute(text: str, layout: Layout) -> str:
    """Stand a single placeholder character in for a multi-character separator."""
    if len(layout.sep) == 1:
        return text
    if layout.token in text:
        layout.token = placeholder(text, layout.sep)
    return text.replace(layout.sep, layout.token)


def restore(df: pl.DataFrame, layout: Layout) -> pl.DataFrame:
    """Put the multi-character separator back into the String columns."""
    if len(layout.sep) == 1:
        return df
    back = pl.col(pl.String).str.replace_all(layout.token, layout.sep, literal=True)
    return df.with_columns(back)


def read_exact(
    text: str, layout: Layout, spec: Spec, report: LoadReport, strict: bool
) -> pl.DataFrame:
    """Tokenise with :mod:`csv`, classify every record, check values chunk by chunk."""
    return _ExactReader(text, layout, spec, report, strict).run()


class _ExactReader:
    """The exact path: physical line numbers of every record, every rejection."""

    def __init__(
        self, text: str, layout: Layout, spec: Spec, report: LoadReport, strict: bool
    ) -> None:
        self.text, self.layout, self.spec = text, layout, spec
        self.report, self.strict = report, strict
        self.index = [layout.names.index(c) for c in spec.sources]
        self.rows: list[list[str]] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.parts: list[pl.DataFrame] = []
        self.examples: dict[str, list[tuple[int, int]]] = {}  # reason -> line spans
        # reason -> [rows, lines] of the rejected rows, to name those over several
        self.spans: dict[str, list[int]] = {}

    def run(self) -> pl.DataFrame:
        gc_was_enabled = gc.isenabled()
        gc.disable()  # millions of short-lived row lists: collecting them costs 2x
        try:
            self.tokenise()
        finally:
            if gc_was_enabled:
                gc.enable()
        self.fill_examples()
        for reason, (rows, lines) in self.spans.items():
            if lines > rows:
                spanned = self.report.spanned_lines
                spanned[reason] = spanned.get(reason, 0) + lines
        if self.parts:
            return pl.concat(self.parts, how="vertical")
        empty = {c: pl.Series(c, [], dtype=pl.String) for c in self.spec.sources}
        empty |= {c: pl.Series(c, [], dtype=pl.Int64) for c in (LINE, END)}
        return parse_columns(pl.DataFrame(empty), self.spec)[0]

    def tokenise(self) -> None:
        fmt = dialect(self.layout.token, self.layout.quote)
        lines = Uncommented(iter_lines(self.text), self.layout.comment)
        reader = csv.reader(lines, fmt)
        ncols, header = len(self.layout.names), self.layout.has_header
        add_row, add_start, add_end = (
            self.rows.append,
            self.starts.append,
            self.ends.append,
        )
        base = prev = 0  # lines read by earlier readers; last line of the last record
        while True:
            try:
                for row in reader:
                    lines.record_ended()
                    start, prev = prev + 1, base + reader.line_num
                    n = len(row)
                    if n == ncols and not header:
                        add_row(row)
                        add_start(start)
                        add_end(prev)
                        if len(self.rows) >= _CHUNK_ROWS:
                            self.flush()
                    elif not n and lines.last_comment == start:
                        self.report.comment_lines += 1
                    elif not n or (n == 1 and not row[0].strip()):
                        self.reject("blank_line", start, prev)
                    elif header:
                        header = False
                    else:
                        self.reject("wrong_field_count", start, prev)
                break
            except csv.Error as err:  # bad quoting
                lines.record_ended()
                start, end = prev + 1, base + reader.line_num
                if str(err).startswith("unexpected end") and end > start:
                    # An unclosed quote swallowed the rest of the file: reject only
                    # its first line and read on from the next one.
                    rest = itertools.islice(iter_lines(self.text), start, None)
                    lines = Uncommented(rest, self.layout.comment, start)
                    reader, base, end = csv.reader(lines, fmt), start, start
                prev = end
                if header:
                    header = False
                else:
                    self.reject("bad_quoting", start, end)
        self.flush()

    def reject(self, reason: str, start: int, end: int) -> None:
        if self.strict:
            self.flush()  # a bad value on an earlier line comes first
            self.fail(reason, start, end)
        self.report.rows_read += 1
        self.note(reason, 1, [(start, end)], end - start + 1)

    def note(
        self, reason: str, count: int, spans: list[tuple[int, int]], lines: int
    ) -> None:
        """Count ``count`` rejected rows over ``lines`` physical lines; ``spans``:
        the first few rows' (first line, last line)."""
        self.report.rejected[reason] = self.report.rejected.get(reason, 0) + count
        tally = self.spans.setdefault(reason, [0, 0])
        tally[0] += count
        tally[1] += lines
        kept = self.examples.setdefault(reason, [])
        kept.extend(spans[: MAX_EXAMPLES - len(kept)])

    def fail(self, reason: str, start: int, end: int) -> NoReturn:
        text = physical_lines(self.text, [(start, end)])[start, end]
        raise BadRowError(
            self.report.path, start, reason, clean_line(text, self.layout)
        )

    def fill_examples(self) -> None:
        """Give the report the text of the example rows, read in one pass."""
        spans = [span for kept in self.examples.values() for span in kept]
        found = physical_lines(self.text, spans)
        for reason, kept in self.examples.items():
            self.report.examples[reason] = [
                (start, clean_line(found[start, end], self.layout)[:200])
                for start, end in kept
            ]

    def flush(self) -> None:
        if not self.rows:
            return
        columns = list(zip(*self.rows, strict=False))
        data = {
            src: pl.Series(src, columns[i], dtype=pl.String)
            for src, i in zip(self.spec.sources, self.index, strict=True)
        }
        data[LINE] = pl.Series(LINE, self.starts, dtype=pl.Int64)
        data[END] = pl.Series(END, self.ends, dtype=pl.Int64)
        df = restore(pl.DataFrame(data), self.layout)
        parsed, reason = parse_columns(df, self.spec)
        if reason is not None:
            if self.strict:
                i = int(reason.is_not_null().arg_true()[0])
                self.fail(str(reason[i]), self.starts[i], self.ends[i])
            lines = pl.Series(self.ends) - pl.Series(self.starts) + 1
            for r in reason.drop_nulls().unique(maintain_order=True).to_list():
                rows = reason == r
                idx = rows.arg_true()[:MAX_EXAMPLES].to_list()
                spans = [(self.starts[i], self.ends[i]) for i in idx]
                self.note(r, int(rows.sum()), spans, int(lines.filter(rows).sum()))
            parsed = parsed.filter(reason.is_null())
        self.report.rows_read += len(self.rows)
        self.parts.append(parsed)
        for pending in (self.rows, self.starts, self.ends):
            pending.clear()
