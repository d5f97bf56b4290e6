"""`make demo` end to end on a reduced setting (one epoch)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.errors import DatasetUnavailableError
from twostage.recommender import load


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--epochs", "1", "--ranking-epochs", "1", "--out", str(out)]
    )
    if isinstance(result.exception, DatasetUnavailableError):
        pytest.skip(f"MovieLens-100k unavailable here: {result.exception}")
    assert result.exit_code == 0, result.output
    assert "943" in result.output and "1,682" in result.output
    assert "Star Wars" in result.output and "Return of the Jedi" in result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert {"twostage", "popularity", "ease", "itemknn"} <= set(comparison)
    ours = comparison["twostage"]["metrics"]["exclude_seen"]["recall"]["100"]
    assert ours > comparison["popularity"]["metrics"]["exclude_seen"]["recall"]["100"]
    report = out / "report"
    for name in (
        "report.md",
        "report.html",
        "loss.png",
        "recall_ndcg.png",
        "scores.png",
    ):
        assert (report / name).stat().st_size > 0, name
    assert (report / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bundle = load(out / "models" / "movielens" / "1")
    assert bundle.recommend(42, 10).path == "personalised"


def test_demo_options_are_checked_before_it_trains(tmp_path: Path) -> None:
    runner = CliRunner()
    out = str(tmp_path / "demo")
    bad_epochs = runner.invoke(app, ["demo", "--epochs", "0", "--out", out])
    assert "`train.epochs` should be a positive integer" in str(bad_epochs.exception)
    assert "Loaded from" not in bad_epochs.output  # refused before loading
    unknown = runner.invoke(app, ["demo", "--user", "5000", "--out", out])
    if isinstance(unknown.exception, DatasetUnavailableError):
        pytest.skip(str(unknown.exception))
    assert unknown.exit_code == 2
    assert "no user 5000" in " ".join(unknown.output.split())
    assert not (tmp_path / "demo").exists()  # nothing trained or saved
