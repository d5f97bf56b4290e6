"""Training the two towers (IDs, the users' history, side features) on a Parquet log
that is never loaded as a table.

Two passes over the row groups (:mod:`twostage.data.streaming`): the first fits the
vocabularies on the training side, the second maps each training row to its two
indices, written into arrays sized by the first pass. The raw table, the split's copies
and the polars frames of the in-memory path are never held, so memory is the index
arrays (16 bytes per training row), the embedding tables and their optimiser state.
With ``retrieval.history_length`` > 0 the second pass also keeps each training row's
time (8 bytes per row), and each user's last items come from one sort of those arrays,
as :func:`~twostage.retrieval.tensors.history_table` builds them in memory.

Side features come from the log's feature columns (``data.user_features`` /
``data.item_features``, as ``--user-features`` / ``--item-features`` name them): one
more pass keeps each user's and item's first row
(:func:`~twostage.data.streaming.feature_tables`), and the spec fits on the training
users' and items' rows (:meth:`~twostage.features.FeatureSpec.fit_streamed`). Rating
weights and the recent-popularity fallback read the rows' ratings and times in the
second pass. Under ``data.split=leave-last-out`` a streaming aggregation finds each
user's last row first (:func:`~twostage.data.streaming.last_rows`), and both passes
hold those rows out by their row numbers. After training, one more pass reads the test
side and evaluates the run on it (on ``data.test_users`` of the users when set).

Per-row context (``retrieval.query_fields`` naming a column of the log that is not a
user feature, or ``hour_of_day`` / ``day_of_week``): one more pass counts each context
column's values over the training rows (:func:`~twostage.data.streaming.count_values`),
the encoders fit on those counts (:meth:`~twostage.features.base.Encoder.fit_counts`),
and the second pass encodes each training row's context.

With ``data.validation_fraction`` > 0 the split also carves validation rows out of
the training rows by its own method (:func:`~twostage.data.streaming.split_rule`).
They are held in memory (``data.test_users`` of their users scored), score every
epoch for early stopping, pick the popularity fallback's threshold, and join the
history and seen items after training, as the in-memory path does with its carve-out.

:func:`fit_streamed_two_stage` trains the ranker after the towers on the same
training rows (their indices, history and ratings, kept by the second pass) and the
same carve-out, and measures both stages on the test side. For an impression log
(``data.label_col``) one more pass places the rows shown and not chosen on their
sides of the split (:func:`streamed_shown`): the ranker's shown negatives, its
early stopping and the test's ``shown_auc``, as in memory.

``retrieval.examples=users|sequences`` and ``retrieval.sequence_time_gaps`` build the
same tables from the second pass's index and time arrays as in memory (the sequence
windows, the history's times); as in memory, several ranks train interactions only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import polars as pl
import torch

from twostage import distributed
from twostage.config import DataConfig, ExperimentConfig
from twostage.data.dataset import ITEM, LABEL, RATING, TIME, USER, Dataset
from twostage.data.registry import read_side_tables
from twostage.data.split import (
    check_split_sizes,
    report_unused_fraction,
    sample_users,
    shown_sides,
)
from twostage.data.streaming import (
    Reading,
    SplitRule,
    StreamingVocabularies,
    checked_weights,
    count_values,
    feature_tables,
    fit_vocabularies,
    held_out_rows,
    iter_row_groups,
    parquet_files,
    split_rule,
)
from twostage.data.tables import merge_table
from twostage.errors import ConfigError, DataError
from twostage.features.context import context_frame
from twostage.features.spec import FeatureSpec
from twostage.models.ensemble import member_kinds
from twostage.retrieval.fit import (
    check_validation_choices,
    choose_on_validation,
    closed_form_members,
    fit_closed_form,
    set_threads,
    train_members,
    warn_exact_term,
    warn_unread_settings,
)
from twostage.retrieval.run import (
    RetrievalRun,
    refuse_foreign_target,
    spec_for,
)
from twostage.retrieval.tensors import (
    RetrievalTensors,
    TimedRows,
    context_keys,
    latest_rows,
    neighbour_sequences,
    no_rating_column,
    rating_tables,
    rating_values,
    recent_popularity,
    rows_in_vocab_order,
    sequence_windows,
    with_history_rows,
)
from twostage.training import ProgressFn

__all__ = [
    "ShownRows",
    "StreamedRows",
    "check_data_options",
    "evaluate_streamed",
    "fit_streamed_retrieval",
    "fit_streamed_two_stage",
    "side_tables",
    "streamed_shown",
    "streamed_tensors",
    "streamed_test_side",
    "streamed_training_rows",
]

if TYPE_CHECKING:
    from twostage.recommender import Recommender
    from twostage.two_stage import TwoStage

logger = logging.getLogger(__name__)


def _check(config: ExperimentConfig) -> None:
    data = config.data  # every split method and example mode, any number of ranks
    check_data_options(data)
    report_unused_fraction(data.split, data.test_fraction)


def check_data_options(data: DataConfig) -> None:
    """Refuse the ``data`` options a streamed log does not read, rather than train
    as if they were unset: a Parquet log has no separator, quotes, comments or
    header, and its time column is needed (the user, item, time and rating
    columns are read by the names ``data.*_col`` give: ``Reading.names``)."""
    if data.time_col == "":
        raise ConfigError(
            "a streamed log is split and ordered by its time column: `time_col` = "
            "'' (no times, file order) is read in memory only (without --stream)."
        )
    unread = {
        "data.separator": data.separator is not None,
        "data.column_names": bool(data.column_names),
        "data.quote_char": data.quote_char != '"',
        "data.comment_prefix": bool(data.comment_prefix),
    }
    if any(unread.values()):
        raise ConfigError(
            "a streamed log does not read "
            + ", ".join(key for key, value in unread.items() if value)
            + " (a Parquet log has no separator, quotes, comments or header): "
            "unset them, or load the log in memory "
            "(without --stream)."
        )


class StreamedRows(NamedTuple):
    """What the second pass over a log keeps (:func:`streamed_tensors`)."""

    #: The training tensors.
    tensors: RetrievalTensors
    #: The training rows' times, in the tensors' row order (empty when nothing
    #: reads them): the validation rows' history joins them after training.
    times: np.ndarray
    #: The training rows' ratings, in the same order (empty without a rating
    #: column): the ranker's targets.
    ratings: np.ndarray
    #: The training rows' weights (``data.weight_col``), in the same order (empty
    #: without one): they scale both stages' losses.
    weights: np.ndarray


def streamed_tensors(
    path: str | Path,
    fitted: StreamingVocabularies,
    config: ExperimentConfig,
    *,
    spec: FeatureSpec | None = None,
    user_table: pl.DataFrame | None = None,
    item_table: pl.DataFrame | None = None,
) -> StreamedRows:
    """The training tensors from a second pass over the log: the rows' indices, the
    users' history when ``retrieval.history_length`` > 0, and each user's and item's
    feature rows from ``user_table`` / ``item_table`` (IDs only without them). The
    training rows are the ones ``fitted.rule`` holds out neither as test nor as
    validation rows; their times and ratings come back beside the tensors."""
    rule = _split_rule(path, config, fitted)
    world = distributed.current()
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    local = fitted.num_local_train_rows
    users = np.empty(local, dtype=np.int64)
    items = np.empty(local, dtype=np.int64)
    length = config.retrieval.history_length
    days = config.retrieval.popularity_days
    sequences = config.retrieval.examples == "sequences"
    # The times order each user's rows (history, sequences, the session-kNN
    # table), find the last days (recent popularity) and give the gaps between
    # items: their physical integers do all three as the values do (epoch
    # seconds, as in memory).
    neighbours = config.retrieval.session_knn_weight != 0
    # A `transition` member counts what followed what in each user's rows.
    transitions = "transition" in member_kinds(config.retrieval)
    timed = bool(length) or days > 0 or sequences or neighbours or transitions
    times = np.empty(local if timed else 0, dtype=np.int64)
    # The ratings weight the retrieval loss and are the ranker's targets.
    rated = RATING in _columns(path, config.data)
    ratings = np.empty(local if rated else 0, dtype=np.float32)
    weight_col = config.data.weight_col  # the log's own row weights, if named
    weights = np.empty(local if weight_col else 0, dtype=np.float32)
    keys = context_keys(spec) if spec is not None else []
    # The log's own context columns (the timestamp gives the derived ones).
    raw = [
        k
        for k in keys
        if k in _columns(path, config.data) and k not in (USER, ITEM, TIME)
    ]
    columns = [USER, ITEM, TIME, *([RATING] if rated else []), *raw]
    columns += [weight_col] if weight_col and weight_col not in columns else []
    if weight_col and sequences:
        logger.warning(
            "the log's weight column %r is not read by `retrieval.examples=sequences` "
            "(every position of a sequence counts once)",
            weight_col,
        )
    context: dict[str, list[np.ndarray]] = {}
    filled, group_rows = 0, []
    # Each rank reads its own row groups (rank, rank + size, ...).
    for first, batch in iter_row_groups(
        path,
        columns=columns,
        rank=rank,
        world=size,
        reading=Reading.of(config.data),
    ):
        train = batch.filter(pl.Series(~rule.mask(batch, first)))
        rows = slice(filled, filled + train.height)
        users[rows] = fitted.users.transform(train[USER])
        items[rows] = fitted.items.transform(train[ITEM])
        if timed:
            times[rows] = train[TIME].to_physical().cast(pl.Int64).to_numpy()
        if rated:  # NaN: a row without a rating (missing_ratings, unrated_values)
            ratings[rows] = unrated(train[RATING], config.data.unrated_values)
        if weight_col:
            weights[rows] = checked_weights(
                train, weight_col, path, config.data.weights_of_values
            )
        if keys:  # each training row's own context, encoded as build_tensors does
            assert spec is not None
            frame = context_frame(train[USER], train, keys)
            for key, values in spec.transform_context(frame).items():
                context.setdefault(key, []).append(values.numpy())
        filled += train.height
        group_rows.append(train.height)
    users, items = users[:filled], items[:filled]
    times = times[:filled] if timed else times
    ratings = ratings[:filled] if rated else ratings
    weights = weights[:filled] if weight_col else weights
    if size > 1:
        # Training draws global batches from every row: each rank gets all of
        # them, in file order (so the run is the single process's).
        order = _file_order(group_rows, size)
        users, items = _gathered(users)[order], _gathered(items)[order]
        # Every rank takes part in each gather, also one that read no rows.
        times = _gathered(times)[order] if timed else times
        ratings = _gathered(ratings)[order] if rated else ratings
        weights = _gathered(weights)[order] if weight_col else weights
    encoded = {key: np.concatenate(parts) for key, parts in context.items()}
    if size > 1:
        encoded = {key: _gathered(values)[order] for key, values in encoded.items()}
    num_users, num_items = fitted.users.size, fitted.items.size
    history, history_times = latest_rows(
        times, users, items, num_users=num_users, length=length
    )
    empty = torch.zeros(0, 0, dtype=torch.long)
    windows, window_users, window_times = empty, torch.zeros(0, dtype=torch.long), empty
    if sequences:
        windows, window_users, window_times = sequence_windows(
            times, users, items, length=length
        )
    if not config.retrieval.sequence_time_gaps:
        history_times = window_times = empty
    if config.retrieval.sequence_ratings and not rated:
        raise ConfigError(no_rating_column(str(path)))
    history_ratings, window_ratings, edges, rating_range = rating_tables(
        times,
        users,
        ratings.astype(np.float64) if config.retrieval.sequence_ratings else None,
        num_users=num_users,
        config=config.retrieval,
    )
    user_features: dict[str, torch.Tensor] = {USER: torch.arange(num_users)}
    item_features: dict[str, torch.Tensor] = {ITEM: torch.arange(num_items)}
    if spec is not None:
        user_features = rows_in_vocab_order(spec, USER, "query", user_table)
        item_features = rows_in_vocab_order(spec, ITEM, "candidate", item_table)
    neighbour_rows = neighbour_sequences(
        times, users, items, num_users=num_users, config=config.retrieval
    )
    tensors = RetrievalTensors(
        user_features=user_features,
        item_features=item_features,
        history=history,
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        weights=_loss_weights(config, ratings, weights),
        item_probs=torch.from_numpy(fitted.item_probs()).float(),
        popularity=recent_popularity(times, items, num_items=num_items, days=days),
        context={key: torch.from_numpy(values) for key, values in encoded.items()},
        sequences=windows,
        sequence_users=window_users,
        history_times=history_times,
        sequence_times=window_times,
        history_ratings=history_ratings,
        sequence_ratings=window_ratings,
        rating_edges=edges,
        rating_range=rating_range,
        neighbour_lengths=neighbour_rows[0],
        neighbour_items=neighbour_rows[1],
        neighbour_latest=neighbour_rows[2],
    )
    return StreamedRows(tensors=tensors, times=times, ratings=ratings, weights=weights)


def side_tables(
    path: str | Path, config: ExperimentConfig, users: pl.Series, items: pl.Series
) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """The feature tables a streamed run reads (None without side features): the
    log's own feature columns, one row per ID (:func:`feature_tables`), joined with
    the files of ``data.user_table`` / ``data.item_table``, checked against the
    log's IDs ``users`` / ``items`` as in memory."""
    if not config.retrieval.use_side_features:
        return None, None
    data = config.data
    user_table, item_table = feature_tables(
        path,
        user_features=data.user_features,
        item_features=data.item_features,
        reading=Reading.of(data),
    )
    extra_users, extra_items = read_side_tables(data)
    if extra_users is not None:
        user_table = merge_table("user_table", USER, extra_users, user_table, users)
    if extra_items is not None:
        item_table = merge_table("item_table", ITEM, extra_items, item_table, items)
    return user_table, item_table


