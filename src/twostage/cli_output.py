"""What the CLI prints: metric tables, item lists and the training progress line."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "JsonOutput",
    "console",
    "print_json",
    "status_console",
    "items_table",
    "print_fallback",
    "print_session_knn",
    "print_metrics",
    "standing_lines",
    "standing_rows",
    "print_ranking",
    "print_session_figures",
    "training_progress",
]

#: The ``--json`` flag of the commands that print results.
JsonOutput = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the result as JSON on stdout instead of tables (progress and "
        "logs go to stderr).",
    ),
]

#: Results (tables, JSON) go to stdout ...
console = Console()
#: ... and progress bars, spinners and logs to stderr, on one console so that a log
#: line never breaks a bar, and ``--json`` output stays clean to pipe.
status_console = Console(stderr=True)


def print_json(value: Any) -> None:
    """``--json``: the command's result as JSON on stdout, nothing else there; a
    figure that is not a number (NaN: a standard error of one session, say) or
    infinite is written ``null``, as strict JSON readers need."""
    import json
    import sys

    sys.stdout.write(
        json.dumps(_finite(value), indent=2, default=str, allow_nan=False) + "\n"
    )
    sys.stdout.flush()


def _finite(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite as None, in nested
    dicts, lists and tuples too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def items_table(
    title: str, items: list[dict[str, Any]], *, scores: bool = True
) -> Table:
    """Items with the label and tags the Recommender chose for this catalogue
    (:mod:`twostage.display`). They are the catalogue's own text, shown as
    written: never read as Rich markup ("[sound recording]" would vanish, "[/]"
    would raise)."""
    table = Table(title=Text(title))
    table.add_column("#", justify="right")
    table.add_column("item_id")
    table.add_column("label")
    table.add_column("tags")
    if scores:
        table.add_column("score", justify="right")
    explained = any("because" in item for item in items)
    if explained:
        table.add_column("because you liked")
    for rank, item in enumerate(items, start=1):
        because = item.get("because") or {}
        table.add_row(
            str(rank),
            Text(str(item["item_id"]) + (" (new)" if item.get("new_item") else "")),
            Text(str(item.get("label") or "")),
            Text(", ".join(str(tag) for tag in item.get("tags") or [])),
            *([f"{item.get('rank_score', item['score']):.4f}"] if scores else []),
            *(
                [Text(str(because.get("label") or because.get("item_id", "")))]
                if explained
                else []
            ),
        )
    return table


@contextlib.contextmanager
def training_progress(
    *stages: str, also: Callable[[dict[str, Any]], None] | None = None
) -> Iterator[dict[str, Callable[[dict[str, Any]], None]]]:
    """Progress bars of the training stages (:func:`twostage.progress.training_bars`)
    on the CLI's console, the one its log handler writes to; ``also`` gets every
    step record too."""
    from twostage.progress import training_bars

    names = stages or ("retrieval",)
    with training_bars(*names, console=status_console, also=also) as bars:
        yield bars


#: Metric columns, most wanted first: a narrow terminal keeps a prefix of them.
METRIC_COLUMNS = (
    ("recall", "10"),
    ("ndcg", "10"),
    ("hit_rate", "10"),
    ("recall", "100"),
    ("factorized_top_k", "100"),
    ("mrr", "10"),
    ("coverage", "100"),
)
SHORT = {
    "recall": "R",
    "ndcg": "NDCG",
    "hit_rate": "HR",
    "mrr": "MRR",
    "factorized_top_k": "FTopK",
    "coverage": "Cov",
}


def print_metrics(
    metrics: dict[str, Any], *, title: str, models: dict[str, Any] | None = None
) -> None:
    """A table of metrics per model: rows model x mode, columns metric@k.

    Columns that do not fit the terminal are left out, least wanted first, and a
    note names them (never a cut-off header or value).
    """
    rows = models or {"twostage": metrics}
    names = max([len("model"), *(len(n) for n in rows)])
    # Borders and padding: 3 characters per column, plus one.
    budget = console.width - 1 - (names + 3) - (len("seen") + 3)
    columns = []
    for metric, k in METRIC_COLUMNS:
        header = f"{SHORT[metric]}@{k}"
        if budget < max(len(header), 6) + 3:
            break
        budget -= max(len(header), 6) + 3
        columns.append((metric, k))
    table = Table(title=Text(title))
    table.add_column("model", no_wrap=True, min_width=names)
    table.add_column("seen", no_wrap=True)
    for metric, k in columns:
        table.add_column(f"{SHORT[metric]}@{k}", justify="right", no_wrap=True)
    for name, result in rows.items():
        for mode in ("exclude_seen", "include_seen"):
            values = result["metrics"].get(mode)
            if not values:
                continue
            cells = []
            for metric, k in columns:
                value = values.get(metric, {}).get(k)
                cells.append("-" if value is None else f"{value:.4f}")
            table.add_row(name, "excl" if mode == "exclude_seen" else "incl", *cells)
    console.print(table)
    from twostage.evaluate import saved_error  # torch: not at the CLI's start

    errors = {name: saved_error(result) for name, result in rows.items()}
    known = {name: e for name, e in errors.items() if e is not None}
    _print_errors(known, "the test users (seen excluded)")
    left = [f"{SHORT[m]}@{k}" for m, k in METRIC_COLUMNS if (m, k) not in columns]
    if left:
        console.print(
            f"({', '.join(left)} left out at {console.width} columns; a wider "
            "terminal or --json shows them.)"
        )


#: The columns of a session evaluation's table (``evaluate --sessions``).
SESSION_COLUMNS = (
    ("hit_rate", 10),
    ("ndcg", 10),
    ("mrr", 10),
    ("hit_rate", 20),
    ("hit_rate", 100),
)


def print_session_figures(found: dict[str, Any], *, title: str) -> None:
    """Our lists, the popularity fallback's and the baselines' (when measured)
    on held-out session items, a row each (--json has every K)."""
    table = Table(title=Text(title))
    table.add_column("model", no_wrap=True)
    for metric, k in SESSION_COLUMNS:
        table.add_column(f"{SHORT[metric]}@{k}", justify="right", no_wrap=True)
    rows = {"twostage": found["twostage"], "fallback": found["popularity"]}
    rows.update(found.get("baselines", {}))
    for name, figures in rows.items():
        table.add_row(
            name, *(f"{figures[metric][k]:.4f}" for metric, k in SESSION_COLUMNS)
        )
    console.print(table)
    saved = found.get("standard_errors") or {}
    errors = {"twostage": saved.get("twostage"), "fallback": saved.get("popularity")}
    errors.update(saved.get("baselines", {}))
    known = {
        name: value
        for name, per in errors.items()
        if per is not None
        and (value := per.get("ndcg", {}).get(10)) is not None
        and value == value
    }
    _print_errors(known, "the sessions")


def _print_errors(known: dict[str, float], over: str) -> None:
    """The line under a figures table: each row's NDCG@10 standard error over
    ``over`` (nothing where none is known)."""
    if known:
        console.print(
            f"Standard error of NDCG@10 over {over}: "
            + ", ".join(f"{name} {e:.4f}" for name, e in known.items())
            + "; two figures closer than about twice their combined error are "
            "level."
        )


def session_standing(found: dict[str, Any]) -> str | None:
    """The model's NDCG@10 on held-out session items against the best
    baseline's, in one sentence (None: no baseline measured)."""
    baselines = found.get("baselines")
    if not baselines:
        return None
    best = max(baselines, key=lambda name: baselines[name]["ndcg"][10])
    ours, theirs = found["twostage"]["ndcg"][10], baselines[best]["ndcg"][10]
    errors = found.get("standard_errors", {})
    paired = found.get("paired_standard_errors", {}).get("baselines", {})
    verdict, change, noise = compare(
        ours,
        theirs,
        errors.get("twostage", {}).get("ndcg", {}).get(10),
        errors.get("baselines", {}).get(best, {}).get("ndcg", {}).get(10),
        paired.get(best, {}).get("ndcg", {}).get(10),
    )
    return (
        f"The model's lists are {verdict} the best baseline on NDCG@10, {best}: "
        f"{ours:.4f} vs {theirs:.4f} ({relative(change)}){noise}."
    )


