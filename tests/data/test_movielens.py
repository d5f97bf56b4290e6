"""MovieLens loading: every file layout, the cache, downloads and the 100k fallback."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from twostage.data import download as download_mod
from twostage.data import movielens
from twostage.data.download import download, extract_zip
from twostage.data.movielens import (
    DATASETS,
    RECBOLE_SOURCE,
    available,
    fetch_movielens,
    load_movielens,
)
from twostage.data.movielens_formats import GENRES_100K
from twostage.errors import ChecksumError, DataError, DatasetUnavailableError

INTERACTIONS_SCHEMA = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "timestamp": pl.Int64,
    "rating": pl.Float32,
}
USERS_SCHEMA = {
    "user_id": pl.Int64,
    "age": pl.Int64,
    "gender": pl.String,
    "occupation": pl.String,
    "zip_code": pl.String,
}
ITEMS_SCHEMA = {
    "item_id": pl.Int64,
    "title": pl.String,
    "year": pl.Int64,
    "genres": pl.List(pl.String),
    "display_title": pl.String,
}

# (user, item, rating, timestamp), shared by the 100k and RecBole fixtures.
RATINGS_100K = [
    (1, 1, 5, 874965758),
    (1, 2, 3, 876893171),
    (2, 1, 4, 888550871),
    (2, 6, 2, 888551234),
    (3, 543, 1, 889237004),
    (3, 267, 4, 889236900),
    (3, 1412, 3, 889237100),
]
# (item, official u.item title, release date, genres)
ITEMS_100K = [
    (1, "Toy Story (1995)", "01-Jan-1995", ["Animation", "Children's", "Comedy"]),
    (2, "GoldenEye (1995)", "01-Jan-1995", ["Action", "Adventure", "Thriller"]),
    (
        6,
        "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
        "01-Jan-1995",
        ["Drama"],
    ),
    (267, "unknown", "", ["unknown"]),
    (543, "Misérables, Les (1995) ", "01-Jan-1995", ["Drama", "Musical"]),
    (
        1412,
        "Land Before Time III: The Time of the Great Giving (1995) (V)",
        "01-Jan-1995",
        ["Animation", "Children's"],
    ),
]
USERS_100K = [
    (1, 24, "M", "technician", "85711"),
    (2, 53, "F", "other", "05201"),
    (3, 23, "M", "writer", "T8H1N"),
]


def write_100k(folder: Path) -> Path:
    """The official layout: tab / '|' separated, latin-1."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(
        "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS_100K)
    )
    lines = []
    for item, title, date, genres in ITEMS_100K:
        flags = "|".join("1" if g in genres else "0" for g in GENRES_100K)
        url = "" if item == 267 else f"http://us.imdb.com/M/title-exact?{item}"
        lines.append(f"{item}|{title}|{date}||{url}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.user").write_text(
        "".join("|".join(map(str, u)) + "\n" for u in USERS_100K)
    )
    return folder


def write_recbole(folder: Path) -> Path:
    """The same rows as RecBole 1.2.1 ships them (UTF-8, typed headers)."""
    folder.mkdir(parents=True, exist_ok=True)
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS_100K
    )
    (folder / "ml-100k.inter").write_text(inter, encoding="utf-8")
    item_rows = [
        "1\tToy Story\t1995\tAnimation Children's Comedy",
        "2\tGoldenEye\t1995\tAction Adventure Thriller",
        "6\tShanghai Triad (Yao a yao yao dao waipo qiao)\t1995\tDrama",
        "267\tunkonwn\tunkonwn\tunknown",  # sic: RecBole's spelling
        "543\tMisérables, Les\t1995\tDrama Musical",
        "1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\t"
        "Animation Children's",
    ]
    header = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
    (folder / "ml-100k.item").write_text(
        "\n".join([header, *item_rows]) + "\n", encoding="utf-8"
    )
    user_header = (
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    )
    (folder / "ml-100k.user").write_text(
        user_header + "".join("\t".join(map(str, u)) + "\n" for u in USERS_100K)
    )
    return folder


