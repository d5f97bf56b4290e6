"""The `twostage` command line. Only the cli modules print; data and ops commands live
in :mod:`twostage.cli_data` and :mod:`twostage.cli_ops`, tables and the progress line in
:mod:`twostage.cli_output`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer
from rich.markup import escape

from twostage.cli_batch import (
    BATCH,
    Overwrite,
    check_batch_options,
    parse_id,
    read_exclusions,
    read_ids,
    read_sessions,
    write_in_chunks,
)
from twostage.cli_data import (
    ColumnNames,
    CommentPrefix,
    Duplicates,
    ItemCol,
    ItemFeatures,
    ItemTable,
    ItemTableColumns,
    ItemTableKey,
    LabelCol,
    LabelThreshold,
    MinItemRows,
    MinUserRows,
    MissingRatings,
    QuoteChar,
    RatingCol,
    Separator,
    TestFile,
    TimeCol,
    TimeFormat,
    TimeUnit,
    TrainFile,
    UnratedValues,
    UserCol,
    UserFeatures,
    UserTable,
    UserTableColumns,
    UserTableKey,
    WeightCol,
    WeightValues,
    data_app,
    dataset_options,
    print_summary,
    split_names,
    unrated_values_of,
)
from twostage.cli_group import OnceGroup, joined
from twostage.cli_info import env_command, info_command
from twostage.cli_ops import (
    add_items_command,
    index_app,
    remove_items_command,
    restore_items_command,
    serve_command,
)
from twostage.cli_output import (
    JsonOutput,
    console,
    impressions_line,
    items_table,
    print_fallback,
    print_json,
    print_list_rules,
    print_metrics,
    print_ranking,
    print_session_figures,
    print_session_knn,
    print_test_counts,
    session_standing,
    standing_lines,
    standing_rows,
    status_console,
    training_progress,
)
from twostage.cli_tune import tune_command
from twostage.data.frames import log_names
from twostage.errors import ConfigError, TwostageError

app = typer.Typer(
    cls=OnceGroup,
    help="twostage: a two-stage recommender (two-tower retrieval, then ranking).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# --help groups the commands by step of the work (registered at the end of the module,
# in the order a user takes them).
START, DATA, TRAIN, USE = "Start here", "Data", "Train and evaluate", "Use a model"
app.add_typer(data_app, name="data", rich_help_panel=DATA)
app.add_typer(index_app, name="index", rich_help_panel=USE)


train_app = typer.Typer(
    cls=OnceGroup,
    help="Train both stages into a bundle (`twostage train --out models/x/1`), or "
    "one stage (`twostage train retrieval`).",
    invoke_without_command=True,
)
app.add_typer(train_app, name="train", rich_help_panel=TRAIN)


def experiment_config(
    dataset: str | None,
    config_file: Path | None,
    overrides: list[str],
    columns: dict[str, Any],
) -> Any:
    """The config of ``--config`` (else the defaults), with ``--dataset`` where it is
    given, the column options, then ``--set``."""
    from twostage.config import ExperimentConfig, apply_overrides, load_config

    config = load_config(config_file) if config_file else ExperimentConfig()
    mapping = [] if dataset is None else [f"data.dataset={dataset}"]
    for key, value in columns.items():
        if value is not None:  # "" is a choice: `--time-col ""` reads no time
            if isinstance(value, Path):
                value = str(value.resolve())  # the saved config must find it again
            mapping.append(
                f"data.{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
            )
    config = apply_overrides(config, [*mapping, *overrides])
    named = config_file is not None or any(
        o.strip().startswith("data.dataset") for o in overrides
    )
    split_files = columns.get("train_file") or columns.get("test_file")
    if split_files and dataset is None and not named:
        status_console.print(
            "[yellow]--train/--test without --dataset: the log they were split "
            f"from is taken to be the default, {escape(config.data.dataset)} (its "
            "side tables and ID types); name your log with --dataset.[/yellow]"
        )
    return config


Diversity = Annotated[
    float,
    typer.Option(
        "--diversity",
        min=0.0,
        max=1.0,
        help="0 (the list as scored) to 1: pick each next item from the "
        "candidates trading its score against its likeness to the items picked "
        "before it (maximal marginal relevance over the item embeddings); the "
        "items keep their scores. For one list or many.",
    ),
]
MaxPer = Annotated[
    list[str] | None,
    typer.Option(
        "--max-per",
        help="At most N items of a list sharing a value of a metadata column, "
        "e.g. --max-per genres=3 (an item of a list column counts towards each of "
        "its values); repeat for several columns; for one list or many.",
    ),
]
ExcludeItems = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Item IDs to leave out of the list, comma-separated or repeated (a "
        "basket, the items shown before; not read as history); an ID the model "
        "does not know is named.",
    ),
]
Widening = Annotated[
    int,
    typer.Option(
        "--widening",
        min=1,
        help="How many times wider than --num-candidates a list --max-per leaves "
        "short may be picked from (1: never, the list stays short).",
    ),
]
DiversityBy = Annotated[
    str | None,
    typer.Option(
        "--diversity-by",
        metavar="COLUMN",
        help="With --diversity: items are alike by this metadata column's "
        "values (e.g. genres: the cosine of their multi-hot rows) instead of "
        "their embeddings.",
    ),
]
NumCandidates = Annotated[
    int | None,
    typer.Option(
        "--num-candidates",
        min=1,
        help="How many candidates each list is picked from (default: the number "
        "the ranking stage was evaluated with); a list --max-per leaves short is "
        "picked again from 4 then 16 times as many (--widening; or the catalogue).",
    ),
]
TensorBoard = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Also log both stages' curves here for TensorBoard (needs the "
        "tensorboard package).",
    ),
]

NProc = Annotated[
    int,
    typer.Option(
        "--nproc",
        help="Train as N data-parallel processes on this machine (torchrun "
        "--standalone; gloo on CPU, nccl on GPU). Several machines: "
        "`torchrun --nnodes ... -m twostage train ...`.",
    ),
]

AllowConfigChange = Annotated[
    bool,
    typer.Option(
        "--allow-config-change",
        help="With --resume: continue although the settings differ from the "
        "checkpoint's (beyond epochs, threads and device; refused otherwise).",
    ),
]

WarmStartFrom = Annotated[
    Path | None,
    typer.Option(
        "--warm-start",
        help="Start from this saved model's weights (a bundle, a model's "
        "directory of versions, or a run): IDs both logs hold keep their "
        "vectors, new ones start fresh; the same architecture "
        "(train.warm_start).",
    ),
]


def _warm_started(overrides: list[str] | None, warm_start: Path | None) -> list[str]:
    """``--set`` overrides with ``--warm-start`` as ``train.warm_start``: an
    absolute path, which the saved config finds from anywhere, and a model's
    directory of versions as its newest version, so that the config names the
    bundle the weights came from (not whichever is newest later)."""
    if warm_start is None:
        return list(overrides or [])
    from twostage.artifacts import latest_version

    path = warm_start.resolve()
    if _holds_versions(path):
        path = latest_version(path)
    return [*(overrides or []), f"train.warm_start={path}"]


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While training: SIGTERM and the first Ctrl-C finish the step in progress,
    write a checkpoint of it (where the run keeps checkpoints) and stop with a
    message, so --resume continues exactly (they lost the epoch in progress); a
    second Ctrl-C stops at once, saying what is kept. The stop is no error: its
    message is a notice, and the exit code says the signal (130 for Ctrl-C, 143
    for SIGTERM, as a process killed by it)."""
    from twostage.training.loop import (
        TrainingInterrupted,
        cancel_stop,
        request_stop,
        stop_requested,
        training_running,
    )

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Under torchrun every rank stops so (the signal reaches each, and they agree
    # on the step); rank 0 speaks for them.
    say = status_console.print if _rank() == 0 else (lambda *_, **__: None)
    asked = [130]  # the exit code of the signal that asked to stop

    def on_ctrl_c(*_: Any) -> None:
        if stop_requested() or not training_running():  # loading, evaluating
            raise KeyboardInterrupt
        asked[0] = 130
        request_stop()
        say(
            "[yellow]stopping[/yellow] (Ctrl-C) after the step in progress, with a "
            "checkpoint of it where the run keeps them (--work-dir for train, --out "
            "for train retrieval); Ctrl-C again to stop at once."
        )

    def on_term(*_: Any) -> None:
        if training_running():
            asked[0] = 143
            request_stop()
            return
        say(
            "[red]terminated[/red] (SIGTERM) outside a training loop: nothing of "
            "this run was saved but the checkpoints it wrote; --resume continues "
            "from there."
        )
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    previous_int = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    except TrainingInterrupted as stopped:
        say(
            f"[yellow]stopped[/yellow]: {escape(as_flags(str(stopped)))}",
            soft_wrap=True,
        )
        raise SystemExit(asked[0]) from None
    except KeyboardInterrupt:
        say(
            "[red]interrupted[/red] (Ctrl-C): nothing of this run was saved but "
            "its checkpoints (each epoch's, and those train.checkpoint_steps or "
            "train.checkpoint_minutes ask for within one), "
            "when --work-dir (train) or --out (train retrieval) holds them; --resume "
            "continues from there. During training, one Ctrl-C (or SIGTERM) "
            "finishes the step and checkpoints it first."
        )
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        cancel_stop()


#: The column, table and file options of the commands that train (their
#: parameters by these names).
TRAINING_COLUMNS = (
    "user_col",
    "item_col",
    "time_col",
    "time_format",
    "time_unit",
    "rating_col",
    "missing_ratings",
    "unrated_values",
    "weight_col",
    "weight_values",
    "label_col",
    "label_threshold",
    "separator",
    "quote_char",
    "comment_prefix",
    "column_names",
    "duplicates",
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
    "train_file",
    "test_file",
)


def training_columns(params: dict[str, Any]) -> dict[str, Any]:
    """The ``data.*`` keys of a training command's column, table and file options
    (``params``: its arguments by name, :data:`TRAINING_COLUMNS` among them)."""
    given = {name: params[name] for name in TRAINING_COLUMNS}
    reading = (
        *("user_col", "item_col", "time_col", "time_format", "time_unit"),
        *("rating_col", "weight_col", "weight_values", "label_col"),
        *("label_threshold", "separator", "quote_char", "comment_prefix"),
        *("missing_ratings", "column_names", "duplicates", "user_features"),
        "item_features",
    )
    columns = dataset_options(**{name: given[name] for name in reading})
    del columns["strict"]  # not a config key: training reads without it
    columns["weight_values"] = given["weight_values"]  # checked, kept as text
    del columns["has_header"]  # data.column_names says the file has none
    for name in (
        *("train_file", "test_file", "user_table", "item_table"),
        *("user_table_key", "item_table_key", "min_user_rows", "min_item_rows"),
    ):
        columns[name] = given[name]
    columns["user_table_columns"] = split_names(given["user_table_columns"])
    columns["item_table_columns"] = split_names(given["item_table_columns"])
    columns["unrated_values"] = unrated_values_of(given["unrated_values"])
    return columns


@train_app.callback()
def train_all(
    ctx: typer.Context,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Bundle directory, e.g. models/movielens/1 (new version); a "
            "model's directory of versions (models/movielens) saves as its next "
            "version."
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Built-in dataset name, path of your CSV, JSON lines or Parquet log, "
            "or book-crossing:PATH / netflix:PATH / recbole:PATH / mind:PATH for "
            "those layouts (default: the --config's data.dataset, else "
            "movielens-100k)."
        ),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="A JSON experiment config.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=5."),
    ] = None,
    ranking: Annotated[bool, typer.Option(help="Train the ranking stage too.")] = True,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoints of both stages go here after every epoch "
            "(retrieval/, ranking/); needed by --resume."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from the --work-dir checkpoints.",
        ),
    ] = False,
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
    train_file: TrainFile = None,
    test_file: TestFile = None,
    allow_config_change: AllowConfigChange = False,
    warm_start: WarmStartFrom = None,
    tensorboard: TensorBoard = None,
    nproc: NProc = 1,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read --dataset (a Parquet file or directory) one row group at a "
            "time, never as a table, for logs larger than memory: both stages train "
            "on the training rows' indices and ratings (see `train retrieval "
            "--stream`; docs/scaling.md).",
        ),
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Train retrieval (and ranking), evaluate, and save a versioned bundle."""
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise typer.BadParameter("--out is required, e.g. --out models/movielens/1")
    from twostage.cli_batch import check_folder

    check_folder(out, "--out")  # a file in the way: refused now, not after training
    versions = _holds_versions(out)
    if out.exists() and not versions:  # refused now, not after training
        raise typer.BadParameter(
            f"{str(out)!r} already exists, and bundle versions are immutable: save "
            "to a new version directory (e.g. the next number), or pass the "
            "model's directory of versions to save as its next one.",
            param_hint="--out",
        )
    if resume and work_dir is None:
        raise typer.BadParameter(
            "--resume continues from the checkpoints in --work-dir; pass the "
            "--work-dir of the interrupted run.",
            param_hint="--resume",
        )
    _not_into_a_bundle("--work-dir", work_dir, "checkpoints")
    _not_into_a_bundle("--tensorboard", tensorboard, "TensorBoard logs")
    for flag, folder in (("--work-dir", work_dir), ("--tensorboard", tensorboard)):
        if folder is not None:
            check_folder(folder, flag)
    from twostage.data.registry import anchored

    if dataset is not None:
        dataset = anchored(dataset)  # the saved config finds the log from anywhere
    columns = training_columns(locals())
    overrides = _warm_started(overrides, warm_start)
    config = experiment_config(dataset, config_file, overrides, columns)
    if stream and (train_file or test_file):
        raise typer.BadParameter(
            "--stream reads one Parquet log and splits it row by row: drop "
            "--train/--test.",
            param_hint="--stream",
        )
    unused = _ranking_settings(config, overrides or [])
    if unused and not ranking:
        status_console.print(
            f"[yellow]--no-ranking: {escape(', '.join(unused))} not used (no ranking "
            "stage is trained).[/yellow]"
        )
    options: dict[str, Any] = {
        "work_dir": work_dir,
        "resume": resume,
        "allow_config_change": allow_config_change,
    }
    if stream:
        options["stream"] = config.data.dataset
    stages = _fit_both(
        config,
        ranking=ranking,
        quiet=json_output,
        tensorboard=tensorboard,
        **options,
    )
    if _rank() != 0:  # under torchrun: rank 0 saves and reports
        return
    if versions:  # numbered when saved: a version written meanwhile is not taken
        from twostage.artifacts import next_version

        out = next_version(out)
    bundle = stages.recommender().save(out)
    if json_output:
        print_json(
            {
                "bundle": str(bundle),
                "retrieval": stages.retrieval.metrics,
                "ranking": stages.ranking_metrics,
                "best_epoch": stages.retrieval.train_result.best_epoch + 1,
            }
        )
        return
    console.print(f"Bundle saved to [cyan]{escape(str(bundle))}[/cyan].")
    from twostage.artifacts import is_version_name

    if not is_version_name(bundle.name):
        console.print(
            "[yellow]It has no version number: `twostage serve` serves "
            "models/<name>/<n>/ versions, and `add-items`, `remove-items` and "
            "`index build` save the next one beside them (--out "
            f"{escape(str(bundle / '1'))} would have made one).[/yellow]"
        )


def _holds_versions(path: Path) -> bool:
    """Whether ``path`` is a model's directory of saved versions
    (``models/<name>/`` holding ``1/``, ``2/``... bundles), not a bundle."""
    from twostage.artifacts import MANIFEST, latest_version
    from twostage.errors import ArtifactError

    if not path.is_dir() or (path / MANIFEST).exists():
        return False
    try:
        latest_version(path)
    except ArtifactError:
        return False
    return True


def _ranking_settings(config: Any, overrides: list[str]) -> list[str]:
    """The ``ranking.*`` keys set by ``--set`` or away from their defaults (e.g. by
    ``--config``), in the section's order."""
    import dataclasses

    from twostage.config import RankingConfig

    given = {o.partition("=")[0].strip() for o in overrides}
    default = RankingConfig()
    return [
        f"ranking.{f.name}"
        for f in dataclasses.fields(config.ranking)
        if f"ranking.{f.name}" in given
        or getattr(config.ranking, f.name) != getattr(default, f.name)
    ]


