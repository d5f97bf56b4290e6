"""Tuning on a validation protocol: `twostage.tuning.tune` and `twostage tune`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides, load_config
from twostage.data.registry import load_dataset_for
from twostage.data.split import prepare_split
from twostage.data.streaming import Reading, held_out_rows, split_rule
from twostage.errors import ConfigError, DataError
from twostage.retrieval.fit import fit_retrieval
from twostage.tuning import parse_metric, parse_space, tune, tuning_data

SMALL = [
    "data.dataset=synthetic:num_users=120,num_items=60,num_interactions=2400",
    "train.epochs=2",
    "train.num_threads=1",
    "train.batch_size=128",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.history_length=10",
    "retrieval.popularity_fallback=0",
]


def small(*more: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [*SMALL, *more])


def keys(rows: pl.DataFrame) -> set[tuple[object, ...]]:
    return set(rows.select("user_id", "item_id", "timestamp").iter_rows())


@pytest.mark.parametrize(
    "split", ["data.split=random", "data.split=temporal", "data.split=leave-last-out"]
)
def test_the_tuning_rows_are_the_rows_the_test_side_leaves(split: str) -> None:
    config = small(split, "data.cold_user_fraction=0.1")
    dataset = load_dataset_for(config)
    rows, test_rows = tuning_data(dataset, config)
    test = prepare_split(dataset, config).test
    assert test_rows == test.num_interactions > 0
    assert not keys(rows.interactions) & keys(test.interactions)
    assert rows.num_interactions + test_rows == dataset.num_interactions


def test_a_space_reads_ranges_and_choices_as_the_config_types_them() -> None:
    config = small()
    params = parse_space(
        config,
        {
            "retrieval.temperature": "log:0.05..1",
            "retrieval.embedding_dim": "8..32",
            "retrieval.hidden_dims": "64|32,16",
            "retrieval.query_encoder": ["pooling", "gru"],
            "retrieval.use_side_features": "true,false",
        },
    )
    temperature, width, hidden, encoder, side = params
    assert (temperature.low, temperature.high, temperature.log) == (0.05, 1.0, True)
    assert not temperature.integer
    assert (width.low, width.high, width.integer, width.log) == (8, 32, True, False)
    assert hidden.choices == ([64], [32, 16])
    assert encoder.choices == ("pooling", "gru")
    assert side.choices == (True, False)
    assert temperature.describe() == "log:0.05..1" and hidden.describe() == "64 | 32,16"


@pytest.mark.parametrize(
    ("space", "said"),
    [
        ({"retrieval.temperatur": "0.1..0.5"}, "Did you mean 'retrieval.temperature'"),
        ({"retrieval.temperature": "0..0.5"}, "`retrieval.temperature` should be"),
        ({"retrieval.temperature": "0.5..0.1"}, "LOW < HIGH"),
        ({"retrieval.temperature": "log:-1..1"}, "should start above 0"),
        ({"retrieval.temperature": "log:0.1,0.2"}, "'log:' goes with a range"),
        ({"retrieval.embedding_dim": "8.5..32"}, "two whole numbers"),
        ({"retrieval.query_encoder": "0.1..2"}, "takes choices"),
        ({"retrieval.query_encoder": "pooling"}, "two choices or more"),
        ({"retrieval.query_encoder": "gru,gru"}, "should differ"),
        ({"retrieval.query_encoder": "gru,lstm"}, "should be one of"),
        ({"retrieval": "0.1..0.2"}, "unknown config key"),
        ({}, "at least one setting"),
    ],
)
def test_a_bad_space_is_refused_before_any_trial(
    space: dict[str, str], said: str
) -> None:
    with pytest.raises(ConfigError, match=said):
        parse_space(small(), space)


def test_metrics_name_their_stage_and_direction() -> None:
    assert parse_metric("NDCG@10", "retrieval") == ("ndcg", 10, "maximize")
    assert parse_metric("factorized_top_k@100", "retrieval")[:2] == (
        "factorized_top_k",
        100,
    )
    assert parse_metric("rmse", "both") == ("rmse", None, "minimize")
    assert parse_metric("auc", "both")[2] == "maximize"
    for metric, stage, said in [
        ("rmse", "retrieval", "the ranker's"),
        ("ndcg@20", "retrieval", "K one of"),
        ("mrr@10", "both", "NAME one of"),
        ("ndcg", "retrieval", "NAME@K"),
        ("ndcg@10", "ranking", "`stage` should be one of"),
    ]:
        with pytest.raises(ConfigError, match=said):
            parse_metric(metric, stage)


def test_the_search_starts_at_the_config_and_its_best_config_reproduces_its_figure() -> (
    None
):
    config = small()
    seen = []
    result = tune(
        config,
        {"retrieval.temperature": "log:0.05..1", "train.learning_rate": "0.001..0.02"},
        trials=3,
        on_trial=seen.append,
    )
    assert seen == result.trials and len(result.trials) == 3
    assert result.trials[0].params == {
        "retrieval.temperature": config.retrieval.temperature,
        "train.learning_rate": config.train.learning_rate,
    }
    assert all(t.state == "complete" and t.value is not None for t in result.trials)
    assert len({t.value for t in result.trials}) > 1  # the settings changed something
    best = max(result.trials, key=lambda t: t.value or 0.0)
    assert result.best is best and result.ended == "trials"
    assert result.config.retrieval.temperature == best.params["retrieval.temperature"]
    assert result.config.train.learning_rate == best.params["train.learning_rate"]
    assert result.config.data == config.data  # the test is measured once, later
    # The best trial's figure is the best config's on the tuning rows, split by
    # the config: no test row was read.
    dataset = load_dataset_for(config)
    rows, test_rows = tuning_data(dataset, config)
    assert result.tuning_rows == rows.num_interactions
    assert result.test_rows == test_rows
    run, _ = fit_retrieval(result.config, dataset=rows)
    assert run.metrics["metrics"]["exclude_seen"]["ndcg"]["10"] == pytest.approx(
        best.value, abs=1e-6
    )
    saved = result.to_dict()
    assert saved["best"]["number"] == best.number
    assert (
        saved["config"]["retrieval"]["temperature"]
        == best.params["retrieval.temperature"]
    )
    assert saved["params"] == {
        "retrieval.temperature": "log:0.05..1",
        "train.learning_rate": "0.001..0.02",
    }


def test_a_failing_combination_is_recorded_and_the_search_goes_on() -> None:
    # The term's weight picked on validation needs a validation carve-out: the
    # config as given (fraction 0, tried first) cannot train.
    config = small("retrieval.session_knn_weight=-1", "data.validation_fraction=0")
    result = tune(config, {"data.validation_fraction": "0,0.1"}, trials=4)
    first = result.trials[0]
    assert first.params == {"data.validation_fraction": 0.0}
    assert first.state == "failed" and first.value is None
    assert "validation carve-out" in (first.error or "")
    assert result.best.params == {"data.validation_fraction": 0.1}
    assert result.best.state == "complete"
    assert result.ended == "combinations" and len(result.trials) <= 4
    with pytest.raises(ConfigError, match=r"no trial completed; the first: .*carve"):
        tune(config, {"retrieval.temperature": "0.1..0.5"}, trials=2)


def test_a_repeated_setting_is_not_trained_again_and_the_choices_run_out() -> None:
    result = tune(small(), {"retrieval.embedding_dim": "8,16"}, trials=12, seed=3)
    assert result.ended == "combinations"
    tried = [t.params["retrieval.embedding_dim"] for t in result.trials]
    assert set(tried) == {8, 16} and len(tried) < 12
    for trial in result.trials:
        if trial.repeat_of is None:
            assert tried.index(tried[trial.number]) == trial.number
            continue
        earlier = result.trials[trial.repeat_of]
        assert earlier.repeat_of is None and earlier.params == trial.params
        assert (trial.value, trial.seconds) == (earlier.value, 0.0)
    assert sum(t.repeat_of is None for t in result.trials) == 2


def test_a_timeout_starts_no_trial_after_it() -> None:
    result = tune(
        small(), {"retrieval.temperature": "0.1..0.5"}, trials=5, timeout=1e-3
    )
    assert result.ended == "timeout" and len(result.trials) == 1


def test_tune_from_the_command_line_writes_the_best_config(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "best.json"
    args = [
        "tune",
        *[part for setting in SMALL for part in ("--set", setting)],
        "--set",
        "ranking.epochs=1",
        "--param",
        "ranking.learning_rate=log:0.0005..0.01",
        "--param",
        "retrieval.embedding_dim=8,16",
        "--stage",
        "both",
        "--metric",
        "rmse",
    ]
    found = runner.invoke(app, [*args, "--trials", "3", "--out", str(out), "--json"])
    assert found.exit_code == 0, found.output
    result = json.loads(found.stdout)
    assert result["direction"] == "minimize" and len(result["trials"]) == 3
    values = [t["value"] for t in result["trials"] if t["state"] == "complete"]
    assert result["best"]["value"] == min(values)
    best = load_config(out)
    params = result["best"]["params"]
    assert best.ranking.learning_rate == params["ranking.learning_rate"]
    assert best.retrieval.embedding_dim == params["retrieval.embedding_dim"]
    assert result["config"] == json.loads(out.read_text())
    # `train --config` trains the log the config names (`--dataset` used to
    # default to movielens-100k over it).
    run = tmp_path / "run"
    trained = runner.invoke(
        app, ["train", "retrieval", "--config", str(out), "--out", str(run), "--json"]
    )
    assert trained.exit_code == 0, trained.output
    assert load_config(run / "config.json").data == best.data
    assert best.data.dataset.startswith("synthetic:")
    # The table, and a file that exists already is kept.
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert load_config(out) == best
    shown = runner.invoke(app, [*args, "--trials", "1"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "Trials (rmse, minimized)" in shown.output
    assert "Best: trial 1, rmse" in shown.output
    assert "test rows were set aside unread" in shown.output
    for bad, said in [
        (["--param", "retrieval.temperature"], "KEY=RANGE or KEY=CHOICES"),
        (
            ["--param", "train.epochs=1..3", "--param", "train.epochs=2..4"],
            "searched twice",
        ),
        (["--param", "retrieval.temperatur=0.1..0.2"], "Did you mean"),
        (["--param", "train.epochs=1..3", "--metric", "rmse"], "the ranker's"),
    ]:
        refused = runner.invoke(app, ["tune", *bad])
        assert refused.exit_code != 0
        # typer's own errors are in the output; ours reach `twostage.cli.main`
        told = str(refused.exception or "") + refused.output
        assert said in " ".join(told.split()), told


#: A log and schedule whose trials take a second or two: time to press Ctrl-C.
SLOW = [
    "data.dataset=synthetic:num_users=300,num_items=100,num_interactions=20000",
    "train.epochs=50",
]


def slow_search(*more: str) -> list[str]:
    """`twostage tune` of 100 slow trials, in a process of its own."""
    settings = [part for setting in [*SMALL, *SLOW] for part in ("--set", setting)]
    return [
        *(sys.executable, "-m", "twostage", "tune", *settings),
        *("--param", "retrieval.temperature=0.1..0.5", "--trials", "100", *more),
    ]


def parallel_search(storage: Path, until: str) -> subprocess.Popen[str]:
    """The slow search with `--jobs 2`, in a session of its own (a process
    group with its workers), once its log has printed a line starting with
    ``until``."""
    tuning = subprocess.Popen(
        slow_search("--jobs", "2", "--storage", str(storage)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert tuning.stderr is not None
    for line in tuning.stderr:
        if line.startswith(until):
            break
    return tuning


def stored_trials(storage: Path) -> list[Any]:
    """The trials of the search ``twostage`` in the journal file ``storage``."""
    import optuna

    journal = optuna.storages.journal.JournalFileBackend(str(storage))
    return optuna.load_study(
        study_name="twostage", storage=optuna.storages.JournalStorage(journal)
    ).trials


def test_ctrl_c_keeps_the_trials_that_ran(tmp_path: Path) -> None:
    out = tmp_path / "best.json"
    storage = tmp_path / "trials.log"
    command = slow_search("--out", str(out), "--storage", str(storage))
    tuning = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert tuning.stderr is not None
    for line in tuning.stderr:  # the first trial has ended: the second trains
        if line.startswith("trial 1/100"):
            break
    time.sleep(0.5)  # the second trial is (most likely) training
    tuning.send_signal(signal.SIGINT)
    said, logged = tuning.communicate(timeout=300)
    assert tuning.returncode == 0, logged
    assert "Interrupted: the table holds the trials that ran." in said
    assert "Best: trial " in said and "trial 100/100" not in logged
    assert 0.1 <= load_config(out).retrieval.temperature <= 0.5
    # The stored search holds the trial that ended, not the one Ctrl-C stopped
    # (which would run again): with one trial asked, nothing runs.
    space = {"retrieval.temperature": "0.1..0.5"}
    again = tune(small(*SLOW), space, trials=1, storage=str(storage))
    assert again.resumed == 1 and [t.state for t in again.trials] == ["complete"]
    states = [str(t.state) for t in stored_trials(storage)]
    assert states == ["TrialState.COMPLETE", "TrialState.FAIL"]


def test_a_split_from_files_tunes_on_the_training_file(tmp_path: Path) -> None:
    """Under `data.train_file` / `test_file` the test file is set aside and each
    trial splits the training file's rows by `data.split`."""
    spec = SMALL[0].partition("=")[2]
    made = CliRunner().invoke(app, ["data", "split", spec, "--out", str(tmp_path)])
    assert made.exit_code == 0, made.output
    train = pl.read_parquet(tmp_path / "train.parquet")
    test = pl.read_parquet(tmp_path / "test.parquet")
    config = small(
        f"data.train_file={tmp_path / 'train.parquet'}",
        f"data.test_file={tmp_path / 'test.parquet'}",
    )
    result = tune(config, {"retrieval.temperature": "0.1..0.5"}, trials=1)
    assert (result.tuning_rows, result.test_rows) == (len(train), len(test))
    assert result.best.state == "complete"
    assert result.config.data.train_file == config.data.train_file  # kept for later


