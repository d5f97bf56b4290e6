"""Choosing settings on a validation protocol, with Optuna's samplers.

The config's own split sets its test rows aside unread (:func:`tuning_data`); each
trial then runs the same protocol on the rows left, so the test side of every trial
is a validation split carved from the training rows, the way the test was carved
from the log. No figure that chooses a setting is measured on the test rows, which
stay for one final measurement of the chosen config (``twostage train --config``).

Each searched setting is a config key with a range or a list of choices::

    result = tune(config, {"retrieval.temperature": "log:0.02..0.5",
                           "retrieval.embedding_dim": "32,64,128"}, trials=20)
    result.config  # the config with the best trial's settings

Optuna (``pip install 'twostage[tune]'``) proposes the trials (its TPE sampler,
seeded); the first trial is the config as given, where its values lie in the
searched ranges, so the table shows what tuning gained over it. With ``storage``
(a file, or a database URL) the trials are kept as they end, and the same call
later goes on where a Ctrl-C, a timeout or a crash stopped it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from twostage.config import KS, ExperimentConfig, apply_overrides, apply_settings
from twostage.config import to_dict as config_dict
from twostage.data.dataset import USER, Dataset
from twostage.errors import ConfigError, DataError, TwostageError, WorkerError

if TYPE_CHECKING:
    from twostage.data.sample import LogSample

__all__ = [
    "STAGES",
    "Param",
    "TuneResult",
    "TuneTrial",
    "parse_metric",
    "parse_space",
    "require_optuna",
    "tune",
    "tuning_data",
]

logger = logging.getLogger(__name__)

#: What a trial trains: retrieval alone, or both stages (its figures are then the
#: served list's, or the ranker's RMSE, MAE or AUC).
STAGES = ("retrieval", "both")
#: Retrieval's list metrics, with seen items excluded (``name@K``).
LIST_METRICS = ("ndcg", "recall", "hit_rate", "mrr", "factorized_top_k", "coverage")
#: The served list's (both stages), ``name@K``.
SERVED_METRICS = ("ndcg", "recall", "hit_rate")
#: The ranker's own figures (both stages), and which way is better.
RANKER_METRICS = {"rmse": "minimize", "mae": "minimize", "auc": "maximize"}


#: Why a search ended: every trial ran, the timeout, every combination of a space
#: of choices ran, or Ctrl-C.
Ended = Literal["trials", "timeout", "combinations", "interrupted"]


@dataclass(frozen=True)
class Param:
    """One searched setting: ``key`` between ``low`` and ``high`` (on a log scale
    when ``log``; whole numbers when ``integer``), or one of ``choices``."""

    key: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        """The range or the choices, as ``--param`` spells them."""
        if self.choices:
            return " | ".join(_shown(c) for c in self.choices)
        scale = "log:" if self.log else ""
        return f"{scale}{_shown(self.low)}..{_shown(self.high)}"


@dataclass
class TuneTrial:
    """One trial: its settings, the metric on the tuning split's test side
    (``value``; None unless ``state`` is ``complete``), its time and, for a
    trial that did not complete (``failed``, ``pruned`` or ``interrupted``), why
    (``error``). A trial whose settings an
    earlier one had is not trained again (the same settings and ``train.seed``
    train the same model): it repeats that trial's outcome, ``repeat_of``."""

    number: int
    params: dict[str, Any]
    value: float | None
    seconds: float
    state: Literal["complete", "failed", "pruned", "interrupted"]
    error: str | None = None
    best_epoch: int | None = None  # retrieval's, counted from 1
    repeat_of: int | None = None  # the earlier trial of the same settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        config: the given config with the best trial's settings; its data and split
            are the given config's, so training it measures the test rows once.
        best: the best completed trial.
        trials: every trial, in the order they ran.
        metric, direction, stage: what was measured and which way is better.
        params: the searched settings.
        tuning_rows: rows the trials split and trained on; ``test_rows``: the rows
            of the config's test side, set aside unread.
        ended: why the search ended: ``trials`` (all ran), ``timeout``,
            ``combinations`` (a space of choices alone, every combination run) or
            ``interrupted`` (Ctrl-C: ``trials`` holds what ran).
        resumed: how many of ``trials`` were read from the ``storage`` (they ran
            in an earlier call).
        sample: for a log in a directory of Parquet files, the users drawn from
            it (:func:`~twostage.data.sample.sample_log_users`); else None.
    """

    config: ExperimentConfig
    best: TuneTrial
    trials: list[TuneTrial]
    metric: str
    direction: str
    stage: str
    params: list[Param]
    tuning_rows: int
    test_rows: int
    ended: Ended = "trials"
    resumed: int = 0
    sample: LogSample | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the settings, every trial and the best config."""
        return {
            "metric": self.metric,
            "direction": self.direction,
            "stage": self.stage,
            "params": {p.key: p.describe() for p in self.params},
            "tuning_rows": self.tuning_rows,
            "test_rows_set_aside": self.test_rows,
            "ended": self.ended,
            "resumed_trials": self.resumed,
            "sample": None
            if self.sample is None
            else {k: v for k, v in self.sample.to_dict().items() if k != "out"},
            "trials": [t.to_dict() for t in self.trials],
            "best": self.best.to_dict(),
            "config": config_dict(self.config),
        }


def tuning_data(dataset: Dataset, config: ExperimentConfig) -> tuple[Dataset, int]:
    """``(rows, test_rows)``: the rows the config's split trains on (training and
    validation rows together), and how many test rows it set aside, cold users'
    included. Those are never read again while tuning."""
    from twostage.data.split import prepare_split

    split = prepare_split(dataset, config)
    return split.train, split.test.num_interactions


