"""Logs larger than memory: a Parquet dataset (one file or a directory of them) read
in record batches, never as one table.

- :func:`parquet_files` and :func:`row_groups`: the units of work; a rank of a
  data-parallel job takes every ``world``-th row group (:func:`iter_batches`).
- :func:`held_out_mask`: which side of the split a row is on, decided from the row
  alone (a stable hash of user, item, time and seed for ``random``; a time cut for
  ``temporal``), or from its row number and a list of held-out rows found by one
  streaming aggregation (each user's last row for ``leave-last-out``,
  :func:`last_rows`), so no global shuffle or sort is needed and any batching gives
  the same split. :func:`split_rule` computes what a method needs once.
- :func:`fit_vocabularies`: user and item vocabularies (and item counts for the logQ
  correction) from the training side, in one streaming pass whose memory is bounded
  by the number of distinct IDs, not rows. They equal
  :meth:`Vocabulary.fit` on the same rows held in memory.
- :func:`feature_tables`: the user and item feature tables carried as columns of the
  log (one row per ID, its first occurrence), in one pass whose memory is bounded by
  the number of distinct IDs; the tables the in-memory loader builds.
- :func:`count_values`: the distinct values of per-row context columns over the
  training rows, with their counts, which the context encoders fit on.
- :func:`held_out_rows`: the test side's rows, for evaluation (or the validation
  carve-out's, for early stopping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from twostage import distributed
from twostage.data._table_values import (
    ARG,
    BAD,
    TIME_UNITS,
    NestedColumn,
    Spec,
    has_date_numbers,
    kept_in_groups,
    nested_columns,
    parse_columns,
    weights_from_names,
)
from twostage.data.dataset import ITEM, LABEL, RATING, TIME, USER
from twostage.data.frames import log_names
from twostage.data.report import MAX_EXAMPLES, LoadReport
from twostage.data.split import shown_sides
from twostage.errors import ConfigError, DataError
from twostage.features.hashing import _fmix64, stable_hash
from twostage.features.vocab import Vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "KeptIds",
    "ROW",
    "Reading",
    "RunningCounts",
    "SplitRule",
    "check_file_schemas",
    "checked_weights",
    "cold_users",
    "columns_of",
    "fields_of",
    "empty_frame",
    "StreamingVocabularies",
    "count_values",
    "feature_tables",
    "fit_vocabularies",
    "held_out_rows",
    "iter_batches",
    "iter_row_groups",
    "duplicate_rows",
    "last_rows",
    "min_count_ids",
    "parquet_files",
    "row_groups",
    "temporal_cut",
    "temporal_cuts",
    "VALIDATION_SEED_OFFSET",
    "held_out_mask",
    "split_rule",
]

SPLIT_METHODS = ("random", "temporal", "leave-last-out")
#: The row-number column of a scan (a row's position in the dataset, file order).
ROW = "__row"


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files of a dataset: the file itself, or every ``*.parquet`` under
    a directory (sorted, so every process sees the same order)."""
    root = Path(path)
    if root.is_file():
        with root.open("rb") as f:
            magic = f.read(4)
        if magic != b"PAR1":  # pyarrow's "magic bytes not found" traceback, else
            scan = "scan_ndjson" if "json" in root.suffix.lower() else "scan_csv"
            raise DataError(
                f"{str(root)!r} is not a Parquet file, and a streamed log is read one "
                "Parquet row group at a time. Write it to Parquet once (e.g. "
                f"`pl.{scan}({root.name!r}).sink_parquet('log.parquet')`), or load "
                "it in memory (without --stream)."
            )
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
        if files:
            return files
        raise DataError(f"{str(root)!r} holds no *.parquet file.")
    raise DataError(
        f"`path` should be a Parquet file or directory. Received: {str(root)!r}."
    )


def row_groups(files: list[Path]) -> list[tuple[Path, int]]:
    """Every (file, row group) of the dataset, in order: the units ranks share."""
    return [
        (file, group)
        for file in files
        for group in range(parquet_file(file).metadata.num_row_groups)
    ]


@contextlib.contextmanager
def damage_named(file: Path) -> Iterator[None]:
    """A damaged or cut-short Parquet file's error (pyarrow's, or a polars panic,
    which is no Exception) as a DataError naming the file."""
    try:
        yield
    except (
        OSError,
        UnicodeDecodeError,
        pa.ArrowException,
        pl.exceptions.PolarsError,
        pl.exceptions.PanicException,
    ) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"{file}: not a readable Parquet file ({why}). Is it damaged or cut "
            "short? Write it again from its source."
        ) from e


def parquet_file(file: Path) -> pq.ParquetFile:
    """``pq.ParquetFile(file)`` with its footer and schema read, a damaged file's
    error naming it."""
    with damage_named(file):
        opened = pq.ParquetFile(file)
        _ = opened.schema_arrow  # decoded here (its metadata may be what is damaged)
        return opened


@dataclass(frozen=True)
class Reading:
    """How every pass reads a streamed log's values: the ``data.*`` settings that
    apply to a Parquet dataset (:meth:`of`), as ``read_interactions`` takes them.

    ``time_unit``: the unit of numeric timestamps (``s``, ``ms``, ``us``, ``ns``);
    ``time_format``: a strptime format for timestamps written as text or as date
    numbers (``"%Y%m%d"`` for 20240301); ``missing_ratings``: ``"reject"`` an empty
    rating, or keep its row ``"unrated"``; ``min_user_rows`` / ``min_item_rows``:
    leave out the users and items with fewer rows, until every one left has as many
    (the k-core, :func:`min_count_ids`), as :func:`twostage.data.filtering.
    min_counts` does in memory; ``duplicates``: rows of the same user, item and
    time: ``keep`` them, keep the ``first`` or ``last`` (the others are counted as
    ``duplicate``), or stop (``error``), as :func:`~twostage.data.tables.
    read_interactions` does (:func:`duplicate_rows`; before the minimum counts, as
    in memory); ``label_col``: an impression log's column of 1/0 (chosen, or shown
    and not chosen, as ``read_interactions`` reads it): the rows shown and not
    chosen are left out of every pass after the duplicates are decided, counted in
    the report's ``shown_rows`` (``keep_shown``, for the duplicates pass and the
    pass that places the shown rows: keep them, with the label column, so that a
    group's chosen row is the one kept; the minimum counts count the chosen rows
    either way); ``names``: the log's names of the user, item, time and rating
    columns where they are not ours, ``(ours, theirs)`` pairs
    (:func:`~twostage.data.frames.log_names`;
    ``theirs`` empty for a rating column left unread): every pass reads them by
    those names and gives them ours.
    """

    time_unit: str = "s"
    time_format: str | None = None
    missing_ratings: str = "reject"
    min_user_rows: int = 0
    min_item_rows: int = 0
    duplicates: str = "keep"
    label_col: str | None = None
    keep_shown: bool = False
    label_threshold: float | None = None
    names: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, data: Any) -> Reading:
        """The reading settings of a ``DataConfig``."""
        return cls(
            data.time_unit,
            data.time_format,
            data.missing_ratings,
            data.min_user_rows,
            data.min_item_rows,
            data.duplicates,
            data.label_col,
            label_threshold=data.label_threshold,
            names=tuple(log_names(data).items()),
        )

    def source(self, column: str) -> str:
        """The log's name for one of our columns (``user_id``...; ``""``: the
        rating column is not read)."""
        return dict(self.names).get(column, column)

    @property
    def filters(self) -> bool:
        """Whether a minimum leaves rows out."""
        return self.min_user_rows > 1 or self.min_item_rows > 1

    def check(self) -> None:
        if self.time_unit not in TIME_UNITS:
            raise ConfigError(
                f"`time_unit` should be one of {list(TIME_UNITS)}. Received: "
                f"{self.time_unit!r}."
            )
        if self.missing_ratings not in ("reject", "unrated"):
            raise ConfigError(
                "`missing_ratings` should be 'reject' or 'unrated'. Received: "
                f"{self.missing_ratings!r}."
            )
        if self.duplicates not in ("keep", "first", "last", "error"):
            raise ConfigError(
                "`duplicates` should be 'keep', 'first', 'last' or 'error'. "
                f"Received: {self.duplicates!r}."
            )
        for name in ("min_user_rows", "min_item_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"`{name}` should be a minimum count, an integer >= 0. "
                    f"Received: {value!r}."
                )
        if self.label_threshold is not None and not self.label_col:
            raise ConfigError(
                "`label_threshold` sorts the values of a label column; name the "
                "column with `label_col`."
            )
        for ours, theirs in self.names:
            if ours not in (USER, ITEM, TIME, RATING) or not isinstance(theirs, str):
                raise ConfigError(
                    f"`names` maps {USER}, {ITEM}, {TIME} and {RATING} to the log's "
                    f"column names. Received: {self.names!r}."
                )
            if not theirs and ours != RATING:
                raise ConfigError(
                    f"a streamed log reads its {ours} column ({ARG[ours]} cannot be "
                    "empty; only the rating column can be left unread)."
                )
        if self.time_unit != "s" and self.time_format is not None:
            raise ConfigError(
                "`time_unit` applies to numbers since the epoch and `time_format` to "
                f"text; give one. Received: `time_unit` = {self.time_unit!r}, "
                f"`time_format` = {self.time_format!r}."
            )


