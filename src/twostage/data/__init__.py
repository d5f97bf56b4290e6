"""Reading, generating and splitting interaction data.

Names load on first use: the server reads ``twostage.data.dataset`` without importing
the MovieLens downloader or the CSV reader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twostage._lazy import lazy_exports

if TYPE_CHECKING:
    from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT, Dataset
    from twostage.data.describe import describe
    from twostage.data.filtering import min_counts
    from twostage.data.movielens import load_movielens
    from twostage.data.registry import load_dataset
    from twostage.data.report import REASONS, LoadReport
    from twostage.data.sample import LogSample, sample_log_users
    from twostage.data.split import (
        ExperimentSplit,
        Split,
        leave_last_out,
        prepare_split,
        random_split,
        split_dataset,
        temporal_split,
        validation_split,
    )
    from twostage.data.synthetic import SyntheticConfig, generate
    from twostage.data.tables import (
        join_features,
        read_feature_table,
        read_interactions,
    )

_EXPORTS = {
    **dict.fromkeys(
        ["ITEM", "RATING", "TIME", "USER", "WEIGHT", "Dataset"],
        "twostage.data.dataset",
    ),
    "describe": "twostage.data.describe",
    "min_counts": "twostage.data.filtering",
    "load_movielens": "twostage.data.movielens",
    "load_dataset": "twostage.data.registry",
    "REASONS": "twostage.data.report",
    "LoadReport": "twostage.data.report",
    "LogSample": "twostage.data.sample",
    "sample_log_users": "twostage.data.sample",
    **dict.fromkeys(
        [
            "ExperimentSplit",
            "Split",
            "leave_last_out",
            "prepare_split",
            "random_split",
            "split_dataset",
            "temporal_split",
            "validation_split",
        ],
        "twostage.data.split",
    ),
    "SyntheticConfig": "twostage.data.synthetic",
    "generate": "twostage.data.synthetic",
    **dict.fromkeys(
        ["join_features", "read_feature_table", "read_interactions"],
        "twostage.data.tables",
    ),
}
__all__ = [
    "ITEM",
    "RATING",
    "REASONS",
    "TIME",
    "USER",
    "WEIGHT",
    "Dataset",
    "ExperimentSplit",
    "LoadReport",
    "LogSample",
    "Split",
    "SyntheticConfig",
    "describe",
    "generate",
    "join_features",
    "leave_last_out",
    "load_dataset",
    "load_movielens",
    "min_counts",
    "prepare_split",
    "random_split",
    "read_feature_table",
    "read_interactions",
    "sample_log_users",
    "split_dataset",
    "temporal_split",
    "validation_split",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