def parse_space(
    config: ExperimentConfig, space: Mapping[str, str | Sequence[Any]]
) -> list[Param]:
    """The searched settings of ``space``: each config key maps to a range, text
    ``"LOW..HIGH"`` (``"log:LOW..HIGH"`` on a log scale; whole numbers where the key
    holds an integer), or to its choices, text ``"A,B,C"`` (``"A|B"`` where a
    choice holds commas, e.g. ``retrieval.hidden_dims``) or a list of values.

    Both ends of a range and every choice are checked against the config's own
    rules before any trial trains."""
    if not space:
        raise ConfigError(
            "`space` should name at least one setting to search, e.g. "
            '{"retrieval.temperature": "log:0.02..0.5"}. Received: an empty space.'
        )
    params = []
    for key, spec in space.items():
        key = key.strip() if isinstance(key, str) else key
        hint = _hint(config, key, spec)  # an unknown key fails here, named
        if isinstance(spec, str):
            param = _parse_text(config, key, spec, hint)
        elif isinstance(spec, Sequence):
            values = [_typed(config, key, v) for v in spec]
            param = _choices(key, values, f"{list(spec)!r}")
        else:
            raise ConfigError(
                f"the search space of `{key}` should be text ('LOW..HIGH', "
                f"'log:LOW..HIGH' or 'A,B,C') or a list of choices. Received: {spec!r}."
            )
        params.append(param)
    return params


def _parse_text(config: ExperimentConfig, key: str, spec: str, hint: Any) -> Param:
    text = spec.strip()
    log = text.startswith("log:")
    body = text[4:].strip() if log else text
    if ".." not in body:
        if log:
            raise ConfigError(
                f"`{key}`: 'log:' goes with a range, 'log:LOW..HIGH'. "
                f"Received: {spec!r}."
            )
        separator = "|" if "|" in body else ","
        texts = [part.strip() for part in body.split(separator)]
        values = [_typed(config, key, part, text=True) for part in texts]
        return _choices(key, values, repr(spec))
    low_text, _, high_text = body.partition("..")
    numeric = [a for a in typing.get_args(hint) or (hint,) if a is not type(None)]
    if len(numeric) != 1 or numeric[0] not in (int, float):
        raise ConfigError(
            f"`{key}` is not a number, so it takes choices ('A,B'), not a range. "
            f"Received: {spec!r}."
        )
    integer = numeric[0] is int
    try:
        low, high = (int(t) if integer else float(t) for t in (low_text, high_text))
    except ValueError:
        kind = "whole numbers" if integer else "numbers"
        raise ConfigError(
            f"`{key}`'s range should be two {kind}, 'LOW..HIGH'. Received: {spec!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise ConfigError(
            f"`{key}`'s range should have LOW < HIGH, both finite. Received: {spec!r}."
        )
    if log and low <= 0:
        raise ConfigError(
            f"`{key}`'s log range should start above 0. Received: {spec!r}."
        )
    for end in (low, high):  # the config's own checks (a temperature > 0...)
        apply_settings(config, {key: end})
    return Param(key, low=low, high=high, log=log, integer=integer)


def _choices(key: str, values: list[Any], given: str) -> Param:
    if len(values) < 2:
        raise ConfigError(
            f"`{key}` should have two choices or more to search (a single value is "
            f"set with `--set` or the config). Received: {given}."
        )
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ConfigError(
            f"`{key}`'s choices should differ. Received: {given} "
            f"({_shown(repeated[0])} twice)."
        )
    return Param(key, choices=tuple(values))


def _hint(config: ExperimentConfig, key: str, spec: Any) -> Any:
    """The type of config ``key``; an unknown key raises the config's own error,
    which names the closest known key."""
    *sections, name = key.split(".") if isinstance(key, str) else [""]
    node: Any = config
    for part in sections:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            break
    fields = {f.name for f in dataclasses.fields(node)} if _is_section(node) else set()
    if name not in fields or _is_section(getattr(node, name)):
        given = spec if isinstance(spec, str) else repr(spec)
        apply_overrides(config, [f"{key}={given}"])
        raise ConfigError(f"unknown config key {key!r}.")  # pragma: no cover
    return typing.get_type_hints(type(node))[name]


def _is_section(node: Any) -> bool:
    return dataclasses.is_dataclass(node) and not isinstance(node, type)


def _current(config: ExperimentConfig, key: str) -> Any:
    node: Any = config_dict(config)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _typed(
    config: ExperimentConfig, key: str, value: Any, *, text: bool = False
) -> Any:
    """``value`` as the config holds it (text parsed as an override's)."""
    checked = (
        apply_overrides(config, [f"{key}={value}"])
        if text
        else apply_settings(config, {key: value})
    )
    return _current(checked, key)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def parse_metric(metric: str, stage: str) -> tuple[str, int | None, str]:
    """``(name, K or None, direction)`` of ``"ndcg@10"``, ``"rmse"``...: list
    metrics at one of :data:`twostage.config.KS`; RMSE, MAE and AUC (the ranker's)
    with ``stage="both"``."""
    if stage not in STAGES:
        raise ConfigError(
            f"`stage` should be one of {list(STAGES)}. Received: `stage` = {stage!r}."
        )
    text = metric.strip().lower()
    if text in RANKER_METRICS:
        if stage != "both":
            raise ConfigError(
                f"`metric` {metric!r} is the ranker's: tune both stages "
                "(`stage='both'`, `--stage both`), or tune retrieval on a list "
                "metric such as 'ndcg@10'."
            )
        return text, None, RANKER_METRICS[text]
    name, at, k_text = text.partition("@")
    names = SERVED_METRICS if stage == "both" else LIST_METRICS
    if not at or name not in names or k_text not in {str(k) for k in KS}:
        ranker = f", or {', '.join(RANKER_METRICS)}" if stage == "both" else ""
        raise ConfigError(
            f"`metric` should be NAME@K with NAME one of {list(names)} and K one of "
            f"{list(KS)}{ranker}. Received: `metric` = {metric!r}."
        )
    return name, int(k_text), "maximize"