def iter_batches(
    path: str | Path,
    *,
    columns: list[str],
    rank: int = 0,
    world: int = 1,
    report: LoadReport | None = None,
    reading: Reading = Reading(),
) -> Iterator[pl.DataFrame]:
    """The dataset's row groups as polars frames of ``columns``, checked as the
    in-memory loader checks a Parquet file (:func:`iter_row_groups`); rank ``rank`` of
    ``world`` gets row groups ``rank, rank + world, ...`` (disjoint shares that
    together are the whole dataset)."""
    for _, frame in iter_row_groups(
        path,
        columns=columns,
        rank=rank,
        world=world,
        report=report,
        reading=reading,
    ):
        yield frame.drop(ROW)


def iter_row_groups(
    path: str | Path,
    *,
    columns: list[str],
    rank: int = 0,
    world: int = 1,
    report: LoadReport | None = None,
    reading: Reading = Reading(),
) -> Iterator[tuple[int, pl.DataFrame]]:
    """``(first row number, frame)`` per row group of this rank: the good rows of the
    group, with ``columns`` and their dataset row numbers (``__row``; rows counted
    in file order, row groups in order; ``first`` is the group's first).

    Every row is checked as the in-memory loader checks a Parquet file
    (:func:`twostage.data._table_values.parse_columns`, whatever ``columns`` asks
    for): a missing or empty user or item ID, a NUL byte in one, a timestamp that is
    missing or outside 1900..2200, a rating that is not a finite number; and a row
    group whose timestamps are all dates written as numbers (20240301; decided per
    group, where the in-memory loader decides over the whole column). Datetime
    timestamps become epoch seconds. Bad rows are left out of every pass alike, and
    ``report`` (one pass's) counts them by reason with their 1-based row numbers.
    ``reading`` says how values are read; with its minimum counts, the rows of the
    users and items outside the k-core (:func:`min_count_ids`) are left out too,
    and are not bad rows.
    """
    if not 0 <= rank < world:
        raise ConfigError(
            f"`rank` should be in [0, world). Received: rank={rank}, world={world}."
        )
    files = parquet_files(path)
    reading.check()
    # By the file's names (a struct's fields read from the struct), and by ours.
    in_file = columns_of(files[0])
    fields = fields_of(files[0], reading)
    label = [reading.label_col] if reading.label_col else []
    missing = [
        reading.source(c)
        for c in dict.fromkeys([USER, ITEM, TIME, *label, *columns])
        if c not in fields
    ]
    if missing:
        raise DataError(
            f"the column(s) {missing} are not in {str(files[0])!r}, whose columns are "
            f"{list(in_file)}; a streamed log needs its user, item and time columns "
            "(user_id, item_id and timestamp, or the names --user-col, --item-col "
            "and --time-col give)"
            + (", and the label column named" if label else "")
            + "."
        )
    roles = {c: reading.source(c) for c in (USER, ITEM, TIME, RATING) if c in fields}
    if reading.label_col:  # after the weight, before the time, as BAD orders them
        roles = {**roles, LABEL: reading.label_col}
        roles = {r: roles[r] for r in BAD if r in roles}
    extra = [c for c in columns if c not in roles and c not in roles.values()]
    parsed_kinds = (reading.source(TIME), reading.source(RATING))
    check_file_schemas(files, [*roles.values(), *extra], any_kind=parsed_kinds)
    spec = Spec(
        roles,
        (),
        reading.time_format,
        "keep",
        (USER, ITEM, TIME),
        time_unit=reading.time_unit,
        missing_ratings=reading.missing_ratings,
        label_threshold=reading.label_threshold,
    )
    sources = [in_file[source].root for source in roles.values()]
    read = list(dict.fromkeys([*sources, *(fields[c].root for c in extra)]))
    # Under torch.distributed, a pass every rank makes shares these passes too.
    ranks = (rank, world)
    dropped = (
        None
        if reading.duplicates == "keep"
        else duplicate_rows(path, reading, ranks=ranks)
    )
    kept = min_count_ids(path, reading, ranks=ranks) if reading.filters else None
    first = 0
    for number, (file, group) in enumerate(row_groups(files)):
        reader = parquet_file(file)
        if number % world == rank:
            with damage_named(file):
                raw = pl.from_arrow(reader.read_row_group(group, columns=read))
            assert isinstance(raw, pl.DataFrame)
            given = raw.select(in_file[c].expr.alias(c) for c in roles.values())
            parsed, reason = parse_columns(given, spec)
            good = parsed if reason is None else parsed.filter(reason.is_null())
            if has_date_numbers(good, spec):  # a stream has no whole column: a group
                dated = "timestamp_as_date_number"
                reason = (
                    pl.repeat(dated, raw.height, eager=True)
                    if reason is None
                    else reason.fill_null(dated)
                )
            values = raw.select(fields[c].expr.alias(c) for c in extra)
            frame = pl.concat([parsed, values], how="horizontal")
            frame = frame.with_columns(
                pl.int_range(first, first + raw.height, dtype=pl.Int64).alias(ROW)
            )
            if dropped is not None:
                reason = _with_duplicates(reason, dropped, first, raw.height)
            if reason is not None:
                if report is not None:
                    _count_rejects(report, raw, reason, first)
                frame = frame.filter(reason.is_null())
            if LABEL in roles and not reading.keep_shown:  # not interactions
                if report is not None:
                    report.shown_rows += int((~frame[LABEL]).sum())
                frame = frame.filter(pl.col(LABEL))
            if kept is not None:  # not bad rows: left out by the minimum counts
                frame = frame.filter(kept.keeps())
            # The duplicates pass keeps the shown rows, and their label with them.
            shown = [LABEL] if LABEL in roles and reading.keep_shown else []
            yield first, frame.select(*dict.fromkeys([*columns, *shown]), ROW)
        first += reader.metadata.row_group(group).num_rows


def _with_duplicates(
    reason: pl.Series | None, dropped: np.ndarray, first: int, height: int
) -> pl.Series | None:
    """``reason`` with "duplicate" for this group's rows among ``dropped`` (sorted
    dataset row numbers) that no other reason rejects."""
    lo, hi = np.searchsorted(dropped, [first, first + height])
    if lo == hi:
        return reason
    flags = np.zeros(height, dtype=bool)
    flags[dropped[lo:hi] - first] = True
    marked = pl.when(pl.Series(flags)).then(pl.lit("duplicate"))
    if reason is None:
        return pl.select(marked.alias("reason")).to_series()
    return pl.select(pl.coalesce(pl.lit(reason), marked).alias("reason")).to_series()