def relative(change: float | None) -> str:
    """A :func:`compare` change as a signed percentage ("from zero" for None)."""
    return "from zero" if change is None else f"{change:+.1%}"


def compare(
    ours: float,
    theirs: float,
    ours_error: float | None = None,
    theirs_error: float | None = None,
    paired_error: float | None = None,
) -> tuple[str, float | None, str]:
    """``(verdict, relative change, note)`` of two figures measured on the same
    queries: "ahead of" or "behind" where they differ by more than 1% and by
    more than twice the standard error of their difference; else "level with".
    The change is None from a figure of 0 (no relative change from zero; a
    figure above it is ahead).
    That error is ``paired_error`` when known (the spread of the per-query
    differences: :func:`twostage.metrics.paired_standard_error`), else, when
    both standard errors are known, ``sqrt(a ** 2 + b ** 2)``, which ignores
    that the same queries make both figures and so errs towards "level with".
    The note says when the noise alone made them level."""
    if theirs:
        change: float | None = (ours - theirs) / theirs
    else:  # "+inf%" said nothing, and is no JSON number
        change = 0.0 if ours == theirs else None
    gap = change if change is not None else math.copysign(math.inf, ours - theirs)
    verdict = "ahead of" if gap > 0.01 else "behind" if gap < -0.01 else "level with"
    if verdict == "level with":
        return verdict, change, ""
    if paired_error is not None and paired_error == paired_error:
        error, name = paired_error, "paired standard error"
    else:
        known = [e for e in (ours_error, theirs_error) if e is not None and e == e]
        if len(known) < 2:
            return verdict, change, ""
        error = math.sqrt(known[0] ** 2 + known[1] ** 2)
        name = "difference's standard error"
    if abs(ours - theirs) > 2 * error:
        return verdict, change, ""
    return "level with", change, f"; within twice the {name} of {error:.4f}"