def tune(
    config: ExperimentConfig,
    space: Mapping[str, str | Sequence[Any]],
    *,
    dataset: Dataset | None = None,
    trials: int = 20,
    metric: str = "ndcg@10",
    stage: str = "retrieval",
    seed: int = 0,
    timeout: float | None = None,
    prune: bool = False,
    on_trial: Callable[[TuneTrial], None] | None = None,
    storage: str | None = None,
    study_name: str = "twostage",
    jobs: int = 1,
    sample_users: int = 0,
) -> TuneResult:
    """Search ``space`` (see :func:`parse_space`) for the settings that do best on
    ``metric``, measured on a validation protocol: the config's split, run on the
    rows its test side leaves (:func:`tuning_data`).

    Args:
        config: every other setting, the data and split included.
        space: ``{"section.key": "LOW..HIGH" | "log:LOW..HIGH" | "A,B" | [A, B]}``.
        dataset: the data; loaded from ``config.data`` when None.
        trials: how many trials to run (fewer when ``timeout`` ends the search),
            counting those read from ``storage``.
        metric: ``NAME@K`` of retrieval's list with seen items excluded (``ndcg``,
            ``recall``, ``hit_rate``, ``mrr``, ``coverage``) or TFRS's
            ``factorized_top_k`` (nothing excluded),
            or with ``stage="both"`` of the served list (``ndcg``, ``recall``,
            ``hit_rate``) or the ranker's ``rmse``, ``mae``, ``auc``.
        stage: ``retrieval`` trains retrieval alone; ``both`` both stages (a
            trial whose settings differ from the last trial's in ``ranking.*``
            alone ranks on that trial's retrieval run, which the same settings
            and seed would train again: a search of the ranker's settings trains
            retrieval once).
        seed: the sampler's seed (each trial trains with ``train.seed``).
        timeout: seconds after which no new trial starts.
        prune: stop a trial after an epoch whose validation figure (retrieval's
            ``train.eval_k`` recall on the trial's own carve-out, which early
            stopping reads) is below the median of the earlier trials' at that
            epoch (Optuna's median pruner: from the 6th trial, after the 2nd
            epoch; not for a ``retrieval.ensemble``, whose members each train).
            With ``stage="both"`` and ``ranking.*`` settings alone in the space,
            the ranker's epochs instead (the figure its early stopping reads).
        on_trial: called with each trial once it ends (not with those read
            from ``storage``).
        storage: keep the trials here as each ends: a file path (Optuna's
            journal file) or a database URL (``sqlite:///tune.db``). A search
            of the same ``study_name`` found there goes on: its trials count
            toward ``trials`` and are not run again (a trial Ctrl-C stopped
            runs again), and the sampler reads them. It must be the same
            search: the same config, data, space, metric and stage, else a
            ``ConfigError`` names what differs. One call at a time (its ``jobs``
            workers share it).
        study_name: the search's name in ``storage`` (one storage can hold
            several).
        jobs: trials to run at once, each in its own process (spawned, each
            with its own copy of the rows) sharing the ``storage`` (a temporary
            file when None); each trains on its share of the CPU cores unless
            ``train.num_threads`` is set. Which trial ends first, and so what
            the sampler has read when it proposes the next, varies from run to
            run, so a search with ``jobs`` > 1 is not repeatable to the digit.
        sample_users: > 0 tunes on the rows of that many of the tuning rows'
            users (those with the smallest stable hash of their ID and
            ``data.seed``: :func:`twostage.data.split.sample_users`), each
            trial splitting and training on them alone: a search on a log too
            large to train once per trial. The test side is set aside from the
            whole log first; 0: every user. A log in a directory of Parquet
            files (one for ``train --stream``) needs it: that many of its
            users are drawn by the same hash one row group at a time
            (:func:`~twostage.data.sample.sample_log_users`), less the rows the
            streamed run of the config holds out as its test side, found over
            the whole log by that run's own split rule, and less the users and
            items the whole log's minimum counts remove.
            A worker that proposes the settings another is training waits
            for that trial and repeats its figure (each worker's sampler also
            counts the running trials as poor, Optuna's ``constant_liar``).

    Returns:
        A :class:`TuneResult`; ``result.config`` is the config to train.

    Raises:
        ConfigError: a bad space, metric or count; or no trial completed (the
            first failure's reason is in the message).
        WorkerError: a worker of ``jobs`` died (killed, out of memory): the
            others are stopped, the trials that ended kept in ``storage``.
    """
    require_optuna()  # missing: the error says how to install it
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(
            f"`trials` should be a positive integer. Received: `trials` = {trials!r}."
        )
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(
            f"`jobs` should be a positive integer. Received: `jobs` = {jobs!r}."
        )
    if timeout is not None and not timeout > 0:
        raise ConfigError(
            f"`timeout` should be > 0 seconds. Received: `timeout` = {timeout!r}."
        )
    if isinstance(sample_users, bool) or not isinstance(sample_users, int):
        raise ConfigError(
            "`sample_users` should be a whole number (0: every user). Received: "
            f"`sample_users` = {sample_users!r}."
        )
    if sample_users < 0:
        raise ConfigError(
            "`sample_users` should be 0 (every user) or positive. Received: "
            f"`sample_users` = {sample_users!r}."
        )
    params = parse_space(config, space)
    name, k, direction = parse_metric(metric, stage)
    if config.data.train_file is not None or config.data.test_file is not None:
        logger.info("tuning on the training file's rows, split by `data.split`")
    sample = None
    if dataset is None and Path(config.data.dataset).is_dir():
        rows, test_rows, sample = _sampled_log(config, sample_users)
    else:
        if dataset is None:
            from twostage.data.registry import load_dataset_for

            dataset = load_dataset_for(config)
        rows, test_rows = tuning_data(dataset, config)
    if sample_users and sample is None:
        from twostage.data.split import sample_users as drawn

        rows = drawn(rows, sample_users, seed=config.data.seed)
    # Each trial splits the tuning rows by `data.split` (the files already split).
    inner = apply_settings(config, {"data.train_file": None, "data.test_file": None})
    pruner = _pruner(prune)
    search = {
        "config": config_dict(config),
        "params": {p.key: p.describe() for p in params},
        "metric": metric.strip().lower(),
        "stage": stage,
        "tuning_rows": rows.num_interactions,
        "test_rows": test_rows,
    }
    with contextlib.ExitStack() as stack:
        stack.callback(_RETRIEVAL.clear)  # no run outlives its search
        _RETRIEVAL.clear()
        if jobs > 1 and storage is None:  # the workers share a journal file
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            storage = str(Path(folder) / "trials.log")
        study, done = _open_study(storage, study_name, search, direction, seed, pruner)
        resumed = len(done)
        start = _start_point(config, params)
        if start is not None and not study.trials:
            study.enqueue_trial(start)
        deadline = None if timeout is None else time.time() + timeout
        # Pruning reads the ranker's epochs where only its settings are searched
        # (retrieval then trains once), else retrieval's.
        ranker = stage == "both" and all(p.key.startswith("ranking.") for p in params)
        measured = (stage, name, k, "ranking" if ranker else "retrieval")

        def emit(record: TuneTrial) -> None:
            done.append(record)
            if on_trial is not None:
                on_trial(record)

        if jobs == 1:
            grants = _Grants(_Counter(len(done)), trials, deadline)
            try:
                ended = _run_trials(
                    study, params, inner, rows, measured, prune, grants, emit
                )
            except KeyboardInterrupt:  # between two trials: the trials that ran stand
                ended = "interrupted"
        else:
            assert storage is not None
            work = _Work(
                storage, study_name, params, _threads(inner, jobs), rows, measured
            )
            ended = _parallel(
                work, prune, seed + len(done), jobs, (len(done), trials, deadline), emit
            )
    done.sort(key=lambda t: t.number)
    complete = [t for t in done if t.state == "complete"]
    if not complete:
        if ended == "interrupted":
            raise KeyboardInterrupt
        reasons = done[0].error if done else "the timeout ended the search first"
        raise ConfigError(f"no trial completed; the first: {reasons}")
    pick = max if direction == "maximize" else min
    best = pick(complete, key=lambda t: typing.cast(float, t.value))
    return TuneResult(
        config=apply_settings(config, best.params),
        best=best,
        trials=done,
        metric=metric.strip().lower(),
        direction=direction,
        stage=stage,
        params=params,
        tuning_rows=rows.num_interactions,
        test_rows=test_rows,
        ended=ended,
        resumed=resumed,
        sample=sample,
    )