def _count_rejects(
    report: LoadReport, raw: pl.DataFrame, reason: pl.Series, first: int
) -> None:
    numbered = raw.with_row_index("__line", offset=first + 1)
    bad = numbered.filter(reason.is_not_null())
    reasons = reason.drop_nulls()
    for name in reasons.unique(maintain_order=True):
        rows = bad.filter(reasons == name)
        head = rows.head(MAX_EXAMPLES)
        text = [repr(d) for d in head.drop("__line").to_dicts()]
        report.add_many(name, rows.height, list(zip(head["__line"], text, strict=True)))


def _schema_of(file: Path) -> list[str]:
    """The file's columns, a struct's fields by their paths (``geo.country``),
    as the in-memory loader names them."""
    return list(columns_of(file))


def columns_of(file: Path) -> dict[str, NestedColumn]:
    """Each column of the file by name, a struct's fields by their paths, with
    the expression that reads it from the file's own columns
    (:func:`twostage.data._table_values.nested_columns`)."""
    return _columns_of_schema(parquet_file(file).schema_arrow, file)


def fields_of(file: Path, reading: Reading = Reading()) -> dict[str, NestedColumn]:
    """:func:`columns_of` by the names the passes read: the log's user, item, time
    and rating columns (``reading.names``) under ours, each read from the log's
    own column; a column the mapping names is not also listed under its own
    name, nor is a column named like one of ours that the mapping moves."""
    fields = columns_of(file)
    if not reading.names:
        return fields
    given = dict(reading.names)
    view = {
        name: column
        for name, column in fields.items()
        if name not in given and name not in given.values()
    }
    for ours, theirs in reading.names:
        if theirs and theirs in fields:
            view[ours] = fields[theirs]
    return view


def _columns_of_schema(schema: pa.Schema, file: Path) -> dict[str, NestedColumn]:
    """:func:`columns_of` from the file's schema, read already."""
    with damage_named(file):
        empty = pl.from_arrow(schema.empty_table())
    assert isinstance(empty, pl.DataFrame)
    return nested_columns(empty.schema, str(file))


def check_file_schemas(
    files: list[Path],
    columns: list[str],
    *,
    any_kind: tuple[str, ...] = (TIME, RATING),
) -> None:
    """Every file of a dataset holds ``columns``, each ID or feature column with one
    kind of type (the first file's): integer and float widths may differ, text may
    not stand where another file has numbers. Timestamps and ratings are parsed
    into one type in any case (epoch seconds from numbers, datetimes or ISO text).
    Reads the files' footers only.

    Raises:
        DataError: naming the first file that lacks a column or types it otherwise,
            and the first file's type, before any row is read (a late file used to
            end a pass in polars' SchemaError or ColumnNotFoundError).
    """
    first = parquet_file(files[0]).schema_arrow
    wanted = list(dict.fromkeys(columns))
    # Timestamps and ratings are parsed into one type whatever the file holds
    # (epoch seconds, floats), so only their presence is checked; so is a
    # struct's field's (polars reads a field of one kind as it reads a column).
    kinds = {
        c: _kind(first.field(c).type)
        for c in wanted
        if c in first.names and c not in any_kind
    }
    for file in files[1:]:
        schema = parquet_file(file).schema_arrow
        names = schema.names
        if not set(wanted) <= set(names):  # a struct's fields, by their paths
            names = [*names, *_columns_of_schema(schema, file)]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(
                f"{str(file)!r} lacks the column(s) {missing}, which "
                f"{str(files[0])!r} has; every file of a streamed dataset needs the "
                f"columns read ({wanted})."
            )
        for column, kind in kinds.items():
            found = _kind(schema.field(column).type)
            if found != kind and "null" not in (found, kind):
                raise DataError(
                    f"{str(file)!r} types {column!r} as "
                    f"{schema.field(column).type} ({found}), but {str(files[0])!r} "
                    f"as {first.field(column).type} ({kind}); every file of a "
                    "streamed dataset must give a column one kind of type. Rewrite "
                    f"the odd file with {column!r} cast, e.g. "
                    f"`pl.read_parquet(f).with_columns(pl.col({column!r}).cast(...))`."
                )


def _kind(dtype: pa.DataType) -> str:
    """The kind of an Arrow type that decides whether files can be read as one."""
    if pa.types.is_dictionary(dtype):
        return _kind(dtype.value_type)
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "number"
    if pa.types.is_decimal(dtype):
        return "number"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "text"
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return "datetime"
    if pa.types.is_null(dtype):
        return "null"
    return str(dtype)


def _id_hash(values: pl.Series, seed: int) -> np.ndarray:
    """A stable uint64 hash per value: integers by arithmetic (fast), text by FNV."""
    if values.dtype.is_integer():
        raw = values.cast(pl.Int64).fill_null(0).to_numpy().view(np.uint64)
        return _fmix64(raw ^ np.uint64(stable_hash([seed])[0]))
    return stable_hash(values, seed=seed)