def _print_retrieval(run: Any, test: Any, config: Any) -> None:
    """The retrieval metrics beside most-popular's, and the popularity fallback."""
    from twostage.retrieval.evaluation import evaluate_baselines

    rows = {"twostage": run.metrics}
    if run.metrics and test.num_interactions:
        popular = evaluate_baselines(run, test, names=("popularity",))
        rows.update({k: v.to_dict() for k, v in popular.items()})
    print_metrics(
        {}, title=f"Retrieval on {config.data.dataset} (test split)", models=rows
    )
    print_test_counts(run.metrics)
    print_session_knn(run.session_knn)
    print_fallback(run.fallback, num_users=run.spec.vocabulary("user_id").size - 1)


def _fit_both(
    config: Any,
    *,
    ranking: bool,
    quiet: bool = False,
    tensorboard: Path | None = None,
    **options: Any,
) -> Any:
    """:func:`twostage.two_stage.fit_two_stage` behind the progress bars; prints each
    stage's test figures (unless ``quiet``); logs to TensorBoard when asked. With
    ``stream=PATH`` in ``options``: :func:`fit_streamed_two_stage` on that log."""
    from twostage.two_stage import fit_two_stage

    fit: Any = fit_two_stage
    if "stream" in options:
        from functools import partial

        from twostage.retrieval.streamed import fit_streamed_two_stage

        fit = partial(fit_streamed_two_stage, path=options.pop("stream"))

    logger = None
    if tensorboard is not None:
        from twostage.tracking import TensorBoardLogger

        logger = TensorBoardLogger(tensorboard)
    if _rank() != 0:  # another rank of a torchrun job: rank 0 shows the progress
        with _stop_on_sigterm():  # every rank stops after the same step
            return fit(config, ranking=ranking, **options)
    stage_names = ("retrieval", "ranking") if ranking else ("retrieval",)
    also = None if logger is None else logger.on_step
    with _stop_on_sigterm(), training_progress(*stage_names, also=also) as bars:
        stages = fit(
            config,
            ranking=ranking,
            on_step=bars["retrieval"],
            on_ranking_step=bars.get("ranking"),
            **options,
        )
    if logger is not None:
        logger.log_stages(stages)
        logger.close()
    if quiet:
        return stages
    _print_retrieval(stages.retrieval, stages.split.test, config)
    report = stages.ranking_metrics
    if report is not None:
        figures = ", ".join(
            f"{name} {report[key]:.4f}"
            for key, name in (
                ("rmse", "RMSE"),
                ("mae", "MAE"),
                ("auc", "AUC"),
                ("shown_auc", "AUC against the items shown and not chosen"),
            )
            if key in report
        )
        console.print(f"Ranking: {figures}")
        if "two_stage" in report:  # what a user is served: the reranked list
            console.print(_served_line(stages.retrieval.metrics, report))
        if "impressions" in report:
            console.print(impressions_line(report))
    return stages


def _open_bundle(path: Path) -> Any:
    """A bundle, ``models/<name>/`` (newest version) or a `train retrieval` run."""
    from twostage.recommender import load

    return load(path)


def _not_into_a_bundle(flag: str, directory: Path | None, what: str) -> None:
    """The flag's error when ``directory`` is a saved bundle version
    (:func:`twostage.artifacts.refuse_bundle_target`)."""
    from twostage.artifacts import refuse_bundle_target

    if directory is None:
        return
    try:
        refuse_bundle_target(directory, what)
    except ConfigError as e:
        raise typer.BadParameter(str(e), param_hint=flag) from e


