"""A retrieval experiment end to end: load, split, fit features, train, evaluate, save.

This is what ``twostage train retrieval`` and ``twostage evaluate`` run, and what the
Python API exposes as :func:`fit_retrieval` / :func:`load_run`. Evaluating a saved run
again (``twostage evaluate DIR``) is :mod:`twostage.reevaluate`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from twostage.batches import (
    RetrievalTensors,
    query_features,
    tensors_from_flat,
    tensors_to_flat,
)
from twostage.config import ExperimentConfig, RetrievalConfig, from_dict, save_config
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.data.split import Split
from twostage.errors import ArtifactError, ConfigError, DataError
from twostage.evaluate import EvalResult, evaluate_embeddings, evaluate_scores
from twostage.features import FeatureSpec
from twostage.metrics import UserItems
from twostage.models.retrieval import RetrievalModel
from twostage.models.towers import FieldInfo
from twostage.prepare import build_tensors, prepare_split, with_history_of
from twostage.train import ProgressFn, TrainResult, train_retrieval

__all__ = [
    "RetrievalRun",
    "build_model",
    "spec_for",
    "fit_retrieval",
    "load_run",
    "read_retrieval",
]

logger = logging.getLogger(__name__)


def build_model(spec: FeatureSpec, config: RetrievalConfig) -> RetrievalModel:
    """The two towers for a fitted spec (from the saved config, never from defaults)."""

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


def spec_for(dataset: Dataset, config: ExperimentConfig) -> FeatureSpec:
    retrieval = config.retrieval
    spec = FeatureSpec.default_for(
        dataset, use_side_features=retrieval.use_side_features
    )

    def keep(fields: Any, wanted: tuple[str, ...], key: str) -> list[Any]:
        if not retrieval.use_side_features:
            return [f for f in fields if f.name == key]
        if not wanted:
            return list(fields)
        names = {f.name for f in fields}
        unknown = sorted(set(wanted) - names)
        if unknown:
            raise ConfigError(
                f"unknown feature column(s) {unknown} in the retrieval config; the data "
                f"offers {sorted(names)}."
            )
        return [f for f in fields if f.name == key or f.name in wanted]

    return FeatureSpec(
        query=keep(spec.query, retrieval.query_fields, USER),
        candidate=keep(spec.candidate, retrieval.candidate_fields, ITEM),
    )


@dataclass
class RetrievalRun:
    """A trained retrieval model with everything needed to use and evaluate it."""

    config: ExperimentConfig
    spec: FeatureSpec
    model: RetrievalModel
    tensors: RetrievalTensors
    train_result: TrainResult = field(default_factory=TrainResult)
    metrics: dict[str, Any] = field(default_factory=dict)

    def item_embeddings(self) -> torch.Tensor:
        """``[N, D]`` embeddings of every vocabulary item (row 0: the OOV item)."""
        with torch.no_grad():
            return self.model.encode_items(self.tensors.item_features)

    def query_embeddings(
        self, user_ids: pl.Series, *, users: pl.DataFrame | None
    ) -> torch.Tensor:
        """``[Q, D]`` query embeddings of raw user IDs; unknown users use their features."""
        features = self.spec.transform_queries(user_ids.rename(USER), users=users)
        user_idx = torch.from_numpy(self.spec.vocabulary(USER).transform(user_ids))
        features["history"] = self.tensors.history[user_idx]
        with torch.no_grad():
            return self.model.encode_queries(features)

    def evaluate(
        self, test: Dataset, *, ks: tuple[int, ...] = (1, 5, 10, 50, 100)
    ) -> EvalResult:
        """Full-catalogue metrics on a test split, with and without seen items."""
        return evaluate_run_embeddings(self, test, ks=ks)

    def save(self, directory: str | Path) -> None:
        """Write config, feature spec, weights, training tensors and metrics."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_config(self.config, out / "config.json")
        self.spec.save(out / "features.json")
        save_file(
            {k: v.contiguous() for k, v in self.model.state_dict().items()},
            out / "model.safetensors",
        )
        save_file(tensors_to_flat(self.tensors), out / "tables.safetensors")
        (out / "history.json").write_text(
            json.dumps(self.train_result.history, indent=2)
        )
        if self.metrics:
            (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2))


@dataclass
class TestQueries:
    """A test split turned into evaluation inputs over the run's vocabularies."""

    user_ids: pl.Series  # [Q] raw IDs of the test users
    user_idx: np.ndarray  # [Q] their vocabulary indices (0: unknown, cold)
    relevant: UserItems  # test items per query
    seen: UserItems  # training items per query
    valid_items: np.ndarray  # [N] bool, False for the OOV row
    slices: dict[str, np.ndarray] | None
    item_slices: dict[str, np.ndarray]