def held_out_mask(
    batch: pl.DataFrame,
    *,
    method: str,
    test_fraction: float,
    seed: int,
    time_cut: int | None = None,
    held_rows: np.ndarray | None = None,
    first_row: int = 0,
) -> np.ndarray:
    """Which rows of ``batch`` are test rows.

    ``random``: a stable hash of (user, item, timestamp, seed) below
    ``test_fraction`` of its range (the same row is on the same side in any batch,
    file layout, process or version). ``temporal``: rows at or after ``time_cut``
    (:func:`temporal_cut`). ``leave-last-out``: the rows whose dataset row numbers
    (``first_row`` is the batch's first) are in ``held_rows`` (:func:`last_rows`).

    Returns:
        ``[len(batch)]`` bool array.
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(
            f"`method` should be one of {SPLIT_METHODS} for a streamed log. "
            f"Received: `method` = {method!r}."
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(
            f"`test_fraction` should be in [0, 1). Received: {test_fraction!r}."
        )
    if method == "temporal":
        if time_cut is None:
            raise ConfigError("a temporal split needs `time_cut` (temporal_cut()).")
        return batch[TIME].to_numpy() >= time_cut
    if method == "leave-last-out":
        if held_rows is None:
            raise ConfigError("a leave-last-out split needs `held_rows` (last_rows()).")
        # The batch's row numbers: its own column (iter_row_groups), else consecutive.
        rows = (
            batch[ROW].to_numpy()
            if ROW in batch.columns
            else np.arange(first_row, first_row + batch.height)
        )
        if rows.size == 0:
            return np.zeros(0, dtype=bool)
        # held_rows is sorted: the ones inside this batch's span of row numbers.
        lo, hi = np.searchsorted(held_rows, [rows.min(), rows.max() + 1])
        inside = held_rows[lo:hi]
        at = np.minimum(np.searchsorted(inside, rows), max(inside.size - 1, 0))
        return inside[at] == rows if inside.size else np.zeros(rows.size, dtype=bool)
    mixed = _id_hash(batch[USER], seed) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= _id_hash(batch[ITEM], seed + 1)
    mixed = _fmix64(mixed ^ (_id_hash(batch[TIME], seed + 2) >> np.uint64(1)))
    # The top 53 bits as a uniform number in [0, 1).
    uniform = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return uniform < test_fraction


def last_rows(
    path: str | Path,
    *,
    within: SplitRule | None = None,
    reading: Reading = Reading(),
    ranks: tuple[int, int] = (0, 1),
) -> np.ndarray:
    """Sorted dataset row numbers of each user's last row, for users with two rows
    or more: the test rows of ``leave-last-out``, as
    :func:`twostage.data.split.leave_last_out` picks them in memory (last by
    timestamp, ties: the later row), among the rows that pass the loader's checks
    (:func:`iter_row_groups`). With ``within``, among the rows that rule does not
    hold out (its training rows: the validation carve-out of leave-last-out).

    One pass over every row group; memory holds one (user, time, row, count) entry
    per user, merged in bulk, not the rows. With ``ranks`` of a process group (a
    pass every rank makes), each rank reads its own row groups, sends each user's
    entry to the rank that owns the user (a stable hash of the ID, modulo the
    ranks), which merges them; the ranks then share the row numbers found, 8
    bytes a user. (Each rank gathered every rank's entries until 2026-12-05: at 2
    ranks 0.55 GiB more at the peak on a 1M-user log, against 0.39 GiB for one
    rank reading the whole log.)
    """
    shared = _shared(ranks)
    rank, world = ranks if shared else (0, 1)
    latest = _Latest()
    columns = [USER, TIME] if within is None else [USER, ITEM, TIME]
    for first, batch in iter_row_groups(
        path, columns=columns, reading=reading, rank=rank, world=world
    ):
        if within is not None:
            batch = batch.filter(pl.Series(~within.mask(batch, first)))
        latest.add(batch.select(USER, TIME, ROW))
    table = latest.result()
    if shared:  # each user's entries meet on the rank that owns the user
        table = _merged_by_owner(table, latest, rank, world)
    held = (
        np.zeros(0, dtype=np.int64)
        if table is None
        else table.filter(pl.col("count") >= 2)[ROW].to_numpy().astype(np.int64)
    )
    if shared:
        held = _gathered_ints(held, distributed.gather_sizes(held.size))
    return np.sort(held)


def _merged_by_owner(
    table: pl.DataFrame | None, latest: _Latest, rank: int, world: int
) -> pl.DataFrame | None:
    """The entries of the users this rank owns (a stable hash of the ID modulo
    ``world``), every rank's merged; ``table`` is this rank's own."""
    owner = (
        np.zeros(0, dtype=np.int64)
        if table is None
        else (_id_hash(table[USER], 0) % np.uint64(world)).astype(np.int64)
    )
    mine: list[pl.DataFrame] = []
    for dst in range(world):
        part = (
            pl.DataFrame() if table is None else table.filter(pl.Series(owner == dst))
        )
        got = distributed.gather_frames_to(part, dst)
        if got is not None:
            mine = [p for p in got if p.height]
    return latest._merge(pl.concat(mine)) if mine else None


class _Buffered:
    """A running table over a stream of batches, merged in bulk.

    Each batch's part waits in a buffer until the buffer is as large as the merged
    table (or 4M rows), and is then merged in one pass (:meth:`_merge`): every row is
    merged O(log batches) times, where merging each batch at once would redo the
    whole table per batch (100 batches of a 10M-user log: 100 passes over 10M rows).
    """

    #: Merge at least this many buffered rows at a time.
    FLUSH_ROWS = 4_000_000

    def __init__(self) -> None:
        self.merged: pl.DataFrame | None = None
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0

    def _add(self, part: pl.DataFrame) -> None:
        self.pending.append(part)
        self.pending_rows += part.height
        merged_rows = 0 if self.merged is None else self.merged.height
        if self.pending_rows >= max(merged_rows, self.FLUSH_ROWS):
            self._flush()

    def _merge(self, rows: pl.DataFrame) -> pl.DataFrame:
        raise NotImplementedError

    def _flush(self) -> None:
        parts = self.pending if self.merged is None else [self.merged, *self.pending]
        if parts:
            self.merged = self._merge(pl.concat(parts))
        self.pending, self.pending_rows = [], 0

    def result(self) -> pl.DataFrame | None:
        self._flush()
        return self.merged


class _Latest(_Buffered):
    """Each user's latest row so far (by time, then row number) and row count."""

    def add(self, batch: pl.DataFrame) -> None:
        self._add(self._merge(batch.with_columns(count=pl.lit(1, dtype=pl.Int64))))

    def _merge(self, rows: pl.DataFrame) -> pl.DataFrame:
        return (
            rows.sort([USER, TIME, ROW])
            .group_by(USER)
            .agg(pl.col(TIME).last(), pl.col(ROW).last(), pl.col("count").sum())
        )


#: Added to ``data.seed`` for the hash that draws a random split's validation rows
#: (independent of the test rows' hash, which uses ``seed``, ``seed + 1``, ``seed + 2``).
VALIDATION_SEED_OFFSET = 3


@dataclass(frozen=True)
class SplitRule:
    """What :func:`held_out_mask` needs for one split of one dataset
    (:func:`split_rule`), and the validation carve-out of its training rows."""

    method: str
    test_fraction: float
    seed: int
    time_cut: int | None = None
    held_rows: np.ndarray | None = None
    #: The validation carve-out: a rule over the training rows (its held-out rows
    #: that are not test rows are validation rows), or None without one.
    validation: SplitRule | None = None
    #: Users held out whole (``data.cold_user_fraction``): every row of theirs is a
    #: test row (:func:`cold_users`).
    cold: pl.Series | None = None

    def test_mask(self, batch: pl.DataFrame, first_row: int) -> np.ndarray:
        """Which rows of ``batch`` (whose first row is ``first_row``) are test rows."""
        held = held_out_mask(
            batch,
            method=self.method,
            test_fraction=self.test_fraction,
            seed=self.seed,
            time_cut=self.time_cut,
            held_rows=self.held_rows,
            first_row=first_row,
        )
        if self.cold is None:
            return held
        return held | batch[USER].is_in(self.cold.implode()).to_numpy()

    def sides(
        self, batch: pl.DataFrame, first_row: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(test, validation)`` masks of ``batch``'s rows (disjoint); the rest
        are the rows training reads."""
        test = self.test_mask(batch, first_row)
        if self.validation is None:
            return test, np.zeros_like(test)
        return test, self.validation.test_mask(batch, first_row) & ~test

    def mask(self, batch: pl.DataFrame, first_row: int) -> np.ndarray:
        """Which rows of ``batch`` training never reads: test and validation rows."""
        test, validation = self.sides(batch, first_row)
        return test | validation

    def shown_test_mask(
        self, shown: pl.DataFrame, chosen: pl.DataFrame, later: pl.Series
    ) -> pl.Series:
        """Which rows of an impression log shown and not chosen (``shown``:
        ``user_id``, ``timestamp``) are test rows: under a temporal split those
        at or after the cut; else the side of the user's next choice
        (:func:`~twostage.data.split.shown_sides` over the chosen rows'
        ``chosen`` user and time and ``later``, test or not; none: the training
        side); every row of a user held out whole."""
        if self.method == "temporal":
            assert self.time_cut is not None
            held = shown_sides(shown, chosen, later, cutoff=self.time_cut)
        elif not len(later):
            held = pl.repeat(False, shown.height, eager=True)
        else:
            held = shown_sides(shown, chosen, later)
        if self.cold is not None:
            held = held | shown[USER].is_in(self.cold.implode())
        return held


def split_rule(
    path: str | Path,
    *,
    method: str,
    test_fraction: float,
    seed: int,
    validation_fraction: float = 0.0,
    reading: Reading = Reading(),
    cold_user_fraction: float = 0.0,
    ranks: tuple[int, int] = (0, 1),
) -> SplitRule:
    """The split of a streamed log: the time cut of ``temporal`` and the last rows of
    ``leave-last-out`` are found here, once, by a streaming pass (shared by the
    ranks of a process group when ``ranks`` is a rank's ``(rank, world)``: every
    rank must then call it).

    With ``validation_fraction`` > 0 the training rows lose a validation carve-out,
    drawn by the same method as :func:`twostage.data.split.validation_split` draws it
    in memory: ``random``, a second hash (seed ``seed + VALIDATION_SEED_OFFSET``)
    below the fraction; ``temporal``, the training rows from the ``1 -
    validation_fraction`` quantile of their times on (found in the same pass as the
    test cut); ``leave-last-out``, each user's last training row, for users with two
    training rows or more (one more pass).

    With ``cold_user_fraction`` > 0 that share of the users is held out first, every
    row of theirs a test row (:func:`cold_users`, the users
    :func:`twostage.data.split.hold_out_users` draws in memory), and the split
    applies to the other users' rows (a temporal cut is their times' quantile).
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(
            f"`method` should be one of {SPLIT_METHODS} for a streamed log. "
            f"Received: `method` = {method!r}."
        )
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(
            "`validation_fraction` should be in [0, 1). "
            f"Received: {validation_fraction!r}."
        )
    if not 0.0 <= cold_user_fraction < 1.0:
        raise ConfigError(
            "`cold_user_fraction` should be in [0, 1). "
            f"Received: {cold_user_fraction!r}."
        )
    cold = (
        cold_users(
            path, fraction=cold_user_fraction, seed=seed, reading=reading, ranks=ranks
        )
        if cold_user_fraction > 0
        else None
    )
    time_cut = validation_cut = None
    if method == "temporal":
        time_cut, validation_cut = temporal_cuts(
            path,
            test_fraction=test_fraction,
            validation_fraction=validation_fraction,
            reading=reading,
            without=cold,
            ranks=ranks,
        )
    rule = SplitRule(
        method=method,
        test_fraction=test_fraction,
        seed=seed,
        time_cut=time_cut,
        held_rows=(
            last_rows(path, reading=reading, ranks=ranks)
            if method == "leave-last-out"
            else None
        ),
        cold=cold,
    )
    if validation_fraction == 0:
        return rule
    inner = SplitRule(
        method=method,
        test_fraction=validation_fraction,
        seed=seed + VALIDATION_SEED_OFFSET,
        time_cut=validation_cut,
        held_rows=(
            last_rows(
                path,
                within=rule,
                reading=reading,
                ranks=ranks,
            )
            if method == "leave-last-out"
            else None
        ),
    )
    return dataclasses.replace(rule, validation=inner)