def _key_values(items: list[str] | None, option: str) -> dict[str, Any]:
    """``["age=30", "gender=F"]`` -> ``{"age": 30, "gender": "F"}`` (integers parsed)."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"should look like key=value. Received: {item!r}.", param_hint=option
            )
        if not value.strip():
            # An empty value is most often a shell variable that expanded to
            # nothing; read as a missing value it would pass without a word.
            raise typer.BadParameter(
                f"{key!r} has no value ({item!r}); leave the key out to answer "
                "without it.",
                param_hint=option,
            )
        if key in values:
            raise typer.BadParameter(
                f"{key!r} is given twice ({values[key]!r} and {value!r}); give each "
                "key once.",
                param_hint=option,
            )
        values[key] = parse_id(value)
    return values


def _texts(items: list[str] | None, option: str) -> dict[str, str]:
    """``["genres=Comedy"]`` -> ``{"genres": "Comedy"}``, values as typed (the
    caller types them as their columns are)."""
    values: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value.strip():
            raise typer.BadParameter(
                f"should look like column=value. Received: {item!r}.", param_hint=option
            )
        if key in values:
            raise typer.BadParameter(
                f"{key!r} is given twice; give each column once.", param_hint=option
            )
        values[key] = value
    return values


def _session(value: str | None, flag: str = "--session") -> list[Any] | None:
    """``--session 1,2,3`` (or ``--candidates``) as item IDs, in their order."""
    if value is None:
        return None
    ids = [part.strip() for part in value.split(",")]
    if not all(ids):
        raise typer.BadParameter(
            f"should be item IDs separated by commas. Received: {value!r}.",
            param_hint=flag,
        )
    return [parse_id(part) for part in ids]


def _rating(part: str) -> float | None:
    """A ``--session-ratings`` entry: a finite number (None: not one)."""
    try:
        value = float(part)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _seconds(part: str) -> int | None:
    """A ``--session-times`` entry: whole seconds since the epoch, or an ISO
    8601 date-time as those (None: neither)."""
    from twostage.data.dataset import iso_seconds

    try:
        return int(part)
    except ValueError:
        moment = iso_seconds(part)
        return None if moment is None else math.floor(moment)


#: The per-item flags beside ``--session``: the entry key each fills, what one
#: value is called, what it should be, and how it is read.
_SESSION_VALUES: dict[str, tuple[str, str, str, Callable[[str], Any]]] = {
    "--session-ratings": ("rating", "rating", "a finite number", _rating),
    "--session-times": (
        "timestamp",
        "time",
        "whole seconds since 1970 or an ISO 8601 date-time",
        _seconds,
    ),
}


def _session_entries(
    session: str | None, ratings: str | None, times: str | None
) -> list[Any] | None:
    """``--session`` with ``--session-ratings`` and ``--session-times`` (one value
    per item, in the same order; an empty entry: not known) as ``{"item_id",
    "rating", "timestamp"}`` entries; the plain IDs without either."""
    items = _session(session)
    given = dict(zip(_SESSION_VALUES, (ratings, times), strict=True))
    if all(value is None for value in given.values()):
        return items
    entries: list[dict[str, Any]] = [{"item_id": item} for item in items or []]
    for flag, value in given.items():
        if value is None:
            continue
        key, noun, should, read = _SESSION_VALUES[flag]
        if items is None:
            raise typer.BadParameter(
                f"gives a {noun} to each item of --session, which is not given.",
                param_hint=flag,
            )
        parts = [part.strip() for part in value.split(",")]
        if len(parts) != len(items):
            raise typer.BadParameter(
                f"should hold one {noun} per --session item ({len(items)}), "
                f"comma-separated (an empty entry: not known). Received "
                f"{len(parts)}: {value!r}.",
                param_hint=flag,
            )
        for number, (entry, part) in enumerate(zip(entries, parts, strict=True), 1):
            if not part:
                continue
            entry[key] = read(part)
            if entry[key] is None:
                raise typer.BadParameter(
                    f"entry {number} should be {should}. Received: {part!r}.",
                    param_hint=flag,
                )
    return entries


def _session_col_with_sessions(session_col: str, sessions_file: Path | None) -> None:
    if session_col != "session_id" and sessions_file is None:
        raise typer.BadParameter(
            "names the session column of a --sessions file; give one.",
            param_hint="--session-col",
        )


def _new_item_rows(path: Path, keys: list[str]) -> list[dict[str, Any]]:
    """``--new-items FILE``: one candidate object per row (``item_id`` and its
    feature values), read as an item feature table is (its ID column the first
    of ``keys`` it has; rejected rows counted and reported; an item listed
    twice is an error)."""
    from twostage.catalogue import read_item_rows

    try:
        table = read_item_rows(path, keys)
    except (TwostageError, OSError) as e:
        raise typer.BadParameter(str(e), param_hint="--new-items") from e
    if not table.height:
        raise typer.BadParameter(
            f"{str(path)!r} holds no item (a header row naming item_id, then a row "
            "per item).",
            param_hint="--new-items",
        )
    return table.to_dicts()


def recommend_command(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="A bundle dir, models/<name>/ (its newest version), or the --out "
            "directory of `twostage train retrieval`."
        ),
    ],
    user: Annotated[
        str | None, typer.Option(help="User ID (unknown: cold start).")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
    include_seen: Annotated[
        bool, typer.Option("--include-seen", help="Keep items the user has seen.")
    ] = False,
    feature: Annotated[
        list[str] | None,
        typer.Option(help="Cold-start user feature, e.g. --feature age=30."),
    ] = None,
    context: Annotated[
        list[str] | None,
        typer.Option(
            help="Context of the request, for a model that reads some, e.g. "
            "--context timestamp=1700000000 (with --users / --all-users or "
            "--sessions: the moment of every list)."
        ),
    ] = None,
    require_known_user: Annotated[
        bool,
        typer.Option(
            "--require-known-user",
            help="Fail (exit 2) when --user is not known to the model, instead of "
            "answering with a labelled cold start.",
        ),
    ] = False,
    session_given: Annotated[
        list[str] | None,
        typer.Option(
            "--session",
            help="The current session's item IDs, oldest first, comma-separated "
            "(e.g. --session 50,172,181, or repeated: --session 50 --session 172): "
            "they follow the user's history, or without --user are the query on "
            "their own.",
        ),
    ] = None,
    session_ratings_given: Annotated[
        list[str] | None,
        typer.Option(
            "--session-ratings",
            help="The user's rating of each --session item, in the same order, "
            "comma-separated (e.g. --session-ratings 5,2,4; an empty entry: not "
            "known): read by models trained with retrieval.sequence_ratings, "
            "within the ratings they trained on (`twostage info` shows the range).",
        ),
    ] = None,
    session_times_given: Annotated[
        list[str] | None,
        typer.Option(
            "--session-times",
            help="When each --session item was taken, in the same order, "
            "comma-separated seconds since 1970 or ISO 8601 date-times (e.g. "
            "--session-times 1700000000,2023-11-14T22:15:20Z, UTC without an "
            "offset; an empty entry: not known): the entries are "
            "read in time order, and models trained with "
            "retrieval.sequence_time_gaps read the gaps between them.",
        ),
    ] = None,
    candidates_given: Annotated[
        list[str] | None,
        typer.Option(
            "--candidates",
            help="Rank these item IDs only, comma-separated or repeated (a "
            "candidate list of your own): ordered as the catalogue would be, "
            "ranker included; -k as long as the list shows every one.",
        ),
    ] = None,
    new_items: Annotated[
        Path | None,
        typer.Option(
            "--new-items",
            help="A CSV, JSON lines or Parquet file of items to rank beside "
            "--candidates: an item_id column and item feature columns. An ID the "
            "model never trained on is a new item, ranked from its features (a "
            "day's news, a new product); one it knows is ranked as trained.",
        ),
    ] = None,
    users_file: Annotated[
        Path | None,
        typer.Option(
            "--users",
            rich_help_panel=BATCH,
            help="A CSV, JSON lines or Parquet file with a user_id column: recommend "
            "for each of its users into --out, a row per user and rank; unknown "
            "ones get the cold start, from the file's columns named as the "
            "model's user features (country, age...) where it has them.",
        ),
    ] = None,
    all_users: Annotated[
        bool,
        typer.Option(
            "--all-users",
            rich_help_panel=BATCH,
            help="Recommend for every user the model knows, into --out.",
        ),
    ] = False,
    sessions_file: Annotated[
        Path | None,
        typer.Option(
            "--sessions",
            rich_help_panel=BATCH,
            help="A CSV, JSON lines or Parquet file with a row per session item: "
            "session_id and item_id columns, and optionally timestamp, rating and "
            "user_id: recommend for each session (as --session does for one) into "
            "--out, a row per session and rank (the columns may have the training "
            "log's names, as --item-col gave them); the rows the model cannot read "
            "(an unknown item, say) are counted and reported with their reasons.",
        ),
    ] = None,
    session_col: Annotated[
        str,
        typer.Option(
            "--session-col",
            rich_help_panel=BATCH,
            help="With --sessions: the file's column of session IDs.",
        ),
    ] = "session_id",
    out: Annotated[
        Path | None,
        typer.Option(
            rich_help_panel=BATCH,
            help="With --users or --all-users: the .parquet or .csv file to write "
            "(user_id, rank, item_id, score, retrieval_score, path; with --explain "
            "because_item_id); with --sessions, session_id in place of user_id.",
        ),
    ] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Keep only items whose metadata column holds this value, e.g. "
            "--filter genres=Comedy (a list column: by membership); repeat for "
            "several (all must match); for one user or many (--users).",
        ),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Name, for each item, the user's training item closest to it "
            '("because you liked ..."; a known user with a history).',
        ),
    ] = False,
    no_ranker: Annotated[
        bool,
        typer.Option(
            "--no-ranker",
            help="Retrieval's list alone, without the ranking stage (e.g. to compare "
            "the two); the score column is then retrieval's.",
        ),
    ] = False,
    diversity: Diversity = 0.0,
    diversity_by: DiversityBy = None,
    max_per_given: MaxPer = None,
    num_candidates: NumCandidates = None,
    widening: Widening = 16,
    exclude_given: ExcludeItems = None,
    exclude_file: Annotated[
        Path | None,
        typer.Option(
            "--exclude-file",
            help="With --users/--all-users: a CSV, JSON lines or Parquet file of "
            "user_id, item_id rows, the items to leave out of each user's list "
            "(last week's campaign, bought since training); rows for users "
            "without a list and items the model does not know are counted.",
        ),
    ] = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
) -> None:
    """Recommend items for a user or a session, printed with titles next to their
    history; or for many users or sessions into a file (--users, --all-users,
    --sessions)."""
    # Repeated, these join in order (--session 50 --session 172 = 50,172).
    session = joined(session_given)
    session_ratings = joined(session_ratings_given)
    session_times = joined(session_times_given)
    candidates = joined(candidates_given)
    exclude = joined(exclude_given)
    many = users_file is not None or all_users
    _session_col_with_sessions(session_col, sessions_file)
    single = {
        "--user": user,
        "--feature": feature,
        "--session": session,
        "--session-ratings": session_ratings,
        "--session-times": session_times,
        "--candidates": candidates,
        "--new-items": new_items,
        "--exclude": exclude,
        "--require-known-user": require_known_user or None,
    }
    if sessions_file is not None:
        if many:
            raise typer.BadParameter(
                "give --sessions FILE or --users FILE / --all-users, not both.",
                param_hint="--sessions",
            )
        # A session's list explains nothing (--context: the moment of every list).
        single.update({"--explain": explain or None})
        check_batch_options(
            sessions_file,
            False,
            out,
            overwrite,
            single,
            noun="session",
            has_every=False,
        )
    elif many or out is not None:
        check_batch_options(
            users_file,
            all_users,
            out,
            overwrite,
            single,
            noun="user",
            also="--sessions",
        )
    _check_exclude_file(
        exclude_file,
        many or sessions_file is not None,
        "--users FILE, --all-users or --sessions FILE",
    )
    rec = _open_bundle(bundle)
    chosen = _checked_filters(rec, filters)
    max_per = _checked_limits(rec, max_per_given)
    _checked_diversity_by(rec, diversity_by)
    rec.widening = widening
    if sessions_file is not None:
        names = log_names(rec.run.config.data, session_col)
        visits = read_sessions(sessions_file, names=names)
        exclusions, excluded = _exclusions(
            rec,
            exclude_file,
            visits["session_id"].drop_nulls().unique().to_list()
            if "session_id" in visits.columns
            else [],
            "session",
            names,
        )
        summary = _recommend_sessions_into(
            rec,
            visits,
            typing.cast(Path, out),  # check_batch_options refused None
            k=k,
            exclude_seen=not include_seen,
            use_ranker=not no_ranker,
            filters=chosen,
            context=_key_values(context, "--context") or None,
            diversity=diversity,
            diversity_by=diversity_by,
            max_per=max_per,
            num_candidates=num_candidates,
            exclude=exclusions,
        )
        _report_batch(summary, excluded, json_output, k, chosen, "session", max_per)
        return
    if many:
        out = typing.cast(Path, out)  # check_batch_options refused None
        ids = (
            rec.user_vocab.values.to_list()
            if all_users or users_file is None
            else read_ids(
                users_file, "user_id", "--users", log_names(rec.run.config.data)
            )
        )
        exclusions, excluded = _exclusions(rec, exclude_file, ids)
        features, read = _users_features(rec, users_file)
        try:
            summary = _recommend_into(
                rec,
                ids,
                out,
                k=k,
                exclude_seen=not include_seen,
                use_ranker=not no_ranker,
                filters=chosen,
                explain=explain,
                context=_key_values(context, "--context") or None,
                diversity=diversity,
                diversity_by=diversity_by,
                max_per=max_per,
                num_candidates=num_candidates,
                exclude=exclusions,
                user_features=features,
            )
        except ConfigError as e:
            if not str(e).startswith("user "):  # a feature value of the file's
                raise
            raise typer.BadParameter(str(e), param_hint="--users") from e
        if read is not None:
            summary["user_features"] = read
        _report_batch(summary, excluded, json_output, k, chosen, "user", max_per)
        return
    user_id = parse_id(user) if user is not None else None
    known = user_id is not None and bool(rec.user_vocab.lookup(user_id))
    if require_known_user and not known:
        raise typer.BadParameter(
            f"user {user_id!r} is not known to this model "
            f"({rec.user_vocab.size - 1:,} users); drop --require-known-user for a "
            "cold-start answer.",
            param_hint="--user",
        )
    from twostage.errors import UnknownIdError

    if session_ratings is not None and not rec.run.tensors.reads_ratings:
        raise typer.BadParameter(
            "this model does not read a session's ratings (it was trained without "
            "retrieval.sequence_ratings); leave --session-ratings out.",
            param_hint="--session-ratings",
        )
    entries = _session_entries(session, session_ratings, session_times)
    scale = rec.run.tensors.rating_range.tolist()
    for number, entry in enumerate(entries or [], 1):
        rating = entry.get("rating") if isinstance(entry, dict) else None
        if scale and rating is not None and not scale[0] <= rating <= scale[1]:
            raise typer.BadParameter(
                f"entry {number} ({rating:g}) lies outside the ratings this model "
                f"trained on, {scale[0]:g} to {scale[1]:g}.",
                param_hint="--session-ratings",
            )
    asked = _session(candidates, "--candidates")
    if new_items is not None:
        from twostage.catalogue import item_keys

        rows = _new_item_rows(new_items, item_keys(rec.run.config.data))
        asked = [*(asked or []), *rows]
    try:
        answer = rec.recommend(
            user_id,
            k,
            user_features=_key_values(feature, "--feature") or None,
            exclude_seen=not include_seen,
            context=_key_values(context, "--context") or None,
            session=entries,
            candidates=asked,
            use_ranker=not no_ranker,
            explain=explain,
            filters=chosen,
            exclude=_session(exclude, "--exclude"),
            diversity=diversity,
            diversity_by=diversity_by,
            max_per=max_per,
            num_candidates=num_candidates,
        )
    except UnknownIdError as e:  # only listed items can be unknown here
        flag = "--candidates" if str(e).startswith("`candidates`") else "--session"
        if flag == "--candidates" and new_items is not None:
            flag = "--new-items" if candidates is None else "--candidates/--new-items"
        raise typer.BadParameter(
            str(e).replace("`candidates`", f"`{flag}`", 1), param_hint=flag
        ) from e
    except ConfigError as e:  # a request field is named by the flag that fills it
        message = str(e)
        if new_items is not None and message.startswith("`candidates"):
            # --candidates holds plain IDs: an object's mistake is the file's row
            offset = len(_session(candidates, "--candidates") or [])
            message = re.sub(
                r"^`candidates\[(\d+)\]`",
                lambda m: f"`--new-items` row {int(m.group(1)) - offset + 1}",
                message,
            ).replace("`candidates`", "`--new-items`", 1)
            raise typer.BadParameter(message, param_hint="--new-items") from e
        for field, flag in (
            ("filters", "--filter"),
            ("user_features", "--feature"),
            ("context", "--context"),
            ("session", "--session"),
            ("candidates", "--candidates"),
            ("exclude", "--exclude"),
        ):
            if message.startswith(f"`{field}"):
                raise typer.BadParameter(
                    message.replace(f"`{field}`", f"`{flag}`", 1), param_hint=flag
                ) from e
        raise
    if json_output:
        print_json({**answer.to_dict(), "known_user": known})
        return
    label = f"user {user_id}" if known else f"unknown user {user_id!r}"
    unread = {
        "known_user": "the model has learned this user",
        "popularity_fallback": "the model's popularity fallback answers users "
        f"with at most {rec.run.popularity_fallback} training "
        "items, a new one too (retrieval.popularity_fallback)",
    }.get(answer.user_features_unread or "")
    if unread:
        status_console.print(f"[yellow]--feature values not read: {unread}.[/yellow]")
    if user_id is not None and not known:
        # Not an error (a new user is a cold start), but a typo must not pass unseen.
        status_console.print(
            f"[yellow]User {escape(repr(user_id))} is not known to this model: the "
            f"list is a cold start ({answer.path}); --require-known-user makes this "
            "an error.[/yellow]"
        )
    history = rec.history(user_id) if user_id is not None else []
    if history:
        console.print(
            items_table(
                f"User {user_id}'s latest items ({min(len(history), 10)} of "
                f"{len(history):,})",
                history[-10:][::-1],
                scores=False,
            )
        )
    who = label if user_id is not None else "no user"
    if session:
        who += f" after a session of {len(_session(session) or [])} items"
    stage = ", retrieval alone" if no_ranker and rec.ranker is not None else ""
    title = f"Top {len(answer.items)} for {who} ({answer.path}{stage})"
    console.print(items_table(title, answer.items))
    if answer.unread_session_items:
        unread = ", ".join(map(str, answer.unread_session_items))
        status_console.print(
            f"[yellow]The session's item(s) {escape(unread)} were added after "
            "training: left out of the list, but not read by the model, which "
            "knows nothing of them yet.[/yellow]"
        )
    _name_unknown_excluded(answer.unknown_excluded_items)
    if answer.alike_new_items:
        status_console.print(
            "[yellow]This model reads no item feature beside the ID: the "
            f"{len(answer.alike_new_items)} --new-items are each the unknown item's "
            "vector, so they score alike and their order among themselves means "
            "nothing; train with item features (`data.item_features`) to rank new "
            "items by what they are.[/yellow]"
        )
    if answer.left_out_candidates:
        why = {
            "excluded": "in --exclude",
            "seen": "seen",
            "filters": "outside --filter",
            "repeated": "listed twice",
        }
        parts = [
            f"{entry['item_id']} ({why[entry['reason']]})"
            for entry in answer.left_out_candidates
        ]
        status_console.print(
            f"{len(parts)} of the --candidates left out of the list: "
            + escape(", ".join(parts[:10]))
            + (f" and {len(parts) - 10} more" if len(parts) > 10 else "")
            + "."
        )
    catalogue = f"in its catalogue of {rec.item_vocab.size - 1:,}"
    if asked:
        listed = {c["item_id"] if isinstance(c, dict) else c for c in asked}
        catalogue = f"among the {len(listed)} --candidates and --new-items"
        if new_items is None:
            catalogue = f"among the {len(listed)} --candidates"
    if not include_seen and len(answer.items) < k:
        catalogue += ", less the items the query has seen"
    if max_per and len(answer.items) < k:
        looked = rec.deepest_width(rec.candidate_width(num_candidates, k))
        catalogue += (
            f", or --max-per passed over the rest of the candidates (up to "
            f"{looked:,} looked at; a larger --num-candidates looks further)"
        )
    _say_when_short(k, len(answer.items), catalogue)


class _ListCounts:
    """What a batch of lists reports, counted a chunk at a time (``on_chunk`` of
    :func:`write_in_chunks`): the path each list took (its first row's) and the
    lists shorter than ``k``, with the first five keys (``key``: the table's
    user or session column) of those."""

    def __init__(self, k: int, key: str = "user_id") -> None:
        self.k, self.key = k, key
        self.short = 0
        self.first_short: list[Any] = []
        self.paths: dict[str, int] = {}

    def __call__(self, part: list[Any], table: pl.DataFrame) -> None:
        full = {str(v) for v in table.filter(pl.col("rank") == self.k)[self.key]}
        short = [key for key in part if str(key) not in full]
        self.short += len(short)
        self.first_short.extend(short[: 5 - len(self.first_short)])
        firsts = table.filter(pl.col("rank") == 1)["path"].value_counts(sort=True)
        for path, n in firsts.iter_rows():
            self.paths[path] = self.paths.get(path, 0) + n


def _recommend_into(
    rec: Any,
    ids: list[Any],
    out: Path,
    *,
    k: int,
    exclude_seen: bool,
    use_ranker: bool,
    filters: dict[str, Any] | None,
    explain: bool,
    context: dict[str, Any] | None = None,
    diversity: float = 0.0,
    diversity_by: str | None = None,
    max_per: dict[str, int] | None = None,
    num_candidates: int | None = None,
    exclude: dict[str, list[Any]] | None = None,
    user_features: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every user's list into ``out``, 2,048 users at a time, with the counts the
    command reports: the paths taken and the lists shorter than ``k``;
    ``exclude``: each user's items to leave out, by the user ID as text;
    ``user_features``: the features of users the model does not know, by the
    user ID as text."""
    tally = _ListCounts(k, "user_id")
    features = user_features or {}
    rows = write_in_chunks(
        out,
        ids,
        lambda part: rec.recommend_table(
            part,
            k,
            exclude_seen=exclude_seen,
            use_ranker=use_ranker,
            filters=filters,
            explain=explain,
            context=context,
            diversity=diversity,
            diversity_by=diversity_by,
            max_per=max_per,
            num_candidates=num_candidates,
            exclude={u: exclude[str(u)] for u in part if str(u) in exclude}
            if exclude
            else None,
            user_features={u: features[str(u)] for u in part if str(u) in features}
            or None,
        ),
        key="user_id",
        noun="users",
        chunk=2048,
        on_chunk=tally,
    )
    return {
        "out": str(out),
        "users": len(ids),
        "rows": rows,
        "k": k,
        "paths": tally.paths,
        "short_lists": tally.short,
        "first_short_lists": tally.first_short,
        **_unknown_users(rec, ids),
    }


def _users_features(
    rec: Any, users_file: Path | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The user feature columns a ``--users`` file holds beside ``user_id``
    (the model's own: ``rec``'s query columns), for the users the model does
    not know, and what the command reports of them (None: none held)."""
    from twostage.cli_batch import read_user_features

    if users_file is None:
        return {}, None
    columns = rec.user_feature_columns()
    found, read = read_user_features(
        users_file,
        columns,
        "--users",
        log_names(rec.run.config.data),
        known=lambda user: bool(rec.user_vocab.lookup(user)),
    )
    if not read:
        return {}, None
    unknown = {
        user: values
        for user, values in found.items()
        if not rec.user_vocab.lookup(user)
    }
    return unknown, {
        "columns": read,
        "unknown_users_with_features": len(unknown),
        "known_users_not_read": len(found) - len(unknown),
        # 0: the lists come from the features; N: the run's popularity fallback
        # answers every new user (its features not read), as one request's.
        "popularity_fallback": max(rec.run.popularity_fallback, 0),
    }


def _unknown_users(rec: Any, ids: list[Any]) -> dict[str, Any]:
    """How many of ``ids`` the model never trained on (cold starts) and the
    first five; where none is known, an ID the model knows, to compare with."""
    import numpy as np

    from twostage.errors import TwostageError

    try:
        index = rec.user_vocab.transform(pl.Series(ids, strict=False))
    except TwostageError:  # text IDs against integer ones: one at a time
        index = np.array([rec.user_vocab.lookup(u) for u in ids], dtype=np.int64)
    unknown = np.flatnonzero(index == 0)
    found: dict[str, Any] = {
        "unknown_users": len(unknown),
        "first_unknown_users": [ids[int(n)] for n in unknown[:5]],
    }
    if len(ids) and len(unknown) == len(ids) and rec.user_vocab.size > 1:
        found["model_user_id_example"] = rec.user_vocab.values[0]
    return found


def _check_exclude_file(path: Path | None, many: bool, batches: str) -> None:
    """``--exclude-file``, checked before the bundle loads: it goes with a
    batch of lists (``batches`` names the flags that make one) and names a
    file."""
    if path is None:
        return
    if not many:
        raise typer.BadParameter(
            f"leaves items out of many lists: give {batches} (one list takes "
            "--exclude).",
            param_hint="--exclude-file",
        )
    if not path.is_file():
        raise typer.BadParameter(
            f"{str(path)!r} is not a file.", param_hint="--exclude-file"
        )


def _exclusions(
    rec: Any,
    path: Path | None,
    ids: list[Any],
    noun: str = "user",
    names: dict[str, str] | None = None,
    value: str = "item_id",
) -> tuple[dict[str, list[Any]] | None, dict[str, Any] | None]:
    """``--exclude-file``'s items per user (or session, or item: ``noun``; by
    the ID as text; ``value``: the column of the items to leave out) and what
    the command reports of the file: its rows, the users it names, and the
    rows it could not use (a user without a list here) or that leave nothing
    out (an item the model does not know), counted with their first rows."""
    if path is None:
        return None, None
    key = f"{noun}_id"
    frame = read_exclusions(
        path, "--exclude-file", names or log_names(rec.run.config.data), key, value
    )
    listed = {str(u) for u in ids}
    users = [str(u) for u in frame[key].to_list()]
    items = frame[value].to_list()
    rows = frame["row"].to_list()
    unused = [r for r, u in zip(rows, users, strict=True) if u not in listed]
    unknown = [
        r
        for r, u, i in zip(rows, users, items, strict=True)
        if u in listed and not rec.item_vocab.lookup(i)
    ]
    exclusions: dict[str, list[Any]] = {}
    for user, item in zip(users, items, strict=True):
        if user in listed:
            exclusions.setdefault(user, []).append(item)
    report = {
        "file": str(path),
        "rows": len(rows),
        f"{noun}s": len(exclusions),
        f"rows_for_{noun}s_without_a_list": len(unused),
        f"first_rows_for_{noun}s_without_a_list": unused[:5],
        "rows_with_unknown_items": len(unknown),
        "first_rows_with_unknown_items": unknown[:5],
    }
    return exclusions, report


def _report_batch(
    summary: dict[str, Any],
    excluded: dict[str, Any] | None,
    json_output: bool,
    k: int,
    filters: dict[str, Any] | None,
    noun: str,
    max_per: dict[str, int] | None,
) -> None:
    """A batch of lists' summary, with what ``--exclude-file`` did
    (``excluded``), as JSON or printed."""
    if excluded is not None:
        summary["exclude_file"] = excluded
    if json_output:
        print_json(summary)
        return
    _print_batch_summary(summary, k, filters, noun, limited=bool(max_per))


def _say_unknown_users(summary: dict[str, Any], noun: str) -> None:
    """How many of a batch's users the model does not know, and, where every
    one of them is, whether the file's IDs are of another type than the
    model's (a user column of numbers against text IDs matches none)."""
    first = summary["first_unknown_users"]
    more = ", ..." if summary["unknown_users"] > len(first) else ""
    shown = ", ".join(map(repr, first))
    line = (
        f"{summary['unknown_users']:,} of the {summary['users']:,} {noun}s are "
        f"unknown to the model: cold starts, answered from their features or "
        f"by popularity ({shown}{more})."
    )
    example = summary.get("model_user_id_example")
    if example is not None:
        line += f" None is known: the model's user IDs look like {example!r}."
    status_console.print(f"[yellow]{escape(line)}[/yellow]")


def _say_exclude_file(excluded: dict[str, Any] | None, noun: str) -> None:
    """What ``--exclude-file`` did to a batch of lists (``noun``: user,
    session or item): its rows, the lists it shortened, and the rows it could
    not use, with their first data rows."""
    if not excluded:
        return
    console.print(
        f"--exclude-file: {excluded['rows']:,} rows; items left out of "
        f"{excluded[noun + 's']:,} {noun}s' lists."
    )
    for key, what in (
        (
            f"rows_for_{noun}s_without_a_list",
            f"name {noun}s without a list here: not used",
        ),
        (
            "rows_with_unknown_items",
            "name items this model does not know: nothing to leave out",
        ),
    ):
        if excluded[key]:
            first = excluded[f"first_{key}"]
            more = " ..." if excluded[key] > len(first) else ""
            status_console.print(
                f"[yellow]{excluded[key]:,} --exclude-file rows {what} "
                f"(data rows {first}{more}).[/yellow]"
            )


def _print_batch_summary(
    summary: dict[str, Any],
    k: int,
    filters: dict[str, Any] | None,
    noun: str,
    *,
    limited: bool = False,
) -> None:
    """What ``recommend --users`` / ``--sessions`` wrote: the rows, the paths the
    lists took, the lists shorter than ``k`` and (sessions) the rows not read."""
    paths = ", ".join(f"{p} {n:,}" for p, n in summary["paths"].items()) or "none"
    count = summary[f"{noun}s"]
    console.print(
        f"{summary['rows']:,} rows for {count:,} {noun}{'s' if count != 1 else ''} "
        f"(lists by path: {paths}) -> {escape(summary['out'])}"
    )
    _say_exclude_file(summary.get("exclude_file"), noun)
    if summary.get("unknown_users"):
        _say_unknown_users(summary, noun)
    read = summary.get("user_features")
    if read:
        ignored = read["known_users_not_read"]
        made = (
            "made their cold-start lists"
            if not read.get("popularity_fallback")
            else "were not read: the model's popularity fallback answers users "
            f"with at most {read['popularity_fallback']} training items, a new "
            "one too"
        )
        console.print(
            f"--users: the features {', '.join(read['columns'])} of "
            f"{read['unknown_users_with_features']:,} users the model does not "
            f"know {made}"
            + (
                f"; {ignored:,} known users' features were not read (the model "
                "has learned them)"
                if ignored
                else ""
            )
            + "."
        )
    if summary["short_lists"]:
        pool = "the items that pass --filter" if filters else "the catalogue"
        why = f"{pool} less what they have seen"
        if limited:
            why += ", or --max-per passed over the rest of the candidates"
        first = summary.get("first_short_lists") or []
        more = ", ..." if summary["short_lists"] > len(first) else ""
        named = f", e.g. {', '.join(map(repr, first))}{more}" if first else ""
        status_console.print(
            f"[yellow]{summary['short_lists']:,} {noun}s have fewer than {k} items "
            f"({why}){escape(named)}.[/yellow]"
        )
    if summary.get("unread_rows"):
        reasons = "; ".join(f"{r}: {n:,}" for r, n in summary["unread_reasons"].items())
        first = "; ".join(
            f"data row {u['row']} ({u['session_id']!r}, item {u['item_id']!r}): "
            f"{u['reason']}"
            for u in summary["unread"][:5]
        )
        status_console.print(
            f"[yellow]{summary['unread_rows']:,} rows of --sessions were not read "
            f"({escape(reasons)}); the first: {escape(first)}. --json lists the "
            f"first {len(summary['unread'])}.[/yellow]"
        )
    if summary.get("table_order_sessions"):
        status_console.print(f"[yellow]{escape(_table_order_note(summary))}[/yellow]")


def _table_order_note(found: dict[str, Any]) -> str:
    """The sessions read in the file's order although some rows have times."""
    count = found["table_order_sessions"]
    example = f", e.g. {found['table_order'][0]!r}" if found.get("table_order") else ""
    return (
        f"{count:,} session{'s' if count != 1 else ''} read in the file's order"
        f"{example}: some of their rows have a timestamp and others have none, so "
        "their time order is not known."
    )


def _recommend_sessions_into(
    rec: Any,
    table: pl.DataFrame,
    out: Path,
    *,
    k: int,
    exclude_seen: bool,
    use_ranker: bool,
    filters: dict[str, Any] | None,
    context: dict[str, Any] | None = None,
    diversity: float = 0.0,
    diversity_by: str | None = None,
    max_per: dict[str, int] | None = None,
    num_candidates: int | None = None,
    exclude: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Every session's list into ``out``, 2,048 sessions at a time, with the
    counts the command reports, the rows not read among them (their first 100
    listed, each with its row of the file); ``exclude``: each session's items
    to leave out, by the session ID as text."""
    from twostage.session_batch import SESSION, SessionTableError, recommend_sessions

    if SESSION not in table.columns:  # named before anything is answered
        raise typer.BadParameter(
            f"the file has no {SESSION} column (its columns: {table.columns}); "
            "give it a header row naming session_id and item_id, or name its "
            "session column with --session-col.",
            param_hint="--sessions",
        )
    numbered = table.with_row_index("_row", offset=1)
    order = numbered[SESSION].drop_nulls().unique(maintain_order=True).to_list()
    unread = [
        {"row": row, "session_id": None, "item_id": item, "reason": f"no {SESSION}"}
        for row, item in numbered.filter(pl.col(SESSION).is_null())
        .select("_row", "item_id" if "item_id" in table.columns else SESSION)
        .iter_rows()
    ]
    tally = _ListCounts(k, "session_id")
    table_order: list[Any] = []

    def answer(part: list[Any]) -> pl.DataFrame:
        rows = numbered.filter(pl.col(SESSION).is_in(part))
        try:
            found = recommend_sessions(
                rec,
                rows.drop("_row"),
                k,
                exclude_seen=exclude_seen,
                use_ranker=use_ranker,
                filters=filters,
                context=context,
                rules=rec.list_rules(diversity, max_per, diversity_by),
                num_candidates=num_candidates,
                exclude={s: exclude[str(s)] for s in part if str(s) in exclude}
                if exclude
                else None,
            )
        except SessionTableError as e:  # the file's; a bad -k names its flag
            raise typer.BadParameter(str(e), param_hint="--sessions") from e
        numbers = rows["_row"].to_list()  # the file's row of each chunk row
        unread.extend(
            {**u, "row": numbers[u["row"] - 1]} for u in found.unread.to_dicts()
        )
        table_order.extend(found.table_order)
        return found.lists

    rows = write_in_chunks(
        out,
        order,
        answer,
        key=SESSION,
        noun="sessions",
        chunk=2048,
        on_chunk=tally,
    )
    unread.sort(key=lambda u: u["row"])
    reasons: dict[str, int] = {}
    for u in unread:
        reasons[u["reason"]] = reasons.get(u["reason"], 0) + 1
    return {
        "out": str(out),
        "sessions": len(order),
        "rows": rows,
        "k": k,
        "paths": tally.paths,
        "short_lists": tally.short,
        "first_short_lists": tally.first_short,
        "unread_rows": len(unread),
        "unread_reasons": reasons,
        "unread": unread[:100],
        "table_order_sessions": len(table_order),
        "table_order": table_order[:100],
    }


def _evaluate_sessions(
    rec: Any,
    path: Path,
    use_ranker: bool,
    train: Any,
    json_output: bool,
    session_col: str,
) -> None:
    """``evaluate --sessions``: the figures (the baselines' too, fitted on the
    ``train`` rows when given), then what was left out and why."""
    from twostage.session_batch import SessionTableError
    from twostage.session_evaluation import evaluate_sessions

    if not path.is_file():
        raise typer.BadParameter(
            f"{str(path)!r} is not a file.", param_hint="--sessions"
        )
    try:
        found = evaluate_sessions(
            rec,
            read_sessions(path, names=log_names(rec.run.config.data, session_col)),
            use_ranker=use_ranker,
            train=train,
        )
    except SessionTableError as e:
        raise typer.BadParameter(str(e), param_hint="--sessions") from e
    if json_output:
        print_json(found)
        return
    print_session_figures(
        found, title=f"Next item of {found['sessions']:,} sessions ({path})"
    )
    line = session_standing(found)
    if line:
        console.print(escape(line))
    notes = [
        f"{found['single_item_sessions']:,} one-item "
        f"session{'s' if found['single_item_sessions'] != 1 else ''} left out "
        "(nothing to predict from)"
        if found["single_item_sessions"]
        else "",
        f"{found['unknown_targets']:,} held-out items unknown to the model, counted "
        "as misses"
        if found["unknown_targets"]
        else "",
        f"{found['unread_rows']:,} row{'s' if found['unread_rows'] != 1 else ''} "
        "not read ("
        + "; ".join(f"{r}: {n:,}" for r, n in found["unread_reasons"].items())
        + ")"
        if found["unread_rows"]
        else "",
    ]
    said = "; ".join(note for note in notes if note)
    if said:
        status_console.print(f"[yellow]{escape(said)}.[/yellow]")
    if found.get("table_order_sessions"):
        status_console.print(f"[yellow]{escape(_table_order_note(found))}[/yellow]")


def similar_command(
    bundle: Annotated[
        Path,
        typer.Argument(
            help="A bundle dir, models/<name>/ (its newest version), or the --out "
            "directory of `twostage train retrieval`."
        ),
    ],
    item: Annotated[str | None, typer.Option(help="Item ID.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
    items_file: Annotated[
        Path | None,
        typer.Option(
            "--items",
            rich_help_panel=BATCH,
            help="A CSV, JSON lines or Parquet file with an item_id column: the "
            "similar items "
            "of each into --out, a row per item and rank.",
        ),
    ] = None,
    all_items: Annotated[
        bool,
        typer.Option(
            "--all-items",
            rich_help_panel=BATCH,
            help="Every catalogue item's, into --out.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            rich_help_panel=BATCH,
            help="With --items or --all-items: the .parquet or .csv file to write "
            "(item_id, rank, similar_item_id, score).",
        ),
    ] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Keep only similar items whose metadata column holds this value, "
            "e.g. --filter in_stock=true; repeat for several (all must match).",
        ),
    ] = None,
    feature: Annotated[
        list[str] | None,
        typer.Option(
            help="A feature of an --item the model never trained on (a new "
            "product), e.g. --feature genres=Drama; repeat for several: the "
            "catalogue items closest to it.",
        ),
    ] = None,
    diversity: Diversity = 0.0,
    diversity_by: DiversityBy = None,
    max_per_given: MaxPer = None,
    num_candidates: NumCandidates = None,
    widening: Widening = 16,
    exclude_given: ExcludeItems = None,
    exclude_file: Annotated[
        Path | None,
        typer.Option(
            "--exclude-file",
            rich_help_panel=BATCH,
            help="With --items/--all-items: a CSV, JSON lines or Parquet file of "
            "item_id, similar_item_id rows (a table this command wrote, say), "
            "the similar items to leave out of each item's list; rows for items "
            "without a list and IDs the model does not know are counted.",
        ),
    ] = None,
    overwrite: Overwrite = False,
    json_output: JsonOutput = False,
) -> None:
    """Items most similar to one item (people who liked this also liked); or to
    many items into a file (--items, --all-items)."""
    from twostage.errors import UnknownIdError

    exclude = _session(joined(exclude_given), "--exclude")
    many = items_file is not None or all_items
    _check_exclude_file(exclude_file, many, "--items FILE or --all-items")
    if many or out is not None:
        check_batch_options(
            items_file,
            all_items,
            out,
            overwrite,
            {"--item": item, "--feature": feature, "--exclude": exclude},
            noun="item",
        )
    elif item is None:
        raise typer.BadParameter(
            "give --item ID (or --items FILE / --all-items with --out).",
            param_hint="--item",
        )
    rec = _open_bundle(bundle)
    chosen = _checked_filters(rec, filters)
    max_per = _checked_limits(rec, max_per_given)
    _checked_diversity_by(rec, diversity_by)
    rec.widening = widening
    if many:
        out = typing.cast(Path, out)  # check_batch_options refused None
        ids = (
            rec.item_vocab.values.to_list()
            if all_items or items_file is None
            else read_ids(
                items_file, "item_id", "--items", log_names(rec.run.config.data)
            )
        )
        unknown = [i for i in ids if not rec.item_vocab.lookup(i)]
        if unknown:  # named before any work, not after a partial file
            raise typer.BadParameter(
                f"{len(unknown)} of the items are not in the catalogue: "
                f"{unknown[:5]!r}{' ...' if len(unknown) > 5 else ''}.",
                param_hint="--items",
            )
        short = 0
        excluding, excluded = _exclusions(
            rec, exclude_file, ids, "item", value="similar_item_id"
        )
        shut = excluding or {}

        def tally(part: list[Any], table: pl.DataFrame) -> None:
            nonlocal short
            short += len(part) - int((table["rank"] == k).sum())

        rows = write_in_chunks(
            out,
            ids,
            lambda part: rec.similar_table(
                part,
                k,
                filters=chosen,
                diversity=diversity,
                diversity_by=diversity_by,
                max_per=max_per,
                num_candidates=num_candidates,
                exclude={i: shut[str(i)] for i in part if str(i) in shut} or None,
            ),
            key="item_id",
            noun="items",
            chunk=4096,
            on_chunk=tally,
        )
        summary: dict[str, Any] = {
            "out": str(out),
            "items": len(ids),
            "rows": rows,
            "k": k,
        }
        if excluded is not None:
            summary["exclude_file"] = excluded
        if json_output:
            print_json({**summary, "short_lists": short})
            return
        noun = "item" if len(ids) == 1 else "items"
        console.print(f"{rows:,} rows for {len(ids):,} {noun} -> {escape(str(out))}")
        _say_exclude_file(excluded, "item")
        if short:
            pool = "the items that pass --filter are" if chosen else "the catalogue is"
            why = f"{pool} that few"
            if max_per:
                why += ", or --max-per passed over the rest of the closest"
            status_console.print(
                f"[yellow]{short:,} items have fewer than {k} similar items "
                f"({why}).[/yellow]"
            )
        return
    item = typing.cast(str, item)  # refused above when None
    described = _key_values(feature, "--feature") if feature else None
    try:
        similar = rec.similar_items(
            parse_id(item),
            k,
            filters=chosen,
            item_features=described,
            diversity=diversity,
            diversity_by=diversity_by,
            max_per=max_per,
            num_candidates=num_candidates,
            exclude=exclude,
        )
    except UnknownIdError as e:
        raise typer.BadParameter(
            str(e).replace("`item_features`", "--feature KEY=VALUE", 1),
            param_hint="--item",
        ) from e
    except ConfigError as e:
        if not str(e).startswith("`item_features"):
            raise
        raise typer.BadParameter(
            str(e).replace("`item_features`", "`--feature`", 1), param_hint="--feature"
        ) from e
    unknown = rec.unknown_item_ids(exclude or [])
    if json_output:
        named = {"unknown_excluded_items": unknown} if unknown else {}
        print_json({"item_id": parse_id(item), "items": similar, **named})
        return
    console.print(items_table(f"Similar to item {item}", similar))
    why = "that pass --filter" if chosen else "besides this one"
    if max_per and len(similar) < k:
        looked = rec.deepest_width(rec.candidate_width(num_candidates, k))
        why += (
            f", or --max-per passed over the rest of the closest (up to "
            f"{looked:,} looked at; a larger --num-candidates looks further)"
        )
    _say_when_short(k, len(similar), why)
    _name_unknown_excluded(unknown)


def _name_unknown_excluded(unknown: list[Any]) -> None:
    """Nothing to leave out, but a typo must not pass unseen."""
    if unknown:
        named = ", ".join(map(str, unknown[:10]))
        more = len(unknown) - 10
        status_console.print(
            f"[yellow]--exclude names item(s) this model does not know: "
            f"{escape(named)}{f' and {more} more' if more > 0 else ''}.[/yellow]"
        )


def _checked_filters(rec: Any, filters: list[str] | None) -> dict[str, Any] | None:
    """``--filter column=value`` options, typed as the catalogue's columns hold
    them and checked before any list is made (None: no filter)."""
    try:
        chosen = rec.item_filters.from_text(_texts(filters, "--filter")) or None
        rec.item_filters.mask(chosen)
    except ConfigError as e:
        raise typer.BadParameter(
            str(e).replace("`filters`", "`--filter`", 1), param_hint="--filter"
        ) from e
    return chosen


def _checked_diversity_by(rec: Any, column: str | None) -> None:
    """``--diversity-by COLUMN`` checked against the catalogue's metadata
    before any list is made."""
    try:
        rec.list_rules(0.0, None, column)
    except ConfigError as e:
        raise typer.BadParameter(
            str(e).replace("`diversity_by`", "`--diversity-by`", 1),
            param_hint="--diversity-by",
        ) from e


def _checked_limits(rec: Any, given: list[str] | None) -> dict[str, int] | None:
    """``--max-per column=n`` options as ``max_per``, checked against the
    catalogue's metadata before any list is made (None: none)."""
    limits: dict[str, int] = {}
    for column, text in _texts(given, "--max-per").items():
        if not text.strip().isdigit() or int(text) < 1:
            raise typer.BadParameter(
                f"{column!r} should be a positive whole number of items. "
                f"Received: {text!r}.",
                param_hint="--max-per",
            )
        limits[column] = int(text)
    try:
        rec.list_rules(0.0, limits)
    except ConfigError as e:
        raise typer.BadParameter(
            str(e).replace("`max_per`", "`--max-per`", 1), param_hint="--max-per"
        ) from e
    return limits or None


def _say_when_short(asked: int, got: int, why: str) -> None:
    """A list shorter than ``-k`` says so: the catalogue ran out, nothing was cut."""
    if got < asked:
        status_console.print(f"{asked:,} asked for: only {got:,} items to rank {why}.")


@train_app.command("retrieval")
def train_retrieval_command(
    out: Annotated[
        Path, typer.Option(help="Run directory (checkpoints, model, metrics).")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Built-in dataset name, path of your CSV, JSON lines or Parquet log, "
            "or book-crossing:PATH / netflix:PATH / recbole:PATH / mind:PATH for "
            "those layouts (default: the --config's data.dataset, else "
            "movielens-100k)."
        ),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="A JSON config (see presets/).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=5."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")
    ] = False,
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
    train_file: TrainFile = None,
    test_file: TestFile = None,
    allow_config_change: AllowConfigChange = False,
    warm_start: WarmStartFrom = None,
    nproc: NProc = 1,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read --dataset (a Parquet file or directory) one row group at a "
            "time, never as a table, for logs larger than memory: IDs, history, "
            "the --user-features / --item-features columns, per-row context and "
            "sequence windows; random, temporal or leave-last-out splits; the test "
            "side evaluated after training (--set data.test_users=N for a fixed "
            "sample of N test users; docs/scaling.md).",
        ),
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Train the two-tower retrieval model, evaluate it on the test split, save it."""
    from twostage.data.registry import anchored
    from twostage.retrieval.fit import fit_retrieval
    from twostage.retrieval.run import RUN_WEIGHTS

    _not_into_a_bundle("--out", out, "a run")
    from twostage.cli_batch import check_folder

    check_folder(out, "--out")  # a file in the way: refused now, not after training
    if (out / RUN_WEIGHTS).exists() and not resume:
        status_console.print(
            f"[yellow]{escape(str(out))} holds a trained run; this one replaces it "
            "(--resume continues it instead).[/yellow]"
        )
    if dataset is not None:
        dataset = anchored(dataset)  # the saved config finds the log from anywhere
    columns = training_columns(locals())
    overrides = _warm_started(overrides, warm_start)
    config = experiment_config(dataset, config_file, overrides, columns)
    dataset = config.data.dataset
    if stream:
        from twostage.retrieval.streamed import fit_streamed_retrieval

        resuming = functools.partial(
            fit_streamed_retrieval,
            out_dir=out,
            resume=resume,
            allow_config_change=allow_config_change,
        )
        if _rank() != 0:  # another rank of a torchrun job: rank 0 reports and saves
            with _stop_on_sigterm():
                resuming(config, dataset)
            return

        with _stop_on_sigterm(), training_progress("retrieval") as bars:
            streamed = resuming(config, dataset, on_step=bars["retrieval"])
        summary = {
            "run": str(out),
            **{
                f"{side}_rows": count
                for side, count in (streamed.stream_rows or {}).items()
            },
            "users": streamed.spec.vocabulary("user_id").size - 1,
            "items": streamed.spec.vocabulary("item_id").size - 1,
            "retrieval": streamed.metrics,
            "rejected_rows": (streamed.load_report or {}).get("rejected", {}),
        }
        if json_output:
            print_json(summary)
            return
        if streamed.metrics:
            print_metrics(
                {},
                title=f"Retrieval on {dataset} (test side, streamed)",
                models={"twostage": streamed.metrics},
            )
        rejected = sum(summary["rejected_rows"].values())
        console.print(
            f"Streamed {summary['training_rows']:,} training rows, "
            f"{summary['validation_rows']:,} validation rows "
            f"({summary['users']:,} users, {summary['items']:,} items"
            + (f"; {rejected:,} bad rows left out, see the log" if rejected else "")
            + f"); saved to [cyan]{escape(str(out))}[/cyan]."
        )
        return
    options: dict[str, Any] = {"out_dir": out, "resume": resume}
    if _rank() != 0:  # another rank of a torchrun job: rank 0 reports and saves
        with _stop_on_sigterm():
            fit_retrieval(config, allow_config_change=allow_config_change, **options)
        return
    with _stop_on_sigterm(), training_progress("retrieval") as bars:
        run, split = fit_retrieval(
            config,
            on_step=bars["retrieval"],
            allow_config_change=allow_config_change,
            **options,
        )
    best = run.train_result.best_epoch + 1  # 1-based, as the logs and bars say
    if json_output:
        print_json({"run": str(out), "retrieval": run.metrics, "best_epoch": best})
        return
    _print_retrieval(run, split.test, config)
    console.print(f"Saved to [cyan]{escape(str(out))}[/cyan] (best epoch {best}).")


def evaluate_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A bundle dir, models/<name>/ (its newest version), or the --out "
            "directory of `twostage train retrieval`."
        ),
    ],
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines",
            help="Also evaluate the baselines: popularity, recent popularity, EASE, "
            "item-kNN (both forms), item-to-item transitions, session-kNN (the users "
            "whose sequences share the user's recent items), EASE read in time "
            "order (ease-recency: the user's latest items weigh most).",
        ),
    ] = False,
    test_file: Annotated[
        Path | None,
        typer.Option(
            "--test",
            help="Evaluate on this log instead (CSV, JSON lines, Parquet; e.g. the "
            "week after training), read with the run's column mapping; or "
            "mind:DIR, MIND's dev file, whose click histories are the history of "
            "the users new to the model.",
        ),
    ] = None,
    sessions_file: Annotated[
        Path | None,
        typer.Option(
            "--sessions",
            help="Measure next-item lists on sessions the model never saw instead: "
            "a CSV, JSON lines or Parquet file with a row per session item "
            "(session_id, item_id; optionally timestamp, rating, user_id), each "
            "session's last item held out and found from the ones before it "
            "(HR, NDCG, MRR at K), beside the model's popularity fallback (and, "
            "with --baselines, the baselines fitted on the training rows, each "
            "fed the items the model reads). The columns may have the training "
            "log's names, as --item-col gave them.",
        ),
    ] = None,
    session_col: Annotated[
        str,
        typer.Option(
            "--session-col",
            help="With --sessions: the file's column of session IDs.",
        ),
    ] = "session_id",
    no_ranker: Annotated[
        bool,
        typer.Option(
            "--no-ranker",
            help="With --sessions: measure retrieval's lists, without the ranking "
            "stage.",
        ),
    ] = False,
    per_user: Annotated[
        Path | None,
        typer.Option(
            "--per-user",
            help="Also write each test user's figures to this file (.parquet or "
            ".csv): a row per user and list (user_id, query, model, recall@K, "
            "ndcg@K, hit_rate@K, mrr@K; seen items excluded; model: twostage, "
            "two_stage for the served list of a bundle with a ranker, and each "
            "baseline with --baselines), for your own tests (a paired t-test, a "
            "bootstrap) and slices (heavy against light users).",
        ),
    ] = None,
    diversity: Annotated[
        float,
        typer.Option(
            "--diversity",
            min=0.0,
            max=1.0,
            help="Also measure the lists served with this diversity (as "
            "`recommend --diversity` serves them) beside the lists as scored: "
            "NDCG, Recall and HitRate@10, intra-list diversity, coverage.",
        ),
    ] = 0.0,
    diversity_by: DiversityBy = None,
    max_per_given: Annotated[
        list[str] | None,
        typer.Option(
            "--max-per",
            help="Also measure the lists served with at most N items sharing a "
            "value of a metadata column (--max-per genres=3, as `recommend "
            "--max-per` serves them), with --diversity if given.",
        ),
    ] = None,
    num_candidates: NumCandidates = None,
    widening: Widening = 16,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the --per-user file.")
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Re-evaluate a saved bundle or run on its own test split, rebuilt from the saved
    config, or on a log of new rows (--test): retrieval (optionally beside the
    baselines), then the ranking stage when the bundle has one (RMSE, MAE, AUC,
    two-stage lists against retrieval alone). A run or bundle trained with --stream
    reads its log's test side again, a row group at a time, and its baselines
    read the training rows the same way. With --sessions: next-item figures on
    new sessions, each one's last item held out. With --per-user: each test
    user's figures of every list, to a file."""
    from twostage.retrieval.evaluation import evaluate_models, rebuild_split
    from twostage.retrieval.streamed import streamed_test_side, streamed_training_rows

    if sessions_file is not None and test_file is not None:
        raise typer.BadParameter(
            "measures held-out session items on its own: drop --test.",
            param_hint="--sessions",
        )
    _session_col_with_sessions(session_col, sessions_file)
    if no_ranker and sessions_file is None:
        raise typer.BadParameter(
            "goes with --sessions (the test split's figures show retrieval and the "
            "two-stage lists side by side already).",
            param_hint="--no-ranker",
        )
    if per_user is not None:
        _check_per_user(per_user, overwrite, sessions_file)
    ruled = bool(diversity or max_per_given)
    if num_candidates is not None and not ruled:
        raise typer.BadParameter(
            "sets the candidates the --diversity or --max-per lists are picked "
            "from; give one of them (the test split's figures read the ranking "
            "stage's own number).",
            param_hint="--num-candidates",
        )
    if ruled and sessions_file is not None:
        raise typer.BadParameter(
            "measures the test split's served lists under the rules; --sessions "
            "measures sessions instead: drop one.",
            param_hint="--diversity" if diversity else "--max-per",
        )
    results: dict[str, Any] = {}
    rec = _open_bundle(path)
    max_per = _checked_limits(rec, max_per_given)
    _checked_diversity_by(rec, diversity_by)
    rec.widening = widening
    streamed = rec.run.stream is not None

    def training_rows() -> Any:
        """What the baselines fit on: the rebuilt split's training rows, or a
        streamed run's rows as indices, one more pass over its log."""
        if streamed:
            return streamed_training_rows(rec.run)
        return rebuild_split(rec.run, source=path).train

    if sessions_file is not None:
        train = None
        if baselines:
            try:
                train = training_rows()
            except TwostageError as e:  # the model's own figures need no log
                raise typer.BadParameter(
                    f"{e} Or drop --baselines: the sessions' figures of the model "
                    "and its fallback need no training rows.",
                    param_hint="--baselines",
                ) from e
        _evaluate_sessions(
            rec, sessions_file, not no_ranker, train, json_output, session_col
        )
        return
    if test_file is not None:
        from twostage.retrieval.evaluation import read_test_log

        test = read_test_log(rec.run, test_file)
        train = training_rows() if baselines else None
    elif streamed:  # trained from a stream: the stream's split, read again
        test = streamed_test_side(rec.run)
        train = training_rows() if baselines else None
    else:
        split = rebuild_split(rec.run, source=path)
        test, train = split.test, split.train
    # With baselines, each query's figures are kept, to compare the served list
    # with each baseline's on the same users (a paired standard error).
    keep = baselines or per_user is not None
    found = evaluate_models(
        rec.run, test, baselines=baselines, train=train, keep_queries=keep
    )
    results["retrieval"] = {name: r.to_dict() for name, r in found.items()}
    changed = _catalogue_changes(rec)
    if changed:
        results["catalogue_since_training"] = changed
    kept: dict[str, Any] = {}
    ranker = rec.trained_ranker  # what retrieval's figures rank: the trained items
    if ranker is not None:
        from twostage.ranking import evaluate_ranking

        with status_console.status("evaluating the ranking stage"):
            results["ranking"] = evaluate_ranking(ranker, test, keep_queries=keep)
        kept = results["ranking"].pop("queries", {})
    if per_user is not None:
        results["per_user"] = _write_per_user(per_user, rec.run, test, found, kept)
    if ruled:
        from twostage.list_evaluation import evaluate_list_rules

        with status_console.status("writing every test user's served list"):
            results["list_rules"] = evaluate_list_rules(
                rec,
                test,
                diversity=diversity,
                diversity_by=diversity_by,
                max_per=max_per,
                num_candidates=num_candidates,
            )
    others = {k: v for k, v in results["retrieval"].items() if k != "twostage"}
    rows: dict[str, dict[str, Any]] = {}
    if others:  # where the list a user gets stands, noise guarded
        rows = _standing_of(found, results.get("ranking"), kept)
        results["standing"] = {
            name: {k: v for k, v in row.items() if k != "note"}
            for name, row in rows.items()
        }
    if json_output:
        print_json(results)
        return
    side = (
        str(test_file)
        if test_file is not None
        else "test side of the stream"
        if streamed
        else "test split"
    )
    print_metrics(
        {}, title=f"Evaluation of {path} ({side})", models=results["retrieval"]
    )
    print_test_counts(results["retrieval"].get("twostage"))
    if changed:
        console.print(
            f"[yellow]The figures rank the catalogue the model trained on: the "
            f"{changed['added_items']:,} item(s) added since training are not "
            f"among the candidates, the {changed['removed_items']:,} removed "
            "are (the served lists of --max-per or --diversity, and --sessions, "
            "follow the catalogue as served).[/yellow]"
        )
    if "ranking" in results:
        print_ranking(results["ranking"], title=f"Ranking stage ({side})")
    for line in standing_lines(rows):
        console.print(f"- {escape(line)}")
    if ruled:
        print_list_rules(results["list_rules"])
    if per_user is not None:
        written = results["per_user"]
        console.print(
            f"Per-user figures: {written['rows']:,} rows ({written['queries']:,} "
            f"users with an unseen test item x {len(written['models'])} lists) "
            f"written to [cyan]{escape(str(per_user))}[/cyan]."
        )


def _catalogue_changes(rec: Any) -> dict[str, int]:
    """How many items were added to and removed from the bundle's catalogue
    since training (``add-items``, ``remove-items``); empty when none were."""
    added = rec.item_vocab.size - rec.num_trained_items
    removed = 0 if rec.removed_items is None else len(rec.removed_items)
    return {"added_items": added, "removed_items": removed} if added or removed else {}


def _check_per_user(out: Path, overwrite: bool, sessions_file: Path | None) -> None:
    """``evaluate --per-user``'s file, checked before the bundle loads."""
    if sessions_file is not None:
        raise typer.BadParameter(
            "writes the test split's per-user figures; --sessions measures "
            "sessions instead: drop one.",
            param_hint="--per-user",
        )
    from twostage.cli_batch import check_table_file

    check_table_file(out, overwrite, "--per-user")


def _write_per_user(
    out: Path, run: Any, test: Any, found: dict[str, Any], kept: dict[str, Any]
) -> dict[str, Any]:
    """Each query's figures of every list into ``out``: retrieval's
    (``twostage``), the served two-stage list's (``two_stage``, ``kept`` from
    the ranking report) and each baseline's, a model at a time. Returns what
    was written (``path``, ``rows``, ``queries``, ``models``)."""
    from twostage.cli_batch import write_in_chunks
    from twostage.data.dataset import USER
    from twostage.retrieval.evaluation import eval_queries

    lists = {"twostage": found["twostage"].queries["exclude_seen"]}
    if "two_stage" in kept:
        lists["two_stage"] = kept["two_stage"]
    for name, result in found.items():
        if name != "twostage":
            lists[name] = result.queries["exclude_seen"]
    user_ids = eval_queries(run, test).user_ids

    def table_of(names: list[str]) -> pl.DataFrame:
        frame = lists[names[0]].to_frame()
        return frame.select(
            user_ids.gather(frame["query"]).alias(USER),
            "query",
            pl.lit(names[0]).alias("model"),
            pl.exclude("query"),
        )

    rows = write_in_chunks(
        out,
        list(lists),
        table_of,
        key="model",
        noun="lists",
        chunk=1,
        verbs=("writing the figures of", "wrote the figures of"),
    )
    queries = len(lists["twostage"].rows)
    return {"path": str(out), "rows": rows, "queries": queries, "models": list(lists)}


def _standing_of(
    found: dict[str, Any], ranking: dict[str, Any] | None, kept: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """:func:`standing_rows` of the served list against each baseline of
    ``found`` (``EvalResult`` by name, ``"twostage"`` the retrieval run's), each
    difference's standard error paired over the same users where both kept their
    queries' figures (``kept``: the ranking report's)."""
    from twostage.metrics import paired_standard_error

    retrieval = found["twostage"]
    served, served_error = _served_list(retrieval.to_dict(), ranking)
    if ranking is not None:
        ours = kept.get("two_stage")
    else:
        ours = retrieval.queries.get("exclude_seen")
    others = {k: v for k, v in found.items() if k != "twostage"}
    paired = {
        name: paired_standard_error(ours, theirs)
        for name, result in others.items()
        if ours is not None and (theirs := result.queries.get("exclude_seen"))
    }
    return standing_rows(
        served, {k: v.to_dict() for k, v in others.items()}, served_error, paired
    )


def report_command(
    path: Annotated[
        Path,
        typer.Argument(
            help="A bundle dir, models/<name>/ (its newest version), or the --out "
            "directory of `twostage train retrieval`."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where the report goes (default: reports/<path name>)."),
    ] = None,
) -> None:
    """Write the report of a run or bundle: loss curves of both stages with the best
    epoch marked, metrics at K beside the baselines, score distributions, ranking
    figures, config, seed and version (Markdown, HTML and PNG)."""
    from twostage.cli_batch import check_folder
    from twostage.report import report_for

    target = out or Path("reports") / (path.resolve().name or "run")
    check_folder(target, "--out")  # before the test split is rebuilt and scored
    with status_console.status("rebuilding the test split and evaluating"):
        files, notes = report_for(path, target)
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    console.print(
        f"Report: [cyan]{escape(str(files[0].parent))}[/cyan] ({', '.join(f.name for f in files)})."
    )


def demo(
    out: Annotated[
        Path, typer.Option(help="Where the demo writes its outputs.")
    ] = Path("runs/demo"),
    epochs: Annotated[
        int, typer.Option(help="Training epochs of the retrieval model.")
    ] = 10,
    ranking: Annotated[bool, typer.Option(help="Train the ranking stage too.")] = True,
    ranking_epochs: Annotated[
        int,
        typer.Option(
            help="Ranking epochs; the best on validation is kept. Validation RMSE "
            "bottoms out after 3 on MovieLens-100k, and each epoch costs about 35 s "
            "on 2 cores, so the demo stops there (`twostage train`: up to 30, early "
            "stopping)."
        ),
    ] = 3,
    user: Annotated[
        int, typer.Option(help="The user whose recommendations are shown.")
    ] = 42,
) -> None:
    """The main job on MovieLens-100k, offline: load, train both stages, evaluate
    against the baselines, save a bundle, recommend, and write a report."""
    from twostage.artifacts import next_version
    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.data.describe import describe
    from twostage.data.movielens import load_movielens
    from twostage.evaluate import EvalResult
    from twostage.report import run_facts, score_samples, write_report
    from twostage.retrieval.evaluation import evaluate_baselines

    started = time.perf_counter()
    # The options are checked before anything is loaded or trained.
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=movielens-100k",
            f"train.epochs={epochs}",
            f"ranking.epochs={ranking_epochs}",
        ],
    )
    console.rule("[bold]twostage demo: MovieLens-100k")
    data = load_movielens("100k")
    console.print(f"Loaded from: [cyan]{escape(str(data.source))}[/cyan]")
    if not data.interactions["user_id"].is_in([user]).any():
        raise typer.BadParameter(
            f"MovieLens-100k has no user {user} (its user IDs run from "
            f"{data.interactions['user_id'].min()!r} to "
            f"{data.interactions['user_id'].max()!r}).",
            param_hint="--user",
        )
    summary = describe(data)
    print_summary(summary)
    console.rule("Two towers with side features and history, then the ranker")
    # Each test user's figures are kept, to pair the served list's with each
    # baseline's.
    stages = _fit_both(
        config, ranking=ranking, dataset=data, work_dir=out, keep_queries=True
    )
    run, split = stages.retrieval, stages.split
    console.print(
        f"Random 80/20 split (seed {config.data.seed}): "
        f"{split.train.num_interactions:,} train (incl. validation), "
        f"{split.test.num_interactions:,} test interactions; "
        f"trained {len(run.train_result.history)} epochs in "
        f"{run.train_result.seconds:.1f} s (best epoch {run.train_result.best_epoch + 1})."
    )
    console.rule("Evaluation against the baselines")
    found = evaluate_baselines(run, split.test, train=split.train, keep_queries=True)
    comparison = {"twostage": run.metrics}
    comparison.update({k: v.to_dict() for k, v in found.items()})
    print_metrics({}, title="Test split: twostage vs baselines", models=comparison)
    lists, kept = stages.ranking_metrics, stages.ranking_queries or {}
    ours = dataclasses.replace(
        EvalResult.from_dict(run.metrics), queries=run.test_queries or {}
    )
    if lists is None:  # with a ranker, training printed the served list's line
        console.print(_served_line(run.metrics, None))
    for line in standing_lines(_standing_of({"twostage": ours, **found}, lists, kept)):
        console.print(f"- {line}")
    rec = stages.recommender(items=data.items)
    bundle = rec.save(next_version(out / "models" / "movielens"))
    console.print(f"Bundle saved to [cyan]{escape(str(bundle))}[/cyan].")
    answer = rec.recommend(user, 10)
    history = rec.history(user)
    console.print(
        items_table(
            f"User {user} watched (latest 10)", history[-10:][::-1], scores=False
        )
    )
    console.print(
        items_table(f"Recommended for user {user} ({answer.path})", answer.items)
    )
    star_wars = data.items.filter(  # type: ignore[union-attr]
        (pl.col("title") == "Star Wars") & (pl.col("year") == 1977)
    )["item_id"][0]
    similar = rec.similar_items(star_wars, 10)
    console.print(items_table("Most similar to Star Wars (1977)", similar))
    files = write_report(
        out / "report",
        title="twostage demo: MovieLens-100k",
        summary=summary,
        history=run.train_result.history,
        comparison=comparison,
        scores=score_samples(run, split.test),
        sections={
            # A history has no score: the report's table leaves the column out.
            f"User {user}: recently watched": [
                {k: v for k, v in item.items() if k != "score"}
                for item in history[-10:][::-1]
            ],
            f"User {user}: recommended ({answer.path})": answer.items,
            "Most similar to Star Wars (1977)": similar,
        },
        ranking_history=None if stages.ranker is None else stages.ranker.history,
        ranking=stages.ranking_metrics,
        facts=run_facts(rec),
    )
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    console.print(
        f"Report: [cyan]{escape(str(files[0].parent))}[/cyan] ({', '.join(f.name for f in files)}); "
        f"demo took {time.perf_counter() - started:.0f} s."
    )


def export_command(
    bundle: Annotated[
        Path,
        typer.Argument(help="A bundle dir, or models/<name>/ (its newest version)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where the files go (default: exports/<bundle name>)."),
    ] = None,
    format: Annotated[
        str, typer.Option("--format", help="The format; onnx (opset 17).")
    ] = "onnx",
    without_session_knn: Annotated[
        bool,
        typer.Option(
            "--without-session-knn",
            help="Export a bundle whose retrieval adds the session-kNN term "
            "(retrieval.session_knn_weight) without it: no network holds that "
            "search, so the exported retrieval ranks otherwise than the bundle "
            "serves (export.json's not_exported says so).",
        ),
    ] = False,
    json_output: JsonOutput = False,
) -> None:
    """Export the query tower, candidate tower and ranker (ONNX), with the feature
    vocabularies and a description of every input and output, for Triton,
    TorchServe or onnxruntime."""
    from twostage.export import FORMATS, export_bundle

    if format not in FORMATS:
        raise typer.BadParameter(
            f"should be one of {', '.join(FORMATS)}. Received: {format!r}.",
            param_hint="--format",
        )
    rec = _open_bundle(bundle)
    target = out or Path("exports") / (bundle.resolve().name or "bundle")
    with status_console.status(f"exporting to {format}"):
        files = export_bundle(
            rec, target, format=format, without_session_knn=without_session_knn
        )
    if json_output:
        print_json({name: str(path) for name, path in files.items()})
        return
    console.print(
        f"Exported to [cyan]{escape(str(target))}[/cyan]: "
        + ", ".join(path.name for path in files.values())
    )


def _served_list(
    retrieval: dict[str, Any], ranking: dict[str, Any] | None
) -> tuple[dict[str, float], float | None]:
    """NDCG, Recall and HitRate @10 of the served list (the ranking report's
    two-stage list with a ranker, else retrieval's figures, an ``EvalResult``
    as a dict) and the standard error of its NDCG@10 (None: not recorded)."""
    names = ("ndcg", "recall", "hit_rate")
    if ranking is not None and "two_stage" in ranking:
        error = ranking.get("standard_errors", {}).get("two_stage", {})
        lists = ranking["two_stage"]
        return {m: lists[m]["10"] for m in names}, error.get("ndcg", {}).get("10")
    from twostage.evaluate import saved_error

    figures = retrieval["metrics"]["exclude_seen"]
    return {m: figures[m]["10"] for m in names}, saved_error(retrieval)


def _served_line(retrieval: dict[str, Any], ranking: dict[str, Any] | None) -> str:
    """The sentence giving :func:`_served_list`'s figures (and NDCG@10's standard
    error, where recorded)."""
    served, error = _served_list(retrieval, ranking)
    figures = ", ".join(f"{k}@10 {v:.4f}" for k, v in served.items())
    if error is not None:
        figures += f" (NDCG@10's standard error {error:.4f})"
    return f"The list a user gets (retrieval, then the ranker's order): {figures}."


def _show_version(value: bool) -> None:
    if value:
        from twostage import __version__

        console.print(f"twostage {__version__}")
        raise typer.Exit()


def _rank() -> int:
    """This process's rank under torchrun (0 for a single process)."""
    return int(os.environ.get("RANK", "0"))


def _setup_logging(verbosity: int) -> None:
    """Logs go through rich's handler on the console the progress bars draw on, so a
    log line never breaks a bar. -q: warnings and errors; default: info; -v: debug."""
    from rich.logging import RichHandler

    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if _rank() != 0:
        level = max(level, logging.WARNING)  # rank 0 logs for the job
    handler = RichHandler(
        console=status_console, show_path=False, log_time_format="[%X]", markup=False
    )
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[handler], force=True
    )
    # faiss logs each CPU-specific build it does not find; only the outcome matters.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="Log warnings and errors only."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log debug messages too.")
    ] = False,
) -> None:
    """twostage: a two-stage recommender (two-tower retrieval, then ranking)."""
    if quiet and verbose:
        raise typer.BadParameter("pass --quiet or --verbose, not both.")
    _setup_logging(-1 if quiet else 1 if verbose else 0)