def test_pruning_stops_trials_below_the_median_and_keeps_the_best() -> None:
    # Recall@10 on a tenth of the rows: a validation figure with room to differ
    # (at the default K of 100 every trial of a small catalogue scores 1).
    config = small(
        "data.dataset=synthetic:num_users=300,num_items=150,num_interactions=9000",
        *("train.epochs=6", "train.early_stopping_patience=0", "train.eval_k=10"),
        "data.validation_fraction=0.1",
    )
    space = {"train.learning_rate": "log:0.00001..0.02"}
    pruned = tune(config, space, trials=10, prune=True)
    stopped = [t for t in pruned.trials if t.state == "pruned"]
    assert stopped and all(t.value is None for t in stopped)
    assert all("below the earlier trials' median" in (t.error or "") for t in stopped)
    assert all(t.number >= 5 for t in stopped)  # five trials run whole first
    slowest = max(t.params["train.learning_rate"] for t in stopped)
    assert slowest < config.train.learning_rate / 4  # the slow learners went
    assert pruned.best.state == "complete"
    # Pruning reads the figures and changes none: the first five trials (the
    # same proposals without it) score alike.
    whole = tune(config, space, trials=5)
    assert [t.value for t in whole.trials] == [t.value for t in pruned.trials[:5]]


def test_factorized_top_k_is_tfrs_s_with_nothing_excluded() -> None:
    config = small()
    result = tune(
        config,
        {"retrieval.temperature": "0.1..0.5"},
        trials=1,
        metric="factorized_top_k@10",
    )
    rows, _ = tuning_data(load_dataset_for(config), config)
    run, _ = fit_retrieval(config, dataset=rows)
    figures = run.metrics["metrics"]
    assert result.best.value == pytest.approx(
        figures["include_seen"]["factorized_top_k"]["10"], abs=1e-6
    )
    assert result.best.value != figures["exclude_seen"]["factorized_top_k"]["10"]


