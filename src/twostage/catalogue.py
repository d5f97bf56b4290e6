"""Items added to a trained model's catalogue without retraining.

A model's catalogue is the items it trained on: its item vocabulary. A shop's new
products and the day's news are not among them, yet they should be retrievable,
filterable and shown like the others until the next training run.
:meth:`Recommender.add_items <twostage.recommender.Recommender.add_items>` adds
them from their feature values: each is embedded by the candidate tower with its ID
at the unknown row (as a new candidate of a request is), indexed beside the trained
items, and scored by the ranking stage from the same features. The model's own
vocabulary is unchanged; the catalogue's vocabulary holds the trained items, then
the added ones in the order they were added.

Items leave the catalogue the same way (discontinued products, expired news):
:meth:`Recommender.remove_items <twostage.recommender.Recommender.remove_items>`
stops serving them, while the model still reads them as history.

This module checks a table of items to add (:func:`check_added_items`) and builds
the catalogue's vocabulary and metadata from it (the Recommender encodes them),
and checks the IDs of items to remove (:func:`check_removed_items`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from twostage.data.dataset import ITEM
from twostage.data.frames import FRAME_KINDS, as_polars
from twostage.errors import ConfigError, DataError
from twostage.features.sequences import parse_lists
from twostage.features.vocab import Vocabulary

if TYPE_CHECKING:
    from twostage.config import DataConfig

__all__ = [
    "catalogue_vocabulary",
    "read_item_rows",
    "check_added_items",
    "item_keys",
    "check_removed_items",
    "check_restored_items",
    "like_metadata",
    "merged_metadata",
]

#: How many offending IDs or rows an error message names.
_NAMED = 5


def _named(values: Sequence[object]) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:_NAMED])
    return f"{shown}{' ...' if len(values) > _NAMED else ''}"


def item_keys(data: DataConfig) -> list[str]:
    """The names the ID column of a table of items to add may have, in order:
    ``item_id``, then the name the model's item feature table was keyed by
    (``data.item_table_key``, else the log's ``data.item_col``), so that new
    items come in the training item table's layout."""
    from twostage.data.registry import table_keys

    return list(
        dict.fromkeys([ITEM, *table_keys(data.item_col, ITEM, data.item_table_key)])
    )


def read_item_rows(path: str | Path, keys: Sequence[str] = (ITEM,)) -> pl.DataFrame:
    """A file of items, one row each (CSV, TSV or Parquet, its ID column named
    by the first of ``keys`` it has: :func:`item_keys`), read as an item
    feature table is (:func:`read_feature_table`: rejected rows counted and
    reported), its ID column named ``item_id``; an item listed twice is an
    error."""
    from twostage.data.tables import read_feature_table

    return read_feature_table(
        path, key_col=list(keys), key_name="item_id", duplicates="error"
    )


def check_added_items(
    items: Any,
    catalogue: Vocabulary,
    feature_columns: Sequence[str],
    numeric_columns: Sequence[str],
    keys: Sequence[str] = (ITEM,),
    removed: pl.Series | None = None,
) -> pl.DataFrame:
    """``items`` as the catalogue will hold them: ``item_id`` cast to the
    catalogue's ID type, every other column kept (features and metadata).

    Args:
        items: a table (:func:`~twostage.data.frames.as_polars`: polars, pandas
            or pyarrow) of one row per item to add: ``item_id``, every column of
            ``feature_columns`` (null where a value is unknown), and any metadata
            (title, tags...).
        catalogue: the items the catalogue holds already (trained and added).
        feature_columns: the item feature columns the model reads.
        numeric_columns: those of them read as numbers (a NaN or infinity there
            would encode as missing).
        keys: the names its ID column may have (:func:`item_keys`), the first
            found read as ``item_id``.
        removed: the catalogue's removed items (None: none), named apart when
            asked for again: they are served again by restoring them.

    Raises:
        ConfigError: naming the rows (counted from 1) or IDs at fault: no
            ``item_id`` column, a null or repeated ID, an ID the catalogue holds
            already, an ID of the wrong type, a feature column left out, a
            non-finite number.
    """
    given = items
    items = as_polars(given, columns=False)
    if items is None:
        raise ConfigError(
            f"`items` should be {FRAME_KINDS} with an `item_id` column and the "
            f"item feature columns. Received: {type(given).__name__}."
        )
    key = next((c for c in keys if c in items.columns), None)
    if key is None:
        named = " or ".join(f"`{c}`" for c in keys)
        raise ConfigError(
            f"`items` should have an {named} column. Received the columns "
            f"{items.columns}."
        )
    items = items.rename({key: ITEM})
    missing = [c for c in feature_columns if c not in items.columns]
    if missing:
        raise ConfigError(
            f"`items` lacks the feature column(s) {missing} that this model reads "
            f"(it reads {list(feature_columns)}); add them, null where a value is "
            "unknown."
        )
    if not items.height:
        raise ConfigError("`items` holds no row: there is nothing to add.")
    rows = items.with_row_index("__row", offset=1)
    nulls = rows.filter(pl.col(ITEM).is_null())["__row"].to_list()
    if nulls:
        raise ConfigError(
            f"`items` has {len(nulls)} row(s) without an `{ITEM}`: rows "
            f"{_named(nulls)}."
        )
    assert catalogue.dtype is not None  # a trained model's vocabulary
    target = pl.Int64 if catalogue.dtype == "int" else pl.String
    try:
        ids = items[ITEM].cast(target, strict=True)
    except pl.exceptions.PolarsError as e:
        bad = items[ITEM].cast(target, strict=False).is_null()
        raise ConfigError(
            f"this model's item IDs are {'integers' if target == pl.Int64 else 'text'}"
            f"; `items` holds {items[ITEM].dtype} IDs that are not: "
            f"{_named(items[ITEM].filter(bad).to_list())}."
        ) from e
    repeated = ids.filter(ids.is_duplicated()).unique(maintain_order=True)
    if len(repeated):
        raise ConfigError(
            f"`items` lists {len(repeated)} item ID(s) more than once: "
            f"{_named(repeated.to_list())}."
        )
    held = ids.filter(pl.Series(catalogue.transform(ids) >= catalogue.num_oov_buckets))
    if len(held):
        back = held if removed is None else held.filter(held.is_in(removed.implode()))
        raise ConfigError(
            f"{len(held)} of the `items` are in the catalogue already (trained on or "
            f"added before): {_named(held.to_list())}. A model's items are changed "
            "by training it again"
            + (
                f"; {_named(back.to_list())} removed from it are served again by "
                "`restore_items` (`twostage restore-items`)."
                if removed is not None and len(back)
                else "."
            )
        )
    for column in numeric_columns:
        values = items[column]
        if values.dtype == pl.String:  # a CSV column with text among numbers
            text = rows.filter(
                pl.col(column).is_not_null()
                & pl.col(column).cast(pl.Float64, strict=False).is_null()
            )
            if text.height:
                pairs = text.select("__row", column).rows()
                shown = ", ".join(f"row {r} holds {v!r}" for r, v in pairs[:_NAMED])
                raise ConfigError(
                    f"`items`[{column!r}] should be numbers, or null when unknown: "
                    f"{shown}{' ...' if len(pairs) > _NAMED else ''}."
                )
            values = values.cast(pl.Float64)
            items = items.with_columns(values)
            rows = rows.with_columns(values)
        if not values.dtype.is_float():
            continue
        bad_rows = rows.filter(~pl.col(column).is_finite())["__row"].to_list()
        if bad_rows:
            raise ConfigError(
                f"`items`[{column!r}] should be finite numbers, or null when unknown. "
                f"Rows {_named(bad_rows)} hold NaN or infinity."
            )
    return items.with_columns(ids)


def catalogue_vocabulary(trained: Vocabulary, added: pl.Series) -> Vocabulary:
    """The trained item vocabulary with ``added`` IDs after its values, in order:
    item indices ``size .. size + len(added) - 1`` (the trained indices keep
    theirs). Added items count 0 training rows."""
    keys = pl.concat([trained.values, added.rename("value")])
    counts = np.concatenate([trained.counts, np.zeros(len(added), np.int64)])
    return Vocabulary.from_counts(
        keys, counts, num_oov_buckets=trained.num_oov_buckets, seed=trained.seed
    )


def like_metadata(
    added: pl.DataFrame, metadata: pl.DataFrame | None, separators: dict[str, str]
) -> pl.DataFrame:
    """``added`` with its set-valued columns in the metadata's layout: a text
    file's ``"Action|Sci-Fi"`` as the list ``["Action", "Sci-Fi"]`` where the
    trained items' metadata holds lists, a list joined by the column's separator
    where it holds text. The encoders read both layouts alike.

    Args:
        separators: each set-valued (multi-hot) feature column's separator.
    """
    if metadata is None:
        return added
    columns = []
    for column, separator in separators.items():
        if column not in added.columns or column not in metadata.columns:
            continue
        want, have = metadata.schema[column], added.schema[column]
        if isinstance(want, pl.List) and have == pl.String:
            parsed = parse_lists(added[column], separator=separator)
            columns.append(parsed.cast(want, strict=False).alias(column))
        elif want == pl.String and isinstance(have, pl.List):
            joined = added[column].cast(pl.List(pl.String)).list.join(separator)
            columns.append(joined.alias(column))
    return added.with_columns(columns)


def merged_metadata(metadata: pl.DataFrame | None, added: pl.DataFrame) -> pl.DataFrame:
    """The catalogue's metadata: the trained items' rows, then the added ones (an
    added item's row replaces any row the trained table held for its ID); columns
    one table lacks are null in its rows.

    Raises:
        ConfigError: a column holds values of kinds no one column can hold.
    """
    if metadata is None:
        return added
    kept = metadata.filter(~pl.col(ITEM).is_in(added[ITEM].implode()))
    try:
        return pl.concat([kept, added], how="diagonal_relaxed")
    except (pl.exceptions.PolarsError, DataError) as e:
        raise ConfigError(
            "the `items` to add do not fit the catalogue's metadata (a column of "
            f"another kind?): {e}. The metadata's columns: {dict(metadata.schema)}."
        ) from e


def _catalogue_ids(
    item_ids: Sequence[object] | pl.Series, catalogue: Vocabulary, verb: str
) -> pl.Series:
    """``item_ids`` as the catalogue holds them (``item_id``, its ID type),
    every one an item of the catalogue, none twice (``verb``: what is done to
    them, for the error of an empty list).

    Raises:
        ConfigError: no ID, an ID of the wrong type, a null, one the catalogue
            does not hold, or one listed twice.
    """
    given = item_ids if isinstance(item_ids, pl.Series) else None
    if given is None:
        if isinstance(item_ids, str | bytes) or not isinstance(item_ids, Sequence):
            raise ConfigError(
                "`item_ids` should be a list of item IDs. Received: "
                f"{item_ids!r} ({type(item_ids).__name__})."
            )
        given = pl.Series(ITEM, list(item_ids), strict=False)
    if not len(given):
        raise ConfigError(f"`item_ids` names no item: there is nothing to {verb}.")
    assert catalogue.dtype is not None  # a trained model's vocabulary
    target = pl.Int64 if catalogue.dtype == "int" else pl.String
    try:
        ids = given.cast(target, strict=True).rename(ITEM)
    except pl.exceptions.PolarsError as e:
        raise ConfigError(
            f"this model's item IDs are {'integers' if target == pl.Int64 else 'text'}"
            f"; `item_ids` holds {given.dtype} values that are not: "
            f"{_named(given.head(_NAMED).to_list())}."
        ) from e
    if ids.null_count():
        raise ConfigError(f"`item_ids` holds {ids.null_count()} null(s).")
    unknown = ids.filter(
        pl.Series(catalogue.transform(ids) < catalogue.num_oov_buckets)
    )
    if len(unknown):
        raise ConfigError(
            f"{len(unknown)} of the `item_ids` are not in the catalogue: "
            f"{_named(unknown.to_list())}."
        )
    repeated = ids.filter(ids.is_duplicated()).unique(maintain_order=True)
    if len(repeated):
        raise ConfigError(
            f"`item_ids` lists {len(repeated)} item ID(s) more than once: "
            f"{_named(repeated.to_list())}."
        )
    return ids


def check_removed_items(
    item_ids: Sequence[object] | pl.Series,
    catalogue: Vocabulary,
    removed: pl.Series | None,
) -> pl.Series:
    """``item_ids`` as the catalogue holds them (``item_id``, its ID type).

    Args:
        item_ids: IDs of items to stop serving.
        catalogue: the catalogue's items (trained and added).
        removed: the IDs removed before (None: none).

    Raises:
        ConfigError: no ID, an ID of the wrong type, one the catalogue does not
            hold, one listed twice or removed before, or every item of the
            catalogue.
    """
    ids = _catalogue_ids(item_ids, catalogue, "remove")
    if removed is not None:
        again = ids.filter(ids.is_in(removed.implode()))
        if len(again):
            raise ConfigError(
                f"{len(again)} of the `item_ids` were removed before: "
                f"{_named(again.to_list())}."
            )
    gone = len(ids) + (0 if removed is None else len(removed))
    if gone >= catalogue.size - catalogue.num_oov_buckets:
        raise ConfigError(
            f"removing these {len(ids)} items would leave the catalogue empty; "
            "nothing could be recommended."
        )
    return ids


def check_restored_items(
    item_ids: Sequence[object] | pl.Series,
    catalogue: Vocabulary,
    removed: pl.Series | None,
) -> pl.Series:
    """``item_ids``, items removed from the catalogue to serve again, as the
    catalogue holds them.

    Raises:
        ConfigError: no ID, an ID of the wrong type, one the catalogue does not
            hold or listed twice, or one that was not removed (served already).
    """
    ids = _catalogue_ids(item_ids, catalogue, "restore")
    gone = removed if removed is not None else pl.Series(ITEM, [], dtype=ids.dtype)
    served = ids.filter(~ids.is_in(gone.implode()))
    if len(served):
        raise ConfigError(
            f"{len(served)} of the `item_ids` were not removed: the catalogue "
            f"serves them already: {_named(served.to_list())}."
        )
    return ids
