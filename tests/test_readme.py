"""The README's Python API example runs as written (on small synthetic data)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_example() -> str:
    section = README.read_text().split("## The Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section should show one example"
    return blocks[0]


def test_python_api_example_imports_from_at_most_two_modules() -> None:
    modules = set(re.findall(r"^(?:from|import) ([\w.]+)", _python_api_example(), re.M))
    assert modules and len(modules) <= 2, modules


@pytest.mark.slow
def test_python_api_example_runs(tmp_path: Path) -> None:
    code = _python_api_example()
    small = "synthetic:num_users=80,num_items=200,num_interactions=3000"
    assert '"movielens-100k"' in code and '"train.epochs": 10' in code
    code = code.replace('"movielens-100k"', f'"{small}"')
    code = code.replace(
        '"train.epochs": 10', '"train.epochs": 1, "train.num_threads": 1'
    )
    code = code.replace('"ranking.epochs": 3', '"ranking.epochs": 1')
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        scope: dict[str, object] = {}
        exec(compile(code, str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "models" / "movielens" / "1" / "manifest.json").exists()
    assert len(scope["answer"].items) == 10  # type: ignore[attr-defined]
    assert scope["item_ids"].shape == (2, 10)  # type: ignore[attr-defined]
    assert scope["ratings"].shape == (2,)  # type: ignore[attr-defined]


def test_readme_links_resolve() -> None:
    """Every relative link of the README and docs/ points at a file that exists."""
    root = README.parent
    for page in [README, *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)
