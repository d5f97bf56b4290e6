import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage import load
from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.synthetic import generate
from twostage.errors import ArtifactError, DataError
from twostage.metrics import paired_standard_error
from twostage.ranking import evaluate_ranking
from twostage.retrieval.evaluation import evaluate_baselines, rebuild_split

runner = CliRunner()


def test_describe_synthetic_prints_json() -> None:
    result = runner.invoke(
        app, ["data", "describe", "synthetic:num_items=50,num_users=40", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert summary["num_items"] <= 50 and summary["num_users"] == 40
    assert "rating_histogram" in summary
    # How training would read each side column, before training does.
    assert summary["feature_kinds"] == {
        "age": "bucket",
        "segment": "categorical",
        "title": "text",
        "category": "categorical",
        "price": "numeric",
    }
    table = runner.invoke(app, ["data", "describe", "synthetic:num_items=50"])
    assert "age (bucket), segment (categorical)" in table.output


def test_describe_own_csv_reports_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("uid,iid,stars\n1,10,5\n2,,4\n3,12,abc\n4,13,3\n")
    result = runner.invoke(
        app,
        [
            "data",
            "describe",
            str(path),
            "--user-col",
            "uid",
            "--item-col",
            "iid",
            "--rating-col",
            "stars",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "empty_item_id" in result.output and "bad_rating" in result.output


def test_describe_reads_a_parquet_directory_as_a_stream(tmp_path: Path) -> None:
    """Regression: a directory of Parquet files, the form `train --stream` reads,
    was refused as "not an existing file"."""
    from twostage.data.synthetic import write_parquet

    logs = tmp_path / "logs"
    write_parquet(
        logs,
        num_users=50,
        num_items=40,
        num_interactions=900,
        num_clusters=4,
        rows_per_file=400,
    )
    result = runner.invoke(app, ["data", "describe", str(logs), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_interactions"] == 900 and summary["num_users"] <= 50
    assert summary["duplicate_rows"] is None and summary["report"]["rejected"] == {}
    table = runner.invoke(app, ["data", "describe", str(logs)])
    assert "not counted when streamed" in table.output
    # The log's own names: read as ours (they were refused).
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in sorted(logs.glob("*.parquet")):
        pl.read_parquet(file).rename({"user_id": "u"}).write_parquet(
            renamed / file.name
        )
    mapped = runner.invoke(
        app, ["data", "describe", str(renamed), "--user-col", "u", "--json"]
    )
    assert mapped.exit_code == 0, mapped.output
    assert json.loads(mapped.stdout)["num_users"] == summary["num_users"]
    unmapped = runner.invoke(app, ["data", "describe", str(renamed)])
    assert isinstance(unmapped.exception, DataError)  # named, with the flag
    assert "--user-col" in str(unmapped.exception)
    separated = runner.invoke(app, ["data", "describe", str(logs), "--separator", ";"])
    assert separated.exit_code == 2 and "drop --separator" in " ".join(
        re.sub("[│╭╮╰╯─]", " ", separated.output).split()
    )
    split = runner.invoke(app, ["data", "split", str(logs), "--out", str(tmp_path)])
    assert split.exit_code == 0, split.output  # split as a stream, not refused
    assert "random split, streamed: " in " ".join(split.output.split())


def test_time_unit_reads_a_log_of_milliseconds(tmp_path: Path) -> None:
    """RetailRocket's events.csv (milliseconds) lost every row from the CLI until
    the user rewrote its time column."""
    log = tmp_path / "events.csv"
    rows = [
        f"{u},{i},{1433221332117 + 1000 * n}"
        for n, (u, i) in enumerate(
            [(u, i) for u in range(30) for i in range(u % 7, u % 7 + 6)]
        )
    ]
    log.write_text("visitorid,itemid,timestamp\n" + "\n".join(rows) + "\n")
    columns = ["--user-col", "visitorid", "--item-col", "itemid"]
    before = runner.invoke(app, ["data", "describe", str(log), *columns, "--json"])
    assert json.loads(before.stdout)["report"]["rejected"] == {
        "timestamp_not_in_seconds": 180
    }
    read = runner.invoke(
        app, ["data", "describe", str(log), *columns, "--time-unit", "ms", "--json"]
    )
    assert read.exit_code == 0, read.output
    summary = json.loads(read.stdout)
    assert summary["num_interactions"] == 180 and summary["report"]["rejected"] == {}
    out = tmp_path / "split"
    split = runner.invoke(
        app,
        ["data", "split", str(log), *columns, "--time-unit", "ms", "--out", str(out)],
    )
    assert split.exit_code == 0, split.output
    train = pl.read_parquet(next(out.glob("train*")))
    assert train["timestamp"].min() >= 1433221332
    assert train["timestamp"].max() < 1433221332 + 180
    bad = runner.invoke(
        app, ["data", "describe", str(log), *columns, "--time-unit", "sec"]
    )
    assert "should be one of ['s', 'ms', 'us', 'ns']" in str(bad.exception)


def test_weight_values_from_the_command_line(tmp_path: Path) -> None:
    """`--weight-values`: a column of event types weighs the rows in training, in
    the saved config (so `evaluate` rebuilds the split) and in `data split`."""
    log = tmp_path / "events.csv"
    generated = generate(num_users=40, num_items=30, num_interactions=600)
    kinds = ["view", "view", "view", "addtocart", "transaction"]
    generated.interactions.with_columns(
        event=pl.Series([kinds[n % 5] for n in range(600)])
    ).drop("rating").write_csv(log)
    values = [
        "--weight-col",
        "event",
        "--weight-values",
        "view=1,addtocart=3,transaction=5",
    ]
    described = runner.invoke(app, ["data", "describe", str(log), *values, "--json"])
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["weights"]["max"] == 5 and summary["report"]["rejected"] == {}
    split = runner.invoke(
        app, ["data", "split", str(log), *values, "--out", str(tmp_path / "s")]
    )
    assert split.exit_code == 0, split.output
    train = pl.read_parquet(tmp_path / "s" / "train.parquet")
    assert set(train["weight"].unique().to_list()) == {1.0, 3.0, 5.0}
    run = tmp_path / "run"
    saved = train_retrieval(log, values, run)
    assert saved["weight_values"] == ["view=1", "addtocart=3", "transaction=5"]
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0
    bad = runner.invoke(
        app,
        [
            "data",
            "describe",
            str(log),
            "--weight-col",
            "event",
            "--weight-values",
            "view",
        ],
    )
    assert bad.exit_code == 2
    assert "value=weight pairs" in " ".join(re.sub("[│╭╮╰╯─]", " ", bad.output).split())


def test_column_names_read_a_headerless_log(tmp_path: Path) -> None:
    """Amazon's ratings CSVs and Taobao's UserBehavior.csv have no header: the CLI
    read their first row as the column names, and had no way to name them."""
    log = tmp_path / "ratings.csv"
    generated = generate(num_users=40, num_items=30, num_interactions=600)
    generated.interactions.select(
        "user_id", "item_id", "rating", "timestamp"
    ).write_csv(log, include_header=False)
    names = ["--column-names", "user,item,stars,ts", "--user-col", "user"]
    names += ["--item-col", "item", "--rating-col", "stars", "--time-col", "ts"]
    described = runner.invoke(app, ["data", "describe", str(log), *names, "--json"])
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["num_interactions"] == 600 and summary["report"]["rejected"] == {}
    run = tmp_path / "run"
    saved = train_retrieval(log, names, run)
    assert saved["column_names"] == ["user", "item", "stars", "ts"]
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0  # read alike
    unnamed = runner.invoke(app, ["data", "describe", str(log)])
    assert "reads its first row as names" in str(unnamed.exception)


def test_minimum_rows_per_user_and_item(tmp_path: Path) -> None:
    """`--min-user-rows` / `--min-item-rows` (the 5-core of the literature): users
    with one row had to be dropped by hand before any run, and nothing said how many."""
    log = tmp_path / "log.csv"
    generate(num_users=80, num_items=60, num_interactions=1200).interactions.write_csv(
        log
    )
    core = ["--min-user-rows", "12", "--min-item-rows", "8"]
    described = runner.invoke(app, ["data", "describe", str(log), *core, "--json"])
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    removed = summary["filtered"]
    assert removed["rows"] == 1200 - summary["num_interactions"] > 0
    assert summary["interactions_per_user"]["min"] >= 12
    assert summary["interactions_per_item"]["min"] >= 8
    out = tmp_path / "split"
    split = runner.invoke(app, ["data", "split", str(log), *core, "--out", str(out)])
    assert split.exit_code == 0, split.output
    rows = pl.concat(
        [pl.read_parquet(out / f"{side}.parquet") for side in ("train", "test")]
    )
    assert rows.height == summary["num_interactions"]
    saved = train_retrieval(log, core, tmp_path / "run")
    assert (saved["min_user_rows"], saved["min_item_rows"]) == (12, 8)
    # `evaluate` rebuilds the filtered split (its vocabularies match it).
    assert runner.invoke(app, ["evaluate", str(tmp_path / "run")]).exit_code == 0
    # A streamed describe keeps the same rows (it refused the options before).
    parquet = tmp_path / "log.parquet"
    pl.read_csv(log).write_parquet(parquet, row_group_size=300)
    streamed = runner.invoke(
        app, ["data", "describe", str(parquet), "--stream", *core, "--json"]
    )
    assert streamed.exit_code == 0, streamed.output
    read = json.loads(streamed.stdout)
    assert read["filtered"] == removed
    assert read["num_interactions"] == summary["num_interactions"]
    assert read["report"]["rows_read"] == 1200


def test_duplicates_policy_from_the_command_line(tmp_path: Path) -> None:
    """`--duplicates`: `data describe` counted rows logged twice, and nothing on the
    command line could drop them."""
    log = tmp_path / "log.csv"
    data = generate(num_users=50, num_items=40, num_interactions=800).interactions
    pl.concat([data, data.head(30)]).write_csv(log)  # 30 rows logged twice
    counted = runner.invoke(app, ["data", "describe", str(log), "--json"])
    assert json.loads(counted.stdout)["duplicate_rows"] >= 30
    first = runner.invoke(
        app, ["data", "describe", str(log), "--duplicates", "first", "--json"]
    )
    summary = json.loads(first.stdout)
    assert summary["duplicate_rows"] == 0
    assert summary["report"]["rejected"]["duplicate"] >= 30
    saved = train_retrieval(log, ["--duplicates", "last"], tmp_path / "run")
    assert saved["duplicates"] == "last"
    refused = runner.invoke(
        app, ["data", "describe", str(log), "--duplicates", "error"]
    )
    assert "duplicates='error' was requested" in str(refused.exception)


def test_describe_stream_reads_time_format(tmp_path: Path) -> None:
    """A streamed describe rejected dates written as numbers with a hint to pass
    --time-format, which --stream then refused."""
    log = tmp_path / "days.parquet"
    days = pl.Series([20240301, 20240302, 20240303] * 20)
    data = generate(num_users=20, num_items=30, num_interactions=60).interactions
    data.with_columns(timestamp=days).write_parquet(log, row_group_size=25)
    plain = runner.invoke(app, ["data", "describe", str(log), "--stream", "--json"])
    assert json.loads(plain.stdout)["report"]["rejected"] == {
        "timestamp_as_date_number": 60
    }
    dated = ["--stream", "--time-format", "%Y%m%d", "--json"]
    summary = json.loads(
        runner.invoke(app, ["data", "describe", str(log), *dated]).stdout
    )
    assert summary["report"]["rejected"] == {} and summary["num_interactions"] == 60
    assert summary["time_range"]["max"] == "2024-03-03 00:00:00"


def test_quote_char_none_reads_quotes_as_text(tmp_path: Path) -> None:
    """Last.fm's TSV dumps hold artists such as `"Weird Al" Yankovic`: a field that
    starts with a quote was a bad_quoting row, and the CLI had no way to say that
    quotes are text."""
    log = tmp_path / "plays.tsv"
    data = generate(num_users=40, num_items=30, num_interactions=600).interactions
    artist = pl.Series(
        ["Deep Dish", '"Weird Al" Yankovic', 'The "Best" Band', '"Lonely'] * 150
    )
    data.with_columns(artist=artist).write_csv(log, separator="\t", quote_style="never")
    quoted = runner.invoke(app, ["data", "describe", str(log), "--json"])
    report = json.loads(quoted.stdout)["report"]
    assert report["rejected"].get("bad_quoting", 0) > 0
    assert "--quote-char none" in " ".join(
        re.sub("[│╭╮╰╯─]", " ", quoted.stderr).split()
    )
    as_text = ["--quote-char", "none", "--item-features", "artist"]
    described = runner.invoke(app, ["data", "describe", str(log), *as_text, "--json"])
    summary = json.loads(described.stdout)
    assert summary["num_interactions"] == 600 and summary["report"]["rejected"] == {}
    split = runner.invoke(
        app,
        ["data", "split", str(log), "--quote-char", "none", "--out", str(tmp_path)],
    )
    assert split.exit_code == 0, split.output
    run = tmp_path / "run"
    saved = train_retrieval(log, as_text, run)
    assert saved["quote_char"] == ""
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0  # read alike
    info = runner.invoke(app, ["info", str(run)])
    assert "quote_char=none" in info.stdout
    two_chars = ["--set", "data.quote_char=ab", "--out", str(tmp_path / "r")]
    two = runner.invoke(app, ["train", "retrieval", "--dataset", str(log), *two_chars])
    assert "one character" in str(two.exception)
    streamed = runner.invoke(
        app, ["data", "describe", str(log), "--stream", "--quote-char", "none"]
    )
    assert streamed.exit_code == 2


def test_comment_prefix_from_the_command_line(tmp_path: Path) -> None:
    """KONECT's ratings files open with '%' lines: the second one, '% 600 40 30',
    was read as a row of user '%', rating 40; the CLI could not skip them."""
    log = tmp_path / "out.ratings"
    data = generate(num_users=40, num_items=30, num_interactions=600).interactions
    head = "% bip weighted\n% 600 40 30\n"
    rows = data.select("user_id", "item_id", "rating", "timestamp")
    log.write_text(head + rows.write_csv(separator=" ", include_header=False))
    names = ["--column-names", "user_id,item_id,rating,timestamp"]
    plain = runner.invoke(app, ["data", "describe", str(log), *names, "--json"])
    read_plainly = json.loads(plain.stdout)
    assert read_plainly["report"]["rejected"] == {"wrong_field_count": 1}
    assert read_plainly["num_interactions"] == 601  # with user '%'
    assert "--comment-prefix '%'" in " ".join(
        re.sub("[│╭╮╰╯─]", " ", plain.stderr).split()
    )
    skip = [*names, "--comment-prefix", "%"]
    described = runner.invoke(app, ["data", "describe", str(log), *skip])
    assert "No bad rows" in described.stdout
    assert "2 comment line(s) skipped" in " ".join(described.stdout.split())
    run = tmp_path / "run"
    saved = train_retrieval(log, skip, run)
    assert saved["comment_prefix"] == "%"
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0  # read alike
    assert "comment_prefix=%" in runner.invoke(app, ["info", str(run)]).stdout
    streamed = runner.invoke(
        app, ["data", "describe", str(log), "--stream", "--comment-prefix", "%"]
    )
    assert streamed.exit_code == 2


def test_the_log_s_quote_char_and_comment_prefix_read_its_tables_too(
    tmp_path: Path,
) -> None:
    """A dump has one dialect: `--quote-char none` and `--comment-prefix` reached
    the log but not its feature tables, where a name starting with a quote was still
    a bad_quoting row (whose hint named the option already given) and a comment
    line was read as the header."""
    from twostage.config import DataConfig
    from twostage.data.registry import read_side_tables

    log = tmp_path / "plays.tsv"
    data = generate(num_users=40, num_items=30, num_interactions=600).interactions
    data.select("user_id", "item_id", "rating").write_csv(log, separator="\t")
    item_ids = data["item_id"].unique().sort()
    artists = [f'"Weird {i}" Band' if i % 3 else f"Band {i}" for i in range(30)]
    items = tmp_path / "artists.tsv"
    pl.DataFrame({"item_id": item_ids, "artist": artists}).write_csv(
        items, separator="\t", quote_style="never"
    )
    user_ids = data["user_id"].unique().sort()
    countries = pl.DataFrame({"user_id": user_ids, "country": ["NO", "FI"] * 20})
    users = tmp_path / "profiles.tsv"
    users.write_text("# profiles, 2026\n" + countries.write_csv(separator="\t"))
    tables = ["--item-table", str(items), "--user-table", str(users)]
    dialect = ["--quote-char", "none", "--comment-prefix", "#"]
    described = runner.invoke(app, ["data", "describe", str(log), *tables, *dialect])
    assert described.exit_code == 0, described.output
    said = " ".join(described.stderr.split())
    assert "30 of 30 item_id values have features" in said, said
    assert "40 of 40 user_id values have features" in said, said
    assert "bad_quoting" not in said
    config = DataConfig(
        item_table=str(items), user_table=str(users), quote_char="", comment_prefix="#"
    )
    people, catalogue = read_side_tables(config)
    assert people is not None and catalogue is not None
    assert people.height == 40 and people.columns == ["user_id", "country"]
    assert catalogue["artist"].to_list() == artists


def test_unrated_values_from_the_command_line(tmp_path: Path) -> None:
    """Goodreads' and Book-Crossing's logs rate 0 for 'not rated': only `--set
    data.unrated_values=0` on `train` said so, and `data describe` counted the
    zeros as ratings without a word."""
    log = tmp_path / "goodreads_interactions.csv"
    data = generate(num_users=50, num_items=40, num_interactions=800).interactions
    data.with_columns(
        rating=pl.when(pl.col("item_id") % 3 == 0).then(0.0).otherwise("rating")
    ).write_csv(log)
    zeros = data.filter(pl.col("item_id") % 3 == 0).height
    plain = runner.invoke(app, ["data", "describe", str(log)])
    assert "--unrated-values 0" in " ".join(plain.stdout.split())
    described = runner.invoke(
        app, ["data", "describe", str(log), "--unrated-values", "0", "--json"]
    )
    summary = json.loads(described.stdout)
    assert summary["unrated_rows"] == zeros and "0" not in summary["rating_histogram"]
    assert summary["num_interactions"] == 800
    saved = train_retrieval(log, ["--unrated-values", "0"], tmp_path / "run")
    assert saved["unrated_values"] == [0.0]
    info = runner.invoke(app, ["info", str(tmp_path / "run")])
    assert "unrated_values=0.0" in info.stdout
    bad = runner.invoke(app, ["data", "describe", str(log), "--unrated-values", "x"])
    assert bad.exit_code == 2
    ones = tmp_path / "ones.csv"  # implicit feedback written as a rating of 1
    data.with_columns(rating=pl.lit(1.0)).write_csv(ones)
    said = runner.invoke(app, ["data", "describe", str(ones)])
    assert "Every rating is 1: an implicit log" in " ".join(said.stdout.split())
    anime = tmp_path / "rating.csv"  # Kaggle's Anime ratings: -1 is "watched"
    data.with_columns(
        rating=pl.when(pl.col("item_id") % 3 == 0).then(-1.0).otherwise("rating")
    ).write_csv(anime)
    minus = runner.invoke(app, ["data", "describe", str(anime)])
    assert "--unrated-values -1 keeps" in " ".join(minus.stdout.split())
    read = runner.invoke(
        app, ["data", "describe", str(anime), "--unrated-values", "-1", "--json"]
    )
    assert json.loads(read.stdout)["unrated_rows"] == zeros


def test_missing_ratings_from_the_command_line(tmp_path: Path) -> None:
    """`--missing-ratings unrated`: a log of purchases and reviews lost its
    purchases (no rating) as bad rows, in every command."""
    log = tmp_path / "shop.csv"
    data = generate(num_users=50, num_items=40, num_interactions=800).interactions
    data.with_columns(
        rating=pl.when(pl.col("item_id") % 3 == 0).then(None).otherwise("rating")
    ).write_csv(log)
    missing = data.filter(pl.col("item_id") % 3 == 0).height
    dropped = json.loads(
        runner.invoke(app, ["data", "describe", str(log), "--json"]).stdout
    )
    assert dropped["report"]["rejected"] == {"bad_rating": missing}
    option = ["--missing-ratings", "unrated"]
    kept = json.loads(
        runner.invoke(app, ["data", "describe", str(log), *option, "--json"]).stdout
    )
    assert kept["num_interactions"] == 800 and kept["unrated_rows"] == missing
    split = runner.invoke(
        app, ["data", "split", str(log), *option, "--out", str(tmp_path / "s")]
    )
    assert split.exit_code == 0, split.output
    saved = train_retrieval(log, option, tmp_path / "run")
    assert saved["missing_ratings"] == "unrated"
    assert runner.invoke(app, ["evaluate", str(tmp_path / "run")]).exit_code == 0


def test_strict_stops_with_line_number(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("uid,iid\n1,10\n2,\n")
    result = runner.invoke(
        app,
        [
            "data",
            "describe",
            str(path),
            "--user-col",
            "uid",
            "--item-col",
            "iid",
            "--strict",
        ],
        catch_exceptions=True,
    )
    assert result.exit_code != 0
    assert ":3:" in str(result.exception) or ":3:" in result.output


def test_split_writes_disjoint_parquet(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "data",
            "split",
            "synthetic:num_interactions=2000",
            "--out",
            str(tmp_path),
            "--method",
            "temporal",
            "--test-fraction",
            "0.25",
        ],
    )
    assert result.exit_code == 0, result.output
    train = pl.read_parquet(tmp_path / "train.parquet")
    test = pl.read_parquet(tmp_path / "test.parquet")
    assert train.height + test.height == 2000
    assert train["timestamp"].max() < test["timestamp"].min()
    # Options a method does not read were ignored: leave-last-out held out one row
    # a user whatever --test-fraction said.
    for method, flag, value in (
        ("leave-last-out", "--test-fraction", "0.5"),
        ("temporal", "--seed", "3"),
    ):
        ignored = runner.invoke(
            app,
            [
                *("data", "split", "synthetic:num_interactions=2000"),
                *("--out", str(tmp_path / "x"), "--method", method, flag, value),
            ],
        )
        assert ignored.exit_code == 2 and flag in ignored.output, ignored.output
    assert not (tmp_path / "x").exists()
    # A second split into the same --out replaced the files a run may have been
    # trained on, without a word.
    before = (tmp_path / "test.parquet").read_bytes()
    again = [*("data", "split", "synthetic:num_interactions=3000", "--out")]
    refused = runner.invoke(app, [*again, str(tmp_path)], env={"COLUMNS": "200"})
    assert refused.exit_code == 2 and "already holds a split" in refused.output
    assert (tmp_path / "test.parquet").read_bytes() == before
    replaced = runner.invoke(app, [*again, str(tmp_path), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert pl.read_parquet(tmp_path / "train.parquet").height == 2400


def test_unknown_dataset_is_a_clear_error() -> None:
    result = runner.invoke(app, ["data", "describe", "no-such-dataset.csv"])
    assert result.exit_code != 0
    assert "no such file" in str(result.exception)


SYNTHETIC = "synthetic:num_users=150,num_items=60,num_interactions=3000"
SMALL_TRAINING = [
    *("--set", "train.epochs=2", "--set", "train.batch_size=256"),
    *("--set", "train.num_threads=1", "--set", "retrieval.embedding_dim=16"),
    *("--set", "retrieval.output_dim=16", "--set", "retrieval.history_length=20"),
]


def train_retrieval(log: Path, options: list[str], out: Path) -> dict[str, Any]:
    """`train retrieval` of ``log`` with ``options`` into ``out`` (small settings);
    the data section of the config it saved."""
    command = ["train", "retrieval", "--dataset", str(log), *options]
    trained = runner.invoke(app, [*command, "--out", str(out), *SMALL_TRAINING])
    assert trained.exit_code == 0, trained.output
    return dict(json.loads((out / "config.json").read_text())["data"])


@pytest.mark.slow
def test_evaluate_bundle_covers_both_stages(tmp_path: Path) -> None:
    models = tmp_path / "models" / "synthetic"
    trained = runner.invoke(
        app,
        ["train", "--dataset", SYNTHETIC, "--out", str(models / "1"), *SMALL_TRAINING],
    )
    assert trained.exit_code == 0, trained.output
    printed = re.search(r"RMSE ([\d.]+), MAE ([\d.]+), AUC ([\d.]+)", trained.output)
    assert printed is not None, trained.output
    # ... and the served list's figures, which only `evaluate` printed before.
    said = " ".join(trained.output.split())
    served_line = re.search(
        r"The list a user gets \(retrieval, then the ranker's order\): "
        r"ndcg@10 ([\d.]+), recall@10 ([\d.]+), hit_rate@10 ([\d.]+) "
        r"\(NDCG@10's standard error ([\d.]+)\)",
        said,
    )
    assert served_line is not None, said
    # The model directory: its newest version is evaluated.
    users = tmp_path / "users.csv"
    figures = runner.invoke(
        app,
        ["evaluate", str(models), "--baselines", "--json", "--per-user", str(users)],
    )
    assert figures.exit_code == 0, figures.output
    saved = json.loads(figures.stdout)
    baselines = {
        "popularity",
        "ease",
        "itemknn",
        "recent-popularity",
        "transition",
        "session-knn",
        "ease-recency",
    }
    assert {"twostage", *baselines} <= set(saved["retrieval"])
    ranking = saved["ranking"]
    # The served list against each baseline, the difference's standard error
    # paired over the same test users.
    standing = saved["standing"]
    assert set(standing) == set(saved["retrieval"]) - {"twostage"}
    served = ranking["two_stage"]["ndcg"]["10"]
    lists = ranking["two_stage"]
    assert [float(v) for v in served_line.groups()] == [
        round(lists["ndcg"]["10"], 4),
        round(lists["recall"]["10"], 4),
        round(lists["hit_rate"]["10"], 4),
        round(ranking["standard_errors"]["two_stage"]["ndcg"]["10"], 4),
    ]
    for name, row in standing.items():
        theirs = saved["retrieval"][name]
        assert (row["served"], row["baseline"]) == (
            served,
            theirs["metrics"]["exclude_seen"]["ndcg"]["10"],
        )
        unpaired = math.hypot(
            ranking["standard_errors"]["two_stage"]["ndcg"]["10"],
            theirs["standard_errors"]["exclude_seen"]["ndcg"]["10"],
        )
        assert 0 < row["paired_standard_error"] < unpaired, name
    rec = load(models / "1")
    split = rebuild_split(rec.run, source=models / "1")
    ease = evaluate_baselines(rec.run, split.test, names=("ease",), keep_queries=True)
    lists = evaluate_ranking(rec.ranker, split.test, keep_queries=True)["queries"]
    assert standing["ease"]["paired_standard_error"] == pytest.approx(
        paired_standard_error(lists["two_stage"], ease["ease"].queries["exclude_seen"])
    )
    # --per-user: a row per test user and list, whose means are the figures.
    per_user = pl.read_csv(users)
    assert saved["per_user"]["rows"] == per_user.height
    models_written = set(per_user["model"])
    assert models_written == {"two_stage", *saved["retrieval"]}
    for name in models_written:
        rows = per_user.filter(pl.col("model") == name)
        assert rows.height == saved["per_user"]["queries"]
        if name == "two_stage":
            want = ranking["two_stage"]["ndcg"]["10"]
        else:
            want = saved["retrieval"][name]["metrics"]["exclude_seen"]["ndcg"]["10"]
        assert rows["ndcg@10"].mean() == pytest.approx(want, rel=1e-5), name
    # Each row is its user's: the served list `recommend` gives them, against
    # their test items less those they trained on.
    served = per_user.filter(pl.col("model") == "two_stage")
    recalls = []
    for row in served.head(8).iter_rows(named=True):
        user = pl.col("user_id") == row["user_id"]
        trained = set(split.train.interactions.filter(user)["item_id"])
        wanted = set(split.test.interactions.filter(user)["item_id"]) - trained
        listed = {e["item_id"] for e in rec.recommend(row["user_id"], 10).items}
        assert row["recall@10"] == pytest.approx(len(listed & wanted) / len(wanted))
        recalls.append(row["recall@10"])
    assert len(set(recalls)) > 1, recalls
    again = runner.invoke(
        app, ["evaluate", str(models), "--per-user", str(users)]
    )  # the file is kept
    assert again.exit_code == 2 and "--overwrite" in again.output, again.output
    assert 0 < ranking["mae"] <= ranking["rmse"] < 4  # ratings are 1..5
    assert 0.5 < ranking["auc"] <= 1
    for name in ("retrieval_only", "two_stage"):
        for metric in ("ndcg", "hit_rate"):
            assert 0 < ranking[name][metric]["10"] <= 1, (name, metric)
    # The test split rebuilt from the saved config is the one `train` evaluated on.
    for value, key in zip(printed.groups(), ("rmse", "mae", "auc"), strict=True):
        assert float(value) == pytest.approx(ranking[key], abs=1e-4), key
    result = runner.invoke(app, ["evaluate", str(models)])  # the tables
    assert result.exit_code == 0, result.output
    for text in ("Ranking stage", "RMSE", "AUC", "NDCG@10", "HR@10", "two stage"):
        assert text in result.output, text
    for key in ("rmse", "mae", "auc"):
        assert f"{ranking[key]:.4f}" in result.output, key
    two_stage = ranking["two_stage"]["ndcg"]["10"]
    assert f"{two_stage:.4f}" in result.output


def test_evaluate_retrieval_only_bundle_and_missing_data(tmp_path: Path) -> None:
    log = tmp_path / "log.parquet"
    generate(
        num_users=120, num_items=50, num_interactions=2000
    ).interactions.write_parquet(log)
    bundle = tmp_path / "models" / "mine" / "1"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"ranking": {"ease_weight": 0.5}}))
    trained = runner.invoke(
        app,
        [
            *("train", "--dataset", str(log), "--out", str(bundle), "--no-ranking"),
            *SMALL_TRAINING,
            *("--set", "data.time_col=timestamp", "--set", "data.rating_col=rating"),
            *("--set", "ranking.epochs=3", "--config", str(config_file)),
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "no version number" not in trained.output  # models/mine/1 is one
    # Ranking settings with --no-ranking, from --set or a --config file, were
    # passed over without a word.
    assert (
        "--no-ranking: ranking.ease_weight, ranking.epochs not used" in trained.output
    )
    result = runner.invoke(app, ["evaluate", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "R@10" in result.output and "Ranking stage" not in result.output
    log.unlink()  # the data the bundle names is gone: say so, and how to fix it
    result = runner.invoke(app, ["evaluate", str(bundle)])
    assert isinstance(result.exception, DataError), result.output
    message = str(result.exception)
    assert "cannot rebuild the test split" in message and str(log) in message
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, ArtifactError)
    assert "twostage train retrieval" in str(result.exception)


def test_every_reading_command_takes_a_run_a_bundle_or_a_model_dir(
    tmp_path: Path,
) -> None:
    """Regression: `recommend` refused the output of `train retrieval`, and the Python
    `load` refused `models/<name>/`, both of which `evaluate` accepted."""
    from twostage.recommender import load

    run_dir = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", SYNTHETIC),
            *("--out", str(run_dir), *SMALL_TRAINING),
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert (run_dir / "items.parquet").exists()
    models = tmp_path / "models" / "synthetic"
    load(run_dir).save(models / "1")
    user = str(load(run_dir).user_vocab.values[0])
    for target in (run_dir, models, models / "1"):
        rec = load(target)
        assert rec.recommend(int(user), k=5).path == "personalised", target
        result = runner.invoke(app, ["recommend", str(target), "--user", user])
        assert result.exit_code == 0, (target, result.output)
        item = str(rec.item_vocab.values[0])
        result = runner.invoke(app, ["similar", str(target), "--item", item])
        assert result.exit_code == 0, (target, result.output)
    assert load(models).recommend(int(user), k=5) == load(run_dir).recommend(
        int(user), k=5
    )


def test_train_takes_the_column_options_of_train_retrieval(tmp_path: Path) -> None:
    """Regression: `twostage train` had no column options (only --set data.*)."""
    data = generate(num_users=60, num_items=100, num_interactions=1500)
    log = tmp_path / "log.csv"
    data.interactions.rename(
        {"user_id": "uid", "item_id": "isbn", "rating": "stars", "timestamp": "ts"}
    ).write_csv(log)
    bundle = tmp_path / "models" / "mine"
    result = runner.invoke(
        app,
        [
            *("train", "--dataset", str(log), "--out", str(bundle)),
            *("--user-col", "uid", "--item-col", "isbn", "--rating-col", "stars"),
            *("--time-col", "ts", "--set", "ranking.epochs=1"),
            *("--tensorboard", str(tmp_path / "tb")),
            *SMALL_TRAINING,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "RMSE" in result.output
    # Saved at models/mine, not models/mine/1: `serve models` would not find it
    # and add-items would have no version to follow, so the command says so.
    said = "".join(result.output.split())  # a long path may wrap anywhere
    assert "noversionnumber:`twostageserve`serves" in said
    assert f"--out{bundle / '1'}wouldhavemadeone" in said
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # both stages' curves
    saved = json.loads((bundle / "config.json").read_text())["data"]
    assert (saved["user_col"], saved["item_col"], saved["rating_col"]) == (
        "uid",
        "isbn",
        "stars",
    )


def test_an_empty_time_col_reaches_training(tmp_path: Path) -> None:
    """Regression: `--time-col ""` (file order, as --help says) was dropped on its
    way into the config, so training still read the `timestamp` column."""
    data = generate(num_users=60, num_items=100, num_interactions=1500)
    log = tmp_path / "log.csv"
    # One time for every row: a temporal split of these times has nothing to train
    # on, the file's order has.
    data.interactions.with_columns(pl.lit(1_600_000_000).alias("timestamp")).write_csv(
        log
    )
    args = [
        *("train", "retrieval", "--dataset", str(log), "--out", str(tmp_path / "run")),
        *("--set", "data.split=temporal", *SMALL_TRAINING),
    ]
    tied = runner.invoke(app, args)
    assert isinstance(tied.exception, DataError)
    assert "1 distinct timestamp" in str(tied.exception)
    result = runner.invoke(app, [*args, "--time-col", ""])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert saved["time_col"] == ""


def test_a_relative_log_path_is_saved_so_evaluate_finds_it_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `--dataset log.csv` was saved as written, so `twostage evaluate`
    from another directory could not rebuild the split."""
    data = generate(num_users=60, num_items=100, num_interactions=1500)
    (tmp_path / "logs").mkdir()
    data.interactions.write_csv(tmp_path / "logs" / "log.csv")
    monkeypatch.chdir(tmp_path / "logs")
    run = tmp_path / "run"
    args = ["train", "retrieval", "--dataset", "log.csv", "--out", str(run)]
    result = runner.invoke(app, [*args, *SMALL_TRAINING])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())["data"]["dataset"]
    assert saved == str((tmp_path / "logs" / "log.csv").resolve())
    monkeypatch.chdir(tmp_path)
    evaluated = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert evaluated.exit_code == 0, evaluated.output


def test_a_config_s_own_log_is_trained_without_dataset(tmp_path: Path) -> None:
    """Regression: `--dataset` defaulted to movielens-100k over the `--config`'s
    `data.dataset`, so a saved run's config (with its column names) trained
    MovieLens, or stopped at the column options it carried."""
    data = generate(num_users=60, num_items=100, num_interactions=1500)
    log = tmp_path / "log.csv"
    data.interactions.rename({"user_id": "uid", "item_id": "isbn"}).write_csv(log)
    first, second = tmp_path / "run1", tmp_path / "run2"
    args = [*("--user-col", "uid", "--item-col", "isbn"), *SMALL_TRAINING]
    result = runner.invoke(
        app, ["train", "retrieval", "--dataset", str(log), "--out", str(first), *args]
    )
    assert result.exit_code == 0, result.output
    config = str(first / "config.json")
    again = runner.invoke(
        app, ["train", "retrieval", "--config", config, "--out", str(second)]
    )
    assert again.exit_code == 0, again.output
    saved = json.loads((second / "config.json").read_text())["data"]
    assert (saved["dataset"], saved["user_col"]) == (str(log.resolve()), "uid")
    both = runner.invoke(
        app,
        [
            "train",
            "--config",
            config,
            "--out",
            str(tmp_path / "models" / "m" / "1"),
            "--set",
            "ranking.epochs=1",
            "--json",
        ],
    )
    assert both.exit_code == 0, both.output
    bundle = json.loads((tmp_path / "models" / "m" / "1" / "config.json").read_text())
    assert bundle["data"]["dataset"] == str(log.resolve())


def test_an_existing_bundle_is_refused_before_training(tmp_path: Path) -> None:
    """Regression: `train --out` onto an existing version trained in full and was
    refused only at the save; `train retrieval`, `report` and `data split` with
    `--out` a bundle wrote their files into it, which then failed verification."""
    bundle = tmp_path / "models" / "m" / "1"
    args = ["--dataset", "synthetic:num_users=60,num_items=100,num_interactions=1500"]
    first = runner.invoke(
        app,
        [
            *("train", *args, "--out", str(bundle)),
            *("--set", "ranking.epochs=1", *SMALL_TRAINING),
        ],
    )
    assert first.exit_code == 0, first.output
    files = sorted(p.name for p in bundle.iterdir())
    again = runner.invoke(app, ["train", *args, "--out", str(bundle)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert "retrieval" not in again.output  # no training began
    into = runner.invoke(app, ["train", "retrieval", *args, "--out", str(bundle)])
    assert into.exit_code == 2 and "is a saved bundle version" in " ".join(
        into.output.split()
    )
    for flag in ("--work-dir", "--tensorboard"):
        beside = runner.invoke(
            app, ["train", *args, "--out", str(bundle.parent / "2"), flag, str(bundle)]
        )
        assert beside.exit_code == 2 and flag in beside.output
    report = runner.invoke(app, ["report", str(bundle), "--out", str(bundle)])
    assert "is a saved bundle version" in str(report.exception)
    split = runner.invoke(app, ["data", "split", args[1], "--out", str(bundle)])
    assert "is a saved bundle version" in str(split.exception)
    assert sorted(p.name for p in bundle.iterdir()) == files
    recommended = runner.invoke(app, ["recommend", str(bundle.parent), "--user", "1"])
    assert recommended.exit_code == 0, recommended.output


def test_ids_with_leading_zeros_are_found_from_the_command_line(
    tmp_path: Path,
) -> None:
    """Regression: `--item 0829433244` (an ISBN) was read as the integer 829433244,
    so no string catalogue could be asked about such an item."""
    data = generate(num_users=60, num_items=100, num_interactions=1500)
    log = tmp_path / "books.csv"
    data.interactions.with_columns(
        pl.format("0{}", pl.col("item_id")).alias("item_id")  # "042", "0117"...
    ).write_csv(log)
    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", str(log), "--out", str(run)),
            *SMALL_TRAINING,
        ],
    )
    assert trained.exit_code == 0, trained.output
    from twostage.recommender import load

    item = next(i for i in load(run).item_vocab.values.to_list() if i.startswith("0"))
    similar = runner.invoke(app, ["similar", str(run), "--item", item, "--json"])
    assert similar.exit_code == 0, similar.output
    assert json.loads(similar.stdout)["item_id"] == item
    session = runner.invoke(app, ["recommend", str(run), "--session", item, "--json"])
    assert session.exit_code == 0 and json.loads(session.stdout)["path"] == "session"
    # One item only: repeated, the last would have won silently.
    twice = runner.invoke(app, ["similar", str(run), "--item", item, "--item", item])
    said = " ".join(twice.output.replace("│", " ").split())
    assert twice.exit_code == 2 and "--item: given 2 times" in said, said


def test_training_reads_the_files_data_split_writes(tmp_path: Path) -> None:
    """Regression: `data split` wrote files that no training command read."""
    data = generate(num_users=60, num_items=100, num_interactions=1500)
    log = tmp_path / "log.csv"
    data.interactions.write_csv(log)
    split = tmp_path / "split"
    mapping = ("--time-col", "timestamp", "--rating-col", "rating")
    done = runner.invoke(
        app,
        [
            "data",
            "split",
            str(log),
            "--method",
            "temporal",
            "--out",
            str(split),
            *list(mapping),
        ],
    )
    assert done.exit_code == 0, done.output
    test = pl.read_parquet(split / "test.parquet")
    new_item = test.head(1).with_columns(
        pl.lit(10**6, test["item_id"].dtype).alias("item_id")
    )
    new_user = test.head(1).with_columns(
        pl.lit(10**6, test["user_id"].dtype).alias("user_id")
    )
    test = pl.concat([test, new_item, new_user])
    test.write_parquet(split / "test.parquet")
    bundle = tmp_path / "models" / "mine" / "1"
    result = runner.invoke(
        app,
        [
            *("train", "--dataset", str(log), *mapping, "--out", str(bundle)),
            *("--train", str(split / "train.parquet")),
            *("--test", str(split / "test.parquet")),
            *("--set", "ranking.epochs=1", *SMALL_TRAINING),
        ],
    )
    assert result.exit_code == 0, result.output
    # Who the figures are about: the temporal split's test holds users and an
    # item training never saw, and the output said nothing of them.
    trained_users = set(pl.read_parquet(split / "train.parquet")["user_id"])
    cold = set(test["user_id"]) - trained_users
    assert 10**6 in cold
    said = " ".join(result.output.split())  # as wrapped at any terminal width
    assert f"{len(cold)} not in training, answered as cold starts" in said
    assert "1 test (user, item) pair with an item not in training" in said
    saved = json.loads((bundle / "metrics.json").read_text())
    per_user = saved["counts"]["include_seen"]["num_queries"]
    assert per_user == test["user_id"].n_unique()  # the file's test users
    config = json.loads((bundle / "config.json").read_text())["data"]
    assert config["test_file"].endswith("test.parquet")
    # Half a split is a clear error.
    half = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            str(log),
            "--out",
            str(tmp_path / "x" / "1"),
            "--train",
            str(split / "train.parquet"),
            *SMALL_TRAINING,
        ],
    )
    assert "go together" in str(half.exception)


def test_weight_col_reaches_split_files_and_training(tmp_path: Path) -> None:
    """Regression: the CLI had no way to name a weight column but `--set`, `data
    split` dropped the weights, and a run trained on split files read none of the
    log's weights without a word."""
    from twostage.data.registry import load_dataset_for
    from twostage.data.split import prepare_split

    data = generate(num_users=60, num_items=100, num_interactions=1500)
    log = tmp_path / "log.csv"
    rows = data.interactions.with_columns(
        (pl.int_range(pl.len()) % 7).cast(pl.Int64).alias("plays")
    )
    rows.write_csv(log)
    described = runner.invoke(
        app, ["data", "describe", str(log), "--weight-col", "plays", "--json"]
    )
    assert described.exit_code == 0, described.output
    weights = json.loads(described.stdout)["weights"]
    assert weights["max"] == 6 and weights["zero"] == rows["plays"].eq(0).sum()
    split = tmp_path / "split"
    done = runner.invoke(
        app, ["data", "split", str(log), "--out", str(split), "--weight-col", "plays"]
    )
    assert done.exit_code == 0, done.output
    keys = ["user_id", "item_id", "timestamp"]
    written = pl.concat(
        [
            pl.read_parquet(split / "train.parquet"),
            pl.read_parquet(split / "test.parquet"),
        ]
    )
    joined = written.join(rows.select(*keys, "plays"), on=keys)
    assert joined.height == rows.height
    assert (joined["weight"] == joined["plays"].cast(pl.Float32)).all()

    def files(*overrides: str) -> ExperimentConfig:
        return apply_overrides(
            ExperimentConfig(),
            [
                f"data.dataset={log}",
                f"data.train_file={split / 'train.parquet'}",
                f"data.test_file={split / 'test.parquet'}",
                *overrides,
            ],
        )

    weighted = files("data.weight_col=plays")
    fitted = prepare_split(load_dataset_for(weighted), weighted).train.interactions
    assert fitted["weight"].sum() > 0 and "weight" in fitted.columns
    plain = files()
    unread = prepare_split(load_dataset_for(plain), plain).train.interactions
    assert "weight" not in unread.columns
    # A split written without weights cannot train a run that asks for them.
    bare = tmp_path / "bare"
    runner.invoke(app, ["data", "split", str(log), "--out", str(bare)])
    result = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", str(log), "--weight-col", "plays"),
            *("--train", str(bare / "train.parquet")),
            *("--test", str(bare / "test.parquet")),
            *("--out", str(tmp_path / "run"), *SMALL_TRAINING),
        ],
    )
    assert result.exit_code != 0
    assert "has no 'weight' column" in str(result.exception)
    assert not (tmp_path / "run").exists()
    # From the CLI the weighted split trains.
    result = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", str(log), "--weight-col", "plays"),
            *("--train", str(split / "train.parquet")),
            *("--test", str(split / "test.parquet")),
            *("--out", str(tmp_path / "run"), *SMALL_TRAINING),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["weight_col"] == "plays"


def test_column_options_for_a_built_in_dataset_are_refused() -> None:
    """Regression: `data describe synthetic --user-col x` ignored the option."""
    result = runner.invoke(app, ["data", "describe", "synthetic", "--user-col", "x"])
    assert result.exit_code != 0
    assert "maps the columns of a log of your own" in " ".join(
        str(result.exception or result.output).split()
    )
    assert (
        runner.invoke(app, ["data", "describe", "synthetic", "--strict"]).exit_code == 0
    )


def test_version_and_help_order() -> None:
    from twostage import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    shown = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    # By step of the work: the demo first, training before serving.
    assert shown.index("demo") < shown.index("train") < shown.index("serve")


def test_recommend_says_when_the_user_is_unknown(tmp_path: Path) -> None:
    """Regression: an unknown user silently got a cold-start list, so a typo in the
    ID went unnoticed."""
    trained = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", SYNTHETIC),
            *("--out", str(tmp_path / "run"), *SMALL_TRAINING),
        ],
    )
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(
        app, ["recommend", str(tmp_path / "run"), "--user", "no-such-user"]
    )
    assert result.exit_code == 0
    assert "not known to this model" in result.output


def test_recommend_for_many_users_into_a_file(models_dir: Path, tmp_path: Path) -> None:
    """Batch scoring: the CLI answered one user at a time, and the Python API only
    as a list of answers."""
    from twostage.recommender import load

    model = models_dir / "synthetic"
    rec = load(model)
    out = tmp_path / "recs.parquet"
    done = runner.invoke(
        app, ["recommend", str(model), "--all-users", "--out", str(out), "-k", "4"]
    )
    assert done.exit_code == 0, done.output
    table = pl.read_parquet(out)
    users = rec.user_vocab.values.to_list()
    assert table.height == 4 * len(users)
    assert table["user_id"].unique(maintain_order=True).to_list() == users
    for user in users[:5]:  # each user's rows are the served list, in order
        rows = table.filter(pl.col("user_id") == user).sort("rank")
        served = rec.recommend(user, 4).items
        assert rows["item_id"].to_list() == [i["item_id"] for i in served]
        assert rows["rank"].to_list() == [1, 2, 3, 4]
        assert rows["score"].to_list() == pytest.approx([i["score"] for i in served])
    # A file of IDs, in its order, repeats and unknown users kept (cold start).
    listed = tmp_path / "users.csv"
    listed.write_text(f"user_id,note\n{users[1]},a\nstranger,b\n{users[1]},c\n")
    csv = tmp_path / "recs.csv"
    done = runner.invoke(
        app,
        ["recommend", str(model), "--users", str(listed), "--out", str(csv), "--json"],
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["users"] == 3 and summary["rows"] == 30
    assert summary["paths"] == {"personalised": 2, "popularity": 1}
    # The users the model does not know are counted: "popularity" alone did not
    # tell them from known users answered by the popularity fallback.
    assert summary["unknown_users"] == 1
    assert summary["first_unknown_users"] == ["stranger"]
    assert "model_user_id_example" not in summary  # some are known
    strangers = tmp_path / "strangers.csv"
    strangers.write_text("user_id\nu-1\nu-2\n")  # IDs of another shape
    said = runner.invoke(
        app,
        [
            "recommend",
            str(model),
            "--users",
            str(strangers),
            "--out",
            str(tmp_path / "s.csv"),
        ],
    )
    assert said.exit_code == 0, said.output
    told = " ".join(said.output.split())
    assert "2 of the 2 users are unknown to the model" in told
    assert f"None is known: the model's user IDs look like {users[0]!r}." in told
    # Lists shorter than -k are counted and the first few users named (a
    # catalogue of 80 items less what each has seen cannot fill 100).
    long = runner.invoke(
        app,
        [
            *("recommend", str(model), "--users", str(listed), "-k", "100"),
            *("--out", str(tmp_path / "long.csv"), "--json"),
        ],
    )
    assert long.exit_code == 0, long.output
    summary = json.loads(long.stdout)
    assert summary["short_lists"] == 3  # the catalogue is 80 items
    assert summary["first_short_lists"] == [users[1], "stranger", users[1]]
    said = runner.invoke(
        app,
        [
            *("recommend", str(model), "--users", str(listed), "-k", "100"),
            *("--out", str(tmp_path / "long.csv"), "--overwrite"),
        ],
    )
    told = " ".join(said.output.split())
    assert "3 users have fewer than 100 items (the catalogue less what they " in told
    assert f"have seen), e.g. {users[1]!r}, 'stranger', {users[1]!r}." in told
    # The file's user feature columns make the unknown users' lists (new
    # sign-ups); a known user's are not read. Every stranger got popularity.
    signups = tmp_path / "signups.csv"
    signups.write_text(f"user_id,age,segment\n{users[0]},80,s1\nnew,23,s2\nbare,,\n")
    fed = runner.invoke(
        app,
        [
            *("recommend", str(model), "--users", str(signups), "--json"),
            *("--out", str(tmp_path / "f.csv")),
        ],
    )
    assert fed.exit_code == 0, fed.output
    assert json.loads(fed.stdout)["user_features"] == {
        "columns": ["age", "segment"],
        "unknown_users_with_features": 1,
        "known_users_not_read": 1,
        "popularity_fallback": 0,
    }
    lists = pl.read_csv(tmp_path / "f.csv", infer_schema=False)
    new = lists.filter(pl.col("user_id") == "new")
    served = rec.recommend("new", 10, user_features={"age": 23, "segment": "s2"})
    assert new["item_id"].to_list() == [str(i["item_id"]) for i in served.items]
    assert set(new["path"]) == {"cold_start_features"}
    bare = lists.filter(pl.col("user_id") == "bare")
    assert set(bare["path"]) == {"popularity"}
    signups.write_text("user_id,age\nnew,old\n")
    wrong = runner.invoke(
        app,
        [
            *("recommend", str(model), "--users", str(signups)),
            *("--out", str(tmp_path / "g.csv")),
        ],
    )
    said = " ".join(wrong.output.replace("│", " ").split())
    assert wrong.exit_code == 2, said
    assert "Invalid value for --users: user 'new': `user_features`['age']" in said
    written = pl.read_csv(csv, infer_schema=False)
    assert written["user_id"].unique(maintain_order=True).to_list() == [
        str(users[1]),
        "stranger",
    ]
    assert written.filter(pl.col("user_id") == "stranger")[
        "path"
    ].unique().to_list() == ["popularity"]
    # The Python API gives the same table.
    direct = rec.recommend_table([users[1], "stranger", users[1]], 10)
    assert direct["item_id"].to_list() == [int(i) for i in written["item_id"]]
    # Refused before any work: an existing file, one request's options, --out alone.
    for options, message in [
        (["--all-users", "--out", str(out)], "already exists"),
        (["--all-users", "--out", str(tmp_path / "r.json")], "should end in .parquet"),
        (["--users", str(listed), "--user", "3", "--out", str(csv)], "--user shapes"),
        (
            ["--out", str(tmp_path / "x.csv")],
            "give --users FILE, --all-users or --sessions FILE",
        ),
        (["--all-users"], "give --out"),
    ]:
        refused = runner.invoke(app, ["recommend", str(model), *options])
        assert refused.exit_code == 2, refused.output
        unboxed = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())
        assert message in unboxed, refused.output
    replaced = runner.invoke(
        app, ["recommend", str(model), "--all-users", "--out", str(out), "--overwrite"]
    )
    assert replaced.exit_code == 0, replaced.output
    assert pl.read_parquet(out).height == 10 * len(users)
    assert not list(tmp_path.glob(".*.partial"))


def test_recommend_explains_from_the_cli(models_dir: Path, tmp_path: Path) -> None:
    """`--explain`: the HTTP API and Python had `explain`; the CLI had no way."""
    from twostage.recommender import load

    model = models_dir / "synthetic"
    rec = load(model)
    user = rec.user_vocab.values.to_list()[2]
    done = runner.invoke(
        app, ["recommend", str(model), "--user", str(user), "--explain", "--json"]
    )
    assert done.exit_code == 0, done.output
    items = json.loads(done.stdout)["items"]
    want = rec.recommend(user, 10, explain=True).items
    assert [i["because"] for i in items] == [i["because"] for i in want]
    assert all(i["because"]["item_id"] is not None for i in items)
    table = runner.invoke(
        app, ["recommend", str(model), "--user", str(user), "--explain"]
    )
    assert "because you liked" in table.output
    # Many users into a file: a because_item_id column ("because you watched X"
    # in a campaign's e-mails); refused with --users before.
    out = tmp_path / "recs.csv"
    users = rec.user_vocab.values.to_list()
    listed = tmp_path / "users.csv"
    listed.write_text(f"user_id\n{users[2]}\n{users[5]}\nstranger\n")
    many = runner.invoke(
        app,
        [
            "recommend",
            str(model),
            "--users",
            str(listed),
            "--out",
            str(out),
            "--explain",
        ],
    )
    assert many.exit_code == 0, many.output
    written = pl.read_csv(out)
    for user in (users[2], users[5]):
        rows = written.filter(pl.col("user_id") == str(user))
        served = rec.recommend(user, 10, explain=True).items
        assert rows["because_item_id"].to_list() == [
            i["because"]["item_id"] for i in served
        ]
    stranger = written.filter(pl.col("user_id") == "stranger")
    assert (
        stranger.height and stranger["because_item_id"].null_count() == stranger.height
    )


def test_recommend_filters_by_metadata_from_the_cli(models_dir: Path) -> None:
    """`--filter column=value`: the HTTP API and Python had `filters`."""
    from twostage.recommender import load

    model = models_dir / "synthetic"
    rec = load(model)
    user = rec.user_vocab.values.to_list()[4]
    top = rec.recommend(user, 1).items[0]["item_id"]  # its category has an answer
    category = rec.items[rec.item_vocab.lookup(top)]["category"]
    only = f"category={category}"
    done = runner.invoke(
        app, ["recommend", str(model), "--user", str(user), "--filter", only, "--json"]
    )
    assert done.exit_code == 0, done.output
    got = [i["item_id"] for i in json.loads(done.stdout)["items"]]
    want = rec.recommend(user, 10, filters={"category": category}).items
    assert got == [i["item_id"] for i in want] and got
    # Values are typed as their columns hold them; a wrong one names the flag.
    assert rec.item_filters.from_text({"price": "2.5"}) == {"price": 2.5}
    for value, message in [
        ("price=cheap", "'cheap' is no value of the Float64 column 'price'"),
        ("category", "should look like column=value"),
    ]:
        refused = runner.invoke(
            app, ["recommend", str(model), "--user", str(user), "--filter", value]
        )
        assert refused.exit_code == 2, refused.output
        shown = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())
        assert message in shown and "--filter" in shown


def test_recommend_filters_many_users_into_a_file(
    models_dir: Path, tmp_path: Path
) -> None:
    """`--filter` with `--users` / `--all-users` was refused: a campaign limited to
    one category had to be scored user by user."""
    from twostage.recommender import load

    model = models_dir / "synthetic"
    rec = load(model)
    users = rec.user_vocab.values.to_list()
    category = rec.items[1]["category"]
    out = tmp_path / "recs.parquet"
    only = ["--filter", f"category={category}"]
    done = runner.invoke(
        app, ["recommend", str(model), "--all-users", "--out", str(out), *only]
    )
    assert done.exit_code == 0, done.output
    table = pl.read_parquet(out)
    items = set(table["item_id"].to_list())
    assert items and all(
        rec.items[rec.item_vocab.lookup(i)]["category"] == category for i in items
    )
    for user in [*users[:8], "stranger"]:  # the lists one request gets
        served = rec.recommend(user, 10, filters={"category": category}).items
        rows = rec.recommend_table([user], 10, filters={"category": category})
        assert rows["item_id"].to_list() == [i["item_id"] for i in served]
    assert table.filter(pl.col("user_id") == users[0])["item_id"].to_list() == [
        i["item_id"]
        for i in rec.recommend(users[0], 10, filters={"category": category}).items
    ]
    wrong = ["--all-users", "--out", str(tmp_path / "x.csv"), "--filter", "price=no"]
    refused = runner.invoke(app, ["recommend", str(model), *wrong])
    assert refused.exit_code == 2 and not (tmp_path / "x.csv").exists()


def test_feature_files_beside_a_log(tmp_path: Path) -> None:
    """`--item-table` / `--user-table`: a product catalogue or a user export could
    reach training only by joining it into the log first."""
    from twostage.retrieval.run import load_run

    data = generate(num_users=60, num_items=80, num_interactions=1500)
    log = tmp_path / "log.csv"
    data.interactions.rename({"user_id": "visitor", "item_id": "sku"}).write_csv(log)
    catalogue = tmp_path / "catalogue.csv"
    assert data.items is not None and data.users is not None
    data.items.select("item_id", "category", "price").rename(
        {"item_id": "sku"}
    ).write_csv(catalogue)
    people = tmp_path / "people.jsonl"
    data.users.select("user_id", "age").write_ndjson(people)
    mapping = ["--user-col", "visitor", "--item-col", "sku"]
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            *("train", "retrieval", "--dataset", str(log), *mapping),
            *("--item-table", str(catalogue), "--user-table", str(people)),
            *("--out", str(run), *SMALL_TRAINING),
        ],
    )
    assert result.exit_code == 0, result.output
    trained = load_run(run)
    assert {"category", "price"} <= {f.name for f in trained.spec.candidate}
    assert "age" in {f.name for f in trained.spec.query}
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["item_table"] == str(catalogue.resolve())  # found from anywhere
    # `data describe` joins them as training does, and says how it reads them.
    tables = ["--item-table", str(catalogue), "--user-table", str(people)]
    described = runner.invoke(
        app, ["data", "describe", str(log), *mapping, *tables, "--json"]
    )
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["item_features"] == ["category", "price"]
    assert summary["feature_kinds"] == {
        "age": "bucket",
        "category": "categorical",
        "price": "numeric",
    }
    # A key the file lacks, or no file, is named before training.
    for options, message in [
        (["--item-table", str(people)], "should have a key column named 'sku' or"),
        (["--user-table", str(tmp_path / "nope.csv")], "is not a file"),
    ]:
        refused = runner.invoke(
            app,
            [
                *("train", "retrieval", "--dataset", str(log), *mapping, *options),
                *("--out", str(tmp_path / "other"), *SMALL_TRAINING),
            ],
        )
        assert refused.exit_code != 0
        assert message in " ".join(str(refused.exception).split()), refused.output


def test_feature_files_keyed_otherwise(tmp_path: Path) -> None:
    """Steam's games are keyed `id` where its reviews say `item_id`, Last.fm's
    profiles `#id`: such a file had to be rewritten with the log's key name."""
    data = generate(num_users=60, num_items=80, num_interactions=1500)
    assert data.items is not None and data.users is not None
    log = tmp_path / "reviews.csv"
    data.interactions.write_csv(log)
    games = tmp_path / "games.csv"
    data.items.select(pl.col("item_id").alias("id"), "category").write_csv(games)
    profiles = tmp_path / "profiles.tsv"
    data.users.select(pl.col("user_id").alias("#id"), "age").write_csv(
        profiles, separator="\t"
    )
    tables = ["--item-table", str(games), "--user-table", str(profiles)]
    keys = ["--item-table-key", "id", "--user-table-key", "#id"]
    unkeyed = runner.invoke(app, ["data", "describe", str(log), *tables])
    assert "data.user_table_key" in str(unkeyed.exception)  # --user-table-key
    described = runner.invoke(
        app, ["data", "describe", str(log), *tables, *keys, "--json"]
    )
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["item_features"] == ["category"]
    assert summary["user_features"] == ["age"]
    run = tmp_path / "run"
    saved = train_retrieval(log, [*tables, *keys], run)
    assert saved["item_table_key"] == "id" and saved["user_table_key"] == "#id"
    assert "item_table_key=id" in runner.invoke(app, ["info", str(run)]).stdout
    alone = runner.invoke(app, ["data", "describe", str(log), "--item-table-key", "id"])
    assert alone.exit_code != 0
    assert "`data.item_table`, which is unset" in str(alone.exception)


def test_feature_files_without_a_header(tmp_path: Path) -> None:
    """MovieLens-1M's users.dat and movies.dat have no header: as --user-table /
    --item-table their first row was read as the column names."""
    data = generate(num_users=60, num_items=80, num_interactions=1500)
    assert data.items is not None and data.users is not None
    log = tmp_path / "ratings.dat"
    rows = data.interactions.select("user_id", "item_id", "rating", "timestamp")
    log.write_text(rows.write_csv(separator="\t", include_header=False))
    users = tmp_path / "users.dat"
    users.write_text(
        data.users.select("user_id", "segment", "age").write_csv(include_header=False)
    )
    movies = tmp_path / "movies.dat"
    movies.write_text(
        data.items.select("item_id", "category").write_csv(include_header=False)
    )
    options = [
        *("--column-names", "user_id,item_id,rating,timestamp"),
        *("--user-table", str(users), "--user-table-columns", "user_id,segment,age"),
        *("--item-table", str(movies), "--item-table-columns", "item_id,category"),
    ]
    described = runner.invoke(app, ["data", "describe", str(log), *options, "--json"])
    assert described.exit_code == 0, described.output
    summary = json.loads(described.stdout)
    assert summary["user_features"] == ["segment", "age"]
    assert summary["item_features"] == ["category"]
    run = tmp_path / "run"
    saved = train_retrieval(log, options, run)
    assert saved["user_table_columns"] == ["user_id", "segment", "age"]
    assert (
        "item_table_columns=item_id,category"
        in runner.invoke(app, ["info", str(run)]).stdout
    )
    alone = ["--item-table-columns", "item_id,category"]
    refused = runner.invoke(app, ["data", "describe", str(log), *options[:2], *alone])
    assert "which is unset" in str(refused.exception)


def test_similar_filters_by_metadata_from_the_cli(
    models_dir: Path, tmp_path: Path
) -> None:
    """`similar --filter`: "more like this, in this category", for one item or a
    file of them."""
    from twostage.recommender import load

    model = models_dir / "synthetic"
    rec = load(model)
    items = rec.item_vocab.values.to_list()
    category = rec.items[1]["category"]
    only = {"category": category}
    keep = ["--filter", f"category={category}"]
    one = runner.invoke(
        app, ["similar", str(model), "--item", str(items[2]), "--json", *keep]
    )
    assert one.exit_code == 0, one.output
    got = [i["item_id"] for i in json.loads(one.stdout)["items"]]
    assert got == [i["item_id"] for i in rec.similar_items(items[2], 10, filters=only)]
    out = tmp_path / "similar.csv"
    many = runner.invoke(
        app, ["similar", str(model), "--all-items", "--out", str(out), *keep]
    )
    assert many.exit_code == 0, many.output
    table = pl.read_csv(out)
    assert set(table["similar_item_id"].to_list()) <= {
        i for i in items if rec.items[rec.item_vocab.lookup(i)]["category"] == category
    }
    wrong = runner.invoke(
        app, ["similar", str(model), "--item", str(items[2]), "--filter", "price=x"]
    )
    assert wrong.exit_code == 2 and "--filter" in wrong.output


def test_similar_items_for_many_items_into_a_file(
    models_dir: Path, tmp_path: Path
) -> None:
    """Item-to-item tables (a shop's "also liked"): one item at a time only."""
    from twostage.recommender import load

    model = models_dir / "synthetic"
    rec = load(model)
    out = tmp_path / "similar.parquet"
    done = runner.invoke(
        app, ["similar", str(model), "--all-items", "--out", str(out), "-k", "4"]
    )
    assert done.exit_code == 0, done.output
    table = pl.read_parquet(out)
    items = rec.item_vocab.values.to_list()
    assert table.height == 4 * len(items)
    for item in items[:5]:
        rows = table.filter(pl.col("item_id") == item).sort("rank")
        served = rec.similar_items(item, 4)
        assert rows["similar_item_id"].to_list() == [i["item_id"] for i in served]
        assert item not in rows["similar_item_id"].to_list()
        assert rows["score"].to_list() == pytest.approx([i["score"] for i in served])
    listed = tmp_path / "items.jsonl"  # JSON lines, as a log may be
    listed.write_text(f'{{"item_id": {items[3]}}}\n{{"item_id": {items[0]}}}\n')
    done = runner.invoke(
        app,
        [
            "similar",
            str(model),
            "--items",
            str(listed),
            "--out",
            str(tmp_path / "s.csv"),
        ],
    )
    assert done.exit_code == 0, done.output
    written = pl.read_csv(tmp_path / "s.csv")
    assert written["item_id"].unique(maintain_order=True).to_list() == [
        items[3],
        items[0],
    ]
    direct = rec.similar_table([items[3], items[0]], 10)
    assert direct["similar_item_id"].to_list() == written["similar_item_id"].to_list()
    # --exclude-file: a table this command wrote leaves its pairs out of the
    # next one (the same columns), rows it cannot use counted.
    shown = tmp_path / "shown.csv"
    pl.concat(
        [
            written.head(2).select("item_id", "similar_item_id"),
            pl.DataFrame({"item_id": [items[9]], "similar_item_id": [items[1]]}),
        ]
    ).write_csv(shown)
    fresh = runner.invoke(
        app,
        [
            *("similar", str(model), "--items", str(listed), "--json"),
            *("--out", str(tmp_path / "s2.csv"), "--exclude-file", str(shown)),
        ],
    )
    assert fresh.exit_code == 0, fresh.output
    report = json.loads(fresh.stdout)["exclude_file"]
    assert (report["rows"], report["items"]) == (3, 1)
    assert report["first_rows_for_items_without_a_list"] == [3]
    again = pl.read_csv(tmp_path / "s2.csv")
    gone = written.head(2)["similar_item_id"].to_list()
    expected = rec.similar_table([items[3], items[0]], 10, exclude={items[3]: gone})
    assert again["similar_item_id"].to_list() == expected["similar_item_id"].to_list()
    assert not set(
        again.filter(pl.col("item_id") == items[3])["similar_item_id"]
    ) & set(gone)
    listed = tmp_path / "items.csv"
    listed.write_text(f"item_id\n{items[0]}\nno-such-item\n")
    refused = runner.invoke(
        app,
        [
            "similar",
            str(model),
            "--items",
            str(listed),
            "--out",
            str(tmp_path / "t.csv"),
        ],
    )
    assert refused.exit_code == 2 and "not in the catalogue" in refused.output
    assert not (tmp_path / "t.csv").exists()
    assert runner.invoke(app, ["similar", str(model)]).exit_code == 2


def test_evaluate_a_bundle_on_a_log_of_new_rows(
    models_dir: Path, tmp_path: Path
) -> None:
    """`evaluate --test FILE`: a bundle could be measured on its own test split only
    (from the command line), not on the rows that came after it."""
    from twostage.recommender import load
    from twostage.retrieval.evaluation import read_test_log

    model = models_dir / "synthetic"
    rec = load(model)
    later = generate(num_users=200, num_items=80, num_interactions=600, seed=9)
    week = tmp_path / "week.csv"
    later.interactions.write_csv(week)
    done = runner.invoke(
        app, ["evaluate", str(model), "--test", str(week), "--baselines", "--json"]
    )
    assert done.exit_code == 0, done.output
    measured = json.loads(done.stdout)["retrieval"]
    assert {"twostage", "popularity", "ease"} <= set(measured)
    expected = rec.run.evaluate(read_test_log(rec.run, week)).to_dict()
    assert measured["twostage"] == json.loads(json.dumps(expected))
    text = tmp_path / "text.csv"
    later.interactions.with_columns(
        pl.format("u{}", "user_id").alias("user_id")
    ).write_csv(text)
    refused = runner.invoke(app, ["evaluate", str(model), "--test", str(text)])
    assert refused.exit_code != 0
    assert "do not have the run's types" in str(refused.exception)


def test_a_log_changed_since_training_is_not_evaluated_as_its_split(
    tmp_path: Path,
) -> None:
    """`evaluate` and `report` rebuild the split from `data.dataset`: a log that
    had grown since training (or another dataset under that name) gave another
    split's figures, without a word."""
    data = generate(num_users=60, num_items=80, num_interactions=1500)
    log = tmp_path / "log.csv"
    data.interactions.write_csv(log)
    run = tmp_path / "run"
    train_retrieval(log, [], run)
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0
    more = generate(num_users=60, num_items=80, num_interactions=300, seed=5)
    pl.concat([data.interactions, more.interactions]).write_csv(log)
    refused = runner.invoke(app, ["evaluate", str(run)])
    assert refused.exit_code != 0
    assert "is not the one this run trained on" in str(refused.exception)
    report = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r")])
    assert report.exit_code == 0, report.output
    assert "is not the one this run trained on" in " ".join(report.output.split())


def test_recommend_without_the_ranker(tmp_path: Path) -> None:
    """`--no-ranker`: retrieval's own list from the CLI (the HTTP API and Python
    had `use_ranker`; the CLI always ranked)."""
    from twostage.recommender import load

    model = tmp_path / "models" / "syn" / "1"
    ranker = ["--set", "ranking.epochs=1", "--set", "ranking.hidden_dims=8"]
    trained = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            SYNTHETIC,
            "--out",
            str(model),
            *SMALL_TRAINING,
            *ranker,
        ],
    )
    assert trained.exit_code == 0, trained.output
    rec = load(model)

    def order(user: Any, ranker: bool) -> list[Any]:
        return [i["item_id"] for i in rec.recommend(user, 10, use_ranker=ranker).items]

    # A user whose lists differ: the switch must have something to switch.
    user = next(u for u in rec.user_vocab.values if order(u, True) != order(u, False))

    def listed(*options: str) -> list[Any]:
        done = runner.invoke(
            app, ["recommend", str(model), "--user", str(user), "--json", *options]
        )
        assert done.exit_code == 0, done.output
        return [i["item_id"] for i in json.loads(done.stdout)["items"]]

    assert listed("--no-ranker") == order(user, False)
    assert listed() == order(user, True)
    out = tmp_path / "recs.parquet"
    done = runner.invoke(
        app,
        ["recommend", str(model), "--all-users", "--out", str(out), "--no-ranker"],
    )
    assert done.exit_code == 0, done.output
    want = rec.recommend_table(rec.user_vocab.values.to_list(), 10, use_ranker=False)
    assert pl.read_parquet(out)["item_id"].to_list() == want["item_id"].to_list()


def test_an_ids_file_that_cannot_be_read_is_a_bad_parameter(tmp_path: Path) -> None:
    """`--users FILE` read it with polars as it came: a JSON line nesting objects
    600 deep killed the process (SIGSEGV), and a damaged Parquet file could end
    in a polars panic (a BaseException) rather than the option's error."""
    import random

    import typer

    from twostage.cli_batch import read_ids

    deep = tmp_path / "users.jsonl"
    nested = '{"a": ' * 600 + "1" + "}" * 600
    deep.write_text(f'{{"user_id": 1}}\n{{"user_id": 2, "m": {nested}}}\n')
    with pytest.raises(typer.BadParameter, match=r"line 2 .* nests objects more"):
        read_ids(deep, "user_id", "--users")
    shallow = tmp_path / "fine.json"
    shallow.write_text('[{"user_id": 1}, {"user_id": 2, "m": {"a": {"b": 3}}}]')
    assert read_ids(shallow, "user_id", "--users") == [1, 2]
    good = tmp_path / "good.parquet"
    pl.DataFrame({"user_id": [f"u{i}" for i in range(3000)]}).write_parquet(
        good, row_group_size=500
    )
    data, damaged = good.read_bytes(), tmp_path / "users.parquet"
    refused = 0
    for seed in range(40):
        rng = random.Random(seed)
        flipped = bytearray(data)
        for _ in range(rng.choice([1, 5, 50])):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        damaged.write_bytes(bytes(flipped))
        try:
            read_ids(damaged, "user_id", "--users")
        except typer.BadParameter:
            refused += 1
    assert refused > 5


def test_a_log_without_times_splits_in_file_order_and_refuses_time_settings(
    tmp_path: Path,
) -> None:
    """Without a time column a log's `timestamp` is its row order: the time
    settings read it as seconds, and `data split` wrote it out as times."""
    log = tmp_path / "log.csv"
    rows = [f"u{u},i{(7 * u + 3 * k) % 40}" for u in range(30) for k in range(6)]
    log.write_text("user,item\n" + "\n".join(rows) + "\n")
    columns = ["--user-col", "user", "--item-col", "item"]
    out = tmp_path / "split"
    split = runner.invoke(
        app,
        [
            *("data", "split", str(log), *columns, "--method", "leave-last-out"),
            *("--out", str(out)),
        ],
    )
    assert split.exit_code == 0, split.output
    assert "no time column: the leave-last-out split takes each user's last" in (
        " ".join(split.output.split())
    )
    train, test = (pl.read_parquet(out / n) for n in ("train.parquet", "test.parquet"))
    assert "timestamp" not in train.columns and "timestamp" not in test.columns
    last = {r.split(",")[0]: r.split(",")[1] for r in rows}  # the file's last
    assert dict(zip(test["user_id"], test["item_id"], strict=True)) == last
    assert train.filter(pl.col("user_id") == "u0")["item_id"].to_list() == [
        r.split(",")[1] for r in rows[:5]
    ]
    sides = ["--train", str(out / "train.parquet"), "--test", str(out / "test.parquet")]
    # Without --dataset the files met MovieLens-100k's integer IDs: a polars error.
    alone = runner.invoke(
        app, ["train", "retrieval", *sides, "--out", str(tmp_path / "run")]
    )
    assert isinstance(alone.exception, DataError), alone.output
    assert "split files go with the log they were split from" in " ".join(
        str(alone.exception).split()
    )
    # ... and it is said before the default log loads, whose item table checks
    # (an --item-table of the user's own) failed first, naming no log at all.
    told = " ".join(alone.output.split())
    assert "--train/--test without --dataset: the log they were split from is " in told
    assert "taken to be the default, movielens-100k" in told
    # `data split` says how to train on its files.
    hint = "".join(split.output.split())  # long paths wrap anywhere
    assert f"`twostagetrain--dataset{log}--train{out / 'train.parquet'}--test" in hint
    sides = [*sides, "--dataset", str(log), *columns]
    for setting in (
        "retrieval.popularity_days=30",
        "retrieval.sequence_time_gaps=true",
    ):
        refused = runner.invoke(
            app,
            [
                *("train", "retrieval", *sides, "--set", setting),
                *("--config", "presets/retrieval-sequence.json"),
                *("--out", str(tmp_path / "run")),
            ],
        )
        message = " ".join(str(refused.exception).split())
        assert "has no time column" in message, refused.output
        key, value = setting.split("=")
        off = {"30": "0", "true": "false"}[value]
        assert f"set `{key}={off}`" in message
    assert not (tmp_path / "run").exists()


def test_per_user_file_is_checked_before_the_bundle_loads(tmp_path: Path) -> None:
    # Each mistake is named before minutes of evaluation, and no bundle is read.
    missing = str(tmp_path / "no-bundle")
    cases = [
        (["--per-user", str(tmp_path / "users.json")], "should end in .parquet"),
        (["--per-user", str(tmp_path / "dir.csv")], "is a directory"),
        (
            ["--per-user", str(tmp_path / "u.csv"), "--sessions", "s.csv"],
            "--sessions measures sessions instead",
        ),
    ]
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "kept.parquet").write_bytes(b"")
    cases.append((["--per-user", str(tmp_path / "kept.parquet")], "--overwrite"))
    for extra, message in cases:
        done = runner.invoke(app, ["evaluate", missing, *extra])
        text = " ".join(done.output.replace("│", " ").split())
        assert done.exit_code == 2 and message in text, (extra, text)
        assert "--per-user" in text, text
