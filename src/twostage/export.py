"""ONNX export of a bundle's three networks, for serving with Triton, TorchServe or
onnxruntime: ``twostage export BUNDLE --format onnx``.

- ``query_tower.onnx``: the query tower's encoded features (the names and dtypes of
  ``features.json``, plus ``history``, the user's recent item indices, and
  ``history_times``, their times, for models with ``retrieval.sequence_time_gaps``,
  and ``history_ratings``, their rating buckets (0: not known), for models with
  ``retrieval.sequence_ratings``) ->
  ``query_embedding`` ``[B, D]``.
- ``candidate_tower.onnx``: the item features -> ``item_embedding`` ``[N, D]``.
- ``ranker.onnx`` (bundles with a ranking stage): ``user_idx`` ``[B]`` and
  ``item_idx`` ``[B, C]`` -> ``rating`` and ``click`` ``[B, C]``, the user and item
  tables of the bundle inside the graph, as :meth:`RankingRun.score` computes them;
  a ranker that reads per-interaction context also takes each context field
  ``[B, ...]`` (encoded as the query tower takes it; the retrieval query it reads
  is computed inside the graph).

IDs become indices with the vocabularies of ``features.json`` (copied beside the
models; index 0 is the unknown ID). ``export.json`` lists every input and output,
and with a ranker how the served list combines them (``two_stage_order``: the key,
this bundle's blend weight, temperature and EASE weight, and whether the rating
output was trained).
torch's TorchScript-based exporter is used: the ``torch.export`` one cannot trace the
towers' data-dependent bag lookups.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from twostage.errors import ConfigError
from twostage.recommender import Recommender

__all__ = ["FORMATS", "export_bundle", "sample_inputs"]

FORMATS = ("onnx",)
OPSET = 17


class _Tower(nn.Module):
    """A tower as a function of positional tensors (ONNX inputs are positional)."""

    def __init__(self, model: nn.Module, names: list[str], side: str) -> None:
        super().__init__()
        self.model, self.names, self.side = model, names, side

    def forward(self, *inputs: Tensor) -> Tensor:
        features = dict(zip(self.names, inputs, strict=True))
        if self.side == "query":
            return self.model.encode_queries(features)  # type: ignore[operator]
        return self.model.encode_items(features)  # type: ignore[operator]


class _MeanBag(nn.Module):
    """``nn.EmbeddingBag(mode="mean", padding_idx=0)`` on ``[B, M]`` indices, spelled
    with ops the ONNX exporter knows (it rejects a bag with a padding index). Shares
    the bag's weight."""

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.weight = bag.weight

    def forward(self, indices: Tensor) -> Tensor:
        rows = nn.functional.embedding(indices, self.weight)  # (B, M, D)
        keep = (indices != 0).unsqueeze(-1).to(rows.dtype)  # (B, M, 1)
        return (rows * keep).sum(1) / keep.sum(1).clamp_min(1.0)


@contextlib.contextmanager
def _exportable(*models: nn.Module) -> Iterator[None]:
    """Swap each padded mean bag for :class:`_MeanBag` while exporting."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for model in models:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.EmbeddingBag):
                    if child.mode != "mean" or child.padding_idx != 0:
                        raise ConfigError(
                            f"cannot export an EmbeddingBag with mode={child.mode!r}"
                            f" and padding_idx={child.padding_idx!r}."
                        )
                    setattr(parent, name, _MeanBag(child))
                    swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class _Ranker(nn.Module):
    """``RankingRun.score`` with the run's tables baked in as constants."""

    def __init__(self, ranker: Any, context: list[str] | None = None) -> None:
        super().__init__()
        self.ranker = ranker
        self.context = context or []  # the context inputs after the indices
        self.model = ranker.model
        # Registered so that the tracer sees its weights as weights, not constants.
        self.retrieval = ranker.retrieval.model
        with torch.no_grad():
            ranker.retrieval_vectors()  # cached outside the trace: a table in the graph
        self.ease_queries = self.ease_items = None
        if ranker.ease is not None:  # every user's EASE query, a table in the graph
            with torch.no_grad():
                self.ease_queries = ranker.ease.encode_item_sets(ranker.tensors.seen())
            self.ease_items = ranker.ease.right

    def forward(
        self, user_idx: Tensor, item_idx: Tensor, *context: Tensor
    ) -> tuple[Tensor, ...]:
        from twostage.ranking.run import forward_pairs

        rows = dict(zip(self.context, context, strict=True)) if self.context else None
        out = forward_pairs(
            self.ranker, user_idx, item_idx, exclude_target=False, context=rows
        )
        low, high = self.ranker.rating_bounds
        if self.ease_queries is None or self.ease_items is None:
            return out["rating"].clamp(low, high), out["click"]
        # (B, C, r) @ (B, r, 1) -> (B, C): RankingRun.ease_scores
        ease = (self.ease_items[item_idx] @ self.ease_queries[user_idx][:, :, None])[
            :, :, 0
        ]
        return out["rating"].clamp(low, high), out["click"], ease