def unrated(ratings: pl.Series, values: tuple[float, ...]) -> np.ndarray:
    """Float32 ratings with those listed in ``values`` (``data.unrated_values``)
    and the missing ones NaN: rows without a rating, as ``Dataset.with_unrated``
    makes them in memory."""
    out = ratings.cast(pl.Float32).to_numpy().copy()
    if values:
        out[np.isin(out, np.array(values, dtype=np.float32))] = np.nan
    return out


def _loss_weights(
    config: ExperimentConfig, ratings: np.ndarray, weights: np.ndarray
) -> torch.Tensor | None:
    """Each training row's weight in the retrieval loss, as ``build_tensors`` gives
    it in memory: ``1 + rating`` under ``retrieval.rating_weights``, times the
    log's own weight when ``data.weight_col`` names one; None when all are 1."""
    out = None
    if config.retrieval.rating_weights and ratings.size:  # unrated: as 0, as in memory
        out = torch.from_numpy(np.maximum(np.nan_to_num(ratings, nan=0.0), 0.0) + 1.0)
    if weights.size or config.data.weight_col:
        given = torch.from_numpy(weights.copy())
        out = given if out is None else out * given
    return out


def evaluate_streamed(run: RetrievalRun) -> dict[str, Any]:
    """Re-evaluate a run trained by :func:`fit_streamed_retrieval` (``run.stream``
    names its log) on that log's test side (:func:`streamed_test_side`): the
    metrics training stored. ``twostage evaluate`` calls this for streamed runs and
    their bundles.

    Raises:
        DataError: the run was not trained from a stream, or its log is gone.
    """
    return _evaluate(run, streamed_test_side(run))


