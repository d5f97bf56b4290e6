"""Lists for many users, sessions or items into one file: what ``twostage recommend
--users`` / ``--all-users`` / ``--sessions`` and ``twostage similar --items`` /
``--all-items`` share (the options' checks, reading a file of IDs or of session
rows, writing a chunk of answers at a time)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer

from twostage.cli_output import status_console
from twostage.data.frames import with_our_names
from twostage.errors import DataError

__all__ = [
    "BATCH",
    "Overwrite",
    "check_batch_options",
    "parse_id",
    "read_ids",
    "read_sessions",
    "write_in_chunks",
]

#: The options of lists for many users, sessions or items, grouped under this
#: heading in --help.
BATCH = "Many users, sessions or items into a file"

Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", rich_help_panel=BATCH, help="Replace an existing --out file."
    ),
]


def parse_id(value: str) -> Any:
    """An integer when ``value`` is one written plainly (``42``, ``-5``), else the
    text as typed: ``0829433244`` (an ISBN) or ``02139`` (a zip code) keep their
    leading zeros, which ``int`` would drop (a string ID then no longer matched);
    an integer vocabulary still finds ``007`` as 7."""
    try:
        number = int(value)
    except ValueError:
        return value
    return number if str(number) == value else value


def check_batch_options(
    ids_file: Path | None,
    every: bool,
    out: Path | None,
    overwrite: bool,
    single: dict[str, Any],
    *,
    noun: str,
    has_every: bool = True,
    also: str = "",
) -> None:
    """``--{noun}s FILE`` / ``--all-{noun}s`` go with ``--out`` and without the
    options of one request (``single``: flag -> value), checked before the bundle
    loads. ``has_every``: whether ``--all-{noun}s`` exists; ``also``: another
    batch flag the command has, named where ``--out`` comes alone."""
    flag = f"--{noun}s"
    every_flag = f"--all-{noun}s" if has_every else ""
    either = f"{flag} or {every_flag}" if has_every else flag
    if ids_file is not None and every:
        raise typer.BadParameter(
            f"give {flag} FILE or {every_flag}, not both.", param_hint=flag
        )
    if ids_file is None and not every:
        ways = [f"{flag} FILE", every_flag, f"{also} FILE" if also else ""]
        ways = [way for way in ways if way]
        raise typer.BadParameter(
            f"--out writes the lists of many {noun}s: give "
            + (f"{', '.join(ways[:-1])} or {ways[-1]}" if len(ways) > 1 else ways[0])
            + f" (one {noun}'s list is printed, or given as JSON with --json).",
            param_hint="--out",
        )
    given = [name for name, value in single.items() if value is not None]
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)} {'shape' if len(given) > 1 else 'shapes'} one "
            f"request; with {either} every {noun} is answered on its "
            f"own. Drop {'them' if len(given) > 1 else 'it'}.",
            param_hint=flag if ids_file is not None else every_flag,
        )
    if out is None:
        raise typer.BadParameter(
            f"{either.replace(' or ', ' and ')} "
            f"{'write' if has_every else 'writes'} a file: give --out lists.parquet "
            "(or .csv).",
            param_hint="--out",
        )
    check_table_file(out, overwrite, "--out")
    if ids_file is not None and not ids_file.is_file():
        raise typer.BadParameter(f"{str(ids_file)!r} is not a file.", param_hint=flag)


def check_table_file(out: Path, overwrite: bool, flag: str) -> None:
    """A file a command writes a table to (``flag``'s value): ``.parquet`` or
    ``.csv``, not a directory, and not one that exists unless ``overwrite``."""
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise typer.BadParameter(
            f"should end in .parquet or .csv. Received: {str(out)!r}.",
            param_hint=flag,
        )
    if out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} is a directory.", param_hint=flag)
    if out.exists() and not overwrite:
        raise typer.BadParameter(
            f"{str(out)!r} already exists: choose another path, or pass --overwrite "
            "to replace it.",
            param_hint=flag,
        )
    check_writable(out, flag)


def check_writable(out: Path, flag: str) -> None:
    """Now, not after the work that fills it: a file can be written at ``out``
    (``flag``'s value). Its folder is made if missing, and a file is written
    beside it once, as the result will be."""
    if out.parent.exists() and not out.parent.is_dir():
        raise typer.BadParameter(
            f"cannot write {str(out)!r}: {str(out.parent)!r} is a file, not a folder.",
            param_hint=flag,
        )
    probe = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise typer.BadParameter(
            f"cannot write {str(out)!r}: {e.strerror or e}.", param_hint=flag
        ) from e


def check_folder(out: Path, flag: str) -> None:
    """Now, not after the training or evaluation that fills it: a folder can
    be made at ``out`` (``flag``'s value), or written into where it exists. A
    file there, or on the way to it, or a folder this process cannot write,
    is ``flag``'s error."""
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(
            f"{str(out)!r} is a file; {flag} names a folder to write into.",
            param_hint=flag,
        )
    nearest = out
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise typer.BadParameter(
            f"cannot make {str(out)!r}: {str(nearest)!r} is a file, not a folder.",
            param_hint=flag,
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise typer.BadParameter(
            f"cannot make {str(out)!r}: {str(nearest)!r} is not writable.",
            param_hint=flag,
        )


def _refuse_deep_json(text: str, path: Path, flag: str) -> None:
    """A BadParameter where a line nests objects deeper than polars' reader
    survives (it overflows its stack, and the process dies)."""
    from twostage.data._table_json import MAX_DEPTH, _too_deep

    deep = _too_deep(pl.Series(text.split("\n"), dtype=pl.String))
    if deep:
        raise typer.BadParameter(
            f"line {deep[0] + 1} of {str(path)!r} nests objects more than "
            f"{MAX_DEPTH} deep; an ID file holds one ID a line.",
            param_hint=flag,
        )


def _read_table(path: Path, flag: str) -> pl.DataFrame:
    """A CSV (every column as text), JSON lines or Parquet file as a frame."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        if suffix in (".jsonl", ".ndjson", ".json"):
            text = path.read_text(encoding="utf-8-sig").lstrip()
            _refuse_deep_json(text, path, flag)
            array = suffix == ".json" and text.startswith("[")
            return pl.read_json(path) if array else pl.read_ndjson(path)
        return pl.read_csv(path, infer_schema=False)
    except (
        pl.exceptions.PolarsError,
        pl.exceptions.PanicException,  # a BaseException: a damaged file, say
        OSError,
        ValueError,
    ) as e:
        raise typer.BadParameter(
            f"cannot read {str(path)!r} as CSV, JSON lines or Parquet: {e}",
            param_hint=flag,
        ) from e


def _typed_ids(values: pl.Series) -> pl.Series:
    """Text IDs as :func:`parse_id` reads each: integers where every one is an
    integer written plainly, else the text as typed (blank: null)."""
    text = [v if v is not None and v.strip() else None for v in values.to_list()]
    parsed = [parse_id(v) if v is not None else None for v in text]
    if all(v is None or isinstance(v, int) for v in parsed):
        return pl.Series(values.name, parsed, dtype=pl.Int64)
    return pl.Series(values.name, text, dtype=pl.String)


def _our_names(
    frame: pl.DataFrame, names: dict[str, str], path: Path, flag: str
) -> pl.DataFrame:
    """``frame`` (read from ``path``) with the columns ``names`` maps to renamed
    to ours (:func:`~twostage.data.frames.with_our_names`)."""
    try:
        return with_our_names(frame, names, repr(str(path)))
    except DataError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from e


def read_exclusions(
    path: Path,
    flag: str,
    names: dict[str, str] | None = None,
    key: str = "user_id",
    value: str = "item_id",
) -> pl.DataFrame:
    """A file of ``key`` (``user_id``, ``session_id`` or ``item_id``) and
    ``value`` (``item_id``, or ``similar_item_id`` for an item's similar
    items) rows (each perhaps by the name ``names`` maps it to): the items to
    leave out of each list. CSV IDs are read as :func:`parse_id` reads them; a
    row without either is an error that names it. Adds ``row``, each row's
    number among the data rows."""
    frame = _our_names(_read_table(path, flag), names or {}, path, flag)
    text = path.suffix.lower() not in (".parquet", ".pq", ".jsonl", ".ndjson", ".json")
    for column in (key, value):
        values = _filled_column(frame, column, path, flag, names)
        if not (values.dtype.is_integer() or values.dtype == pl.String):
            raise typer.BadParameter(
                f"the {column} column of {str(path)!r} holds {values.dtype} "
                "values; IDs should be whole numbers or text, as in the log.",
                param_hint=flag,
            )
        if text:
            frame = frame.with_columns(_typed_ids(values))
    return frame.select(key, value).with_row_index("row", offset=1)


def _filled_column(
    frame: pl.DataFrame,
    column: str,
    path: Path,
    flag: str,
    names: dict[str, str] | None,
) -> pl.Series:
    """``frame``'s ``column``, if the file has one and every row fills it
    (else an error naming the first rows without)."""
    if column not in frame.columns:
        other = (names or {}).get(column)
        raise typer.BadParameter(
            f"{str(path)!r} has no {column} column"
            + (f" (nor {other}, the training log's)" if other else "")
            + f" (its columns: {frame.columns}); give the file a header row "
            "naming it.",
            param_hint=flag,
        )
    values = frame[column]
    blank = values.is_null()
    if values.dtype == pl.String:
        blank = blank | (values.str.strip_chars() == "")
    if blank.any():
        rows = (blank.arg_true() + 1).head(5).to_list()
        raise typer.BadParameter(
            f"{int(blank.sum())} row(s) of {str(path)!r} have no {column} (data rows "
            f"{rows}{' ...' if blank.sum() > 5 else ''}); fill or drop them.",
            param_hint=flag,
        )
    return values


def read_sessions(
    path: Path, flag: str = "--sessions", names: dict[str, str] | None = None
) -> pl.DataFrame:
    """A file of session rows (``session_id``, ``item_id``; optionally
    ``timestamp``, ``rating``, ``user_id``, each perhaps by the name ``names``
    maps it to: :func:`~twostage.data.frames.log_names`), typed for
    :meth:`~twostage.recommender.Recommender.recommend_sessions`: CSV IDs as
    :func:`parse_id` reads them, CSV times (seconds, or ISO 8601 date-times as
    :func:`~twostage.data.dataset.iso_seconds` reads them) and ratings as
    numbers (a row with other text there is an error that names it); JSON and
    Parquet keep their types."""
    frame = _our_names(_read_table(path, flag), names or {}, path, flag)
    if path.suffix.lower() not in (".parquet", ".pq", ".jsonl", ".ndjson", ".json"):
        for column in ("session_id", "item_id", "user_id"):
            if column in frame.columns:
                frame = frame.with_columns(_typed_ids(frame[column]))
        for column in ("timestamp", "rating"):
            if column not in frame.columns:
                continue
            text = frame[column].str.strip_chars().replace("", None)
            numbers = text.cast(pl.Float64, strict=False)
            wrong = numbers.is_null() & text.is_not_null()
            if column == "timestamp" and wrong.any():  # ISO 8601 times, as HTTP's
                from twostage.data.dataset import iso_seconds

                moments = text.map_elements(iso_seconds, return_dtype=pl.Float64)
                numbers = numbers.fill_null(moments)
                wrong = numbers.is_null() & text.is_not_null()
            if wrong.any():
                rows = (wrong.arg_true() + 1).head(5).to_list()
                what = (
                    "a number of seconds or an ISO 8601 date-time"
                    if column == "timestamp"
                    else "a number"
                )
                raise typer.BadParameter(
                    f"{int(wrong.sum())} row(s) of {str(path)!r} have a {column} "
                    f"that is not {what} (data rows {rows}"
                    f"{' ...' if wrong.sum() > 5 else ''}, e.g. "
                    f"{text.filter(wrong)[0]!r}).",
                    param_hint=flag,
                )
            whole = numbers.fill_null(0)
            if column == "timestamp" and bool(
                ((whole % 1 == 0) & (whole.abs() < 2**62)).all()
            ):
                numbers = numbers.cast(pl.Int64)  # seconds, as a log reads them
            frame = frame.with_columns(numbers.alias(column))
    return frame


def read_ids(
    path: Path, column: str, flag: str, names: dict[str, str] | None = None
) -> list[Any]:
    """The ``column`` of a CSV, JSON lines or Parquet file (or the column
    ``names`` maps it to: :func:`~twostage.data.frames.log_names`), in its order (repeats kept). CSV
    IDs are read as typed, as ``--user`` reads one: ``0042`` keeps its zeros;
    JSON and Parquet IDs keep their types."""
    frame = _our_names(_read_table(path, flag), names or {}, path, flag)
    values = _filled_column(frame, column, path, flag, names)
    if values.dtype == pl.String:
        return [parse_id(value) for value in values.to_list()]
    return values.to_list()


def read_user_features(
    path: Path,
    columns: list[str],
    flag: str = "--users",
    names: dict[str, str] | None = None,
    known: Callable[[Any], bool] = lambda user: False,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The user feature ``columns`` (the model's) a file of users holds: each
    user's values (by the ID as text; an empty value is left out, as unknown)
    and the columns found. A user listed twice with other values is an error
    naming them, unless ``known`` says the model knows them (their features
    are not read)."""
    frame = _our_names(_read_table(path, flag), names or {}, path, flag)
    found = [c for c in columns if c in frame.columns]
    if not found:
        return {}, []
    text = path.suffix.lower() not in (".parquet", ".pq", ".jsonl", ".ndjson", ".json")
    ids = frame["user_id"]
    if text:
        ids = _typed_ids(ids)
    by_user: dict[str, dict[str, Any]] = {}
    for row, (user, *values) in enumerate(
        zip(ids.to_list(), *(frame[c].to_list() for c in found), strict=True), 1
    ):
        given = {
            c: v
            for c, v in zip(found, values, strict=True)
            if v is not None and not (isinstance(v, str) and not v.strip())
        }
        key = str(user)
        if key in by_user and by_user[key] != given and not known(user):
            raise typer.BadParameter(
                f"user {user!r} is listed again in {str(path)!r} (data row {row}) "
                f"with other features ({given} against {by_user[key]}); give each "
                "user's features once.",
                param_hint=flag,
            )
        by_user[key] = given
    return {k: v for k, v in by_user.items() if v}, found


def write_in_chunks(
    out: Path,
    ids: list[Any],
    table_of: Callable[[list[Any]], pl.DataFrame],
    *,
    key: str,
    noun: str,
    chunk: int,
    on_chunk: Callable[[list[Any], pl.DataFrame], None] | None = None,
    verbs: tuple[str, str] = ("answering for", "answered for"),
) -> int:
    """``table_of`` a chunk of ``ids`` at a time into ``out`` (Parquet or CSV), so
    that memory holds one chunk's answers; the ``key`` column takes one type for
    the whole file. Written beside ``out`` and renamed at the end, so that an
    interrupted run leaves no partial file. ``verbs``: what the status line says
    while and after each chunk.

    Returns:
        The number of rows written.
    """
    import pyarrow.parquet as pq

    key_type = pl.Series(ids, strict=False).dtype if ids else pl.String
    partial = out.with_name(f".{out.name}.partial")
    writer: Any = None
    rows = 0
    try:
        with (
            status_console.status(f"{verbs[0]} {len(ids):,} {noun}") as status,
            partial.open("wb") as handle,
        ):
            for start in range(0, max(len(ids), 1), chunk):
                part = ids[start : start + chunk]
                table = table_of(part).with_columns(pl.col(key).cast(key_type))
                if on_chunk is not None:
                    on_chunk(part, table)
                rows += table.height
                if out.suffix.lower() == ".csv":
                    table.write_csv(handle, include_header=start == 0)
                else:
                    arrow = table.to_arrow()
                    if writer is None:
                        writer = pq.ParquetWriter(handle, arrow.schema)
                    writer.write_table(arrow)
                done = min(start + chunk, len(ids))
                status.update(f"{verbs[1]} {done:,} of {len(ids):,} {noun}")
            if writer is not None:
                writer.close()
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return rows
