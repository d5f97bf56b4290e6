import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from twostage.cli import app

runner = CliRunner()


def test_describe_synthetic_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    result = runner.invoke(
        app,
        ["data", "describe", "synthetic:num_items=50,num_users=40", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["num_items"] <= 50 and summary["num_users"] == 40
    assert "rating_histogram" in summary


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


def test_unknown_dataset_is_a_clear_error() -> None:
    result = runner.invoke(app, ["data", "describe", "no-such-dataset.csv"])
    assert result.exit_code != 0
    assert "no such file" in str(result.exception)
