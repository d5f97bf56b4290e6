"""The demo report: a Markdown and an HTML summary with PNG plots."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_report"]

KS = ("1", "5", "10", "50", "100")


def _plot_losses(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    epochs = [int(h["epoch"]) + 1 for h in history]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(
        epochs, [h["train_loss"] for h in history], marker="o", label="train loss"
    )
    if any("validation_loss" in h for h in history):
        left.plot(
            epochs,
            [h.get("validation_loss", np.nan) for h in history],
            marker="o",
            label="validation loss",
        )
    left.set_xlabel("epoch")
    left.set_ylabel("in-batch softmax loss")
    if any("validation" in h for h in history):
        right = left.twinx()
        right.plot(
            epochs,
            [h.get("validation", np.nan) for h in history],
            color="tab:green",
            linestyle="--",
            label="validation Recall@100",
        )
        right.set_ylabel("validation Recall@100")
        right.legend(loc="center right")
    left.legend(loc="upper right")
    left.set_title("Retrieval training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(comparison: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = [int(k) for k in KS]
    for name, result in comparison.items():
        metrics = result["metrics"]["exclude_seen"]
        for axis, metric in zip(axes, ("recall", "ndcg"), strict=True):
            axis.plot(ks, [metrics[metric][k] for k in KS], marker="o", label=name)
    for axis, metric in zip(axes, ("Recall@K", "NDCG@K"), strict=True):
        axis.set_xscale("log")
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("K")
        axis.set_title(f"{metric} (seen items excluded)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scores(scores: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 3.5))
    for name, values in scores.items():
        axis.hist(values, bins=50, alpha=0.6, density=True, label=name)
    axis.set_xlabel("retrieval score (cosine)")
    axis.set_ylabel("density")
    axis.set_title("Score distribution")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    directory: str | Path,
    *,
    title: str,
    summary: dict[str, Any],
    history: list[dict[str, float]],
    comparison: dict[str, Any],
    scores: dict[str, np.ndarray],
    sections: dict[str, list[dict[str, Any]]],
) -> list[Path]:
    """Write ``report.md``, ``report.html`` and the plots into ``directory``.

    Args:
        directory: output folder (created).
        title: heading of the report.
        summary: dataset facts (from :func:`twostage.data.describe.describe`).
        history: per-epoch training records.
        comparison: model name -> ``EvalResult.to_dict()``.
        scores: label -> 1-D array of scores, for the score histogram.
        sections: heading -> list of items (``item_id``, ``title``, ``score``...) to list.

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss.png": lambda p: _plot_losses(history, p),
        "recall_ndcg.png": lambda p: _plot_curves(comparison, p),
        "scores.png": lambda p: _plot_scores(scores, p),
    }
    for name, draw in plots.items():
        draw(out / name)
    header = [
        "model",
        "Recall@10",
        "Recall@100",
        "NDCG@10",
        "HitRate@10",
        "FTopK@100 (seen incl.)",
    ]
    rows = []
    for name, result in comparison.items():
        ex, inc = result["metrics"]["exclude_seen"], result["metrics"]["include_seen"]
        rows.append(
            [
                name,
                f"{ex['recall']['10']:.4f}",
                f"{ex['recall']['100']:.4f}",
                f"{ex['ndcg']['10']:.4f}",
                f"{ex['hit_rate']['10']:.4f}",
                f"{inc['factorized_top_k']['100']:.4f}",
            ]
        )
    facts = [
        ["interactions", f"{summary['num_interactions']:,}"],
        ["users", f"{summary['num_users']:,}"],
        ["items", f"{summary['num_items']:,}"],
        ["source", str(summary.get("source", ""))],
    ]
    item_header = ["#", "item", "label", "score"]

    def item_rows(items: list[dict[str, Any]]) -> list[list[str]]:
        return [
            [
                str(i + 1),
                str(item["item_id"]),
                str(item.get("label") or ""),
                f"{item.get('rank_score', item.get('score', 0.0)):.4f}",
            ]
            for i, item in enumerate(items)
        ]

    md = [f"# {title}", "", _table(facts, ["", ""]), "", "## Test metrics", ""]
    md += [
        _table(rows, header),
        "",
        "![losses](loss.png)",
        "",
        "![curves](recall_ndcg.png)",
    ]
    md += ["", "![scores](scores.png)", ""]
    for heading, items in sections.items():
        md += [f"## {heading}", "", _table(item_rows(items), item_header), ""]
    (out / "report.md").write_text("\n".join(md))
    body = [f"<h1>{html.escape(title)}</h1>", _html_table(facts, ["", ""])]
    body += ["<h2>Test metrics</h2>", _html_table(rows, header)]
    body += [f'<p><img src="{name}" alt="{name}"></p>' for name in plots]
    for heading, items in sections.items():
        body += [
            f"<h2>{html.escape(heading)}</h2>",
            _html_table(item_rows(items), item_header),
        ]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:2px 8px}"
    )
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    return [out / "report.md", out / "report.html", *(out / name for name in plots)]
