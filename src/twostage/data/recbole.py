"""RecBole's atomic files: a dataset directory such as ``ml-1m/`` holding
``ml-1m.inter`` (the log), and perhaps ``ml-1m.user`` and ``ml-1m.item`` (feature
tables), tab-separated with typed headers (``user_id:token``, ``rating:float``,
``genre:token_seq``).

RecBole hosts dozens of public datasets converted to this layout, so a user coming
from it can train on them as they are. The typed header is read by
:func:`twostage.data.tables.read_interactions` itself (the types are dropped from
the names, and ``token_seq`` features become lists); this module finds the files
of a directory and joins the feature tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from twostage.data.dataset import Dataset
from twostage.errors import DataError

__all__ = ["read_recbole"]


def read_recbole(path: str | Path, **options: Any) -> Dataset:
    """Read a RecBole dataset: its ``.inter`` log, with the ``.user`` and ``.item``
    files beside it joined as feature tables.

    Args:
        path: a directory holding ``<name>.inter`` (``<name>`` is the directory's
            name, as RecBole lays its datasets out, else the only ``.inter`` file
            there), or the ``.inter`` file itself.
        **options: for :func:`~twostage.data.tables.read_interactions` (column
            mapping such as ``item_col="business_id"``, ``strict``...). The feature
            tables are keyed by the log's user / item column name or ``user_id`` /
            ``item_id``.

    Raises:
        DataError: no ``.inter`` file, or several without one named after the
            directory.
    """
    from twostage.data.tables import (
        join_features,
        read_feature_table,
        read_interactions,
    )

    log = _inter_file(Path(path).expanduser())
    data = read_interactions(log, **{"name": log.stem, **options})
    tables = {}
    sides: tuple[tuple[str, str, Literal["user_id", "item_id"], Any], ...] = (
        ("users", ".user", "user_id", options.get("user_col")),
        ("items", ".item", "item_id", options.get("item_col")),
    )
    for arg, suffix, key, column in sides:
        table = log.with_suffix(suffix)
        if table.is_file():
            keys = list(dict.fromkeys([c for c in (column, key) if c]))
            tables[arg] = read_feature_table(table, key_col=keys, key_name=key)
    return join_features(data, **tables) if tables else data


def _inter_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(
            "`recbole:PATH` should name a RecBole dataset directory or its .inter "
            f"file. Received: {str(path)!r} (no such file or directory)."
        )
    named = path / f"{path.name}.inter"
    if named.is_file():
        return named
    found = sorted(path.glob("*.inter"))
    if len(found) == 1:
        return found[0]
    raise DataError(
        f"{str(path)!r} holds "
        + (
            f"several .inter files ({[f.name for f in found]}) and none named "
            f"{named.name!r}: name the one to read, `recbole:{found[0]}`."
            if found
            else "no .inter file (RecBole's log of a dataset)."
        )
    )