def streamed_test_side(run: RetrievalRun) -> Dataset:
    """The test side of the log a streamed run trained on (``run.stream``), read a
    row group at a time as training read it: the same split rule, the same checks,
    ``data.test_users`` of the users when set. What both stages of a streamed
    bundle are evaluated on.

    Raises:
        DataError: the run was not trained from a stream, or its log is gone.
    """
    path = _stream_of(run)
    user_table, item_table = side_tables(
        path,
        run.config,
        run.spec.vocabulary(USER).values,
        run.spec.vocabulary(ITEM).values,
    )
    return _test_side(run, path, None, user_table, item_table)


def _stream_of(run: RetrievalRun) -> Path:
    """The log a streamed run trained on.

    Raises:
        DataError: the run was not trained from a stream, or its log is gone.
    """
    from twostage.errors import DataError

    if run.stream is None:
        raise DataError("this run was not trained from a stream (run.stream is None).")
    path = Path(run.stream)
    if not path.exists():
        raise DataError(
            f"the run was trained on the stream {str(path)!r}, which is not there "
            "any more: put the log back at that path to evaluate it."
        )
    return path


def streamed_training_rows(run: RetrievalRun) -> TimedRows:
    """Every row of the log a streamed run trained on that is not a test row
    (its training and validation rows), as indices with their times, in file
    order: one more pass, holding 24 bytes a row. What its baselines fit on, as
    an in-memory run's fit on its training rows (``twostage evaluate
    --baselines``).

    Raises:
        DataError: the run was not trained from a stream, or its log is gone.
    """
    if distributed.current() is not None:
        raise ConfigError(  # each rank would read its share of the rows
            "the baselines of a streamed run are fitted in one process; run "
            "`twostage evaluate` without torchrun."
        )
    path = _stream_of(run)
    rule = _split_rule(path, run.config, None)
    users, items = run.spec.vocabulary(USER), run.spec.vocabulary(ITEM)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for first, batch in iter_row_groups(
        path, columns=[USER, ITEM, TIME], reading=Reading.of(run.config.data)
    ):
        kept = batch.filter(pl.Series(~rule.sides(batch, first)[0]))
        parts.append(
            (
                users.transform(kept[USER]),
                items.transform(kept[ITEM]),
                kept[TIME].to_physical().cast(pl.Int64).to_numpy(),
            )
        )
    empty = np.zeros(0, dtype=np.int64)
    return TimedRows(
        users=np.concatenate([p[0] for p in parts]) if parts else empty,
        items=np.concatenate([p[1] for p in parts]) if parts else empty,
        times=np.concatenate([p[2] for p in parts]) if parts else empty,
        num_users=users.size,
    )