for _name, _command, _panel in (
    ("demo", demo, START),
    ("evaluate", evaluate_command, TRAIN),
    ("report", report_command, TRAIN),
    ("tune", tune_command, TRAIN),
    ("recommend", recommend_command, USE),
    ("similar", similar_command, USE),
    ("add-items", add_items_command, USE),
    ("remove-items", remove_items_command, USE),
    ("restore-items", restore_items_command, USE),
    ("serve", serve_command, USE),
    ("export", export_command, USE),
    ("info", info_command, USE),
    ("env", env_command, START),
):
    app.command(_name, rich_help_panel=_panel)(_command)


def _summary(docstring: str) -> str:
    """A command's line in the command lists: its docstring's first sentence, on
    one line (typer keeps the docstring's own line breaks there)."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


def _summarise(group: typer.Typer) -> None:
    for info in group.registered_commands:
        if info.short_help is None and info.callback and info.callback.__doc__:
            info.short_help = _summary(info.callback.__doc__)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _summarise(sub.typer_instance)


_summarise(app)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: domain errors become one red line and exit code 2.

    Args:
        args: the command line without the program name (default: ``sys.argv``).
    """
    args = list(sys.argv[1:] if args is None else args)
    if "--nproc" in args and "WORLD_SIZE" not in os.environ:
        raise SystemExit(_launch(args))
    try:
        app(args)
    except SystemExit as done:
        if not done.code:  # typer ends a command so
            _leave_group()
        raise
    except TwostageError as e:
        message = escape(as_flags(str(e)))
        status_console.print(f"[red]error{_who()}:[/red] {message}", soft_wrap=True)
        raise SystemExit(2) from e
    except OSError as e:
        if e.filename is None:  # not about a path the command was given
            raise
        # A path to write or read that the file system refuses (a file where a
        # folder should be, no permission, a full disk): the user's to change.
        where = repr(str(e.filename))
        if e.filename2 is not None:
            where += f" -> {str(e.filename2)!r}"
        status_console.print(
            f"[red]error{_who()}:[/red] {escape(e.strerror or str(e))}: "
            f"{escape(where)}",
            soft_wrap=True,
        )
        raise SystemExit(2) from e


