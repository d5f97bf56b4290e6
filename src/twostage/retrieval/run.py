"""The trained retrieval model and everything needed to use it: :class:`RetrievalRun`,
building the two towers from a saved config, and saving/loading a run (no pickle).

Loading a run imports no fitting code, loss or data download: the server loads runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from twostage.artifacts import read_safetensors, refuse_bundle_target
from twostage.config import (
    CLOSED_FORM_MEMBERS,
    ExperimentConfig,
    RetrievalConfig,
    from_dict,
    save_config,
)
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.errors import ArtifactError, ConfigError, clause
from twostage.features import FeatureSpec
from twostage.features.context import context_field, context_frame, context_names
from twostage.features.fields import Field
from twostage.models.ensemble import (
    EnsembleModel,
    Member,
    member_configs,
    member_kinds,
)
from twostage.models.fields import HISTORY, HISTORY_RATINGS, HISTORY_TIMES
from twostage.models.linear_items import LinearItemsModel
from twostage.models.retrieval import RetrievalModel
from twostage.models.session_knn import SessionNeighbours
from twostage.models.towers import FieldInfo
from twostage.retrieval.tensors import (
    RetrievalTensors,
    context_keys,
    tensors_from_flat,
    tensors_to_flat,
)
from twostage.training import TrainResult, main_member

if TYPE_CHECKING:
    from twostage.evaluate import EvalResult

__all__ = [
    "RUN_WEIGHTS",
    "read_records",
    "write_records",
    "RetrievalRun",
    "Towers",
    "build_member",
    "build_model",
    "encode_queries",
    "load_run",
    "refuse_foreign_target",
    "read_retrieval",
    "spec_for",
]

logger = logging.getLogger(__name__)


#: The two towers' weights in a saved run directory (a bundle names them otherwise).
RUN_WEIGHTS = "model.safetensors"
#: The serving rules of a run (the popularity fallback), in runs and bundles.
SERVING = "serving.json"
#: What a run directory holds: a directory with any of these, and no run in it,
#: is someone's other work (:func:`refuse_foreign_target`).
RUN_FILES = (
    "config.json",
    "features.json",
    RUN_WEIGHTS,
    "tables.safetensors",
    "history.json",
    "metrics.json",
    SERVING,
    "items.parquet",
    "checkpoint",
)


def refuse_foreign_target(directory: str | Path) -> None:
    """Refuse to write a run into a directory whose files of the same names are
    not a run's (``--out .`` in a project with its own ``config.json``): they would
    be replaced. A new or empty directory, or an earlier run, is fine.

    Raises:
        ArtifactError: naming the files that would be overwritten.
    """
    out = Path(directory)
    if not out.is_dir():
        return
    if (out / RUN_WEIGHTS).exists() or (out / "checkpoint").is_dir():
        return  # an earlier run, or one in progress
    if (out / "member-0").is_dir():
        return  # an ensemble's checkpoints
    clashes = [name for name in RUN_FILES if (out / name).exists()]
    if clashes:
        raise ArtifactError(
            f"{str(out)!r} holds files that are not a run's, and a run would write "
            f"over them: {', '.join(clashes)}. Save the run to a new directory."
        )


#: What reading a malformed artifact raises (an ArtifactError wraps each).
_MALFORMED = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    RuntimeError,  # RecursionError and torch's shape errors included
    SafetensorError,
)


#: What a run serves: one two-tower model, or several (``retrieval.ensemble``).
Towers = RetrievalModel | EnsembleModel


#: Queries per call of a model's ``encode_queries`` in :func:`encode_queries`: a
#: chunk's ``[chunk, L, D]`` history vectors are 105 MB at a history of 100 and
#: width 64, where a million users' at once would take 25.6 GB.
QUERY_CHUNK = 4096


def encode_queries(model: Towers, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[Q, D]`` ``model.encode_queries(features)`` of ``Q`` queries (every
    value row-aligned, ``[Q, ...]``), ``QUERY_CHUNK`` queries a call, without a
    gradient."""
    sizes = {len(v) for v in features.values()}
    with torch.no_grad():
        if len(sizes) != 1 or (count := sizes.pop()) <= QUERY_CHUNK:
            return model.encode_queries(features)
        return torch.cat(
            [
                model.encode_queries(
                    {k: v[start : start + QUERY_CHUNK] for k, v in features.items()}
                )
                for start in range(0, count, QUERY_CHUNK)
            ]
        )