def test_a_stored_search_goes_on_where_it_stopped(tmp_path: Path) -> None:
    storage = str(tmp_path / "trials.log")
    space = {"retrieval.temperature": "0.1..0.5"}
    ran: list[object] = []
    first = tune(small(), space, trials=2, storage=storage, on_trial=ran.append)
    assert first.resumed == 0 and len(ran) == 2
    ran.clear()
    second = tune(small(), space, trials=4, storage=storage, on_trial=ran.append)
    assert second.resumed == 2 and len(ran) == 2  # only the two new trials ran
    assert [t.to_dict() for t in second.trials[:2]] == [
        t.to_dict() for t in first.trials
    ]
    assert [t.number for t in second.trials] == [0, 1, 2, 3]
    # The sampler reads the stored trials and is not seeded as the first call
    # was: no proposal repeats one.
    assert all(t.repeat_of is None for t in second.trials)
    assert len({t.params["retrieval.temperature"] for t in second.trials}) == 4
    ran.clear()
    done = tune(small(), space, trials=4, storage=storage, on_trial=ran.append)
    assert (done.resumed, len(ran), done.best) == (4, 0, second.best)
    # Another search under the same name is refused, naming what differs.
    for config, other, metric, said in [
        (small(), space, "recall@10", "metric is 'ndcg@10', here 'recall@10'"),
        (small(), {"retrieval.temperature": "0.1..0.6"}, "ndcg@10", "space is"),
        (small("train.epochs=3"), space, "ndcg@10", "config train.epochs is 2"),
    ]:
        with pytest.raises(ConfigError, match="is another search") as refused:
            tune(config, other, trials=5, storage=storage, metric=metric)
        assert said in str(refused.value)
    # Under another name the same storage holds a second search.
    apart = tune(small(), space, trials=1, storage=storage, study_name="second")
    assert apart.resumed == 0
    # A database URL works the same.
    url = f"sqlite:///{tmp_path / 'trials.db'}"
    tune(small(), space, trials=1, storage=url)
    assert tune(small(), space, trials=2, storage=url).resumed == 1