def _sampled_log(
    config: ExperimentConfig, users: int
) -> tuple[Dataset, int, LogSample]:
    """``(rows, test_rows, sample)`` for a log in a directory of Parquet files
    (``data.dataset``): the rows of ``users`` of its users
    (:func:`~twostage.data.sample.sample_log_users`, seeded by ``data.seed``),
    read as the config reads a log in memory, less the rows that the streamed
    run of the config (``train --stream``) holds out as its test side, found by
    its own rule over the whole log (:func:`_streamed_test_rows`), and how many
    those are."""
    from twostage.data.registry import load_dataset_for
    from twostage.data.sample import sample_log_users

    log = config.data.dataset
    if not users:
        raise ConfigError(
            f"{log!r} is a directory of Parquet files, a log that `train --stream` "
            "reads one row group at a time; tune reads its log in memory and trains "
            "on it once per trial. Give `sample_users` (--sample-users): the trials "
            "then read that many of its users' rows, drawn one row group at a time."
        )
    with tempfile.TemporaryDirectory() as folder:
        sample = sample_log_users(
            log,
            Path(folder) / "sample.parquet",
            users=users,
            user_col=config.data.user_col or USER,
            seed=config.data.seed,
        )
        logger.info("%s", sample.summary(where=False))
        # The minimum counts are the whole log's (below), not the sample's.
        read = apply_settings(
            config,
            {
                "data.dataset": str(sample.out),
                "data.min_user_rows": 0,
                "data.min_item_rows": 0,
            },
        )
        dataset = _in_log_core(load_dataset_for(read), config)
    rows, test_rows = _without_streamed_test(dataset, config)
    return rows, test_rows, sample


def _in_log_core(dataset: Dataset, config: ExperimentConfig) -> Dataset:
    """``dataset`` (some users' rows of the config's streamed log) less the rows
    of the users and items that the config's minimum counts remove from the
    whole log (:func:`~twostage.data.streaming.min_count_ids`, the k-core the
    streamed run reads), an impression log's shown rows too: a sample's own
    counts would remove an item that the whole log keeps."""
    from twostage.data.streaming import Reading, min_count_ids

    reading = Reading.of(config.data)
    if not reading.filters:
        return dataset
    keeps = min_count_ids(config.data.dataset, reading).keeps()
    inter = dataset.interactions.filter(keeps)
    if not inter.height:
        raise DataError(
            f"The minimum counts (`min_user_rows` {reading.min_user_rows}, "
            f"`min_item_rows` {reading.min_item_rows}) keep none of the "
            f"{dataset.num_interactions:,} sampled rows: draw more users "
            "(`sample_users`) or lower the minimums."
        )
    rows = dataset.with_interactions(inter)
    if dataset.shown is not None and dataset.shown.height:
        rows = rows.with_shown(dataset.shown.filter(keeps))
    return rows


