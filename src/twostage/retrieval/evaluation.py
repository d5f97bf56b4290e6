"""Evaluating the retrieval stage: a test split as queries over a run's vocabularies,
the run and the baselines scored over the whole catalogue, and a saved run evaluated
again on its own test split (``twostage evaluate DIR``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from twostage.config import DataConfig
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.data.registry import FIT_TABLES, load_dataset_for
from twostage.data.split import ExperimentSplit, prepare_split
from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError, TwostageError, clause
from twostage.evaluate import EvalResult, evaluate_embeddings, evaluate_scores
from twostage.features.context import add_context_columns
from twostage.retrieval.run import RetrievalRun, load_run
from twostage.retrieval.tensors import (
    PriorHistory,
    RetrievalTensors,
    TimedRows,
    context_keys,
    timed_rows,
)

__all__ = [
    "BY_POPULARITY",
    "EvalQueries",
    "baseline_makers",
    "evaluate_baselines",
    "evaluate_on",
    "evaluate_models",
    "evaluate_run_embeddings",
    "evaluate_saved",
    "fitted_baselines",
    "rebuild_split",
    "check_rebuilt",
    "with_training_tables",
    "rebuild_test_split",
    "eval_queries",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalQueries:
    """A test split turned into evaluation inputs over the run's vocabularies.

    A test item the model never saw in training cannot be ranked, but it is relevant:
    each distinct one gets its own index past the vocabulary (``N``, ``N + 1``, ...),
    so that a user with three unseen test items counts three misses, not one. The
    evaluated catalogue is therefore ``num_items = N + num_cold_items`` wide, and
    :meth:`pad_items` / :meth:`pad_scores` widen the model's ``[N, ...]`` outputs
    with rows that are never valid.
    """

    user_ids: pl.Series  # [Q] raw IDs of the test users
    user_idx: np.ndarray  # [Q] their vocabulary indices (0: unknown, cold)
    relevant: UserItems  # test items per query
    seen: UserItems  # training items per query
    valid_items: np.ndarray  # [num_items] bool, False for the OOV row and cold items
    slices: dict[str, np.ndarray] | None
    item_slices: dict[str, np.ndarray]
    num_cold_items: int = 0  # distinct test items unknown to the model
    # Those items' IDs as text, in index order (``N``, ``N + 1``, ...).
    cold_item_ids: tuple[str, ...] = ()
    context: pl.DataFrame | None = None  # [Q] each query's context columns, if any
    # The prior rows (`Dataset.prior`) of the queries whose user is new, if any.
    prior: PriorHistory | None = None

    def reads_prior(self) -> np.ndarray:
        """``[Q]`` bool: the queries of a new user with a prior item the model
        knows, answered from that history as a session is (never the popularity
        fallback) and with those items excluded as seen."""
        if self.prior is None:
            return np.zeros(len(self.user_idx), dtype=bool)
        return self.prior.lengths() > 0

    def embeddings(self, run: RetrievalRun, users: pl.DataFrame | None) -> torch.Tensor:
        """``[Q, D]`` the queries' embeddings (:meth:`RetrievalRun.query_embeddings`:
        unknown users from their row of ``users``, a new user with prior rows
        from the latest ``history_length`` of them)."""
        history = None
        if self.prior is not None:
            everyone = np.arange(len(self.user_idx))
            history = self.prior.padded(everyone, int(run.tensors.history.shape[1]))
        return run.query_embeddings(
            self.user_ids, users=users, context=self.context, history=history
        )

    @property
    def num_items(self) -> int:
        return int(self.valid_items.size)

    def pad_items(self, items: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` item embeddings -> ``[num_items, D]`` (zero rows for cold items)."""
        return torch.nn.functional.pad(items, (0, 0, 0, self.num_cold_items))

    def pad_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` scores -> ``[B, num_items]`` (zeros for cold items, never
        valid); ``scores`` themselves where there are none (a copy would be a
        fresh block of a large catalogue each time, its pages faulted in anew)."""
        if not self.num_cold_items:
            return scores
        return torch.nn.functional.pad(scores, (0, self.num_cold_items))


def eval_queries(run: RetrievalRun, test: Dataset) -> EvalQueries:
    """One query per test user (relevant: their test items), or, for a model that
    reads per-interaction context, one query per test interaction with its context
    (relevant: its item); seen = the user's training items. A user the model never
    trained on with rows in ``test.prior`` (what they did before the test's
    period: a MIND test file's click histories) reads those as their history,
    and they are seen."""
    user_vocab, item_vocab = run.spec.vocabulary(USER), run.spec.vocabulary(ITEM)
    inter = test.interactions
    keys = context_keys(run.spec)
    context = None
    if keys:
        inter = add_context_columns(test, keys).interactions
        user_ids = inter[USER]
        rows_arr = pl.Series(np.arange(len(inter)))
        context = inter.select([c for c in inter.columns if c in keys])
    else:
        user_ids = inter[USER].unique().sort()
        position = user_ids.to_frame().with_row_index("q")
        rows_arr = inter.select(USER).join(
            position, on=USER, how="left", maintain_order="left"
        )["q"]
    items = item_vocab.transform(inter[ITEM])
    # Each distinct unknown test item gets its own index past the vocabulary.
    unknown = items == 0
    cold_ids = inter[ITEM].filter(pl.Series(unknown))
    cold_names, cold_index = np.unique(
        cold_ids.cast(pl.String).to_numpy(), return_inverse=True
    )
    num_cold = int(cold_index.max()) + 1 if cold_index.size else 0
    items[unknown] = item_vocab.size + cold_index
    relevant = UserItems.from_pairs(
        rows_arr.to_numpy().astype(np.int64), items, num_rows=len(user_ids)
    )
    user_idx = user_vocab.transform(user_ids)
    num_items = item_vocab.size + num_cold
    valid = np.ones(num_items, dtype=bool)
    valid[0] = False
    valid[item_vocab.size :] = False
    cold = user_idx == 0
    cold_items = ~valid  # the OOV row and every test item unknown to the model
    seen = _seen_of(run.tensors, user_idx)
    slices = {"warm_users": ~cold, "cold_users": cold} if cold.any() else None
    prior = None
    if test.prior is not None and test.prior.height and cold.any():
        prior = PriorHistory.of(run.spec, user_ids, test.prior, reads=cold)
        if prior.items.size and slices is not None:
            seen = seen.union(prior.seen())
            slices["cold_users_with_history"] = prior.lengths() > 0
        else:
            prior = None
    return EvalQueries(
        user_ids=user_ids,
        user_idx=user_idx,
        relevant=relevant,
        seen=seen,
        valid_items=valid,
        slices=slices,
        item_slices={"cold_items": cold_items},
        num_cold_items=num_cold,
        cold_item_ids=tuple(str(name) for name in cold_names),
        context=context,
        prior=prior,
    )


def check_test_rows(test: Dataset) -> None:
    """A test table without rows has no figures: say so, before a tensor of no
    users fails to reshape."""
    if not test.num_interactions:
        raise DataError(
            "the test table has no rows, so there is nothing to evaluate. Pass the "
            "held-out interactions (user, item and the columns fit read)."
        )


def evaluate_run_embeddings(
    run: RetrievalRun,
    test: Dataset,
    *,
    ks: tuple[int, ...],
    shard: bool = False,
    keep_queries: bool = False,
) -> EvalResult:
    """Evaluate the two towers over the whole catalogue (both seen-item modes), with
    the run's popularity fallback applied as serving applies it (the users it covers
    are also reported as the ``popularity_fallback_users`` slice), and the
    session-kNN term added when the run has one. ``shard``: each
    rank of a torch.distributed group scores its share of the users;
    ``keep_queries``: keep each query's figures (:attr:`EvalResult.queries`)."""
    check_test_rows(test)
    queries = eval_queries(run, test)
    prior = queries.prior
    query_emb = queries.embeddings(run, test.users)
    item_emb = queries.pad_items(run.item_embeddings())
    popular = run.uses_popularity(queries.user_idx) & ~queries.reads_prior()
    if not popular.any() and not run.scores_exactly:
        return evaluate_embeddings(
            query_emb,
            item_emb,
            relevant=queries.relevant,
            seen=queries.seen,
            ks=ks,
            exclude_seen="both",
            valid_items=queries.valid_items,
            slices=queries.slices,
            item_slices=queries.item_slices,
            shard=shard,
            keep_queries=keep_queries,
        )
    fallback_scores = run.tensors.fallback_popularity[None, :]
    popularity = queries.pad_scores(fallback_scores)[0]  # [num_items]
    fallback = torch.from_numpy(popular)
    user_idx = torch.from_numpy(queries.user_idx)

    def score(rows: torch.Tensor) -> torch.Tensor:
        scores = query_emb[rows] @ item_emb.T  # (B, D) @ (D, N) -> (B, N)
        if run.scores_exactly:
            sessions = None
            if prior is not None:  # a new user's prior items, as a session's
                length = run.config.retrieval.session_knn_length
                sessions = prior.padded(np.asarray(rows), length)[0]
            term = run.neighbour_term(user_idx[rows], sessions=sessions)
            scores += queries.pad_scores(term)
        scores[fallback[rows]] = popularity
        return scores

    slices = queries.slices
    if popular.any():
        slices = {**(slices or {}), "popularity_fallback_users": popular}
    return evaluate_scores(
        score,
        num_items=queries.num_items,
        queries=np.arange(len(popular)),
        relevant=queries.relevant,
        seen=queries.seen,
        ks=ks,
        exclude_seen="both",
        valid_items=queries.valid_items,
        slices=slices,
        item_slices=queries.item_slices,
        shard=shard,
        keep_queries=keep_queries,
    )


#: The baselines that rank by popularity alone: a user with nothing to read gets
#: their own list anyway, where the others get the run's most-popular one.
BY_POPULARITY = ("popularity", "recent-popularity")


def baseline_makers(
    run: RetrievalRun, train: Dataset | TimedRows | None = None
) -> dict[str, Callable[[], Any]]:
    """``{name: make}``: each baseline fitted on the run's training data when
    ``make()`` is called (one at a time, so a large catalogue holds one model's
    matrices at once): popularity, EASE and item-kNN on the run's training items;
    given the ``train`` rows with their times (a table, or :class:`TimedRows`, as
    a streamed run reads them: :func:`~twostage.retrieval.streamed.streamed_training_rows`),
    recent popularity and the ordered
    baselines (transitions, session-kNN, EASE read in time order) on every
    training row in time order; without them, the ordered ones on the run's
    recent items when it keeps more than one a user. A ``make()`` that cannot
    fit on this log (recent popularity without a time column) raises
    :class:`ConfigError` saying why."""
    from twostage.baselines import (
        BASELINES,
        RecencyEASE,
        RecentPopularity,
        SessionKNN,
        Transition,
    )

    num_items = run.spec.vocabulary(ITEM).size
    seen = run.tensors.seen()

    def fitted(cls: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: cls().fit(seen, num_items=num_items)

    makers = {name: fitted(cls) for name, cls in BASELINES.items()}
    if train is not None:
        rows = train if isinstance(train, TimedRows) else timed_rows(run.spec, train)
        items, times = rows.items, rows.times

        def recent() -> Any:
            model = RecentPopularity()
            if not rows.has_time:  # its `timestamp` is the row order
                raise ConfigError(
                    f"it counts the last {model.days:g} days of training rows, and "
                    "the log has no time column"
                )
            return model.fit_log(items, times, num_items=num_items)

        makers[RecentPopularity.name] = recent
        users, num_users = rows.users, rows.num_users
        # The rows of users the run does not know (a temporal split's validation
        # rows of new users) would all read as user 0's: one sequence of many
        # users' rows, scored for every new test user. They are left out, as the
        # run leaves them out of its histories.
        known = users > 0

        def from_log(make: Callable[[], Any]) -> Callable[[], Any]:
            return lambda: make().fit_log(
                users[known],
                items[known],
                times[known],
                num_users=num_users,
                num_items=num_items,
            )

        for kind in (Transition, RecencyEASE):
            makers[kind.name] = from_log(kind)
        makers[SessionKNN.name] = from_log(lambda: session_knn_baseline(num_users))
    elif run.tensors.history.shape[1] > 1:

        def from_table(cls: Any) -> Callable[[], Any]:
            return lambda: cls().fit_sequences(run.tensors.history, num_items=num_items)

        for ordered in (Transition, SessionKNN, RecencyEASE):
            makers[ordered.name] = from_table(ordered)
    return makers


def session_knn_baseline(num_users: int) -> Any:
    """The session-kNN baseline for a log of ``num_users`` users: exact (every
    user a candidate neighbour) below
    :data:`~twostage.models.session_knn.EXACT_TERM_USERS`; from there, where each
    query would cost tens of milliseconds, its candidates are the
    :data:`~twostage.models.session_knn.SCALE_SAMPLE` latest active users sharing
    an item, as the published V-SKNN samples them by default (logged)."""
    from twostage.baselines import SessionKNN
    from twostage.models import session_knn

    if num_users < session_knn.EXACT_TERM_USERS:
        return SessionKNN()
    logger.info(
        "session-kNN baseline: %d users, so each query's candidate neighbours are "
        "the %d latest active users sharing one of its items (V-SKNN's default "
        "sample), not every user.",
        num_users,
        session_knn.SCALE_SAMPLE,
    )
    return SessionKNN(sample=session_knn.SCALE_SAMPLE)


def evaluate_baselines(
    run: RetrievalRun,
    test: Dataset,
    *,
    ks: tuple[int, ...] = (1, 5, 10, 50, 100),
    names: tuple[str, ...] | None = None,
    train: Dataset | TimedRows | None = None,
    keep_queries: bool = False,
) -> dict[str, EvalResult]:
    """The baselines (or the ``names`` among them) on the run's own training data and
    test split: popularity, EASE, item-kNN and, given the ``train`` rows with their
    times, recent popularity, the item-to-item transition model, the
    sequence-aware user neighbourhood (session-kNN; sampled on large logs, see
    :func:`session_knn_baseline`) and EASE read in time order
    (``ease-recency``) (the last three on every training row in time order;
    without ``train``, on the run's recent items when it keeps more than one a
    user, so then they depend on ``retrieval.history_length``). A test user new to
    the model with rows in ``test.prior`` is scored from all of them
    (``score_sequences``), where the run reads its latest ``history_length``. A
    test user the run does not know and who has no prior rows gets the run's
    most-popular list (what its fallback serves: recent popularity with
    ``retrieval.popularity_days``) from every baseline that reads a user's items,
    where each would score nothing. ``keep_queries``: keep each query's
    figures (:attr:`EvalResult.queries`), row for row those of
    :meth:`RetrievalRun.evaluate` on the same ``test``."""
    from twostage.baselines import (
        BASELINES,
        RecencyEASE,
        RecentPopularity,
        SessionKNN,
        Transition,
    )

    queries = eval_queries(run, test)
    user_idx = torch.from_numpy(queries.user_idx)
    makers = baseline_makers(run, train)
    if names is not None:
        every = [
            *BASELINES,
            RecentPopularity.name,
            *(m.name for m in (Transition, SessionKNN, RecencyEASE)),
        ]
        unknown = [n for n in names if n not in every]
        if unknown:
            raise ConfigError(
                f"`names` holds unknown baselines {unknown}; they are {every}."
            )
        missing = [n for n in names if n not in makers]
        if missing:
            raise ConfigError(
                f"the baselines {missing} read the training rows in time order: pass "
                "`train=` (the run keeps too short a history to fit them from it)."
            )
    results: dict[str, EvalResult] = {}
    reading = queries.reads_prior()
    # A user with no row the baseline could read (new to the run, no prior rows)
    # gets the run's most-popular list, as the run's fallback serves one, not a
    # row of zeros in catalogue order.
    nothing_read = torch.from_numpy((queries.user_idx == 0) & ~reading)
    popular = run.tensors.fallback_popularity.to(torch.float32)

    def scorer(model: Any, by_history: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def score(rows: torch.Tensor) -> torch.Tensor:
            scores = model.score(user_idx[rows])
            if queries.prior is not None:  # new users: their prior items, in full
                picked = np.asarray(rows)
                read = reading[picked]
                if read.any():
                    sessions, _ = queries.prior.padded(picked[read])
                    scores[torch.from_numpy(read)] = model.score_sequences(sessions)
            new = nothing_read[rows]
            if by_history and new.any():
                scores[new] = popular.to(scores.dtype)
            return queries.pad_scores(scores)

        return score

    for name, model in fitted_baselines(makers, names):
        results[name] = evaluate_scores(
            scorer(model, by_history=name not in BY_POPULARITY),
            num_items=queries.num_items,
            queries=np.arange(len(user_idx)),
            relevant=queries.relevant,
            seen=queries.seen,
            ks=ks,
            exclude_seen="both",
            valid_items=queries.valid_items,
            slices=queries.slices,
            item_slices=queries.item_slices,
            keep_queries=keep_queries,
        )
    return results


def fitted_baselines(
    makers: dict[str, Callable[[], Any]], names: tuple[str, ...] | None = None
) -> Iterator[tuple[str, Any]]:
    """``(name, model)`` of each of :func:`baseline_makers`' baselines (or of the
    ``names`` among them), fitted as it comes; one that cannot fit on this log
    is skipped with a warning saying why."""
    for name, make in makers.items():
        if names is not None and name not in names:
            continue
        try:
            model = make()
        except ConfigError as e:
            logger.warning("skipping baseline %s: %s", name, e)
            continue
        yield name, model


def _seen_of(tensors: RetrievalTensors, query_idx: np.ndarray) -> UserItems:
    """The training items of each query's user (none for unknown users)."""
    seen = tensors.seen()
    # Rows past the end come back empty: unknown users (index 0) have no history.
    return seen.take(np.where(query_idx == 0, seen.num_rows, query_idx))


def rebuild_test_split(
    run: RetrievalRun, *, source: str | Path | None = None
) -> Dataset:
    """The test split a saved run was evaluated on: :func:`rebuild_split`'s test."""
    return rebuild_split(run, source=source).test


def rebuild_split(
    run: RetrievalRun, *, source: str | Path | None = None
) -> ExperimentSplit:
    """The split a saved run was trained and evaluated on, rebuilt from its saved
    config (the training rows are what the baselines fit on).

    The saved config names the dataset (``data.dataset`` and the column mapping) and
    the split (``data.split``, ``test_fraction``, ``seed``, ``cold_user_fraction``);
    :func:`prepare_split` on the same data gives the same test rows.

    Args:
        run: a trained or reloaded run.
        source: where the run was loaded from, for the error message.

    Raises:
        DataError: the dataset named in the config cannot be loaded here.
    """
    try:
        dataset = load_dataset_for(run.config)
    except (TwostageError, OSError) as e:
        if run.config.data.dataset == FIT_TABLES:  # its message says what to do
            raise
        where = f" of {str(source)!r}" if source is not None else ""
        raise DataError(
            f"cannot rebuild the test split{where}: its config names "
            f"data.dataset = {run.config.data.dataset!r}, which cannot be loaded "
            f"here ({clause(e)}). Make that dataset available at the same name or path "
            "(built-in data: `twostage data fetch NAME`), then evaluate again."
        ) from e
    split = prepare_split(dataset, run.config)
    check_rebuilt(run, split)
    return split


def check_rebuilt(run: RetrievalRun, split: ExperimentSplit) -> None:
    """Refuse a rebuilt split whose training rows are not the run's: the file at
    ``data.dataset`` changed since training, or the run was fitted on other data
    under that name (a run given a Dataset in Python keeps the config's default
    name). Its figures would be another log's, without a word.

    The run's ID vocabularies are its fingerprint: their counts sum to its
    training rows, and they hold its distinct users and items.

    Raises:
        DataError: the counts differ.
    """
    users, items = run.spec.vocabulary(USER), run.spec.vocabulary(ITEM)
    if any(v.min_count != 1 or v.max_size is not None for v in (users, items)):
        return  # IDs left out of a vocabulary: no exact fingerprint
    fit = split.fit.interactions
    trained = (int(users.counts.sum()), len(users.values), len(items.values))
    rebuilt = (fit.height, fit[USER].n_unique(), fit[ITEM].n_unique())
    if trained != rebuilt:
        raise DataError(
            f"the split rebuilt from data.dataset = {run.config.data.dataset!r} is "
            f"not the one this run trained on: {rebuilt[0]:,} training rows of "
            f"{rebuilt[1]:,} users and {rebuilt[2]:,} items, where the run trained "
            f"on {trained[0]:,} rows of {trained[1]:,} users and {trained[2]:,} items. "
            "The data at that name or path changed since training, or the run was "
            "fitted on other data: measure it on rows you give (`twostage evaluate "
            "BUNDLE --test FILE`)."
        )


