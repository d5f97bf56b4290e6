"""Reading, generating and splitting interaction data."""

from twostage.data.dataset import ITEM, RATING, TIME, USER, WEIGHT, Dataset
from twostage.data.describe import describe
from twostage.data.movielens import load_movielens
from twostage.data.registry import load_dataset
from twostage.data.report import REASONS, LoadReport
from twostage.data.split import (
    Split,
    leave_last_out,
    random_split,
    split_dataset,
    temporal_split,
    validation_split,
)
from twostage.data.synthetic import SyntheticConfig, generate
from twostage.data.tables import join_features, read_feature_table, read_interactions

__all__ = [
    "ITEM",
    "RATING",
    "REASONS",
    "TIME",
    "USER",
    "WEIGHT",
    "Dataset",
    "LoadReport",
    "Split",
    "SyntheticConfig",
    "describe",
    "generate",
    "join_features",
    "leave_last_out",
    "load_dataset",
    "load_movielens",
    "random_split",
    "read_feature_table",
    "read_interactions",
    "split_dataset",
    "temporal_split",
    "validation_split",
]
