"""Every benchmark script imports and parses its arguments (the runs are long)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_the_benchmarks_are_found() -> None:
    assert {"retrieval_quality.py", "retrieval_speed.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--json" in done.stdout


def test_retrieval_quality_rejects_an_unknown_model() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "retrieval_quality.py"),
            "--models",
            "twostage-id,no-such-model",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "no-such-model" in done.stderr