def _test_side(
    run: RetrievalRun,
    path: str | Path,
    fitted: StreamingVocabularies | None,
    user_table: pl.DataFrame | None,
    item_table: pl.DataFrame | None,
) -> Dataset:
    """The held-out rows evaluation reads (``data.test_users`` of the users, when
    set): one more pass over the log."""
    rule = _split_rule(path, run.config, fitted)
    held = _held_out(run.spec, run.config, path, rule, "test", user_table, item_table)
    return _sampled(run.spec, run.config, held)


def _evaluate(run: RetrievalRun, test: Dataset) -> dict[str, Any]:
    """The run's test metrics (empty when the split holds nothing out)."""
    world = distributed.current()
    if test.num_interactions == 0:
        return {}
    started = time.perf_counter()
    metrics = run.evaluate(test, shard=world is not None).to_dict()
    logger.info(
        "evaluated %d test users in %.1f s",
        test.interactions[USER].n_unique(),
        time.perf_counter() - started,
    )
    return metrics


def _held_out(
    spec: FeatureSpec,
    config: ExperimentConfig,
    path: str | Path,
    rule: SplitRule,
    side: str,
    user_table: pl.DataFrame | None,
    item_table: pl.DataFrame | None,
) -> Dataset:
    """The rows of one held-out side (test or validation) with the columns the
    run's queries read, and the ratings."""
    world = distributed.current()
    keys = context_keys(spec)
    present = _columns(path, config.data)
    raw = [k for k in keys if k in present and k not in (USER, ITEM, TIME, RATING)]
    # The ratings are the ranker's targets (validation, RMSE on the test side).
    rated = [RATING] if RATING in present else []
    rows = held_out_rows(
        path,
        rule,
        [USER, ITEM, TIME, *rated, *raw],
        side=side,
        rank=world.rank if world is not None else 0,
        world=world.size if world is not None else 1,
        reading=Reading.of(config.data),
    )
    held = Dataset(name=side, interactions=rows, users=user_table, items=item_table)
    return held.with_unrated(config.data.unrated_values)


def _sampled(spec: FeatureSpec, config: ExperimentConfig, held: Dataset) -> Dataset:
    """``data.test_users`` of a held-out side's users when set (the same sample
    rule on the test and validation sides); a warning above 100,000 users without."""
    data = config.data
    held = sample_users(held, data.test_users, seed=data.seed)
    side = held.name
    users = held.interactions[USER].n_unique()
    if data.test_users == 0 and users > 100_000 and distributed.is_main():
        logger.warning(
            "evaluating all %d %s users over %d items%s; set data.test_users to "
            "evaluate a fixed sample of them",
            users,
            side,
            spec.vocabulary(ITEM).size - 1,
            " after every epoch" if side == "validation" else "",
        )
    return held