def _without_streamed_test(
    dataset: Dataset, config: ExperimentConfig
) -> tuple[Dataset, int]:
    """``dataset`` (some users' rows of the config's streamed log) less the rows
    the streamed run holds out as its test side, and how many: each such row
    once its user, item and time, found in one pass over the whole log by the
    run's own split rule (a hash of each row, a global time cut, each user's
    last row, the cold users'); an impression log's shown rows go to the side
    the run's rule gives them (:meth:`SplitRule.shown_test_mask`)."""
    import polars as pl

    from twostage.data.dataset import ITEM, TIME
    from twostage.data.streaming import Reading, iter_row_groups, split_rule

    data = config.data
    reading = Reading.of(data)
    rule = split_rule(
        data.dataset,
        method=data.split,
        test_fraction=data.test_fraction,
        seed=data.seed,
        reading=reading,
        cold_user_fraction=data.cold_user_fraction,
    )
    inter = dataset.interactions
    drawn = inter[USER].unique().implode()
    keys = [USER, ITEM, TIME]
    parts = [
        batch.filter(pl.Series(rule.test_mask(batch, first)))
        .filter(pl.col(USER).is_in(drawn))
        .select(keys)
        for first, batch in iter_row_groups(data.dataset, columns=keys, reading=reading)
    ]
    held = pl.concat(parts).unique() if parts else inter.select(keys).clear()
    held = held.cast({k: inter.schema[k] for k in keys}).with_columns(
        pl.lit(True).alias("__test")
    )
    test = inter.select(keys).join(
        held, on=keys, how="left", nulls_equal=True, maintain_order="left"
    )
    is_test = test["__test"].fill_null(False)
    rows = dataset.with_interactions(inter.filter(~is_test))
    if dataset.shown is not None and dataset.shown.height:
        later = rule.shown_test_mask(dataset.shown, inter.select(USER, TIME), is_test)
        rows = rows.with_shown(dataset.shown.filter(~later))
    return rows, int(is_test.sum())


def _open_study(
    storage: str | None,
    study_name: str,
    search: dict[str, Any],
    direction: str,
    seed: int,
    pruner: Any,
) -> tuple[Any, list[TuneTrial]]:
    """``(study, trials that ended)``: a new study, or the stored one of
    ``study_name`` when it is the same ``search``, with its trials' records.
    The sampler of a resumed study is seeded past its trials, so that its
    first proposals are not the first call's again."""
    optuna = require_optuna()
    if storage is None:
        sampler = optuna.samplers.TPESampler(seed=seed)
        return optuna.create_study(
            direction=direction, sampler=sampler, pruner=pruner
        ), []
    if not isinstance(study_name, str) or not study_name.strip():
        raise ConfigError(
            f"`study_name` should be a non-empty name. Received: {study_name!r}."
        )
    try:
        where = _storage(storage)
        names = optuna.get_all_study_names(where)
    except ConfigError:
        raise
    except Exception as e:  # a file or database Optuna cannot read
        raise ConfigError(
            f"`storage` {storage!r} could not be read as Optuna's storage "
            f"({type(e).__name__}: {e}); give a new file, or one an earlier "
            "search wrote."
        ) from e
    search = json.loads(json.dumps(search))  # as the storage holds it
    if study_name not in names:
        study = optuna.create_study(
            storage=where,
            study_name=study_name,
            direction=direction,
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=pruner,
        )
        study.set_user_attr(_SEARCH, search)
        return study, []
    study = optuna.load_study(study_name=study_name, storage=where, pruner=pruner)
    differs = _differences(study.user_attrs.get(_SEARCH), search)
    if differs:
        raise ConfigError(
            f"the study {study_name!r} in {storage!r} is another search: its "
            f"{'; '.join(differs)}. Go on with the same settings, or start a new "
            "search under another `study_name` (--study-name) or storage."
        )
    for stale in study.get_trials(deepcopy=False):  # a crash's, left running
        if stale.state == optuna.trial.TrialState.RUNNING:
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    done = _records(study)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(done))
    return study, done


#: The user attributes of a stored study (its search) and trial (its record).
_SEARCH = "twostage_search"
_RECORD = "twostage_trial"


def _storage(storage: str) -> Any:
    """A database URL as Optuna takes it; any other text a journal file."""
    if not isinstance(storage, str) or not storage.strip():
        raise ConfigError(
            "`storage` should be a file path or a database URL "
            f"(sqlite:///tune.db). Received: {storage!r}."
        )
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage)
    if not path.parent.is_dir() or path.is_dir():
        raise ConfigError(
            f"`storage` {storage!r} should be a file in an existing folder."
        )
    return JournalStorage(JournalFileBackend(str(path)))