def build_model(spec: FeatureSpec, config: RetrievalConfig) -> Towers:
    """The two towers for a fitted spec (from the saved config, never from defaults);
    with ``retrieval.ensemble``, one pair per member (:func:`build_member`)."""
    if config.ensemble:
        members: list[Member] = [
            build_member(spec, member, kind=kind)
            for kind, member in zip(
                member_kinds(config), member_configs(config), strict=True
            )
        ]
        return EnsembleModel(members, config)
    return build_member(spec, config)


@overload
def build_member(spec: FeatureSpec, config: RetrievalConfig) -> RetrievalModel: ...


@overload
def build_member(
    spec: FeatureSpec, config: RetrievalConfig, *, kind: str
) -> Member: ...


def build_member(
    spec: FeatureSpec, config: RetrievalConfig, *, kind: str = ""
) -> Member:
    """One pair of towers, for a config without ``ensemble``; ``kind="ease"`` or
    ``"transition"``: that closed-form member (:mod:`twostage.models.linear_items`),
    still unfitted."""
    if kind in CLOSED_FORM_MEMBERS:
        return LinearItemsModel(
            spec.vocabulary(ITEM).size,
            config.ease_rank,
            last_item_only=kind == "transition",
            recency=config.ease_recency if kind == "ease" else 0.0,
        )

    def fields(side: str) -> list[FieldInfo]:
        return [
            FieldInfo(f.key, f.output, f.num_embeddings or 0, f.width)
            for f in spec.describe(side=side)  # type: ignore[arg-type]
        ]

    return RetrievalModel(
        fields("query"),
        fields("candidate"),
        num_items=spec.vocabulary(ITEM).size,
        config=config,
    )


def _with_field_kinds(
    spec: FeatureSpec, dataset: Dataset, entries: tuple[str, ...]
) -> FeatureSpec:
    """``spec`` with the side-feature columns of ``retrieval.field_kinds`` encoded
    as named (``"category_id=categorical"``), added where the default left the
    column out."""
    query, candidate = list(spec.query), list(spec.candidate)
    for entry in entries:
        name, _, kind = (part.strip() for part in entry.partition("="))
        if name in (USER, ITEM):
            raise ConfigError(
                f"`retrieval.field_kinds` names {name!r}, the key of its tower, "
                "which is always an ID field; name a side-feature column."
            )
        sides = [
            (fields, table)
            for fields, table in ((query, dataset.users), (candidate, dataset.items))
            if table is not None and name in table.columns
        ]
        if not sides:
            offered = sorted(
                c
                for table in (dataset.users, dataset.items)
                if table is not None
                for c in table.columns
                if c not in (USER, ITEM)
            )
            raise ConfigError(
                f"`retrieval.field_kinds` names {name!r}, which is no user or item "
                f"feature column; the data offers {offered}."
            )
        for fields, _table in sides:
            chosen = Field(name, kind)  # type: ignore[arg-type]  # checked by config
            at = [i for i, f in enumerate(fields) if f.name == name]
            if at:
                fields[at[0]] = chosen
            else:
                fields.append(chosen)
            logger.info("feature %r encoded as %s (retrieval.field_kinds)", name, kind)
    return FeatureSpec(query=query, candidate=candidate)