def _with_validation_rows(
    run: RetrievalRun,
    fitted: StreamingVocabularies,
    validation: Dataset,
    times: np.ndarray,
    ratings: np.ndarray,
) -> RetrievalTensors:
    """The run's tables with the validation rows joined to the training rows
    (``times`` and ``ratings``: theirs, in the tables' order): history, seen items
    and recent popularity, as :func:`~twostage.retrieval.tensors.with_history_of`
    gives them in memory."""
    rows = validation.interactions
    tensors = run.tensors
    if not times.size:  # nothing reads the training rows' times: they stay unknown
        times = np.zeros(tensors.num_examples, dtype=np.int64)
    return with_history_rows(
        tensors,
        np.concatenate([tensors.users.numpy(), fitted.users.transform(rows[USER])]),
        np.concatenate([tensors.items.numpy(), fitted.items.transform(rows[ITEM])]),
        np.concatenate([times, rows[TIME].to_numpy()]),
        num_users=fitted.users.size,
        num_items=fitted.items.size,
        config=run.config.retrieval,
        ratings=(
            np.concatenate([ratings.astype(np.float64), rating_values(rows)])
            if run.config.retrieval.sequence_ratings
            else None
        ),
    )


def _split_rule(
    path: str | Path, config: ExperimentConfig, fitted: StreamingVocabularies | None
) -> SplitRule:
    """The run's split: the one the vocabulary pass applied (with its validation
    carve-out), else found again (its test side: evaluation needs no more)."""
    if fitted is not None and fitted.rule is not None:
        return fitted.rule
    data = config.data
    return split_rule(
        path,
        method=data.split,
        test_fraction=data.test_fraction,
        seed=data.seed,
        reading=Reading.of(data),
        cold_user_fraction=data.cold_user_fraction,
    )


class ShownRows(NamedTuple):
    """An impression log's rows shown and not chosen, by side of the split
    (``user_id``, ``item_id``, ``timestamp`` each; the training side as
    ``user_idx`` / ``item_idx`` int32 columns when :func:`streamed_shown` encodes
    it)."""

    train: pl.DataFrame
    validation: pl.DataFrame
    test: pl.DataFrame


def streamed_shown(
    path: str | Path,
    rule: SplitRule,
    data: DataConfig,
    *,
    vocabularies: StreamingVocabularies | None = None,
) -> ShownRows:
    """The rows shown and not chosen of a streamed impression log
    (``data.label_col``), each on the side of the split that ``prepare_split``
    gives it in memory (:func:`twostage.data.split.shown_sides`): under a
    temporal split by its own time; else the side of its user's first chosen row
    at or after its time (the choice made from that impression), or of the
    user's last chosen row when none is, the training side for a user without
    one; a user held out whole (``cold_user_fraction``) on the test side.

    Two more passes, over every row group on every rank (a user's rows may lie
    in any of them): the first holds each chosen row's user, time and side (not
    needed under a temporal split); the second places the shown rows a row
    group at a time. With ``vocabularies`` the training side keeps only the
    pairs both vocabularies know, as two int32 indices (8 bytes a row, where the
    raw rows took about 110 bytes a row of the log: the shown rows are most of
    an impression log); the held-out sides keep their raw rows (their users and
    items may be new to the model).
    """
    reading = dataclasses.replace(Reading.of(data), keep_shown=True)
    columns = [USER, ITEM, TIME]
    everyone = rest = pl.DataFrame()
    if rule.method != "temporal":
        chosen_parts = []
        for first, batch in iter_row_groups(path, columns=columns, reading=reading):
            chosen = batch.filter(batch[LABEL])
            test, validation = rule.sides(chosen, first)
            chosen_parts.append(
                chosen.select(
                    USER,
                    TIME,
                    pl.Series("test", test),
                    pl.Series("validation", validation),
                )
            )
        everyone = pl.concat(chosen_parts).sort(TIME, maintain_order=True)
        del chosen_parts
        # Among the rest, as the carve-out splits the training side again.
        rest = everyone.filter(~everyone["test"])
    parts: tuple[list[pl.DataFrame], ...] = ([], [], [])
    for _, batch in iter_row_groups(path, columns=columns, reading=reading):
        shown = batch.filter(~batch[LABEL]).select(USER, ITEM, TIME)
        if rule.method == "temporal":
            later = rule.shown_test_mask(
                shown, shown.clear(), pl.Series([], dtype=pl.Boolean)
            )
            cut = None if rule.validation is None else rule.validation.time_cut
            carved = (shown[TIME] >= cut) if cut is not None else later & False
        else:
            later = rule.shown_test_mask(
                shown, everyone.select(USER, TIME), everyone["test"]
            )
            carved = shown_sides(shown, rest.select(USER, TIME), rest["validation"])
        carved = carved & ~later
        train = shown.filter(~later & ~carved)
        if vocabularies is not None:
            users = vocabularies.users.transform(train[USER])
            items = vocabularies.items.transform(train[ITEM])
            known = (users > 0) & (items > 0)
            train = pl.DataFrame(
                {
                    "user_idx": users[known].astype(np.int32),
                    "item_idx": items[known].astype(np.int32),
                }
            )
        parts[0].append(train)
        parts[1].append(shown.filter(carved))
        parts[2].append(shown.filter(later))
    return ShownRows(*(pl.concat(p) for p in parts))


