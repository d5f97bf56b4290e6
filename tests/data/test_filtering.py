"""Minimum rows per user and item (k-core), applied until no row moves."""

from collections import Counter

import polars as pl
import pytest

from twostage.data.dataset import Dataset
from twostage.data.filtering import min_counts
from twostage.data.synthetic import generate
from twostage.errors import ConfigError, DataError


def _log(pairs: list[tuple[int, int]]) -> Dataset:
    frame = pl.DataFrame(
        {
            "user_id": [u for u, _ in pairs],
            "item_id": [i for _, i in pairs],
            "timestamp": list(range(len(pairs))),
        }
    )
    return Dataset("log", frame)


def test_min_counts_repeat_until_every_user_and_item_has_enough() -> None:
    # Item 9 has 2 rows; once it goes, user 3 (whose rows were 9 and 1) has one
    # row left and must go too, which leaves item 1 with 2 rows: a third round.
    pairs = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 9), (4, 9), (4, 2), (5, 1)]
    pairs += [(5, 2), (6, 2), (6, 1)]
    filtered, removed = min_counts(_log(pairs), users=2, items=3)
    frame = filtered.interactions
    assert frame.group_by("user_id").len()["len"].min() >= 2
    assert frame.group_by("item_id").len()["len"].min() >= 3
    assert removed.rows == len(pairs) - frame.height
    assert removed.users == 6 - frame["user_id"].n_unique()
    assert removed.items == 3 - frame["item_id"].n_unique()
    assert removed.rounds >= 2
    assert "removed" in removed.summary()


def test_min_counts_match_a_plain_python_k_core() -> None:
    """The k-core is unique: peeling users and items one side at a time, in
    plain Python, ends at the same rows as the vectorised rule."""
    data = generate(num_users=200, num_items=150, num_interactions=3000, seed=4)
    filtered, removed = min_counts(data, users=15, items=10)
    rows = list(data.interactions.select("user_id", "item_id", "timestamp").rows())
    while True:
        users = Counter(u for u, _, _ in rows)
        kept = [r for r in rows if users[r[0]] >= 15]
        items = Counter(i for _, i, _ in kept)
        kept = [r for r in kept if items[r[1]] >= 10]
        if len(kept) == len(rows):
            break
        rows = kept
    got = filtered.interactions.select("user_id", "item_id", "timestamp").rows()
    assert sorted(got) == sorted(rows) and len(rows) > 0
    assert removed.rows == data.num_interactions - len(rows) > 0
    # No minimum: nothing moves.
    same, nothing = min_counts(data)
    assert same.interactions.equals(data.interactions) and nothing.rows == 0


def test_min_counts_refuse_bad_minimums_and_an_emptied_log() -> None:
    log = _log([(1, 1), (2, 2)])
    for value in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="minimum count"):
            min_counts(log, users=value)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="every row of the log"):
        min_counts(log, users=5)