def spec_for(dataset: Dataset, config: ExperimentConfig) -> FeatureSpec:
    """The fields of both towers for a training split and config.

    ``retrieval.query_fields`` may name user-table columns and context columns (the
    timestamp, per-row columns, ``hour_of_day``, ``day_of_week``:
    :mod:`twostage.features.context`); the ID fields are always used.
    """
    retrieval = config.retrieval
    spec = FeatureSpec.default_for(
        dataset, use_side_features=retrieval.use_side_features
    )
    if retrieval.field_kinds:
        if not retrieval.use_side_features:
            raise ConfigError(
                "`retrieval.field_kinds` sets how side features are encoded, and "
                "`retrieval.use_side_features` = false reads none; unset one."
            )
        spec = _with_field_kinds(spec, dataset, retrieval.field_kinds)
    user_columns = {f.name for f in spec.query}
    offered = context_names(dataset)
    context = [
        n for n in retrieval.query_fields if n not in user_columns and n in offered
    ]

    def keep(fields: Any, wanted: tuple[str, ...], key: str) -> list[Any]:
        if not retrieval.use_side_features:
            return [f for f in fields if f.name == key]
        if not wanted:  # nothing named: every column the data offers
            return list(fields)
        wanted = tuple(n for n in wanted if n not in context)
        names = {f.name for f in fields}
        unknown = sorted(set(wanted) - names)
        if unknown:
            raise ConfigError(
                f"unknown feature column(s) {unknown} in the retrieval config; the data "
                f"offers {sorted(names)} and the context columns {offered}."
            )
        return [f for f in fields if f.name == key or f.name in wanted]

    query = keep(spec.query, retrieval.query_fields, USER)
    query += [context_field(name, dataset) for name in context]
    return FeatureSpec(
        query=query,
        candidate=keep(spec.candidate, retrieval.candidate_fields, ITEM),
    )


