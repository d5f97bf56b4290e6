"""Counting and reporting of rejected input rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["REASONS", "LoadReport"]

#: Why a row can be rejected. Every reader uses these names.
REASONS = (
    "blank_line",
    "empty_row",  # no value in any column read (e.g. a row of separators only: `,,`)
    "wrong_field_count",
    "empty_user_id",
    "empty_item_id",
    "bad_rating",
    "bad_timestamp",
    # a number that is a time only as milliseconds or microseconds since the epoch
    "timestamp_not_in_seconds",
    # with time_unit other than seconds: a number that is a time in another unit only
    "timestamp_not_in_time_unit",
    "timestamp_with_fraction",  # seconds with a fraction: refused, not cut
    # numbers that are dates (20240301): read with time_format="%Y%m%d"
    "timestamp_as_date_number",
    # a rating or weight written with a decimal comma ("4,5"), or a thousands one
    "number_with_decimal_comma",
    "duplicate",
    "bad_weight",  # a mapped weight is empty, non-numeric, not finite or negative
    "bad_label",  # a label (label_col) is missing, or not 0/1, true/false, yes/no
    "weight_value_not_mapped",  # a weight column's value that weight_values lacks
    "bad_quoting",  # a quote is unbalanced, or text follows a closing quote
    "nul_in_id",  # a user or item ID holds a NUL byte
    # a JSON line that is not one object: malformed, an array or a number, a NaN,
    # or a key given twice
    "bad_json",
    # a JSON value of another kind than the key holds in most rows: a number where
    # the others hold a list, a string where they hold an object
    "json_type_mismatch",
    # a JSON line nesting objects more than 64 deep (polars' reader would overflow
    # its stack and end the process)
    "json_too_deep",
    # a Netflix Prize rating above the first movie's line ("1:")
    "no_movie_line",
)

MAX_EXAMPLES = 5
#: First characters of the comment lines of common formats (SNAP's ``#``, KONECT's
#: ``%``), named in a hint when such lines were read as rows.
COMMENT_MARKS = ("#", "%")


@dataclass
class LoadReport:
    """What happened while reading a file: rows read, kept, and rejected by reason.

    ``examples`` keeps, per reason, the first few ``(line_number, content)`` pairs, with
    1-based physical line numbers of the source file. ``comment_lines`` counts the
    lines skipped as comments (read with ``comment_prefix``); they are not rows.
    ``shown_rows`` counts the loaded rows of an impression log (read with
    ``label_col``) that were shown and not chosen: loaded, not rejected, and kept
    apart from the interactions (``Dataset.shown``). ``spanned_lines`` gives, for a
    reason whose rejected rows took more lines than their count (a quote that
    opened a field ran over line breaks), the physical lines they took.
    """

    path: str
    rows_read: int = 0
    rows_loaded: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    duplicate_policy: str = "keep"
    comment_lines: int = 0
    shown_rows: int = 0
    spanned_lines: dict[str, int] = field(default_factory=dict)

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def ok(self) -> bool:
        return self.num_rejected == 0

    def add(self, reason: str, line: int, content: str) -> None:
        """Count one rejected row and keep it as an example if there is room."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append((line, content[:200]))

    def add_many(
        self, reason: str, count: int, examples: list[tuple[int, str]]
    ) -> None:
        """Count ``count`` rejected rows at once (vectorised readers)."""
        if count <= 0:
            return
        self.rejected[reason] = self.rejected.get(reason, 0) + count
        kept = self.examples.setdefault(reason, [])
        kept.extend(examples[: MAX_EXAMPLES - len(kept)])

    def summary(self) -> str:
        """One human-readable paragraph, e.g. for logs."""
        comments = (
            f"; {self.comment_lines} comment line(s) skipped"
            if self.comment_lines
            else ""
        )
        if self.shown_rows:
            comments += (
                f"; {self.shown_rows} of the rows loaded were shown and not chosen "
                "(label 0)"
            )
        if self.ok:
            return (
                f"{self.path}: {self.rows_loaded} rows loaded, none rejected{comments}."
            )
        parts = []
        for reason, count in sorted(self.rejected.items()):
            lines = ", ".join(str(line) for line, _ in self.examples.get(reason, []))
            spanned = self.spanned_lines.get(reason)
            over = f" over {spanned} lines" if spanned else ""
            parts.append(f"{reason}: {count}{over} (first lines: {lines})")
        hint = f" ({self.hint})" if self.hint else ""
        return (
            f"{self.path}: {self.rows_loaded} of {self.rows_read} rows loaded, "
            f"{self.num_rejected} rejected{comments}; " + "; ".join(parts) + hint
        )

    @property
    def hint(self) -> str:
        """How to fix the rejected rows where their reason says ("" otherwise)."""
        hints = []
        if "timestamp_not_in_seconds" in self.rejected:
            hints.append(
                "timestamps in milliseconds or microseconds since the epoch: read "
                "them with time_unit='ms' or 'us' (--time-unit ms)"
            )
        if "timestamp_not_in_time_unit" in self.rejected:
            hints.append(
                "timestamps that are times only in another unit than time_unit "
                "says: give the unit of the column (s, ms, us or ns)"
            )
        if "timestamp_with_fraction" in self.rejected:
            hints.append(
                "timestamps with a fraction of a second: floor the column to whole "
                "seconds first, e.g. `ts // 1`, if that order is fine"
            )
        if "number_with_decimal_comma" in self.rejected:
            hints.append(
                "ratings or weights written with a comma such as 4,5: a decimal "
                "comma or a thousands one cannot be told apart; write them with a "
                "point first, e.g. `pl.col('rating').str.replace(',', '.')`"
            )
        if "weight_value_not_mapped" in self.rejected:
            hints.append(
                "values of the weight column that weight_values does not list: give "
                "each its weight (--weight-values view=1,purchase=5)"
            )
        if "bad_label" in self.rejected:
            hints.append(
                "labels that are missing or not 1/0, true/false or yes/no: "
                "label_col (--label-col) names a column saying whether the item "
                "shown was chosen, such as clicked; a rating or a count is not one "
                "(--rating-col, --weight-col)"
            )
        if "bad_rating" in self.rejected:
            hints.append(
                "ratings that are not numbers, or missing: where a row without a "
                "rating is an interaction all the same, missing_ratings='unrated' "
                "(--missing-ratings unrated) keeps it without one"
            )
        python = [
            text
            for _, text in self.examples.get("bad_json", [])
            if text.lstrip().startswith("{'")
        ]
        if python:
            hints.append(
                "lines written as Python dicts (single quotes, True, None: Steam's "
                "and older Amazon dumps) are not JSON: convert the file once, "
                "e.g. `json.dumps(ast.literal_eval(line))` for each line"
            )
        if "json_too_deep" in self.rejected:
            hints.append(
                "JSON lines nesting objects more than 64 deep, which no reader here "
                "takes: flatten them, or keep only the keys the log needs"
            )
        if "json_type_mismatch" in self.rejected:
            hints.append(
                "JSON values of another kind than their key holds in the other rows "
                "(a number where the others hold a list): write them as the others "
                "are, e.g. a list of one for a single genre"
            )
        if "bad_quoting" in self.rejected:
            hints.append(
                "quotes that are part of the text, such as a field starting with "
                "one in a tab-separated file: read them as text with quote_char='' "
                "(--quote-char none)"
            )
        commented = [
            text
            for kept in self.examples.values()
            for _, text in kept
            if text.startswith(COMMENT_MARKS)
        ]
        if commented:
            hints.append(
                f"lines starting with {commented[0][0]!r} look like comments (SNAP's "
                "and KONECT's files open with some): skip them with "
                f"comment_prefix={commented[0][0]!r} (--comment-prefix "
                f"'{commented[0][0]}')"
            )
        if "timestamp_as_date_number" in self.rejected:
            hints.append(
                "timestamps written as dates such as 20240301: read them with "
                "time_format='%Y%m%d' (--time-format %Y%m%d)"
            )
        return "; ".join(hints)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "rejected": dict(self.rejected),
            "examples": {k: [list(e) for e in v] for k, v in self.examples.items()},
            "duplicate_policy": self.duplicate_policy,
            "comment_lines": self.comment_lines,
            "shown_rows": self.shown_rows,
            "spanned_lines": dict(self.spanned_lines),
        }