def _who() -> str:
    """Under torchrun each rank that meets an error says it: the others are
    named (`` (rank 1)``); rank 0 and a single process are not."""
    return f" (rank {_rank()})" if _rank() else ""


def _leave_group() -> None:
    """A rank of a torchrun job leaves its process group once the command is
    done, after the others (rank 0 may still be saving), rather than exiting
    with it still open (see :func:`twostage.distributed.init_from_env` for what
    kept the group alive after it was destroyed)."""
    from twostage import distributed

    if distributed.current() is None:
        return
    import torch.distributed as dist

    dist.barrier()
    distributed.shutdown()


def _launch(args: list[str]) -> int:
    """``--nproc N``: run the same command as N data-parallel processes on this
    machine, with torchrun's launcher (``torch.distributed.run --standalone``)
    in this process."""
    at = args.index("--nproc")
    try:
        count = int(args[at + 1])
    except (IndexError, ValueError):
        status_console.print("[red]error:[/red] --nproc takes a number, e.g. --nproc 2")
        return 2
    if count < 1:
        status_console.print("[red]error:[/red] --nproc should be at least 1.")
        return 2
    rest = args[:at] + args[at + 2 :]
    refused = _usage_status(rest)
    if refused is not None:  # shown once, before any rank starts
        return refused
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(count), "-m", "twostage", *rest]
    )
    try:
        run(launch)
    except SignalException as stopped:
        # Ctrl-C or SIGTERM: the launcher passed it to the ranks, which finish
        # the step, checkpoint it and say so (run as a subprocess, torchrun
        # ended in a traceback here).
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:  # a rank's error is above; torchrun's summary
        status_console.print(failed.format_msg(), markup=False, highlight=False)
        return 1
    return 0