@dataclass
class RetrievalRun:
    """A trained retrieval model with everything needed to use and evaluate it.

    Attributes:
        popularity_fallback: users with at most this many training items get the
            most-popular list (:mod:`twostage.retrieval.fallback`); 0: nobody.
        fallback: the validation figures the threshold was picked on, if it was.
        session_knn_weight: the weight of the session-kNN term (0: none);
            ``retrieval.session_knn_weight``, or with -1 there the one picked on
            validation (:func:`twostage.retrieval.fallback.choose_term_weight`).
        session_knn: the validation figures that weight was picked on, if it was.
    """

    config: ExperimentConfig
    spec: FeatureSpec
    model: Towers
    tensors: RetrievalTensors
    train_result: TrainResult = field(default_factory=TrainResult)
    metrics: dict[str, Any] = field(default_factory=dict)
    popularity_fallback: int = 0
    fallback: dict[str, Any] | None = None
    session_knn_weight: float = 0.0
    session_knn: dict[str, Any] | None = None
    #: The input rows the loader left out, by reason (streamed training; not saved).
    load_report: dict[str, Any] | None = None
    #: A streamed run's rows on each side of its split: ``training``,
    #: ``validation``, ``test`` (not saved).
    stream_rows: dict[str, int] | None = None
    #: The Parquet log a streamed run was trained on (saved): its test side is that
    #: stream's split, which re-evaluation reads again (``evaluate_streamed``).
    stream: str | None = None
    #: Each test query's figures by mode (``exclude_seen``...), kept when
    #: :func:`~twostage.retrieval.fit.fit_retrieval` was asked to
    #: (``keep_queries``); not saved.
    test_queries: dict[str, Any] | None = field(default=None, repr=False)
    #: The session-kNN term's neighbours, built on first use from the sequences
    #: they are read from (saved, ``tensors.neighbour_items``), rebuilt when those
    #: change.
    _neighbours: tuple[torch.Tensor, SessionNeighbours] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        # An ordered history may read the items' features (a no-op otherwise).
        self.model.attach_item_features(self.tensors.item_features)
        # -1 (picked on validation) keeps the field: 0 until the pick, then its.
        if self.config.retrieval.session_knn_weight >= 0:
            self.session_knn_weight = self.config.retrieval.session_knn_weight

    def uses_popularity(self, user_idx: np.ndarray) -> np.ndarray:
        """``[Q]`` bool: which users (by index; 0 = unknown) get the most-popular
        list under the run's fallback rule. An unknown user has no training items,
        so the rule covers them too (validation measured them that way)."""
        if self.popularity_fallback <= 0:
            return np.zeros(len(user_idx), dtype=bool)
        counts = self.tensors.seen().lengths()
        return counts[user_idx] <= self.popularity_fallback

    @property
    def scores_exactly(self) -> bool:
        """Whether retrieval adds the session-kNN term (:attr:`session_knn_weight`
        > 0), which no index holds: every item is then scored exactly, embeddings'
        dot product plus :meth:`neighbour_term`."""
        return self.session_knn_weight > 0

    def neighbour_term(
        self,
        user_idx: torch.Tensor,
        *,
        sessions: torch.Tensor | None = None,
        weight: float | None = None,
    ) -> torch.Tensor:
        """``[B, N]``: the session-kNN term of each query (0 without the term).

        Args:
            user_idx: ``[B]`` the queries' users (0: unknown); a known user's
                latest stored items are the query, and never their own neighbour.
            sessions: ``[B, S]`` items to read after them (a request's session,
                most recent last, 0 = padding); an unknown user's query is it alone.
            weight: the term's weight; :attr:`session_knn_weight` when None (1:
                the standardised scores themselves, as validation weighs them).
        """
        num_items = int(self.tensors.item_probs.shape[0])
        weight = self.session_knn_weight if weight is None else weight
        if weight == 0:
            return torch.zeros(len(user_idx), num_items)
        tensors = self.tensors
        if not tensors.has_neighbours:
            raise ConfigError(
                "`retrieval.session_knn_weight` != 0 reads each user's latest items, "
                "and this run's tables hold none (built before the term was set). "
                "Train the run again with the term, or set it to 0."
            )
        stored = tensors.neighbour_items
        if self._neighbours is None or self._neighbours[0] is not stored:
            cfg = self.config.retrieval
            self._neighbours = (
                stored,
                SessionNeighbours(
                    tensors.neighbour_lengths,
                    stored,
                    num_items=num_items,
                    neighbours=cfg.session_knn_neighbours,
                    recency=cfg.session_knn_recency,
                    proximity=cfg.session_knn_proximity,
                    sample=cfg.session_knn_sample,
                    latest=tensors.neighbour_latest,
                ),
            )
        raw = self._neighbours[1].score_users(user_idx, sessions=sessions)[:, 1:]
        # Standardised over the catalogue (not the OOV row), then weighted.
        spread = raw.std(dim=1, keepdim=True)
        term = torch.where(
            spread > 0, (raw - raw.mean(dim=1, keepdim=True)) / spread, 0.0
        )
        return torch.nn.functional.pad(term * weight, (1, 0))

    def item_embeddings(self) -> torch.Tensor:
        """``[N, D]`` embeddings of every vocabulary item (row 0: the OOV item)."""
        with torch.no_grad():
            return self.model.encode_items(self.tensors.item_features)

    def query_embeddings(
        self,
        user_ids: pl.Series,
        *,
        users: pl.DataFrame | None,
        context: Mapping[str, Any] | pl.DataFrame | None = None,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``[Q, D]`` query embeddings of raw user IDs; unknown users use their features.

        Args:
            user_ids: ``[Q]`` raw user IDs.
            users: the user feature table (for users the model has not seen). None
                with a model that reads user features: known users read the
                features they trained with (as serving reads them), unknown ones
                none (missing values).
            context: the per-interaction context of each query, for a model that reads
                some (a frame of ``Q`` rows, or one mapping for all); missing values
                encode as unknown.
            history: ``([Q, L], [Q, L])`` items and times (``L``: the tables'
                history length, most recent last, 0 = padding) that a query with
                any item reads instead of its stored history: a new user's prior
                rows (:class:`~twostage.retrieval.tensors.PriorHistory`), read as
                serving reads a session.
        """
        frame = context_frame(user_ids, context, context_keys(self.spec))
        user_idx = torch.from_numpy(self.spec.vocabulary(USER).transform(user_ids))
        if users is None and self.reads_user_table:
            # Row 0 of the training tensors is the unknown user: missing values.
            features = {k: v[user_idx] for k, v in self.tensors.user_features.items()}
            features.update(self.spec.transform_context(frame))
        else:
            features = self.spec.transform_queries(frame, users=users)
        features.update(self.tensors.history_features(user_idx))
        if history is not None and HISTORY in features and features[HISTORY].shape[1]:
            fresh = (history[0] > 0).any(dim=1, keepdim=True)
            for key, rows in zip((HISTORY, HISTORY_TIMES), history, strict=True):
                if key in features:
                    features[key] = torch.where(fresh, rows, features[key])
            if HISTORY_RATINGS in features:  # prior rows carry no ratings
                ratings = features[HISTORY_RATINGS]
                features[HISTORY_RATINGS] = ratings.masked_fill(fresh, 0)
        return encode_queries(self.model, features)

    @property
    def reads_user_table(self) -> bool:
        """Whether a query field reads the user feature table."""
        return any(i.source == "users" for i in self.spec.describe(side="query"))

    def evaluate(
        self,
        test: Dataset,
        *,
        ks: tuple[int, ...] = (1, 5, 10, 50, 100),
        shard: bool = False,
        keep_queries: bool = False,
    ) -> EvalResult:
        """Full-catalogue metrics on a test split, with and without seen items;
        ``shard``: every rank of a torch.distributed group scores its share of the
        users and all return the merged figures; ``keep_queries``: also each
        test user's seen-excluded figures (:attr:`EvalResult.queries`), to compare
        with another model's on the same split
        (:func:`twostage.metrics.paired_standard_error`)."""
        from twostage.retrieval.evaluation import evaluate_run_embeddings

        return evaluate_run_embeddings(
            self, test, ks=ks, shard=shard, keep_queries=keep_queries
        )

    def save(self, directory: str | Path) -> None:
        """Write config, feature spec, weights, training tensors and metrics (never
        into a saved bundle version: :func:`~twostage.artifacts.refuse_bundle_target`)."""
        out = Path(directory)
        refuse_bundle_target(out, "a run")
        refuse_foreign_target(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, out / "config.json")
        self.spec.save(out / "features.json")
        save_file(
            {k: v.contiguous() for k, v in self.model.state_dict().items()},
            out / RUN_WEIGHTS,
        )
        save_file(tensors_to_flat(self.tensors), out / "tables.safetensors")
        write_records(self, out)
        write_serving(self, out)


def write_serving(run: RetrievalRun, directory: Path) -> None:
    """``serving.json``: the rules evaluation and serving apply beyond the weights."""
    serving = {
        "popularity_fallback": run.popularity_fallback,
        "fallback": run.fallback,
        "session_knn_weight": run.session_knn_weight,
        "session_knn": run.session_knn,
        "stream": run.stream,
    }
    (directory / SERVING).write_text(json.dumps(serving, indent=2) + "\n")


def _read_serving(run: RetrievalRun, directory: Path) -> None:
    path = directory / SERVING
    if not path.exists():  # saved before the fallback existed: the model serves all
        return
    values = json.loads(path.read_text())
    if not isinstance(values, dict) or not isinstance(
        values.get("popularity_fallback"), int
    ):
        raise ValueError(f"{SERVING} should hold an integer popularity_fallback")
    run.popularity_fallback = values["popularity_fallback"]
    run.fallback = values.get("fallback")
    if run.config.retrieval.session_knn_weight == -1:  # the weight picked on validation
        weight = values.get("session_knn_weight")
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or weight < 0
        ):
            raise ValueError(
                f"{SERVING} should hold the session-kNN weight picked on validation "
                "(a number >= 0), as `retrieval.session_knn_weight` is -1"
            )
        run.session_knn_weight = float(weight)
        run.session_knn = values.get("session_knn")
    stream = values.get("stream")
    if stream is not None and not isinstance(stream, str):
        raise ValueError(f"{SERVING} should hold a path (or null) as stream")
    run.stream = stream


def read_retrieval(path: Path, *, weights: str, hint: str) -> RetrievalRun:
    """Rebuild a retrieval run from ``config.json``, ``features.json``, the weights file
    and ``tables.safetensors`` in ``path``, with strict weight-key checks.

    Args:
        path: the directory holding the files.
        weights: file name of the two-tower weights.
        hint: what ``path`` should be, for the error message.
    """
    try:
        values = json.loads((path / "config.json").read_text())
        if not isinstance(values, dict):
            raise ValueError("config.json does not hold a mapping")
        # Saved before `retrieval.combine` existed: those towers concatenated.
        retrieval = values.get("retrieval")
        if isinstance(retrieval, dict):
            retrieval.setdefault("combine", "concat")
        config = from_dict(ExperimentConfig, values)
        spec = FeatureSpec.load(path / "features.json")
        model = build_model(spec, config.retrieval)
        state = load_file(path / weights)
        tables = read_safetensors(path / "tables.safetensors")
        # A value of the wrong shape or kind (a hand-edited file) is the artifact's
        # fault, named as such, never a raw traceback.
        missing, unexpected = model.load_state_dict(state, strict=False)
        tensors = tensors_from_flat(tables)
    except _MALFORMED as e:
        raise ArtifactError(
            f"cannot load {str(path)!r}: {clause(e)}. Is it {hint}?"
        ) from e
    if missing or unexpected:
        raise ArtifactError(
            f"weights in {str(path / weights)!r} do not match the saved config: "
            f"missing keys {missing}, unexpected keys {unexpected}."
        )
    if (
        config.retrieval.session_knn_sample
        and tensors.has_neighbours
        and not tensors.neighbour_latest.numel()
    ):
        raise ArtifactError(
            f"cannot load {str(path)!r}: its config samples the session-kNN "
            "term's neighbours among the users active last "
            "(`retrieval.session_knn_sample`), and its tables do not say when "
            "each was (`neighbour_latest`). Is it a whole, unedited bundle?"
        )
    model.eval()
    run = RetrievalRun(config=config, spec=spec, model=model, tensors=tensors)
    try:
        _read_serving(run, path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {str(path / SERVING)!r}: {e}") from e
    return run


def load_run(directory: str | Path) -> RetrievalRun:
    """Rebuild a saved run from its own config, spec and weights (no pickle)."""
    path = Path(directory)
    run = read_retrieval(
        path,
        weights=RUN_WEIGHTS,
        hint="the --out directory of `twostage train retrieval`",
    )
    if not (path / "history.json").exists():
        raise ArtifactError(f"cannot read {str(path / 'history.json')!r}: missing")
    read_records(run, path)
    return run


def write_records(run: RetrievalRun, directory: Path) -> None:
    """``history.json`` (per-epoch training records) and ``metrics.json`` (test
    metrics, when there are some): what reports are drawn from."""
    (directory / "history.json").write_text(
        json.dumps(run.train_result.history, indent=2)
    )
    if run.metrics:
        (directory / "metrics.json").write_text(json.dumps(run.metrics, indent=2))


def read_records(run: RetrievalRun, directory: Path) -> None:
    """Read what :func:`write_records` wrote, where it exists (older bundles lack it)."""
    for name in ("history.json", "metrics.json"):
        path = directory / name
        if not path.exists():
            continue
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read {str(path)!r}: {e}") from e
        if name == "history.json":
            run.train_result.history = values
            first = main_member(values)  # an ensemble's first model's epochs
            known = [r for r in first if "validation" in r] or first
            if known:
                key = "validation" if "validation" in known[0] else "train_loss"
                sign = 1 if key == "validation" else -1
                best = max(known, key=lambda r: sign * r[key])
                run.train_result.best_epoch = int(best["epoch"])
        else:
            run.metrics = values