def _of_users(shown: pl.DataFrame, held: Dataset) -> pl.DataFrame:
    """The shown rows of the users a held-out side reads (``data.test_users``
    may have sampled them), with its ID types."""
    users = held.interactions[USER]
    rows = held.interactions
    return shown.filter(pl.col(USER).is_in(users.implode())).cast(
        {USER: users.dtype, ITEM: rows[ITEM].dtype, TIME: rows[TIME].dtype}
    )


def _empty_log(path: str | Path, data: DataConfig) -> pl.DataFrame:
    """The dataset's columns and dtypes (its first file's; a struct's fields by
    their paths, the user, item, time and rating columns by our names), without
    rows."""
    from twostage.data.streaming import empty_frame

    reading = Reading.of(data)
    return empty_frame(path, _columns(path, data), reading)


def _columns(path: str | Path, data: DataConfig) -> list[str]:
    """The columns of the dataset's first file (a struct's fields by their
    paths, as the in-memory loader names them; the user, item, time and rating
    columns by ours, whatever the log calls them: ``data.user_col``...)."""
    from twostage.data.streaming import fields_of

    return list(fields_of(parquet_files(path)[0], Reading.of(data)))


def _gathered(values: np.ndarray) -> np.ndarray:
    """Every rank's ``values``, concatenated in rank order."""
    sizes = distributed.gather_sizes(len(values))
    return distributed.gather_rows(torch.from_numpy(values), sizes).numpy()


def _file_order(group_rows: list[int], size: int) -> np.ndarray:
    """Positions, in the ranks' concatenated rows, of the rows in file order: rank
    ``r`` read row groups ``r, r + size, ...`` and holds ``group_rows`` rows of each."""
    lengths = _gathered(np.asarray(group_rows, dtype=np.int64))
    counts = distributed.gather_sizes(len(group_rows))  # row groups per rank
    firsts = np.cumsum([0, *counts])[:-1]  # each rank's first group in `lengths`
    starts = np.cumsum(np.concatenate([[0], lengths]))[:-1]  # each group's first row
    spans = []
    for number in range(sum(counts)):  # row group `number` of the dataset
        where = firsts[number % size] + number // size
        spans.append(np.arange(starts[where], starts[where] + lengths[where]))
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


@dataclass
class _Streamed:
    """One streamed training of the retrieval stage, with what the ranker needs."""

    run: RetrievalRun
    #: The second pass's training rows (the tensors the towers trained on).
    rows: StreamedRows
    #: Every validation row (None without a carve-out), and the sample scored.
    validation: Dataset | None
    sample: Dataset | None
    fitted: StreamingVocabularies
    user_table: pl.DataFrame | None
    item_table: pl.DataFrame | None

    def test_side(self, path: str | Path) -> Dataset:
        """The log's test side, read with the split this training applied."""
        return _test_side(self.run, path, self.fitted, self.user_table, self.item_table)


def fit_streamed_retrieval(
    config: ExperimentConfig,
    path: str | Path,
    *,
    out_dir: str | Path | None = None,
    on_step: ProgressFn | None = None,
    evaluate_test: bool = True,
    resume: bool = False,
    allow_config_change: bool = False,
) -> RetrievalRun:
    """Train the two ID towers (with the users' history when
    ``retrieval.history_length`` > 0) on the training side of a Parquet log.

    Args:
        config: ``data.split`` (random, temporal or leave-last-out),
            ``test_fraction`` and ``seed`` choose the training rows row by row;
            ``validation_fraction`` carves the validation rows out of them.
        path: a Parquet file or directory with ``user_id``, ``item_id`` and
            ``timestamp``.
        out_dir: where the run is saved (servable like ``twostage train retrieval``'s),
            and its checkpoints while it trains. Under torchrun each rank reads its
            own row groups in both passes (the counts merge; the training rows are
            then gathered to every rank, in file order), trains on its share of
            each global batch, and rank 0 saves: the weights of a single process.
        on_step: progress callback of the training loop.
        evaluate_test: read the test side (one more pass; its rows are held) and
            store the full-catalogue metrics in ``run.metrics``, on
            ``data.test_users`` of the test users when that is set (every one
            otherwise: at millions of users, set it). Under torchrun the ranks
            share the users.
        resume: continue from the checkpoint in ``out_dir`` (the passes run again:
            they find the same training rows, which the checkpoint's digest of them
            checks).
        allow_config_change: resume although the settings differ from the
            checkpoint's (beyond epochs, threads, device and how often to
            checkpoint).

    Raises:
        ConfigError: the config asks for something the streamed path lacks.
    """
    if out_dir is not None:
        refuse_foreign_target(out_dir)  # before the passes, not at the save
    streamed = _fit_streamed(
        config,
        path,
        on_step=on_step,
        checkpoint_dir=None if out_dir is None else Path(out_dir),
        resume=resume,
        allow_config_change=allow_config_change,
    )
    run = streamed.run
    if evaluate_test:
        run.metrics = _evaluate(run, streamed.test_side(path))
    if out_dir is not None and distributed.is_main():
        run.save(out_dir)
        if streamed.item_table is not None:  # what `twostage recommend RUN` shows
            streamed.item_table.write_parquet(Path(out_dir) / "items.parquet")
    return run


