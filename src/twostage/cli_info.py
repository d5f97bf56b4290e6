"""``twostage info``: what a saved model is, at a glance, without evaluating it.

A bundle (or ``models/<name>/``, or a ``train retrieval`` run) is loaded as every
command loads it, checksums verified, and described from what it holds: when and by
which version it was saved, the data and column mapping it was trained on, its
features and their kinds, both stages, the index and the test figures saved with it.
A ``models/`` directory lists its models and their versions instead.

``twostage env``: the machine and packages twostage runs with (for a bug report, or to
see whether the GPU, faiss-gpu, ScaNN or TorchRec paths are open here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from twostage.artifacts import MANIFEST, is_version_name, versioning_hint
from twostage.cli_output import console, print_json

__all__ = [
    "bundle_info",
    "env_command",
    "environment",
    "info_command",
    "models_info",
]

#: Distributions twostage uses or can use, by the name pip installs them under.
_PACKAGES = (
    "torch",
    "numpy",
    "polars",
    "pyarrow",
    "safetensors",
    "faiss-cpu",
    "faiss-gpu",
    "fastapi",
    "uvicorn",
    "prometheus-client",
    "onnxruntime",
    "scann",
    "fbgemm-gpu-cpu",
    "fbgemm-gpu",
    "torchrec",
    "tensorboard",
    "pandas",
)

JsonInstead = Annotated[
    bool,
    typer.Option(
        "--json", help="Print the result as JSON on stdout instead of a table."
    ),
]

#: ``data`` settings shown when set: how the log's rows were read.
_READING = (
    "user_col",
    "item_col",
    "time_col",
    "rating_col",
    "unrated_values",
    "missing_ratings",
    "weight_col",
    "weight_values",
    "label_col",
    "label_threshold",
    "time_format",
    "time_unit",
    "separator",
    "quote_char",
    "comment_prefix",
    "column_names",
    "user_features",
    "item_features",
    "user_table",
    "item_table",
    "user_table_key",
    "item_table_key",
    "user_table_columns",
    "item_table_columns",
    "min_user_rows",
    "min_item_rows",
    "duplicates",
)


def _shown(value: Any) -> str:
    """A reading setting as the CLI takes it (``""``, no quote character: none)."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return "none" if value == "" else str(value)