def _usage_status(args: list[str]) -> int | None:
    """The exit status of a command line that does not parse, its error (or the
    ``--help`` / ``--version`` it asked for) shown once as one process shows it;
    None when it parses. ``--nproc`` asks before it starts the ranks, each of
    which would otherwise say the same, with torchrun's failure report after.

    It walks the command groups as typer does when it runs them (methods typer
    keeps from Click and does not document); should they change, the check
    steps aside (None) and the ranks report the error as before."""
    from typer import rich_utils
    from typer.core import TyperGroup
    from typer.main import get_command

    try:
        command: Any = get_command(app)
        ctx = command.make_context("twostage", list(args))
        while isinstance(command, TyperGroup):  # down to the command that runs
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                if not command.invoke_without_command:
                    ctx.fail("Missing command.")
                break
            name, found, rest = command.resolve_command(ctx, rest)
            command = found
            ctx = command.make_context(name, rest, parent=ctx)
    except typer.Exit as done:  # --help or --version, printed
        return done.exit_code
    except typer.TyperException as error:
        if not hasattr(error, "exit_code"):
            raise
        rich_utils.rich_format_error(error)  # type: ignore[arg-type]
        return int(error.exit_code)
    except (AttributeError, TypeError):  # typer's internals moved: no check
        return None
    return None