def fit_streamed_two_stage(
    config: ExperimentConfig,
    path: str | Path,
    *,
    ranking: bool = True,
    on_step: ProgressFn | None = None,
    on_ranking_step: ProgressFn | None = None,
    evaluate_test: bool = True,
    work_dir: str | Path | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
) -> TwoStage:
    """:func:`twostage.two_stage.fit_two_stage` on a Parquet log that is never
    loaded as a table: the retrieval stage as :func:`fit_streamed_retrieval` trains
    it, then the ranker on the same training rows (their indices and ratings, kept
    by the second pass: 4 more bytes per row), validated on the same carve-out
    (early stopping, the blend weight; ``data.test_users`` of its users), and both
    stages measured on the test side.

    The returned split's ``fit`` holds no rows (they stayed in the log), only the
    feature tables; ``validation`` and ``test`` hold the rows that were read.
    ``work_dir``, ``resume`` and ``allow_config_change`` are
    :func:`~twostage.two_stage.fit_two_stage`'s: the stages' checkpoints go to
    ``work_dir/retrieval`` and ``work_dir/ranking``.

    Raises:
        ConfigError: the config asks for something the streamed path lacks.
        DataError: ``ranking.rating_weight`` > 0 on a log without ratings.
    """
    import dataclasses

    from twostage.data.split import ExperimentSplit
    from twostage.ranking.evaluation import evaluate_ranking
    from twostage.ranking.fit import fit_ranking_pairs
    from twostage.two_stage import TwoStage

    work = Path(work_dir) if work_dir is not None else None
    warm_from = None
    if config.train.warm_start:  # loaded once for both stages
        from twostage.training.warm import load_warm_start

        warm_from = load_warm_start(config.train.warm_start)
    streamed = _fit_streamed(
        config,
        path,
        on_step=on_step,
        checkpoint_dir=None if work is None else work / "retrieval",
        resume=resume,
        allow_config_change=allow_config_change,
        warm_from=warm_from,
    )
    run, rows = streamed.run, streamed.rows
    test = Dataset(
        name="test",
        interactions=_empty_log(path, config.data).select(USER, ITEM, TIME),
        users=streamed.user_table,
        items=streamed.item_table,
    )
    if evaluate_test:
        test = streamed.test_side(path)
        run.metrics = _evaluate(run, test)
    fit = test.with_interactions(test.interactions.head(0))
    split = ExperimentSplit(fit=fit, validation=streamed.validation, test=test)
    result = TwoStage(retrieval=run, ranker=None, split=split)
    if not ranking:
        return result
    shown_pairs = None
    validation = streamed.sample
    if config.data.label_col:
        # An impression log: the rows shown and not chosen, on their sides of the
        # split, are the ranker's click negatives, its early stopping's and the
        # test's shown_auc, as in memory.
        shown = streamed_shown(
            path,
            _split_rule(path, config, streamed.fitted),
            config.data,
            vocabularies=streamed.fitted,
        )
        shown_pairs = (
            torch.from_numpy(shown.train["user_idx"].to_numpy().astype(np.int64)),
            torch.from_numpy(shown.train["item_idx"].to_numpy().astype(np.int64)),
        )
        if validation is not None:
            validation = validation.with_shown(_of_users(shown.validation, validation))
        test = test.with_shown(_of_users(shown.test, test))
        result.split = ExperimentSplit(
            fit=fit, validation=streamed.validation, test=test
        )
    ranker_dir = None if work is None else work / "ranking"
    tables = rows.tensors
    ratings = rows.ratings
    if not ratings.size:  # no rating column: clicks only
        ratings = np.full(len(tables.users), np.nan, dtype=np.float32)
    result.ranker = fit_ranking_pairs(
        run,
        (tables.users, tables.items, torch.from_numpy(ratings)),
        # the ranker's tables, as in memory: the training rows' history and seen
        # items, without the retrieval batches' weights and context
        dataclasses.replace(tables, weights=None, context={}),
        weights=torch.from_numpy(rows.weights) if config.data.weight_col else None,
        served=lambda: run.tensors,
        shown=shown_pairs,
        # each training row's own context, as the towers read it
        context=(tables.context or None) if config.ranking.use_context else None,
        config=config.ranking,
        validation=validation,
        checkpoint_dir=ranker_dir,
        resume=resume
        and ranker_dir is not None
        and (ranker_dir / "checkpoint").exists(),
        on_step=on_ranking_step,
        allow_config_change=allow_config_change,
        warm_from=warm_from,
    )
    if evaluate_test and test.num_interactions and distributed.is_main():
        result.ranking_metrics = evaluate_ranking(result.ranker, test)
        result.ranker.metrics = result.ranking_metrics  # saved with the bundle
    return result


