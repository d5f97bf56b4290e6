"""``twostage tune``: choose settings on a validation protocol
(:mod:`twostage.tuning`). Registered on the main app by :mod:`twostage.cli`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

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
)
from twostage.cli_output import JsonOutput, console, print_json, status_console

__all__ = ["tune_command"]


def tune_command(
    params: Annotated[
        list[str],
        typer.Option(
            "--param",
            help="A setting to search, KEY=RANGE or KEY=CHOICES: "
            "retrieval.temperature=log:0.02..0.5 (a log scale), "
            "train.epochs=5..30 (whole numbers where the key holds them), "
            "retrieval.embedding_dim=32,64,128, retrieval.hidden_dims='64|128,64' "
            "(| where a choice holds commas). Repeat for several.",
        ),
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Built-in dataset name or path of your log, as `twostage train` "
            "takes it, with the same column options (default: the --config's "
            "data.dataset, else movielens-100k)."
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A JSON experiment config (a preset, or a bundle's config.json) "
            "holding every setting not searched.",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set train.epochs=5."),
    ] = None,
    trials: Annotated[int, typer.Option(min=1, help="How many trials to run.")] = 20,
    metric: Annotated[
        str,
        typer.Option(
            help="What to maximise: NAME@K of retrieval's list with seen items "
            "excluded (ndcg, recall, hit_rate, mrr, coverage) or TFRS's "
            "factorized_top_k (nothing excluded), K 1, 5, 10, 50 or 100; with "
            "--stage both, of the served list (ndcg, "
            "recall, hit_rate), or the ranker's rmse or mae (minimised) or auc."
        ),
    ] = "ndcg@10",
    stage: Annotated[
        str,
        typer.Option(
            help="retrieval: each trial trains retrieval alone; both: both stages "
            "(ranking.* settings can then be searched too; a trial that changes "
            "only those ranks on the last trial's retrieval run)."
        ),
    ] = "retrieval",
    timeout: Annotated[
        float | None,
        typer.Option(min=0.001, help="Start no trial after this many seconds."),
    ] = None,
    seed: Annotated[int, typer.Option(help="The sampler's seed.")] = 0,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Stop a trial after an epoch whose validation figure (the one "
            "early stopping reads) is below the earlier trials' median at that "
            "epoch: from the 6th trial, after the 2nd epoch. Retrieval's epochs, "
            "or the ranker's with --stage both and ranking.* settings alone.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the best config here (JSON), for `twostage train --config "
            "OUT`; an existing file is not overwritten."
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Keep each trial in this file as it ends (Optuna's journal; a "
            "database URL such as sqlite:///tune.db works too). The same command "
            "run again goes on where Ctrl-C, --timeout or a crash stopped it: the "
            "stored trials count toward --trials and are not run again.",
        ),
    ] = None,
    study_name: Annotated[
        str,
        typer.Option(help="The search's name in --storage (one can hold several)."),
    ] = "twostage",
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Trials to run at once, each in its own process with its share "
            "of the CPU cores (unless train.num_threads is set) and its own copy "
            "of the rows. Not repeatable to the digit when above 1.",
        ),
    ] = 1,
    sample_users: Annotated[
        int,
        typer.Option(
            "--sample-users",
            min=0,
            help="Tune on that many of the tuning rows' users (a stable hash of "
            "their IDs and data.seed picks them), every trial splitting and "
            "training on their rows alone, for a log too large to train on once "
            "per trial; the test side is set aside from the whole log first. 0: "
            "every user.",
        ),
    ] = 0,
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
    json_output: JsonOutput = False,
) -> None:
    """Choose settings on a validation split: the config's split sets its
    test rows aside unread, and each trial trains on the rows left and is
    measured on the same split of them (each user's second-last item under
    leave-last-out, the latest rows under a temporal split).

    Optuna's TPE sampler picks each trial's settings; the first trial is the
    config as given where its values lie in the searched ranges. The best
    config's test figures come from training it once: `twostage train
    --config OUT`. For logs that fit in memory (not --stream).
    """
    from twostage.cli import experiment_config, training_columns
    from twostage.config import save_config
    from twostage.data.registry import anchored
    from twostage.tuning import parse_metric, parse_space, tune

    columns = training_columns(locals())

    if out is not None and out.exists():  # refused now, not after the trials
        raise typer.BadParameter(
            f"{str(out)!r} already exists: write the best config to a new file.",
            param_hint="--out",
        )
    if out is not None:
        from twostage.cli_batch import check_writable

        check_writable(out, "--out")
    given = None if dataset is None else anchored(dataset)
    config = experiment_config(given, config_file, overrides or [], columns)
    log = Path(config.data.dataset)
    if log.is_dir() and not sample_users:
        # A directory of Parquet files is a log for --stream: too large to
        # read in memory and train on once per trial.
        raise typer.BadParameter(
            f"{str(log)!r} is a directory of Parquet files, a log that `twostage "
            "train --stream` reads one row group at a time; tune reads its log in "
            "memory and trains on it once per trial. Pass --sample-users N: the "
            "trials then read N of its users' rows, drawn one row group at a "
            "time. Then train the whole log with --stream --dataset on the tuned "
            "--config.",
            param_hint="--dataset",
        )
    space = {}
    for given in params:
        key, sep, spec = given.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(
                f"should look like KEY=RANGE or KEY=CHOICES, e.g. "
                f"retrieval.temperature=log:0.02..0.5. Received: {given!r}.",
                param_hint="--param",
            )
        if key.strip() in space:
            raise typer.BadParameter(
                f"{key.strip()!r} is searched twice; give it once.",
                param_hint="--param",
            )
        space[key.strip()] = spec
    # Checked before the log is read: a typo costs no loading.
    searched = parse_space(config, space)
    parse_metric(metric, stage)

    def shown(trial: Any) -> None:
        figure = "-" if trial.value is None else f"{trial.value:.4f}"
        settings = ", ".join(f"{k}={_value(v)}" for k, v in trial.params.items())
        line = (
            f"trial {trial.number + 1}/{trials}: {metric} {figure} "
            f"({settings}) in {trial.seconds:.1f} s"
        )
        if trial.repeat_of is not None:
            line += f" (trial {trial.repeat_of + 1}'s settings, not trained again)"
        if trial.error:
            line += f"; {trial.state}: {trial.error}"
        status_console.print(escape(line))

    status_console.print(
        escape(
            f"Searching {len(searched)} setting(s) over {trials} trial(s) for "
            f"{metric} (stage: {stage})."
        )
    )
    with _quiet_trials():
        result = tune(
            config,
            space,
            trials=trials,
            metric=metric,
            stage=stage,
            seed=seed,
            timeout=timeout,
            prune=prune,
            on_trial=shown,
            storage=storage,
            study_name=study_name,
            jobs=jobs,
            sample_users=sample_users,
        )
    if out is not None:
        save_config(result.config, out)
    if json_output:
        print_json({**result.to_dict(), "out": None if out is None else str(out)})
        return
    _print_trials(result)
    if result.resumed:
        console.print(
            f"Trials 1 to {result.resumed} were read from "
            f"{escape(str(storage))} (study {escape(study_name)}); "
            f"{len(result.trials) - result.resumed} ran now."
        )
    best = result.best
    console.print(
        f"Best: trial {best.number + 1}, {escape(result.metric)} {best.value:.4f}, "
        f"with {escape(', '.join(f'{k}={_value(v)}' for k, v in best.params.items()))}."
    )
    console.print(
        f"{result.tuning_rows:,} rows tuned on; the config's "
        f"{result.test_rows:,} test rows were set aside unread."
    )
    if result.sample is not None:
        console.print(
            escape(
                f"The rows came from a sample of {log}: "
                f"{result.sample.summary(where=False)}"
            )
        )
    ended = {
        "interrupted": "Interrupted: the table holds the trials that ran.",
        "timeout": f"The timeout ended the search after {len(result.trials)} trials.",
        "combinations": "Every combination of the choices ran; no more to try.",
    }.get(result.ended)
    if ended is not None:
        console.print(f"[yellow]{ended}[/yellow]")
    if out is not None:
        console.print(
            f"Best config written to [cyan]{escape(str(out))}[/cyan]; its test "
            "figures: `twostage train"
            + (" --stream" if result.sample is not None else "")
            + f" --config {escape(str(out))} --out models/NAME/1`."
        )


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _print_trials(result: Any) -> None:
    table = Table(title=Text(f"Trials ({result.metric}, {result.direction}d)"))
    table.add_column("trial", justify="right")
    keys = [p.key for p in result.params]
    for key in keys:
        table.add_column(key)
    table.add_column(result.metric, justify="right")
    table.add_column("s", justify="right")
    table.add_column("state")
    for trial in result.trials:
        mark = " *" if trial is result.best else ""
        table.add_row(
            f"{trial.number + 1}{mark}",
            *(_value(trial.params[k]) for k in keys),
            "-" if trial.value is None else f"{trial.value:.4f}",
            f"{trial.seconds:.1f}",
            _state(trial),
        )
    console.print(table)


def _state(trial: Any) -> str:
    state = str(trial.state)
    if trial.repeat_of is not None:
        state += f" (= {trial.repeat_of + 1})"
    return state if trial.error is None else f"{state}: {trial.error}"


@contextmanager
def _quiet_trials() -> Iterator[None]:
    """While the trials run: Optuna's per-trial log lines off (the command prints
    its own), each repeated warning shown once, twostage's info lines only with -v."""
    from twostage.tuning import OnceFilter, require_optuna

    optuna = require_optuna()  # missing: the error says how to install it
    once = OnceFilter()
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(once)
    ours = logging.getLogger("twostage")
    level = ours.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        ours.setLevel(logging.WARNING)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        ours.setLevel(level)
        for handler in handlers:
            handler.removeFilter(once)