def sample_inputs(rec: Recommender, side: str, rows: int = 4) -> dict[str, Tensor]:
    """Encoded features of the first ``rows`` known users (``side="query"``; a
    context the model reads is "unknown") or items (``"candidate"``), as the towers
    take them."""
    tensors = rec.run.tensors
    if side == "candidate":
        return {k: v[1 : rows + 1] for k, v in tensors.item_features.items()}
    picked = slice(1, rows + 1)
    features = {k: v[picked] for k, v in tensors.user_features.items()}
    for key, value in rec.encode_context(None).items():  # [1, ...] -> [rows, ...]
        features[key] = value.expand(len(tensors.history[picked]), *value.shape[1:])
    if rec.run.config.retrieval.history_length > 0:
        features.update(tensors.history_features(picked))
    return features


def _export(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, **names: Any
) -> None:
    with warnings.catch_warnings():  # the exporter's notes on tracing and deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_axes={
                n: {0: "batch"} for n in [*names["inputs"], *names["outputs"]]
            }
            | names.get("extra_axes", {}),
            opset_version=OPSET,
            dynamo=False,
        )


def _served_order(rec: Recommender) -> dict[str, Any]:
    """How the served list combines the exported outputs (:mod:`twostage.ranking.
    rerank`), with this bundle's numbers: without them a Triton or onnxruntime
    deployment could not reproduce the order ``twostage serve`` answers."""
    ranker = rec.ranker
    assert ranker is not None
    low, high = ranker.rating_bounds  # type: ignore[attr-defined]
    order: dict[str, Any] = {
        "candidates": "each user's top num_candidates unseen items by retrieval "
        "score, the dot product of query_embedding and item_embedding",
        "num_candidates": ranker.config.num_candidates,
        "key": "click + blend_weight * retrieval_score / temperature"
        + (" + ease_weight * ease" if ranker.ease is not None else "")
        + "; best first, ties in retrieval order",
        "blend_weight": ranker.blend_weight,
        "temperature": float(rec.run.model.temperature),
        "ease_weight": ranker.config.ease_weight if ranker.ease is not None else 0.0,
        "rating": (
            f"the predicted rating, clipped to the training ratings' [{low:g}, "
            f"{high:g}]; shown beside the list, not part of its order"
            if ranker.predicts_ratings
            else "not trained (the log had no ratings, or ranking.rating_weight "
            "was 0): ignore it"
        ),
    }
    return order


#: ``export.json``'s ``not_exported`` for a run with the session-kNN term.
_UNEXPORTED = (
    "retrieval's session-kNN term (retrieval.session_knn_weight = {:g}): the "
    "bundle adds it to the dot product of query_embedding and item_embedding, "
    "a search over the stored users' sequences that no exported network holds; "
    "the exported retrieval scores, and so the candidates and the two-stage "
    "keys, differ from the served ones"
)


def _describe(features: dict[str, Tensor]) -> list[dict[str, Any]]:
    return [
        {
            "name": k,
            "dtype": str(v.dtype).removeprefix("torch."),
            "shape": ["batch", *v.shape[1:]],
        }
        for k, v in features.items()
    ]


def export_bundle(
    rec: Recommender,
    out_dir: str | Path,
    *,
    format: str = "onnx",
    without_session_knn: bool = False,
) -> dict[str, Path]:
    """Write the bundle's networks in ``format`` under ``out_dir``.

    Returns:
        ``{"query_tower", "candidate_tower", ["ranker"], "export", "features"}`` ->
        the file written.

    Args:
        without_session_knn: export a run whose retrieval adds the session-kNN
            term (a search over the stored users' sequences that no network
            holds) without it: the exported retrieval scores, and so the
            candidates, then differ from the served ones, as ``export.json``'s
            ``not_exported`` says.

    Raises:
        ConfigError: an unknown format, a run whose retrieval adds the
            session-kNN term without ``without_session_knn``, or that option
            for a run without the term.
    """
    if format not in FORMATS:
        raise ConfigError(
            f"`format` should be one of {FORMATS}. Received: `format` = {format!r}."
        )
    if rec.run.scores_exactly and not without_session_knn:
        raise ConfigError(
            "this run's retrieval adds the session-kNN term (weight "
            f"{rec.run.session_knn_weight:g}), a search over the stored users' "
            "sequences that no exported network holds: the exported towers would "
            "rank otherwise than the bundle serves. Serve the bundle itself, train "
            "with `retrieval.session_knn_weight=0`, or export the networks without "
            "the term (`without_session_knn`)."
        )
    if without_session_knn and not rec.run.scores_exactly:
        raise ConfigError(
            "`without_session_knn` leaves out a session-kNN term, and this run's "
            "retrieval has none (`retrieval.session_knn_weight` = 0): drop it."
        )
    out = Path(out_dir)
    _clear_target(out)
    out.mkdir(parents=True, exist_ok=True)
    model = rec.run.model.eval()
    networks = [model] if rec.ranker is None else [model, rec.ranker.model]  # type: ignore[attr-defined]
    with _exportable(*networks):
        return _export_all(rec, out, model)


