"""Vectorised (polars) parsers for the MovieLens file layouts.

Every parser returns ``(interactions, users, items)`` in the normalised schema that
:mod:`twostage.data.movielens` documents, so the source never shows downstream.

Layouts:
    ``100k``: ``u.data`` (tab), ``u.item`` and ``u.user`` (``|``), latin-1.
    ``recbole``: RecBole's ``ml-100k.{inter,item,user}`` (tab, typed header), UTF-8.
    ``1m``: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``), latin-1.
    ``csv``: ``ratings.csv`` and ``movies.csv`` (latest-small, 20m, 25m), UTF-8.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import polars as pl

from twostage.errors import DataError

__all__ = ["GENRES_100K", "OCCUPATIONS_1M", "PARSERS", "Files", "detect_layout"]

Tables = tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame]
_Schema = dict[str, type[pl.DataType] | pl.DataType]

#: The 19 genre flags of ``u.item``, in file order.
GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

#: ``users.dat`` occupation codes, as listed in the ml-1m README.
OCCUPATIONS_1M = {
    0: "other", 1: "academic/educator", 2: "artist", 3: "clerical/admin",
    4: "college/grad student", 5: "customer service", 6: "doctor/health care",
    7: "executive/managerial", 8: "farmer", 9: "homemaker", 10: "K-12 student",
    11: "lawyer", 12: "programmer", 13: "retired", 14: "sales/marketing",
    15: "scientist", 16: "self-employed", 17: "technician/engineer",
    18: "tradesman/craftsman", 19: "unemployed", 20: "writer",
}  # fmt: skip

_LAYOUT_FILES = {
    "100k": ("u.data", "u.item", "u.user"),
    "recbole": ("ml-100k.inter", "ml-100k.item", "ml-100k.user"),
    "1m": ("ratings.dat", "movies.dat", "users.dat"),
    "csv": ("ratings.csv", "movies.csv"),
}
#: Human-readable list of the files each layout needs, for error messages.
REQUIRED = {layout: ", ".join(names) for layout, names in _LAYOUT_FILES.items()}

_RATINGS: _Schema = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "rating": pl.Float64,
    "timestamp": pl.Int64,
}
_USERS_100K: _Schema = {
    "user_id": pl.Int64, "age": pl.Int64, "gender": pl.String,
    "occupation": pl.String, "zip_code": pl.String,
}  # fmt: skip
_USERS_1M: _Schema = {
    "user_id": pl.Int64, "gender": pl.String, "age": pl.Int64,
    "occupation_code": pl.Int64, "zip_code": pl.String,
}  # fmt: skip

# A trailing "(YYYY)", optionally followed by 100k's "(V)" (video release) marker.
_YEAR = r"\((\d{4})\)(?:\s*\(V\))?$"
_YEAR_SUFFIX = r"\s*\((\d{4})\)(\s*\(V\))?$"
_NO_GENRES = ("", "(no genres listed)")
# RecBole wrote the title of 100k's item 267 ("unknown") as "unkonwn".
_RECBOLE_UNKNOWN = "unkonwn"


class Files:
    """The named files of one dataset, in a folder or inside a zip archive.

    Args:
        location: a folder, or a zip file whose members are found by base name.
        subfolder: for a folder that lacks the files itself, a child folder to look
            in instead (e.g. ``"ml-1m"``).
    """

    def __init__(self, location: Path, *, subfolder: str | None = None) -> None:
        self.location = location
        self.folder: Path | None = None
        self.members: dict[str, str] | None = None
        if location.is_dir():
            self.folder = location
            child = location / subfolder if subfolder else None
            if detect_layout(self) is None and child is not None and child.is_dir():
                self.folder = child
        elif location.is_file() and zipfile.is_zipfile(location):
            with zipfile.ZipFile(location) as zf:
                names = sorted(zf.namelist(), key=lambda n: -n.count("/"))
            # Shallower members win over same-named deeper ones (listed last).
            self.members = {Path(n).name: n for n in names if not n.endswith("/")}

    @property
    def exists(self) -> bool:
        return self.folder is not None or self.members is not None

    def has(self, name: str) -> bool:
        if self.folder is not None:
            return (self.folder / name).is_file()
        return self.members is not None and name in self.members

    def read(self, name: str) -> bytes:
        if self.folder is not None:
            return (self.folder / name).read_bytes()
        if self.members is None or name not in self.members:
            raise DataError(f"{self.location} has no file {name!r}.")
        with zipfile.ZipFile(self.location) as zf:
            return zf.read(self.members[name])

    def source(self, name: str) -> Path | io.BytesIO:
        """A path (lets polars read large CSVs without a copy) or the bytes."""
        if self.folder is not None:
            return self.folder / name
        return io.BytesIO(self.read(name))

    def describe(self, name: str) -> str:
        if self.folder is not None:
            return str(self.folder / name)
        return f"{self.location}!{name}"


def detect_layout(files: Files) -> str | None:
    """The first layout whose files are all present, or ``None``."""
    for layout, names in _LAYOUT_FILES.items():
        if all(files.has(n) for n in names):
            return layout
    return None


def parse_100k(files: Files) -> Tables:
    """Parse the official ml-100k files ``u.data``, ``u.item``, ``u.user``."""
    data = _read_delimited(files, "u.data", "\t", _RATINGS)
    item_schema: _Schema = {
        "item_id": pl.Int64(),
        "raw_title": pl.String(),
        "release_date": pl.String(),
        "video_release_date": pl.String(),
        "imdb_url": pl.String(),
    }
    item_schema.update({g: pl.Int8() for g in GENRES_100K})
    items = _read_delimited(files, "u.item", "|", item_schema).with_columns(
        genres=pl.concat_list(
            [pl.when(pl.col(g) == 1).then(pl.lit(g)) for g in GENRES_100K]
        ).list.drop_nulls()
    )
    users = _read_delimited(files, "u.user", "|", _USERS_100K)
    return _interactions(data), _users(users), _items(items)


def parse_recbole(files: Files) -> Tables:
    """Parse RecBole's ``ml-100k.{inter,item,user}`` (ml-100k in atomic format)."""
    data = _read_typed_header(files, "ml-100k.inter").with_columns(
        pl.col("timestamp").cast(pl.Float64)
    )
    items = _read_typed_header(files, "ml-100k.item")
    title, year = pl.col("movie_title"), pl.col("release_year")
    # RecBole split "Title (Year)" at the last " ("; join it back so the titles go
    # through the same year parsing as every other layout.
    raw_title = (
        pl.when((title == _RECBOLE_UNKNOWN) & (year == _RECBOLE_UNKNOWN))
        .then(pl.lit("unknown"))
        .when(year.is_null() | (year == ""))
        .then(title)
        .otherwise(pl.format("{} ({})", title, year))
    )
    genres = (
        pl.col("class")
        .fill_null("")
        .str.split(" ")
        .list.eval(pl.element().filter(pl.element() != ""))
    )
    items = items.select(
        "item_id", raw_title.alias("raw_title"), genres.alias("genres")
    )
    users = _read_typed_header(files, "ml-100k.user")
    return _interactions(data), _users(users), _items(items)