def _versions(model_dir: Path) -> list[int]:
    """The saved version numbers under ``models/<name>/``, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and is_version_name(p.name) and (p / MANIFEST).exists()
    )


def _is_models_root(path: Path) -> bool:
    """Whether ``path`` holds model directories (``<name>/<version>/``) rather than
    being a bundle, a model directory or a run."""
    if not path.is_dir() or (path / MANIFEST).exists() or _versions(path):
        return False
    return any(
        _versions(child) or (child / MANIFEST).exists()
        for child in path.iterdir()
        if child.is_dir()
    )


def models_info(root: Path) -> dict[str, Any]:
    """Every model under ``root`` with its versions and its newest one's
    manifest; a bundle saved there without a version number (``train --out
    models/shop``) is listed with no versions and the error saying why nothing
    serves it."""
    models = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = _versions(child)
        if not versions and not (child / MANIFEST).exists():
            continue
        error = None
        newest = child / str(versions[-1]) if versions else child
        try:
            manifest = json.loads((newest / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            manifest, error = {}, f"unreadable {MANIFEST}: {e}"
        if not isinstance(manifest, dict):
            manifest, error = {}, f"{MANIFEST} holds no JSON object"
        if not versions:
            error = (
                "a bundle without a version number: `twostage serve` does not "
                f"serve it. {versioning_hint(child)}"
            )
        models.append(
            {
                "name": child.name,
                "versions": versions,
                "newest": versions[-1] if versions else None,
                "created": manifest.get("created"),
                "ranking": bool(manifest.get("ranking")),
                "error": error,
            }
        )
    return {"path": str(root), "models": models}


def bundle_info(path: Path) -> dict[str, Any]:
    """What the model at ``path`` holds (:func:`twostage.bundles.load_recommender`
    loads it, so a corrupt or incomplete bundle is its error)."""
    from twostage.artifacts import resolve_bundle
    from twostage.bundles import load_recommender
    from twostage.data.dataset import ITEM, USER
    from twostage.models.ensemble import member_weights
    from twostage.report import best_epoch
    from twostage.training import main_member

    rec = load_recommender(path)
    manifest: dict[str, Any] = getattr(rec, "manifest", {}) or {}
    where = path if not manifest else resolve_bundle(path)
    run, config = rec.run, rec.run.config
    files = [p for p in where.rglob("*") if p.is_file()]
    data, default = config.data, type(config.data)()
    reading = {
        key: value
        for key in _READING
        if (value := getattr(data, key)) != getattr(default, key)
    }
    history = main_member(run.train_result.history)
    out: dict[str, Any] = {
        "path": str(where),
        "kind": "bundle" if manifest else "retrieval run",
        "versions": _versions(where.parent) if manifest else [],
        "created": manifest.get("created"),
        "twostage_version": manifest.get("twostage_version"),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "dataset": data.dataset,
        "split": data.split,
        "reading": reading,
        "users": rec.user_vocab.size - 1,
        "items": rec.num_trained_items - 1,
        "added_items": rec.item_vocab.size - rec.num_trained_items,
        "removed_items": 0 if rec.removed_items is None else len(rec.removed_items),
        "training_rows": int(sum(rec.user_vocab.counts)),
        # the saved model its training started from (train.warm_start); None: none
        "warm_start": config.train.warm_start or None,
        "features": {
            side: [
                {"column": f.name, "kind": f.kind}
                for f in fields
                if f.name not in (USER, ITEM)
            ]
            for side, fields in (
                ("query", run.spec.query),
                ("candidate", run.spec.candidate),
            )
        },
        "retrieval": {
            "query_encoder": config.retrieval.query_encoder,
            "embedding_dim": config.retrieval.embedding_dim,
            "output_dim": config.retrieval.output_dim,
            "history_length": config.retrieval.history_length,
            # what an ordered history reads beside its items
            "history_reads": [
                what
                for what, on in (
                    ("time gaps", config.retrieval.sequence_time_gaps),
                    ("ratings", config.retrieval.sequence_ratings),
                )
                if on
            ],
            # the lowest and highest training rating a session's must lie between
            "rating_range": run.tensors.rating_range.tolist() or None,
            "epochs": len(history),
            "best_epoch": best_epoch(run.train_result.history),
            # the members and their weights as configured; None: one model
            "ensemble": [
                {"member": kind, "weight": weight}
                for kind, weight in member_weights(config.retrieval)
            ]
            if config.retrieval.ensemble
            else None,
            # the serving rules beyond the weights, as saved (serving.json)
            "session_knn_weight": run.session_knn_weight,
            "session_knn_picked": config.retrieval.session_knn_weight < 0,
            # its candidate neighbours a query: the latest active (0: every user)
            "session_knn_sample": config.retrieval.session_knn_sample,
            "popularity_fallback": run.popularity_fallback,
            "popularity_days": config.retrieval.popularity_days,
        },
        "ranking": None
        if rec.ranker is None
        else {
            "predicts_ratings": rec.ranker.predicts_ratings,
            "reads_context": rec.ranker.reads_context,
            "blend_weight": rec.ranker.blend_weight,
            "test": _ranking_figures(rec.ranker.metrics),
        },
        "index": rec.index_kind,
        "test": _test_figures(run.metrics),
    }
    return out


def _test_figures(metrics: dict[str, Any]) -> dict[str, float] | None:
    """NDCG, Recall and HitRate at 10 with seen items excluded, as saved, and
    NDCG@10's standard error over the test users where it was kept."""
    figures = (metrics or {}).get("metrics", {}).get("exclude_seen", {})
    found = {
        f"{name}@10": float(at["10"])
        for name, at in figures.items()
        if name in ("ndcg", "recall", "hit_rate") and "10" in at
    }
    from twostage.evaluate import saved_error  # torch: only where it is needed

    error = saved_error(metrics or {})
    if found and error is not None:
        found["ndcg@10 standard error"] = float(error)
    return found or None


