"""Seeded synthetic interaction logs with planted structure.

Items belong to latent clusters; each user has a latent factor that sets a preference
distribution over clusters; within a cluster, item popularity follows a power law. Side
features are noisy functions of the latent structure, so a model that uses them can find
the planted signal:

* user ``age`` and ``segment`` depend on the user's favourite cluster;
* item ``category`` is the item's cluster (with noise), ``title`` draws words from a
  cluster-specific word list, ``price`` depends on the cluster.

Everything is vectorised with numpy, so 10M interactions over 1M items take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from twostage.data.dataset import ITEM, RATING, TIME, USER, Dataset
from twostage.errors import ConfigError

__all__ = [
    "SyntheticConfig",
    "generate",
    "planted_clusters",
    "planted_impressions",
    "write_parquet",
]

_START = 1_600_000_000  # 2020-09-13, start of the synthetic log
_SPAN = 365 * 24 * 3600


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of a synthetic dataset.

    Attributes:
        num_users: users in the log (every user gets at least one interaction when
            ``num_interactions >= num_users``).
        num_items: items in the catalogue.
        num_interactions: rows of the log.
        num_clusters: latent item clusters.
        dim: width of the latent factors.
        sharpness: how concentrated users' cluster preferences are (higher: sharper).
        popularity_exponent: Zipf exponent of item popularity inside a cluster.
        feature_noise: probability that a side feature is replaced by a random value.
        seed: seed of every random draw.
    """

    num_users: int = 1000
    num_items: int = 500
    num_interactions: int = 20_000
    num_clusters: int = 20
    dim: int = 16
    sharpness: float = 8.0
    popularity_exponent: float = 1.0
    feature_noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "num_users",
            "num_items",
            "num_interactions",
            "num_clusters",
            "dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"`{name}` should be a positive integer. "
                    f"Received: `{name}` = {value!r}."
                )
        if (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or self.seed < 0
        ):
            raise ConfigError(  # "seed" unquoted: the CLI reads `seed` as --seed
                "the synthetic seed should be a non-negative integer. Received: "
                f"seed={self.seed!r}."
            )
        for name in ("sharpness", "popularity_exponent", "feature_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"`{name}` should be a number. Received: `{name}` = {value!r}."
                )
        if self.num_clusters > self.num_items:
            raise ConfigError(
                "`num_clusters` should be at most `num_items`. Received: "
                f"num_clusters={self.num_clusters}, num_items={self.num_items}."
            )
        if not 0.0 <= self.feature_noise <= 1.0:
            raise ConfigError(
                "`feature_noise` should be in [0, 1]. "
                f"Received: `feature_noise` = {self.feature_noise!r}."
            )