def test_queries(run: RetrievalRun, test: Dataset) -> TestQueries:
    """One query per test user; relevant = their test items, seen = training items."""
    user_vocab, item_vocab = run.spec.vocabulary(USER), run.spec.vocabulary(ITEM)
    inter = test.interactions
    user_ids = inter[USER].unique().sort()
    position = user_ids.to_frame().with_row_index("q")
    rows_arr = inter.select(USER).join(
        position, on=USER, how="left", maintain_order="left"
    )["q"]
    relevant = UserItems.from_pairs(
        rows_arr.to_numpy().astype(np.int64),
        item_vocab.transform(inter[ITEM]),
        num_rows=len(user_ids),
    )
    user_idx = user_vocab.transform(user_ids)
    valid = np.ones(item_vocab.size, dtype=bool)
    valid[0] = False
    cold = user_idx == 0
    cold_items = np.zeros(item_vocab.size, dtype=bool)
    cold_items[0] = True  # test items never seen in training all map to the OOV row
    return TestQueries(
        user_ids=user_ids,
        user_idx=user_idx,
        relevant=relevant,
        seen=_seen_of(run.tensors, user_idx),
        valid_items=valid,
        slices={"warm_users": ~cold, "cold_users": cold} if cold.any() else None,
        item_slices={"cold_items": cold_items},
    )


def evaluate_run_embeddings(
    run: RetrievalRun, test: Dataset, *, ks: tuple[int, ...]
) -> EvalResult:
    """Evaluate the two towers over the whole catalogue (both seen-item modes)."""
    queries = test_queries(run, test)
    return evaluate_embeddings(
        run.query_embeddings(queries.user_ids, users=test.users),
        run.item_embeddings(),
        relevant=queries.relevant,
        seen=queries.seen,
        ks=ks,
        exclude_seen="both",
        valid_items=queries.valid_items,
        slices=queries.slices,
        item_slices=queries.item_slices,
    )


