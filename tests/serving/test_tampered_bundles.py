"""A corpus of tampered bundles: each one is refused with a clear error, and a server
holding a good version keeps serving while it is offered."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from twostage.errors import ArtifactError
from twostage.recommender import Recommender, load
from twostage.serving import ServeSettings, create_app


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, data: object) -> None:
    (bundle / "manifest.json").write_text(json.dumps(data))


def _variants(bundle: Path) -> dict[str, Callable[[Path], None]]:
    """name -> a function that damages a copy of the bundle."""
    files = sorted(_manifest(bundle)["files"])
    out: dict[str, Callable[[Path], None]] = {}
    for name in files:
        out[f"truncate {name}"] = lambda b, n=name: (b / n).write_bytes(
            (b / n).read_bytes()[: max(len((b / n).read_bytes()) // 2, 1) - 1]
        )
        out[f"flip a byte of {name}"] = lambda b, n=name: (b / n).write_bytes(
            bytes([(b / n).read_bytes()[0] ^ 0xFF]) + (b / n).read_bytes()[1:]
        )
        out[f"delete {name}"] = lambda b, n=name: (b / n).unlink()
    out["no manifest"] = lambda b: (b / "manifest.json").unlink()
    out["manifest not JSON"] = lambda b: (b / "manifest.json").write_text("{oops")
    out["manifest a list"] = lambda b: _write_manifest(b, [1, 2])
    out["files a list"] = lambda b: _write_manifest(
        b, {**_manifest(b), "files": list(_manifest(b)["files"])}
    )
    out["format version 99"] = lambda b: _write_manifest(
        b, {**_manifest(b), "format_version": 99}
    )
    out["nested 100,000 deep"] = lambda b: (b / "manifest.json").write_text(
        "[" * 100_000 + "]" * 100_000
    )
    out["path out of the bundle"] = lambda b: _write_manifest(
        b, {**_manifest(b), "files": {**_manifest(b)["files"], "../x": "0" * 64}}
    )
    out["unlisted file"] = lambda b: (b / "items.parquet.bak").write_bytes(b"x")
    out["symbolic link"] = lambda b: os.symlink("/etc/hostname", b / "extra.txt")
    return out


def test_every_tampered_variant_is_refused_and_the_server_keeps_serving(
    small_recommender: Recommender, tmp_path: Path
) -> None:
    good = small_recommender.save(tmp_path / "pristine")
    variants = _variants(good)
    assert len(variants) >= 30
    models = tmp_path / "models"
    small_recommender.save(models / "m" / "1")
    settings = ServeSettings(models=str(models), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        for version, (name, damage) in enumerate(variants.items(), start=2):
            copy = tmp_path / "work" / str(version)
            shutil.copytree(good, copy, symlinks=True)
            damage(copy)
            with pytest.raises(ArtifactError) as error:
                load(copy)
            assert str(error.value), name
            shutil.move(copy, models / "m" / str(version))
            registry.refresh()  # never raises: the version is refused
            answer = client.post("/v1/recommend", json={"user_id": 3})
            assert answer.status_code == 200, (name, answer.text)
            assert answer.json()["version"] == 1, name
        states = client.get("/v1/models/m").json()["model_version_status"]
        refused = [s for s in states if s["state"] == "FAILED"]
        # Versions without a manifest are not versions yet (not listed), the rest
        # are refused with a reason.
        assert len(refused) >= len(variants) - 2
        assert all(s["status"]["error_message"] for s in refused)


@pytest.mark.parametrize(
    ("file", "edit"),
    [
        ("ranking/ranking_state.json", {"blend_weight": [1, 2]}),
        ("ranking/ranking_state.json", {"rating_bounds": "low"}),
        ("serving.json", {"popularity_fallback": "many"}),
        ("config.json", {"retrieval": {"embedding_dim": -1}}),
    ],
)
def test_a_hand_edited_value_of_the_wrong_kind_is_an_artifact_error(
    tmp_path: Path, file: str, edit: dict
) -> None:
    """Values of the wrong kind, with the checksums made to agree (an operator's
    edit): a clear ArtifactError naming the bundle, never a raw TypeError."""
    import hashlib

    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.two_stage import fit_two_stage

    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=40,num_items=60,num_interactions=800",
            "train.epochs=1",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.epochs=1",
            "ranking.hard_negative_pool=10",
        ],
    )
    bundle = (
        fit_two_stage(config, evaluate_test=False).recommender().save(tmp_path / "b")
    )
    values = json.loads((bundle / file).read_text())
    for key, value in edit.items():
        if isinstance(value, dict):
            values[key].update(value)
        else:
            values[key] = value
    (bundle / file).write_text(json.dumps(values))
    manifest = _manifest(bundle)
    manifest["files"][file] = hashlib.sha256((bundle / file).read_bytes()).hexdigest()
    _write_manifest(bundle, manifest)
    with pytest.raises(ArtifactError):
        load(bundle)
