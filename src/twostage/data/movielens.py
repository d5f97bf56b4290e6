"""MovieLens 100k / 1M / latest-small / 20M / 25M, in one normalised schema.

Whatever the source, :func:`load_movielens` returns a :class:`Dataset` with

- ``interactions``: ``user_id`` Int64, ``item_id`` Int64, ``timestamp`` Int64 (epoch
  seconds), ``rating`` Float32, in the order of the source file;
- ``items``: ``item_id`` Int64, ``title`` String (without the trailing ``(year)``),
  ``year`` Int64 (nullable), ``genres`` List[String], ``display_title`` String
  (``"Title (Year)"``, or the title when the year is unknown);
- ``users`` (100k and 1M only): ``user_id`` Int64, ``age`` Int64, ``gender``,
  ``occupation``, ``zip_code`` String. For 1M, ``age`` is the README's age-group
  code (1, 18, 25, ...: the lower bound of the group) and occupation codes are
  mapped to the README's names.

Sources, in order: the normalised parquet cache, the extracted or zipped official
files in the cache folder, a download from GroupLens (SHA-256 checked), and for 100k
only, the copy shipped inside the ``recbole==1.2.1`` wheel on PyPI (wheel and files
SHA-256 checked, RecBole never installed). See :mod:`twostage.data.download` for the
cache folder (``$TWOSTAGE_DATA`` or ``~/.cache/twostage``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from twostage.config.io import did_you_mean
from twostage.data import movielens_formats as formats
from twostage.data.dataset import Dataset
from twostage.data.download import (
    cache_root,
    download,
    extract_members,
    extract_zip,
    fetch_wheel,
    verify_sha256,
)
from twostage.errors import ChecksumError, DataError, DatasetUnavailableError

__all__ = [
    "DATASETS",
    "RECBOLE_SOURCE",
    "MovieLensSpec",
    "available",
    "fetch_movielens",
    "load_movielens",
]

logger = logging.getLogger(__name__)

_BASE_URL = "https://files.grouplens.org/datasets/movielens"
#: Bump when the normalised schema changes, so old parquet caches are rebuilt.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class MovieLensSpec:
    """Where one MovieLens variant comes from.

    Attributes:
        variant: short name, e.g. ``"100k"``.
        folder: the archive's top-level folder, e.g. ``"ml-100k"``.
        url: official GroupLens URL of the zip.
        sha256: expected hex digest of the zip, ``None`` if unknown.
        size_bytes: size of the zip, for messages.
        layout: file layout inside the archive: ``"100k"``, ``"1m"`` or ``"csv"``.
    """

    variant: str
    folder: str
    url: str
    sha256: str | None
    size_bytes: int
    layout: Literal["100k", "1m", "csv"]

    @property
    def name(self) -> str:
        return f"movielens-{self.variant}"


# SHA-256 and size of each official zip, as TensorFlow Datasets records them in
# tensorflow_datasets/url_checksums/movielens.txt.
_SHA256 = {
    "100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    "1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
    "latest-small": "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    "20m": "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
    "25m": "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
}
_SIZES = {
    "100k": 4_924_029, "1m": 5_917_549, "latest-small": 978_202,
    "20m": 198_702_078, "25m": 261_978_986,
}  # fmt: skip
_LAYOUTS: dict[str, Literal["100k", "1m", "csv"]] = {
    "100k": "100k", "1m": "1m", "latest-small": "csv", "20m": "csv", "25m": "csv",
}  # fmt: skip

#: Known variants, by the short name :func:`load_movielens` takes.
DATASETS: dict[str, MovieLensSpec] = {
    variant: MovieLensSpec(
        variant=variant,
        folder=f"ml-{variant}",
        url=f"{_BASE_URL}/ml-{variant}.zip",
        sha256=_SHA256[variant],
        size_bytes=_SIZES[variant],
        layout=layout,
    )
    for variant, layout in _LAYOUTS.items()
}

# The 100k fallback: RecBole's wheel ships ml-100k converted to its atomic format.
_RECBOLE_REQUIREMENT = "recbole==1.2.1"
_RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
_RECBOLE_WHEEL_SHA256 = (
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
)
_RECBOLE_MEMBERS = {
    "recbole/dataset_example/ml-100k/ml-100k.inter": (
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
    ),
    "recbole/dataset_example/ml-100k/ml-100k.item": (
        "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"
    ),
    "recbole/dataset_example/ml-100k/ml-100k.user": (
        "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"
    ),
}
RECBOLE_SOURCE = f"{_RECBOLE_REQUIREMENT} wheel (PyPI), sha256 verified"


def available() -> list[str]:
    """The variant names :func:`load_movielens` accepts, e.g. ``["100k", "1m", ...]``."""
    return list(DATASETS)


def load_movielens(
    variant: str = "100k",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    allow_fallback: bool = True,
    keep: bool = False,
) -> Dataset:
    """Load a MovieLens dataset in the normalised schema (see the module docstring).

    Args:
        variant: ``"100k"``, ``"1m"``, ``"latest-small"``, ``"20m"`` or ``"25m"``;
            ``"movielens-100k"`` and ``"ml-100k"`` spellings work too.
        data_dir: files you already have: the extracted folder (holding ``u.data``,
            ``ratings.dat`` or ``ratings.csv``, or the folder above it), or the zip
            itself. Read as is, without checksum; cached only with ``keep``.
        cache_dir: cache folder; defaults to ``$TWOSTAGE_DATA`` or
            ``~/.cache/twostage``. Delete ``<cache>/movielens`` to start afresh.
        allow_download: if false, nothing is fetched over the network (cached files
            only, including a cached RecBole wheel).
        keep: with ``data_dir``, also write the parsed data to the cache, so that
            loading the variant by name later (``movielens-latest-small``) finds it.
        allow_fallback: for 100k, use the copy in the ``recbole==1.2.1`` wheel when
            GroupLens cannot be reached.

    Returns:
        The dataset; ``source`` names the URL, fallback or folder it came from.

    Raises:
        DataError: unknown ``variant``, or ``data_dir`` does not hold that variant.
        DatasetUnavailableError: no source worked; the message lists what was tried.
    """
    spec = _resolve(variant)
    base = cache_root(cache_dir) / "movielens"
    normalised = base / f"{spec.folder}.normalised"
    if data_dir is not None:
        location = Path(data_dir).expanduser()
        dataset = _parse(spec, location, source=str(location.resolve()))
        logger.info("%s: read from %s", spec.name, dataset.source)
        if keep:  # later loads by name find it, offline
            _write_normalised(normalised, dataset)
            logger.info("%s: cached as %s", spec.name, normalised)
        return dataset
    cached = _read_normalised(normalised, spec)
    if cached is not None:
        logger.info(
            "%s: loaded from cache %s (source: %s)",
            spec.name,
            normalised,
            cached.source,
        )
        return cached
    location, source = _obtain(spec, base, allow_download, allow_fallback)
    dataset = _parse(spec, location, source=source)
    _write_normalised(normalised, dataset)
    logger.info("%s: loaded from %s; cached as %s", spec.name, source, normalised)
    return dataset


def fetch_movielens(
    variant: str = "100k",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = True,
    allow_fallback: bool = True,
) -> Path:
    """Make sure the raw files of a MovieLens variant are in the cache; parse nothing.

    Args:
        variant: as for :func:`load_movielens`.
        cache_dir: as for :func:`load_movielens`.
        allow_download: as for :func:`load_movielens`.
        allow_fallback: as for :func:`load_movielens`.

    Returns:
        The folder holding the files: the extracted official archive, or for the 100k
        fallback a folder with RecBole's ``ml-100k.{inter,item,user}``.

    Raises:
        DataError: unknown ``variant``.
        DatasetUnavailableError: no source worked; the message lists what was tried.
    """
    spec = _resolve(variant)
    base = cache_root(cache_dir) / "movielens"
    return _obtain(spec, base, allow_download, allow_fallback)[0]


def _resolve(variant: str) -> MovieLensSpec:
    key = str(variant).strip().lower()
    for prefix in ("movielens-", "movielens_", "ml-", "ml_"):
        key = key.removeprefix(prefix)
    spec = DATASETS.get(key)
    if spec is None:
        raise DataError(
            f"`variant` should be one of {available()} (also spelled "
            f"'movielens-100k' or 'ml-100k'). Received: `variant` = {variant!r}."
            + did_you_mean(f"movielens-{key}", [f"movielens-{v}" for v in available()])
        )
    return spec


def _obtain(
    spec: MovieLensSpec, base: Path, allow_download: bool, allow_fallback: bool
) -> tuple[Path, str]:
    """Find or fetch the raw files: (folder, source description)."""
    tried: list[str] = []
    try:
        return _obtain_official(spec, base, allow_download), spec.url
    except (OSError, zipfile.BadZipFile) as e:
        tried.append(f"{spec.url}: {e}")
        first_error: BaseException = e
    if spec.variant == "100k" and allow_fallback:
        try:
            folder = _obtain_recbole(base, allow_download)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            tried.append(f"{_RECBOLE_REQUIREMENT} wheel from PyPI: {e}")
        else:
            logger.warning(
                "%s: GroupLens unavailable (%s); using the %s",
                spec.name,
                tried[0],
                RECBOLE_SOURCE,
            )
            return folder, RECBOLE_SOURCE
    elif spec.variant == "100k":
        tried.append("the recbole wheel fallback: disabled (allow_fallback=False)")
    checksum = f" (sha256 {spec.sha256})" if spec.sha256 else ""
    raise DatasetUnavailableError(
        f"Could not obtain MovieLens {spec.variant}. Tried: "
        + "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
        + f". To fix: download {spec.url} ({spec.size_bytes:,} bytes){checksum} and "
        f"save it as {base / (spec.folder + '.zip')}, or give the extracted folder or "
        f"the zip: `load_movielens({spec.variant!r}, data_dir='path/to/{spec.folder}')` "
        f"in Python, `twostage data fetch {spec.name} --data-dir path/to/{spec.folder}` "
        "on the command line."
    ) from first_error


def _obtain_official(spec: MovieLensSpec, base: Path, allow_download: bool) -> Path:
    extracted = base / spec.folder
    if formats.detect_layout(formats.Files(extracted)) == spec.layout:
        return extracted
    archive = base / f"{spec.folder}.zip"
    usable = archive.is_file()
    if usable and spec.sha256 is not None:
        try:
            verify_sha256(archive, spec.sha256)
        except ChecksumError as e:
            if not allow_download:
                raise
            logger.warning("%s; downloading it again", e)
            usable = False  # replaced only once a verified download is complete
    if usable:
        logger.info("%s: using the cached %s", spec.name, archive)
    elif not allow_download:
        raise DatasetUnavailableError(
            f"not in the cache ({archive}) and allow_download=False"
        )
    else:
        download(spec.url, archive, sha256=spec.sha256)
    extract_zip(archive, extracted)
    return extracted


def _obtain_recbole(base: Path, allow_download: bool) -> Path:
    folder = base / "ml-100k-recbole"
    if formats.detect_layout(formats.Files(folder)) == "recbole":
        return folder  # written atomically after verification, so complete
    wheel = fetch_wheel(
        _RECBOLE_REQUIREMENT,
        _RECBOLE_WHEEL,
        _RECBOLE_WHEEL_SHA256,
        base.parent / "wheels",
        allow_download=allow_download,
    )
    return extract_members(wheel, _RECBOLE_MEMBERS, folder)


def _parse(spec: MovieLensSpec, location: Path, *, source: str) -> Dataset:
    files = formats.Files(location, subfolder=spec.folder)
    if not files.exists:
        raise DataError(
            f"`data_dir` should be an existing folder or zip file. "
            f"Received: `data_dir` = {str(location)!r} (no such folder or zip file)."
        )
    layout = formats.detect_layout(files)
    accepted = ("100k", "recbole") if spec.layout == "100k" else (spec.layout,)
    if layout is None or layout not in accepted:
        found = "no MovieLens files" if layout is None else f"{layout} layout files"
        raise DataError(
            f"`data_dir` should hold MovieLens {spec.variant} files "
            f"({formats.REQUIRED[spec.layout]}). Received: {str(location)!r} "
            f"with {found}. Pass the folder that holds them, or the matching variant."
        )
    try:
        interactions, users, items = formats.PARSERS[layout](files)
    except pl.exceptions.PolarsError as e:
        raise DataError(
            f"{location}: unexpected values in the {layout} files: {e}"
        ) from e
    return Dataset(
        name=spec.name,
        interactions=interactions,
        users=users,
        items=items,
        source=source,
    )


def _read_normalised(folder: Path, spec: MovieLensSpec) -> Dataset | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _CACHE_FORMAT:
            logger.info("%s: cache %s is outdated; rebuilding", spec.name, folder)
            return None
        tables = {
            name: pl.read_parquet(folder / f"{name}.parquet")
            if (folder / f"{name}.parquet").is_file()
            else None
            for name in ("interactions", "users", "items")
        }
    except (OSError, ValueError, pl.exceptions.PolarsError) as e:
        logger.warning("%s: unreadable cache %s (%s); rebuilding", spec.name, folder, e)
        return None
    interactions = tables["interactions"]
    if interactions is None:
        return None
    return Dataset(
        name=spec.name,
        interactions=interactions,
        users=tables["users"],
        items=tables["items"],
        source=str(meta.get("source", "")),
    )


def _write_normalised(folder: Path, dataset: Dataset) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp")
    )
    try:
        dataset.interactions.write_parquet(tmp / "interactions.parquet")
        if dataset.users is not None:
            dataset.users.write_parquet(tmp / "users.parquet")
        if dataset.items is not None:
            dataset.items.write_parquet(tmp / "items.parquet")
        meta = {"format": _CACHE_FORMAT, "name": dataset.name, "source": dataset.source}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():  # an outdated cache
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise  # else another process wrote the same cache meanwhile
    except OSError as e:
        logger.warning("could not write the cache %s: %s", folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