#: Every file an export may write.
_EXPORT_FILES = frozenset(
    {
        "query_tower.onnx",
        "candidate_tower.onnx",
        "ranker.onnx",
        "features.json",
        "export.json",
    }
)


def _clear_target(out: Path) -> None:
    """Let an export go to a new or empty directory, or replace an earlier export
    (its files removed first, so none of them outlives it); refuse anything else,
    such as a bundle, whose own ``features.json`` an export would overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file; export into a directory.")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    foreign = sorted(present - _EXPORT_FILES)
    if foreign or "export.json" not in present:
        raise ConfigError(
            f"{str(out)!r} holds files that are not an earlier export "
            f"({', '.join(foreign[:5] or sorted(present)[:5])}): an export would "
            "overwrite or mix with them. Export into a new or empty directory, or "
            "over an earlier export."
        )
    for name in present:
        (out / name).unlink()


def _export_all(rec: Recommender, out: Path, model: nn.Module) -> dict[str, Path]:
    files: dict[str, Path] = {}
    described: dict[str, Any] = {"opset": OPSET, "models": {}}
    for side, output in (("query", "query_embedding"), ("candidate", "item_embedding")):
        features = sample_inputs(rec, side)
        names = list(features)
        path = out / f"{side}_tower.onnx"
        with torch.no_grad():
            _export(
                _Tower(model, names, side),
                tuple(features[n] for n in names),
                path,
                inputs=names,
                outputs=[output],
            )
        files[f"{side}_tower"] = path
        described["models"][path.name] = {
            "inputs": _describe(features),
            "outputs": [
                {"name": output, "dtype": "float32", "shape": ["batch", rec.dim]}
            ],
        }
    if rec.ranker is not None:
        ranker = rec.ranker
        ranker.model.eval()  # type: ignore[attr-defined]
        users = torch.arange(1, 3)
        items = torch.arange(1, 7).reshape(2, 3) % rec.item_embeddings.shape[0]
        path = out / "ranker.onnx"
        # With the EASE term (`ranking.ease_weight`), a third output: its scores.
        outputs = ["rating", "click"] + (["ease"] if ranker.ease is not None else [])
        # A ranker that reads context takes it, as the query tower does.
        context = {}
        if ranker.reads_context:
            context = {
                key: value.expand(len(users), *value.shape[1:]).clone()
                for key, value in rec.encode_context(None).items()
            }
        with torch.no_grad():
            _export(
                _Ranker(ranker, list(context)),
                (users, items, *context.values()),
                path,
                inputs=["user_idx", "item_idx", *context],
                outputs=outputs,
                extra_axes={
                    "item_idx": {0: "batch", 1: "candidates"},
                    **{name: {0: "batch", 1: "candidates"} for name in outputs},
                },
            )
        files["ranker"] = path
        pair = ["batch", "candidates"]
        described["models"][path.name] = {
            "inputs": [
                {"name": "user_idx", "dtype": "int64", "shape": ["batch"]},
                {"name": "item_idx", "dtype": "int64", "shape": pair},
                *_describe(context),
            ],
            "outputs": [
                {"name": name, "dtype": "float32", "shape": pair} for name in outputs
            ],
        }
        described["two_stage_order"] = _served_order(rec)
    if rec.run.scores_exactly:
        described["not_exported"] = _UNEXPORTED.format(rec.run.session_knn_weight)
    features_file = out / "features.json"
    rec.run.spec.save(features_file)
    files["features"] = features_file
    meta = out / "export.json"
    meta.write_text(json.dumps(described, indent=2) + "\n")
    files["export"] = meta
    return files
