"""Saved bundles: versioned directories with a manifest of SHA-256 checksums.

A bundle is written to a temporary sibling directory and renamed into place, so a reader
never sees half of one. Loading verifies every file against the manifest first and
refuses a tampered, truncated or incomplete bundle. Only JSON, safetensors and Parquet
are written; nothing is ever unpickled.

Layout (``models/<name>/<version>/``, as TF Serving expects)::

    manifest.json            format version, twostage version, time, sha256 of each file
    config.json              the resolved experiment config
    features.json            fitted encoders and vocabularies
    retrieval.safetensors    two-tower weights
    tables.safetensors       feature rows, history, training pairs, item shares
    items.parquet            item metadata for display (title, genres, ...), if any
    index/...                the nearest-neighbour index (index.json + its data)
    ranking/...              the ranking stage, if any
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "is_version_name",
    "versioning_hint",
    "latest_version",
    "next_version",
    "read_manifest",
    "read_safetensors",
    "refuse_bundle_target",
    "resolve_bundle",
    "verify_bundle",
    "write_bundle",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def refuse_bundle_target(directory: str | Path, what: str) -> None:
    """Refuse to write ``what`` into a saved bundle version: its manifest vouches
    for every file there, so one more (or one replaced) and the bundle no longer
    loads.

    Raises:
        ConfigError: naming the directory.
    """
    if (Path(directory) / MANIFEST).exists():
        raise ConfigError(
            f"{str(directory)!r} is a saved bundle version, and bundle versions are "
            f"immutable: {what} written there would break it (its manifest lists "
            "every file). Write it to another directory."
        )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each in memory of its own.

    ``safetensors.torch.load_file`` returns views into one buffer at the file's
    offsets, so a float tensor may start off the 64-byte alignment torch's
    allocator gives; CPU matrix products then take another kernel path and round
    differently in the last bit (a reloaded index's scores differed by 6e-8 from
    the in-memory ones). A copy restores the alignment, so a bundle serves bit for
    bit what the run it was saved from served. Raises what ``safe_open`` raises.
    """
    from safetensors import safe_open  # torch stays out of this module

    # One tensor at a time, so the copies never double a large file's memory.
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key).clone() for key in file.keys()}  # noqa: SIM118 (not a dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(
    directory: str | Path,
    write_files: Callable[[Path], dict[str, Any]],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle atomically.

    Args:
        directory: the final bundle directory (e.g. ``models/movielens/1``).
        write_files: writes the bundle's files into the temporary directory it is given
            and returns extra manifest entries (e.g. ``{"kind": "recommender"}``).
        overwrite: replace an existing bundle; versions are otherwise immutable.

    Returns:
        The bundle directory.
    """
    from twostage import __version__

    final = Path(directory)
    if not isinstance(overwrite, bool):  # "no" is truthy
        raise ArtifactError(
            f"`overwrite` should be True or False. Received: {overwrite!r}."
        )
    if final.exists() and not overwrite:
        raise ArtifactError(
            f"{str(final)!r} already exists; bundle versions are immutable. Save to a "
            "new version directory, or pass overwrite=True."
        )
    if final.exists() and not _replaceable(final):
        raise ArtifactError(
            f"{str(final)!r} exists and is not a twostage bundle: overwrite=True "
            "replaces a bundle (or an empty directory), never other files, so "
            "nothing was written. Save to a new directory."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        extra = write_files(temp)
        files = {
            str(path.relative_to(temp)): _sha256(path)
            for path in sorted(temp.rglob("*"))
            if path.is_file()
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "twostage_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            **extra,
        }
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _follow_umask(temp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            temp.rename(final)
            shutil.rmtree(old)
        else:
            temp.rename(final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


def _replaceable(path: Path) -> bool:
    """An earlier bundle (its manifest) or an empty directory: what overwriting
    may delete. A user's other files never are."""
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / MANIFEST).is_file() or not any(path.iterdir())