def test_a_storage_that_is_not_one_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    space = {"retrieval.temperature": "0.1..0.5"}
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n1,2\n")
    for storage, said in [
        (str(log), "could not be read as Optuna's storage"),
        (str(tmp_path / "none" / "trials.log"), "a file in an existing folder"),
        (str(tmp_path), "a file in an existing folder"),
        ("", "a file path or a database URL"),
    ]:
        with pytest.raises(ConfigError, match=said):
            tune(small(), space, trials=1, storage=storage)
    assert log.read_text() == "user_id,item_id\n1,2\n"


def test_tune_from_the_command_line_goes_on_from_its_storage(tmp_path: Path) -> None:
    args = [
        "tune",
        *[part for setting in SMALL for part in ("--set", setting)],
        *("--param", "retrieval.temperature=0.1..0.5"),
        *("--storage", str(tmp_path / "trials.log")),
    ]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--trials", "1", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["resumed_trials"] == 0
    second = runner.invoke(app, [*args, "--trials", "2"], env={"COLUMNS": "200"})
    assert second.exit_code == 0, second.output
    assert "Trials 1 to 1 were read from" in " ".join(second.output.split())
    assert "trial 2/2" in second.output and "trial 1/2" not in second.output
    other = runner.invoke(app, [*args, "--trials", "2", "--metric", "recall@10"])
    assert other.exit_code != 0
    assert "is another search" in str(other.exception)