#: Python argument and config names in library messages -> the CLI flag that sets
#: them, so that an error names what the user typed.
FLAGS = {
    "`without_session_knn`": "`--without-session-knn`",
    "`user_col`": "`--user-col`",
    "`item_col`": "`--item-col`",
    "`time_col`": "`--time-col`",
    "`time_format`": "`--time-format`",
    "`time_unit`": "`--time-unit`",
    "`rating_col`": "`--rating-col`",
    "`weight_col`": "`--weight-col`",
    "`weight_values`": "`--weight-values`",
    "`label_col`": "`--label-col`",
    "`label_threshold`": "`--label-threshold`",
    "`min_user_rows`": "`--min-user-rows`",
    "`duplicates`": "`--duplicates`",
    "`min_item_rows`": "`--min-item-rows`",
    "`separator`": "`--separator`",
    "`quote_char`": "`--quote-char`",
    "`comment_prefix`": "`--comment-prefix`",
    "`missing_ratings`": "`--missing-ratings`",
    "`unrated_values`": "`--unrated-values`",
    "`user_features`": "`--user-features`",
    "`item_features`": "`--item-features`",
    "`column_names`": "`--column-names`",
    "Received: `variant` = ": "Received: ",
    "`variant`": "the MovieLens variant",
    "`method`": "`--method`",
    "`models` should be": "MODELS should be",
    "`k`": "`-k`",
    "`num_candidates`": "`--num-candidates`",
    "`poll_seconds`": "`--poll-seconds`",
    "`torch_threads`": "`--torch-threads`",
    "`max_k`": "`--max-k`",
    "`max_body_bytes`": "`--max-body-bytes`",
    "`max_instances`": "`--max-instances`",
    "`max_num_candidates`": "`--max-num-candidates`",
    "`widening`": "`--widening`",
    "`api_key`": "`--api-key`",
    "`seed`": "`--seed`",
    "`test_fraction`": "`--test-fraction`",
    "`data.train_file`": "`--train`",
    "`data.user_table`": "`--user-table`",
    "`data.item_table`": "`--item-table`",
    "`data.user_table_key`": "`--user-table-key`",
    "`data.item_table_key`": "`--item-table-key`",
    "`data.user_table_columns`": "`--user-table-columns`",
    "`data.item_table_columns`": "`--item-table-columns`",
    "`data.test_file`": "`--test`",
}


def as_flags(message: str) -> str:
    """A library error message with Python names replaced by the CLI's flags."""
    for name, flag in FLAGS.items():
        message = message.replace(name, flag)
    return message