def _ranking_figures(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    """RMSE, MAE, click AUC (and an impression log's: against the shown items,
    per impression) and the two-stage list's NDCG@10 (beside retrieval's alone),
    as saved with the ranker; None for a bundle saved without them."""
    if not metrics:
        return None
    found: dict[str, float] = {}
    for key in ("rmse", "mae", "auc", "shown_auc"):
        if key in metrics:
            found[key] = float(metrics[key])
    for key, value in metrics.get("impressions", {}).items():  # MIND's figures
        if key != "count":
            found[f"impressions_{key}"] = float(value)
    for lists in ("two_stage", "retrieval_only"):
        at = metrics.get(lists, {}).get("ndcg", {})
        if "10" in at:
            found[f"{lists}_ndcg@10"] = float(at["10"])
    return found or None


def _size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover - the loop returns


def _print_bundle(info: dict[str, Any]) -> None:
    table = Table(title=f"Model at {info['path']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # a long path wraps, never cut
    versions = info["versions"]
    saved = f"{info['kind']}, {info['files']} files, {_size(info['bytes'])}"
    if info["created"]:
        saved += f"; saved {info['created']} by twostage {info['twostage_version']}"
    verified = "; checksums verified" if info["kind"] == "bundle" else ""
    table.add_row("saved", saved + verified)
    if versions:
        table.add_row("versions", ", ".join(map(str, versions)))
    from twostage.data.registry import FIT_TABLES

    data = f"{info['dataset']} ({info['split']} split)"
    if info["dataset"] == FIT_TABLES:
        data = "tables given in Python (not recorded with the model)"
    table.add_row("data", Text(data))
    if info["reading"]:
        table.add_row(
            "read with",
            Text("; ".join(f"{k}={_shown(v)}" for k, v in info["reading"].items())),
        )
    table.add_row(
        "trained on",
        f"{info['training_rows']:,} rows, {info['users']:,} users, "
        f"{info['items']:,} items",
    )
    if info["added_items"]:
        table.add_row(
            "added items",
            f"{info['added_items']:,} (after training, from their features)",
        )
    if info["removed_items"]:
        table.add_row("removed items", f"{info['removed_items']:,} (no longer served)")
    for side, label in (("query", "user features"), ("candidate", "item features")):
        fields = info["features"][side]
        table.add_row(
            label,
            Text(", ".join(f"{f['column']} ({f['kind']})" for f in fields) or "-"),
        )
    r = info["retrieval"]
    reads = [
        f"ratings {r['rating_range'][0]:g} to {r['rating_range'][1]:g}"
        if what == "ratings" and r["rating_range"]
        else what
        for what in r["history_reads"]
    ]
    table.add_row(
        "retrieval",
        f"{r['query_encoder']} query encoder, embeddings {r['embedding_dim']} -> "
        f"{r['output_dim']}, history {r['history_length']}"
        + "".join(f" with {what}" for what in reads[:1])
        + "".join(f" and {what}" for what in reads[1:])
        + f"; {r['epochs']} "
        f"epoch{'s' if r['epochs'] != 1 else ''}"
        + (f", best {r['best_epoch']}" if r["best_epoch"] else ""),
    )
    if info["warm_start"]:
        table.add_row("warm start", Text(f"from {info['warm_start']}"))
    if r["ensemble"]:
        table.add_row(
            "ensemble",
            ", ".join(f"{m['member']} {m['weight']:g}" for m in r["ensemble"])
            + " (weights)",
        )
    rules = []
    if r["session_knn_weight"] > 0:
        picked = " (picked on validation)" if r["session_knn_picked"] else ""
        among = (
            f", neighbours among the {r['session_knn_sample']:,} latest active"
            if r["session_knn_sample"]
            else ""
        )
        rules.append(
            f"session-kNN term at weight {r['session_knn_weight']:g}{picked}{among}"
        )
    if r["popularity_fallback"] > 0:
        days = r["popularity_days"]
        rules.append(
            "most-popular"
            + (f" over the last {days:g} days" if days > 0 else "")
            + f" for users with at most {r['popularity_fallback']:,} training "
            f"item{'s' if r['popularity_fallback'] != 1 else ''}"
        )
    table.add_row("serving rules", "; ".join(rules) or "none (the model for everyone)")
    ranking = info["ranking"]
    table.add_row(
        "ranking",
        "none (retrieval's order)"
        if ranking is None
        else ("clicks and ratings" if ranking["predicts_ratings"] else "clicks")
        + (" at the request's context" if ranking["reads_context"] else "")
        + ("" if ranking["predicts_ratings"] else " (no rating output)"),
    )
    if ranking is not None and ranking["test"]:
        table.add_row(
            "ranking test",
            ", ".join(f"{k} {v:.4f}" for k, v in ranking["test"].items()),
        )
    table.add_row("index", str(info["index"] or "-"))
    test = info["test"]
    table.add_row(
        "test (seen excluded)",
        "not saved"
        if test is None
        else ", ".join(f"{k} {v:.4f}" for k, v in test.items()),
    )
    console.print(table)


def _print_models(info: dict[str, Any]) -> None:
    table = Table(title=f"Models in {info['path']}")
    for column in ("model", "versions", "newest saved", "ranking"):
        table.add_column(column)
    for m in info["models"]:
        table.add_row(
            Text(m["name"]),
            ", ".join(map(str, m["versions"])) or "-",
            Text(m["error"] or str(m["created"] or "-")),
            "yes" if m["ranking"] else "no",
        )
    console.print(table)


def info_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A bundle, models/<name>/ (its newest version), a models/ directory "
            "(every model), or the --out directory of `twostage train retrieval`."
        ),
    ],
    json_output: JsonInstead = False,
) -> None:
    """What a saved model is: when and how it was trained, on which data, its
    features, stages, index and saved test figures (checksums verified); or the
    models and versions of a models/ directory."""
    info = models_info(path) if _is_models_root(path) else bundle_info(path)
    if json_output:
        print_json(info)
    elif "models" in info:
        _print_models(info)
    else:
        _print_bundle(info)