def test_trials_run_at_once_in_workers_as_they_run_in_one_process(
    tmp_path: Path,
) -> None:
    space = {"retrieval.temperature": "0.1..0.5"}
    ran: list[object] = []
    storage = str(tmp_path / "trials.log")
    both = tune(small(), space, trials=4, jobs=2, storage=storage, on_trial=ran.append)
    assert len(ran) == 4 and [t.number for t in both.trials] == [0, 1, 2, 3]
    assert all(t.state == "complete" for t in both.trials)
    # Trial 0 is the config as given, scored as one process scores it, and the
    # best config, trained here, reproduces the best trial's figure.
    alone = tune(small(), space, trials=1)
    assert both.trials[0].params == alone.trials[0].params
    assert both.trials[0].value == alone.trials[0].value
    config = both.config
    run, _ = fit_retrieval(
        config, dataset=tuning_data(load_dataset_for(config), config)[0]
    )
    figure = run.metrics["metrics"]["exclude_seen"]["ndcg"]["10"]
    assert both.best.value == pytest.approx(figure, abs=1e-6)
    # The workers' trials are stored as one process stores them: it goes on.
    more = tune(small(), space, trials=5, storage=storage)
    assert more.resumed == 4 and len(more.trials) == 5
    with pytest.raises(ConfigError, match="`jobs` should be a positive integer"):
        tune(small(), space, trials=2, jobs=0)


def test_a_setting_another_worker_is_training_is_not_trained_twice() -> None:
    """With --jobs 2, a worker that proposed the settings another worker was
    training trained them a second time. It now waits for that trial and
    repeats its figure. Seed 2: both workers' samplers first propose the
    config's own temperature (trial 0's), so the second trial is that repeat
    whichever worker takes it."""
    space = {"retrieval.temperature": "0.1,0.2"}
    config = small("retrieval.temperature=0.1", "train.epochs=12")
    found = tune(config, space, trials=2, jobs=2, seed=2)
    first, second = found.trials
    assert first.params == second.params == {"retrieval.temperature": 0.1}
    assert first.state == "complete" and first.repeat_of is None
    assert second.repeat_of == 0 and second.seconds == 0.0
    assert second.value == first.value


def test_ctrl_c_stops_every_worker_and_keeps_their_trials(tmp_path: Path) -> None:
    storage = tmp_path / "trials.log"
    tuning = parallel_search(storage, until="trial 2/100")
    time.sleep(0.5)
    # A terminal's Ctrl-C reaches the whole process group: the workers too.
    os.killpg(tuning.pid, signal.SIGINT)
    said, logged = tuning.communicate(timeout=300)
    assert tuning.returncode == 0, logged
    assert "Interrupted: the table holds the trials that ran." in said
    stored = stored_trials(storage)
    states = {str(t.state) for t in stored}
    assert "TrialState.RUNNING" not in states and "TrialState.COMPLETE" in states
    assert len(stored) < 100


CUT_RELEASE = """
import os, signal, sys

if "--multiprocessing-fork" in sys.argv:  # a spawned tuning worker only
    from optuna.storages.journal import _file

    calls = []

    def cut(real):
        def release(self):
            real(self)
            calls.append(1)
            if len(calls) == 8:  # mid-search: Ctrl-C lands as the lock releases
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the handler runs
                except KeyboardInterrupt:
                    # optuna's own release, cut there, unlinks a file its rename
                    # never made: the FileNotFoundError replaces the interrupt
                    raise FileNotFoundError(2, "No such file", "lock.rename")

        return release

    for kind in (_file.JournalFileSymlinkLock, _file.JournalFileOpenLock):
        kind.release = cut(kind.release)
"""