def write_1m(folder: Path) -> Path:
    """The ml-1m layout: '::' separated, latin-1."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text(
        "1::1193::5::978300760\n1::661::3::978302109\n2::73::4::978298413\n"
        "3::260::5::978297512\n4::3::2::978294008\n"
    )
    (folder / "users.dat").write_text(
        "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"
        "4::M::45::0::02460\n"
    )
    movies = (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "73::Misérables, Les (1995)::Drama|Musical\n"
        "260::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Sci-Fi\n"
        "3::Grumpier Old Men (1995) ::Comedy|Romance\n"
    )
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    return folder


def write_csv(folder: Path) -> Path:
    """The ml-latest-small / 20m / 25m layout: quoted UTF-8 CSV with headers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,3.5,964981247\n"
        "2,31,0.5,1445714835\n2,99,5.0,1445714996\n3,171,2.5,1306463533\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '31,"Café au Lait (Métisse) (1993) ",Comedy\n'
        '99,"""Great Performances"" Cats (1998)",Musical\n'
        "171,Babylon 5,(no genres listed)\n"
        "172,Fawlty Towers (1975-1979),Comedy\n",
        encoding="utf-8",
    )
    return folder


def assert_schema(frame: pl.DataFrame | None, expected: dict[str, Any]) -> None:
    assert frame is not None
    assert dict(frame.schema) == expected


def item_rows(frame: pl.DataFrame | None) -> dict[int, tuple[Any, ...]]:
    assert frame is not None
    return {
        row["item_id"]: (row["title"], row["year"], row["genres"], row["display_title"])
        for row in frame.iter_rows(named=True)
    }


def test_parse_100k_official(tmp_path: Path) -> None:
    ds = load_movielens("100k", data_dir=write_100k(tmp_path / "ml-100k"))
    assert ds.name == "movielens-100k"
    assert ds.source == str((tmp_path / "ml-100k").resolve())
    assert_schema(ds.interactions, INTERACTIONS_SCHEMA)
    assert_schema(ds.users, USERS_SCHEMA)
    assert_schema(ds.items, ITEMS_SCHEMA)
    assert ds.interactions.rows() == [
        (u, i, t, float(r)) for u, i, r, t in RATINGS_100K
    ]
    items = item_rows(ds.items)
    assert items[6] == (
        "Shanghai Triad (Yao a yao yao dao waipo qiao)",
        1995,
        ["Drama"],
        "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",
    )
    assert items[543] == (
        "Misérables, Les",
        1995,
        ["Drama", "Musical"],
        "Misérables, Les (1995)",
    )
    assert items[267] == ("unknown", None, ["unknown"], "unknown")
    assert items[1412][:2] == (
        "Land Before Time III: The Time of the Great Giving (V)",
        1995,
    )
    assert items[1][2] == ["Animation", "Children's", "Comedy"]
    assert ds.users is not None
    assert ds.users["zip_code"].to_list() == ["85711", "05201", "T8H1N"]


def test_recbole_layout_gives_the_same_frames_as_official(tmp_path: Path) -> None:
    official = load_movielens("100k", data_dir=write_100k(tmp_path / "a"))
    recbole = load_movielens("ml-100k", data_dir=write_recbole(tmp_path / "b"))
    assert_frame_equal(official.interactions, recbole.interactions)
    assert official.users is not None and recbole.users is not None
    assert official.items is not None and recbole.items is not None
    assert_frame_equal(official.users, recbole.users)
    assert_frame_equal(official.items, recbole.items)