def _differences(stored: Any, search: dict[str, Any]) -> list[str]:
    """What a stored search has that ``search`` does not, as sentences."""
    if not isinstance(stored, dict):
        return ["trials were not written by twostage"]
    out = []
    names = {
        "metric": "metric",
        "stage": "stage",
        "params": "space",
        "tuning_rows": "count of tuning rows",
        "test_rows": "count of test rows",
    }
    for key, name in names.items():
        if stored.get(key) != search[key]:
            out.append(f"{name} is {stored.get(key)!r}, here {search[key]!r}")
    was, now = _flat(stored.get("config") or {}), _flat(search["config"])
    changed = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
    for key in changed[:5]:
        out.append(f"config {key} is {was.get(key)!r}, here {now.get(key)!r}")
    if len(changed) > 5:
        out.append(f"and {len(changed) - 5} more config keys differ")
    return out


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _pruner(prune: bool) -> Any:
    optuna = require_optuna()
    if prune:
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


@dataclass
class _Work:
    """What each worker of a parallel search reads: where the study is, the
    space, the config and rows of every trial, and what is measured."""

    storage: str
    study_name: str
    params: list[Param]
    inner: ExperimentConfig
    rows: Dataset
    measured: tuple[str, str, int | None, str]


def _threads(config: ExperimentConfig, jobs: int) -> ExperimentConfig:
    """``config`` with each of ``jobs`` its share of the CPU cores, unless
    ``train.num_threads`` says how many."""
    if config.train.num_threads > 0:
        return config
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    share = max(1, (cores or os.cpu_count() or 1) // jobs)
    return apply_settings(config, {"train.num_threads": share})


#: Seconds the other workers have to end their trials once one has died.
_GRACE = 20.0


def _parallel(
    work: _Work,
    prune: bool,
    seed: int,
    jobs: int,
    numbers: tuple[int, int, float | None],
    emit: Callable[[TuneTrial], None],
) -> Ended:
    """Runs the trials in ``jobs`` spawned workers sharing the study's storage
    and a counter of trial numbers (``numbers``: the first, the total and the
    deadline); each trial's record comes back to ``emit`` in this process.
    Ctrl-C here is passed on to the workers, whose running trials end
    ``interrupted``."""
    import multiprocessing
    import queue
    import signal
    import threading

    context = multiprocessing.get_context("spawn")
    first, trials, deadline = numbers
    counter = context.Value("i", first)
    messages = context.Queue()
    level = logging.getLogger("twostage").getEffectiveLevel()
    workers = [
        context.Process(
            target=_worker,
            args=(index, work, prune, seed, counter, trials, deadline, messages, level),
            daemon=True,
        )
        for index in range(min(jobs, trials - first))
    ]
    stop: list[bool] = []
    main = threading.current_thread() is threading.main_thread()
    previous = (
        signal.signal(signal.SIGINT, lambda *_: stop.append(True)) if main else None
    )
    ends: dict[int, str] = {}
    try:
        for worker in workers:
            worker.start()
        told = False
        lost_at: float | None = None
        while len(ends) < len(workers):
            if stop and not told:  # Ctrl-C here: the workers end their trials
                for worker in workers:
                    if worker.is_alive() and worker.pid is not None:
                        os.kill(worker.pid, signal.SIGINT)
                told = True
            try:
                index, kind, payload = messages.get(timeout=0.2)
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and messages.empty():
                    break  # a worker ended without a word: below
                gone = [
                    i
                    for i, w in enumerate(workers)
                    if i not in ends and not w.is_alive()
                ]
                if gone and messages.empty() and lost_at is None:
                    # A worker died mid-trial: its trial stays "running", and a
                    # worker waiting for those settings would wait for ever.
                    lost_at = time.monotonic()
                    stop.append(True)
                elif lost_at is not None and time.monotonic() - lost_at > _GRACE:
                    # It may have died holding a lock the others wait on (the
                    # trial counter's, the queue's): they cannot end on their own.
                    for worker in workers:
                        if worker.is_alive():
                            worker.kill()
                continue
            if kind == "trial":
                emit(TuneTrial(**payload))
            else:
                ends[index] = payload if kind == "ended" else f"error: {payload}"
        for worker in workers:
            worker.join()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    lost = [
        f"worker {i + 1} (exit code {w.exitcode})"
        for i, w in enumerate(workers)
        if i not in ends
    ]
    errors = [
        f"worker {i + 1}: {why[7:]}"
        for i, why in ends.items()
        if why.startswith("error: ")
    ]
    if lost or errors:
        raise WorkerError(
            "a tuning worker stopped before its trials did: "
            + "; ".join([*errors, *lost])
            + ". The trials that ended are in `storage`; run the search again to "
            "go on. (A worker that ends at once with exit code 1: a script that "
            'calls tune(jobs=...) must do so under `if __name__ == "__main__":`, '
            "as multiprocessing's spawn requires.)"
        )
    if stop or "interrupted" in ends.values():
        _fail_left_running(work)
        return "interrupted"
    for reason in ("timeout", "combinations"):
        if reason in ends.values():
            return typing.cast(Ended, reason)
    return "trials"


def _fail_left_running(work: _Work) -> None:
    """Store as failed the trials left "running" once every worker has
    stopped: a Ctrl-C that lands inside Optuna's ``ask`` (the trial stored,
    not yet handed back) or ``tell`` cuts the record of its end, and none of
    them runs any more."""
    optuna = require_optuna()
    study = optuna.load_study(
        study_name=work.study_name, storage=_storage(work.storage)
    )
    running = (optuna.trial.TrialState.RUNNING,)
    for trial in study.get_trials(deepcopy=False, states=running):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def _worker(
    index: int,
    work: _Work,
    prune: bool,
    seed: int,
    counter: Any,
    trials: int,
    deadline: float | None,
    messages: Any,
    level: int,
) -> None:
    """One worker of :func:`_parallel` (a spawned process): runs trials until
    the counter, the deadline or Ctrl-C stops it, and says why."""
    import signal

    told: list[bool] = []

    def interrupt_once(*_: Any) -> None:  # a second Ctrl-C must not cut a record
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        told.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt_once)
    optuna = require_optuna()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(OnceFilter())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("twostage").setLevel(level)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(
            study_name=work.study_name,
            storage=_storage(work.storage),
            # constant_liar: a setting another worker is training counts as a
            # poor result while it runs, so the sampler proposes others.
            sampler=optuna.samplers.TPESampler(
                seed=seed + 7919 * index, constant_liar=True
            ),
            pruner=_pruner(prune),
        )
        grants = _Grants(counter, trials, deadline)

        def emit(record: TuneTrial) -> None:
            messages.put((index, "trial", record.to_dict()))

        ended: str = _run_trials(
            study,
            work.params,
            work.inner,
            work.rows,
            work.measured,
            prune,
            grants,
            emit,
        )
    except KeyboardInterrupt:
        ended = "interrupted"
    except Exception as e:  # said in the parent, which raises it
        if not told:
            messages.put((index, "error", f"{type(e).__name__}: {e}"))
            return
        # The interrupt's own doing: optuna's journal lock, cut by Ctrl-C while
        # it released, unlinks a file its rename never made (FileNotFoundError).
        logger.debug("worker %d, after Ctrl-C: %r", index, e)
        ended = "interrupted"
    messages.put((index, "ended", ended))