def _follow_umask(root: Path) -> None:
    """Give the bundle the permissions of the process umask (``mkdtemp`` made its
    directory 0700), so a separate service user can read what training wrote."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        mode = 0o777 if path.is_dir() else 0o666
        path.chmod(mode & ~umask)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest of a bundle, checked for a known format version."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(
            f"{str(directory)!r} is not a twostage bundle: {MANIFEST} is missing "
            "(half-written, or not saved with Recommender.save)."
        ) from e
    except (OSError, ValueError, RecursionError) as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e}") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{str(path)!r} should hold a JSON object.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise ArtifactError(
            f"{str(path)!r}: `files` should map file names to sha256 digests."
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"bundle {str(directory)!r} has format version {version!r}; this twostage "
            f"reads version {FORMAT_VERSION}."
        )
    return manifest


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest.

    Raises:
        ArtifactError: a file is missing, or its size or SHA-256 differs (tampered or
            truncated), a file is not listed, a symbolic link, or a listed path leaves
            the bundle; the message names the file.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    listed = manifest["files"]
    for name in listed:
        # Every listed path stays inside the bundle: no absolute paths, no `..`.
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ArtifactError(
                f"bundle {str(root)!r}: the manifest lists {name!r}, a path outside "
                "the bundle. Re-save the bundle."
            )
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            raise ArtifactError(
                f"bundle {str(root)!r}: {name} is a symbolic link; a bundle holds "
                "plain files only (copy the file in instead)."
            )
        if path.is_file() and name != MANIFEST and name not in listed:
            raise ArtifactError(
                f"bundle {str(root)!r}: {name} is not listed in the manifest, so "
                "nothing vouches for it. Remove it, or re-save the bundle."
            )
    for name, expected in listed.items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(
                f"bundle {str(root)!r} is incomplete: {name} is missing."
            )
        actual = _sha256(path)
        if actual != expected:
            raise ArtifactError(
                f"bundle {str(root)!r} is corrupt: {name} has sha256 {actual[:12]}..., "
                f"the manifest says {expected[:12]}... (tampered or truncated). "
                "Re-save the bundle."
            )
    return manifest


def is_version_name(name: str) -> bool:
    """A version directory's name: ASCII digits only (``²`` passes ``isdigit``)."""
    return name.isascii() and name.isdigit()


def versioning_hint(bundle: Path) -> str:
    """How to turn a bundle saved without a version number (``models/shop``)
    into version 1 of its model (``models/shop/1``), which ``twostage serve``,
    ``add-items`` and the next ``train --out models/shop`` build on."""
    staged = bundle.with_name(f"{bundle.name}.1")
    return (
        "To keep versions, make it version 1 of its own folder: "
        f"`mv {bundle} {staged} && mkdir {bundle} && mv {staged} {bundle / '1'}`."
    )


def latest_version(model_dir: str | Path) -> Path:
    """The highest-numbered version directory under ``models/<name>/`` with a manifest."""
    root = Path(model_dir)
    if not root.exists():
        raise ArtifactError(f"{str(root)!r} does not exist (is the path right?).")
    versions = (
        sorted(
            (int(p.name), p)
            for p in root.iterdir()
            if p.is_dir() and is_version_name(p.name) and (p / MANIFEST).exists()
        )
        if root.is_dir()
        else []
    )
    if not versions:
        raise ArtifactError(
            f"no saved version under {str(root)!r}: expected numbered directories "
            "such as 1/, 2/ with a manifest.json."
        )
    return versions[-1][1]


def next_version(model_dir: str | Path) -> Path:
    """``models/<name>/<n+1>``: the directory for a new version after the highest one."""
    root = Path(model_dir)
    numbers = (
        [int(p.name) for p in root.iterdir() if is_version_name(p.name)]
        if root.is_dir()
        else []
    )
    return root / str(max(numbers, default=0) + 1)


def resolve_bundle(path: str | Path) -> Path:
    """``path`` if it is a bundle, else the newest version under it (``models/<name>/``).

    Raises:
        ArtifactError: ``path`` is neither a bundle nor a directory of versions.
    """
    path = Path(path)
    return path if (path / MANIFEST).exists() else latest_version(path)
