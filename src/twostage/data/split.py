"""Train/test splits that never leak a test interaction into train.

Every split works on row positions of the interactions table, so a row lands in exactly
one side: duplicate rows (same user, item and time) are distinct rows and may land on
different sides, which is the usual protocol for logs that contain repeats.

The rows of an impression log shown and not chosen (``Dataset.shown``) follow the
interactions: each goes to the side of its user's first interaction at or after its
time (the choice made from that impression; after the user's last one, that last
one's side), and under a temporal split to the side of its own time. So the ranker
never trains on what was shown in the test's impressions.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import polars as pl

from twostage.data.dataset import ITEM, TIME, USER, WEIGHT, Dataset
from twostage.errors import ConfigError, DataError
from twostage.features.hashing import stable_hash

if TYPE_CHECKING:
    from twostage.config import ExperimentConfig

__all__ = [
    "SPLIT_METHODS",
    "ExperimentSplit",
    "Split",
    "check_not_empty",
    "file_order_note",
    "hold_out_users",
    "leave_last_out",
    "sample_users",
    "prepare_split",
    "random_split",
    "report_unused_fraction",
    "split_dataset",
    "temporal_split",
    "validation_split",
]

SPLIT_METHODS = ("random", "temporal", "leave-last-out")
_ROW = "__row"
logger = logging.getLogger(__name__)


class Split(NamedTuple):
    """The two sides of a split, sharing the side tables of the source dataset."""

    train: Dataset
    test: Dataset


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"`{name}` should be a fraction strictly between 0 and 1. "
            f"Received: `{name}` = {value!r}."
        )


def _by_mask(
    dataset: Dataset, test_mask: np.ndarray, *, cutoff: int | None = None
) -> Split:
    """The rows where ``test_mask`` holds are test; the shown rows follow them
    (``cutoff``: a temporal split's, which places them by their own time)."""
    mask = pl.Series(test_mask)
    inter = dataset.interactions
    train = dataset.with_interactions(inter.filter(~mask))
    test = dataset.with_interactions(inter.filter(mask))
    shown = dataset.shown
    if shown is None:
        return Split(train=train, test=test)
    later = shown_sides(shown, inter.select(USER, TIME), mask, cutoff=cutoff)
    return Split(
        train=train.with_shown(shown.filter(~later)),
        test=test.with_shown(shown.filter(later)),
    )


def shown_sides(
    shown: pl.DataFrame,
    chosen: pl.DataFrame,
    later: pl.Series,
    *,
    cutoff: int | None = None,
) -> pl.Series:
    """Which ``shown`` rows go to the later side of a split: with ``cutoff`` (a
    temporal split), those at or after it; else the side of the same user's first
    ``chosen`` row (``user_id``, ``timestamp``; on the later side where ``later``
    holds) at or after the shown row's time, or of the user's last chosen row
    when none is. A user without a chosen row keeps the earlier side."""
    if cutoff is not None:
        return shown[TIME] >= cutoff
    sides = chosen.select(USER, TIME, later.alias("__later")).sort(TIME)
    rows = shown.select(USER, TIME).with_row_index(_ROW).sort(TIME)
    nearest = [
        # both sorted by time above; polars cannot check that within groups
        rows.join_asof(
            sides, on=TIME, by=USER, strategy=strategy, check_sortedness=False
        )
        .sort(_ROW)["__later"]
        .alias(strategy)
        for strategy in ("forward", "backward")
    ]
    return pl.select(pl.coalesce(*nearest, pl.lit(False))).to_series()


def random_split(
    dataset: Dataset, *, test_fraction: float = 0.2, seed: int = 0
) -> Split:
    """Seeded uniform split of rows: exactly ``round(n * test_fraction)`` go to test."""
    _check_fraction("test_fraction", test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        # numpy's generator would raise a bare ValueError or TypeError
        raise ConfigError(
            f"`seed` should be a non-negative integer. Received: `seed` = {seed!r}."
        )
    n = dataset.num_interactions
    num_test = round(n * test_fraction)
    order = np.random.default_rng(seed).permutation(n)
    test_mask = np.zeros(n, dtype=bool)
    test_mask[order[:num_test]] = True
    return _by_mask(dataset, test_mask)


def temporal_split(
    dataset: Dataset, *, cutoff: int | None = None, test_fraction: float | None = None
) -> Split:
    """Global temporal split: train strictly before the cutoff time, test from it on.

    Args:
        dataset: the data to split.
        cutoff: timestamp (seconds) where test starts.
        test_fraction: alternative to ``cutoff``: the cutoff is placed at this quantile
            of time, so about this fraction of rows is test (ties at the cutoff go to
            test).
    """
    if (cutoff is None) == (test_fraction is None):
        raise ConfigError(
            "temporal_split needs exactly one of `cutoff` or `test_fraction`. "
            f"Received: cutoff={cutoff!r}, test_fraction={test_fraction!r}."
        )
    times = dataset.interactions[TIME].to_numpy()
    if test_fraction is not None:
        _check_fraction("test_fraction", test_fraction)
        ordered = np.sort(times, kind="stable")
        position = min(int(len(ordered) * (1.0 - test_fraction)), len(ordered) - 1)
        cutoff = int(ordered[position])
    return _by_mask(dataset, times >= cutoff, cutoff=cutoff)


def leave_last_out(dataset: Dataset, *, n: int = 1, min_train: int = 1) -> Split:
    """Per user, the last ``n`` interactions by time go to test (ties: later rows last).

    Users with fewer than ``n + min_train`` interactions keep all of them in train, so a
    user needs that many interactions to contribute a test row.
    """
    if n < 1 or min_train < 0:
        raise ConfigError(
            "`n` should be >= 1 and `min_train` >= 0. "
            f"Received: n={n!r}, min_train={min_train!r}."
        )
    ranked = (
        dataset.interactions.select(USER, TIME)
        .with_row_index(_ROW)
        .sort([USER, TIME, _ROW])
        .with_columns(
            pl.int_range(pl.len()).reverse().over(USER).alias("__from_end"),
            pl.len().over(USER).alias("__count"),
        )
    )
    test_rows = ranked.filter(
        (pl.col("__from_end") < n) & (pl.col("__count") >= n + min_train)
    )[_ROW].to_numpy()
    test_mask = np.zeros(dataset.num_interactions, dtype=bool)
    test_mask[test_rows] = True
    return _by_mask(dataset, test_mask)


def validation_split(
    train: Dataset, *, method: str = "random", fraction: float = 0.1, seed: int = 0
) -> Split:
    """Carve a validation set out of train with the same methods as the test split."""
    return split_dataset(train, method=method, test_fraction=fraction, seed=seed)


def file_order_note(dataset: Dataset, method: str) -> str | None:
    """What a split by time cuts a log without a time column by (its rows' file
    order), to warn of; None when it has times or the split ignores them."""
    if dataset.has_time or method == "random":
        return None
    cut = "the latest rows" if method == "temporal" else "each user's last row"
    where = f"'{dataset.source}'" if dataset.source else "the log"
    return (
        f"{where} has no time column: the {method} split takes {cut} in file order. "
        "Name its time column with `data.time_col` (`--time-col`) if it has one."
    )


def split_dataset(
    dataset: Dataset,
    *,
    method: str = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Dispatch by method name: ``random``, ``temporal`` or ``leave-last-out``."""
    if method == "random":
        return random_split(dataset, test_fraction=test_fraction, seed=seed)
    if method == "temporal":
        return temporal_split(dataset, test_fraction=test_fraction)
    if method == "leave-last-out":
        return leave_last_out(dataset, n=1)
    raise ConfigError(
        f"`method` should be one of {SPLIT_METHODS}. Received: `method` = {method!r}."
    )


@dataclass(frozen=True)
class ExperimentSplit:
    """The three parts of an experiment, disjoint by row.

    Attributes:
        fit: what both stages' models train on.
        validation: the carve-out neither stage trains on (early stopping, the
            ranker's blend weight); None when ``data.validation_fraction`` is 0.
        test: the held-out rows every figure is measured on.
    """

    fit: Dataset
    validation: Dataset | None
    test: Dataset

    @property
    def train(self) -> Dataset:
        """``fit`` and ``validation`` together: every row a served model knows as the
        users' history (and excludes as seen)."""
        if self.validation is None or not self.validation.num_interactions:
            return self.fit
        # diagonal: held-out rows read without the log's weights have no column
        rows = pl.concat(
            [self.fit.interactions, self.validation.interactions],
            how="diagonal_relaxed",
        )
        return self.fit.with_interactions(rows)


def cold_user_choice(users: pl.Series, *, fraction: float, seed: int) -> pl.Series:
    """A random ``fraction`` of the distinct ``users``: a permutation seeded by
    ``seed`` of the sorted IDs, so a streamed log's pass draws the same users."""
    users = users.unique().sort()
    rng = np.random.default_rng(seed + 1)
    return users.gather(rng.permutation(len(users))[: round(len(users) * fraction)])


def hold_out_users(
    dataset: Dataset, *, fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Move every interaction of a random ``fraction`` of users out: (rest, cold)."""
    cold = cold_user_choice(dataset.interactions[USER], fraction=fraction, seed=seed)
    is_cold = pl.col(USER).is_in(cold.implode())
    inter, shown = dataset.interactions, dataset.shown
    rest = dataset.with_interactions(inter.filter(~is_cold))
    held = dataset.with_interactions(inter.filter(is_cold))
    if shown is not None:
        rest = rest.with_shown(shown.filter(~is_cold))
        held = held.with_shown(shown.filter(is_cold))
    return rest, held


def sample_users(dataset: Dataset, n: int, *, seed: int) -> Dataset:
    """The rows of at most ``n`` of the dataset's users: those with the smallest
    stable hash of their ID and ``seed``, so the same users are drawn whatever the row
    order, file layout or process (``n`` <= 0: every user)."""
    users = dataset.interactions[USER].unique()
    if n <= 0 or len(users) <= n:
        return dataset
    order = np.argsort(stable_hash(users, seed=seed), kind="stable")[:n]
    drawn = pl.col(USER).is_in(users.gather(order).implode())
    sample = dataset.with_interactions(dataset.interactions.filter(drawn))
    if dataset.shown is not None:
        sample = sample.with_shown(dataset.shown.filter(drawn))
    return sample


def check_not_empty(dataset: Dataset) -> None:
    """A log with no row loaded has nothing to split: say so, with why each row
    was rejected, rather than that a split of 0 rows left no side."""
    if dataset.num_interactions:
        return
    report = dataset.report
    why = (
        f": every row read was rejected. {report.summary()}"
        if report is not None and report.num_rejected
        else " (it holds no interactions)"
    )
    raise DataError(f"no row of {dataset.name!r} was loaded{why}")


def report_unused_fraction(method: str, test_fraction: float) -> None:
    """Log that ``data.test_fraction`` sizes no leave-last-out test. Not an error:
    saved configs that carry it must keep loading."""
    if method == "leave-last-out" and test_fraction != 0.2:  # the default
        logger.warning(
            "data.test_fraction=%s is not used by the leave-last-out split (each "
            "user's last item is the test)",
            test_fraction,
        )


def prepare_split(dataset: Dataset, config: ExperimentConfig) -> ExperimentSplit:
    """The test split (plus held-out cold users) and the validation carve-out.

    The carve-out uses the test split's method on the training rows:
    ``data.validation_fraction`` of them at random, the latest fraction of them by
    time (``temporal``), or each user's last training item (``leave-last-out``:
    the second-last of the user's log; the fraction only switches it on).

    The same config and data always give the same three parts: re-evaluating a saved
    run rebuilds its test split this way. Ratings listed in ``data.unrated_values``
    become missing first (:meth:`Dataset.with_unrated`).

    Returns:
        The :class:`ExperimentSplit`; ``test`` includes every interaction of the cold
        users; ``validation`` is None when ``data.validation_fraction`` is 0.
    """
    data = config.data
    report_unused_fraction(data.split, data.test_fraction)
    check_not_empty(dataset)
    dataset = dataset.with_unrated(data.unrated_values)
    if data.train_file is not None or data.test_file is not None:
        return _split_from_files(dataset, config)
    note = file_order_note(dataset, data.split)
    if note:
        logger.warning(note)
    rest, cold = dataset, None
    if data.cold_user_fraction > 0:
        rest, cold = hold_out_users(
            dataset, fraction=data.cold_user_fraction, seed=data.seed
        )
    train, test = split_dataset(
        rest, method=data.split, test_fraction=data.test_fraction, seed=data.seed
    )
    held = ""
    if cold is not None:
        test = test.with_interactions(pl.concat([test.interactions, cold.interactions]))
        if cold.shown is not None and test.shown is not None:
            test = test.with_shown(pl.concat([test.shown, cold.shown]))
        held = (
            f" (`data.cold_user_fraction` = {data.cold_user_fraction} held out "
            f"{cold.interactions[USER].n_unique()} of "
            f"{dataset.interactions[USER].n_unique()} users first)"
        )
    _check_sides(train, test, data.split, held=held)
    test = sample_users(test, data.test_users, seed=data.seed)
    return _carve_validation(train, test, config)


def _carve_validation(
    train: Dataset, test: Dataset, config: ExperimentConfig
) -> ExperimentSplit:
    """The three parts, with validation carved from ``train`` the way test was: the
    second-last item of each user under leave-last-out, the latest rows of train
    under a temporal split (none when ``data.validation_fraction`` is 0)."""
    data = config.data
    if data.validation_fraction <= 0:
        return ExperimentSplit(fit=train, validation=None, test=test)
    fit, validation = validation_split(
        train, method=data.split, fraction=data.validation_fraction, seed=data.seed + 7
    )
    if not fit.num_interactions:
        raise DataError(
            f"the validation carve-out ({data.split}, `data.validation_fraction` = "
            f"{data.validation_fraction}) took all {train.num_interactions} training "
            "rows and left none to train on"
            + _tied_times(train, data.split)
            + ". Set `data.validation_fraction=0`, or split another way."
        )
    return ExperimentSplit(fit=fit, validation=validation, test=test)


def _check_sides(train: Dataset, test: Dataset, method: str, *, held: str = "") -> None:
    """A split that leaves one side empty cannot train or be evaluated: say why,
    before a step fails on an empty table (``held``: the cold users set aside)."""
    check_split_sizes(
        train.num_interactions,
        test.num_interactions,
        method,
        why_no_training=held or _tied_times(test, method),
    )


def check_split_sizes(
    train_rows: int, test_rows: int, method: str, *, why_no_training: str = ""
) -> None:
    """Raise a DataError naming the cause when a split of ``method`` left no
    training rows or no test rows (in memory, or counted by a streamed pass)."""
    count = train_rows + test_rows
    rows = f"{count} row{'' if count == 1 else 's'}"
    if not train_rows:
        raise DataError(
            f"the {method} split of {rows} left none to train on"
            + why_no_training
            + ". Use a log with more rows or times, or another `data.split`."
        )
    if not test_rows:
        why = {
            "leave-last-out": ": no user has the 2 interactions it needs to hold one out",
            "random": ": `data.test_fraction` of so few rows rounds to 0",
        }.get(method, "")
        raise DataError(
            f"the {method} split of {rows} left none to test on{why}. Use a "
            "log with more rows or users, or another `data.split`."
        )


def _tied_times(side: Dataset, method: str) -> str:
    """Why a temporal cut took every row, when it did: the times it cut."""
    if method != "temporal" or not side.num_interactions:
        return ""
    distinct = side.interactions[TIME].n_unique()
    return (
        f": a temporal cut puts every row at or after it on the later side, and "
        f"those rows hold {distinct} distinct timestamp(s)"
    )


def _split_from_files(dataset: Dataset, config: ExperimentConfig) -> ExperimentSplit:
    """The split of ``data.train_file`` / ``data.test_file``, with the dataset's side
    tables; the validation carve-out is drawn from the training file as usual."""
    data = config.data
    if data.train_file is None or data.test_file is None:
        raise ConfigError(
            "`data.train_file` and `data.test_file` go together (the split comes "
            f"from both). Received: train_file={data.train_file!r}, "
            f"test_file={data.test_file!r}."
        )
    if data.cold_user_fraction > 0:
        raise ConfigError(
            "`data.cold_user_fraction` draws cold users from one log; with split "
            "files, put those users in the test file instead. Received: "
            f"`data.cold_user_fraction` = {data.cold_user_fraction!r}."
        )
    part = read_split_file(data.train_file, like=dataset)
    rows = part.interactions
    if data.weight_col is not None and WEIGHT not in rows.columns:
        raise ConfigError(
            f"`data.weight_col` = {data.weight_col!r} asks for row weights, but the "
            f"training file {data.train_file!r} has no {WEIGHT!r} column (its "
            f"columns: {rows.columns}). Write the split with them (`twostage data "
            f"split LOG --weight-col {data.weight_col}`), or unset `data.weight_col`."
        )
    if data.weight_col is None and WEIGHT in rows.columns:
        logger.warning(
            "the training file %r carries row weights, which this run does not "
            "read: set `data.weight_col` (`--weight-col`) to train with them.",
            data.train_file,
        )
        rows = rows.drop(WEIGHT)
    # The files' own times or none: without a `timestamp` column their rows
    # count in file order, whatever the dataset's log holds.
    train = dataset.with_interactions(rows).with_shown(part.shown)
    train = dataclasses.replace(train, has_time=part.has_time)
    train = train.with_unrated(data.unrated_values)
    part = read_split_file(data.test_file, like=dataset)
    test = dataset.with_interactions(part.interactions).with_shown(part.shown)
    test = dataclasses.replace(test, has_time=part.has_time)
    test = test.with_unrated(data.unrated_values)
    _check_sides(train, test, "files'")
    test = sample_users(test, data.test_users, seed=data.seed)
    return _carve_validation(train, test, config)


def read_split_file(path: str, *, like: Dataset) -> Dataset:
    """One side of a split as ``twostage data split`` writes it (Parquet or CSV with
    ``user_id``, ``item_id`` and optionally ``timestamp``, ``rating``, ``weight``
    and ``label`` (an impression log's shown rows), each read when present); IDs
    are cast to the dtype of ``like``'s so they meet its vocabularies and side
    tables."""
    from pathlib import Path

    from twostage.data.dataset import LABEL, RATING, WEIGHT
    from twostage.data.tables import read_interactions

    source = Path(path)
    if source.suffix in (".parquet", ".pq") and source.exists():
        try:
            columns = list(pl.read_parquet_schema(source))
        except (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException) as e:
            raise DataError(f"{source}: not a readable Parquet file: {e}") from e
    elif source.exists():
        columns = source.read_text().split("\n", 1)[0].strip().split(",")
    else:
        raise ConfigError(f"the split file {path!r} does not exist.")
    part = read_interactions(
        source,
        time_col=TIME if TIME in columns else None,
        rating_col=RATING if RATING in columns else None,
        weight_col=WEIGHT if WEIGHT in columns else None,
        label_col=LABEL if LABEL in columns else None,
    )
    try:
        return with_id_types(part, like)
    except pl.exceptions.PolarsError as e:
        schema = like.interactions.schema
        theirs = part.interactions.schema
        raise DataError(
            f"the split file {path!r} holds IDs that are not those of the dataset "
            f"{like.name or like.source!r} (user_id {theirs[USER]} and item_id "
            f"{theirs[ITEM]} against {schema[USER]} and {schema[ITEM]}): split "
            "files go with the log they were split from. Name it with "
            "`data.dataset` (`--dataset`)."
        ) from e


def with_id_types(part: Dataset, like: Dataset) -> Dataset:
    """``part`` with its interactions' and shown rows' IDs cast to ``like``'s ID
    types."""
    schema = like.interactions.schema
    types = (pl.col(USER).cast(schema[USER]), pl.col(ITEM).cast(schema[ITEM]))
    typed = part.with_interactions(part.interactions.with_columns(*types))
    if part.shown is None:
        return typed
    return typed.with_shown(part.shown.with_columns(*types))
