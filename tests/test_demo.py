"""`make demo` end to end on a reduced setting (one epoch)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.errors import DatasetUnavailableError


def test_demo_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--epochs", "1", "--out", str(out)])
    if isinstance(result.exception, DatasetUnavailableError):
        pytest.skip(f"MovieLens-100k unavailable here: {result.exception}")
    assert result.exit_code == 0, result.output
    assert "943" in result.output and "1,682" in result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert {"twostage", "popularity", "ease", "itemknn"} <= set(comparison)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    ours = comparison["twostage"]["metrics"]["exclude_seen"]["recall"]["100"]
    assert ours > comparison["popularity"]["metrics"]["exclude_seen"]["recall"]["100"]
