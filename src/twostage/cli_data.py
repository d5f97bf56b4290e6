"""The `twostage data` commands (fetch, describe, split, sample) and the dataset options that
the training commands share. Registered on the main app by :mod:`twostage.cli`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from twostage.cli_group import OnceGroup
from twostage.cli_output import console, print_json

logger = logging.getLogger(__name__)

data_app = typer.Typer(
    cls=OnceGroup,
    help="Fetch, inspect, split and sample datasets.",
    no_args_is_help=True,
)

#: The options that say how to read a log, grouped under this heading in --help.
READING = "Reading the log"

DatasetArg = Annotated[
    str,
    typer.Argument(
        help="A built-in dataset (movielens-100k, movielens-1m, movielens-latest-small, "
        "movielens-20m, movielens-25m, synthetic[:key=value,...]), a CSV, JSON lines "
        "or Parquet path, or book-crossing:PATH / netflix:PATH / recbole:PATH / "
        "mind:PATH for those layouts."
    ),
]
TrainFile = Annotated[
    Path | None,
    typer.Option(
        "--train",
        help="The training side of a split (`twostage data split` writes it); with "
        "--test, used instead of drawing a split from --dataset.",
    ),
]
TestFile = Annotated[
    Path | None,
    typer.Option("--test", help="The test side of a split; goes with --train."),
]
UserCol = Annotated[
    str | None,
    typer.Option(rich_help_panel=READING, help="User ID column of your own log."),
]
ItemCol = Annotated[
    str | None,
    typer.Option(rich_help_panel=READING, help="Item ID column of your own log."),
]
TimeCol = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Timestamp column (epoch s or ISO); default: one named timestamp, "
        'if any; "" for none (file order).',
    ),
]
TimeFormat = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="strptime format of the time column, e.g. %Y%m%d for 20240301 "
        "(default: epoch seconds or ISO 8601).",
    ),
]
TimeUnit = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Unit of numeric timestamps since the epoch: s (default), ms (Java, "
        "JavaScript logs), us or ns; floored to whole seconds.",
    ),
]
RatingCol = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help='Rating column; default: one named rating, if any; "" for none.',
    ),
]
WeightCol = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Column of non-negative row weights (e.g. play counts): each row's "
        "share of both stages' losses; default: none (every row weighs 1).",
    ),
]
LabelCol = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Column of an impression log saying whether the user chose the item "
        "shown: 1/true/yes (clicked, bought) or 0/false/no (shown, not chosen). "
        "The rows not chosen are kept apart from the interactions: the ranker "
        "learns from them as negatives, evaluation reports shown_auc.",
    ),
]
LabelThreshold = Annotated[
    float | None,
    typer.Option(
        rich_help_panel=READING,
        help="Read --label-col as numbers: a row at or above this is chosen, one "
        "below it shown and not chosen (e.g. 2 for KuaiRec's watch_ratio, 4 for "
        "ratings).",
    ),
]
ColumnNames = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Names of the columns of a headerless CSV, in order, comma-separated "
        "(its first line is then a row), e.g. user_id,item_id,rating,timestamp.",
    ),
]
WeightValues = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="With --weight-col naming a column of names (event types): the weight "
        "of each, e.g. view=1,addtocart=3,transaction=5; a value not listed is a "
        "bad row.",
    ),
]
Separator = Annotated[
    str | None,
    typer.Option(rich_help_panel=READING, help="Field separator (default: sniffed)."),
]
UnratedValues = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Rating values that mean 'no rating', comma-separated, e.g. 0 in "
        "Goodreads' and Book-Crossing's logs: those rows stay interactions, without "
        "a rating for the ranker to fit.",
    ),
]
MissingRatings = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="An empty or missing rating: reject (default; a bad_rating row) or "
        "unrated, an interaction without a rating (a log of purchases and "
        "reviews).",
    ),
]
QuoteChar = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help='Quote character of a CSV log and its feature tables (default: "); '
        'none (or "") when quotes are text, as in Last.fm\'s TSV dumps where a '
        "field may start with one.",
    ),
]
CommentPrefix = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Start of the comment lines of a text log and its feature tables, "
        "skipped and counted: # for SNAP's files, % for KONECT's (default: none).",
    ),
]
UserFeatures = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING, help="Comma-separated user feature columns of the log."
    ),
]
ItemFeatures = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING, help="Comma-separated item feature columns of the log."
    ),
]
UserTable = Annotated[
    Path | None,
    typer.Option(
        "--user-table",
        rich_help_panel=READING,
        help="A file of user features (CSV, JSON lines, Parquet) keyed by the log's "
        "user column name or user_id (or --user-table-key); its other columns "
        "become features.",
    ),
]
UserTableKey = Annotated[
    str | None,
    typer.Option(
        "--user-table-key",
        rich_help_panel=READING,
        help="The key column of --user-table when it names it otherwise than the "
        "log (Last.fm's profiles: #id).",
    ),
]
ItemTableKey = Annotated[
    str | None,
    typer.Option(
        "--item-table-key",
        rich_help_panel=READING,
        help="The key column of --item-table when it names it otherwise than the "
        "log (Steam's games: id).",
    ),
]
UserTableColumns = Annotated[
    str | None,
    typer.Option(
        "--user-table-columns",
        rich_help_panel=READING,
        help="Names for the columns of a --user-table without a header, in order "
        "(MovieLens-1M's users.dat: user_id,gender,age,occupation,zip_code).",
    ),
]
ItemTableColumns = Annotated[
    str | None,
    typer.Option(
        "--item-table-columns",
        rich_help_panel=READING,
        help="Names for the columns of an --item-table without a header, in order "
        "(MovieLens-1M's movies.dat: item_id,title,genres).",
    ),
]
ItemTable = Annotated[
    Path | None,
    typer.Option(
        "--item-table",
        rich_help_panel=READING,
        help="A file of item features (a catalogue: CSV, JSON lines, Parquet) keyed "
        "by the log's item column name or item_id (or --item-table-key); its other "
        "columns become features.",
    ),
]
Duplicates = Annotated[
    str | None,
    typer.Option(
        rich_help_panel=READING,
        help="Rows of the same user, item and time: keep (default), first or last "
        "(the others counted as duplicate), or error.",
    ),
]
MinUserRows = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=READING,
        min=0,
        help="Drop the users with fewer rows, and the items with fewer than "
        "--min-item-rows, until every one left has as many (the '5-core' of the "
        "literature); counted in the log.",
    ),
]
MinItemRows = Annotated[
    int | None,
    typer.Option(
        rich_help_panel=READING,
        min=0,
        help="Drop the items with fewer rows (with --min-user-rows).",
    ),
]
Strict = Annotated[
    bool, typer.Option("--strict", help="Stop at the first bad row (line + content).")
]


def weight_values_of(text: str | None) -> dict[str, float] | None:
    """``"view=1,cart=3"`` -> ``{"view": 1.0, "cart": 3.0}`` (the library checks
    the weights); an entry without ``=`` or a number is refused here."""
    from twostage.config.sections import named_weight

    if text is None:
        return None
    values: dict[str, float] = {}
    for entry in text.split(","):
        pair = named_weight(entry)
        if pair is None:
            raise typer.BadParameter(
                "should be value=weight pairs separated by commas, e.g. "
                f"view=1,purchase=5. Received: {text!r}.",
                param_hint="--weight-values",
            )
        values[pair[0]] = pair[1]
    return values


def unrated_values_of(text: str | None) -> list[float] | None:
    """``"0"`` or ``"0,-1"`` -> ``[0.0]`` / ``[0.0, -1.0]``; a non-number is refused."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise typer.BadParameter(
            f"should be numbers separated by commas, e.g. 0. Received: {text!r}.",
            param_hint="--unrated-values",
        )
    return values