def evaluate_baselines(
    run: RetrievalRun, test: Dataset, *, ks: tuple[int, ...] = (1, 5, 10, 50, 100)
) -> dict[str, EvalResult]:
    """Popularity, EASE and item-kNN on the run's own training data and test split."""
    from twostage.baselines import BASELINES

    queries = test_queries(run, test)
    num_items = run.spec.vocabulary(ITEM).size
    num_users = run.spec.vocabulary(USER).size
    train = UserItems.from_pairs(
        run.tensors.users.numpy(), run.tensors.items.numpy(), num_rows=num_users
    )
    user_idx = torch.from_numpy(queries.user_idx)
    results: dict[str, EvalResult] = {}

    def scorer(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda rows: model.score(user_idx[rows])

    for name, cls in BASELINES.items():
        try:
            model = cls().fit(train, num_items=num_items)
        except ConfigError as e:
            logger.warning("skipping baseline %s: %s", name, e)
            continue
        results[name] = evaluate_scores(
            scorer(model),
            num_items=num_items,
            queries=np.arange(len(user_idx)),
            relevant=queries.relevant,
            seen=queries.seen,
            ks=ks,
            exclude_seen="both",
            valid_items=queries.valid_items,
            slices=queries.slices,
            item_slices=queries.item_slices,
        )
    return results


def _seen_of(tensors: RetrievalTensors, query_idx: np.ndarray) -> UserItems:
    """The training items of each query's user (none for unknown users)."""
    order = np.argsort(tensors.users.numpy(), kind="stable")
    sorted_users = tensors.users.numpy()[order]
    starts = np.searchsorted(sorted_users, query_idx, side="left")
    stops = np.searchsorted(sorted_users, query_idx, side="right")
    stops = np.where(query_idx == 0, starts, stops)
    lengths = stops - starts
    rows = np.repeat(np.arange(len(query_idx)), lengths)
    take = (
        np.concatenate([order[a:b] for a, b in zip(starts, stops, strict=True)])
        if len(rows)
        else np.zeros(0, dtype=np.int64)
    )
    return UserItems.from_pairs(
        rows, tensors.items.numpy()[take], num_rows=len(query_idx)
    )


def fit_retrieval(
    config: ExperimentConfig,
    *,
    dataset: Dataset | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    evaluate_test: bool = True,
) -> tuple[RetrievalRun, Split]:
    """Train a two-tower retrieval model from a config and evaluate it on the test split.

    Args:
        config: data, model and training settings (saved with the run).
        dataset: the data; loaded from ``config.data.dataset`` when None.
        out_dir: where checkpoints and the finished run are written.
        resume: continue an interrupted run from ``out_dir``'s checkpoint.
        on_step: progress callback of the training loop.
        evaluate_test: compute test metrics (stored in ``run.metrics``).
    """
    _set_threads(config)
    if dataset is None:
        dataset = load_dataset_for(config)
    (train, test), validation = prepare_split(dataset, config)
    if train.num_interactions == 0:
        raise DataError("the training split is empty: nothing to train on.")
    started = time.perf_counter()
    spec = spec_for(train, config).fit(train)
    tensors = build_tensors(spec, train, config.retrieval)
    torch.manual_seed(config.train.seed)  # the initial weights are part of the run
    model = build_model(spec, config.retrieval)
    run = RetrievalRun(config=config, spec=spec, model=model, tensors=tensors)
    validate = None
    if validation is not None and validation.num_interactions:
        k = config.train.eval_k

        valid_users, valid_items = _pairs(spec, validation)
        # The validation queries and their features do not change between epochs.
        queries = test_queries(run, validation)
        features = spec.transform_queries(
            queries.user_ids.rename(USER), users=validation.users
        )
        user_idx = torch.from_numpy(queries.user_idx)

        def validate(model: RetrievalModel) -> dict[str, float]:
            features["history"] = tensors.history[user_idx]
            result = evaluate_embeddings(
                model.encode_queries(features),
                run.item_embeddings(),
                relevant=queries.relevant,
                seen=queries.seen,
                ks=(k,),
                valid_items=queries.valid_items,
            )
            loss = validation_loss(model, tensors, valid_users, valid_items, config)
            return {"metric": result.metrics["exclude_seen"]["recall"][k], "loss": loss}

    checkpoints = Path(out_dir) if out_dir is not None else None
    run.train_result = train_retrieval(
        model,
        tensors,
        config.train,
        validate=validate,
        checkpoint_dir=checkpoints,
        resume=resume,
        on_step=on_step,
    )
    logger.info("trained in %.1f s (data prep included)", time.perf_counter() - started)
    if validation is not None and validation.num_interactions:
        # At inference the validation rows are history like any other training row:
        # they feed the query history and are excluded as seen.
        train = train.with_interactions(
            pl.concat([train.interactions, validation.interactions])
        )
        run.tensors = with_history_of(run.tensors, spec, train, config.retrieval)
    if evaluate_test and test.num_interactions:
        run.metrics = run.evaluate(test).to_dict()
    if out_dir is not None:
        run.save(out_dir)
    return run, Split(train, test)


def _pairs(spec: FeatureSpec, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Known (user_idx, item_idx) pairs of a split; pairs with an unknown side dropped."""
    users = spec.vocabulary(USER).transform(data.interactions[USER])
    items = spec.vocabulary(ITEM).transform(data.interactions[ITEM])
    known = (users > 0) & (items > 0)
    return torch.from_numpy(users[known]), torch.from_numpy(items[known])


def validation_loss(
    model: RetrievalModel,
    tensors: RetrievalTensors,
    users: torch.Tensor,
    items: torch.Tensor,
    config: ExperimentConfig,
) -> float:
    """The training loss (same batch size, logQ, no dropout) on held-out pairs."""
    from twostage.losses import in_batch_softmax_loss

    if len(users) == 0:
        return float("nan")
    total, count = 0.0, 0
    size = config.train.batch_size
    probs = tensors.item_probs if config.retrieval.logq_correction else None
    with torch.no_grad():
        for start in range(0, len(users), size):
            u, i = users[start : start + size], items[start : start + size]
            queries = model.encode_queries(query_features(tensors, u))
            candidates = model.encode_items(
                {n: v[i] for n, v in tensors.item_features.items()}
            )
            loss = in_batch_softmax_loss(
                queries,
                candidates,
                temperature=model.temperature,
                candidate_ids=i,
                candidate_probs=None if probs is None else probs[i],
                correction_weight=config.retrieval.logq_weight,
            )
            total += float(loss) * len(u)
            count += len(u)
    return total / count


def _set_threads(config: ExperimentConfig) -> None:
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)


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
        tables = load_file(path / "tables.safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise ArtifactError(f"cannot load {str(path)!r}: {e}. Is it {hint}?") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"weights in {str(path / weights)!r} do not match the saved config: "
            f"missing keys {missing}, unexpected keys {unexpected}."
        )
    model.eval()
    return RetrievalRun(
        config=config, spec=spec, model=model, tensors=tensors_from_flat(tables)
    )


def load_run(directory: str | Path) -> RetrievalRun:
    """Rebuild a saved run from its own config, spec and weights (no pickle)."""
    path = Path(directory)
    run = read_retrieval(
        path,
        weights="model.safetensors",
        hint="the --out directory of `twostage train retrieval`",
    )
    try:
        run.train_result.history = json.loads((path / "history.json").read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {str(path / 'history.json')!r}: {e}") from e
    metrics_path = path / "metrics.json"
    if metrics_path.exists():
        run.metrics = json.loads(metrics_path.read_text())
    return run


def load_dataset_for(config: ExperimentConfig) -> Dataset:
    """The dataset a config names, with its column mapping."""
    from twostage.data.registry import load_dataset

    data = config.data
    return load_dataset(
        data.dataset,
        user_col=data.user_col,
        item_col=data.item_col,
        time_col=data.time_col,
        rating_col=data.rating_col,
        separator=data.separator,
        user_features=list(data.user_features) or None,
        item_features=list(data.item_features) or None,
    )
