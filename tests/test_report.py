"""`twostage report`: the report of any run or bundle."""

import json
from pathlib import Path

from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.synthetic import generate
from twostage.two_stage import fit_two_stage

runner = CliRunner()
SMALL = [
    "train.epochs=2",
    "train.num_threads=1",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
    "ranking.embedding_dim=8",
    "ranking.hidden_dims=8",
    "ranking.epochs=2",
    "ranking.hard_negative_pool=10",
]


def test_report_of_a_bundle_covers_both_stages(tmp_path: Path) -> None:
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=100,num_interactions=1500",
            "train.seed=3",
            *SMALL,
        ],
    )
    stages = fit_two_stage(config)
    stages.recommender().save(tmp_path / "models" / "syn" / "1")
    # The ranker's test figures are saved with the bundle (`twostage info` shows
    # them without rebuilding the split).
    info = runner.invoke(app, ["info", str(tmp_path / "models" / "syn"), "--json"])
    assert info.exit_code == 0, info.output
    saved = json.loads(info.stdout)["ranking"]["test"]
    measured = stages.ranking_metrics
    assert measured is not None
    assert saved["auc"] == measured["auc"] and saved["rmse"] == measured["rmse"]
    assert saved["two_stage_ndcg@10"] == measured["two_stage"]["ndcg"]["10"]
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["report", str(tmp_path / "models" / "syn"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "loss.png", "ranking_loss.png"} <= names
    assert {"recall_ndcg.png", "scores.png"} <= names
    text = (out / "report.md").read_text()
    for expected in (
        "Ranking stage (test split)",
        "rating RMSE",
        "| training seed | 3 |",
        "best retrieval epoch",
        "| popularity |",
        "| ease |",
        "twostage version",
        "Recommended for user",
    ):
        assert expected in text, expected


def test_report_without_the_data_keeps_the_saved_metrics(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    generate(num_users=50, num_items=80, num_interactions=1200).interactions.write_csv(
        log
    )
    config = apply_overrides(
        ExperimentConfig(),
        [f"data.dataset={log}", "data.rating_col=rating", *SMALL],
    )
    stages = fit_two_stage(config)
    stages.recommender().save(tmp_path / "bundle")
    log.unlink()
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(tmp_path / "bundle"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cannot be loaded here" in " ".join(result.output.split())  # any width
    text = (out / "report.md").read_text()
    saved = stages.retrieval.metrics["metrics"]["exclude_seen"]["ndcg"]["10"]
    error = stages.retrieval.metrics["standard_errors"]["exclude_seen"]["ndcg"]["10"]
    assert f"| {saved:.4f} ± {error:.4f} |" in text and (out / "loss.png").exists()
    # The ranker's figures saved with the bundle too (the section was left out).
    assert stages.ranking_metrics is not None
    assert "Ranking stage" in text
    assert f"| rating RMSE |  | {stages.ranking_metrics['rmse']:.4f} |" in text
    again = runner.invoke(app, ["report", str(tmp_path / "bundle"), "--out", str(out)])
    assert again.exit_code == 0, again.output  # an earlier report is replaced
    # `--out .` in a project replaced its own report.md.
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.md").write_text("# My thesis notes\n")
    mine = runner.invoke(
        app, ["report", str(tmp_path / "bundle"), "--out", str(project)]
    )
    assert "is not a twostage report" in str(mine.exception)
    assert (project / "report.md").read_text() == "# My thesis notes\n"
    assert sorted(p.name for p in project.iterdir()) == ["report.md"]


def test_a_markdown_cell_stays_one_cell() -> None:
    from twostage.report import _table

    table = _table([["runs/a|b", "two\nlines"]], ["source", "note"])
    row = table.splitlines()[2]
    assert row == "| runs/a\\|b | two lines |"
    assert row.replace("\\|", "").count("|") == 3  # the row's own separators only