def planted_clusters(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Planted structure: (favourite cluster per user [U], cluster per item [N])."""
    rng = np.random.default_rng(config.seed)
    user_probs, item_cluster = _latent(config, rng)
    return user_probs.argmax(axis=1), item_cluster


def _latent(
    config: SyntheticConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    centroids = rng.standard_normal((config.num_clusters, config.dim)).astype(
        np.float32
    )
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    user_factors = rng.standard_normal((config.num_users, config.dim)).astype(
        np.float32
    )
    user_factors /= np.linalg.norm(user_factors, axis=1, keepdims=True)
    logits = config.sharpness * (
        user_factors @ centroids.T
    )  # (U, D) @ (D, C) -> (U, C)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    # Every cluster gets at least one item; the rest are spread at random.
    item_cluster = np.concatenate(
        [
            np.arange(config.num_clusters),
            rng.integers(
                0, config.num_clusters, config.num_items - config.num_clusters
            ),
        ]
    )
    rng.shuffle(item_cluster)
    return probs, item_cluster


def _noisy(
    values: np.ndarray, high: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    flip = rng.random(len(values)) < noise
    return np.where(flip, rng.integers(0, high, len(values)), values)


def generate(
    config: SyntheticConfig | None = None, **overrides: int | float
) -> Dataset:
    """Generate a synthetic dataset.

    Args:
        config: the shape; defaults to :class:`SyntheticConfig()`.
        **overrides: fields of the config to override, e.g. ``num_items=10_000``.

    Returns:
        A :class:`Dataset` named ``synthetic`` with integer user/item IDs (1-based, as
        in MovieLens), timestamps, ratings 1..5, and user/item feature tables.
    """
    config = config or SyntheticConfig()
    if overrides:
        unknown = sorted(set(overrides) - set(config.__dict__))
        if unknown:
            raise ConfigError(
                f"unknown synthetic option(s) {unknown}; the options are "
                f"{sorted(config.__dict__)}."
            )
        config = SyntheticConfig(**{**config.__dict__, **overrides})
    rng = np.random.default_rng(config.seed)
    user_probs, item_cluster = _latent(config, rng)
    n, num_users, num_items = (
        config.num_interactions,
        config.num_users,
        config.num_items,
    )

    # Users: everyone at least once, the rest with a mildly skewed activity.
    activity = rng.pareto(2.0, num_users) + 1.0
    extra = rng.choice(
        num_users, size=max(n - num_users, 0), p=activity / activity.sum()
    )
    users = np.concatenate([np.arange(min(n, num_users)), extra])
    rng.shuffle(users)

    # Cluster per interaction by inverse CDF on the user's preferences.
    cdf = np.cumsum(user_probs, axis=1)
    cdf[:, -1] = 1.0
    draws = rng.random(n)
    clusters = np.empty(n, dtype=np.int64)
    for start in range(0, n, 1_000_000):  # bounded memory: (chunk, C) at a time
        stop = min(start + 1_000_000, n)
        rows = cdf[users[start:stop]]
        clusters[start:stop] = (rows < draws[start:stop, None]).sum(axis=1)

    # Item within the cluster by a Zipf law over a random order of the cluster's items.
    order = np.argsort(item_cluster, kind="stable")
    counts = np.bincount(item_cluster, minlength=config.num_clusters)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    rank = np.arange(num_items) - offsets[item_cluster[order]]
    weight = 1.0 / np.power(rank + 1.0, config.popularity_exponent)
    within_cdf = np.cumsum(weight)
    cluster_total = within_cdf[offsets[1:] - 1]
    cluster_base = np.concatenate([[0.0], cluster_total[:-1]])
    # Per-cluster cumulative weights restart at 0: shift each cluster by its base.
    before = np.where(
        offsets[:-1] > 0, within_cdf[np.maximum(offsets[:-1] - 1, 0)], 0.0
    )
    target = before[clusters] + rng.random(n) * (cluster_total - cluster_base)[clusters]
    slot = np.searchsorted(within_cdf, target, side="right")
    slot = np.clip(slot, offsets[clusters], offsets[clusters + 1] - 1)
    items = order[slot]

    favourite = user_probs.argmax(axis=1)
    affinity = user_probs[users, item_cluster[items]]
    ratings = np.clip(
        np.rint(2.5 + 6.0 * affinity + rng.normal(0.0, 0.7, n)), 1, 5
    ).astype(np.float32)
    times = np.sort(rng.integers(_START, _START + _SPAN, n))

    interactions = pl.DataFrame(
        {
            USER: users.astype(np.int64) + 1,
            ITEM: items.astype(np.int64) + 1,
            TIME: times.astype(np.int64),
            RATING: ratings,
        }
    )
    noise = config.feature_noise
    user_table = pl.DataFrame(
        {
            USER: np.arange(1, num_users + 1, dtype=np.int64),
            "age": (18 + 3 * (favourite % 15) + rng.integers(0, 3, num_users)).astype(
                np.int64
            ),
            "segment": _noisy(favourite, config.num_clusters, noise, rng),
        }
    ).with_columns(pl.format("s{}", "segment").alias("segment"))
    category = _noisy(item_cluster, config.num_clusters, noise, rng)
    word = rng.integers(0, 8, (num_items, 2))
    item_table = pl.DataFrame(
        {
            ITEM: np.arange(1, num_items + 1, dtype=np.int64),
            "cluster": item_cluster,
            "w0": word[:, 0],
            "w1": word[:, 1],
            "category": category,
            "price": (5.0 + 2.0 * item_cluster + rng.gamma(2.0, 1.0, num_items)).astype(
                np.float32
            ),
        }
    ).select(
        ITEM,
        pl.format("c{}w{} c{}w{} item{}", "cluster", "w0", "cluster", "w1", ITEM).alias(
            "title"
        ),
        pl.format("cat{}", "category").alias("category"),
        "price",
    )
    return Dataset(
        name="synthetic",
        interactions=interactions,
        users=user_table,
        items=item_table,
        source=f"synthetic({config})",
    )


def planted_impressions(
    *, users: int = 150, per_user: int = 12, seed: int = 0
) -> pl.DataFrame:
    """An impression log where only what was shown and not chosen tells good items
    from bad ones: each of ``per_user`` impressions per user (a minute apart)
    shows one of 40 good items (1..40, chosen half the time) and ten of 40 bad ones
    (41..80, each chosen 1 time in 20), so both kinds are chosen about as often.
    A ranker that learns from the shown rows nears the planted ceiling of the
    click AUC against the shown items, 0.725 (a chosen item is good half the
    time, a shown one 1 in 20).

    Returns:
        ``user_id``, ``item_id``, ``timestamp``, ``clicked`` (1/0) and ``kind``
        (``"good"`` / ``"bad"``), a row per item shown.
    """
    rng = np.random.default_rng(seed)
    rows = []
    time = _START
    for user in range(1, users + 1):
        for _ in range(per_user):
            time += 60
            for item in [int(rng.integers(1, 41)), *rng.choice(np.arange(41, 81), 10)]:
                chance = 0.5 if item <= 40 else 0.05
                rows.append((user, int(item), time, int(rng.random() < chance)))
    frame = pl.DataFrame(
        rows, schema=["user_id", "item_id", "timestamp", "clicked"], orient="row"
    )
    good = pl.col("item_id") <= 40
    return frame.with_columns(
        kind=pl.when(good).then(pl.lit("good")).otherwise(pl.lit("bad"))
    )


def write_parquet(
    directory: str | Path,
    *,
    num_users: int,
    num_items: int,
    num_interactions: int,
    num_clusters: int = 50,
    rows_per_file: int = 10_000_000,
    rows_per_group: int = 1_000_000,
    seed: int = 0,
) -> list[Path]:
    """Write a planted-structure log straight to Parquet, a chunk at a time, for logs
    larger than memory (10^8 rows and more; memory holds one row group).

    User ``u`` favours cluster ``u % num_clusters``: 80% of their rows are items of
    that cluster (``item % num_clusters``), the rest any item; within either, item
    popularity follows a power law. Columns: ``user_id``, ``item_id`` (Int64),
    ``timestamp`` (Int64, increasing over the log), ``rating`` (Float32, 1..5,
    higher inside the favoured cluster).

    Returns:
        The files written, ``part-00000.parquet`` ...
    """
    import pyarrow as pa

    for name, value in (
        ("num_users", num_users),
        ("num_items", num_items),
        ("num_interactions", num_interactions),
        ("rows_per_group", rows_per_group),
    ):
        if value < 1:
            raise ConfigError(f"`{name}` should be >= 1. Received: {value!r}.")
    if num_items < num_clusters:
        raise ConfigError(
            f"`num_items` should be >= `num_clusters` ({num_clusters}). "
            f"Received: {num_items!r}."
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_cluster = num_items // num_clusters
    # Power-law popularity: the cumulative weights, sampled by inverse transform.
    local_cdf = np.cumsum(1.0 / np.arange(1, per_cluster + 1) ** 0.8)
    local_cdf /= local_cdf[-1]
    global_cdf = np.cumsum(1.0 / np.arange(1, num_items + 1) ** 0.8)
    global_cdf /= global_cdf[-1]
    global_order = rng.permutation(num_items)  # which item holds each popularity rank
    files: list[Path] = []
    writer = None
    written = in_file = 0
    try:
        while written < num_interactions:
            n = min(rows_per_group, num_interactions - written)
            users = rng.integers(0, num_users, n)
            favoured = rng.random(n) < 0.8
            cluster_rank = np.searchsorted(local_cdf, rng.random(n))
            items = np.where(
                favoured,
                cluster_rank * num_clusters + users % num_clusters,
                global_order[np.searchsorted(global_cdf, rng.random(n))],
            )
            liked = favoured | (items % num_clusters == users % num_clusters)
            ratings = np.clip(
                np.where(liked, 4.0, 2.5) + rng.normal(0, 1, n), 1, 5
            ).round()
            times = _START + (np.arange(written, written + n) * _SPAN) // max(
                num_interactions, 1
            )
            table = pa.table(
                {
                    USER: users.astype(np.int64),
                    ITEM: items.astype(np.int64),
                    TIME: times.astype(np.int64),
                    RATING: ratings.astype(np.float32),
                }
            )
            if writer is None or in_file >= rows_per_file:
                if writer is not None:
                    writer.close()
                files.append(out / f"part-{len(files):05d}.parquet")
                writer = pq.ParquetWriter(files[-1], table.schema)
                in_file = 0
            writer.write_table(table, row_group_size=rows_per_group)
            written += n
            in_file += n
    finally:
        if writer is not None:
            writer.close()
    return files