class OnceFilter(logging.Filter):
    """Lets each distinct log message through once: every trial trains alike,
    so its warnings (a short epoch, say) would repeat trial after trial."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _Counter:
    """The next trial's number, in one process (a ``multiprocessing.Value``'s
    ``value`` and ``get_lock`` where workers share it)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def get_lock(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


@dataclass
class _Grants:
    """Hands out trial numbers: ``trials`` in all, none after ``deadline``
    (``time.time()``). A number and Optuna's trial are taken under one lock, so
    the study's trials are in the numbers' order across workers."""

    counter: Any
    trials: int
    deadline: float | None

    def left(self) -> bool:
        return bool(self.counter.value < self.trials)

    def take(
        self, study: Any, params: list[Param]
    ) -> tuple[int, Any, dict[str, Any]] | Ended:
        """The next trial's number, Optuna's trial and its settings, proposed
        under the lock too: another worker that asks next sees them stored."""
        with self.counter.get_lock():
            number = int(self.counter.value)
            if number >= self.trials:
                return "trials"
            if self.deadline is not None and time.time() >= self.deadline:
                return "timeout"
            self.counter.value = number + 1
            trial = study.ask()
            try:
                values = {p.key: _suggest(trial, p) for p in params}
            except KeyboardInterrupt:  # before training began: not a trial that ran
                study.tell(trial, state=require_optuna().trial.TrialState.FAIL)
                raise
            return number, trial, values


def _run_trials(
    study: Any,
    params: list[Param],
    inner: ExperimentConfig,
    rows: Dataset,
    measured: tuple[str, str, int | None, str],
    prune: bool,
    grants: _Grants,
    emit: Callable[[TuneTrial], None],
) -> Ended:
    """Runs trials, each recorded in the study (read on resuming and by the
    other workers) and passed to ``emit``, until ``grants`` has none left, a
    space of choices ran out or Ctrl-C; returns why it stopped."""
    optuna = require_optuna()
    combinations = _combinations(params)
    while True:
        records = _records(study)
        tried = {_settings_key(t.params) for t in records}
        if combinations is not None and len(tried) >= combinations:
            return "combinations" if grants.left() else "trials"
        taken = grants.take(study, params)
        if isinstance(taken, str):
            return typing.cast(Ended, taken)
        number, trial, values = taken
        try:
            earlier = next((t for t in records if t.params == values), None)
            if earlier is None:  # another worker may be training these settings
                earlier = _when_ended(study, trial, values)
            if earlier is not None:
                # The same settings train the same model (`train.seed`): not again.
                record = dataclasses.replace(
                    earlier, number=number, seconds=0.0, repeat_of=earlier.number
                )
            else:
                record = _run_trial(
                    number,
                    apply_settings(inner, values),
                    values,
                    rows,
                    measured,
                    _pruning(trial, study.direction) if prune else None,
                )
        except KeyboardInterrupt:  # before training began: not a trial that ran
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        trial.set_user_attr(_RECORD, record.to_dict())
        if record.state == "complete":
            assert record.value is not None
            study.tell(trial, record.value)
        elif record.state == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        emit(record)
        if record.state == "interrupted":
            return "interrupted"


def _when_ended(study: Any, trial: Any, values: dict[str, Any]) -> TuneTrial | None:
    """The record of an earlier trial with ``trial``'s settings that another
    worker is training, once it has ended; None when there is none (or it
    ended without a record that counts: Ctrl-C stopped it). Only earlier
    trials are waited for, so two workers never wait for each other."""
    optuna = require_optuna()
    running = (optuna.trial.TrialState.RUNNING,)

    def same() -> bool:
        return any(
            t.number < trial.number and t.params == trial.params
            for t in study.get_trials(deepcopy=False, states=running)
        )

    if not same():
        return None
    while same():
        time.sleep(0.2)
    return next((t for t in _records(study) if t.params == values), None)


def _numbered(study: Any) -> list[Any]:
    """The study's trials that count, in order (a trial's number is its place
    here): those that ended with a record and those still running. Trials that
    Ctrl-C stopped, or a crash left, do not count and run again."""
    import optuna

    running = optuna.trial.TrialState.RUNNING
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == running
        or t.user_attrs.get(_RECORD, {}).get("state", "interrupted") != "interrupted"
    ]


