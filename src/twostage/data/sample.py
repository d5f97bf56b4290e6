"""A sample of a Parquet log's users, written to one file: the rows of some of its
users, copied as they are, for work that reads a log in memory (``twostage tune``)
on a log too large for it (a directory of Parquet files that ``train --stream``
reads).

Users are drawn by a stable hash of their ID, as the readers read it, and a seed
(:func:`stable_hash`), so the same users are drawn whatever the row order, file
layout or process. The log is read one row group at a time: a count of users takes
two passes (their distinct IDs, then their rows), a fraction of them one; memory
holds the distinct IDs (a count) and one row group, the rows drawn go to the file
as they are found.

Rows are copied unparsed, every column kept, so the sample is read with the same
settings as the log (time unit, column mapping, label column). Rows without a user
ID are not drawn (the readers reject them as ``empty_user_id``): they are counted.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from twostage.data._table_values import parse_ids
from twostage.data.dataset import USER
from twostage.data.streaming import (
    check_file_schemas,
    damage_named,
    parquet_file,
    parquet_files,
)
from twostage.errors import ConfigError, DataError
from twostage.features.hashing import stable_hash

__all__ = ["LogSample", "sample_log_users"]

# Distinct IDs gathered before they are merged (a bound on the pass's memory).
_MERGE_ROWS = 4_000_000


@dataclass(frozen=True)
class LogSample:
    """What :func:`sample_log_users` wrote.

    Attributes:
        out: the sample's Parquet file.
        users: users drawn; ``log_users``: distinct user IDs in the log (None when a
            fraction was drawn, which reads the log once and does not count them).
        rows: rows written; ``log_rows``: rows read.
        rows_without_user: rows with a missing or blank user ID, not drawn.
        files: Parquet files read.
    """

    out: Path
    users: int
    log_users: int | None
    rows: int
    log_rows: int
    rows_without_user: int
    files: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}

    def summary(self, *, where: bool = True) -> str:
        """One line: who was drawn, how many rows, and (``where``) to which file."""
        users = f"{self.users:,} users"
        if self.log_users is not None:
            users = f"{self.users:,} of {self.log_users:,} users"
        line = f"Drew {users}: {self.rows:,} of {self.log_rows:,} rows"
        line += f" ({self.files} file(s))" + (f" -> {self.out}" if where else "")
        if self.rows_without_user:
            line += (
                f"; {self.rows_without_user:,} row(s) without a user ID not drawn "
                "(the readers reject them as empty_user_id)"
            )
        return line + "."


def _keys(column: pa.ChunkedArray | pa.Array, file: Path, user_col: str) -> pl.Series:
    """Each row's user ID as the readers read it (:func:`parse_ids`), null where
    missing or blank."""
    with damage_named(file):
        series = pl.Series(user_col, column)
    try:
        ids, missing = parse_ids(series, USER)
    except DataError as e:
        raise DataError(f"{file}: {e}") from e
    return ids.set(missing.fill_null(True), None).rename("key")


def _drawn_by_fraction(keys: pl.Series, fraction: float, seed: int) -> np.ndarray:
    """Whether each key's hash falls in the lowest ``fraction`` of its range."""
    hashes = stable_hash(keys, seed=seed)  # a null's hash is masked below
    # The top 53 bits as a uniform number in [0, 1).
    uniform = (hashes >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return (uniform < fraction) & keys.is_not_null().to_numpy()


def _magic(file: Path) -> bytes:
    with file.open("rb") as f:
        return f.read(4)


def _user_column(file: Path, user_col: str) -> None:
    names = parquet_file(file).schema_arrow.names
    if user_col not in names:
        raise DataError(
            f"{str(file)!r} has no {user_col!r} column; its columns are {names}. Name "
            "the user column (`user_col`, --user-col)."
        )


def _distinct_users(files: list[Path], user_col: str) -> pl.Series:
    """The log's distinct user IDs, as the readers read them (blanks left out)."""
    parts: list[pl.Series] = []
    held = 0
    for file in files:
        reader = parquet_file(file)
        for group in range(reader.metadata.num_row_groups):
            with damage_named(file):
                column = reader.read_row_group(group, columns=[user_col]).column(0)
            keys = _keys(column, file, user_col).drop_nulls().unique()
            if not len(keys):  # an all-null group's type is not the IDs'
                continue
            parts.append(keys)
            held += len(keys)
            if held > _MERGE_ROWS:
                parts = [pl.concat(parts).unique()]
                held = len(parts[0])
    if not parts:
        return pl.Series("key", [], dtype=pl.String)
    return pl.concat(parts).unique()


def sample_log_users(
    path: str | Path,
    out: str | Path,
    *,
    users: int | None = None,
    fraction: float | None = None,
    user_col: str = USER,
    seed: int = 42,
    overwrite: bool = False,
) -> LogSample:
    """Write the rows of some of a Parquet log's users to one Parquet file.

    Args:
        path: a Parquet file, or a directory of them (every ``*.parquet`` under it,
            as ``train --stream`` reads it).
        out: the sample's file; not inside ``path`` (a directory's next read would
            take it for part of the log).
        users: draw this many users: those with the smallest hashes (every user
            when the log has no more).
        fraction: or draw each user whose hash falls in this share of its range
            (about that fraction of the users; one pass over the log).
        user_col: the log's user ID column.
        seed: the hash's seed; another seed draws other users.
        overwrite: replace ``out`` if it exists.

    Returns:
        A :class:`LogSample` saying how many users and rows were drawn.

    Raises:
        ConfigError: neither or both of ``users`` and ``fraction``, or a value
            out of range; ``out`` inside ``path``, ``path`` itself, or already
            there.
        DataError: ``path`` holds no Parquet file, a file lacks the user column,
            types it otherwise than the first or holds no IDs in it (as the
            readers refuse it), has other columns than the first; no user was
            drawn.
    """
    if (users is None) == (fraction is None):
        raise ConfigError("give one of `users` (a count) or `fraction` (a share).")
    if users is not None and (
        isinstance(users, bool) or not isinstance(users, int) or users < 1
    ):
        raise ConfigError(f"`users` should be a count >= 1. Received: {users!r}.")
    if fraction is not None and (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0.0 < fraction <= 1.0
    ):
        raise ConfigError(f"`fraction` should be in (0, 1]. Received: {fraction!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"`seed` should be an integer. Received: {seed!r}.")
    source, target = Path(path), Path(out)
    if source.is_dir() and target.resolve().is_relative_to(source.resolve()):
        raise ConfigError(
            f"{str(target)!r} is inside the log's directory {str(source)!r}: the "
            "next read of the log would take the sample for part of it. Write it "
            "elsewhere."
        )
    if target.resolve() == source.resolve():
        raise ConfigError(
            f"{str(target)!r} is the log itself; write the sample elsewhere."
        )
    if target.exists() and not overwrite:
        raise ConfigError(f"{str(target)!r} already exists; pass `overwrite`.")
    if source.is_file() and _magic(source) != b"PAR1":
        scan = "scan_ndjson" if "json" in source.suffix.lower() else "scan_csv"
        raise DataError(
            f"{str(source)!r} is not a Parquet file; a sample is drawn from Parquet "
            "one row group at a time. A log that fits in memory needs no file: "
            "`twostage tune --sample-users N` draws from it. Else write it to "
            f"Parquet once: `pl.{scan}({source.name!r}).sink_parquet('log.parquet')`."
        )
    files = parquet_files(source)
    for file in files:
        _user_column(file, user_col)
    check_file_schemas(files, [user_col])  # integer IDs in one file, text in another
    log_users = None
    drawn: pl.Series | None = None
    if users is not None:
        distinct = _distinct_users(files, user_col)
        log_users = len(distinct)
        order = np.argsort(stable_hash(distinct, seed=seed), kind="stable")
        drawn = distinct.gather(order[:users])
    schema = parquet_file(files[0]).schema_arrow
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    rows = log_rows = without = 0
    found: list[pl.Series] = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(partial, schema) as writer:
            for file in files:
                reader = parquet_file(file)
                for group in range(reader.metadata.num_row_groups):
                    with damage_named(file):
                        table = reader.read_row_group(group)
                    keys = _keys(table.column(user_col), file, user_col)
                    log_rows += table.num_rows
                    without += keys.null_count()
                    if keys.null_count() == len(keys):
                        keep = np.zeros(len(keys), dtype=bool)
                    elif drawn is not None:
                        keep = keys.is_in(drawn.implode()).fill_null(False).to_numpy()
                    else:
                        assert fraction is not None
                        keep = _drawn_by_fraction(keys, fraction, seed)
                        found.append(keys.filter(pl.Series(keep)).unique())
                    if not keep.any():
                        continue
                    picked = table.filter(pa.array(keep))
                    writer.write_table(_as_schema(picked, schema, file, files[0]))
                    rows += picked.num_rows
        if not rows:
            raise DataError(
                f"no user of {str(source)!r} was drawn"
                + (
                    f" (a fraction of {fraction} of their hashes); raise the fraction."
                    if fraction is not None
                    else " (it has no row with a user ID)."
                )
            )
        partial.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    count = len(drawn) if drawn is not None else len(pl.concat(found).unique())
    return LogSample(target, count, log_users, rows, log_rows, without, len(files))


def _as_schema(table: pa.Table, schema: pa.Schema, file: Path, first: Path) -> pa.Table:
    """``table`` with the first file's schema (one file holds one schema)."""
    if table.schema.equals(schema):
        return table
    if sorted(table.schema.names) != sorted(schema.names):  # no column left out
        raise DataError(
            f"{str(file)!r} has the columns {table.schema.names} where "
            f"{str(first)!r} has {schema.names}, and a sample is one file of one "
            "schema. Sample the files of each schema apart."
        )
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, ValueError, pa.ArrowException) as e:
        raise DataError(
            f"{str(file)!r} has other column types than {str(first)!r} "
            f"({table.schema} against {schema}), and a sample is one file of one "
            f"schema: {(str(e).splitlines() or [type(e).__name__])[0][:200]}"
        ) from e