def read_test_log(run: RetrievalRun, path: str | Path) -> Dataset:
    """A log of held-out rows (a later week, say) read as the run's training log was
    read (its saved column mapping and feature columns), its IDs typed as the run's
    vocabularies hold them, for :func:`evaluate_on`. Users and items the run never
    saw are kept: cold starts, and misses no list can hold.

    Raises:
        DataError: the file cannot be read so, every row is rejected, or an ID
            column cannot take the run's ID type.
    """
    from twostage.data.registry import load_mapped
    from twostage.data.split import check_not_empty
    from twostage.data.tables import with_names_if_headerless

    data = run.config.data
    try:
        if str(path).lower().startswith("mind:"):  # MIND's own protocol: dev file
            from twostage.data.mind import read_mind

            # Its histories are clicks from before its period, not test events:
            # kept apart (`prior`), the history of users new to the model.
            test = read_mind(str(path).partition(":")[2], history=False)
        else:
            data = _split_file_names(path, data)
            test = with_names_if_headerless(
                path,
                data.column_names,
                lambda names: load_mapped(
                    str(path),
                    dataclasses.replace(data, column_names=tuple(names or ())),
                    weights=False,
                ),
            )
    except DataError as e:
        raise DataError(
            f"{str(path)!r} is read as the run's training log was (user column "
            f"{data.user_col or USER!r}, item column {data.item_col or ITEM!r}), and "
            f"that failed: {e}"
        ) from e
    check_not_empty(test)
    test = test.with_unrated(data.unrated_values)
    types = {key: run.spec.vocabulary(key).values.dtype for key in (USER, ITEM)}
    typed = [pl.col(key).cast(dtype) for key, dtype in types.items()]
    try:
        rows = test.interactions.with_columns(typed)
        shown = None if test.shown is None else test.shown.with_columns(typed)
        prior = None if test.prior is None else test.prior.with_columns(typed)
    except pl.exceptions.PolarsError as e:
        raise DataError(
            f"the IDs of {str(path)!r} do not have the run's types "
            f"({types[USER]}, {types[ITEM]}): {clause(e)}"
        ) from e
    test = test.with_interactions(rows).with_shown(shown)
    return with_training_tables(run, dataclasses.replace(test, prior=prior))