def cold_users(
    path: str | Path,
    *,
    fraction: float,
    seed: int,
    reading: Reading = Reading(),
    ranks: tuple[int, int] = (0, 1),
) -> pl.Series:
    """The users ``data.cold_user_fraction`` holds out whole: the ones
    :func:`twostage.data.split.hold_out_users` draws from the same rows in memory
    (a seeded permutation of the sorted distinct users). One pass over the user
    column; memory holds one entry per distinct user."""
    from twostage.data.split import cold_user_choice

    shared = _shared(ranks)
    rank, world = ranks if shared else (0, 1)
    counts = RunningCounts()
    for _, batch in iter_row_groups(
        path, columns=[USER], reading=reading, rank=rank, world=world
    ):
        counts.add(batch[USER])
    users = _merged(counts.result()) if shared else counts.result()
    if users is None:
        raise DataError(f"{str(path)!r} holds no rows to draw cold users from.")
    return cold_user_choice(users["key"].rename(USER), fraction=fraction, seed=seed)


def temporal_cut(
    path: str | Path,
    *,
    test_fraction: float,
    reading: Reading = Reading(),
) -> int:
    """The timestamp (epoch seconds) from which rows are test rows: the
    ``1 - test_fraction`` quantile ("lower": an observed time) of the times of the
    rows that pass the loader's checks (:func:`iter_row_groups`: datetimes and ISO
    text as epoch seconds, bad rows left out). One pass; memory holds 8 bytes per row.
    """
    return temporal_cuts(
        path,
        test_fraction=test_fraction,
        reading=reading,
    )[0]


def temporal_cuts(
    path: str | Path,
    *,
    test_fraction: float,
    validation_fraction: float = 0.0,
    reading: Reading = Reading(),
    without: pl.Series | None = None,
    ranks: tuple[int, int] = (0, 1),
) -> tuple[int, int | None]:
    """:func:`temporal_cut`, and with ``validation_fraction`` > 0 the validation
    cut: the ``1 - validation_fraction`` quantile ("lower") of the training rows'
    times (those before the test cut), from the same pass and the same array.
    ``without``: users whose rows are left out (cold users, held out first).
    ``ranks`` of a process group: each rank reads its own row groups and holds
    their times only; the cuts are found by bisection over time values, each step
    summing the ranks' counts (:func:`_shared_kth`), so every rank finds the
    single process's cuts."""
    shared = _shared(ranks)
    rank, world = ranks if shared else (0, 1)
    report = LoadReport(path=str(path))
    parts = [
        (
            batch
            if without is None
            else batch.filter(~pl.col(USER).is_in(without.implode()))
        )[TIME].to_numpy()
        for _, batch in iter_row_groups(
            path,
            columns=[USER, TIME],
            report=report,
            reading=reading,
            rank=rank,
            world=world,
        )
    ]
    times = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if shared:
        report = _merged_report(report)
        return _shared_cuts(path, times, report, test_fraction, validation_fraction)
    if times.size == 0:
        why = (
            f": every row read was rejected. {report.summary()}"
            if report.num_rejected
            else "."
        )
        raise DataError(f"{str(path)!r} has no timestamps to cut{why}")
    at = int(np.floor((1.0 - test_fraction) * (times.size - 1)))
    times.partition(at)  # in place: no second copy of the times
    cut = int(times[at])
    if validation_fraction == 0:
        return cut, None
    # Every training time (< cut) is in times[:at]; the times equal to the cut there
    # are the largest, so the k-th smallest training time is the k-th of the view.
    before = times[:at]
    count = int(np.count_nonzero(before < cut))
    if count == 0:  # no training row before the cut: nothing to carve
        return cut, cut
    place = int(np.floor((1.0 - validation_fraction) * (count - 1)))
    before.partition(place)
    return cut, int(before[place])


def _shared_cuts(
    path: str | Path,
    times: np.ndarray,
    report: LoadReport,
    test_fraction: float,
    validation_fraction: float,
) -> tuple[int, int | None]:
    """:func:`temporal_cuts` over every rank's ``times`` (this rank's), none of
    them gathered: the same quantiles ("lower") of all the times."""
    times.sort()
    total = sum(distributed.gather_sizes(times.size))
    if total == 0:
        why = (
            f": every row read was rejected. {report.summary()}"
            if report.num_rejected
            else "."
        )
        raise DataError(f"{str(path)!r} has no timestamps to cut{why}")
    cut = _shared_kth(times, int(np.floor((1.0 - test_fraction) * (total - 1))))
    if validation_fraction == 0:
        return cut, None
    before = times[: np.searchsorted(times, cut, side="left")]  # training times
    count = sum(distributed.gather_sizes(before.size))
    if count == 0:  # no training row before the cut: nothing to carve
        return cut, cut
    place = int(np.floor((1.0 - validation_fraction) * (count - 1)))
    return cut, _shared_kth(before, place)


def _shared_kth(ordered: np.ndarray, k: int) -> int:
    """The ``k``-th smallest (0-based) of every rank's sorted ``ordered`` values:
    bisection over the values, each step one all-gather of the ranks' counts of
    values at or below the middle (about 64 steps for int64 times)."""
    local = (int(ordered[0]), int(ordered[-1])) if ordered.size else (2**62, -(2**62))
    bounds = distributed.gather_rows(torch.tensor([local]), [1] * _world_size())
    low, high = int(bounds[:, 0].min()), int(bounds[:, 1].max())
    while low < high:  # the smallest value v with more than k values <= v
        middle = low + (high - low) // 2
        at_most = int(np.searchsorted(ordered, middle, side="right"))
        if sum(distributed.gather_sizes(at_most)) > k:
            high = middle
        else:
            low = middle + 1
    return low


def _world_size() -> int:
    world = distributed.current()
    return 1 if world is None else world.size


@dataclass
class StreamingVocabularies:
    """What one streaming pass over the training side learns.

    Attributes:
        users, items: fitted vocabularies (index order: descending count).
        num_train_rows, num_test_rows: rows on each side of the split.
        num_validation_rows: the validation carve-out's rows (not training rows).
        num_batches: record batches read.
        num_local_train_rows: the training rows of this rank's row groups (all of
            them in a single process).
        rule: the split the pass applied (the second pass applies it again).
        report: the rows the loader's checks left out of every pass, by reason
            (all ranks' counts; examples with their 1-based row numbers).
    """

    users: Vocabulary
    items: Vocabulary
    num_train_rows: int
    num_test_rows: int
    num_batches: int
    num_local_train_rows: int = -1
    num_validation_rows: int = 0
    rule: SplitRule | None = None
    report: LoadReport | None = None

    def __post_init__(self) -> None:
        if self.num_local_train_rows < 0:
            self.num_local_train_rows = self.num_train_rows

    def item_probs(self) -> np.ndarray:
        """``[num_items]`` each item's share of the training rows (row 0, OOV: 0),
        the sampling probability of the logQ correction."""
        counts = np.concatenate([[0], self.items.counts]).astype(np.float64)
        return counts / max(counts.sum(), 1.0)