def parse_1m(files: Files) -> Tables:
    """Parse the official ml-1m files ``ratings.dat``, ``users.dat``, ``movies.dat``."""
    data = _read_delimited(files, "ratings.dat", "::", _RATINGS)
    users = _read_delimited(files, "users.dat", "::", _USERS_1M)
    users = users.with_columns(
        occupation=pl.col("occupation_code").replace_strict(
            OCCUPATIONS_1M, return_dtype=pl.String
        )
    )
    movies = _read_delimited(
        files,
        "movies.dat",
        "::",
        {"item_id": pl.Int64, "raw_title": pl.String, "genre_text": pl.String},
    )
    movies = movies.with_columns(genres=_pipe_genres(pl.col("genre_text")))
    return _interactions(data), _users(users), _items(movies)


def parse_csv(files: Files) -> Tables:
    """Parse ``ratings.csv`` and ``movies.csv`` (ml-latest-small, ml-20m, ml-25m)."""
    data = _read_csv(
        files,
        "ratings.csv",
        {
            "userId": pl.Int64,
            "movieId": pl.Int64,
            "rating": pl.Float64,
            "timestamp": pl.Int64,
        },
    ).rename({"userId": "user_id", "movieId": "item_id"})
    movies = _read_csv(
        files,
        "movies.csv",
        {"movieId": pl.Int64, "title": pl.String, "genres": pl.String},
    )
    movies = movies.select(
        pl.col("movieId").alias("item_id"),
        pl.col("title").alias("raw_title"),
        _pipe_genres(pl.col("genres")).alias("genres"),
    )
    return _interactions(data), None, _items(movies)


