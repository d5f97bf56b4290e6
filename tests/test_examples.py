"""Every example under examples/ runs end to end on small settings (--quick)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LATEST_SMALL = Path(__file__).resolve().parents[2] / "shared/data/ml-latest-small"
EXPECTED = {
    "tfrs_000_book_crossing.py": [
        "Factorized top-K accuracy",
        "Recommendations for user",
    ],
    "tfrs_001_retrieval_ranking.py": ["Ranking on the test split: RMSE", "re-ranked"],
    "tfrs_002_basic_retrieval.py": [
        "TFRS tutorial 0.2350",
        "Recommendations for user 42",
    ],
    "tfrs_003_deep_retrieval.py": ["no context,  one layer", "context,  one layer"],
    "tfrs_004_latest_small_serving.py": [":predict for user", "Report and plots"],
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("tfrs_*.py")) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    args = [sys.executable, str(EXAMPLES / name), "--quick"]
    if name == "tfrs_004_latest_small_serving.py":
        if not LATEST_SMALL.is_dir():
            pytest.skip(f"MovieLens latest-small is not at {LATEST_SMALL}")
        args += ["--data-dir", str(LATEST_SMALL), "--out", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in EXPECTED[name]:
        assert text in done.stdout, (text, done.stdout[-2000:])
