"""Evaluate a saved run again: reload its data, rebuild its test split, score it.

``twostage evaluate DIR`` runs :func:`evaluate_saved`; on a bundle it runs
:func:`rebuild_test_split` and :func:`evaluate_on`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twostage.data.dataset import Dataset
from twostage.errors import DataError, TwostageError
from twostage.experiment import (
    RetrievalRun,
    evaluate_baselines,
    load_dataset_for,
    load_run,
)
from twostage.prepare import prepare_split

__all__ = ["evaluate_on", "evaluate_saved", "rebuild_test_split"]


def rebuild_test_split(
    run: RetrievalRun, *, source: str | Path | None = None
) -> Dataset:
    """The test split a saved run was evaluated on, rebuilt from its saved config.

    The saved config names the dataset (``data.dataset`` and the column mapping) and
    the split (``data.split``, ``test_fraction``, ``seed``, ``cold_user_fraction``);
    :func:`prepare_split` on the same data gives the same test rows.

    Args:
        run: a trained or reloaded run.
        source: where the run was loaded from, for the error message.

    Raises:
        DataError: the dataset named in the config cannot be loaded here.
    """
    try:
        dataset = load_dataset_for(run.config)
    except (TwostageError, OSError) as e:
        where = f" of {str(source)!r}" if source is not None else ""
        raise DataError(
            f"cannot rebuild the test split{where}: its config names "
            f"data.dataset = {run.config.data.dataset!r}, which cannot be loaded "
            f"here ({e}). Make that dataset available at the same name or path "
            "(built-in data: `twostage data fetch NAME`), then evaluate again."
        ) from e
    (_, test), _ = prepare_split(dataset, run.config)
    return test


def evaluate_on(
    run: RetrievalRun, test: Dataset, *, baselines: bool = False
) -> dict[str, Any]:
    """``{"twostage": ..., [baseline name: ...]}`` full-catalogue metrics on ``test``."""
    results = {"twostage": run.evaluate(test).to_dict()}
    if baselines:
        results.update(
            {k: v.to_dict() for k, v in evaluate_baselines(run, test).items()}
        )
    return results


def evaluate_saved(directory: str | Path, *, baselines: bool = False) -> dict[str, Any]:
    """Reload a run and its data, rebuild the same split, evaluate (and baselines)."""
    run = load_run(directory)
    return evaluate_on(
        run, rebuild_test_split(run, source=directory), baselines=baselines
    )