def test_parse_1m(tmp_path: Path) -> None:
    ds = load_movielens("movielens-1m", data_dir=write_1m(tmp_path / "ml-1m"))
    assert ds.name == "movielens-1m"
    assert_schema(ds.interactions, INTERACTIONS_SCHEMA)
    assert_schema(ds.users, USERS_SCHEMA)
    assert_schema(ds.items, ITEMS_SCHEMA)
    assert ds.interactions.row(0) == (1, 1193, 978300760, 5.0)
    assert ds.users is not None
    assert ds.users.rows() == [
        (1, 1, "F", "K-12 student", "48067"),
        (2, 56, "M", "self-employed", "70072"),
        (3, 25, "M", "scientist", "55117"),
        (4, 45, "M", "other", "02460"),
    ]
    items = item_rows(ds.items)
    assert items[73] == (
        "Misérables, Les",
        1995,
        ["Drama", "Musical"],
        "Misérables, Les (1995)",
    )
    assert items[260][:2] == ("Star Wars: Episode IV - A New Hope", 1977)
    assert items[3][:2] == ("Grumpier Old Men", 1995)
    assert items[661][2] == ["Animation", "Children's", "Musical"]


def test_parse_csv_layout(tmp_path: Path) -> None:
    ds = load_movielens("latest-small", data_dir=write_csv(tmp_path / "small"))
    assert ds.name == "movielens-latest-small"
    assert ds.users is None
    assert_schema(ds.interactions, INTERACTIONS_SCHEMA)
    assert_schema(ds.items, ITEMS_SCHEMA)
    assert ds.interactions["rating"].to_list() == [4.0, 3.5, 0.5, 5.0, 2.5]
    items = item_rows(ds.items)
    assert items[11] == (
        "American President, The",
        1995,
        ["Comedy", "Drama", "Romance"],
        "American President, The (1995)",
    )
    assert items[31][:2] == ("Café au Lait (Métisse)", 1993)
    assert items[99][:2] == ('"Great Performances" Cats', 1998)
    assert items[171] == ("Babylon 5", None, [], "Babylon 5")
    assert items[172][:2] == ("Fawlty Towers (1975-1979)", None)
    # The same layout serves 20m and 25m.
    assert load_movielens("25m", data_dir=tmp_path / "small").num_interactions == 5


def test_zip_file_and_parent_folder_as_data_dir(tmp_path: Path) -> None:
    folder = write_1m(tmp_path / "parent" / "ml-1m")
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.iterdir():
            zf.write(path, f"ml-1m/{path.name}")
    direct = load_movielens("1m", data_dir=folder)
    for other in (
        load_movielens("1m", data_dir=archive),
        load_movielens("1m", data_dir=tmp_path / "parent"),
    ):
        assert_frame_equal(direct.interactions, other.interactions)
        assert direct.items is not None and other.items is not None
        assert_frame_equal(direct.items, other.items)


def test_variant_names() -> None:
    assert available() == ["100k", "1m", "latest-small", "20m", "25m"]
    for name in ("100k", "ml-100k", "movielens-100k", "ML-100K"):
        assert movielens._resolve(name) is DATASETS["100k"]
    with pytest.raises(DataError, match=r"`variant` should be one of .*'10m'"):
        load_movielens("10m")


def test_data_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        load_movielens("100k", data_dir=tmp_path / "nope")
    write_1m(tmp_path / "ml-1m")
    with pytest.raises(DataError, match=r"MovieLens 100k files .*1m layout"):
        load_movielens("100k", data_dir=tmp_path / "ml-1m")
    bad = write_100k(tmp_path / "bad")
    (bad / "u.data").write_text("1\t2\tfive\t874965758\n")
    with pytest.raises(DataError, match=r"u\.data"):
        load_movielens("100k", data_dir=bad)


class _BrokenResponse:
    """A response that delivers one chunk and then loses the connection."""

    def __init__(self) -> None:
        self.headers = {"Content-Length": "3000000"}
        self.calls = 0

    def __enter__(self) -> _BrokenResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise ConnectionResetError("connection reset by peer")
        return b"x" * 1000


