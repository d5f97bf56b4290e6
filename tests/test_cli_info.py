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