def _records(study: Any) -> list[TuneTrial]:
    """The records of the study's trials that ended and count, numbered."""
    return [
        TuneTrial(**{**t.user_attrs[_RECORD], "number": number})
        for number, t in enumerate(_numbered(study))
        if _RECORD in t.user_attrs
    ]


class _Pruned(Exception):
    """A trial stopped by the pruner after an epoch (not a config or data error)."""


def _pruning(trial: Any, direction: Any) -> Callable[[dict[str, Any]], None]:
    """The ``on_epoch`` of a pruned search: reports each epoch's validation figure
    (retrieval's recall or the ranker's figure: higher is better, negated where
    the study minimises) and stops the trial where the pruner says so. An
    ensemble member's epochs are not read."""
    import optuna

    sign = 1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else -1.0

    def on_epoch(record: dict[str, Any]) -> None:
        if "validation" not in record or "member" in record:
            return
        trial.report(sign * record["validation"], record["epoch"])
        if trial.should_prune():
            raise _Pruned(
                f"at epoch {record['epoch'] + 1}, validation "
                f"{record['validation']:.4f}: below the earlier trials' median there"
            )

    return on_epoch


def _run_trial(
    number: int,
    config: ExperimentConfig,
    values: dict[str, Any],
    rows: Dataset,
    measured: tuple[str, str, int | None, str],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TuneTrial:
    """One trial trained and measured; a config or data error of this combination
    is recorded (the search goes on), as is the pruner's stop; Ctrl-C marks it
    interrupted."""
    started = time.perf_counter()
    record = TuneTrial(number, values, None, 0.0, "failed")
    try:
        record.value, record.best_epoch = _measure(config, rows, measured, on_epoch)
    except TwostageError as e:
        record.error = str(e)
    except _Pruned as e:
        record.state, record.error = "pruned", str(e)
    except KeyboardInterrupt:
        record.state, record.error = "interrupted", "stopped by Ctrl-C"
    else:
        if math.isfinite(record.value):
            record.state = "complete"
        else:
            record.error = f"the metric was {record.value}"
            record.value = None
    record.seconds = time.perf_counter() - started
    return record


def _combinations(params: list[Param]) -> int | None:
    """How many settings a space of choices alone holds (None with a range)."""
    if not all(p.choices for p in params):
        return None
    return math.prod(len(p.choices) for p in params)


def _settings_key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError as e:
        raise ConfigError(
            "tuning needs Optuna, which is not installed. Install it with "
            "`pip install 'twostage[tune]'` (or pip install optuna)."
        ) from e
    return optuna


def _start_point(
    config: ExperimentConfig, params: list[Param]
) -> dict[str, Any] | None:
    """The config's own values as Optuna's parameters, where every one lies in the
    space (so the first trial is the config as given); None otherwise."""
    start: dict[str, Any] = {}
    for p in params:
        value = _current(config, p.key)
        if p.choices:
            if value not in p.choices:
                return None
            start[p.key] = p.choices.index(value)
        elif value is None or isinstance(value, bool) or not p.low <= value <= p.high:
            return None
        else:
            start[p.key] = value
    return start


def _suggest(trial: Any, param: Param) -> Any:
    if param.choices:  # by index: a choice may be a list, which Optuna cannot hold
        at = trial.suggest_categorical(param.key, list(range(len(param.choices))))
        return param.choices[at]
    if param.integer:
        return trial.suggest_int(
            param.key, int(param.low), int(param.high), log=param.log
        )
    return trial.suggest_float(param.key, param.low, param.high, log=param.log)


#: The last trial's retrieval run and split (both stages), by its settings
#: outside ``ranking`` and its rows.
_RETRIEVAL: dict[str, Any] = {}


def _measure(
    config: ExperimentConfig,
    rows: Dataset,
    measured: tuple[str, str, int | None, str],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> tuple[float, int | None]:
    """``(metric, retrieval's best epoch)`` of one trial trained on ``rows``."""
    stage, name, k, watched = measured
    report: dict[str, Any] | None
    if stage == "retrieval":
        from twostage.retrieval.fit import fit_retrieval

        run, _ = fit_retrieval(config, dataset=rows, on_epoch=on_epoch)
        report = run.metrics
    else:
        from twostage.two_stage import fit_two_stage

        # A trial that changes the ranker's settings alone ranks on the last
        # trial's retrieval run: the same settings and seed train the same one.
        key = json.dumps(
            {**config_dict(config), "ranking": None, "rows": id(rows)}, sort_keys=True
        )
        reused = _RETRIEVAL.get(key)
        stages = fit_two_stage(
            config,
            rows,
            ranking=True,
            retrieval=reused,
            on_epoch=None if watched == "ranking" else on_epoch,
            on_ranking_epoch=on_epoch if watched == "ranking" else None,
        )
        _RETRIEVAL.clear()  # one run kept: each holds a model and its tables
        _RETRIEVAL[key] = (stages.retrieval, stages.split)
        run, report = stages.retrieval, stages.ranking_metrics
    if not report:
        raise DataError(
            "the tuning split left no test rows to measure a trial on (the "
            "config's split of the rows its own test side leaves): tune on more "
            "rows, or with another `data.split`."
        )
    best_epoch = None
    if run.train_result is not None:
        best_epoch = run.train_result.best_epoch + 1
    if stage == "retrieval":
        # TFRS's factorized top-K counts seen items, as the tutorials measure it.
        mode = "include_seen" if name == "factorized_top_k" else "exclude_seen"
        return float(report["metrics"][mode][name][str(k)]), best_epoch
    if k is None:
        return float(report[name]), best_epoch
    return float(report["two_stage"][name][str(k)]), best_epoch