def environment() -> dict[str, Any]:
    """Python, the platform, the installed versions of :data:`_PACKAGES` (None:
    not installed), torch's threads and devices, and the data cache folder."""
    import importlib.metadata as metadata
    import os
    import platform

    import torch

    from twostage import __version__
    from twostage.data.download import cache_root

    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "twostage": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "devices": [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
            if cuda
            else [],
        },
        "packages": versions,
        "data_cache": str(cache_root()),
    }


def env_command(
    json_output: JsonInstead = False,
) -> None:
    """The machine and packages twostage runs with: Python, torch and its devices,
    the optional packages (faiss-gpu, ScaNN, TorchRec, onnxruntime...) and the data
    cache; paste it into a bug report."""
    env = environment()
    if json_output:
        print_json(env)
        return
    table = Table(title=f"twostage {env['twostage']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("python", f"{env['python']} on {env['platform']}")
    table.add_row("cpus", f"{env['cpus']} ({env['torch_threads']} torch threads)")
    cuda = env["cuda"]
    table.add_row(
        "cuda",
        f"{cuda['version']}: {', '.join(cuda['devices'])}"
        if cuda["available"]
        else "not available (CPU)",
    )
    for name, version in env["packages"].items():
        table.add_row(name, version or "-")
    table.add_row("data cache", Text(env["data_cache"]))
    console.print(table)
