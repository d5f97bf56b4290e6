"""`twostage info`: what a saved model is, from the bundle alone."""

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from twostage.cli import app
from twostage.errors import ArtifactError
from twostage.recommender import Recommender

runner = CliRunner()


def test_info_describes_a_bundle_and_lists_a_models_directory(
    models_dir: Path, small_recommender: Recommender, tmp_path: Path
) -> None:
    small_recommender.save(models_dir / "synthetic" / "2")
    done = runner.invoke(app, ["info", str(models_dir / "synthetic"), "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.stdout)
    assert info["path"] == str(models_dir / "synthetic" / "2")  # the newest
    assert info["kind"] == "bundle" and info["versions"] == [1, 2]
    rec = small_recommender
    assert info["users"] == rec.user_vocab.size - 1
    assert info["items"] == rec.item_vocab.size - 1
    assert info["training_rows"] == int(rec.user_vocab.counts.sum())  # the fit rows
    kinds = {f["column"]: f["kind"] for f in info["features"]["candidate"]}
    assert kinds == {f.name: f.kind for f in rec.run.spec.candidate[1:]}
    assert info["ranking"] is None and info["index"] == "exact"
    saved = rec.run.metrics["metrics"]["exclude_seen"]["ndcg"]["10"]
    assert info["test"]["ndcg@10"] == saved
    error = rec.run.metrics["standard_errors"]["exclude_seen"]["ndcg"]["10"]
    assert info["test"]["ndcg@10 standard error"] == error > 0
    table = runner.invoke(app, ["info", str(models_dir / "synthetic" / "1")])
    shown = " ".join(re.sub("[│┌┐└┘├┤┬┴┼─]", " ", table.output).split())
    assert "checksums verified" in shown and "none (retrieval's order)" in shown
    # A models/ directory: every model and its versions.
    listed = runner.invoke(app, ["info", str(models_dir), "--json"])
    assert json.loads(listed.stdout)["models"] == [
        {
            "name": "synthetic",
            "versions": [1, 2],
            "newest": 2,
            "created": json.loads(
                (models_dir / "synthetic" / "2" / "manifest.json").read_text()
            )["created"],
            "ranking": False,
            "error": None,
        }
    ]
    # A version whose manifest cannot be read is said, not left blank.
    (models_dir / "broken" / "1").mkdir(parents=True)
    (models_dir / "broken" / "1" / "manifest.json").write_text("{bad")
    listed = runner.invoke(app, ["info", str(models_dir), "--json"])
    broken = json.loads(listed.stdout)["models"][0]
    assert broken["name"] == "broken" and "unreadable manifest.json" in broken["error"]
    # A bundle saved right under models/ (`train --out models/shop`) was left out
    # of the list, and a models/ holding only such bundles was no list at all.
    lone = tmp_path / "lone"
    small_recommender.save(lone / "shop")
    for root, position in ((models_dir, 1), (lone, 0)):
        if root is models_dir:
            small_recommender.save(root / "shop")
        listed = runner.invoke(app, ["info", str(root), "--json"])
        assert listed.exit_code == 0, listed.output
        shop = json.loads(listed.stdout)["models"][position]
        assert shop["name"] == "shop" and shop["versions"] == []
        assert shop["error"].startswith("a bundle without a version number")
        assert f"mkdir {root / 'shop'}" in shop["error"]
    # A retrieval run (`train retrieval --out`) has no manifest to verify.
    rec.run.save(tmp_path / "run")
    run = json.loads(
        runner.invoke(app, ["info", str(tmp_path / "run"), "--json"]).stdout
    )
    assert run["kind"] == "retrieval run" and run["created"] is None
    # A tampered bundle is the error every command gives, not a description.
    weights = models_dir / "synthetic" / "1" / "retrieval.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    broken = runner.invoke(app, ["info", str(models_dir / "synthetic" / "1")])
    assert isinstance(broken.exception, ArtifactError)
    assert "is corrupt" in str(broken.exception)


def test_env_reports_the_machine_and_packages() -> None:
    import importlib.metadata

    import torch

    done = runner.invoke(app, ["env", "--json"])
    assert done.exit_code == 0, done.output
    env = json.loads(done.stdout)
    assert env["packages"]["torch"] == torch.__version__
    assert env["packages"]["polars"] == importlib.metadata.version("polars")
    assert env["cuda"]["available"] == torch.cuda.is_available()
    assert env["torch_threads"] == torch.get_num_threads()
    table = runner.invoke(app, ["env"])
    assert "data cache" in table.output and "torch" in table.output


def test_a_run_fitted_on_a_dataset_given_in_python_says_so(tmp_path: Path) -> None:
    """`fit_retrieval(config, dataset=...)` (and `fit_two_stage`) kept the config's
    `data.dataset`, the default MovieLens-100k, whatever data it was handed, so a
    model trained on a log of one's own said "movielens-100k" in `twostage info`."""
    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.data.dataset import Dataset
    from twostage.data.registry import FIT_TABLES, load_dataset, recorded_dataset
    from twostage.data.synthetic import generate
    from twostage.retrieval.fit import fit_retrieval

    log = tmp_path / "logs" / "mine.csv"
    log.parent.mkdir()
    generate(num_users=40, num_items=30, num_interactions=600).interactions.write_csv(
        log
    )
    mine = load_dataset(str(log))
    settings = ["train.epochs=1", "retrieval.embedding_dim=8", "retrieval.output_dim=8"]
    config = apply_overrides(ExperimentConfig(), settings)
    run, _ = fit_retrieval(config, dataset=mine, evaluate_test=False)
    assert run.config.data.dataset == FIT_TABLES
    run.save(tmp_path / "run")
    shown = runner.invoke(app, ["info", str(tmp_path / "run")])
    said = " ".join(re.sub("[│┌┐└┘├┤┬┴┼─]", " ", shown.output).split())
    assert "data tables given in Python (not recorded with the model)" in said, said
    # The config naming that log records it, as the CLI's runs do.
    named = apply_overrides(config, [f"data.dataset={log}"])
    run, _ = fit_retrieval(named, dataset=mine, evaluate_test=False)
    assert run.config.data.dataset == str(log)
    # A log read from inside a directory the config names (MIND's behaviors.tsv,
    # MovieLens's files), and a built-in dataset by its name.
    inside = Dataset("mine", mine.interactions, source=str(log))
    assert recorded_dataset(inside, f"mind:{log.parent}") == f"mind:{log.parent}"
    assert recorded_dataset(inside, str(tmp_path / "elsewhere")) == FIT_TABLES
    ml = Dataset("movielens-100k", mine.interactions)
    assert recorded_dataset(ml, "movielens-100k") == "movielens-100k"
    assert recorded_dataset(ml, "ml-100k") == "ml-100k"
    assert recorded_dataset(ml, "movielens-1m") == FIT_TABLES
    assert recorded_dataset(mine, "movielens-100k") == FIT_TABLES


def test_a_long_path_wraps_in_the_table_and_is_never_cut(
    models_dir: Path, small_recommender: Recommender, monkeypatch
) -> None:
    """The table cut a value wider than its column with an ellipsis: a long
    bundle or data path was shown with its end missing."""
    from twostage.cli_output import console

    deep = models_dir / ("a-long-directory-name-" * 4) / "1"
    small_recommender.save(deep)
    monkeypatch.setattr(console, "width", 60)
    done = runner.invoke(app, ["info", str(deep)])
    assert done.exit_code == 0, done.output
    assert "…" not in done.output
    joined = re.sub(r"[│┌┐└┘├┤┬┴┼─\s]", "", done.output)
    assert small_recommender.run.config.data.dataset.replace(" ", "") in joined
