"""The retrieval stage: two towers trained with a sampled softmax, then searched.

Modules, in the order data flows:

* :mod:`~twostage.retrieval.tensors`: the tables batches and queries are gathered from;
* :mod:`~twostage.retrieval.run`: :class:`RetrievalRun`, building, saving and loading;
* :mod:`~twostage.retrieval.task`: the loss of a batch in each example mode;
* :mod:`~twostage.retrieval.fit`: :func:`fit_retrieval` (split, features, training);
* :mod:`~twostage.retrieval.evaluation`: test queries, run and baseline evaluation.

Names load on first use, so that loading a saved run (what the server does) imports no
fitting code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twostage._lazy import lazy_exports

if TYPE_CHECKING:
    from twostage.retrieval.evaluation import (
        eval_queries,
        evaluate_baselines,
        evaluate_saved,
    )
    from twostage.retrieval.fit import fit_retrieval, train_retrieval
    from twostage.retrieval.run import RetrievalRun, build_model, load_run
    from twostage.retrieval.tensors import RetrievalTensors

_EXPORTS = {
    "RetrievalRun": "twostage.retrieval.run",
    "RetrievalTensors": "twostage.retrieval.tensors",
    "build_model": "twostage.retrieval.run",
    "evaluate_baselines": "twostage.retrieval.evaluation",
    "evaluate_saved": "twostage.retrieval.evaluation",
    "fit_retrieval": "twostage.retrieval.fit",
    "load_run": "twostage.retrieval.run",
    "eval_queries": "twostage.retrieval.evaluation",
    "train_retrieval": "twostage.retrieval.fit",
}
__all__ = [
    "RetrievalRun",
    "RetrievalTensors",
    "build_model",
    "evaluate_baselines",
    "evaluate_saved",
    "fit_retrieval",
    "load_run",
    "eval_queries",
    "train_retrieval",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