def _fit_streamed(
    config: ExperimentConfig,
    path: str | Path,
    *,
    on_step: ProgressFn | None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
    warm_from: Recommender | None = None,
) -> _Streamed:
    """The passes, the validation carve-out and the towers' training of
    :func:`fit_streamed_retrieval`, without the test side; checkpoints in
    ``checkpoint_dir``, resumed from there with ``resume``."""
    distributed.init_from_env(config.train.device)  # under torchrun: data-parallel
    _check(config)
    set_threads(config)  # as in memory: the passes and training alike
    started = time.perf_counter()
    data = config.data
    world = distributed.current()
    fitted = fit_vocabularies(  # each rank counts its row groups; the counts merge
        path,
        method=data.split,
        test_fraction=data.test_fraction,
        seed=data.seed,
        validation_fraction=data.validation_fraction,
        rank=world.rank if world is not None else 0,
        world=world.size if world is not None else 1,
        reading=Reading.of(data),
        cold_user_fraction=data.cold_user_fraction,
    )
    held = fitted.num_validation_rows  # not training rows here
    report = fitted.report
    if report is not None and report.num_rejected and not report.rows_loaded:
        raise DataError(
            f"no row of {str(path)!r} was loaded: every row read was rejected. "
            f"{report.summary()}"
        )
    check_split_sizes(
        fitted.num_train_rows,
        fitted.num_test_rows,
        f"streamed {data.split}",
        why_no_training=f" ({held} more went to validation)" if held else "",
    )
    check_validation_choices(config, has_validation=fitted.num_validation_rows > 0)
    warn_exact_term(config, fitted.users.size - 1)  # less the unknown user
    warn_unread_settings(config)
    user_table, item_table = side_tables(
        path, config, fitted.users.values, fitted.items.values
    )
    # No rows: the log's columns (less the feature columns) say which per-row
    # context the model may read, with their dtypes.
    features = {*data.user_features, *data.item_features}
    probe = Dataset(
        name="stream",
        interactions=_empty_log(path, data).select(
            pl.exclude(*features, USER, ITEM, TIME),
            fitted.users.values[:0].alias(USER),
            fitted.items.values[:0].alias(ITEM),
            pl.Series(TIME, [], dtype=pl.Int64),
        ),
        users=user_table,
        items=item_table,
    )
    spec = spec_for(probe, config)
    from_table = set(user_table.columns) if user_table is not None else set()
    wanted = [f.name for f in spec.query if f.name != USER and f.name not in from_table]
    context = None
    if wanted:  # one more pass: the training rows' context values, counted
        context = count_values(
            path,
            _split_rule(path, config, fitted),
            wanted,
            rank=world.rank if world is not None else 0,
            world=world.size if world is not None else 1,
            reading=Reading.of(config.data),
        )
    spec = spec.fit_streamed(
        users=fitted.users,
        items=fitted.items,
        user_table=user_table,
        item_table=item_table,
        context=context,
    )
    rows = streamed_tensors(
        path, fitted, config, spec=spec, user_table=user_table, item_table=item_table
    )
    tensors = rows.tensors
    logger.info(
        "streamed %d training rows, %d validation rows (%d users, %d items) in %.1f s",
        fitted.num_train_rows,
        fitted.num_validation_rows,
        fitted.users.size - 1,
        fitted.items.size - 1,
        time.perf_counter() - started,
    )
    validation = sample = None
    if fitted.num_validation_rows:  # early stopping and the fallback's threshold
        assert fitted.rule is not None
        validation = _held_out(
            spec, config, path, fitted.rule, "validation", user_table, item_table
        )
        sample = _sampled(spec, config, validation)

    def training_rows() -> TimedRows:  # what a `transition` member reads
        return TimedRows(
            users=tensors.users.numpy(),
            items=tensors.items.numpy(),
            times=rows.times,
            num_users=fitted.users.size,
        )

    run, members, validate = train_members(
        config,
        spec,
        tensors,
        validation=sample,
        rows=training_rows,
        checkpoints=checkpoint_dir,
        resume=resume,
        on_step=on_step,
        allow_config_change=allow_config_change,
        warm_from=warm_from,
    )
    run.load_report = fitted.report.to_dict() if fitted.report is not None else None
    run.stream_rows = {
        "training": fitted.num_train_rows,
        "validation": fitted.num_validation_rows,
        "test": fitted.num_test_rows,
    }
    choose_on_validation(run, validate)
    if validation is not None:
        # At inference the validation rows are history like any other training
        # row, as in memory: all of them, not only the sampled users'.
        run.tensors = _with_validation_rows(
            run, fitted, validation, rows.times, rows.ratings
        )
        # The closed-form members are refitted on those rows too, as in memory.
        carved = validation.interactions
        every_row = TimedRows(  # with the carve-out after the training rows
            users=np.concatenate(
                [tensors.users.numpy(), fitted.users.transform(carved[USER])]
            ),
            items=np.concatenate(
                [tensors.items.numpy(), fitted.items.transform(carved[ITEM])]
            ),
            times=np.concatenate([rows.times, carved[TIME].to_numpy()]),
            num_users=fitted.users.size,
        )
        for kind, model in closed_form_members(members):
            fit_closed_form(model, kind, config, run.tensors, every_row)
    # Its test side is the stream's split, which `twostage evaluate` must reuse (the
    # in-memory split of the same log holds out other rows): saved with the run.
    run.stream = str(Path(path).resolve())
    return _Streamed(
        run=run,
        rows=rows,
        validation=validation,
        sample=sample,
        fitted=fitted,
        user_table=user_table,
        item_table=item_table,
    )