def test_interrupted_download_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    dest = cache / "ml-100k.zip"
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _BrokenResponse())
    with pytest.raises(ConnectionResetError):
        download("https://example.invalid/ml-100k.zip", dest, sha256=None)
    assert list(cache.iterdir()) == []
    # A good file already in place survives a failed re-download untouched.
    dest.write_bytes(b"good")
    with pytest.raises(ConnectionResetError):
        download("https://example.invalid/ml-100k.zip", dest, sha256=None)
    assert list(cache.iterdir()) == [dest]
    assert dest.read_bytes() == b"good"


def test_download_checks_sha256(tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"movielens" * 1000)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="should have sha256"):
        download(payload.as_uri(), cache / "file.zip", sha256="0" * 64)
    assert list(cache.iterdir()) == []
    got = download(payload.as_uri(), cache / "file.zip", sha256=digest)
    assert got.read_bytes() == payload.read_bytes()
    assert list(cache.iterdir()) == [got]


def test_interrupted_extraction_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-1m/ratings.dat", "1::2::3::4\n")
    out = tmp_path / "out"
    out.mkdir()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", fail)
    with pytest.raises(OSError, match="disk full"):
        extract_zip(archive, out / "ml-1m")
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    assert (extract_zip(archive, out / "ml-1m") / "ratings.dat").is_file()
    assert [p.name for p in out.iterdir()] == ["ml-1m"]


def _official_zip(tmp_path: Path) -> tuple[Path, str]:
    folder = write_1m(tmp_path / "src" / "ml-1m")
    archive = tmp_path / "src" / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.iterdir():
            zf.write(path, f"ml-1m/{path.name}")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_fetch_then_load_from_the_normalised_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, digest = _official_zip(tmp_path)
    spec = replace(DATASETS["1m"], url=archive.as_uri(), sha256=digest)
    monkeypatch.setitem(DATASETS, "1m", spec)
    monkeypatch.setenv("TWOSTAGE_DATA", str(tmp_path / "cache"))
    folder = fetch_movielens("1m")
    assert folder == tmp_path / "cache" / "movielens" / "ml-1m"
    assert (folder / "ratings.dat").is_file()
    first = load_movielens("1m")
    assert first.source == archive.as_uri()

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(movielens, "download", no_network)
    second = load_movielens("1m")
    assert second.source == first.source
    assert_frame_equal(first.interactions, second.interactions)
    assert first.items is not None and second.items is not None
    assert_frame_equal(first.items, second.items)
    assert_frame_equal(
        first.interactions, load_movielens("1m", data_dir=folder).interactions
    )


def test_checksum_mismatch_and_unavailable_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, _ = _official_zip(tmp_path)
    monkeypatch.setitem(
        DATASETS, "1m", replace(DATASETS["1m"], url=archive.as_uri(), sha256="1" * 64)
    )
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailableError, match="data_dir=") as info:
        load_movielens("1m", cache_dir=cache)
    assert isinstance(info.value.__cause__, ChecksumError)
    # the command line's way is named too, and spelled as `data fetch` accepts it
    assert "`twostage data fetch movielens-1m --data-dir path/to/ml-1m`" in str(
        info.value
    )
    assert not (cache / "movielens" / "ml-1m.zip").exists()
    assert [p.name for p in (cache / "movielens").iterdir()] == []

    with pytest.raises(DatasetUnavailableError, match="allow_fallback=False") as info:
        load_movielens(
            "100k", cache_dir=cache, allow_download=False, allow_fallback=False
        )
    message = str(info.value)
    assert "allow_download=False" in message
    assert str(cache / "movielens" / "ml-100k.zip") in message
    assert DATASETS["100k"].url in message