def impressions_line(report: dict[str, Any]) -> str:
    """MIND's per-impression figures of the ranker (``report["impressions"]``) on
    one line, with the users and items it scored as new to it."""
    figures = report["impressions"]
    line = (
        f"Impressions ({figures['count']:,} with a click and a miss): "
        f"AUC {figures['auc']:.4f}, MRR {figures['mrr']:.4f}, "
        f"nDCG@5 {figures['ndcg@5']:.4f}, nDCG@10 {figures['ndcg@10']:.4f}"
    )
    new = [
        f"{report[key]:,} {name}"
        for key, name in (
            ("shown_cold_users", "users new to the model"),
            ("shown_cold_users_with_history", "of them read from their history"),
            ("shown_cold_items", "items new to it"),
        )
        if report.get(key)
    ]
    return line + (f" ({', '.join(new)})" if new else "")


def print_ranking(report: dict[str, Any], *, title: str) -> None:
    """The output of :func:`twostage.ranking.evaluate_ranking` as two tables."""
    heads = Table(title=Text(title))
    keys = ["rmse", "mae", "auc"]
    names = ["RMSE", "MAE", "AUC"]
    if "shown_auc_users" in report:  # an impression log's test rows
        keys.append("shown_auc")
        names.append("AUC vs shown")
    for column in (*names, "test pairs"):
        heads.add_column(column, justify="right")
    heads.add_row(
        *(f"{report[k]:.4f}" if k in report else "-" for k in keys),
        f"{report['num_test_pairs']:,}",
    )
    console.print(heads)
    if "impressions" in report:
        console.print(impressions_line(report))
    weights = f"blend weight {report['blend_weight']:g}"
    if report.get("ease_weight"):
        weights += f", EASE weight {report['ease_weight']:g}"
    lists = Table(
        title=f"Top {report['num_candidates']} retrieved, re-ranked "
        f"({weights}), seen items excluded"
    )
    for column in ("metric", "retrieval only", "two stage", "change"):
        lists.add_column(column, justify="left" if column == "metric" else "right")
    for metric, label in (
        ("ndcg", "NDCG@10"),
        ("recall", "R@10"),
        ("hit_rate", "HR@10"),
    ):
        if metric not in report["two_stage"]:
            continue
        before = report["retrieval_only"][metric]["10"]
        after = report["two_stage"][metric]["10"]
        lists.add_row(label, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    console.print(lists)


def print_list_rules(report: dict[str, Any]) -> None:
    """The output of :func:`twostage.list_evaluation.evaluate_list_rules`: the
    served lists as scored and under the rules, one row each."""
    k = report["k"]
    rules = []
    by = report.get("diversity_by")
    if report["diversity"]:
        rules.append(f"diversity {report['diversity']:g}" + (f" by {by}" if by else ""))
    rules += [
        f"at most {n} per {column} value" for column, n in report["max_per"].items()
    ]
    table = Table(
        title=Text(
            f"Served lists of the {report['users']:,} {report.get('per', 'test user')}s "
            f"({report['scored_users']:,} with an unseen test item scored), "
            f"{', '.join(rules) or 'no rule'} (from {report['num_candidates']} "
            "candidates); seen items excluded"
        )
    )
    columns = [
        ("ndcg", f"NDCG@{k}"),
        ("recall", f"R@{k}"),
        ("hit_rate", f"HR@{k}"),
        ("intra_list_diversity", "ILD"),
        *([("value_diversity", f"ILD {by}")] if by else []),
        ("coverage", f"Cov@{k}"),
        ("mean_length", "length"),
        ("seconds", "s"),
    ]
    table.add_column("lists", overflow="fold")  # the row names whole, however narrow
    for _, label in columns:
        table.add_column(label, justify="right", overflow="fold")
    for name, label in (("as_scored", "as scored"), ("with_rules", "with the rules")):
        figures = report[name]
        table.add_row(
            label,
            *(
                f"{figures[key]:.2f}"
                if key in ("mean_length", "seconds")
                else f"{figures[key]:.4f}"
                for key, _ in columns
            ),
        )
    console.print(table)


#: One line on what each baseline is, for the sentence on where we stand.
BASELINE_NOTES = {
    "popularity": "most-popular, the floor every model must clear",
    "ease": "a linear item-item model with a closed-form items x items solve; strong "
    "on small dense logs, but its memory and time grow with the catalogue squared",
    "itemknn": "item-kNN on co-occurrence (each candidate's 100 nearest items)",
    "itemknn-history": "item-kNN keeping each history item's 100 nearest items",
    "transition": "the items that followed the user's last item in other users' "
    "sequences",
    "recent-popularity": "most-popular over the training log's last 30 days",
    "ease-recency": "EASE over the user's items weighted by recency, what the user "
    "did last weighing most",
    "session-knn": "session-kNN: the users whose sequences share the user's recent "
    "items vote for what they took near the shared ones",
}


def standing_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One honest sentence per baseline of :func:`standing_rows`: the served
    list's NDCG@10 against the baseline's, on the same test split with seen
    items excluded, and what that baseline is."""
    return [
        f"Our served list is {row['verdict']} {name} on NDCG@10: "
        f"{row['served']:.4f} vs {row['baseline']:.4f} ({relative(row['change'])}"
        f"{row['note']}); {name} is {BASELINE_NOTES.get(name, 'a baseline')}."
        for name, row in rows.items()
    ]


def standing_rows(
    served: dict[str, float],
    baselines: dict[str, Any],
    served_error: float | None = None,
    paired: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """The served list's NDCG@10 (``served``, its standard error
    ``served_error`` when known) against each baseline's (``baselines``: name ->
    an ``EvalResult`` as a dict), on the same test split with seen items
    excluded (:func:`compare`; ``paired``: name -> the paired standard error of
    the difference, where known): name -> ``served``, ``baseline``, ``change``,
    ``verdict``, ``note`` and ``paired_standard_error`` (None: not known)."""
    from twostage.evaluate import saved_error

    ours = served["ndcg"]
    rows = {}
    for name, result in baselines.items():
        theirs = result["metrics"]["exclude_seen"]["ndcg"]["10"]
        pair = (paired or {}).get(name)
        verdict, change, note = compare(
            ours, theirs, served_error, saved_error(result), pair
        )
        rows[name] = {
            "served": ours,
            "baseline": theirs,
            "change": change,
            "verdict": verdict,
            "note": note,
            "paired_standard_error": None if pair is None or pair != pair else pair,
        }
    return rows


def print_test_counts(metrics: dict[str, Any] | None) -> None:
    """Who the test figures are about: users the model never saw (answered as cold
    starts; those with prior rows read from them), users whose test items were all trained on (outside the seen-excluded
    figures), and test rows whose item the model never saw (counted as misses: no
    list can hold it). Nothing is printed for a plain split."""
    if not metrics or "counts" not in metrics:
        return
    counts = metrics["counts"]
    slices = metrics.get("slices") or {}

    def count(name: str, key: str) -> int:
        return int(
            slices.get(name, {}).get("counts", {}).get("include_seen", {}).get(key, 0)
        )

    users = int(counts["include_seen"]["num_queries"])
    cold_users = count("cold_users", "num_queries")
    cold_rows = count("cold_items", "num_test_interactions")
    all_seen = int(counts["exclude_seen"]["num_queries_without_relevant"])
    # new users with prior rows (a MIND dev file's histories), read as a session
    read = count("cold_users_with_history", "num_queries")
    notes = []
    if cold_users:
        notes.append(
            f"{cold_users:,} not in training, answered as cold starts"
            + (f" ({read:,} of them read from their history)" if read else "")
        )
    if all_seen:
        notes.append(
            f"{all_seen:,} whose test items were all in their training rows"
            + (" or history" if read else "")
            + ", left out of the 'excl' figures"
        )
    if cold_rows:
        notes.append(
            f"{cold_rows:,} test (user, item) pair{'s' if cold_rows != 1 else ''} with "
            "an item not in training, counted as misses (no list can hold it)"
        )
    if notes:
        console.print(Text(f"Test users: {users:,}; " + "; ".join(notes) + "."))


def print_session_knn(choice: dict[str, Any] | None) -> None:
    """Say which session-kNN weight validation picked (``session_knn_weight=-1``),
    with the validation NDCG@10 at each weight tried."""
    if not choice:
        return
    tried = ", ".join(
        f"{weight}: {value:.4f}"
        for weight, value in choice["validation_ndcg_10"].items()
    )
    console.print(
        f"Session-kNN term: weight {choice['weight']:g}, picked on validation "
        f"(NDCG@10 by weight: {tried})."
    )


def print_fallback(fallback: dict[str, Any] | None, *, num_users: int) -> None:
    """Say how the trained model compared with most-popular on validation, and which
    users get the most-popular list because of it."""
    if not fallback:
        return
    ndcg = fallback["validation_ndcg_10"]
    threshold = fallback["max_interactions"]
    if ndcg["popularity"] > ndcg["model"]:
        console.print(
            f"[yellow]On validation, most-popular beats the trained model: NDCG@10 "
            f"{ndcg['popularity']:.4f} against {ndcg['model']:.4f}.[/yellow]"
        )
    if threshold >= 2**31 - 1:
        console.print(
            "[yellow]Every user gets the most-popular list: the trained model did "
            "worse for users of every activity level on validation.[/yellow]"
        )
    elif threshold:
        console.print(
            f"Users with at most {threshold} training items get the most-popular list "
            f"(validation NDCG@10 {ndcg['with_fallback']:.4f} with this rule; "
            f"{num_users:,} users in all). Set retrieval.popularity_fallback to "
            "choose another threshold (0: never)."
        )
