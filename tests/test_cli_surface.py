"""The CLI's conventions: --json on commands that print results, the unknown-user
label, -q/-v, and errors that name the flag the user typed."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app, main
from twostage.errors import ArtifactError
from twostage.recommender import Recommender

runner = CliRunner()


def _known_user(rec: Recommender) -> str:
    return str(rec.user_vocab.values[0])


def test_recommend_json_labels_known_and_unknown_users(
    models_dir: Path, small_recommender: Recommender
) -> None:
    user = _known_user(small_recommender)
    result = runner.invoke(
        app, ["recommend", str(models_dir / "synthetic"), "--user", user, "--json"]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)  # nothing but JSON on stdout
    assert answer["known_user"] is True and answer["path"] == "personalised"
    assert len(answer["items"]) == 10
    bundle = str(models_dir / "synthetic")
    unknown = runner.invoke(
        app, ["recommend", bundle, "--user", "no-such-user", "--json"]
    )
    assert unknown.exit_code == 0, unknown.output
    assert json.loads(unknown.stdout)["known_user"] is False
    table = runner.invoke(app, ["recommend", bundle, "--user", "nobody"])
    assert "unknown user 'nobody'" in table.stdout
    assert "--require-known-user" in table.output  # the warning says how to refuse


def test_require_known_user_is_an_error_naming_the_flag(models_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "recommend",
            str(models_dir / "synthetic"),
            "--user",
            "x",
            "--require-known-user",
        ],
    )
    assert result.exit_code == 2
    assert "--user" in result.output and "not known" in result.output


def test_similar_json_and_unknown_item_names_the_flag(
    models_dir: Path, small_recommender: Recommender
) -> None:
    models_dir = models_dir / "synthetic"
    item = str(small_recommender.item_vocab.values[0])
    result = runner.invoke(
        app, ["similar", str(models_dir), "--item", item, "-k", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["items"]) == 3
    missing = runner.invoke(app, ["similar", str(models_dir), "--item", "nope"])
    assert missing.exit_code == 2 and "--item" in missing.output


def test_index_commands_say_a_run_is_not_a_bundle(
    small_recommender: Recommender, tmp_path: Path
) -> None:
    # They said "no saved version under 'run'", which sent users looking for one.
    small_recommender.run.save(tmp_path / "run")
    for command in ("build", "bench"):
        result = runner.invoke(
            app, ["index", command, str(tmp_path / "run")], env={"COLUMNS": "200"}
        )
        assert result.exit_code == 2 and "is a training run" in result.output


def test_a_models_directory_holding_a_training_run_names_it(
    small_recommender: Recommender, tmp_path: Path
) -> None:
    # `train retrieval --out models/big/1`, then `evaluate models/big`: it said
    # only that no version had a manifest.
    from twostage.errors import ArtifactError
    from twostage.recommender import load

    small_recommender.run.save(tmp_path / "big" / "1")
    with pytest.raises(ArtifactError, match="is a training run") as raised:
        load(tmp_path / "big")
    assert f"{str(tmp_path / 'big' / '1')!r}" in str(raised.value)
    for command in (["info"], ["recommend", "--user", "3"]):
        result = runner.invoke(app, [command[0], str(tmp_path / "big"), *command[1:]])
        assert isinstance(result.exception, ArtifactError), result.output
        assert "pass that directory itself" in str(result.exception)
    assert load(tmp_path / "big" / "1").recommend(3, 2).items  # as it says


def test_recommend_ranks_a_candidate_list(
    models_dir: Path, small_recommender: Recommender
) -> None:
    model = str(models_dir / "synthetic")
    whole = runner.invoke(
        app, ["recommend", model, "--user", "3", "-k", "30", "--json"]
    )
    mine = [i["item_id"] for i in json.loads(whole.stdout)["items"]][10:15]
    listed = ",".join(str(i) for i in mine[::-1])
    result = runner.invoke(
        app,
        [
            "recommend",
            model,
            "--user",
            "3",
            "-k",
            "5",
            "--candidates",
            listed,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [i["item_id"] for i in json.loads(result.stdout)["items"]] == mine
    unknown = runner.invoke(
        app,
        ["recommend", model, "--user", "3", "--candidates", f"{mine[0]},10000"],
        env={"COLUMNS": "200"},
    )
    assert unknown.exit_code == 2
    assert "`--candidates` holds item IDs this model does not know: [10000]" in (
        unknown.output
    )
    seen = small_recommender.history(3)[0]["item_id"]
    short = runner.invoke(
        app,
        [
            "recommend",
            model,
            "--user",
            "3",
            "--candidates",
            f"{mine[0]},{seen},{mine[0]}",
        ],
        env={"COLUMNS": "200"},
    )
    assert short.exit_code == 0, short.output
    assert (
        f"2 of the --candidates left out of the list: {seen} (seen), "
        f"{mine[0]} (listed twice)." in short.output
    )


def test_recommend_excludes_items_and_diversifies_from_the_cli(
    models_dir: Path, small_recommender: Recommender, tmp_path: Path
) -> None:
    model = str(models_dir / "synthetic")
    plain = [i["item_id"] for i in small_recommender.recommend(3, 5).items]
    args = ["recommend", model, "--user", "3", "-k", "5"]
    result = runner.invoke(
        app,
        [
            *args,
            *("--exclude", f"{plain[0]},99999", "--exclude", str(plain[1])),
            *("--diversity", "0.6", "--max-per", "category=1", "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    expected = small_recommender.recommend(
        3,
        5,
        exclude=[plain[0], 99999, plain[1]],
        diversity=0.6,
        max_per={"category": 1},
    )
    answer = json.loads(result.stdout)
    assert answer["items"] == expected.items
    assert answer["unknown_excluded_items"] == [99999]
    printed = runner.invoke(app, [*args, "--exclude", "99999"], env={"COLUMNS": "200"})
    assert printed.exit_code == 0, printed.output
    assert "--exclude names item(s) this model does not know: 99999." in (
        printed.output
    )
    ranked = runner.invoke(
        app,
        [*args, "--candidates", f"{plain[0]},{plain[1]}", "--exclude", str(plain[0])],
        env={"COLUMNS": "200"},
    )
    assert f"left out of the list: {plain[0]} (in --exclude)." in ranked.output
    # Many users: --diversity applies to each list, --exclude is one list's.
    out = tmp_path / "lists.parquet"
    many = runner.invoke(
        app,
        [
            *("recommend", model, "--all-users", "-k", "4", "--diversity", "0.6"),
            *("--out", str(out)),
        ],
    )
    assert many.exit_code == 0, many.output
    table = pl.read_parquet(out).filter(pl.col("user_id") == 3)
    assert table["item_id"].to_list() == [
        i["item_id"] for i in small_recommender.recommend(3, 4, diversity=0.6).items
    ]
    refused = runner.invoke(
        app,
        [
            *("recommend", model, "--all-users", "--exclude", "1"),
            *("--out", str(out), "--overwrite"),
        ],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 2 and "--exclude" in refused.output
    narrow = runner.invoke(
        app,
        [*args, "--max-per", "category=1", "--num-candidates", "5", "--json"],
    )
    assert narrow.exit_code == 0, narrow.output
    assert (
        json.loads(narrow.stdout)["items"]
        == small_recommender.recommend(
            3, 5, max_per={"category": 1}, num_candidates=5
        ).items
    )
    similar = runner.invoke(
        app,
        [
            "similar",
            model,
            "--item",
            "7",
            "-k",
            "4",
            "--max-per",
            "category=1",
            "--json",
        ],
    )
    assert similar.exit_code == 0, similar.output
    assert json.loads(similar.stdout)["items"] == small_recommender.similar_items(
        7, 4, max_per={"category": 1}
    )
    closest = [i["item_id"] for i in small_recommender.similar_items(7, 4)]
    similar = runner.invoke(
        app,
        [
            *("similar", model, "--item", "7", "-k", "4", "--json"),
            *("--exclude", f"{closest[0]},99999", "--exclude", str(closest[2])),
        ],
    )
    assert similar.exit_code == 0, similar.output
    answer = json.loads(similar.stdout)
    assert answer["items"] == small_recommender.similar_items(
        7, 4, exclude=[closest[0], closest[2]]
    )
    assert answer["unknown_excluded_items"] == [99999]
    printed = runner.invoke(
        app,
        ["similar", model, "--item", "7", "--exclude", "99999"],
        env={"COLUMNS": "200"},
    )
    assert printed.exit_code == 0, printed.output
    assert "--exclude names item(s) this model does not know: 99999." in (
        printed.output
    )
    refused = runner.invoke(
        app,
        [
            *("similar", model, "--all-items", "--exclude", "1"),
            *("--out", str(tmp_path / "similar.parquet")),
        ],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 2 and "--exclude" in refused.output
    kept = runner.invoke(
        app,
        [
            *args,
            *("--max-per", "category=1", "--num-candidates", "5"),
            *("--widening", "1", "--json"),
        ],
    )
    assert kept.exit_code == 0, kept.output
    assert (
        json.loads(kept.stdout)["items"]
        == small_recommender._recommend(
            3, 5, max_per={"category": 1}, num_candidates=5
        ).items
    )
    # More asked for than the limit can fill: the list says why it is short.
    categories = small_recommender.item_filters.frame["category"].n_unique()
    wide = categories + 5
    limit = {"category": 1}
    for command, got in (
        (args[:4], len(small_recommender.recommend(3, wide, max_per=limit).items)),
        (
            ["similar", model, "--item", "7"],
            len(small_recommender.similar_items(7, wide, max_per=limit)),
        ),
    ):
        capped = runner.invoke(
            app,
            [*command, "-k", str(wide), "--max-per", "category=1"],
            env={"COLUMNS": "300"},
        )
        assert capped.exit_code == 0, capped.output
        said = " ".join(capped.output.split())
        assert f"{wide} asked for: only {got} items" in said
        assert "--max-per passed over the rest" in said
    spread = runner.invoke(
        app,
        [*args, "--diversity", "1", "--diversity-by", "category", "--json"],
    )
    assert spread.exit_code == 0, spread.output
    assert (
        json.loads(spread.stdout)["items"]
        == small_recommender.recommend(
            3, 5, diversity=1.0, diversity_by="category"
        ).items
    )
    unknown = runner.invoke(
        app,
        [*args, "--diversity", "1", "--diversity-by", "colour"],
        env={"COLUMNS": "200"},
    )
    assert unknown.exit_code == 2
    assert "unknown `--diversity-by` column(s) ['colour']" in " ".join(
        unknown.output.split()
    )
    bad = runner.invoke(app, [*args, "--diversity", "1.5"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "--diversity" in bad.output
    for given, said in (
        ("colour=2", "unknown `--max-per` column(s) ['colour']"),
        ("category=0", "'category' should be a positive whole number"),
        ("category", "should look like column=value"),
    ):
        bad = runner.invoke(
            app,
            [
                *("recommend", model, "--all-users", "--max-per", given),
                *("--out", str(out), "--overwrite"),
            ],
            env={"COLUMNS": "200"},
        )
        assert bad.exit_code == 2 and said in bad.output, bad.output


def test_a_run_never_writes_over_other_files(
    small_recommender: Recommender, tmp_path: Path
) -> None:
    # `train retrieval --out .` in a project replaced its config.json at the save.
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"mine": true}')
    (project / "README.md").write_text("mine")
    result = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", "synthetic:num_users=40"),
            *("--out", str(project), "--set", "train.epochs=1"),
        ],
    )
    assert "a run would write over them: config.json" in str(result.exception)
    with pytest.raises(ArtifactError, match=r"would write over them: config\.json"):
        small_recommender.run.save(project)
    assert (project / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "config.json"]
    small_recommender.run.save(tmp_path / "run")  # a new directory
    small_recommender.run.save(tmp_path / "run")  # an earlier run: replaced
    (project / "config.json").unlink()
    small_recommender.run.save(project)  # beside other files, over none of them
    assert (project / "README.md").read_text() == "mine"


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    # They said "no saved version under ...", as if the directory held something.
    missing = str(tmp_path / "modles" / "x")
    for command in (["recommend", missing, "--user", "1"], ["index", "build", missing]):
        result = runner.invoke(app, command, env={"COLUMNS": "200"})
        assert result.exit_code != 0
        told = result.output + str(result.exception or "")
        assert f"{missing!r} does not exist" in told, told


def test_index_bench_json_and_kind_spelling(models_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            *("index", "bench", str(models_dir / "synthetic"), "--kind", "exact"),
            *("--kind", "ivf", "--num-queries", "20", "-k", "5", "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert set(figures["backends"]) == {"exact", "ivf"}
    assert figures["backends"]["exact"]["recall_at_k"] == 1.0
    bundle = str(models_dir / "synthetic")
    # --num-queries 0 ended in torch.cat's traceback; "exact,,ivf" lost its gap.
    none = runner.invoke(app, ["index", "bench", bundle, "--num-queries", "0"])
    assert none.exit_code == 2 and "--num-queries" in none.output
    gap = runner.invoke(app, ["index", "bench", bundle, "--kind", "exact,,ivf"])
    assert gap.exit_code == 2 and "--kind" in gap.output


def test_index_build_takes_section_qualified_settings(
    models_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rebuilt"
    result = runner.invoke(
        app,
        [
            *("index", "build", str(models_dir / "synthetic"), "--kind", "hnsw"),
            *("--set", "index.ef_search=32", "--out", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["index"]
    assert saved["ef_search"] == 32


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        # A library message names a Python argument; the CLI shows the flag.
        (["data", "describe", "{log}", "--user-col", "uid"], "--user-col"),
        (["train", "--dataset", "{log}", "--out", "{out}", "--item-col", "x"], None),
        (["recommend", "{bundle}", "-k", "0"], "-k"),
        (["evaluate", "{missing}"], None),
        (["train", "--out", "{out}", "--set", "train.epoch=3"], "train.epochs"),
        (["data", "split", "{log}", "--out", "{out}", "--method", "sideways"], None),
        (["report", "{missing}"], None),
        (["serve", "{missing}"], None),
        (["serve", "{bundle}", "--poll-seconds", "-1"], "`--poll-seconds` should"),
        (["serve", "{bundle}", "--torch-threads", "0"], "`--torch-threads` should"),
        (["data", "split", "{log}", "--out", "{out}", "--seed", "-1"], "`--seed`"),
    ],
)
def test_errors_name_what_the_user_typed(
    args: list[str],
    flag: str | None,
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n1,2\n")
    values = {
        "log": str(log),
        "out": str(tmp_path / "out"),
        "bundle": str(models_dir / "synthetic"),
        "missing": str(tmp_path / "nothinghere"),
    }
    with pytest.raises(SystemExit) as exited:  # through main(), as the shell runs it
        main([a.format(**values) for a in args])
    captured = capsys.readouterr()
    assert exited.value.code == 2, captured
    message = " ".join((captured.out + captured.err).split())  # rich folds lines
    assert "Traceback" not in message
    if flag is None:  # the option's own name
        named = [a for a in args if a.startswith("-")] or [values["missing"]]
        flag = named[-1] if "{" not in named[-1] else values["missing"]
    assert flag in message, message
    assert "`user_col`" not in message and "column_names=" not in message


def test_quiet_and_verbose_set_the_log_level() -> None:
    import logging

    assert runner.invoke(app, ["-q", "--version"]).exit_code == 0
    runner.invoke(app, ["-q", "data", "describe", "synthetic:num_users=5", "--json"])
    assert logging.getLogger().level == logging.WARNING
    runner.invoke(app, ["-v", "data", "describe", "synthetic:num_users=5", "--json"])
    assert logging.getLogger().level == logging.DEBUG
    both = runner.invoke(app, ["-q", "-v", "data", "describe", "synthetic"])
    assert both.exit_code == 2


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("movielen-100k", "movielens-100k"), ("movielens-100", "movielens-100k")],
)
def test_unknown_dataset_names_get_a_suggestion(
    name: str, suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["data", "describe", name])
    message = " ".join(capsys.readouterr().err.split())
    assert f"Did you mean '{suggestion}'?" in message, message


def test_command_lists_give_each_command_its_first_sentence_on_one_line() -> None:
    # The docstrings wrap at 88 columns; the lists must not keep those breaks.
    from twostage.cli import evaluate_command

    wide = {"COLUMNS": "250"}
    result = runner.invoke(app, ["--help"], env=wide)
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    docstring = " ".join((evaluate_command.__doc__ or "").split())
    first, second = docstring.split(". A run", 1)
    assert f"evaluate {first}." in text
    assert "reads its log's test side" in second
    assert "reads its log's test side" not in text  # the second sentence is left out
    # At this width a summary wraps only where the terminal ends: no line of the
    # list ends early inside a sentence, as the docstring's breaks made them.
    lines = [line for line in result.output.splitlines() if line.startswith("│")]
    assert not any(
        line.rstrip("│ ").endswith("rebuilt from the saved") for line in lines
    )
    for group in ("train", "data", "index"):
        listed = runner.invoke(app, [group, "--help"], env=wide)
        assert listed.exit_code == 0, group


def test_the_users_text_is_shown_as_written_not_as_markup(tmp_path: Path) -> None:
    # Catalogue titles and paths are data: "[sound recording]" once vanished and
    # "[/]" raised a MarkupError from `twostage recommend`.
    from rich.console import Console

    from twostage.cli_output import items_table

    item = {"item_id": "b[/]1", "score": 1.0, "tags": ["[bold]new"]}
    console = Console(width=200, record=True)
    for label in ("Les Misérables [sound recording]", "Bad [/] title"):
        console.print(items_table("t", [{**item, "label": label}]))
        shown = console.export_text()
        assert label in shown and "[bold]new" in shown and "b[/]1" in shown
    folder = tmp_path / "[old] logs"
    folder.mkdir()
    log = folder / "log.csv"
    log.write_text("user_id,item_id\n1,2\n2,2\n")
    result = runner.invoke(app, ["data", "describe", str(log)])
    assert result.exit_code == 0, result.output
    assert "[old] logs" in " ".join(result.output.split())  # rich folds lines


def test_an_unknown_user_typed_as_markup_and_a_short_list_are_shown_plainly(
    models_dir: Path, small_recommender: Recommender
) -> None:
    # "[/]" as a --user once raised a MarkupError from the cold-start warning, and
    # `-k` above the catalogue printed "Top 1000" over a list of about 60 items.
    bundle = str(models_dir / "synthetic")
    wide = {"COLUMNS": "200"}
    result = runner.invoke(
        app, ["recommend", bundle, "--user", "[/]", "-k", "1000"], env=wide
    )
    assert result.exit_code == 0, result.output
    catalogue = small_recommender.item_vocab.size - 1
    assert "User '[/]' is not known" in result.output
    assert f"Top {catalogue} for unknown user '[/]'" in result.output
    assert f"1,000 asked for: only {catalogue} items to rank" in result.output
    item = str(small_recommender.item_vocab.values[0])
    similar = runner.invoke(
        app, ["similar", bundle, "--item", item, "-k", "1000"], env=wide
    )
    assert similar.exit_code == 0, similar.output
    assert f"only {catalogue - 1} items to rank besides this one" in similar.output
    exact = runner.invoke(app, ["recommend", bundle, "--user", "[/]", "-k", "5"])
    assert "Top 5 for" in exact.output and "asked for" not in exact.output


def test_a_feature_given_twice_or_not_finite_names_the_flag(models_dir: Path) -> None:
    bundle = str(models_dir / "synthetic")
    twice = runner.invoke(
        app, ["recommend", bundle, "--feature", "age=30", "--feature", "age=31"]
    )
    assert twice.exit_code == 2 and "'age' is given twice" in twice.output
    result = runner.invoke(app, ["recommend", bundle, "--feature", "age=inf"])
    assert result.exit_code == 2, result.output
    shown = " ".join(result.output.split())
    assert "--feature" in shown and "should be a finite number" in shown
    # `--feature segment=$SEGMENT` with the variable unset read as a missing value.
    empty = runner.invoke(
        app, ["recommend", bundle, "--feature", "age=", "--context", "hour= "]
    )
    assert empty.exit_code == 2, empty.output
    assert "'age' has no value" in " ".join(empty.output.split())


def test_ctrl_c_during_training_says_what_is_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Ctrl-C exited 130 without a word about the epochs checkpointed or lost.
    from twostage import cli

    with pytest.raises(SystemExit) as stopped, cli._stop_on_sigterm():
        raise KeyboardInterrupt
    assert stopped.value.code == 130
    said = " ".join(capsys.readouterr().err.split())
    assert "interrupted (Ctrl-C)" in said
    assert "--resume continues from there" in said


def test_one_ctrl_c_asks_the_loop_to_stop_and_a_second_stops_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first Ctrl-C during training finishes the step and checkpoints it (it
    lost the epoch in progress); a second one, or one while the log loads or the
    model is evaluated, stops at once; SIGTERM outside a loop too."""
    from twostage import cli
    from twostage.training import loop

    with pytest.raises(SystemExit) as stopped, cli._stop_on_sigterm():
        ctrl_c = signal.getsignal(signal.SIGINT)
        assert callable(ctrl_c)
        loop._RUNNING.set()  # as run_training marks itself
        try:
            ctrl_c(signal.SIGINT, None)
            assert loop.stop_requested()
            assert "stopping (Ctrl-C) after the step" in " ".join(
                capsys.readouterr().err.split()
            )
            ctrl_c(signal.SIGINT, None)
        finally:
            loop._RUNNING.clear()
    assert stopped.value.code == 130
    assert not loop.stop_requested()  # not left for the next run of the process
    with pytest.raises(SystemExit) as stopped, cli._stop_on_sigterm():
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # type: ignore[operator]
    assert stopped.value.code == 130
    with pytest.raises(SystemExit) as stopped, cli._stop_on_sigterm():
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # type: ignore[operator]
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_ctrl_c_in_a_run_checkpoints_the_step_and_resume_finishes(
    tmp_path: Path,
) -> None:
    """A real `twostage train retrieval` process: one SIGINT within an epoch
    writes a checkpoint within the epoch and exits with the message; --resume
    finishes that epoch from there."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "twostage", "train", "retrieval", "--out", str(run)]
    args += ["--dataset", "synthetic:num_users=150,num_items=80,num_interactions=3000"]
    for item in [
        "data.validation_fraction=0",
        "train.epochs=40",
        "train.batch_size=32",
        "train.num_threads=1",
        "train.early_stopping_patience=0",
        "train.checkpoint_steps=5",
        "retrieval.embedding_dim=8",
        "retrieval.output_dim=8",
        "retrieval.history_length=5",
    ]:
        args += ["--set", item]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    state = run / "checkpoint" / "state.json"
    deadline = time.monotonic() + 180
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "no checkpoint was written"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=180)
    said = " ".join(err.split())
    assert process.returncode == 130, said  # a stop asked for is no error (2)
    assert "stopping (Ctrl-C) after the step in progress" in said
    assert "stopped: training stopped on request after" in said
    assert "error" not in said
    meta = json.loads(state.read_text())
    assert 0 < meta["next_epoch"] * 100 + meta["next_step"] < 4000
    finish = meta["next_epoch"] + 1  # the epoch in progress, or the next one
    done = subprocess.run(
        [*args, "--resume", "--set", f"train.epochs={finish}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (run / "model.safetensors").exists()


def test_an_option_given_twice_that_takes_one_value_is_refused(
    models_dir: Path, tmp_path: Path
) -> None:
    """click keeps the last occurrence of such an option and drops the others
    silently (`add-items --items a.csv --items b.csv` would add b.csv alone): every
    command refuses it, naming it, before it runs; repeatable options and a
    subcommand's own options are not counted against its group's."""
    import typer.main

    from twostage.cli_group import repeated_options

    model = str(models_dir / "tiny")
    twice = runner.invoke(
        app, ["recommend", model, "--user", "1", "-k", "3", "-k", "5"]
    )
    said = " ".join(twice.output.replace("│", " ").split())
    assert twice.exit_code == 2 and "Invalid value for -k: given 2 times" in said, said
    out = tmp_path / "a"
    trained = runner.invoke(
        app, ["train", "--out", str(out), "--out", str(tmp_path / "b")]
    )
    assert trained.exit_code == 2 and "--out" in trained.output
    assert not out.exists() and not (tmp_path / "b").exists()
    command = typer.main.get_command(app)
    recommend = command.commands["recommend"]  # type: ignore[attr-defined]
    # A value is never read as a flag; repeatable options may repeat.
    args = ["--context", "-k", "-k", "3", "--filter", "a=1", "--filter", "b=2"]
    assert repeated_options(recommend, args) == []
    assert repeated_options(recommend, ["--k=3", "-k", "4"]) == [("-k", 2)]
    train = command.commands["train"]  # type: ignore[attr-defined]
    both = ["--out", "a", "retrieval", "--out", "b"]  # the group's, then its command's
    assert repeated_options(train, both) == []


def test_figures_within_twice_their_standard_error_are_called_level() -> None:
    # A sessions run on random items once printed "ahead of the best baseline
    # (+29.2%)" over NDCG@10 figures of 0.0001: a change in noise.
    from twostage.cli_output import compare, session_standing

    assert compare(0.30, 0.27, 0.01, 0.01) == ("ahead of", pytest.approx(1 / 9), "")
    verdict, change, note = compare(0.30, 0.28, 0.01, 0.01)  # 0.02 < 2 * 0.0141
    assert verdict == "level with" and change == pytest.approx(1 / 14)
    assert note == "; within twice the difference's standard error of 0.0141"
    assert compare(0.27, 0.30, 0.001, 0.001)[0] == "behind"
    assert compare(0.30, 0.28)[0] == "ahead of"  # no errors: the 1% rule alone
    assert compare(0.30, 0.28, math.nan, 0.01)[0] == "ahead of"
    assert compare(0.300, 0.299, 0.1, 0.1) == ("level with", pytest.approx(1 / 299), "")
    # The paired error (of the per-query differences) replaces the unpaired one:
    # figures of the same users move together, so it is smaller, and sharper.
    assert compare(0.30, 0.28, 0.01, 0.01, 0.005)[0] == "ahead of"
    verdict, _, note = compare(0.30, 0.28, 0.001, 0.001, 0.02)
    assert verdict == "level with"
    assert note == "; within twice the paired standard error of 0.0200"
    assert compare(0.30, 0.28, 0.01, 0.01, math.nan)[0] == "level with"  # unpaired
    found = {
        "twostage": {"ndcg": {10: 0.00013}},
        "baselines": {"ease": {"ndcg": {10: 0.0001}}, "pop": {"ndcg": {10: 0.00002}}},
        "standard_errors": {
            "twostage": {"ndcg": {10: 0.00009}},
            "popularity": {"ndcg": {10: 0.0}},  # the fallback row, not a baseline
            "baselines": {"ease": {"ndcg": {10: 0.00007}}},
        },
    }
    line = session_standing(found)
    assert line is not None and line.startswith(
        "The model's lists are level with the best baseline on NDCG@10, ease: "
        "0.0001 vs 0.0001 (+30.0%); within twice the difference's standard error"
    ), line
    del found["standard_errors"]  # a figure written before they were kept
    assert "are ahead of the best baseline" in (session_standing(found) or "")
    # Against a figure of 0 there is no relative change: it read "(+inf%)",
    # and --json wrote Infinity, which is no JSON number.
    assert compare(0.0, 0.0) == ("level with", 0.0, "")
    assert compare(0.2, 0.0) == ("ahead of", None, "")
    assert compare(0.02, 0.0, 0.01, 0.0)[0] == "level with"  # within the noise
    zero = {
        "twostage": {"ndcg": {10: 0.0}},
        "baselines": {"pop": {"ndcg": {10: 0.0}}},
    }
    line = session_standing(zero) or ""
    assert "0.0000 vs 0.0000 (+0.0%)" in line and "inf" not in line
    zero["twostage"]["ndcg"][10] = 0.5
    assert "0.5000 vs 0.0000 (from zero)" in (session_standing(zero) or "")


def test_the_cli_starts_without_importing_torch() -> None:
    # `twostage --help` and a typo's error come back at once: torch (1.7 s to
    # import here) loads only in the commands that use it. A module-level import
    # of the evaluation code from the CLI's output helpers once pulled it in.
    code = "import sys, twostage.cli; print('torch' in sys.modules)"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False", found.stdout


@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        (["train", "retrieval", "--bogus"], 2, "No such option: --bogus"),
        (["train", "retrieval", "--stream", "log"], 2, "Missing option '--out'"),
        (["train", "--epochs", "3"], 2, "No such option: --epochs"),
        (["train", "retrieval", "--out", "a", "--out", "b"], 2, "given 2 times"),
        (["train", "retrieval", "--help"], 0, "Train the two-tower retrieval model"),
        (["--version"], 0, "twostage "),
    ],
)
def test_nproc_checks_the_command_line_before_it_starts_any_rank(
    args: list[str], status: int, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--nproc 2` started torchrun with any command line: each rank then printed
    the same usage error, and torchrun its failure report, for a typo. It is now
    shown once, with the single process's exit status, and no rank starts."""
    started = time.perf_counter()
    with pytest.raises(SystemExit) as done:
        main([*args, "--nproc", "2"])
    printed = capsys.readouterr()
    text = " ".join((printed.out + printed.err).replace("│", " ").split())
    assert done.value.code == status, text
    assert text.count(said) == 1, text
    assert "torch.distributed" not in text and "ChildFailedError" not in text
    assert time.perf_counter() - started < 20  # no rank was started