def _pip_download_error(dest: Path) -> str | None:
    """Why ``pip download recbole==1.2.1`` fails here, or None if it works."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "recbole==1.2.1",
            "-d",
            str(dest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).strip()[-300:]


def test_offline_100k_end_to_end_via_recbole_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GroupLens is made unreachable so the fallback runs even on machines with a
    # network; the wheel really comes from the package index through pip.
    missing = (tmp_path / "no-such-file.zip").as_uri()
    monkeypatch.setitem(DATASETS, "100k", replace(DATASETS["100k"], url=missing))
    monkeypatch.setenv("TWOSTAGE_DATA", str(tmp_path / "cache"))
    try:
        ds = load_movielens("100k")
    except DatasetUnavailableError:
        reason = _pip_download_error(tmp_path / "pip-check")
        if reason is not None:
            pytest.skip(f"`pip download recbole==1.2.1` fails here: {reason}")
        raise
    assert ds.source == RECBOLE_SOURCE
    assert (ds.num_interactions, ds.num_users, ds.num_items) == (100_000, 943, 1682)
    assert ds.users is not None and ds.users.height == 943
    assert ds.items is not None and ds.items.height == 1682
    assert_schema(ds.interactions, INTERACTIONS_SCHEMA)
    assert_schema(ds.users, USERS_SCHEMA)
    assert_schema(ds.items, ITEMS_SCHEMA)
    counts = dict(ds.interactions["rating"].value_counts().iter_rows())
    assert counts == {1.0: 6110, 2.0: 11370, 3.0: 27145, 4.0: 34174, 5.0: 21201}
    assert ds.interactions["rating"].sum() == pytest.approx(352_986)
    assert not ds.items["title"].str.contains(r"\(\d{4}\)\s*$").any()
    star_wars = ds.items.filter(pl.col("title") == "Star Wars")
    assert star_wars.select("item_id", "year").rows() == [(50, 1977)]
    assert ds.items.filter(pl.col("item_id") == 267)["year"].to_list() == [None]

    # Second load: the normalised cache, without any network.
    monkeypatch.setattr(download_mod.subprocess, "run", _no_subprocess)
    again = load_movielens("100k", allow_download=False)
    assert again.source == RECBOLE_SOURCE
    assert_frame_equal(ds.interactions, again.interactions)
    # The cached wheel alone is enough to rebuild everything offline.
    cache = tmp_path / "cache" / "movielens"
    for name in ("ml-100k.normalised", "ml-100k-recbole"):
        for path in (cache / name).iterdir():
            path.unlink()
        (cache / name).rmdir()
    rebuilt = load_movielens("100k", allow_download=False)
    assert ds.items is not None and rebuilt.items is not None
    assert_frame_equal(ds.items, rebuilt.items)


def _no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip should not run again: the wheel is cached")


def test_io_bytes_source_reads_zip_members(tmp_path: Path) -> None:
    archive = tmp_path / "small.zip"
    folder = write_csv(tmp_path / "ml-latest-small")
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.iterdir():
            zf.write(path, f"ml-latest-small/{path.name}")
    files = movielens.formats.Files(archive)
    assert isinstance(files.source("movies.csv"), io.BytesIO)
    ds = load_movielens("latest-small", data_dir=archive)
    assert ds.num_interactions == 5


def test_fetch_with_data_dir_caches_for_later_loads_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `data fetch --data-dir` read the files and cached nothing, so a
    later `--dataset movielens-latest-small` still needed the network."""
    from typer.testing import CliRunner

    from twostage.cli import app

    monkeypatch.setenv("TWOSTAGE_DATA", str(tmp_path / "cache"))
    folder = write_csv(tmp_path / "small")
    result = CliRunner().invoke(
        app, ["data", "fetch", "movielens-latest-small", "--data-dir", str(folder)]
    )
    assert result.exit_code == 0, result.output
    shutil.rmtree(folder)  # gone: only the cache can answer now
    again = load_movielens("latest-small", allow_download=False, allow_fallback=False)
    assert again.interactions["rating"].to_list() == [4.0, 3.5, 0.5, 5.0, 2.5]