class RunningCounts(_Buffered):
    """Running (key, count) totals of a stream of ID batches."""

    def add(self, values: pl.Series) -> None:
        counts = values.rename("key").value_counts(name="count")
        self._add(counts.with_columns(pl.col("count").cast(pl.Int64)))

    def _merge(self, rows: pl.DataFrame) -> pl.DataFrame:
        return rows.group_by("key").agg(pl.col("count").sum())


@dataclass(frozen=True)
class KeptIds:
    """The users and items a streamed log's minimum counts keep (None: every one),
    and what they removed; ``local_rows``: the good rows this process read in the
    first round (its share of the log when the ranks of a process group share the
    rounds)."""

    users: pl.Series | None
    items: pl.Series | None
    removed: Any  # a twostage.data.filtering.Filtered
    local_rows: int = 0

    def keeps(self) -> pl.Expr:
        """True for the rows of kept users and items."""
        rule = pl.lit(True)
        if self.users is not None:
            rule &= pl.col(USER).is_in(self.users.implode())
        if self.items is not None:
            rule &= pl.col(ITEM).is_in(self.items.implode())
        return rule


#: The last few results of :func:`min_count_ids`, by files and settings: every pass
#: of a run asks for them, and each costs a few passes over the log.
_KEPT: dict[tuple[Any, ...], KeptIds] = {}


def _shared(ranks: tuple[int, int]) -> bool:
    """Whether a pass of ``(rank, world)`` is made by every rank of a process group
    at once, so that a filter's passes can be shared among them."""
    return ranks[1] > 1 and distributed.current() is not None


def _cached(
    cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], shared: bool
) -> bool:
    """Whether ``key`` is in ``cache``, on every rank when ``shared`` (a rank that
    computed it alone earlier must not skip the collective the others enter)."""
    found = key in cache
    if shared:
        found = all(distributed.gather_sizes(int(found)))
    return found


def min_count_ids(
    path: str | Path, reading: Reading, *, ranks: tuple[int, int] = (0, 1)
) -> KeptIds:
    """The users and items left when ``reading.min_user_rows`` /
    ``min_item_rows`` are applied to the log's good rows until no row moves: the
    k-core :func:`twostage.data.filtering.min_counts` finds in memory, the same
    rows.

    Each round is one pass over the user and item columns, counting the rows of
    the users and items still kept; memory holds the counts (one row per distinct
    ID), not the rows. The result is remembered for the same files (paths, sizes,
    modification times) and settings, so a run's passes compute it once. With
    ``ranks`` = ``(rank, world)`` of a process group (a pass every rank makes),
    each rank counts its own row groups and the ranks merge their counts every
    round, so the log is read once a round in all, not once a rank. What was
    removed is logged once.

    Raises:
        DataError: the minimums remove every row.
    """
    from twostage.data.filtering import Filtered

    files = parquet_files(path)
    # The chosen rows count, whichever rows the pass asking for them keeps: a pass
    # that keeps an impression log's shown rows (``keep_shown``) finds the same core.
    reading = dataclasses.replace(reading, keep_shown=False)
    key = (_stamp(files), reading)
    shared = _shared(ranks)
    if _cached(_KEPT, key, shared):
        return _KEPT[key]
    rank, world = ranks if shared else (0, 1)
    plain = dataclasses.replace(reading, min_user_rows=0, min_item_rows=0)  # dedupes
    minimums = ((USER, reading.min_user_rows), (ITEM, reading.min_item_rows))
    kept: dict[str, pl.Series | None] = {USER: None, ITEM: None}
    before: tuple[int, int, int] | None = None
    local = 0
    rounds = 0
    while True:
        counts = {USER: RunningCounts(), ITEM: RunningCounts()}
        rows = 0
        for _, batch in iter_row_groups(
            path, columns=[USER, ITEM], reading=plain, rank=rank, world=world
        ):
            batch = batch.filter(KeptIds(kept[USER], kept[ITEM], None).keeps())
            rows += batch.height
            for column, running in counts.items():
                running.add(batch[column])
        tables = {c: r.result() for c, r in counts.items()}
        local = rows if before is None else local
        if shared:  # every rank's counts, so every rank decides alike
            tables = {c: _merged(t) for c, t in tables.items()}
            rows = sum(distributed.gather_sizes(rows))
        sizes = {c: 0 if t is None else t.height for c, t in tables.items()}
        if before is None:
            before = (rows, sizes[USER], sizes[ITEM])
        short = {
            column: table.filter(pl.col("count") < minimum)["key"].len()
            for column, minimum in minimums
            if minimum > 1 and (table := tables[column]) is not None
        }
        if not any(short.values()):
            break
        for column, minimum in minimums:
            table = tables[column]
            if minimum > 1 and table is not None:
                kept[column] = table.filter(pl.col("count") >= minimum)["key"]
        rounds += 1
    removed = Filtered(
        min_user_rows=reading.min_user_rows,
        min_item_rows=reading.min_item_rows,
        rows=before[0] - rows,
        users=before[1] - sizes[USER],
        items=before[2] - sizes[ITEM],
        rounds=rounds,
    )
    if before[0] and not rows:
        raise DataError(
            f"{removed.summary()}: every row of the log. Lower the minimums "
            "(`min_user_rows`, `min_item_rows`)."
        )
    if distributed.is_main():
        logger.info("%s", removed.summary())
    result = KeptIds(kept[USER], kept[ITEM], removed, local_rows=local)
    _remember(_KEPT, key, result)
    return result


#: The last few results of :func:`duplicate_rows`, by files and settings.
_DROPPED: dict[tuple[Any, ...], np.ndarray] = {}


