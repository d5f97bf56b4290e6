"""Saving a :class:`~twostage.recommender.Recommender` as a versioned bundle
(:func:`save_recommender`, :mod:`twostage.artifacts`), and loading one back
(:func:`load_recommender`) from a bundle (checksums verified), the newest version
under ``models/<name>/``, or the ``--out`` directory of ``twostage train retrieval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from safetensors.torch import save_file

from twostage.artifacts import (
    MANIFEST,
    is_version_name,
    resolve_bundle,
    verify_bundle,
    write_bundle,
)
from twostage.config import save_config
from twostage.data.dataset import ITEM
from twostage.errors import ArtifactError
from twostage.index import load_index
from twostage.recommender import Recommender
from twostage.retrieval.run import (
    RUN_WEIGHTS,
    load_run,
    read_records,
    read_retrieval,
    write_records,
    write_serving,
)
from twostage.retrieval.tensors import tensors_to_flat

__all__ = ["load_recommender", "save_recommender"]

#: The items added to a bundle's catalogue after training (Recommender.add_items).
ADDED_ITEMS = "added_items.parquet"
#: The items a bundle no longer serves (Recommender.remove_items).
REMOVED_ITEMS = "removed_items.parquet"


def save_recommender(
    recommender: Recommender, directory: str | Path, *, overwrite: bool = False
) -> Path:
    """Write ``recommender`` as a versioned bundle: config, features, weights and
    tables as safetensors and JSON, item metadata, the index and the ranker."""
    run = recommender.run

    def write(temp: Path) -> dict[str, Any]:
        save_config(run.config, temp / "config.json")
        run.spec.save(temp / "features.json")
        state = {k: v.contiguous() for k, v in run.model.state_dict().items()}
        save_file(state, temp / "retrieval.safetensors")
        save_file(tensors_to_flat(run.tensors), temp / "tables.safetensors")
        write_serving(run, temp)
        write_records(run, temp)
        trained = recommender.num_trained_items
        if recommender.items is not None and recommender.has_trained_metadata:
            metadata = pl.DataFrame(recommender.items[1:trained]).with_columns(
                recommender.item_ids[1:trained].alias(ITEM)
            )
            metadata.write_parquet(temp / "items.parquet")
        added = recommender.added_items
        if added is not None:  # re-encoded on load: the same weights, the same bits
            added.write_parquet(temp / ADDED_ITEMS)
        removed = recommender.removed_items
        if removed is not None:
            removed.to_frame(ITEM).write_parquet(temp / REMOVED_ITEMS)
        recommender.index.save(temp / "index")
        ranker = recommender.trained_ranker  # its tables as trained, not grown
        if ranker is not None:
            from twostage.ranking import save_ranking

            save_ranking(ranker, temp / "ranking")  # type: ignore[arg-type]
        return {
            "kind": "recommender",
            "ranking": ranker is not None,
            "added_items": 0 if added is None else added.height,
            "removed_items": 0 if removed is None else len(removed),
        }

    return write_bundle(directory, write, overwrite=overwrite)


def load_recommender(directory: str | Path) -> Recommender:
    """The Recommender of a saved model, whatever the CLI accepts there.

    Args:
        directory: a bundle saved by :meth:`Recommender.save` (every checksum is
            verified), ``models/<name>/`` (its newest version), or the ``--out``
            directory of ``twostage train retrieval`` (a retrieval run: no ranker, and
            the item metadata it was trained with).

    Raises:
        ArtifactError: none of these is found at ``directory``.
    """
    path = Path(directory)
    if not path.exists():
        raise ArtifactError(
            f"{str(path)!r} does not exist. Pass a bundle (models/NAME/1), a "
            "models/NAME directory (its newest version), or the --out directory of "
            "`twostage train retrieval`."
        )
    if not path.is_dir():
        raise ArtifactError(
            f"{str(path)!r} is a file, not a saved model. Pass a bundle's directory "
            "(models/NAME/1), a models/NAME directory (its newest version), or the "
            "--out directory of `twostage train retrieval`."
        )
    recommender = _load_path(path)
    recommender.loaded_from = str(directory)
    return recommender


def _load_path(path: Path) -> Recommender:
    """:func:`load_recommender` of a directory."""
    if (path / RUN_WEIGHTS).exists() and not (path / MANIFEST).exists():
        return _load_run_dir(path)
    if path.is_dir() and not any(is_version_name(p.name) for p in path.iterdir()):
        return _load_bundle(path)  # a version directory: says what it lacks
    try:
        bundle = resolve_bundle(path)
    except ArtifactError as e:
        runs = sorted(
            (int(p.name), p)
            for p in path.iterdir()
            if is_version_name(p.name) and (p / RUN_WEIGHTS).is_file()
        )
        if runs:  # `train retrieval --out models/x/1`, then `... models/x`
            raise ArtifactError(
                f"{e} {str(runs[-1][1])!r} is a training run (the --out of "
                "`twostage train retrieval`, it holds "
                f"{RUN_WEIGHTS}), not a bundle: pass that directory itself."
            ) from e
        raise ArtifactError(
            f"{e} Or pass the --out directory of `twostage train retrieval` (it holds "
            f"{RUN_WEIGHTS})."
        ) from e
    return _load_bundle(bundle)


def _load_run_dir(path: Path) -> Recommender:
    """A retrieval run (``twostage train retrieval --out``) as a Recommender."""
    return Recommender(load_run(path), items=_read_items(path / "items.parquet"))


def _read_items(path: Path) -> pl.DataFrame | None:
    try:
        return pl.read_parquet(path) if path.exists() else None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e}") from e


def _load_bundle(root: Path) -> Recommender:
    manifest = verify_bundle(root)
    run = read_retrieval(
        root, weights="retrieval.safetensors", hint="a bundle saved by Recommender.save"
    )
    read_records(run, root)
    items = _read_items(root / "items.parquet")
    ranker = None
    if manifest.get("ranking"):
        from twostage.ranking import load_ranking

        ranker = load_ranking(root / "ranking", run)
    index = load_index(root / "index") if (root / "index").is_dir() else None
    added = _read_items(root / ADDED_ITEMS)
    removed = _read_items(root / REMOVED_ITEMS)
    recommender = Recommender(
        run,
        items=items,
        ranker=ranker,
        index=index,
        added_items=added,
        removed_items=None if removed is None else removed[ITEM],
    )
    recommender.manifest = manifest
    return recommender