def split_names(text: str | None) -> list[str] | None:
    """``"age,country"`` -> ``["age", "country"]``; an empty item is refused."""
    if not text:
        return None
    names = [p.strip() for p in text.split(",")]
    if not all(names):
        raise typer.BadParameter(
            "should be column names separated by commas, without empty items. "
            f"Received: {text!r}."
        )
    return names


def dataset_options(
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    time_format: str | None = None,
    time_unit: str | None = None,
    rating_col: str | None = None,
    weight_col: str | None = None,
    weight_values: str | None = None,
    label_col: str | None = None,
    label_threshold: float | None = None,
    separator: str | None = None,
    quote_char: str | None = None,
    comment_prefix: str | None = None,
    missing_ratings: str | None = None,
    column_names: str | None = None,
    duplicates: str | None = None,
    user_features: str | None = None,
    item_features: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for :func:`twostage.data.registry.load_dataset`."""
    return {
        "user_col": user_col,
        "item_col": item_col,
        "time_col": time_col,
        "time_format": time_format,
        "time_unit": time_unit,
        "rating_col": rating_col,
        "weight_col": weight_col,
        "weight_values": weight_values_of(weight_values),
        "label_col": label_col,
        "label_threshold": label_threshold,
        "separator": separator,
        "quote_char": "" if quote_char == "none" else quote_char,
        "comment_prefix": comment_prefix,
        "missing_ratings": missing_ratings,
        "column_names": split_names(column_names),
        "duplicates": duplicates,
        "has_header": False if column_names else None,
        "user_features": split_names(user_features),
        "item_features": split_names(item_features),
        "strict": strict or None,
    }


def _load(spec: str, options: dict[str, Any]) -> Any:
    from twostage.data.registry import load_dataset

    lowered = spec.lower()
    if lowered.startswith(("movielens-", "ml-", "synthetic")):
        # A built-in dataset has no bad rows to stop at; a column option for it is
        # refused by load_dataset (it was ignored here).
        options = {**options, "strict": None}
    return load_dataset(spec, **options)


def _with_tables(
    data: Any,
    user_table: Path | None,
    item_table: Path | None,
    options: dict[str, Any],
    described: dict[str, Any] | None = None,
) -> Any:
    """``data`` with the feature files of ``--user-table`` / ``--item-table``
    joined, keyed as training keys them (:func:`twostage.data.registry.
    read_side_tables`); ``described``: the ``data.*_table_key`` /
    ``*_table_columns`` settings given (``--item-table-key``...)."""
    described = {k: v for k, v in (described or {}).items() if v}
    if user_table is None and item_table is None and not described:
        return data
    from twostage.config import DataConfig
    from twostage.data.registry import read_side_tables
    from twostage.data.tables import join_features

    users, items = read_side_tables(
        DataConfig(
            user_table=None if user_table is None else str(user_table),
            item_table=None if item_table is None else str(item_table),
            user_col=options.get("user_col"),
            item_col=options.get("item_col"),
            **described,
            **{
                name: options[name]
                for name in ("quote_char", "comment_prefix")
                if options.get(name) is not None
            },
        )
    )
    return join_features(data, users=users, items=items)


def _min_counts(data: Any, users: int | None, items: int | None) -> tuple[Any, Any]:
    """``data`` with ``--min-user-rows`` / ``--min-item-rows`` applied, and what they
    removed (None when neither asks for anything), which is also logged."""
    if (users or 0) <= 1 and (items or 0) <= 1:
        return data, None
    from twostage.data.filtering import min_counts

    filtered, removed = min_counts(data, users=users or 0, items=items or 0)
    logger.info("%s", removed.summary())
    return filtered, removed


#: The reading options a streamed log reads, whatever the command (--column-names
#: sets has_header, so it is refused by its own name).
STREAMED = (
    "has_header",
    "user_col",
    "item_col",
    "time_col",
    "rating_col",
    "time_unit",
    "time_format",
    "missing_ratings",
    "duplicates",
)


def _streamed_names(options: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """``Reading.names`` from the column options (--user-col...)."""
    from types import SimpleNamespace

    from twostage.data.frames import log_names

    if options["time_col"] == "":
        raise typer.BadParameter(
            'a streamed log is split and ordered by its time column: --time-col "" '
            "(no times) is read in memory only.",
            param_hint="--time-col",
        )
    return tuple(log_names(SimpleNamespace(**options)).items())


def _unstreamed(options: dict[str, Any], also: tuple[str, ...] = ()) -> list[str]:
    """The flags given in ``options`` that a streamed log does not read (it reads
    its columns by name): those outside :data:`STREAMED` and ``also``."""
    return [
        f"--{key.replace('_', '-')}"
        for key, value in options.items()
        if value is not None and key not in (*STREAMED, *also)
    ]


def _print_report(report: Any, *, strict_hint: bool = True) -> None:
    if report is None:
        return
    comments = getattr(report, "comment_lines", 0)
    skipped = f"; {comments} comment line(s) skipped" if comments else ""
    if report.ok:
        console.print(
            f"[green]No bad rows[/green] in {escape(str(report.path))}{skipped}."
        )
        return
    table = Table(title=f"Rejected rows in {escape(str(report.path))}")
    for column in ("reason", "count", "first lines"):
        table.add_column(column)
    for reason, count in sorted(report.rejected.items()):
        lines = ", ".join(str(line) for line, _ in report.examples.get(reason, []))
        spanned = getattr(report, "spanned_lines", {}).get(reason)
        over = f" (over {spanned:,} lines)" if spanned else ""
        table.add_row(reason, f"{count}{over}", lines)
    console.print(table)
    console.print(
        f"{report.rows_loaded} of {report.rows_read} rows loaded, "
        f"{report.num_rejected} rejected{skipped}"
        + (" (use --strict to stop at the first one)." if strict_hint else ".")
    )
    if report.hint:
        console.print(Text(report.hint[0].upper() + report.hint[1:] + "."))


def print_summary(summary: dict[str, Any]) -> None:
    """Print the output of :func:`twostage.data.describe.describe` as tables."""
    # Names, columns and paths are the user's text, never Rich markup.
    table = Table(title=f"Dataset {escape(str(summary['name']))}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("num_interactions", "num_users", "num_items"):
        table.add_row(key.replace("_", " "), f"{summary[key]:,}")
    table.add_row("density", f"{summary['density']:.4%}")
    for key in ("interactions_per_user", "interactions_per_item"):
        s = summary[key]
        table.add_row(
            key.replace("_", " "),
            f"min {s['min']:g} / median {s['median']:g} / mean {s['mean']:.1f} / max {s['max']:g}",
        )
    duplicates = summary["duplicate_rows"]
    table.add_row(
        "duplicate rows",
        "not counted when streamed" if duplicates is None else f"{duplicates:,}",
    )
    times = summary["time_range"]
    table.add_row(
        "time range",
        f"{times['min']} .. {times['max']}"
        if times
        else "none: no rows"
        if not summary["num_interactions"]
        else "none: no time column (file order is the time order)",
    )
    if "rating_histogram" in summary:
        hist = summary["rating_histogram"]
        table.add_row("rating mean", f"{summary['rating_mean']:.3f}")
        if summary.get("unrated_rows"):
            table.add_row("unrated rows", f"{summary['unrated_rows']:,}")
        table.add_row("ratings", "  ".join(f"{r}: {c:,}" for r, c in hist.items()))
    if "weights" in summary:
        w = summary["weights"]
        median = "-" if w["median"] is None else f"{w['median']:g}"  # streamed
        bad = (
            f"; {w['bad']:,} bad (missing, not finite, negative or a value "
            f"--weight-values lacks: a streamed run stops at row "
            f"{w['first_bad_row']:,})"
            if w.get("bad")
            else ""
        )
        table.add_row(
            "row weights",
            f"min {w['min']:g} / median {median} / mean {w['mean']:.3g} / "
            f"max {w['max']:g}; {w['zero']:,} zero{bad}"
            if summary["num_interactions"]
            else "none: no rows",
        )
    if "shown" in summary:
        shown = summary["shown"]
        who = (  # a streamed log's are counted, not held
            f" ({shown['users']:,} users, {shown['items']:,} items, "
            f"{shown['items_never_chosen']:,} of them never chosen)"
            if "users" in shown
            else ""
        )
        table.add_row(
            "shown, not chosen",
            f"{shown['rows']:,} rows{who}; {shown['chosen_share']:.2%} of the rows "
            "shown were chosen",
        )
    kinds = summary.get("feature_kinds", {})  # a streamed log has no feature tables

    def features(columns: list[str]) -> Text:
        named = [
            f"{c} ({kinds.get(c) or 'not used'})" if c in kinds else c for c in columns
        ]
        return Text(", ".join(named) or "-")

    if "filtered" in summary:
        from twostage.data.filtering import Filtered

        table.add_row("filtered", Filtered(**summary["filtered"]).summary())
    table.add_row("user features", features(summary["user_features"]))
    table.add_row("item features", features(summary["item_features"]))
    if "other_columns" in summary:
        table.add_row("other columns", Text(", ".join(summary["other_columns"]) or "-"))
    table.add_row("source", Text(summary["source"][:100]))
    console.print(table)


#: What `data split` writes into --out.
SPLIT_FILES = ("train.parquet", "test.parquet")


def side_rows(side: Any) -> Any:
    """One side of a split as ``data split`` writes it: its interactions, and for
    an impression log its shown rows too, with a ``label`` column (True: chosen)
    that ``data.train_file`` / ``data.test_file`` read back."""
    import polars as pl

    from twostage.data.dataset import LABEL, TIME

    rows, shown = side.interactions, side.shown
    if not side.has_time:
        # The `timestamp` of a log without times is its row order: written as it
        # is, the files would read back as times. They keep the order instead.
        rows = rows.sort(TIME, maintain_order=True).drop(TIME)
        shown = None if shown is None else shown.drop(TIME, strict=False)
    if shown is None:
        return rows
    return pl.concat(
        [
            rows.with_columns(pl.lit(True).alias(LABEL)),
            shown.with_columns(pl.lit(False).alias(LABEL)),
        ],
        how="diagonal_relaxed",
    )


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="e.g. movielens-100k")],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Files you already have (e.g. an extracted ml-latest-small folder): "
            "they are parsed into the cache, so `--dataset NAME` finds them offline."
        ),
    ] = None,
) -> None:
    """Download (or find offline) a built-in dataset into the cache."""
    from twostage.data.movielens import load_movielens

    variant = name.lower().removeprefix("movielens-").removeprefix("ml-")
    dataset = load_movielens(variant, data_dir=data_dir, keep=True)
    console.print(
        f"[green]{dataset.name}[/green]: {dataset.num_interactions:,} interactions "
        f"from {escape(str(dataset.source))}"
    )


@data_app.command("describe")
def data_describe(
    dataset: DatasetArg,
    user_col: UserCol = None,
    item_col: ItemCol = None,
    time_col: TimeCol = None,
    time_format: TimeFormat = None,
    time_unit: TimeUnit = None,
    rating_col: RatingCol = None,
    missing_ratings: MissingRatings = None,
    unrated_values: UnratedValues = None,
    weight_col: WeightCol = None,
    weight_values: WeightValues = None,
    label_col: LabelCol = None,
    label_threshold: LabelThreshold = None,
    separator: Separator = None,
    quote_char: QuoteChar = None,
    comment_prefix: CommentPrefix = None,
    column_names: ColumnNames = None,
    duplicates: Duplicates = None,
    user_features: UserFeatures = None,
    item_features: ItemFeatures = None,
    user_table: UserTable = None,
    item_table: ItemTable = None,
    user_table_key: UserTableKey = None,
    item_table_key: ItemTableKey = None,
    user_table_columns: UserTableColumns = None,
    item_table_columns: ItemTableColumns = None,
    min_user_rows: MinUserRows = None,
    min_item_rows: MinItemRows = None,
    strict: Strict = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the summary (and the bad-row report) as JSON."
        ),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read a Parquet log one row group at a time, never as a table (a "
            "directory of Parquet files always is), as `train --stream` reads it: "
            "columns by name, duplicates not counted.",
        ),
    ] = False,
) -> None:
    """Counts, sparsity, rating histogram, time range and the bad-row report."""
    from twostage.data.describe import describe, describe_streamed
    from twostage.data.streaming import Reading

    options = dataset_options(
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        time_format=time_format,
        time_unit=time_unit,
        rating_col=rating_col,
        missing_ratings=missing_ratings,
        weight_col=weight_col,
        weight_values=weight_values,
        label_col=label_col,
        label_threshold=label_threshold,
        separator=separator,
        quote_char=quote_char,
        comment_prefix=comment_prefix,
        column_names=column_names,
        duplicates=duplicates,
        user_features=user_features,
        item_features=item_features,
        strict=strict,
    )
    if stream or Path(dataset).is_dir():
        tables = {
            "user_table": user_table,
            "item_table": item_table,
            "user_table_key": user_table_key,
            "item_table_key": item_table_key,
            "user_table_columns": user_table_columns,
            "item_table_columns": item_table_columns,
        }
        given = _unstreamed(
            {**options, **tables},
            ("weight_col", "label_col", "label_threshold", "weight_values"),
        )
        if given:
            raise typer.BadParameter(
                "a streamed log is read by its column names (user_id, item_id, "
                "timestamp, rating, or those --user-col, --item-col, --time-col and "
                "--rating-col give; --weight-col names any, with --weight-values, "
                "and --label-col; "
                "--time-unit reads its numbers, --time-format its dates, "
                "--duplicates, --min-user-rows and --min-item-rows apply) and counts "
                "bad rows "
                "without stopping; drop " + ", ".join(given) + ".",
                param_hint="--stream",
            )
        summary, report = describe_streamed(
            dataset,
            weight_col=weight_col,
            reading=Reading(
                time_unit or "s",
                time_format,
                missing_ratings or "reject",
                min_user_rows or 0,
                min_item_rows or 0,
                duplicates or "keep",
                label_col,
                label_threshold=label_threshold,
                names=_streamed_names(options),
            ),
            weight_values=options["weight_values"],
            unrated_values=tuple(unrated_values_of(unrated_values) or ()),
        )
        streamed = True
    else:
        described = {
            "user_table_key": user_table_key,
            "item_table_key": item_table_key,
            "user_table_columns": tuple(split_names(user_table_columns) or ()),
            "item_table_columns": tuple(split_names(item_table_columns) or ()),
        }
        data = _with_tables(
            _load(dataset, options), user_table, item_table, options, described
        )
        data = data.with_unrated(unrated_values_of(unrated_values) or [])
        data, filtered = _min_counts(data, min_user_rows, min_item_rows)
        summary, report, streamed = describe(data), data.report, False
        if filtered is not None:
            summary["filtered"] = filtered.to_dict()
    if json_output:
        print_json({**summary, "report": None if report is None else report.to_dict()})
        return
    print_summary(summary)
    _print_report(report, strict_hint=not streamed)
    hist = summary.get("rating_histogram", {})
    if len(hist) == 1:
        console.print(
            Text(
                f"Every rating is {next(iter(hist))}: an implicit log written with "
                "one rating? The ranker's rating head would have nothing to learn; "
                'read it without ratings (--rating-col "").'
            )
        )
    low = [r for r in hist if float(r) < 1]
    if (
        unrated_values is None
        and low in (["0"], ["-1"])
        and len(hist) > 2  # a scale beside it, not a 0/1 log
        and min(float(r) for r in hist if r not in low) >= 1
    ):
        value = low[0]
        console.print(
            Text(
                f"{hist[value]:,} ratings of {value} on a scale that starts at 1: "
                f"where {value} means 'not rated' (0 in Goodreads and Book-Crossing, "
                f"-1 in the Anime ratings), --unrated-values {value} keeps those "
                "rows as interactions without a rating."
            )
        )


@data_app.command("split")
def data_split(
    dataset: DatasetArg,
    out: Annotated[Path, typer.Option(help="Directory for train/test Parquet files.")],
    method: Annotated[
        str, typer.Option(help="random, temporal or leave-last-out")
    ] = "random",
    test_fraction: Annotated[
        float | None,
        typer.Option(help="Share of rows in test (random, temporal). [default: 0.2]"),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the random split. [default: 42]")
    ] = None,
    user_col: UserCol = None,
    item_col: ItemCol = None,
    time_col: TimeCol = None,
    time_format: TimeFormat = None,
    time_unit: TimeUnit = None,
    rating_col: RatingCol = None,
    missing_ratings: MissingRatings = None,
    weight_col: WeightCol = None,
    weight_values: WeightValues = None,
    label_col: LabelCol = None,
    label_threshold: LabelThreshold = None,
    separator: Separator = None,
    quote_char: QuoteChar = None,
    comment_prefix: CommentPrefix = None,
    column_names: ColumnNames = None,
    duplicates: Duplicates = None,
    min_user_rows: MinUserRows = None,
    min_item_rows: MinItemRows = None,
    strict: Strict = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the train.parquet / test.parquet already in --out (a run "
            "trained on them then evaluates on the new ones).",
        ),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read a Parquet log one row group at a time and split it as "
            "`train --stream` does (a directory of Parquet files always is): "
            "columns by name, each side written as it is read.",
        ),
    ] = False,
) -> None:
    """Split a dataset and write train.parquet and test.parquet (user_id, item_id,
    timestamp when the log has times, rating and weight when read; `train
    --train/--test` reads them). A log larger than memory (--stream, or a
    directory of Parquet files) is split as `train --stream` splits it."""
    from twostage.artifacts import refuse_bundle_target
    from twostage.data.split import check_not_empty, file_order_note, split_dataset

    refuse_bundle_target(out, "a split")  # before the log is read
    there = [name for name in SPLIT_FILES if (out / name).exists()]
    if there and not overwrite:
        raise typer.BadParameter(
            f"{str(out)!r} already holds a split ({', '.join(there)}): a run trained "
            "with --train/--test on it would evaluate on the new one. Choose another "
            "--out, or pass --overwrite.",
            param_hint="--out",
        )
    unread = [
        flag
        for flag, value, read in (
            ("--test-fraction", test_fraction, method != "leave-last-out"),
            ("--seed", seed, method == "random"),
        )
        if value is not None and not read
    ]
    if unread and method in ("temporal", "leave-last-out"):
        raise typer.BadParameter(
            f"the {method} split does not read {' or '.join(unread)}: only the "
            "random split draws, and leave-last-out holds out each user's last row.",
            param_hint="--method",
        )
    options = dataset_options(
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        time_format=time_format,
        time_unit=time_unit,
        rating_col=rating_col,
        missing_ratings=missing_ratings,
        weight_col=weight_col,
        weight_values=weight_values,
        label_col=label_col,
        label_threshold=label_threshold,
        separator=separator,
        quote_char=quote_char,
        comment_prefix=comment_prefix,
        column_names=column_names,
        duplicates=duplicates,
        strict=strict,
    )
    split_seed = 42 if seed is None else seed
    fraction = 0.2 if test_fraction is None else test_fraction
    if stream or Path(dataset).is_dir():
        _split_streamed(
            dataset,
            out,
            options,
            method=method,
            test_fraction=fraction,
            seed=split_seed,
            min_rows=(min_user_rows or 0, min_item_rows or 0),
        )
        return
    data = _load(dataset, options)
    check_not_empty(data)  # every row rejected: the report, not two empty files
    data, _ = _min_counts(data, min_user_rows, min_item_rows)
    note = file_order_note(data, method)
    if note:
        logger.warning(note)
    split = split_dataset(data, method=method, test_fraction=fraction, seed=split_seed)
    out.mkdir(parents=True, exist_ok=True)
    for side, name in zip(split, SPLIT_FILES, strict=True):
        side_rows(side).write_parquet(out / name)
    console.print(
        f"{method} split: {split.train.num_interactions:,} train, "
        f"{split.test.num_interactions:,} test rows -> {escape(str(out))}"
    )
    sides = " ".join(f"--{n.split('.')[0]} {out / n}" for n in SPLIT_FILES)
    console.print(
        "Train on it beside the log it came from (its side tables and ID types): "
        f"`twostage train --dataset {escape(dataset)} {escape(sides)} ...`, with "
        "the column options given here."
    )


def _split_streamed(
    dataset: str,
    out: Path,
    options: dict[str, Any],
    *,
    method: str,
    test_fraction: float,
    seed: int,
    min_rows: tuple[int, int],
) -> None:
    """`data split` of a log read one row group at a time."""
    from twostage.data.streamed_split import write_streamed_split
    from twostage.data.streaming import Reading

    given = _unstreamed(
        options, ("weight_col", "weight_values", "label_col", "label_threshold")
    )
    if given:
        raise typer.BadParameter(
            "a streamed log is read by its column names (user_id, item_id, "
            "timestamp, rating, or those --user-col, --item-col, --time-col and "
            "--rating-col give; --time-unit reads its numbers, --time-format its "
            "dates, --missing-ratings, --duplicates, --min-user-rows and "
            "--min-item-rows apply; --weight-col names any, with --weight-values, "
            "and --label-col) and its bad rows counted without stopping; drop "
            + ", ".join(given)
            + ".",
            param_hint="--stream",
        )
    reading = Reading(
        options["time_unit"] or "s",
        options["time_format"],
        options["missing_ratings"] or "reject",
        min_rows[0],
        min_rows[1],
        options["duplicates"] or "keep",
        options["label_col"],
        label_threshold=options["label_threshold"],
        names=_streamed_names(options),
    )
    written = write_streamed_split(
        dataset,
        out / SPLIT_FILES[0],
        out / SPLIT_FILES[1],
        method=method,
        test_fraction=test_fraction,
        seed=seed,
        reading=reading,
        weight_col=options["weight_col"],
        weight_values=options["weight_values"],
    )
    _print_report(written.report, strict_hint=False)
    console.print(
        f"{method} split, streamed: {written.train_rows:,} train, "
        f"{written.test_rows:,} test rows -> {escape(str(out))}"
    )


@data_app.command("sample")
def data_sample(
    log: Annotated[
        Path,
        typer.Argument(
            help="A Parquet file, or a directory of them (the log `train --stream` "
            "reads).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="The sample's Parquet file.")],
    users: Annotated[
        int | None,
        typer.Option(min=1, help="Draw this many users (two passes over the log)."),
    ] = None,
    fraction: Annotated[
        float | None,
        typer.Option(
            help="Or draw about this share of the users, in (0, 1] (one pass)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the users' hash: another draws others.")
    ] = 42,
    user_col: Annotated[
        str, typer.Option(help="The log's user ID column.")
    ] = "user_id",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the counts as JSON.")
    ] = False,
) -> None:
    """Write the rows of some of a Parquet log's users to one Parquet file, every
    column as it is, read one row group at a time: a log too large to read in
    memory becomes one `twostage tune --dataset` can read (`tune --sample-users`
    does this itself for a directory). Users are drawn by a stable hash of their
    ID and --seed: the users a draw from the whole log held in memory takes with
    that seed. Rows without a user ID are counted, not drawn."""
    from twostage.data.sample import sample_log_users

    if out.exists() and not overwrite:
        raise typer.BadParameter(
            f"{str(out)!r} already exists: choose another --out, or pass --overwrite.",
            param_hint="--out",
        )
    if (users is None) == (fraction is None):
        raise typer.BadParameter(
            "give one of --users (a count) or --fraction (a share of the users).",
            param_hint="--users / --fraction",
        )
    from twostage.cli_batch import check_writable

    check_writable(out, "--out")  # before the passes over the log
    drawn = sample_log_users(
        log,
        out,
        users=users,
        fraction=fraction,
        user_col=user_col,
        seed=seed,
        overwrite=overwrite,
    )
    if json_output:
        print_json(drawn.to_dict())
        return
    console.print(escape(drawn.summary()))