def _stamp(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """What identifies a dataset's content cheaply: paths, sizes, modification times."""
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _remember(
    cache: dict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any
) -> None:
    while len(cache) >= 2:
        cache.pop(next(iter(cache)))
    cache[key] = value


def duplicate_rows(
    path: str | Path, reading: Reading, *, ranks: tuple[int, int] = (0, 1)
) -> np.ndarray:
    """The sorted row numbers ``reading.duplicates`` drops: among the good rows of
    the same user, item and time, all but the first (``first``) or the last
    (``last``) in file order, of the chosen ones where an impression log's group
    holds one, as the in-memory loader drops them.

    Two passes: the first keeps a 64-bit hash of each good row's keys with its row
    number (16 bytes a row, the only state that grows with the log), the second
    reads the keys of the rows whose hash repeats and compares them exactly. The
    result is remembered for the same files and settings. With ``ranks`` of a
    process group (a pass every rank makes), each rank reads its own row groups in
    both passes and the ranks gather the hashes and the repeated rows, so every
    rank drops the same rows.

    Raises:
        DataError: ``duplicates="error"`` and two rows share their keys; both rows
            are named.
    """
    files = parquet_files(path)
    key = (
        _stamp(files),
        dataclasses.replace(reading, min_user_rows=0, min_item_rows=0),
    )  # what decides the good rows, and the policy
    shared = _shared(ranks)
    if _cached(_DROPPED, key, shared):
        return _DROPPED[key]
    rank, world = ranks if shared else (0, 1)
    plain = dataclasses.replace(  # duplicates among the shown rows too, as in memory
        reading, duplicates="keep", min_user_rows=0, min_item_rows=0, keep_shown=True
    )
    columns = [USER, ITEM, TIME]
    hashes, rows = [], []
    for _, batch in iter_row_groups(
        path, columns=columns, reading=plain, rank=rank, world=world
    ):
        keys = batch.select(
            pl.col(c).cast(pl.Int64) if batch.schema[c].is_integer() else pl.col(c)
            for c in columns
        )  # one width for every row group's integers: equal keys hash alike
        hashes.append(
            keys.select(pl.struct(columns).hash(seed=0)).to_series().to_numpy()
        )
        rows.append(batch[ROW].to_numpy())
    hashed = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    numbers = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    del hashes, rows
    if shared:  # each rank holds the hashes it owns: hash % world == rank
        hashed, numbers = _owned_hashes(hashed, numbers, rank, world)
    order = np.argsort(hashed, kind="stable")
    ranked = hashed[order]
    repeated = np.zeros(len(ranked), dtype=bool)
    same = ranked[1:] == ranked[:-1]
    repeated[1:] |= same
    repeated[:-1] |= same
    candidates = np.sort(numbers[order[repeated]])
    del hashed, numbers, order, ranked
    if shared:  # the rows to compare, found by the hashes' owners
        candidates = np.sort(
            _gathered_ints(candidates, distributed.gather_sizes(candidates.size))
        )
    dropped = np.zeros(0, dtype=np.int64)
    if candidates.size:
        wanted = pl.Series(candidates).implode()
        parts = [
            batch.filter(pl.col(ROW).is_in(wanted))
            for _, batch in iter_row_groups(
                path, columns=columns, reading=plain, rank=rank, world=world
            )
        ]
        if shared:
            mine = pl.concat(parts) if parts else pl.DataFrame({ROW: []})
            parts = [p for p in distributed.gather_frames(mine) if p.height]
        rows_of = pl.concat(parts).sort(ROW)
        last = reading.duplicates == "last"
        again = rows_of.filter(~kept_in_groups(rows_of, columns, last=last))
        if reading.duplicates == "error" and again.height:
            row = again.row(0, named=True)
            same_keys = [pl.col(c) == row[c] for c in columns]
            seen = rows_of.filter(*same_keys)[ROW][0]
            raise DataError(
                f"{str(path)!r}: row {row[ROW] + 1} repeats the user, item and "
                f"timestamp of row {seen + 1} ({ {c: row[c] for c in columns} }). "
                "duplicates='error' was requested; use duplicates='first', 'last' "
                "or 'keep' to read the log anyway."
            )
        dropped = again[ROW].to_numpy()
    _remember(_DROPPED, key, dropped)
    return dropped


def fit_vocabularies(
    path: str | Path,
    *,
    method: str = "random",
    test_fraction: float = 0.2,
    seed: int = 42,
    validation_fraction: float = 0.0,
    rank: int = 0,
    world: int = 1,
    reading: Reading = Reading(),
    cold_user_fraction: float = 0.0,
) -> StreamingVocabularies:
    """User and item vocabularies of the training side, in one pass of record batches.

    Memory holds the running (ID, count) tables, not the rows; each batch is merged
    into them and dropped. The vocabularies are the ones :meth:`Vocabulary.fit`
    gives on the same training rows in memory (same indices, same counts).

    Args:
        path: a Parquet file or directory with ``user_id``, ``item_id`` and
            ``timestamp`` columns.
        method, test_fraction, seed: the split (:func:`split_rule`,
            :func:`held_out_mask`).
        validation_fraction: the validation carve-out of the training rows
            (:func:`split_rule`); its rows are counted apart and fit nothing.
        cold_user_fraction: the users held out whole first (:func:`split_rule`).
        rank, world: read only this rank's row groups. Under ``torch.distributed``
            (:mod:`twostage.distributed`) the ranks then merge their counts, so
            every rank ends with the vocabularies of the whole log; without a
            process group they are this rank's.
    """
    rule = split_rule(
        path,
        method=method,
        test_fraction=test_fraction,
        seed=seed,
        validation_fraction=validation_fraction,
        reading=reading,
        cold_user_fraction=cold_user_fraction,
        ranks=(rank, world),
    )
    users, items = RunningCounts(), RunningCounts()
    train_rows = test_rows = validation_rows = batches = 0
    columns = [USER, ITEM, TIME]
    report = LoadReport(path=str(path))
    for first, batch in iter_row_groups(
        path,
        columns=columns,
        rank=rank,
        world=world,
        report=report,
        reading=reading,
    ):
        test, validation = rule.sides(batch, first)
        train = batch.filter(pl.Series(~(test | validation)))
        users.add(train[USER].drop_nulls())
        items.add(train[ITEM].drop_nulls())
        train_rows += train.height
        test_rows += int(test.sum())
        validation_rows += int(validation.sum())
        batches += 1
    user_counts, item_counts = users.result(), items.result()
    local_rows = train_rows
    if world > 1 and distributed.current() is not None:
        user_counts, item_counts = _merged(user_counts), _merged(item_counts)
        train_rows, test_rows, validation_rows, batches = (
            sum(distributed.gather_sizes(n))
            for n in (train_rows, test_rows, validation_rows, batches)
        )
        report = _merged_report(report)
    report.rows_loaded = train_rows + test_rows + validation_rows
    report.rows_read = report.rows_loaded + report.num_rejected
    if not report.ok and distributed.is_main():
        logger.warning("%s", report.summary())
    if user_counts is None or item_counts is None:
        raise DataError(f"{str(path)!r} has no rows.")
    return StreamingVocabularies(
        users=_vocabulary(user_counts),
        items=_vocabulary(item_counts),
        num_train_rows=train_rows,
        num_test_rows=test_rows,
        num_batches=batches,
        num_local_train_rows=local_rows,
        num_validation_rows=validation_rows,
        rule=rule,
        report=report,
    )


def _merged_report(report: LoadReport) -> LoadReport:
    """Every rank's rejected rows in one report (counts summed, examples by row)."""
    rows = [
        {"reason": reason, "line": line, "text": text}
        for reason, examples in report.examples.items()
        for line, text in examples
    ]
    counts = pl.DataFrame(
        {"reason": list(report.rejected), "count": list(report.rejected.values())},
        schema={"reason": pl.String, "count": pl.Int64},
    )
    examples = pl.DataFrame(
        rows, schema={"reason": pl.String, "line": pl.Int64, "text": pl.String}
    )
    merged = LoadReport(path=report.path)
    all_examples = pl.concat(distributed.gather_frames(examples)).sort("line")
    totals = pl.concat(distributed.gather_frames(counts)).group_by("reason").sum()
    for reason, count in totals.sort("reason").iter_rows():
        shown = all_examples.filter(pl.col("reason") == reason)
        merged.add_many(
            reason, count, list(zip(shown["line"], shown["text"], strict=True))
        )
    return merged


def count_values(
    path: str | Path,
    rule: SplitRule,
    columns: list[str],
    *,
    rank: int = 0,
    world: int = 1,
    reading: Reading = Reading(),
) -> dict[str, pl.DataFrame]:
    """Each per-row context column's distinct values over the training rows, with
    their counts (``key``, ``count``; a null key counts the missing values): what
    :meth:`FeatureSpec.fit_streamed` fits the context encoders on. A column may be
    one the timestamp gives (``hour_of_day``, ``day_of_week``:
    :mod:`twostage.features.context`). Memory holds the distinct values, not rows;
    under ``torch.distributed`` each rank reads its row groups and the counts merge.

    Raises:
        DataError: a column is neither in the log nor derived from its timestamp.
    """
    from twostage.features.context import DERIVED, context_frame

    present = set(fields_of(parquet_files(path)[0], reading))
    missing = [c for c in columns if c not in present and c not in DERIVED]
    if missing:
        raise DataError(
            f"context column(s) {missing} are not in the log {sorted(present)}, nor "
            f"derived from its timestamp ({sorted(DERIVED)})."
        )
    raw = [c for c in columns if c in present and c not in (USER, ITEM, TIME)]
    counters = {c: RunningCounts() for c in columns}
    for first, batch in iter_row_groups(
        path,
        columns=[USER, ITEM, TIME, *raw],
        rank=rank,
        world=world,
        reading=reading,
    ):
        train = batch.filter(pl.Series(~rule.mask(batch, first)))
        frame = context_frame(train[USER], train, columns)
        for column, counter in counters.items():
            counter.add(frame[column])
    out = {}
    for column, counter in counters.items():
        counts = counter.result()
        if world > 1 and distributed.current() is not None:
            counts = _merged(counts)
        out[column] = (
            counts
            if counts is not None
            else pl.DataFrame(schema={"key": pl.Int64, "count": pl.Int64})
        )
    return out


def held_out_rows(
    path: str | Path,
    rule: SplitRule,
    columns: list[str],
    *,
    side: str = "test",
    rank: int = 0,
    world: int = 1,
    reading: Reading = Reading(),
) -> pl.DataFrame:
    """The test side of the split (``side="validation"``: the validation carve-out):
    ``columns`` of every such row, in file order. Under ``torch.distributed`` each
    rank reads its row groups and every rank gets all the rows (sent as Arrow IPC),
    in file order too. Memory holds these rows: that side only."""
    if side not in ("test", "validation"):
        raise ConfigError(f"`side` should be test or validation. Received: {side!r}.")
    which = 0 if side == "test" else 1
    parts = [
        batch.filter(pl.Series(rule.sides(batch, first)[which]))
        for first, batch in iter_row_groups(
            path,
            columns=columns,
            rank=rank,
            world=world,
            reading=reading,
        )
    ]
    empty = empty_frame(path, columns, reading).with_columns(
        pl.lit(0, pl.Int64).alias(ROW)
    )
    mine = pl.concat(parts) if parts else empty
    if world > 1 and distributed.current() is not None:
        gathered = [p for p in distributed.gather_frames(mine) if p.height]
        # Every rank's rows, back in file order (by row number).
        mine = pl.concat(gathered).sort(ROW) if gathered else empty
    return mine.drop(ROW)


def empty_frame(
    path: str | Path, columns: list[str], reading: Reading = Reading()
) -> pl.DataFrame:
    """No rows, with ``columns`` (by the names ``reading`` gives them) as the
    dataset's first file types them."""
    file = parquet_files(path)[0]
    with damage_named(file):
        empty = pl.from_arrow(parquet_file(file).schema_arrow.empty_table())
    fields = fields_of(file, reading)
    return empty.select(fields[c].expr.alias(c) for c in columns)  # type: ignore[union-attr]


def _owned_hashes(
    hashed: np.ndarray, numbers: np.ndarray, rank: int, world: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(hash, row number)`` pairs whose hash this rank owns (``hash
    % world == rank``), so equal hashes meet on one rank and each rank holds
    ``1 / world`` of them."""
    owner = (hashed % np.uint64(world)).astype(np.int64)
    mine: tuple[np.ndarray, np.ndarray] = (hashed[:0], numbers[:0])
    for dst in range(world):
        chosen = owner == dst
        pairs = torch.from_numpy(
            np.stack([hashed[chosen].view(np.int64), numbers[chosen]], axis=1)
        )
        got = distributed.gather_rows_to(pairs, dst)
        if got is not None:
            both = got.numpy()
            mine = (both[:, 0].copy().view(np.uint64), both[:, 1].copy())
    return mine


def _gathered_ints(local: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Every rank's ``local`` int64 array, concatenated in rank order."""
    tensor = torch.from_numpy(np.ascontiguousarray(local, dtype=np.int64))
    return distributed.gather_rows(tensor, sizes).numpy()


def _merged(counts: pl.DataFrame | None) -> pl.DataFrame | None:
    """Every rank's (key, count) table, summed (sent as Arrow IPC, never pickled)."""
    mine = counts if counts is not None else pl.DataFrame({"key": [], "count": []})
    parts = [p for p in distributed.gather_frames(mine) if p.height]
    if not parts:
        return None
    return pl.concat(parts).group_by("key").agg(pl.col("count").sum())


def _vocabulary(counts: pl.DataFrame) -> Vocabulary:
    """A fitted Vocabulary from (key, count) rows, ordered as ``Vocabulary.fit``."""
    ordered = counts.sort(["count", "key"], descending=[True, False])
    return Vocabulary.from_counts(ordered["key"], ordered["count"].to_numpy())


class _FirstRows(_Buffered):
    """The first row of each key seen so far, over batches in order (their order is
    kept through every merge)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        #: Rows whose features differed from those of their key's first row (counted
        #: once per merge in which the differing values were buffered).
        self.conflicts = 0

    def add(self, batch: pl.DataFrame) -> None:
        self._add(
            batch.filter(pl.col(self.key).is_not_null()).unique(maintain_order=True)
        )

    def _merge(self, rows: pl.DataFrame) -> pl.DataFrame:
        distinct = rows.unique(maintain_order=True)
        first = distinct.unique(subset=self.key, keep="first", maintain_order=True)
        self.conflicts += distinct.height - first.height
        return first


def checked_weights(
    train: pl.DataFrame,
    column: str,
    path: str | Path,
    names: dict[str, float] | None = None,
) -> np.ndarray:
    """The weights of ``train``'s rows (a frame of :func:`iter_row_groups`, with
    its row numbers), which must be finite, non-negative numbers, or with
    ``names`` (``data.weight_values``) values it gives a weight.

    In memory a bad weight is a bad row, counted and skipped; a streamed row
    cannot leave this pass and stay in the others (its vocabularies, split and
    counts are fixed by then), so the first bad weight stops the run with its row.
    """
    values = train[column]
    if names is not None:
        named, empty, unlisted = weights_from_names(values, names)
        missing = empty | unlisted
        if missing.any():
            at = int(missing.arg_true()[0])
            raise DataError(
                f"{str(path)!r}: row {int(train[ROW][at]) + 1} has the value "
                f"{values[at]!r} in {column!r}, which `data.weight_values` gives no "
                f"weight (it lists {sorted(names)}). A streamed run stops at such a "
                "row (in memory it is a bad row, counted and skipped)."
            )
        return named.cast(pl.Float32).to_numpy()
    if not values.dtype.is_numeric():
        raise DataError(
            f"`data.weight_col` = {column!r} of {str(path)!r} holds {values.dtype}; "
            "row weights are numbers (cast the column, or unset `data.weight_col`)."
        )
    weights = values.cast(pl.Float64)
    bad = weights.is_null() | ~weights.is_finite().fill_null(False) | (weights < 0)
    bad = bad.fill_null(True)
    if bad.any():
        at = int(bad.arg_true()[0])
        raise DataError(
            f"{str(path)!r}: row {int(train[ROW][at]) + 1} has the weight "
            f"{values[at]!r}; row weights should be finite and non-negative. A "
            "streamed run stops at a bad weight (in memory it is a bad row, counted "
            "and skipped): fix or drop such rows, or load the log in memory."
        )
    return weights.cast(pl.Float32).to_numpy()


def feature_tables(
    path: str | Path,
    *,
    user_features: list[str] | tuple[str, ...] = (),
    item_features: list[str] | tuple[str, ...] = (),
    reading: Reading = Reading(),
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """``(users, items)``: the feature columns of the log as tables, one row per ID
    (its first occurrence in file order, as the in-memory loader keeps it; a warning
    counts the rows whose values differed), or None for a side without columns.

    One pass over the row groups; memory holds the tables, not the rows.
    """
    wanted = {USER: list(dict.fromkeys(user_features))}
    wanted[ITEM] = list(dict.fromkeys(item_features))
    firsts = {key: _FirstRows(key) for key, columns in wanted.items() if columns}
    if not firsts:
        return None, None
    columns = list(dict.fromkeys([*firsts, *(c for k in firsts for c in wanted[k])]))
    for file in parquet_files(path):
        names = list(fields_of(file, reading))
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(
                f"the feature columns {missing} are not in {str(file)!r}, whose "
                f"columns are {names}."
            )
    for batch in iter_batches(path, columns=columns, reading=reading):
        for key, first in firsts.items():
            first.add(batch.select([key, *wanted[key]]))
    tables: dict[str, pl.DataFrame | None] = {USER: None, ITEM: None}
    for key, first in firsts.items():
        tables[key] = first.result()
        if first.conflicts:
            logger.warning(
                "%d %s rows had other values of %s than the first row of their %s; "
                "the first occurrence was kept.",
                first.conflicts,
                key,
                wanted[key],
                key,
            )
    return tables[USER], tables[ITEM]