PARSERS: dict[str, Callable[[Files], Tables]] = {
    "100k": parse_100k,
    "recbole": parse_recbole,
    "1m": parse_1m,
    "csv": parse_csv,
}


def _to_utf8(raw: bytes) -> bytes:
    """UTF-8 bytes of a file that is UTF-8 or (like the official MovieLens) latin-1."""
    if raw.isascii():
        return raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1").encode("utf-8")
    return raw


def _read_delimited(
    files: Files, name: str, separator: str, schema: _Schema
) -> pl.DataFrame:
    """A header-less file whose fields never contain quotes or the separator."""
    raw = _to_utf8(files.read(name))
    if separator == "::":  # polars wants a one-byte separator
        raw, separator = raw.replace(b"::", b"\x1f"), "\x1f"
    try:
        frame = pl.read_csv(
            io.BytesIO(raw),
            separator=separator,
            has_header=False,
            schema=schema,
            quote_char=None,
        )
    except pl.exceptions.PolarsError as e:
        shown = "::" if separator == "\x1f" else separator
        raise DataError(
            f"{files.describe(name)} should have {len(schema)} {shown!r}-separated "
            f"fields per line ({', '.join(schema)}). Could not read it: {e}"
        ) from e
    return frame.filter(~pl.all_horizontal(pl.all().is_null()))  # blank lines


def _read_typed_header(files: Files, name: str) -> pl.DataFrame:
    """A RecBole atomic file: tab-separated with a ``name:type`` header."""
    try:
        frame = pl.read_csv(
            io.BytesIO(_to_utf8(files.read(name))),
            separator="\t",
            infer_schema=False,
            quote_char=None,
        )
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{files.describe(name)}: could not read it: {e}") from e
    return frame.rename(lambda column: column.split(":", 1)[0])


def _read_csv(files: Files, name: str, schema: _Schema) -> pl.DataFrame:
    try:
        frame = pl.read_csv(files.source(name), schema_overrides=schema)
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{files.describe(name)}: could not read it: {e}") from e
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise DataError(
            f"{files.describe(name)} should have the columns {list(schema)}. "
            f"Received: {frame.columns} (missing {missing})."
        )
    return frame


def _pipe_genres(text: pl.Expr) -> pl.Expr:
    """``"A|B"`` -> ``["A", "B"]``; empty or ``"(no genres listed)"`` -> ``[]``."""
    return (
        pl.when(text.is_null() | text.is_in(_NO_GENRES))
        .then(pl.lit([], dtype=pl.List(pl.String)))
        .otherwise(text.str.split("|"))
    )


def _interactions(frame: pl.DataFrame) -> pl.DataFrame:
    out = frame.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("rating").cast(pl.Float32),
    )
    nulls = out.null_count().row(0, named=True)
    if any(nulls.values()):
        raise DataError(
            f"interactions should have no missing values. Received null counts "
            f"{nulls}; the ratings file has short or malformed lines."
        )
    return out


def _users(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col("user_id").cast(pl.Int64),
        pl.col("age").cast(pl.Int64),
        pl.col("gender").cast(pl.String),
        pl.col("occupation").cast(pl.String),
        pl.col("zip_code").cast(pl.String),
    )


def _items(frame: pl.DataFrame) -> pl.DataFrame:
    """``item_id``, ``raw_title`` ("Title (Year)") and ``genres`` -> the item table."""
    raw = pl.col("raw_title").str.strip_chars()
    out = frame.select(
        pl.col("item_id").cast(pl.Int64),
        raw.str.replace(_YEAR_SUFFIX, "$2").str.strip_chars().alias("title"),
        raw.str.extract(_YEAR, 1).cast(pl.Int64).alias("year"),
        pl.col("genres").cast(pl.List(pl.String)),
    )
    return out.with_columns(
        display_title=pl.when(pl.col("year").is_not_null())
        .then(pl.format("{} ({})", pl.col("title"), pl.col("year")))
        .otherwise(pl.col("title"))
    )
