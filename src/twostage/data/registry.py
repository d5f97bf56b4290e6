"""One entry point for every dataset: a built-in name or a path to a user's log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from twostage.data.dataset import Dataset
from twostage.errors import ConfigError, DataError

if TYPE_CHECKING:
    import polars as pl

    from twostage.config import DataConfig, ExperimentConfig

__all__ = [
    "BUILTIN_DATASETS",
    "FIT_TABLES",
    "anchored",
    "load_dataset",
    "load_dataset_for",
    "load_mapped",
    "read_side_tables",
    "recorded_dataset",
    "reading_settings",
    "table_keys",
    "with_min_counts",
]

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = (
    "movielens-100k",
    "movielens-1m",
    "movielens-latest-small",
    "movielens-20m",
    "movielens-25m",
    "synthetic",
)


#: ``data.dataset`` of a run fitted on tables given in Python (``TwoStageModel.fit``,
#: or a dataset handed to ``fit_two_stage`` / ``fit_retrieval`` that its
#: ``data.dataset`` does not read: :func:`recorded_dataset`): no name or path reads
#: them again, so evaluation and reports must not rebuild a split from the default
#: dataset (they did: MovieLens-100k). The text is kept as saved runs have it.
FIT_TABLES = "<tables given to TwoStageModel.fit>"

#: The ``LAYOUT:PATH`` prefixes of ``data.dataset``.
_LAYOUTS = ("book-crossing", "netflix", "recbole", "mind")


def recorded_dataset(given: Dataset, spec: str) -> str:
    """What a run fitted on ``given`` (a dataset handed over in Python) records as
    ``data.dataset``: ``spec`` where ``given`` is what ``spec`` reads (the
    built-in dataset of that name, or a log read from the file at that path or
    from inside that directory), else :data:`FIT_TABLES`, so that no command
    later reads ``spec`` as the data the run trained on (a saved run said
    MovieLens-100k, the default, whatever it was fitted on)."""
    lowered = spec.lower()
    if spec == FIT_TABLES or lowered.startswith("synthetic"):
        return spec  # synthetic data is generated again from its spec
    if lowered.startswith(("movielens-", "ml-")):
        variant = lowered.split("-", 1)[1]
        return spec if given.name == f"movielens-{variant}" else FIT_TABLES
    layout, colon, rest = spec.partition(":")
    where = Path(rest if colon and layout.lower() in _LAYOUTS else spec).expanduser()
    source = Path(given.source).expanduser()
    if given.source and where.exists() and source.exists():
        where, source = where.resolve(), source.resolve()
        if source == where or (where.is_dir() and source.is_relative_to(where)):
            return spec
    return FIT_TABLES


def anchored(spec: str) -> str:
    """``spec`` with the path of an existing file or directory made absolute (also
    inside ``book-crossing:PATH``, ``netflix:PATH``, ``recbole:PATH`` and
    ``mind:PATH``), built-in
    names unchanged: what a saved config
    keeps, so ``twostage evaluate`` and ``report`` find the log again from another
    working directory."""
    lowered = spec.lower()
    if lowered.startswith(("movielens-", "ml-", "synthetic")):  # as load_dataset
        return spec
    prefix = ""
    if lowered.startswith(tuple(f"{layout}:" for layout in _LAYOUTS)):
        prefix, _, spec = spec.partition(":")
        prefix += ":"
    path = Path(spec).expanduser()
    return prefix + (str(path.resolve()) if path.exists() else spec)


#: What :func:`twostage.data.movielens.load_movielens` takes besides the variant.
_MOVIELENS_OPTIONS = (
    "data_dir",
    "cache_dir",
    "allow_download",
    "allow_fallback",
    "keep",
)


def load_dataset(spec: str, **options: Any) -> Dataset:
    """Load a dataset by built-in name or file path.

    Args:
        spec: ``movielens-100k`` (also ``ml-100k``), ``movielens-1m``, ...,
            ``synthetic`` or ``synthetic:num_items=1000,num_users=500`` for generated
            data, ``book-crossing:PATH`` for a file in the layout of Book-Crossing's
            ``Preprocessed_data.csv``, ``netflix:PATH`` for the Netflix Prize's
            ``combined_data_*.txt`` (a file, or their directory with
            ``movie_titles.csv``), ``recbole:PATH`` for a RecBole dataset
            directory (``.inter``, with ``.user`` and ``.item`` joined),
            ``mind:PATH`` for MIND's ``behaviors.tsv`` (or its directory, with
            ``news.tsv``: an impression log, the news not clicked its shown
            rows), or the
            path of a CSV/TSV/Parquet interaction log.
        **options: for a path, the keyword arguments of
            :func:`twostage.data.tables.read_interactions` (column mapping, separator,
            ``strict``...); for MovieLens, those of
            :func:`twostage.data.movielens.load_movielens`. ``None`` values are ignored.

    Raises:
        DataError: the name is not a built-in dataset and no such file exists.
    """
    if spec == FIT_TABLES:
        raise DataError(
            "this run was fitted on tables given in Python (TwoStageModel.fit, or "
            "a dataset handed to fit_two_stage or fit_retrieval that its "
            "data.dataset does not read), which are not recorded with it, so its "
            "data cannot be read again. "
            "Measure it on rows you give: `twostage evaluate BUNDLE --test FILE`, or "
            "TwoStageModel.evaluate(table)."
        )
    options = {k: v for k, v in options.items() if v is not None}
    lowered = spec.lower()
    builtin = lowered.startswith(("movielens-", "ml-", "synthetic"))
    mapped = sorted(k for k in options if k not in _MOVIELENS_OPTIONS)
    if builtin and mapped:  # they ended in a TypeError, or were ignored
        raise ConfigError(
            f"{', '.join(f'`{k}`' for k in mapped)} "
            f"{'map' if len(mapped) > 1 else 'maps'} the columns of a log of your "
            f"own; {spec!r} has its columns already. Leave "
            f"{'them' if len(mapped) > 1 else 'it'} unset for this dataset."
        )
    if lowered.startswith(("movielens-", "ml-")):
        from twostage.data.movielens import load_movielens

        return load_movielens(lowered.split("-", 1)[1], **options)
    if lowered.startswith("book-crossing:"):
        from twostage.data.book_crossing import read_book_crossing

        return read_book_crossing(spec.partition(":")[2], **options)
    if lowered.startswith("recbole:"):
        from twostage.data.recbole import read_recbole

        return read_recbole(spec.partition(":")[2], **options)
    if lowered.startswith("mind:"):
        from twostage.data.mind import read_mind

        return read_mind(spec.partition(":")[2], **options)
    if lowered.startswith("netflix:"):
        from twostage.data.netflix import read_netflix

        return read_netflix(spec.partition(":")[2], **options)
    if lowered == "synthetic" or lowered.startswith("synthetic:"):
        from twostage.data.synthetic import generate

        return generate(None, **_parse_overrides(spec.partition(":")[2]))
    path = Path(spec).expanduser()
    if path.exists():
        from twostage.data.tables import read_interactions

        return read_interactions(path, **options)
    from twostage.config.io import did_you_mean

    raise DataError(
        f"`dataset` should be one of {BUILTIN_DATASETS} or an existing CSV, JSON or Parquet "
        f"file. Received: `dataset` = {spec!r} (no such file)."
        + did_you_mean(spec.lower(), list(BUILTIN_DATASETS))
    )


def load_dataset_for(config: ExperimentConfig) -> Dataset:
    """The dataset a config names, with its column mapping and the feature files
    of ``data.user_table`` / ``data.item_table`` joined."""
    data = config.data
    dataset = load_mapped(data.dataset, data)
    users, items = read_side_tables(data)
    if users is not None or items is not None:
        from twostage.data.tables import join_features

        dataset = join_features(dataset, users=users, items=items)
    return with_min_counts(dataset, data.min_user_rows, data.min_item_rows)


def with_min_counts(dataset: Dataset, users: int, items: int) -> Dataset:
    """``dataset`` with the minimum rows per user and item applied (none when both
    are 0 or 1), what they removed logged."""
    if users <= 1 and items <= 1:
        return dataset
    from twostage.data.filtering import min_counts

    filtered, removed = min_counts(dataset, users=users, items=items)
    logger.info("%s", removed.summary())
    return filtered


def reading_settings(data: DataConfig) -> dict[str, Any]:
    """The ``data`` settings that say how to read a log's values, as
    :func:`~twostage.data.tables.read_interactions` takes them, each None at its
    default (:func:`load_dataset` drops those, and a Dataset read already is
    refused only the others)."""
    return {
        "separator": data.separator,
        "quote_char": None if data.quote_char == '"' else data.quote_char,
        "comment_prefix": data.comment_prefix or None,
        "missing_ratings": None
        if data.missing_ratings == "reject"
        else data.missing_ratings,
        "time_format": data.time_format,
        "time_unit": None if data.time_unit == "s" else data.time_unit,
        "duplicates": None if data.duplicates == "keep" else data.duplicates,
        "label_threshold": data.label_threshold,
    }


def load_mapped(spec: str, data: DataConfig, *, weights: bool = True) -> Dataset:
    """:func:`load_dataset` of ``spec`` with the column mapping and feature columns
    of ``data`` (a run's saved ``data`` section); without ``weights``, the weight
    column is left unread (held-out rows)."""
    return load_dataset(
        spec,
        user_col=data.user_col,
        item_col=data.item_col,
        time_col=data.time_col,
        rating_col=data.rating_col,
        weight_col=data.weight_col if weights else None,
        weight_values=data.weights_of_values if weights else None,
        label_col=data.label_col,
        column_names=list(data.column_names) or None,
        has_header=None if not data.column_names else False,
        user_features=list(data.user_features) or None,
        item_features=list(data.item_features) or None,
        **reading_settings(data),
    )


def read_side_tables(
    data: DataConfig,
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """The user and item feature tables of ``data.user_table`` /
    ``data.item_table`` (None where unset), keyed ``user_id`` / ``item_id``: read
    (headerless files: their columns named by ``data.user_table_columns`` /
    ``item_table_columns``) by ``data.user_table_key`` / ``item_table_key`` when
    set, else by the log's
    user / item column name when the file has it, else by ``user_id`` /
    ``item_id``. A text table is read with the log's ``data.quote_char`` and
    ``data.comment_prefix`` (one dump, one dialect).

    Raises:
        ConfigError: a key setting without its table.
    """
    from twostage.data.tables import read_feature_table

    def side(
        path: str | None,
        column: str | None,
        key: Literal["user_id", "item_id"],
        table_key: str | None,
        names: tuple[str, ...],
    ) -> pl.DataFrame | None:
        name = "user_table" if key == "user_id" else "item_table"
        if path is None:
            for setting, value in (("key", table_key), ("columns", names)):
                if value:
                    raise ConfigError(
                        f"`data.{name}_{setting}` = {value!r} describes "
                        f"`data.{name}`, which is unset: give the table too."
                    )
            return None
        if not Path(path).is_file():
            raise DataError(f"`data.{name}` = {path!r} is not a file.")
        keys = table_keys(column, key, table_key)
        return read_feature_table(
            path,
            key_col=keys,
            key_name=key,
            column_names=list(names) or None,
            has_header=not names,
            quote_char=data.quote_char,
            comment_prefix=data.comment_prefix or None,
        )

    return (
        side(
            data.user_table,
            data.user_col,
            "user_id",
            data.user_table_key,
            data.user_table_columns,
        ),
        side(
            data.item_table,
            data.item_col,
            "item_id",
            data.item_table_key,
            data.item_table_columns,
        ),
    )


def table_keys(column: str | None, key: str, table_key: str | None) -> list[str]:
    """The names a feature table's key column may have, in order: ``table_key``
    alone when given (a catalogue keyed otherwise than the log: Steam's ``id``,
    Last.fm's ``#id``), else the log's column name, then ``user_id`` /
    ``item_id``."""
    if table_key is not None:
        return [table_key]
    return list(dict.fromkeys([c for c in (column, key) if c]))


def _parse_overrides(text: str) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise DataError(
                "synthetic options look like `synthetic:num_items=1000,seed=3`. "
                f"Received the part {part!r}."
            )
        try:
            out[key.strip()] = (
                int(value) if value.strip().lstrip("-").isdigit() else float(value)
            )
        except ValueError as e:
            raise DataError(
                f"synthetic option {key!r} should be a number. Received: {value!r}."
            ) from e
    return out
