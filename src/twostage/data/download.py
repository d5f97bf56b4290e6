"""Getting files into the local cache: checksummed, atomic, and quick to give up.

Every writer here puts its result in place with one ``os.replace`` (files) or
``os.rename`` (folders) from a temporary sibling, so an interrupted download or
extraction never leaves a half-written file where a later run would trust it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

from twostage.errors import ChecksumError, DatasetUnavailableError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "cache_root",
    "download",
    "extract_members",
    "extract_zip",
    "fetch_wheel",
    "sha256_file",
    "verify_sha256",
]

logger = logging.getLogger(__name__)

#: Seconds to wait for a connection (and for each read) before giving up.
DEFAULT_TIMEOUT_S = 15.0
_CHUNK = 1 << 20


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder downloads are cached in.

    Args:
        cache_dir: explicit folder; wins over everything else.

    Returns:
        ``cache_dir`` if given, else ``$TWOSTAGE_DATA`` if set, else
        ``~/.cache/twostage``. The folder is not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TWOSTAGE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "twostage"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the SHA-256 ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"{path} should have sha256 {expected}. Received: sha256 {actual}. "
            "The file is corrupt or a different version; delete it and fetch again."
        )


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Download ``url`` to ``dest`` atomically, checking its SHA-256 on the way.

    The bytes go to a temporary file beside ``dest``, which replaces ``dest`` only
    once it is complete and verified; on any failure (network, checksum, Ctrl-C) the
    temporary file is removed and an existing ``dest`` is left untouched.

    Args:
        url: any URL ``urllib`` opens (``https://``, ``file://``).
        dest: where the file should end up; parent folders are created.
        sha256: expected hex digest, or ``None`` to skip verification (logged as a
            warning together with the digest actually received).
        timeout: seconds for the connection and for each read.

    Returns:
        ``dest``.

    Raises:
        ChecksumError: the downloaded bytes do not have the expected digest.
        OSError: the download failed (``urllib.error.URLError``, timeouts, ...).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
    )
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        num_bytes = 0
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            expected_size = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                num_bytes += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected_size is not None and num_bytes != int(expected_size):
            raise DatasetUnavailableError(
                f"download of {url} was cut short: expected {expected_size} bytes, "
                f"received {num_bytes}. Try again."
            )
        actual = digest.hexdigest()
        if sha256 is None:
            logger.warning(
                "no known sha256 for %s: the download is NOT verified "
                "(received sha256 %s)",
                url,
                actual,
            )
        elif actual != sha256.lower():
            raise ChecksumError(
                f"{url} should have sha256 {sha256}. Received: sha256 {actual} "
                f"({num_bytes} bytes). The file changed upstream or was corrupted in "
                "transit; nothing was saved."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("downloaded %s (%d bytes) to %s", url, num_bytes, dest)
    return dest


def extract_zip(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` so that its content ends up in ``dest``, atomically.

    When the archive holds a single top-level folder (``ml-100k/...``), that folder
    becomes ``dest``; otherwise the archive's top level does. The extraction happens
    in a temporary sibling of ``dest`` that is renamed at the end, so ``dest`` either
    does not exist or is complete. If ``dest`` already exists it is returned as is.

    Raises:
        zipfile.BadZipFile: ``archive`` is not a zip file.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extract")
    )
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)  # extractall drops absolute paths and ".." parts
        entries = list(tmp.iterdir())
        top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        _rename_dir(top, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %s to %s", archive, dest)
    return dest


def extract_members(archive: Path, members: Mapping[str, str], dest: Path) -> Path:
    """Copy chosen members of a zip into the folder ``dest``, verifying each one.

    Args:
        archive: a zip file (a wheel is one).
        members: member path inside the archive -> expected hex SHA-256. Each is
            written to ``dest`` under its base name.
        dest: the folder to create; written atomically like :func:`extract_zip`.

    Raises:
        ChecksumError: a member does not have its expected digest.
        KeyError: a member is missing from the archive.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".extract")
    )
    try:
        with zipfile.ZipFile(archive) as zf:
            for member, expected in members.items():
                data = zf.read(member)
                actual = hashlib.sha256(data).hexdigest()
                if actual != expected.lower():
                    raise ChecksumError(
                        f"{archive}!{member} should have sha256 {expected}. "
                        f"Received: sha256 {actual}. Delete {archive} and fetch again."
                    )
                (tmp / Path(member).name).write_bytes(data)
        _rename_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_wheel(
    requirement: str,
    filename: str,
    sha256: str,
    dest_dir: Path,
    *,
    allow_download: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Get one wheel from the package index with ``pip download`` (never installed).

    Args:
        requirement: a pinned requirement, e.g. ``"recbole==1.2.1"``.
        filename: the wheel's file name, e.g. ``"recbole-1.2.1-py3-none-any.whl"``.
        sha256: the wheel's expected hex digest.
        dest_dir: cache folder; a verified ``dest_dir / filename`` is reused.
        allow_download: if false, only a cached wheel is used.
        timeout: pip's per-connection timeout in seconds.

    Returns:
        The verified wheel's path.

    Raises:
        ChecksumError: the wheel does not have the expected digest.
        DatasetUnavailableError: no cached wheel and pip could not download it.
    """
    cached = dest_dir / filename
    if cached.is_file():
        verify_sha256(cached, sha256)
        return cached
    if not allow_download:
        raise DatasetUnavailableError(
            f"{filename} is not cached in {dest_dir} and allow_download=False."
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-download.") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--only-binary=:all:", requirement, "-d", tmp,
            "--disable-pip-version-check", "--quiet",
            "--timeout", str(int(timeout)), "--retries", "1",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=10 * timeout
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DatasetUnavailableError(f"`pip download {requirement}`: {e}") from e
        got = Path(tmp) / filename
        if result.returncode != 0 or not got.is_file():
            tail = (result.stderr or result.stdout).strip()[-500:]
            raise DatasetUnavailableError(
                f"`pip download {requirement}` failed (exit {result.returncode}): "
                f"{tail or 'no output'}"
            )
        verify_sha256(got, sha256)
        os.replace(got, cached)
    logger.info("downloaded %s with pip to %s", filename, cached)
    return cached


def _rename_dir(src: Path, dest: Path) -> None:
    """Rename a finished folder into place; a concurrent winner is fine too."""
    try:
        os.rename(src, dest)
    except OSError:
        if not dest.is_dir():
            raise
        logger.debug("%s appeared meanwhile; keeping it", dest)
