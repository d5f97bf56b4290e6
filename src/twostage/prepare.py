"""From a dataset to the trainer's tensors: the splits and the per-user history.

``prepare_split`` makes the test split (plus any held-out cold users) and the
validation carve-out; ``build_tensors`` turns a fitted ``FeatureSpec`` and the training
split into ``RetrievalTensors``; ``with_history_of`` swaps in another training set's
histories (the ranking stage trains on more data than retrieval saw).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import torch

from twostage.batches import RetrievalTensors
from twostage.config import ExperimentConfig, RetrievalConfig
from twostage.data.dataset import ITEM, RATING, TIME, USER, Dataset
from twostage.data.split import Split, split_dataset, validation_split
from twostage.features import FeatureSpec

__all__ = ["build_tensors", "hold_out_users", "prepare_split", "with_history_of"]


def hold_out_users(
    dataset: Dataset, *, fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Move every interaction of a random ``fraction`` of users out: (rest, cold)."""
    users = dataset.interactions[USER].unique().sort()
    rng = np.random.default_rng(seed + 1)
    cold = users.gather(rng.permutation(len(users))[: round(len(users) * fraction)])
    is_cold = pl.col(USER).is_in(cold.implode())
    inter = dataset.interactions
    return (
        dataset.with_interactions(inter.filter(~is_cold)),
        dataset.with_interactions(inter.filter(is_cold)),
    )


def prepare_split(
    dataset: Dataset, config: ExperimentConfig
) -> tuple[Split, Dataset | None]:
    """Test split (plus held-out cold users) and the validation carve-out from train.

    Returns:
        ``(Split(fit, test), validation)``: the model trains on ``fit``; ``test``
        includes every interaction of the cold users; ``validation`` is None when
        ``data.validation_fraction`` is 0.
    """
    data = config.data
    rest, cold = dataset, None
    if data.cold_user_fraction > 0:
        rest, cold = hold_out_users(
            dataset, fraction=data.cold_user_fraction, seed=data.seed
        )
    train, test = split_dataset(
        rest, method=data.split, test_fraction=data.test_fraction, seed=data.seed
    )
    if cold is not None:
        test = test.with_interactions(pl.concat([test.interactions, cold.interactions]))
    validation = None
    if data.validation_fraction > 0:
        train, validation = validation_split(
            train, fraction=data.validation_fraction, seed=data.seed + 7
        )
    return Split(train, test), validation


def _rows_in_vocab_order(
    spec: FeatureSpec, key: str, side: str, table: pl.DataFrame | None
) -> dict[str, torch.Tensor]:
    """Feature rows for index 0 (OOV) and every vocabulary entry, in index order."""
    vocab = spec.vocabulary(key)
    ids = pl.concat(
        [pl.Series(key, [None], dtype=vocab.values.dtype), vocab.values.rename(key)]
    )
    if side == "query":
        return spec.transform_queries(ids, users=table)
    return spec.transform_items(ids, items=table)


def _history(
    train: pl.DataFrame,
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    *,
    num_users: int,
    length: int,
) -> torch.Tensor:
    """``[U, L]`` each user's last ``length`` training items by time, most recent last."""
    history = torch.zeros(num_users, length, dtype=torch.long)
    if length == 0:
        return history
    frame = (
        pl.DataFrame({"u": user_idx, "i": item_idx, "t": train[TIME].to_numpy()})
        .with_row_index("r")
        .sort(["u", "t", "r"])
        .with_columns(pl.int_range(pl.len()).reverse().over("u").alias("from_end"))
        .filter(pl.col("from_end") < length)
    )
    rows = torch.tensor(frame["u"].to_numpy(), dtype=torch.long)
    cols = length - 1 - torch.tensor(frame["from_end"].to_numpy(), dtype=torch.long)
    history[rows, cols] = torch.tensor(frame["i"].to_numpy(), dtype=torch.long)
    return history


def build_tensors(
    spec: FeatureSpec, train: Dataset, config: RetrievalConfig
) -> RetrievalTensors:
    """Turn a fitted spec and the training split into the trainer's tensors."""
    user_vocab, item_vocab = spec.vocabulary(USER), spec.vocabulary(ITEM)
    inter = train.interactions
    users = user_vocab.transform(inter[USER])
    items = item_vocab.transform(inter[ITEM])
    counts = np.bincount(items, minlength=item_vocab.size).astype(np.float64)
    weights = None
    if config.rating_weights and RATING in inter.columns:
        rating = inter[RATING].fill_null(0).to_numpy().astype(np.float32)
        weights = torch.from_numpy(np.maximum(rating, 0.0) + 1.0)
    return RetrievalTensors(
        user_features=_rows_in_vocab_order(spec, USER, "query", train.users),
        item_features=_rows_in_vocab_order(spec, ITEM, "candidate", train.items),
        history=_history(
            inter, users, items, num_users=user_vocab.size, length=config.history_length
        ),
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        weights=weights,
        item_probs=torch.from_numpy(counts / counts.sum()).float(),
        user_id_field=USER,
    )


def with_history_of(
    tensors: RetrievalTensors,
    spec: FeatureSpec,
    train: Dataset,
    config: RetrievalConfig,
) -> RetrievalTensors:
    """The same tables with history and seen items taken from another training set."""
    inter = train.interactions
    users = spec.vocabulary(USER).transform(inter[USER])
    items = spec.vocabulary(ITEM).transform(inter[ITEM])
    known = (users > 0) & (items > 0)
    users, items = users[known], items[known]
    history = _history(
        inter.filter(pl.Series(known)),
        users,
        items,
        num_users=spec.vocabulary(USER).size,
        length=config.history_length,
    )
    return dataclasses.replace(
        tensors,
        history=history,
        users=torch.from_numpy(users),
        items=torch.from_numpy(items),
        weights=None,
    )
