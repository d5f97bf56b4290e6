"""The report of a run: a Markdown and an HTML summary with PNG plots.

``twostage demo`` writes one; ``twostage report RUN_OR_BUNDLE`` writes one for any saved
run or bundle (:func:`report_for`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.artifacts import refuse_bundle_target
from twostage.errors import ArtifactError
from twostage.training import main_member

if TYPE_CHECKING:
    from twostage.data.dataset import Dataset
    from twostage.retrieval.run import RetrievalRun

__all__ = ["report_for", "score_samples", "write_report"]

KS = ("1", "5", "10", "50", "100")


def best_epoch(history: list[dict[str, float]], member: int = 0) -> int | None:
    """The 1-based epoch whose weights were kept (best validation, else train loss)
    of an ensemble's ``member`` (0: its first model, or the one model); None
    without epochs (a closed-form member)."""
    history = [r for r in history if r.get("member", 0) == member]
    if not history:
        return None
    key, sign = ("validation", 1) if "validation" in history[0] else ("train_loss", -1)
    best = max(history, key=lambda h: sign * h[key])
    return int(best["epoch"]) + 1


def _plot_losses(
    history: list[dict[str, float]],
    path: Path,
    *,
    title: str = "Retrieval training",
    loss_label: str = "in-batch softmax loss",
    metric_label: str = "validation Recall@100",
) -> None:
    import matplotlib.pyplot as plt

    history = main_member(history)  # an ensemble: its first model's curves
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
    left.set_ylabel(loss_label)
    handles, labels = left.get_legend_handles_labels()
    if any("validation" in h for h in history):
        right = left.twinx()
        right.plot(
            epochs,
            [h.get("validation", np.nan) for h in history],
            color="tab:green",
            linestyle="--",
            label=metric_label,
        )
        right.set_ylabel(metric_label)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    best = best_epoch(history)
    if best is not None:
        left.axvline(best, color="grey", linestyle=":", linewidth=1)
        handles.append(left.lines[-1])
        labels.append(f"best epoch ({best})")
    # One legend for both axes, outside the curves.
    left.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2
    )
    left.set_title(title)
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
    """A Markdown table; a cell's "|" and line breaks (a path, a dataset name)
    are escaped so the cell stays one cell."""

    def cell(text: str) -> str:
        return " ".join(text.replace("|", "\\|").split())

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


#: What every report's files hold, so an earlier report may be replaced (reports
#: written before the mark have their facts table's "twostage version" line).
_REPORT_MARK = "<!-- twostage report -->"


def refuse_foreign_report(directory: Path) -> None:
    """Refuse a directory whose ``report.md`` / ``report.html`` are someone's own
    (``--out .`` in a project with a ``report.md``): writing would replace them.
    An earlier twostage report is replaced.

    Raises:
        ArtifactError: naming the file.
    """
    for name in ("report.md", "report.html"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        if _REPORT_MARK not in text and "| twostage version |" not in text:
            raise ArtifactError(
                f"{str(path)!r} is not a twostage report, and the report would "
                "replace it. Write the report to another --out."
            )


def write_report(
    directory: str | Path,
    *,
    title: str,
    summary: dict[str, Any],
    history: list[dict[str, float]],
    comparison: dict[str, Any],
    scores: dict[str, np.ndarray],
    sections: dict[str, list[dict[str, Any]]],
    ranking_history: list[dict[str, float]] | None = None,
    ranking: dict[str, Any] | None = None,
    facts: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``report.md``, ``report.html`` and the plots into ``directory``.

    Args:
        directory: output folder (created).
        title: heading of the report.
        summary: dataset facts (from :func:`twostage.data.describe.describe`).
        history: per-epoch training records.
        comparison: model name -> ``EvalResult.to_dict()``.
        scores: label -> 1-D array of scores, for the score histogram.
        sections: heading -> list of items (``item_id``, ``label``, ``score``...).
        ranking_history: the ranker's per-epoch records (its loss plot).
        ranking: :func:`twostage.ranking.evaluate_ranking`'s figures.
        facts: more lines for the facts table (config, seed, version...).

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(directory)
    refuse_bundle_target(out, "a report")
    refuse_foreign_report(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Any] = {}
    if history:
        plots["loss.png"] = lambda p: _plot_losses(history, p)
    if ranking_history:
        plots["ranking_loss.png"] = lambda p: _plot_losses(
            ranking_history,
            p,
            title="Ranking training",
            loss_label="rating MSE + click BCE",
            metric_label="validation (minus RMSE)",
        )
    if comparison:
        plots["recall_ndcg.png"] = lambda p: _plot_curves(comparison, p)
    if scores:
        plots["scores.png"] = lambda p: _plot_scores(scores, p)
    for name, draw in plots.items():
        draw(out / name)
    header = [
        "model",
        "Recall@10",
        "Recall@100",
        "NDCG@10 (± its standard error)",
        "HitRate@10",
        "FTopK@100 (seen incl.)",
    ]
    from twostage.evaluate import saved_error  # torch: not at import

    rows = []
    for name, result in comparison.items():
        ex, inc = result["metrics"]["exclude_seen"], result["metrics"]["include_seen"]
        error = saved_error(result)
        rows.append(
            [
                name,
                f"{ex['recall']['10']:.4f}",
                f"{ex['recall']['100']:.4f}",
                f"{ex['ndcg']['10']:.4f}"
                + ("" if error is None else f" ± {error:.4f}"),
                f"{ex['hit_rate']['10']:.4f}",
                f"{inc['factorized_top_k']['100']:.4f}",
            ]
        )
    fact_rows = [
        ["interactions", f"{summary['num_interactions']:,}"],
        ["users", f"{summary['num_users']:,}"],
        ["items", f"{summary['num_items']:,}"],
        ["source", str(summary.get("source", ""))],
        *([k, v] for k, v in (facts or {}).items()),
    ]
    ranking_rows = _ranking_rows(ranking) if ranking else []
    ranking_header = ["figure", "retrieval only", "two stage"]

    def item_table(items: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
        """Rows and header of an item list; the score column is named by what it
        holds, and left out for a list without scores (a history)."""
        key = next(
            (k for k in ("rank_score", "score") if any(k in item for item in items)),
            None,
        )
        header = ["#", "item", "label"]
        if key is not None:
            header.append(
                "two-stage score" if key == "rank_score" else "retrieval score"
            )
        rows = [
            [str(i + 1), str(item["item_id"]), str(item.get("label") or "")]
            + ([f"{item[key]:.4f}"] if key is not None else [])
            for i, item in enumerate(items)
        ]
        return rows, header

    md = [f"# {title}", "", _table(fact_rows, ["", ""]), "", "## Test metrics", ""]
    md += [_table(rows, header), ""]
    if ranking_rows:
        md += [
            "## Ranking stage (test split)",
            "",
            _table(ranking_rows, ranking_header),
        ]
    md += [line for name in plots for line in ("", f"![{name}]({name})")]
    md += [""]
    for heading, items in sections.items():
        md += [f"## {heading}", "", _table(*item_table(items)), ""]
    (out / "report.md").write_text("\n".join([_REPORT_MARK, *md]))
    body = [f"<h1>{html.escape(title)}</h1>", _html_table(fact_rows, ["", ""])]
    body += ["<h2>Test metrics</h2>", _html_table(rows, header)]
    if ranking_rows:
        body += [
            "<h2>Ranking stage (test split)</h2>",
            _html_table(ranking_rows, ranking_header),
        ]
    body += [f'<p><img src="{name}" alt="{name}"></p>' for name in plots]
    for heading, items in sections.items():
        body += [
            f"<h2>{html.escape(heading)}</h2>",
            _html_table(*item_table(items)),
        ]
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto}td,th{padding:2px 8px}"
    )
    (out / "report.html").write_text(
        f"<!doctype html>{_REPORT_MARK}<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    return [out / "report.md", out / "report.html", *(out / name for name in plots)]


def _ranking_rows(report: dict[str, Any]) -> list[list[str]]:
    """RMSE, MAE, AUC, then NDCG@10 and HitRate@10 of both lists."""
    rows = [
        [name, "", f"{report[key]:.4f}"]
        for key, name in (
            ("rmse", "rating RMSE"),
            ("mae", "rating MAE"),
            ("auc", "click AUC"),
            ("shown_auc", "click AUC, shown items"),
        )
        if key in report
    ]
    for metric, name in (
        ("ndcg", "NDCG@10"),
        ("recall", "Recall@10"),
        ("hit_rate", "HitRate@10"),
    ):
        if metric not in report["two_stage"]:
            continue
        rows.append(
            [
                name,
                f"{report['retrieval_only'][metric]['10']:.4f}",
                f"{report['two_stage'][metric]['10']:.4f}",
            ]
        )
    return rows


def score_samples(run: RetrievalRun, test: Dataset) -> dict[str, np.ndarray]:
    """Retrieval scores of test (user, item) pairs and of random (user, item) pairs."""
    import torch

    from twostage.retrieval.evaluation import eval_queries

    queries = eval_queries(run, test)
    query_emb = queries.embeddings(run, test.users)
    items = run.item_embeddings()
    rows = queries.relevant.row_ids()
    cols = queries.relevant.indices
    keep = (cols > 0) & (cols < items.shape[0])  # items the model knows
    positive = (query_emb[rows[keep]] * items[cols[keep]]).sum(1)
    generator = torch.Generator().manual_seed(0)
    random_items = torch.randint(1, items.shape[0], (len(rows),), generator=generator)
    negative = (query_emb[rows] * items[random_items]).sum(1)
    return {
        "test interactions": np.asarray(positive),
        "random items": np.asarray(negative),
    }


def run_facts(rec: Any) -> dict[str, str]:
    """Version, seeds, split, best epochs, fallback and the config of a recommender:
    the facts table of a report."""
    from twostage import __version__

    run, config = rec.run, rec.run.config
    facts = {
        "twostage version": str(
            getattr(rec, "manifest", {}).get("twostage_version", __version__)
        ),
        "training seed": str(config.train.seed),
        "split": f"{config.data.split}, test {config.data.test_fraction:g}, "
        f"seed {config.data.seed}",
        "best retrieval epoch": str(best_epoch(run.train_result.history) or "-"),
        "popularity fallback": f"users with at most {run.popularity_fallback} items"
        if run.popularity_fallback
        else "none",
        "session-kNN weight": f"{run.session_knn_weight:g}"
        + (" (picked on validation)" if run.session_knn is not None else ""),
    }
    if config.retrieval.ensemble:  # each member, its weight, and its best epoch
        from twostage.models.ensemble import member_weights

        history = run.train_result.history
        facts["ensemble"] = ", ".join(
            f"{kind} {weight:g} "
            + (
                f"(best epoch {best})"
                if (best := best_epoch(history, member)) is not None
                else "(closed form)"
            )
            for member, (kind, weight) in enumerate(member_weights(config.retrieval))
        )
    ranker = rec.ranker
    if ranker is not None:
        facts["best ranking epoch"] = str(best_epoch(ranker.history) or "-")
        facts["ranking blend weight"] = f"{ranker.blend_weight:g}"
        if ranker.config.ease_weight:
            facts["ranking EASE weight"] = f"{ranker.config.ease_weight:g}"
    facts["config"] = json.dumps(_compact(config), sort_keys=True)
    return facts


def report_for(source: str | Path, out: str | Path) -> tuple[list[Path], list[str]]:
    """The report of a saved run or bundle (whatever ``load`` takes).

    The test split is rebuilt from the saved config (as ``twostage evaluate`` does)
    for the metrics beside the baselines, the score distributions and the ranking
    figures; when the data cannot be loaded here the report keeps the metrics saved
    with the run, and says so.

    Returns:
        The files written and the notes (what could not be computed, and why).
    """
    from twostage.data.describe import describe
    from twostage.data.registry import load_dataset_for
    from twostage.data.split import prepare_split
    from twostage.errors import TwostageError, clause
    from twostage.recommender import load
    from twostage.retrieval.evaluation import check_rebuilt, evaluate_baselines

    refuse_foreign_report(Path(out))  # before the evaluation, not after
    rec = load(source)
    run, notes = rec.run, []
    comparison: dict[str, Any] = {"twostage": run.metrics} if run.metrics else {}
    scores: dict[str, np.ndarray] = {}
    # The ranker's figures saved with the bundle, until the rebuilt split's replace them.
    ranking = None if rec.ranker is None else rec.ranker.metrics
    summary: dict[str, Any] = {
        "num_interactions": run.tensors.num_examples,
        "num_users": run.spec.vocabulary("user_id").size - 1,
        "num_items": run.spec.vocabulary("item_id").size - 1,
        "source": run.config.data.dataset,
    }
    sections: dict[str, list[dict[str, Any]]] = {}
    try:
        dataset = load_dataset_for(run.config)
        split = prepare_split(dataset, run.config)
        check_rebuilt(run, split)  # not another log's figures under the same name
    except (TwostageError, OSError) as e:
        notes.append(
            f"the data {run.config.data.dataset!r} cannot be loaded here ({clause(e)}); the "
            "report shows the metrics saved with the run."
        )
    else:
        summary = describe(dataset)
        test = split.test
        comparison = {"twostage": run.evaluate(test).to_dict()}
        comparison.update(
            {
                k: v.to_dict()
                for k, v in evaluate_baselines(run, test, train=split.train).items()
            }
        )
        scores = score_samples(run, test)
        if rec.ranker is not None:
            from twostage.ranking import evaluate_ranking

            ranking = evaluate_ranking(rec.trained_ranker, test)  # type: ignore[arg-type]
        user = test.interactions["user_id"][0]
        answer = rec.recommend(user, k=10)
        sections[f"Recommended for user {user} ({answer.path})"] = answer.items
    facts = run_facts(rec)
    files = write_report(
        out,
        title=f"twostage report: {Path(source)}",
        summary=summary,
        history=run.train_result.history,
        comparison=comparison,
        scores=scores,
        sections=sections,
        ranking_history=None if rec.ranker is None else rec.ranker.history,  # type: ignore[attr-defined]
        ranking=ranking,
        facts=facts,
    )
    return files, notes


def _compact(config: Any) -> dict[str, Any]:
    """The config's sections as a dict (for the facts table)."""
    from twostage.config import to_dict

    return to_dict(config)
