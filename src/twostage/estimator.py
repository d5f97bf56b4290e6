"""The estimator-style API: one object that fits both stages and answers.

:class:`TwoStageModel` wraps the lower-level pieces (:func:`fit_two_stage`, the
:class:`~twostage.recommender.Recommender`, the evaluation functions) for users who
want ``fit`` / ``recommend`` / ``predict`` / ``evaluate`` / ``save`` / ``load``, as
in implicit, LightFM or scikit-learn. People who build their own towers keep the
lower-level API.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
import torch

from twostage.config import DataConfig, ExperimentConfig, apply_settings, to_dict
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.data.frames import FRAME_KINDS, as_polars, log_names, with_our_names
from twostage.data.registry import FIT_TABLES, reading_settings, table_keys
from twostage.data.split import ExperimentSplit, validation_split, with_id_types
from twostage.errors import ConfigError, DataError
from twostage.evaluate import EvalResult
from twostage.inputs import check_raw_id
from twostage.recommender import Recommendation, Recommender

if TYPE_CHECKING:
    from twostage.session_batch import SessionLists

__all__ = ["Evaluation", "TwoStageModel"]

StepCallback = Callable[[dict[str, Any]], None]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """Test figures of a fitted model.

    ``recall``, ``ndcg`` and ``hit_rate`` (``k -> value``, full catalogue, the
    user's training items excluded) are those of the list the model serves: the
    two-stage list when there is a ranker, else retrieval's. ``result.ndcg[10]``.

    Attributes:
        recall, ndcg, hit_rate: the served list's figures at k = 1, 5, 10, 50, 100.
        retrieval: retrieval's full result, both protocol modes
            (:class:`~twostage.evaluate.EvalResult`; ``factorized_top_k`` is TFRS's
            metric).
        ranking: the ranking stage's figures (``rmse``, ``mae``, ``auc``,
            ``two_stage`` and ``retrieval_only`` lists), or None.
        num_users: the users the served figures average over: test users with
            a test item outside their training rows (the others, and their
            count, are in ``retrieval.counts``).
        standard_errors: ``metric -> k -> value``, the standard error of each
            served figure over those users (``standard_errors["ndcg"][10]``):
            two models measured on the same test users differ beyond noise when
            their figures are further apart than about twice
            ``sqrt(se_a ** 2 + se_b ** 2)``, a bound that ignores that the same
            users made both; ``per_user`` gives the sharper, paired one. Empty
            where not recorded.
        per_user: with :meth:`TwoStageModel.evaluate`'s ``per_user=True``, a row
            per one of those users: their ID (under the user column's name
            :meth:`~TwoStageModel.fit` read), ``query`` (the query's position
            among the test's queries, as ``twostage evaluate --per-user``
            writes it) and each served figure (``ndcg@10``, ``recall@K``,
            ``hit_rate@K``, ``mrr@K``), whose means are the figures above. A
            model that reads per-row context has a query per test row, so a
            user may have several rows: join two such models' tables on
            ``query``, others on the ID. The per-user differences give a paired
            comparison (their standard deviation over the square root of their
            number is the standard error of the difference). None otherwise;
            not in :meth:`to_dict`.
    """

    recall: dict[int, float]
    ndcg: dict[int, float]
    hit_rate: dict[int, float]
    retrieval: EvalResult
    ranking: dict[str, Any] | None = None
    num_users: int = 0
    standard_errors: dict[str, dict[int, float]] = field(default_factory=dict)
    per_user: pl.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def factorized_top_k(self) -> dict[int, float]:
        """TFRS's metric (seen items kept), for comparison with its tutorials."""
        return self.retrieval.metrics["include_seen"]["factorized_top_k"]

    @property
    def rmse(self) -> float | None:
        return None if self.ranking is None else self.ranking.get("rmse")

    @property
    def auc(self) -> float | None:
        return None if self.ranking is None else self.ranking.get("auc")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``k`` keys as strings."""
        return {
            "recall": {str(k): v for k, v in self.recall.items()},
            "ndcg": {str(k): v for k, v in self.ndcg.items()},
            "hit_rate": {str(k): v for k, v in self.hit_rate.items()},
            "retrieval": self.retrieval.to_dict(),
            "ranking": self.ranking,
            "num_users": self.num_users,
            "standard_errors": {
                m: {str(k): v for k, v in per_k.items()}
                for m, per_k in self.standard_errors.items()
            },
        }

    def __repr__(self) -> str:
        extra = "" if self.rmse is None else f", rmse={self.rmse:.4f}"
        error = self.standard_errors.get("ndcg", {}).get(10)
        spread = "" if error is None else f" ± {error:.4f}"
        return (
            f"Evaluation(ndcg@10={self.ndcg.get(10, float('nan')):.4f}{spread}, "
            f"recall@10={self.recall.get(10, float('nan')):.4f}, "
            f"hit_rate@10={self.hit_rate.get(10, float('nan')):.4f}{extra}, "
            f"num_users={self.num_users:,})"
        )


@dataclass
class _Columns:
    user_col: str = USER
    item_col: str = ITEM
    time_col: str | None = None
    rating_col: str | None = None
    weight_col: str | None = None
    label_col: str | None = None

    def recorded(self, data: DataConfig) -> DataConfig:
        """``data`` with these columns as its settings, which the saved config
        keeps (so that ``evaluate --test`` and a reloaded model read new rows
        alike)."""
        return dataclasses.replace(
            data,
            user_col=None if self.user_col == USER else self.user_col,
            item_col=None if self.item_col == ITEM else self.item_col,
            time_col=self.time_col,
            rating_col=self.rating_col,
            weight_col=self.weight_col,
            label_col=self.label_col,
        )

    @classmethod
    def of(cls, data: Any) -> _Columns:
        """The columns a saved ``data`` config records (held-out rows: no weight)."""
        return cls(
            data.user_col or USER,
            data.item_col or ITEM,
            data.time_col,
            data.rating_col,
            label_col=data.label_col,
        )


def _say_left_out(counts: dict[str, dict[str, int]]) -> None:
    """Log the test users left out of the figures because every test item of
    theirs is among their training rows (`twostage evaluate` prints it)."""
    mode = counts.get("exclude_seen", {})
    left = int(mode.get("num_queries_without_relevant", 0))
    if not left:
        return
    total = int(mode.get("num_queries", 0))
    if left == total:
        logger.warning(
            "none of the %d test users has a test item outside their training "
            "rows, so every figure is NaN (seen items are excluded from the "
            "lists): evaluate on rows held out of fit's data.",
            total,
        )
        return
    logger.warning(
        "%d of %d test users are left out of the figures: each of their test "
        "items is among their training rows, which the lists exclude "
        "(Evaluation.retrieval.counts).",
        left,
        total,
    )


class TwoStageModel:
    """Two-tower retrieval and a ranker, fitted and used like an estimator.

    Example::

        model = TwoStageModel(settings={"train.epochs": 5})
        model.fit(train_frame, rating_col="rating", time_col="ts")
        model.recommend([1, 2, 3], k=10)      # -> (item_ids [3, 10], scores [3, 10])
        model.evaluate(test_frame).ndcg[10]
        model.save("models/mine/1"); TwoStageModel.load("models/mine/1")

    Args:
        config: every setting (:class:`~twostage.config.ExperimentConfig`); the
            defaults when None.
        settings: overrides of ``config``, ``{"train.epochs": 5,
            "retrieval.embedding_dim": 32}``, with Python values (``None`` unsets
            an optional key, lists for lists; unknown keys and wrong types are
            errors, with a suggestion; :func:`twostage.config.apply_settings`).
        ranking: fit the ranking stage too.
        progress: draw progress bars (rich; a live widget in Jupyter).
        on_step: called after every training step of either stage with
            ``{"stage", "epoch", "step", "loss", "examples", "num_epochs",
            "total_steps"}`` (epoch and step 0-based), e.g. to log to a tracker.
        tensorboard: log both stages' curves to this directory for TensorBoard
            (:class:`~twostage.tracking.TensorBoardLogger`).
    """

    def __init__(
        self,
        config: ExperimentConfig | None = None,
        *,
        settings: Mapping[str, Any] | None = None,
        ranking: bool = True,
        progress: bool = True,
        on_step: StepCallback | None = None,
        tensorboard: str | Path | None = None,
    ) -> None:
        config = config if config is not None else ExperimentConfig()
        self.config = apply_settings(config, settings or {})
        self.ranking = ranking
        self.progress = progress
        self.on_step = on_step
        self.tensorboard = tensorboard
        self.recommender_: Recommender | None = None
        self.split_: ExperimentSplit | None = None
        #: The column names :meth:`fit` was given; :meth:`evaluate` reads with them.
        self.columns_: _Columns | None = None

    # -- fitting ------------------------------------------------------------------
    def fit(
        self,
        data: Any,
        *,
        validation: Any = None,
        test: Any = None,
        users: Any = None,
        items: Any = None,
        user_col: str | None = None,
        item_col: str | None = None,
        time_col: str | None = None,
        rating_col: str | None = None,
        weight_col: str | None = None,
        label_col: str | None = None,
        warm_start: bool = False,
    ) -> TwoStageModel:
        """Fit both stages on ``data`` as given: nothing is re-split.

        Args:
            data: the training interactions: a :class:`~twostage.data.Dataset`, a
                polars, pandas or pyarrow table or a polars LazyFrame (rows are
                checked as a file's are; the rejected ones are counted in the
                log), or a CSV, JSON lines or Parquet path.
                A file or frame is read with the settings ``data.separator``,
                ``data.quote_char``, ``data.comment_prefix``, ``data.missing_ratings``,
                ``data.time_format``, ``data.time_unit``,
                ``data.weight_values``, ``data.column_names`` and ``data.duplicates``
                (a Dataset was read already: they are refused with one).
            validation: held-out interactions for early stopping and the ranker's
                blend weight (same kinds as ``data``); when None, a
                ``data.validation_fraction`` carve-out of ``data`` (0: none).
            test: test interactions to measure at the end of fitting (optional;
                :meth:`evaluate` measures any table later).
            users, items: user and item feature tables (frames, Datasets' tables
                or file paths) keyed by ``user_col`` / ``item_col`` or ``user_id`` /
                ``item_id``, one row per key, joined as
                :func:`~twostage.data.tables.join_features` joins (text keys that
                are plain integers take the log's integer type); when None, the
                files of the settings ``data.user_table`` / ``data.item_table``.
            user_col, item_col, time_col, rating_col: column names of the frames
                (``user_col`` / ``item_col`` None: ``user_id`` / ``item_id``;
                ``time_col`` / ``rating_col`` None: a column named ``timestamp`` /
                ``rating`` when there is one, as every reader takes it; ``""``:
                none, so row order is time order / the feedback is implicit). A
                column left None takes the setting ``data.user_col`` etc. when
                set (a saved model's config keeps the columns its fit was given);
                one given that differs from its setting is refused, except on a
                model fitted or loaded already, which fits on the new columns.
            weight_col: a column of ``data`` whose non-negative values scale each
                row's share of both stages' losses (None: every row weighs 1);
                ``validation`` and ``test`` are read without it.
            label_col: a column of an impression log saying whether the user chose
                the item shown (1, true, yes) or not (0, false, no); the rows not
                chosen are kept apart (``Dataset.shown``): the ranker draws
                ``ranking.num_shown_negatives`` of them per positive, and the
                figures on ``test`` (and :meth:`evaluate`'s) add ``shown_auc``.
                ``validation``, ``test`` and :meth:`evaluate`'s rows are read
                with it too.
            warm_start: start from this model's own weights (a fit, or
                :meth:`load`), as scikit-learn's ``warm_start`` does: each ID
                ``data`` shares with them keeps its vectors, new IDs start
                fresh, the architecture must be the same
                (:mod:`twostage.training.warm`); the setting
                ``train.warm_start`` starts from a saved model instead. False:
                from fresh weights (or that setting's model).

        The setting ``data.unrated_values`` (e.g. ``(0.0,)``) makes the ratings
        it lists missing in ``data``, ``validation`` and ``test``, and in the rows
        :meth:`evaluate` is given later: interactions without a rating.

        Returns:
            self, fitted.
        """
        from twostage.two_stage import fit_two_stage

        if not isinstance(warm_start, bool):
            raise ConfigError(
                "`warm_start` should be True or False. Received: "
                f"`warm_start` = {warm_start!r}."
            )
        warm_from = self.recommender_ if warm_start else None
        if warm_start and warm_from is None:
            raise ConfigError(
                "fit(warm_start=True) starts from this model's weights, and it is "
                "not fitted yet: fit it once without it, or load a saved model "
                "(TwoStageModel.load), or name one with the setting "
                "`train.warm_start`."
            )
        data_config = self.config.data
        given = {
            "user_col": user_col,
            "item_col": item_col,
            "time_col": time_col,
            "rating_col": rating_col,
            "weight_col": weight_col,
            "label_col": label_col,
        }
        refit = self.columns_ is not None  # columns recorded by a fit or a load
        for key, value in given.items():
            setting = getattr(data_config, key)
            if value is None:
                given[key] = setting  # the setting, or the default
            elif setting is not None and value != setting and not refit:
                raise ConfigError(
                    f"fit({key}={value!r}) and the setting `data.{key}` = "
                    f"{setting!r} name different columns; give one."
                )
        columns = _Columns(
            given["user_col"] or USER,
            given["item_col"] or ITEM,
            given["time_col"],
            given["rating_col"],
            given["weight_col"],
            given["label_col"],
        )
        _refuse_unread_data_settings(data_config)
        self.columns_ = dataclasses.replace(columns, weight_col=None)  # for evaluate
        # The saved config must not name a dataset these tables did not come from,
        # and keeps the column names they were read by.
        self.config = dataclasses.replace(
            self.config,
            data=dataclasses.replace(columns.recorded(data_config), dataset=FIT_TABLES),
        )
        for arg, given, setting in (
            ("users", users, data_config.user_table),
            ("items", items, data_config.item_table),
        ):
            if given is not None and setting is not None:
                raise ConfigError(
                    f"`{arg}` and the setting `data.{arg[:-1]}_table` = {setting!r} "
                    "both name a feature table; give one."
                )
        users = users if users is not None else data_config.user_table
        items = items if items is not None else data_config.item_table
        train = self._as_dataset(data, columns, users=users, items=items)
        columns = self.columns_  # held-out rows are not weighed
        if validation is not None:
            held = self._as_dataset(validation, columns, like=train, held_out=True)
        elif self.config.data.validation_fraction > 0:
            train, held = validation_split(
                train,
                fraction=self.config.data.validation_fraction,
                seed=self.config.data.seed + 7,
            )
        else:
            held = None
        tested = (
            self._as_dataset(test, columns, like=train, held_out=True)
            if test is not None
            else train.with_interactions(train.interactions.clear()).with_shown(None)
        )
        split = ExperimentSplit(fit=train, validation=held, test=tested)
        fit = (
            fit_two_stage
            if warm_from is None
            else functools.partial(fit_two_stage, warm_from=warm_from)
        )
        stages = self._fit(split, fit)
        self.split_ = split
        self.recommender_ = stages.recommender(items=train.items)
        self.test_metrics_ = (
            None if test is None else self._evaluation(stages.retrieval.metrics, stages)
        )
        return self

    def _fit(self, split: ExperimentSplit, fit: Callable[..., Any]) -> Any:
        if self.tensorboard is None:
            return self._fit_stages(split, fit)
        from twostage.tracking import TensorBoardLogger

        logger = TensorBoardLogger(self.tensorboard)
        hook = self.on_step

        def both(info: dict[str, Any]) -> None:
            logger.on_step(info)
            if hook is not None:
                hook(info)

        self.on_step = both
        try:
            stages = self._fit_stages(split, fit)
            logger.log_stages(stages)
        finally:
            self.on_step = hook
            logger.close()
        return stages

    def _fit_stages(self, split: ExperimentSplit, fit: Callable[..., Any]) -> Any:
        stages = ("retrieval", "ranking") if self.ranking else ("retrieval",)
        if not self.progress:
            hooks = {s: self._hook(s) for s in stages}
            return fit(
                self.config,
                split=split,
                ranking=self.ranking,
                on_step=hooks["retrieval"],
                on_ranking_step=hooks.get("ranking"),
            )
        from twostage.progress import training_bars

        with training_bars(*stages, also=self.on_step) as bars:
            return fit(
                self.config,
                split=split,
                ranking=self.ranking,
                on_step=bars["retrieval"],
                on_ranking_step=bars.get("ranking"),
            )

    def _hook(self, stage: str) -> StepCallback | None:
        hook = self.on_step
        if hook is None:
            return None
        return lambda info: hook({"stage": stage, **info})

    def _as_dataset(
        self,
        data: Any,
        columns: _Columns,
        *,
        users: Any = None,
        items: Any = None,
        like: Dataset | None = None,
        held_out: bool = False,
    ) -> Dataset:
        """A Dataset from a Dataset, a frame or a path; IDs cast like ``like``'s.
        ``held_out`` rows (validation, test, evaluate's) take ``data.column_names``
        only where they are a headerless text file."""
        from twostage.data.tables import (
            join_features,
            read_feature_table,
            read_interactions,
            with_names_if_headerless,
        )

        settings = self.config.data
        weights = settings.weights_of_values if columns.weight_col else None
        if settings.weight_values and like is None and not columns.weight_col:
            raise ConfigError(
                "`data.weight_values` gives the weights of a weight column's values; "
                "name the column with fit(weight_col=...)."
            )
        reading = {  # the settings that say how to read a file or a frame
            **reading_settings(settings),
            "weight_values": weights,
            "column_names": None if held_out else settings.column_names or None,
        }
        if isinstance(data, Dataset):
            given = [f"`data.{k}`" for k, v in reading.items() if v is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} say how to read a file or a frame; this "
                    "Dataset was read already. Pass the file or frame, or unset them."
                )
            dataset = data
        else:

            def read(names: list[str] | None) -> Dataset:
                return read_interactions(
                    data,
                    user_col=columns.user_col,
                    item_col=columns.item_col,
                    time_col=columns.time_col,
                    rating_col=columns.rating_col,
                    weight_col=columns.weight_col,
                    label_col=columns.label_col,
                    name=self.config.data.dataset,
                    weight_values=weights,
                    column_names=names,
                    has_header=not names,
                    **{
                        key: value
                        for key, value in reading_settings(settings).items()
                        if value is not None  # (None: the default)
                    },
                )

            if held_out:
                dataset = with_names_if_headerless(data, settings.column_names, read)
            else:
                dataset = read(list(settings.column_names) or None)
        tables = {}
        sides: tuple[tuple[str, Any, str, Literal["user_id", "item_id"]], ...] = (
            ("users", users, columns.user_col, "user_id"),
            ("items", items, columns.item_col, "item_id"),
        )
        for arg, table, key_col, key in sides:
            side = arg[:-1]  # "user" or "item"
            table_key = getattr(settings, f"{side}_table_key")
            names = list(getattr(settings, f"{side}_table_columns"))
            if table is not None:
                tables[arg] = read_feature_table(
                    table,
                    key_col=table_keys(key_col, key, table_key),
                    key_name=key,
                    column_names=names or None,
                    has_header=not names,
                )
            elif (table_key is not None or names) and not held_out:
                raise ConfigError(
                    f"`data.{side}_table_key` / `data.{side}_table_columns` describe "
                    f"a {side} feature table, and none was given: pass "
                    f"fit({arg}=...) or set `data.{side}_table`."
                )
        if tables:  # checked against the log: keys, repeats, how many match
            dataset = join_features(dataset, **tables)
        if like is not None:
            schema = like.interactions.schema
            try:
                cast = with_id_types(dataset, like)
            except pl.exceptions.PolarsError as e:
                raise DataError(
                    "the IDs of this table do not have the training data's types "
                    f"({schema[USER]}, {schema[ITEM]}): {e}"
                ) from e
            # the training tables, with these rows and their own shown rows
            dataset = like.with_interactions(cast.interactions).with_shown(cast.shown)
        # Ratings that mean "no rating": the rows stay, their ratings go.
        return dataset.with_unrated(self.config.data.unrated_values)

    # -- answering ----------------------------------------------------------------
    @property
    def recommender(self) -> Recommender:
        """The served object (the one ``twostage serve`` loads)."""
        if self.recommender_ is None:
            raise ConfigError(
                "this TwoStageModel is not fitted; call fit(data) or "
                "TwoStageModel.load(path) first."
            )
        return self.recommender_

    def recommend(
        self,
        user_ids: Any,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        **options: Any,
    ) -> Recommendation | tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items, as served (both stages, seen items excluded).

        Args:
            user_ids: one user ID, or a list / array / Series of them.
            k: list length.
            exclude_seen: drop each user's training items.
            options: as :meth:`Recommender.recommend` (``filters``, ``context``,
                ``num_candidates``, ``user_features``, ``exclude``, ``diversity``,
                ``max_per``).

        Returns:
            For one ID: the rich answer (:class:`~twostage.recommender.Recommendation`
            with titles, scores and the path taken). For many: ``(item_ids,
            scores)``, two ``[num_users, k]`` arrays; a row shorter than ``k`` (a
            tiny catalogue) is padded with None IDs and NaN scores.
        """
        rec = self.recommender
        if isinstance(user_ids, set | frozenset | dict):
            raise ConfigError(
                "`user_ids` should be one user ID, or a list, array or Series of "
                f"them, whose order the rows follow. Received a "
                f"{type(user_ids).__name__}."
            )
        if not _is_many(user_ids):
            return rec.recommend(user_ids, k, exclude_seen=exclude_seen, **options)
        ids = list(user_ids.to_list() if hasattr(user_ids, "to_list") else user_ids)
        answers = rec.recommend_batch(ids, k, exclude_seen=exclude_seen, **options)
        item_ids = np.full((len(ids), k), None, dtype=object)
        scores = np.full((len(ids), k), np.nan, dtype=np.float32)
        for row, answer in enumerate(answers):
            for col, entry in enumerate(answer.items):
                item_ids[row, col] = entry["item_id"]
                scores[row, col] = entry.get("rank_score", entry["score"])
        flat = item_ids.ravel()
        if len(flat) and all(isinstance(v, int) for v in flat):  # no padding
            item_ids = item_ids.astype(np.int64)
        return item_ids, scores

    def recommend_sessions(
        self,
        sessions: Any,
        k: int = 10,
        *,
        session_col: str = "session_id",
        exclude_seen: bool = True,
        use_ranker: bool = True,
        filters: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        diversity: float = 0.0,
        max_per: dict[str, int] | None = None,
        num_candidates: int | None = None,
    ) -> SessionLists:
        """A list for every session of a polars, pandas or pyarrow table (or
        a dict of columns) with a row per session item
        (:meth:`Recommender.recommend_sessions`), its columns named
        as :meth:`fit` read the log's (``item_col``, ``time_col``, ``rating_col``,
        ``user_col``) and ``session_col``; ``context``: one moment for every
        list, for a model that reads per-request context; ``diversity``,
        ``max_per``, ``num_candidates``: as :meth:`Recommender.recommend` takes
        them.

        Returns:
            ``.lists`` (a row per session and rank) and ``.unread`` (the rows the
            model could not read, with their reasons); the session column keeps
            its own name in neither: it is ``session_id`` there.
        """
        return self.recommender.recommend_sessions(
            self._sessions_frame(sessions, session_col),
            k,
            exclude_seen=exclude_seen,
            use_ranker=use_ranker,
            filters=filters,
            context=context,
            diversity=diversity,
            max_per=max_per,
            num_candidates=num_candidates,
        )

    def evaluate_sessions(
        self,
        sessions: Any,
        *,
        session_col: str = "session_id",
        use_ranker: bool = True,
        baselines: bool = True,
    ) -> dict[str, Any]:
        """Next-item figures on sessions the model never saw (a frame as
        :meth:`recommend_sessions` takes it): each session's last item held out
        and found from the items before it
        (:func:`~twostage.session_evaluation.evaluate_sessions`), beside the
        model's popularity fallback and, with ``baselines``, the baselines
        fitted on the rows :meth:`fit` was given, each fed what the model reads.

        Raises:
            ConfigError: ``baselines`` for a model loaded from disk, which keeps
                no training rows (``twostage evaluate BUNDLE --sessions FILE
                --baselines`` reads them again where the saved config names a
                log file).
        """
        from twostage.session_evaluation import evaluate_sessions

        if baselines and self.split_ is None:
            raise ConfigError(
                "`baselines=True` fits the baselines on the rows fit() was given, "
                "and a loaded model keeps none; pass baselines=False."
            )
        return evaluate_sessions(
            self.recommender,
            self._sessions_frame(sessions, session_col),
            use_ranker=use_ranker,
            train=self.split_.train if baselines and self.split_ else None,
        )

    def _sessions_frame(self, sessions: Any, session_col: str) -> pl.DataFrame:
        """A sessions table (any frame, or a dict of columns) as polars,
        its columns renamed from the names :meth:`fit` read to ours."""
        frame = as_polars(sessions)
        if frame is None:
            raise ConfigError(
                f"`sessions` should be {FRAME_KINDS}, or a dict of columns, with a "
                f"row per session item. Received a {type(sessions).__name__}."
            )
        names = log_names(self.columns_ or _Columns(), session_col)
        return with_our_names(frame, names, "`sessions`")

    def predict(
        self,
        user_ids: Any,
        item_ids: Any,
        *,
        context: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """Scores of (user, item) pairs, element by element.

        With a ranker: its predicted rating when the data had ratings, else its click
        probability. Without: the retrieval score (query . candidate). IDs are
        integers or strings, as :meth:`recommend` takes them (None: unknown). An
        unknown user is scored as a cold start; an item outside the catalogue gets
        NaN. ``context``: the moment of every pair, for a model that reads
        per-interaction context (``{"timestamp": 1700000000}``, as
        :meth:`recommend` takes it); unknown without one.

        Returns:
            ``[n]`` float32 array.
        """
        rec = self.recommender
        user_list, item_list = _as_list(user_ids), _as_list(item_ids)
        if len(user_list) != len(item_list):
            raise ConfigError(
                "`user_ids` and `item_ids` should have the same length. Received: "
                f"{len(user_list)} and {len(item_list)}."
            )
        if not user_list:
            return np.empty(0, dtype=np.float32)
        # IDs are read as recommend() reads them: an ID the vocabulary does not
        # hold (text for integer IDs included) is unknown, not an error.
        user_idx = _indices(rec.user_vocab, "user_ids", user_list)
        item_idx = _indices(rec.item_vocab, "item_ids", item_list)
        users = _canonical(rec.user_vocab, user_list, user_idx)
        encoded = rec.encode_context(context)  # refused where none is read
        with torch.no_grad():
            if rec.ranker is not None:
                rows = None
                if context:  # one moment for every pair
                    rows = {
                        k: v.expand(len(user_idx), *v.shape[1:])
                        for k, v in encoded.items()
                    }
                out = rec.ranker.score(user_idx, item_idx[:, None], context=rows)
                rated = rec.ranker.predicts_ratings
                values = out["rating"] if rated else torch.sigmoid(out["click"])
                scores = values[:, 0]
            else:
                queries = rec.run.query_embeddings(users, users=None, context=context)
                scores = (queries * rec.item_embeddings[item_idx]).sum(dim=1)
        result = scores.float().numpy().copy()
        result[item_idx.numpy() == 0] = np.nan
        return result

    def similar_items(
        self,
        item_id: Any,
        k: int = 10,
        *,
        filters: dict[str, Any] | None = None,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """The ``k`` items whose candidate embeddings are closest to ``item_id``'s
        (``filters``: only those whose metadata matches; ``options``: as
        :meth:`Recommender.similar_items` takes them: ``exclude``,
        ``diversity``, ``max_per``, ``item_features``...)."""
        return self.recommender.similar_items(item_id, k, filters=filters, **options)

    def add_items(self, items: Any) -> TwoStageModel:
        """Add items the model never trained on to its catalogue, without
        retraining (:meth:`Recommender.add_items`): retrieved, ranked, filtered
        and found by :meth:`similar_items` from their features from then on.

        Args:
            items: a polars, pandas or pyarrow table, or a CSV/TSV/Parquet file,
                with a row per item: ``item_id``, every item feature column the model
                reads (null where unknown) and any metadata columns.

        Returns:
            ``self``, its catalogue grown; :meth:`save` keeps the added items.
        """
        rec = self.recommender
        if isinstance(items, str | Path):
            from twostage.catalogue import item_keys, read_item_rows

            items = read_item_rows(items, item_keys(rec.run.config.data))
        self.recommender_ = rec.add_items(items)
        return self

    def remove_items(self, item_ids: Any) -> TwoStageModel:
        """Stop serving ``item_ids`` (a list, array or Series of item IDs)
        without retraining (:meth:`Recommender.remove_items`); the model still
        reads them as history.

        Returns:
            ``self``; :meth:`save` keeps the list.
        """
        ids = item_ids.to_list() if hasattr(item_ids, "to_list") else item_ids
        self.recommender_ = self.recommender.remove_items(list(ids))
        return self

    def restore_items(self, item_ids: Any) -> TwoStageModel:
        """Serve again items :meth:`remove_items` took out (a list, array or
        Series of item IDs; :meth:`Recommender.restore_items`).

        Returns:
            ``self``; :meth:`save` keeps what stays removed.
        """
        ids = item_ids.to_list() if hasattr(item_ids, "to_list") else item_ids
        self.recommender_ = self.recommender.restore_items(list(ids))
        return self

    # -- measuring ----------------------------------------------------------------
    def evaluate(
        self, test: Any, *, per_user: bool = False, **columns: Any
    ) -> Evaluation:
        """Full-catalogue figures on a test table (same kinds as :meth:`fit`'s
        ``data``), read with the column names :meth:`fit` was given unless
        ``user_col=`` etc. say otherwise; ``per_user``: also each test user's
        figures of the served list (:attr:`Evaluation.per_user`)."""
        rec = self.recommender
        like = self.split_.fit if self.split_ is not None else None
        names = dataclasses.replace(self.columns_ or _Columns(), **columns)
        data = self._as_dataset(test, names, like=like, held_out=True)
        if like is None:  # a loaded model: cast to the vocabularies' types
            from twostage.retrieval.evaluation import with_training_tables

            typed = (
                pl.col(USER).cast(rec.user_vocab.values.dtype),
                pl.col(ITEM).cast(rec.item_vocab.values.dtype),
            )
            data = data.with_interactions(data.interactions.with_columns(*typed))
            if data.shown is not None:
                data = data.with_shown(data.shown.with_columns(*typed))
            data = with_training_tables(rec.run, data)  # features the rows lack
        retrieval = rec.run.evaluate(data, keep_queries=per_user)
        _say_left_out(retrieval.counts)
        ranking = None
        if rec.ranker is not None:
            from twostage.ranking.evaluation import evaluate_ranking

            ranking = evaluate_ranking(  # the ranker as trained, as retrieval's
                rec.trained_ranker,  # type: ignore[arg-type]
                data,
                keep_queries=per_user,
            )
        kept = {} if ranking is None else ranking.pop("queries", {})
        evaluation = _summarise(retrieval, ranking)
        if not per_user:
            return evaluation
        from twostage.retrieval.evaluation import eval_queries

        served = kept.get("two_stage") or retrieval.queries["exclude_seen"]
        frame = served.to_frame()
        user_ids = eval_queries(rec.run, data).user_ids.gather(frame["query"])
        table = frame.select(user_ids.alias(names.user_col), pl.all())
        return dataclasses.replace(evaluation, per_user=table)

    def _evaluation(self, metrics: Any, stages: Any) -> Evaluation:
        retrieval = EvalResult.from_dict(metrics)
        _say_left_out(retrieval.counts)
        return _summarise(retrieval, stages.ranking_metrics)

    # -- saving -------------------------------------------------------------------
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the bundle ``twostage serve`` and :meth:`load` read."""
        return self.recommender.save(directory, overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | Path) -> TwoStageModel:
        """A fitted model from a bundle, a ``models/<name>/`` directory (its newest
        version) or a ``train retrieval`` run; its config is the saved one."""
        from twostage.recommender import load

        rec = load(directory)
        model = cls(rec.run.config, ranking=rec.ranker is not None, progress=False)
        model.recommender_ = rec
        model.columns_ = _Columns.of(rec.run.config.data)  # new rows read alike
        return model

    def __repr__(self) -> str:
        c = self.config
        head = f"TwoStageModel(examples={c.retrieval.examples}"
        head += f", dim={c.retrieval.output_dim}, epochs={c.train.epochs}"
        if c.retrieval.ensemble:
            encoders = (c.retrieval.query_encoder, *c.retrieval.ensemble)
            head += f", ensemble={'+'.join(encoders)}"
        head += f", ranking={'on' if self.ranking else 'off'}"
        if self.recommender_ is None:
            return head + ", not fitted)"
        rec = self.recommender_
        return (
            f"{head}, fitted: {rec.user_vocab.size - 1:,} users x "
            f"{rec.item_vocab.size - 1:,} items, index={rec.index_kind})"
        )

    def get_params(self) -> dict[str, Any]:
        """The config as a plain dict (what :meth:`save` writes as config.json)."""
        return json.loads(json.dumps(to_dict(self.config)))


def _summarise(retrieval: EvalResult, ranking: dict[str, Any] | None) -> Evaluation:
    names = ("recall", "ndcg", "hit_rate")
    if ranking is not None and "two_stage" in ranking:
        served = {
            m: {int(k): v for k, v in ranking["two_stage"][m].items()} for m in names
        }
        found = ranking.get("standard_errors", {}).get("two_stage", {})
        errors = {m: {int(k): v for k, v in found[m].items()} for m in found}
    else:
        served = {m: retrieval.metrics["exclude_seen"][m] for m in names}
        found = retrieval.standard_errors.get("exclude_seen", {})
        errors = {m: dict(found[m]) for m in names if m in found}
    return Evaluation(
        recall=served["recall"],
        ndcg=served["ndcg"],
        hit_rate=served["hit_rate"],
        retrieval=retrieval,
        ranking=ranking,
        num_users=retrieval.counts.get("exclude_seen", {}).get(
            "num_queries_with_relevant", retrieval.num_queries
        ),
        standard_errors=errors,
    )


def _is_many(user_ids: Any) -> bool:
    return isinstance(user_ids, list | tuple | np.ndarray | pl.Series) or (
        type(user_ids).__module__.split(".")[0] == "pandas"
    )


def _indices(vocab: Any, argument: str, values: list[Any]) -> torch.Tensor:
    """Vocabulary indices of raw IDs, each an integer or a string (None:
    unknown), as :meth:`Recommender.recommend` takes them."""
    integers = True
    for position, value in enumerate(values):
        if value is not None:
            check_raw_id(f"{argument}[{position}]", value)
            integers = integers and not isinstance(value, str)
        else:
            integers = False
    if integers and vocab.values.dtype.is_integer():  # the usual case, vectorised
        column = pl.Series(values, dtype=pl.Int64)
        return torch.from_numpy(vocab.transform(column).astype(np.int64))
    return torch.tensor([vocab.lookup(v) for v in values], dtype=torch.int64)


def _canonical(vocab: Any, values: list[Any], indices: torch.Tensor) -> pl.Series:
    """The raw IDs as the vocabulary holds them (``"0032"`` -> 32 for integer IDs),
    for the model's own lookup; an unknown ID stays as given where it has the
    vocabulary's type (its hash bucket) and is None otherwise."""
    known = vocab.values
    start = vocab.num_oov_buckets
    numeric = known.dtype.is_integer()
    raw = known.to_list()
    out = [
        raw[i - start]
        if i >= start
        else (v if isinstance(v, int | np.integer) == numeric else None)
        for v, i in zip(values, indices.tolist(), strict=True)
    ]
    return pl.Series(USER, out, dtype=known.dtype)


#: ``data`` settings that ``TwoStageModel.fit`` does not read, and what does the
#: job there: it fits on the tables it is given, which were read already.
_UNREAD_DATA = {
    "split": "it fits on the rows given: split them first (twostage.random_split, "
    "temporal_split, leave_last_out) and pass validation= / test=",
    "test_fraction": "split the rows first and pass test=",
    "cold_user_fraction": "hold users out of the rows you pass",
    "test_users": "pass test= with the users to measure",
    "train_file": "pass the rows as data=",
    "test_file": "pass the rows as test=",
    "user_features": "pass users= (a table keyed by user), or columns through "
    "read_interactions(user_features=...)",
    "item_features": "pass items=, or read_interactions(item_features=...)",
    "min_user_rows": "filter the rows first (twostage.data.filtering.min_counts)",
    "min_item_rows": "filter the rows first (twostage.data.filtering.min_counts)",
}


def _refuse_unread_data_settings(data: Any) -> None:
    """``data`` settings away from their defaults that ``fit`` would not read
    (``settings={"data.split": "temporal"}`` fitted on the rows as given, without
    a word), each with what does its job."""
    from twostage.config import DataConfig

    default = DataConfig()
    unread = [
        f"`data.{key}` ({how})"
        for key, how in _UNREAD_DATA.items()
        if getattr(data, key) != getattr(default, key)
    ]
    if unread:
        raise ConfigError(
            "TwoStageModel.fit does not read these settings, which the command "
            "line's data loading reads: " + "; ".join(unread) + ". Unset them."
        )


def _as_list(values: Any) -> list[Any]:
    if isinstance(values, np.ndarray):
        return values.tolist()
    if hasattr(values, "to_list"):
        return list(values.to_list())
    if hasattr(values, "tolist"):
        return list(values.tolist())
    if isinstance(values, Sequence) and not isinstance(values, str):
        return list(values)
    return [values]