def test_an_output_path_the_file_system_refuses_is_one_line_and_exit_2(
    models_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file where an output's folder should be ended in a traceback
    (NotADirectoryError) from `similar --out`, `report`, `export`, `data split`,
    `data sample`, and from `tune --out` only after every trial; a missing folder
    of a batch file ended so too, after the answers were computed."""
    import polars as pl

    bundle = str(models_dir / "synthetic")
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    log = tmp_path / "log.parquet"
    pl.DataFrame(
        {"user_id": [1, 1, 2, 2, 3], "item_id": [1, 2, 1, 3, 2], "timestamp": range(5)}
    ).write_parquet(log)
    for args in (
        ["similar", bundle, "--all-items", "--out", f"{blocker}/x.parquet"],
        ["report", bundle, "--out", f"{blocker}/report"],
        ["export", bundle, "--out", f"{blocker}/onnx"],
        ["data", "split", str(log), "--out", f"{blocker}/splits"],
        ["data", "sample", str(log), "--users", "2", "--out", f"{blocker}/s.parquet"],
        [
            "tune",
            "--dataset",
            str(log),
            "--param",
            "train.epochs=1..2",
            "--out",
            f"{blocker}/tuned.json",
        ],
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        captured = capsys.readouterr()
        # Rich boxes and folds a long path: read it without borders and spaces.
        said = re.sub(r"[│╭╮╰╯─\s]", "", captured.out + captured.err)
        assert exited.value.code == 2, (args, said)
        assert "Traceback" not in said and "afile" in said, (args, said)
        assert ".partial" not in said, (args, said)  # the path given, not a temporary
    # A run's, bundle's or report's folder with a file in its way was found only
    # when the work was done: now refused before it (`train`'s log says nothing).
    for args in (
        ["train", "retrieval", "--dataset", str(log), "--out", str(blocker)],
        ["train", "--dataset", str(log), "--out", f"{blocker}/1"],
        [
            *("train", "--dataset", str(log), "--out", str(tmp_path / "m" / "1")),
            *("--work-dir", str(blocker)),
        ],
        ["report", bundle, "--out", str(blocker)],
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        captured = capsys.readouterr()
        said = re.sub(r"[│╭╮╰╯─\s]", "", captured.out + captured.err)
        assert exited.value.code == 2, (args, said)
        assert "afile" in said and "--" in said, (args, said)
        assert "epoch" not in said and "rebuilding" not in said, (args, said)
    # Under torchrun each rank that meets it says so, the others by rank.
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exited:
        main(["data", "split", str(log), "--out", f"{blocker}/splits"])
    assert exited.value.code == 2
    assert "error (rank 1): Not a directory" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    # A batch file's missing folder is made, before any answer is computed.
    out = tmp_path / "new" / "folder" / "similar.parquet"
    with pytest.raises(SystemExit) as exited:
        main(["similar", bundle, "--all-items", "--out", str(out)])
    assert exited.value.code in (0, None) and out.is_file()


def test_recommend_leaves_each_user_s_items_out_from_a_file(
    models_dir: Path, small_recommender: Recommender, tmp_path: Path
) -> None:
    """`--exclude-file`: each listed user's rows leave their items out of that
    user's list (the lists recommend_table gives with `exclude`); rows for
    users without a list and unknown items are counted with their rows."""
    model = str(models_dir / "synthetic")
    top = {
        u: [i["item_id"] for i in small_recommender.recommend(u, 5).items]
        for u in (3, 4)
    }
    shown = tmp_path / "shown.csv"
    shown.write_text(
        "user_id,item_id\n"
        f"3,{top[3][0]}\n3,{top[3][1]}\n4,{top[4][0]}\n"
        "999,7\n"  # a user without a list here
        "4,nope\n"  # an item the model does not know
    )
    users = tmp_path / "users.csv"
    users.write_text("user_id\n3\n4\n5\n")
    out = tmp_path / "lists.parquet"
    args = ["recommend", model, "--users", str(users), "--out", str(out), "-k", "5"]
    result = runner.invoke(app, [*args, "--exclude-file", str(shown), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["exclude_file"]
    assert summary["rows"] == 5 and summary["users"] == 2
    assert summary["rows_for_users_without_a_list"] == 1
    assert summary["first_rows_for_users_without_a_list"] == [4]
    assert summary["rows_with_unknown_items"] == 1
    assert summary["first_rows_with_unknown_items"] == [5]
    expected = small_recommender.recommend_table(
        [3, 4, 5], 5, exclude={3: top[3][:2], 4: [top[4][0], "nope"]}
    )
    assert (
        pl.read_parquet(out)
        .select("user_id", "item_id")
        .equals(expected.select("user_id", "item_id"))
    )
    got = pl.read_parquet(out).filter(pl.col("user_id") == 3)["item_id"].to_list()
    assert not set(got) & set(top[3][:2]) and len(got) == 5
    printed = runner.invoke(
        app,
        [*args, "--overwrite", "--exclude-file", str(shown)],
        env={"COLUMNS": "200"},
    )
    assert printed.exit_code == 0, printed.output
    said = " ".join(printed.output.split())
    assert "--exclude-file: 5 rows; items left out of 2 users' lists." in said
    assert (
        "1 --exclude-file rows name users without a list here: not used (data rows [4])"
        in said
    )
    assert (
        "name items this model does not know: nothing to leave out (data rows [5])"
        in said
    )
    refused = runner.invoke(
        app,
        ["recommend", model, "--user", "3", "--exclude-file", str(shown)],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 2
    assert "give --users FILE, --all-users or --sessions FILE" in refused.output
    for missing in (tmp_path, tmp_path / "gone.csv"):  # before the bundle loads
        refused = runner.invoke(
            app,
            [*args, "--overwrite", "--exclude-file", str(missing)],
            env={"COLUMNS": "300"},
        )
        assert refused.exit_code == 2 and "is not a file" in refused.output
    blank = tmp_path / "blank.csv"
    blank.write_text("user_id,item_id\n3,\n")
    refused = runner.invoke(
        app,
        [*args, "--overwrite", "--exclude-file", str(blank)],
        env={"COLUMNS": "200"},
    )
    assert (
        refused.exit_code == 2 and "have no item_id (data rows [1])" in refused.output
    )
    other = tmp_path / "other.csv"
    other.write_text("customer,item_id\n3,1\n")
    refused = runner.invoke(
        app,
        [*args, "--overwrite", "--exclude-file", str(other)],
        env={"COLUMNS": "200"},
    )
    assert refused.exit_code == 2 and "has no user_id column" in refused.output
    # IDs of another type: named, not matched to no one (or a traceback).
    for frame, said in (
        (pl.DataFrame({"user_id": [3], "item_id": [[1, 2]]}), "item_id column"),
        (pl.DataFrame({"user_id": [3.0], "item_id": [1]}), "user_id column"),
    ):
        typed = tmp_path / "typed.parquet"
        frame.write_parquet(typed)
        refused = runner.invoke(
            app,
            [*args, "--overwrite", "--exclude-file", str(typed)],
            env={"COLUMNS": "300"},
        )
        assert refused.exit_code == 2, refused.output
        assert (
            said in refused.output and "IDs should be whole numbers" in refused.output
        )