def _split_file_names(path: str | Path, data: DataConfig) -> DataConfig:
    """``data``, or with our column names where ``path`` is a Parquet file that
    `twostage data split` wrote of a log whose columns had other names: it holds
    ``user_id`` and ``item_id`` and not the training log's user and item
    columns, so it is read by ours."""
    mapped = (data.user_col or USER, data.item_col or ITEM)
    source = Path(path)
    if mapped == (USER, ITEM) or source.suffix.lower() not in (".parquet", ".pq"):
        return data
    try:
        columns = set(pl.read_parquet_schema(source))
    except (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException):
        return data  # the reader says what is wrong with it
    if {USER, ITEM} <= columns and not set(mapped) <= columns:
        logger.info(
            "%s holds user_id and item_id, not the training log's %s: read by our "
            "column names, as `twostage data split` writes them",
            source,
            " and ".join(repr(c) for c in mapped if c not in columns),
        )
        return dataclasses.replace(
            data, user_col=None, item_col=None, time_col=None, rating_col=None
        )
    return data


def with_training_tables(run: RetrievalRun, test: Dataset) -> Dataset:
    """``test`` with the user table the run trained with where it has none and the
    run's query reads one (rows of a new log carry no feature tables), for the users
    the model never saw; the known ones read the features they trained with.

    Where that table cannot be read (a model fitted on tables given in Python, a
    log moved away), ``test`` is returned as it is: known users keep their
    features, unknown ones are scored without any, and a warning says how many."""
    if not (run.reads_user_table and test.users is None):
        return test
    try:
        users, items = _training_tables(run)
    except (TwostageError, OSError) as e:
        vocab = run.spec.vocabulary(USER)
        test_users = test.interactions[USER].unique()
        unknown = int((vocab.transform(test_users) == 0).sum())
        if unknown:
            why = (
                "it was fitted on tables given in Python, which are not recorded "
                "with it"
                if run.config.data.dataset == FIT_TABLES
                else clause(e)
            )
            logger.warning(
                "%d of %d test users are unknown to the model and are scored "
                "without features: the model's user table is not at hand (%s). "
                "Give the rows their feature columns to score them with theirs.",
                unknown,
                test_users.len(),
                why,
            )
        return test
    return dataclasses.replace(
        test,
        users=users,
        items=test.items if test.items is not None else items,
    )


