"""The Netflix Prize layout: reading it, and writing files in the same layout to test
with.

The prize's ``combined_data_1.txt`` ... ``combined_data_4.txt`` (Kaggle's
"netflix-prize-data", 100 million ratings) are not a table: a line ``1:`` opens the
ratings of movie 1, and each line below it is ``customer,rating,date``
(``1488844,3,2005-09-06``) until the next movie's line. The original
``training_set/mv_0000001.txt`` files hold one movie each in the same layout.
``movie_titles.csv`` is ``movie,year,title`` without a header, in latin-1, with
commas inside titles left unquoted (``72,1974,At Home Among Strangers, A Stranger
Among His Own``) and ``NULL`` where the year is unknown.

:func:`read_netflix` turns the blocks into rows with polars, a file at a time, and
checks every row as :func:`twostage.data.tables.read_interactions` checks a table;
a rejected line is counted with its reason and its line in its file. Dates become
midnight UTC, so a customer's ratings of one day keep their file order.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from twostage.data._layout import TEXT as _TEXT
from twostage.data._layout import read_lines, refuse_options
from twostage.data._table_values import (
    LINE,
    MISSING_WORDS,
    Spec,
    canonical_ints,
    load_frame,
    make_options,
)
from twostage.data.dataset import ITEM, RATING, TIME, USER, Dataset
from twostage.data.report import MAX_EXAMPLES, LoadReport
from twostage.errors import BadRowError, ConfigError, DataError

__all__ = ["read_netflix", "write_netflix"]

logger = logging.getLogger(__name__)

_FILES = ("combined_data_*.txt", "mv_*.txt")
#: Kaggle's name, and the original archive's (beside ``training_set/``).
_TITLES = ("movie_titles.csv", "movie_titles.txt")
_MOVIE_LINE = r"^\s*[0-9]+:\s*$"
#: The options a Netflix Prize file takes; its columns are fixed.
_OPTIONS = ("strict", "name", "missing_ratings")


def read_netflix(path: str | Path, **options: Any) -> Dataset:
    """Read ratings in the Netflix Prize layout.

    Args:
        path: a ``combined_data_*.txt`` or ``mv_*.txt`` file, or a directory holding
            such files (all of them are read, in name order). A
            ``movie_titles.csv`` (Kaggle's) or ``movie_titles.txt`` (the original
            archive's, beside ``training_set/``) there or one directory up gives
            the item features ``year`` and ``title``.
        **options: ``strict=True`` stops at the first bad line (a
            :class:`~twostage.errors.BadRowError` naming its file and line);
            ``name`` names the dataset (default ``netflix``);
            ``missing_ratings="unrated"`` keeps a line with an empty rating as an
            interaction without one.

    Returns:
        A dataset of ``user_id`` (the customer), ``item_id`` (the movie),
        ``rating`` and ``timestamp`` (the date's midnight, UTC, in seconds), its
        report counting the rejected lines: ``blank_line``, ``no_movie_line`` (a
        rating above the first movie's line), ``wrong_field_count``,
        ``bad_timestamp`` (a date not written ``yyyy-mm-dd``, as every date of
        the prize is), and the reasons of
        :func:`~twostage.data.tables.read_interactions` for the other values.

    Raises:
        ConfigError: an option other than ``strict``, ``name`` and
            ``missing_ratings`` (such as a column mapping: the layout names its
            columns).
        DataError: no such file, or a directory without ratings files.
    """
    refuse_options(
        options,
        _OPTIONS,
        "a Netflix Prize file has its columns already (customer, movie, rating, date)",
        "netflix:PATH",
    )
    strict = bool(options.get("strict", False))
    missing_ratings = str(options.get("missing_ratings") or "reject")
    if missing_ratings not in ("reject", "unrated"):
        raise ConfigError(
            "`missing_ratings` should be 'reject' or 'unrated'. Received: "
            f"{missing_ratings!r}."
        )
    root = Path(path).expanduser()
    files = _rating_files(root)
    label = str(root)
    parts, reports = [], []
    for indices in _chunks(files):
        frame, report = _read_files(files, indices, strict, missing_ratings)
        parts.append(frame)
        reports.append(report)
    report = _merged(label, reports)
    interactions = pl.concat(parts, how="vertical")
    ids = canonical_ints(interactions, [USER, ITEM])
    interactions = interactions.with_columns(ids.values())
    report.rows_loaded = interactions.height
    if report.ok:
        logger.debug("%s", report.summary())
    else:
        logger.warning("%s", report.summary())
    near = root if root.is_dir() else root.parent
    found = [d / n for d in (near, near.parent) for n in _TITLES if (d / n).is_file()]
    items = _read_titles(found[0], interactions.schema[ITEM]) if found else None
    return Dataset(
        name=str(options.get("name") or "netflix"),
        interactions=interactions.select(USER, ITEM, TIME, RATING),
        items=items,
        source=label,
        report=report,
        has_time=True,
    )


def _rating_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(
            f"`netflix:PATH` should name a combined_data_*.txt file or the directory "
            f"holding them. Received: {str(root)!r} (no such file or directory)."
        )
    for pattern in _FILES:
        files = sorted(root.glob(pattern))
        if files:
            return files
    raise DataError(
        f"{str(root)!r} holds no Netflix Prize ratings file ({' or '.join(_FILES)})."
    )


#: Files read as one frame at most (the prize's original ``training_set/`` is
#: 17,770 small files; each of Kaggle's four is one chunk of its own).
_CHUNK_BYTES = 256 << 20
#: A file's rows are told apart from another file's by ``file * _SPAN + line``.
_SPAN = 1 << 40


def _chunks(files: list[Path]) -> list[list[int]]:
    """The indices of ``files`` in runs of at most ``_CHUNK_BYTES`` (or one file)."""
    chunks: list[list[int]] = []
    size = 0
    for i, file in enumerate(files):
        bytes_ = file.stat().st_size
        if not chunks or size + bytes_ > _CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += bytes_
    return chunks


def _read_lines(files: list[Path], indices: list[int]) -> pl.DataFrame:
    """The lines of some files, each with its 1-based line number in its file and,
    with several files, the file's index (``__file``)."""
    frames = []
    for i in indices:
        lines = read_lines(files[i], "a Netflix Prize ratings file")
        if len(indices) > 1:  # one file: its index is a constant (_read_files)
            lines = lines.with_columns(pl.lit(i, dtype=pl.Int64).alias("__file"))
        frames.append(lines)
    return pl.concat(frames, how="vertical")


def _read_files(
    files: list[Path], indices: list[int], strict: bool, missing_ratings: str
) -> tuple[pl.DataFrame, LoadReport]:
    """The rows of some files read as one frame, and their report: each example
    is numbered by its line in its file, and named with its file when the dataset
    has several."""
    lines = _read_lines(files, indices)
    text = pl.col(_TEXT)
    movie_line = text.str.contains(_MOVIE_LINE).fill_null(False)
    movie = pl.when(movie_line).then(text.str.strip_chars().str.strip_suffix(":"))
    lines = lines.with_columns(
        (
            movie.forward_fill()
            if len(indices) == 1
            # a file without its movie line takes none from the file before
            else movie.forward_fill().over("__file")
        ).alias(ITEM),
        movie_line.alias("__movie"),
    )
    # A row's file and line as one number, computed where needed (24M rows of a
    # column cost a second and 190 MB).
    file = pl.col("__file") if len(indices) > 1 else pl.lit(indices[0], pl.Int64)
    key = (file * _SPAN + pl.col(LINE)).alias("__key")
    rows = lines.filter(~pl.col("__movie")).with_columns(
        text.str.splitn(",", 3).alias("__f")  # a struct: no list per row
    )
    last = pl.col("__f").struct.field("field_2")
    day = last.str.strptime(pl.Date, "%Y-%m-%d", strict=False)
    blank = pl.col(_TEXT).is_null() | (pl.col(_TEXT).str.strip_chars() == "")
    reason = (
        pl.when(blank)
        .then(pl.lit("blank_line"))
        .when(pl.col(ITEM).is_null())
        .then(pl.lit("no_movie_line"))
        .when(last.is_null() | last.str.contains(",", literal=True))
        .then(pl.lit("wrong_field_count"))
        .when(day.is_null())  # the prize writes every date so
        .then(pl.lit("bad_timestamp"))
        .alias("__reason")
    )
    rows = rows.with_columns(reason)
    several = len(files) > 1

    def shown(number: int, line_text: str | None) -> tuple[int, str]:
        index, line = divmod(number, _SPAN)
        name = f"{files[index].name}: " if several else ""
        return line, f"{name}{line_text or ''}"[:200]

    report = LoadReport(path="")
    bad = rows.filter(pl.col("__reason").is_not_null())
    firsts: list[tuple[int, str]] = []  # (key, reason) of each reason's first row
    for name, group in bad.group_by("__reason", maintain_order=True):
        head = group.head(MAX_EXAMPLES).select(key, _TEXT).rows()
        report.add_many(str(name[0]), group.height, [shown(k, t) for k, t in head])
        firsts.append((head[0][0], str(name[0])))
    good = rows.filter(pl.col("__reason").is_null())
    raw = good.select(
        pl.col("__f").struct.field("field_0").alias(USER),
        pl.col(ITEM),
        pl.col("__f").struct.field("field_1").alias(RATING),
        (day.cast(pl.Int64) * 86_400).alias(TIME),
    )
    spec = Spec(
        {USER: USER, ITEM: ITEM, TIME: TIME, RATING: RATING},
        (),
        None,
        "keep",
        (USER, ITEM, TIME),
        missing_ratings=missing_ratings,
    )
    options = make_options(
        separator=None,
        has_header=True,
        column_names=None,
        encoding="auto",
        quote_char=None,
        strict=False,
        time_format=None,
    )
    keys = good.select(key).to_series()
    parsed, values, _, _ = load_frame(raw, "", spec, options, lines=keys)
    if not values.ok:  # name the lines as the files hold them
        wanted = [k for kept in values.examples.values() for k, _ in kept]
        found = good.select(key, _TEXT).filter(pl.col("__key").is_in(wanted))
        line_text: dict[int, str] = dict(found.rows())
        for cause, count in values.rejected.items():
            kept = values.examples.get(cause, [])
            report.add_many(cause, count, [shown(k, line_text[k]) for k, _ in kept])
            firsts.append((kept[0][0], cause))
    report.rows_read = lines.height - int(lines["__movie"].sum())
    if strict and firsts:
        first_key, why = min(firsts)
        file_index, line = divmod(first_key, _SPAN)
        content = lines.filter(pl.col(LINE) == line, file == file_index)[_TEXT][0]
        raise BadRowError(str(files[file_index]), line, why, content or "")
    return parsed.drop([c for c in (LINE,) if c in parsed.columns]), report


def _merged(label: str, reports: list[LoadReport]) -> LoadReport:
    """One report for the chunks read."""
    merged = LoadReport(path=label)
    for report in reports:
        merged.rows_read += report.rows_read
        for reason, count in report.rejected.items():
            merged.add_many(reason, count, report.examples.get(reason, []))
    return merged


def _read_titles(path: Path, key_type: pl.DataType) -> pl.DataFrame:
    """``movie_titles.csv``: ``item_id``, ``year`` (null for ``NULL``) and ``title``,
    split at the first two commas only (titles hold unquoted commas)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # the prize's file
    ids, years, titles, bad = [], [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(",", 2)
        year = fields[1].strip() if len(fields) == 3 else ""
        if (
            len(fields) != 3
            or not re.fullmatch(r"[0-9]+", fields[0].strip())
            or not (re.fullmatch(r"[0-9]{4}", year) or year in MISSING_WORDS)
        ):
            bad.append(number)
            continue
        ids.append(fields[0].strip())
        years.append(None if year in MISSING_WORDS else int(year))
        titles.append(fields[2].strip())
    if bad:
        logger.warning(
            "%s: %d line(s) are not `movie,year,title` and were left out (first: %s)",
            path,
            len(bad),
            ", ".join(map(str, bad[:MAX_EXAMPLES])),
        )
    table = pl.DataFrame(
        {
            ITEM: pl.Series(ids, dtype=pl.String),
            "year": pl.Series(years, dtype=pl.Int16),
            "title": pl.Series(titles, dtype=pl.String),
        }
    )
    if key_type != pl.String:
        table = table.with_columns(pl.col(ITEM).cast(key_type))
    repeated = table[ITEM].is_duplicated()
    if repeated.any():
        raise DataError(
            f"{path} lists the movie(s) {table[ITEM].filter(repeated).unique().to_list()[:5]} "
            "more than once."
        )
    return table


def write_netflix(
    directory: str | Path,
    *,
    num_users: int = 1000,
    num_movies: int = 300,
    num_rows: int = 20_000,
    files: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``combined_data_1.txt`` ... and ``movie_titles.csv`` in the prize's
    layout, with planted structure: movies belong to one of eight genres with
    Zipf-like popularity, each customer prefers a genre and rates it higher.

    Each customer rates a movie once; with few customers and movies there may
    be fewer than ``num_rows`` such pairs, and as many rows as there are are
    written. Customer IDs are sparse (as the prize's, up to 2,649,429), some titles hold
    commas and accented letters (latin-1), and some years are ``NULL``.

    Returns:
        ``directory``.
    """
    if min(num_users, num_movies, num_rows, files) < 1 or files > num_movies:
        raise ConfigError(
            "`num_users`, `num_movies`, `num_rows` and `files` should be positive, "
            f"with at most one file per movie. Received: {num_users}, {num_movies}, "
            f"{num_rows}, {files}."
        )
    rng = np.random.default_rng(seed)
    genres = 8
    genre = rng.integers(0, genres, num_movies)
    popularity = 1.0 / np.arange(1, num_movies + 1) ** 0.8
    rng.shuffle(popularity)
    users = np.sort(rng.choice(2_649_429, num_users, replace=False) + 1)
    taste = rng.integers(0, genres, num_users)
    activity = rng.pareto(1.2, num_users) + 1
    who = rng.choice(num_users, 2 * num_rows, p=activity / activity.sum())
    what = rng.choice(num_movies, 2 * num_rows, p=popularity / popularity.sum())
    # One rating per customer and movie, as in the prize's data.
    _, first = np.unique(who * num_movies + what, return_index=True)
    kept = np.sort(first)[:num_rows]
    who, what = who[kept], what[kept]
    num_rows = len(kept)
    liked = taste[who] == genre[what]
    stars = np.clip(np.rint(rng.normal(np.where(liked, 4.2, 2.8), 0.9)), 1, 5)
    start = np.datetime64("1999-11-11")
    days = rng.integers(0, (np.datetime64("2005-12-31") - start).astype(int), num_rows)
    dates = (start + days).astype(str)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = pl.DataFrame(
        {
            "movie": what + 1,
            "order": np.ones(num_rows, dtype=np.int8),
            "text": pl.Series(users[who]).cast(pl.String)
            + ","
            + pl.Series(stars.astype(np.int64)).cast(pl.String)
            + ","
            + pl.Series(dates),
        }
    )
    heads = pl.DataFrame(
        {
            "movie": np.arange(1, num_movies + 1),
            "order": np.zeros(num_movies, dtype=np.int8),
        }
    ).with_columns(text=pl.col("movie").cast(pl.String) + ":")
    blocks = pl.concat([heads, rows]).sort("movie", "order", maintain_order=True)
    bounds = np.linspace(0, num_movies, files + 1).astype(int)
    for part in range(files):
        inside = pl.col("movie").is_between(bounds[part] + 1, bounds[part + 1])
        blocks.filter(inside).select("text").write_csv(
            out / f"combined_data_{part + 1}.txt",
            include_header=False,
            quote_style="never",
        )
    words = ("Night", "River", "Café", "Return", "Stranger", "Garden", "Señor", "Home")
    with (out / _TITLES[0]).open("w", encoding="latin-1", newline="\r\n") as f:
        for movie in range(num_movies):
            year = "NULL" if movie % 97 == 5 else str(rng.integers(1920, 2006))
            title = f"{words[genre[movie]]} {movie + 1}"
            if movie % 7 == 3:
                title += f", {words[(genre[movie] + 1) % genres]} Among Us"
            f.write(f"{movie + 1},{year},{title}\n")
    return out