def search_in_patched_workers(
    tmp_path: Path, patch: str
) -> subprocess.CompletedProcess[str]:
    """`twostage tune --jobs 2` (6 trials, storage `tmp_path/trials.log`)
    whose spawned workers first run ``patch`` as their sitecustomize."""
    (tmp_path / "sitecustomize.py").write_text(patch)
    settings = [part for setting in SMALL for part in ("--set", setting)]
    return subprocess.run(
        [
            *(sys.executable, "-m", "twostage", "tune", *settings),
            *("--param", "retrieval.temperature=0.1..0.5", "--trials", "6"),
            *("--jobs", "2", "--storage", str(tmp_path / "trials.log")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        timeout=300,
    )


def test_an_error_ctrl_c_causes_in_a_worker_is_an_interrupt(tmp_path: Path) -> None:
    """Ctrl-C cutting optuna's journal lock while it released turned into a
    FileNotFoundError in that worker, and the search ended as a worker's
    failure (exit code 2) instead of an interrupted search (seen in the full
    suite's Ctrl-C test). A worker's error after its Ctrl-C is the interrupt."""
    done = search_in_patched_workers(tmp_path, CUT_RELEASE)
    assert done.returncode == 0, done.stderr
    assert "Interrupted: the table holds the trials that ran." in done.stdout


CUT_ASK = """
import sys

if "--multiprocessing-fork" in sys.argv:  # a spawned tuning worker only
    import optuna

    real = optuna.study.Study.ask
    calls = []

    def ask(self, *args, **kwargs):
        trial = real(self, *args, **kwargs)  # stored as running
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C lands before ask hands the trial back
            raise KeyboardInterrupt
        return trial

    optuna.study.Study.ask = ask
"""


def test_a_trial_ctrl_c_cut_inside_ask_is_not_left_running(tmp_path: Path) -> None:
    """Ctrl-C inside Optuna's `ask` (the trial stored, not handed back) left
    that trial "running" in the storage after the search ended (seen in the
    full suite's Ctrl-C test); with every worker stopped, it is stored as
    failed."""
    done = search_in_patched_workers(tmp_path, CUT_ASK)
    storage = tmp_path / "trials.log"
    assert done.returncode == 0, done.stderr
    assert "Interrupted: the table holds the trials that ran." in done.stdout
    states = [str(t.state) for t in stored_trials(storage)]
    assert "TrialState.RUNNING" not in states, states
    assert states.count("TrialState.FAIL") >= 2  # the two cut asks


def test_a_worker_that_dies_stops_the_search(tmp_path: Path) -> None:
    """A worker killed mid-trial leaves its trial "running"; a worker waiting
    for those settings would wait for ever, so the others are stopped and the
    search ends naming the dead worker."""
    storage = tmp_path / "trials.log"
    tuning = parallel_search(storage, until="trial 1/100")
    children = Path(f"/proc/{tuning.pid}/task/{tuning.pid}/children")
    workers = [
        int(pid)
        for pid in children.read_text().split()
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    said, logged = tuning.communicate(timeout=300)
    assert tuning.returncode != 0, said
    assert "(exit code -9)" in " ".join(logged.split()), logged
    assert len(stored_trials(storage)) < 100


def test_a_search_on_a_sample_of_the_users() -> None:
    """`sample_users`: every trial trains and is measured on the rows of that
    many users of the tuning rows (the test side set aside from the whole log
    first), the same figure one fit on those rows gives."""
    from twostage.data.split import sample_users

    config = small()
    space = {"retrieval.temperature": "0.1..0.5"}
    found = tune(config, space, trials=1, sample_users=40)
    rows, test_rows = tuning_data(load_dataset_for(config), config)
    drawn = sample_users(rows, 40, seed=config.data.seed)
    assert drawn.interactions["user_id"].n_unique() == 40
    assert found.tuning_rows == drawn.num_interactions < rows.num_interactions
    assert found.test_rows == test_rows  # the whole log's test side, unread
    run, _ = fit_retrieval(found.config, dataset=drawn)
    figure = run.metrics["metrics"]["exclude_seen"]["ndcg"]["10"]
    assert found.trials[0].value == pytest.approx(figure, abs=1e-6)
    for wrong in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="`sample_users` should be"):
            tune(config, space, trials=1, sample_users=wrong)  # type: ignore[arg-type]
    said = CliRunner().invoke(
        app,
        [
            "tune",
            *[part for setting in SMALL for part in ("--set", setting)],
            "--param",
            "retrieval.temperature=0.1..0.5",
            "--trials",
            "1",
            "--sample-users",
            "40",
            "--json",
        ],
    )
    assert said.exit_code == 0, said.output
    assert json.loads(said.stdout)["tuning_rows"] == drawn.num_interactions


def test_a_directory_of_parquet_files_is_tuned_on_a_sample(tmp_path: Path) -> None:
    """tune on a log for --stream (a directory of Parquet files) was refused; with
    `sample_users` it draws that many users one row group at a time and tunes
    on their rows, as it would on the same sample written to one file."""
    from twostage.data.sample import sample_log_users

    logs = tmp_path / "logs"
    logs.mkdir()
    frame = load_dataset_for(small()).interactions.rename({"user_id": "uid"})
    frame.slice(0, 1000).write_parquet(logs / "part-0.parquet")
    frame.slice(1000).write_parquet(logs / "part-1.parquet")
    config = small(f"data.dataset={logs}", "data.user_col=uid")
    space = {"retrieval.temperature": "0.1..0.5"}
    with pytest.raises(ConfigError, match="Give `sample_users`"):
        tune(config, space, trials=1)
    found = tune(config, space, trials=1, sample_users=40)
    assert found.sample is not None
    assert (found.sample.users, found.sample.log_users) == (40, 120)
    assert found.config.data.dataset == str(logs)  # the tuned config streams it
    # The trials read the sampled users' rows less those the streamed run of the
    # tuned config holds out as its test side (drawn over the whole log).
    sample = sample_log_users(
        logs, tmp_path / "s.parquet", users=40, user_col="uid", seed=config.data.seed
    )
    drawn = load_dataset_for(small(f"data.dataset={sample.out}", "data.user_col=uid"))
    keys = ["user_id", "item_id", "timestamp"]
    rule = split_rule(logs, method="random", test_fraction=0.2, seed=42)
    held = held_out_rows(logs, rule, keys, reading=Reading.of(config.data))
    held = held.filter(pl.col("user_id").is_in(drawn.interactions["user_id"].implode()))
    kept = drawn.interactions.join(held, on=keys, how="anti", maintain_order="left")
    assert held.height > 0 and found.test_rows == held.height
    assert found.tuning_rows == kept.height == drawn.num_interactions - held.height
    run, _ = fit_retrieval(found.config, dataset=drawn.with_interactions(kept))
    figure = run.metrics["metrics"]["exclude_seen"]["ndcg"]["10"]
    assert found.trials[0].value == pytest.approx(figure, abs=1e-6)
    command = [
        "tune",
        *[part for setting in SMALL[1:] for part in ("--set", setting)],
        *("--dataset", str(logs), "--user-col", "uid"),
        *("--param", "retrieval.temperature=0.1..0.5", "--trials", "1"),
    ]
    refused = CliRunner().invoke(app, command, env={"COLUMNS": "300"})
    assert refused.exit_code == 2
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())
    assert "trains on it once per trial" in said and "--sample-users N" in said
    assert "--stream --dataset on the tuned --config" in said
    tuned = CliRunner().invoke(
        app, [*command, "--sample-users", "40"], env={"COLUMNS": "300"}
    )
    assert tuned.exit_code == 0, tuned.output
    assert "Drew 40 of 120 users" in tuned.output
    assert f"{found.tuning_rows:,} rows tuned on" in tuned.output
    as_json = CliRunner().invoke(app, [*command, "--sample-users", "40", "--json"])
    assert json.loads(as_json.stdout)["sample"]["users"] == 40


def test_tune_reads_a_log_with_the_column_options_train_takes(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    frame = load_dataset_for(small()).interactions
    frame.rename({"user_id": "uid", "item_id": "sku", "timestamp": "ts"}).write_csv(log)
    out = tmp_path / "best.json"
    found = CliRunner().invoke(
        app,
        [
            "tune",
            *[part for setting in SMALL[1:] for part in ("--set", setting)],
            *("--dataset", str(log), "--user-col", "uid", "--item-col", "sku"),
            *("--time-col", "ts", "--param", "retrieval.temperature=0.1..0.5"),
            *("--trials", "1", "--out", str(out), "--json"),
        ],
    )
    assert found.exit_code == 0, found.output
    best = load_config(out)
    assert (best.data.user_col, best.data.item_col, best.data.time_col) == (
        "uid",
        "sku",
        "ts",
    )
    assert json.loads(found.stdout)["tuning_rows"] == 1920  # 80% of 2,400 rows


def test_a_search_of_the_ranker_trains_retrieval_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import twostage.two_stage as two_stage
    from twostage.config import apply_settings
    from twostage.two_stage import fit_two_stage

    trained: list[object] = []
    real = two_stage.fit_retrieval

    def counted(*args: Any, **kwargs: Any) -> Any:
        trained.append(args[0])
        return real(*args, **kwargs)

    config = small("ranking.epochs=1", "ranking.batch_size=128")
    space = {"ranking.learning_rate": "log:0.0005..0.01"}
    with monkeypatch.context() as patch:
        patch.setattr(two_stage, "fit_retrieval", counted)
        result = tune(config, space, trials=3, stage="both", metric="rmse")
        assert len(trained) == 1  # the ranker's trials shared one retrieval run
        # A retrieval setting in the space trains retrieval again when it changes.
        trained.clear()
        mixed = {**space, "retrieval.temperature": "0.1,0.3"}
        tune(config, mixed, trials=3, stage="both", metric="rmse", seed=1)
        assert 1 < len(trained) <= 3
    # Each trial scores as a fresh fit of both stages on the tuning rows.
    rows, _ = tuning_data(load_dataset_for(config), config)
    for trial in result.trials[1:]:
        fresh = fit_two_stage(apply_settings(config, trial.params), rows)
        assert fresh.ranking_metrics is not None
        assert trial.value == pytest.approx(fresh.ranking_metrics["rmse"], abs=1e-6)
    # A run trained with other retrieval settings is refused.
    other = apply_settings(config, {"retrieval.temperature": 0.2})
    with pytest.raises(ConfigError, match="sections \\['retrieval'\\] differ"):
        fit_two_stage(other, rows, retrieval=(fresh.retrieval, fresh.split))


def test_pruning_a_search_of_the_ranker_reads_the_ranker_s_epochs() -> None:
    config = small(
        *("ranking.epochs=4", "ranking.early_stopping_patience=0"),
        "ranking.batch_size=128",
    )
    space = {"ranking.learning_rate": "log:0.000001..0.02"}
    pruned = tune(config, space, trials=8, stage="both", metric="rmse", prune=True)
    stopped = [t for t in pruned.trials if t.state == "pruned"]
    # Retrieval trains once (trial 1), so every pruned trial was stopped on the
    # ranker's own epochs.
    assert stopped and all(t.number >= 5 for t in stopped)
    assert all("below the earlier trials' median" in (t.error or "") for t in stopped)
    slowest = max(t.params["ranking.learning_rate"] for t in stopped)
    assert slowest < config.ranking.learning_rate
    whole = tune(config, space, trials=5, stage="both", metric="rmse")
    assert [t.value for t in whole.trials] == [t.value for t in pruned.trials[:5]]


@pytest.mark.parametrize("method", ["random", "temporal"])
def test_an_impression_log_s_sample_loses_the_streamed_test_side(
    tmp_path: Path, method: str
) -> None:
    """The shown rows of a sampled impression log follow their choices: those the
    streamed run places on its test side are not tuned on either."""
    from twostage.data.synthetic import planted_impressions
    from twostage.retrieval.streamed import streamed_shown
    from twostage.tuning import _sampled_log

    logs = tmp_path / "logs"
    logs.mkdir()
    frame = planted_impressions(users=60, per_user=6).drop("kind")
    frame.write_parquet(logs / "log.parquet", row_group_size=700)
    config = small(
        f"data.dataset={logs}", "data.label_col=clicked", f"data.split={method}"
    )
    rows, test_rows, sample = _sampled_log(config, 20)
    assert sample.users == 20
    from twostage.data.sample import sample_log_users

    drawn = sample_log_users(logs, tmp_path / "s.parquet", users=20, seed=42)
    users = pl.read_parquet(drawn.out)["user_id"].unique().implode()
    keys = ["user_id", "item_id", "timestamp"]
    reading = Reading.of(config.data)
    rule = split_rule(logs, method=method, test_fraction=0.2, seed=42, reading=reading)
    held = held_out_rows(logs, rule, keys, reading=reading)
    assert test_rows == held.filter(pl.col("user_id").is_in(users)).height > 0
    assert rows.interactions.join(held, on=keys, how="semi").height == 0
    placed = streamed_shown(logs, rule, config.data)
    assert rows.shown is not None
    shown = rows.shown.select(keys).sort(keys)
    expected = placed.train.filter(pl.col("user_id").is_in(users)).select(keys)
    assert shown.equals(expected.sort(keys))


def test_a_sampled_log_keeps_the_whole_log_s_minimum_counts(tmp_path: Path) -> None:
    """The minimum counts of a sampled streamed log are the whole log's, as the
    streamed run applies them: an item with too few rows among the sampled users
    but enough in the log is tuned on, and one the log's counts remove is not."""
    from twostage.data.filtering import min_counts
    from twostage.data.sample import sample_log_users
    from twostage.tuning import _sampled_log

    logs = tmp_path / "logs"
    logs.mkdir()
    frame = load_dataset_for(small()).interactions
    frame.write_parquet(logs / "log.parquet", row_group_size=500)
    config = small(
        f"data.dataset={logs}", "data.min_item_rows=12", "data.min_user_rows=5"
    )
    rows, test_rows, _ = _sampled_log(config, 20)
    whole, _ = min_counts(
        load_dataset_for(small(f"data.dataset={logs / 'log.parquet'}")),
        users=5,
        items=12,
    )
    drawn = sample_log_users(logs, tmp_path / "s.parquet", users=20, seed=42)
    users = pl.read_parquet(drawn.out)["user_id"].unique().implode()
    keys = ["user_id", "item_id", "timestamp"]
    reading = Reading.of(config.data)
    rule = split_rule(
        logs, method="random", test_fraction=0.2, seed=42, reading=reading
    )
    held = held_out_rows(logs, rule, keys, reading=reading)
    expected = (
        whole.interactions.filter(pl.col("user_id").is_in(users))
        .join(held, on=keys, how="anti")
        .select(keys)
    )
    assert 0 < whole.num_items < frame["item_id"].n_unique()  # the log loses items
    assert test_rows > 0
    assert rows.interactions.select(keys).sort(keys).equals(expected.sort(keys))
    # The sample's own counts would have removed items the log keeps.
    own, _ = min_counts(
        load_dataset_for(small(f"data.dataset={drawn.out}")),
        users=5,
        items=12,
    )
    assert own.num_interactions < rows.num_interactions + test_rows
    # A sample the log's counts empty is refused with what to change.
    heavy = small(f"data.dataset={logs}", "data.min_user_rows=100")
    kept = min_counts(
        load_dataset_for(small(f"data.dataset={logs / 'log.parquet'}")), users=100
    )[0]
    assert not kept.interactions["user_id"].is_in(users).any()
    with pytest.raises(DataError, match=r"keep none of the .* sampled rows"):
        _sampled_log(heavy, 20)
