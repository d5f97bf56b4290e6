import numpy as np
import pytest

from twostage.data.synthetic import SyntheticConfig, generate, planted_clusters
from twostage.errors import ConfigError


def test_shapes_ids_and_seed() -> None:
    a = generate(num_users=300, num_items=120, num_interactions=5000, seed=3)
    b = generate(num_users=300, num_items=120, num_interactions=5000, seed=3)
    assert a.interactions.equals(b.interactions)
    assert a.num_interactions == 5000
    assert a.num_users == 300  # everyone appears at least once
    assert a.interactions["item_id"].min() >= 1
    assert a.interactions["item_id"].max() <= 120
    assert a.users is not None and a.users.height == 300
    assert a.items is not None and a.items.height == 120
    assert a.interactions["timestamp"].is_sorted()


def test_popularity_is_skewed() -> None:
    data = generate(num_users=500, num_items=400, num_interactions=20000)
    counts = np.sort(data.interactions["item_id"].value_counts()["count"].to_numpy())
    top_decile = counts[-40:].sum() / counts.sum()
    assert top_decile > 0.25  # uniform would give 0.10


def test_users_prefer_their_planted_cluster() -> None:
    config = SyntheticConfig(num_users=400, num_items=200, num_interactions=20000)
    data = generate(config)
    favourite, item_cluster = planted_clusters(config)
    users = data.interactions["user_id"].to_numpy() - 1
    items = data.interactions["item_id"].to_numpy() - 1
    in_favourite = (item_cluster[items] == favourite[users]).mean()
    assert in_favourite > 5 * (1 / config.num_clusters)


def test_side_features_track_the_clusters() -> None:
    config = SyntheticConfig(num_items=300, feature_noise=0.0)
    data = generate(config)
    _, item_cluster = planted_clusters(config)
    assert data.items is not None
    category = data.items["category"].str.strip_prefix("cat").cast(int).to_numpy()
    np.testing.assert_array_equal(category, item_cluster)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ConfigError, match="num_items"):
        SyntheticConfig(num_items=0)
    with pytest.raises(ConfigError, match="num_clusters"):
        SyntheticConfig(num_items=5, num_clusters=10)
    # An unknown option and a fractional seed ended in TypeError tracebacks.
    with pytest.raises(ConfigError, match=r"unknown synthetic option\(s\) \['nope'\]"):
        generate(nope=3)
    with pytest.raises(ConfigError, match="synthetic seed should be"):
        generate(seed=1.5)