def _training_tables(run: RetrievalRun) -> tuple[pl.DataFrame | None, ...]:
    """The user and item tables the run trained with, read again from its data (a
    log in memory, or the stream it was trained on)."""
    if run.stream is not None:
        from twostage.retrieval.streamed import side_tables

        return side_tables(
            Path(run.stream),
            run.config,
            run.spec.vocabulary(USER).values,
            run.spec.vocabulary(ITEM).values,
        )
    dataset = load_dataset_for(run.config)
    return dataset.users, dataset.items


def evaluate_on(
    run: RetrievalRun,
    test: Dataset,
    *,
    baselines: bool = False,
    train: Dataset | TimedRows | None = None,
) -> dict[str, Any]:
    """``{"twostage": ..., [baseline name: ...]}`` full-catalogue metrics on
    ``test``, as dicts (:func:`evaluate_models`)."""
    found = evaluate_models(run, test, baselines=baselines, train=train)
    return {name: result.to_dict() for name, result in found.items()}


def evaluate_models(
    run: RetrievalRun,
    test: Dataset,
    *,
    baselines: bool = False,
    train: Dataset | TimedRows | None = None,
    keep_queries: bool = False,
) -> dict[str, EvalResult]:
    """``{"twostage": ..., [baseline name: ...]}`` full-catalogue metrics on
    ``test``; the baselines that need the training log's times (recent
    popularity, the transition model from every row) fit on ``train`` when
    given. ``keep_queries``: each result keeps its queries' figures, row for
    row the same queries (:func:`twostage.metrics.paired_standard_error`)."""
    results = {"twostage": run.evaluate(test, keep_queries=keep_queries)}
    if baselines:
        results.update(
            evaluate_baselines(run, test, train=train, keep_queries=keep_queries)
        )
    return results


def evaluate_saved(directory: str | Path, *, baselines: bool = False) -> dict[str, Any]:
    """Reload a run and its data, rebuild the same split, evaluate (and baselines)."""
    run = load_run(directory)
    split = rebuild_split(run, source=directory)
    return evaluate_on(run, split.test, baselines=baselines, train=split.train)
