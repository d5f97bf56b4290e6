"""Saving and loading a trained ranker: config and state as JSON, weights and tables
as safetensors (never pickle)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from twostage.artifacts import read_safetensors
from twostage.config import RankingConfig, from_dict, save_config
from twostage.errors import ArtifactError, clause
from twostage.models.linear_items import LinearItemsModel
from twostage.ranking.run import RankingRun, build_ranking_model
from twostage.retrieval.run import RetrievalRun

_CONFIG, _WEIGHTS, _TABLES, _STATE, _EASE = (
    "ranking_config.json",
    "ranking.safetensors",
    "ranking_tables.safetensors",
    "ranking_state.json",
    "ranking_ease.safetensors",
)


def save_ranking(ranking: RankingRun, directory: str | Path) -> None:
    """Write config and state (JSON), weights, seen/history tables and the EASE
    term when there is one (safetensors).

    The retrieval run is saved on its own (``RetrievalRun.save``); pass it back to
    :func:`load_ranking`.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_config(ranking.config, out / _CONFIG)
    weights = ranking.model.state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, out / _WEIGHTS)
    tensors = ranking.tensors
    tables = {
        "history": tensors.history,
        "users": tensors.users,
        "items": tensors.items,
    }
    save_file({k: v.contiguous() for k, v in tables.items()}, out / _TABLES)
    if ranking.ease is not None:
        ease = ranking.ease.state_dict()
        save_file({k: v.contiguous() for k, v in ease.items()}, out / _EASE)
    state = {
        "blend_weight": ranking.blend_weight,
        "rating_bounds": list(ranking.rating_bounds),
        "history": ranking.history,
        "train_seconds": ranking.train_seconds,
        "reads_context": ranking.reads_context,
    }
    if ranking.metrics is not None:
        state["metrics"] = ranking.metrics
    (out / _STATE).write_text(json.dumps(state, indent=2) + "\n")


def load_ranking(directory: str | Path, retrieval_run: RetrievalRun) -> RankingRun:
    """Rebuild a saved ranker from its own config and weights (strict key checks).

    Args:
        directory: what :func:`save_ranking` wrote.
        retrieval_run: the retrieval run the ranker was trained on.
    """
    path = Path(directory)
    try:
        values = json.loads((path / _CONFIG).read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{_CONFIG} does not hold a mapping")
        # Saved before the ranker shared `train.seed` and `data.validation_fraction`;
        # neither changes a trained ranker.
        values.pop("seed", None)
        values.pop("validation_fraction", None)
        config = from_dict(RankingConfig, values)
        weights, tables = load_file(path / _WEIGHTS), read_safetensors(path / _TABLES)
        state = json.loads((path / _STATE).read_text())
        model = build_ranking_model(retrieval_run, config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        low, high = (float(v) for v in state["rating_bounds"])
        blend_weight = float(state["blend_weight"])
        train_seconds = float(state["train_seconds"])
        history = list(state["history"])
        # Rankers saved before it read no context.
        reads_context = state.get("reads_context", False)
        if not isinstance(reads_context, bool):
            raise ValueError(f"`reads_context` in {_STATE} is not true or false")
        metrics = state.get("metrics")  # bundles saved before it have none
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError(f"`metrics` in {_STATE} is not a mapping")
        ease = None
        if config.ease_weight > 0:
            ease = LinearItemsModel(retrieval_run.tensors.num_items, config.ease_rank)
            ease.load_state_dict(load_file(path / _EASE))  # strict: names and shapes
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        RuntimeError,
        SafetensorError,
    ) as e:
        raise ArtifactError(
            f"cannot load the ranker in {str(path)!r}: {clause(e)}. Is it a directory written "
            "by save_ranking, loaded with the retrieval run it was trained on?"
        ) from e
    if missing or unexpected:
        raise ArtifactError(
            f"weights in {str(path / _WEIGHTS)!r} do not match the saved config: "
            f"missing keys {missing}, unexpected keys {unexpected}."
        )
    model.eval()
    tensors = dataclasses.replace(
        retrieval_run.tensors,
        history=tables["history"],
        users=tables["users"],
        items=tables["items"],
        weights=None,
    )
    return RankingRun(
        config=config,
        retrieval=retrieval_run,
        model=model,
        tensors=tensors,
        blend_weight=blend_weight,
        rating_bounds=(low, high),
        history=history,
        train_seconds=train_seconds,
        ease=ease,
        metrics=metrics,
        reads_context=reads_context,
    )
