"""Files and tables given to a trained model in the training log's layout: a
model trained with `--user-col uid --item-col sku --time-col ts` reads new
items, sessions and lists of IDs whose columns have those names (or ours)."""

import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.data.synthetic import planted_impressions
from twostage.errors import ConfigError
from twostage.estimator import TwoStageModel
from twostage.recommender import load

pa = pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[TwoStageModel, Path]:
    """A model of the planted log with its columns renamed, and its bundle."""
    log = planted_impressions().rename(
        {"user_id": "uid", "item_id": "sku", "timestamp": "ts"}
    )
    kinds = log.select("sku", "kind").unique("sku")
    model = TwoStageModel(
        settings={"train.epochs": 4, "train.num_threads": 1},
        ranking=False,
        progress=False,
    )
    model.fit(
        log.drop("kind", "clicked"),
        user_col="uid",
        item_col="sku",
        time_col="ts",
        items=kinds.to_arrow(),
    )
    models = tmp_path_factory.mktemp("layout") / "models"
    model.save(models / "shop" / "1")
    return model, models / "shop"


def test_new_items_keyed_as_the_training_item_table(
    shop: tuple[TwoStageModel, Path], tmp_path: Path
) -> None:
    """New items keyed `sku` were refused ("should have an `item_id` column")
    from Python, a file and the CLI; they are read by that key now, as the
    training item table was."""
    model, bundle = shop
    rec = model.recommender
    grown = rec.add_items(pa.table({"sku": [901], "kind": ["good"]}))
    assert grown.item_vocab.size == rec.item_vocab.size + 1
    by_id = rec.add_items(pl.DataFrame({"item_id": [901], "kind": ["good"]}))
    assert by_id.recommend(3, 10).items == grown.recommend(3, 10).items
    with pytest.raises(ConfigError, match="an `item_id` or `sku` column"):
        rec.add_items(pl.DataFrame({"id": [901], "kind": ["good"]}))
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("sku,kind\n901,good\n902,bad\n")
    runner = CliRunner()
    added = runner.invoke(app, ["add-items", str(bundle), "--items", str(fresh)])
    assert added.exit_code == 0, added.output
    saved = load(bundle / "2")
    assert saved.item_vocab.size == rec.item_vocab.size + 2
    # A request's new items too: the same list as the same items given by ID.
    asked = runner.invoke(
        app,
        ["recommend", str(bundle / "1"), "--user", "3", "--new-items", str(fresh)],
        catch_exceptions=False,
    )
    assert asked.exit_code == 0, asked.output
    as_json = runner.invoke(
        app,
        [
            "recommend",
            str(bundle / "1"),
            "--user",
            "3",
            "--json",
            "-k",
            "2",
            "--new-items",
            str(fresh),
        ],
    )
    listed = [i["item_id"] for i in json.loads(as_json.stdout)["items"]]
    assert sorted(listed) == [901, 902]


def test_sessions_and_ids_in_the_training_log_s_columns(
    shop: tuple[TwoStageModel, Path], tmp_path: Path
) -> None:
    """`--sessions`, `--users` and `similar --items` files whose columns have
    the training log's names (and a session column named by `--session-col`)
    give the lists the same rows give under our names."""
    _, bundle = shop
    runner = CliRunner()
    ours = tmp_path / "ours.csv"
    ours.write_text("session_id,item_id,timestamp\na,5,1\na,7,2\nb,9,3\nb,11,4\n")
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("visit,sku,ts\na,5,1\na,7,2\nb,9,3\nb,11,4\n")

    def both(command: str, *more: str) -> list[str]:
        """``command`` on each file of sessions: its output (--json) or file."""
        said = []
        for name, extra in (("ours", []), ("theirs", ["--session-col", "visit"])):
            asked = [command, str(bundle / "1"), "--sessions"]
            asked += [str(tmp_path / f"{name}.csv"), *more, *extra]
            done = runner.invoke(app, [a.replace("NAME", name) for a in asked])
            assert done.exit_code == 0, done.output
            said.append(done.stdout)
        return said

    both("recommend", "--out", str(tmp_path / "NAME.parquet"))
    outs = [pl.read_parquet(tmp_path / f"{n}.parquet") for n in ("ours", "theirs")]
    assert outs[0].height == 20 and outs[0].equals(outs[1])
    figures = [json.loads(said) for said in both("evaluate", "--json")]
    assert figures[0]["twostage"] == figures[1]["twostage"]
    assert figures[0]["sessions"] == 2
    # Without --session-col the session column is named in the error.
    missing = runner.invoke(
        app,
        [
            "recommend",
            str(bundle / "1"),
            "--sessions",
            str(theirs),
            "--out",
            str(tmp_path / "x.parquet"),
        ],
    )
    assert missing.exit_code == 2 and "--session-col" in missing.output
    # Both names of one column: which to read is not clear, so neither is.
    twice = tmp_path / "twice.csv"
    twice.write_text("session_id,item_id,sku\na,5,7\n")
    clash = runner.invoke(
        app,
        [
            *("recommend", str(bundle / "1"), "--sessions", str(twice)),
            *("--out", str(tmp_path / "y.parquet")),
        ],
    )
    said = " ".join(re.sub("[│╭╮╰╯─]", " ", clash.output).split())
    assert clash.exit_code == 2 and "has both 'sku' and 'item_id'" in said
    alone = runner.invoke(
        app, ["recommend", str(bundle / "1"), "--user", "3", "--session-col", "v"]
    )
    assert alone.exit_code == 2 and "--sessions" in alone.output
    for flag, column, command in (
        ("--users", "uid", "recommend"),
        ("--items", "sku", "similar"),
    ):
        lists = []
        for name in ("user_id" if column == "uid" else "item_id", column):
            ids = tmp_path / f"{name}.csv"
            ids.write_text(f"{name}\n3\n5\n")
            out = tmp_path / f"{name}.parquet"
            done = runner.invoke(
                app, [command, str(bundle / "1"), flag, str(ids), "--out", str(out)]
            )
            assert done.exit_code == 0, done.output
            lists.append(pl.read_parquet(out))
        assert lists[0].height == 20 and lists[0].equals(lists[1])


def test_held_out_rows_written_by_data_split_are_read_by_our_names(
    shop: tuple[TwoStageModel, Path], tmp_path: Path
) -> None:
    """`data split` writes user_id, item_id, timestamp whatever the log called
    them; `evaluate --test` read such a file by the training log's names (uid,
    sku) and failed. It reads the file by ours, and measures what the same rows
    in the log's layout measure."""
    _, bundle = shop
    rows = planted_impressions(seed=3).filter(pl.col("clicked") == 1).head(300)
    ours = tmp_path / "test.parquet"
    theirs = tmp_path / "theirs.parquet"
    rows.select("user_id", "item_id", "timestamp").write_parquet(ours)
    rows.select(uid="user_id", sku="item_id", ts="timestamp").write_parquet(theirs)
    figures = []
    for path in (ours, theirs):
        done = CliRunner().invoke(
            app, ["evaluate", str(bundle / "1"), "--test", str(path), "--json"]
        )
        assert done.exit_code == 0, done.output
        figures.append(json.loads(done.stdout)["retrieval"])
    assert figures[0] == figures[1]
