"""Maximal marginal relevance, group limits and intra-list diversity, against
naive loops."""

import math

import pytest
import torch

from twostage.diversity import (
    check_diversity,
    diversify,
    intra_list_diversity,
    intra_list_value_diversity,
)
from twostage.errors import ConfigError


def naive_mmr(
    keys: list[float],
    vectors: torch.Tensor,
    k: int,
    weight: float,
    groups: list[list[int]] | None = None,
    limits: list[int] | None = None,
) -> list:
    """One list by the textbook loop: relevance scaled over the filled slots,
    the highest cosine to a picked item, a candidate skipped while one of its
    groups is full; -1 for each slot nothing was left to fill."""
    filled = [i for i, key in enumerate(keys) if math.isfinite(key)]
    low, high = min(keys[i] for i in filled), max(keys[i] for i in filled)
    unit = torch.nn.functional.normalize(vectors, dim=1)
    picked: list[int] = []
    held: dict[int, int] = {}
    for _ in range(min(k, len(keys))):
        best, best_value = None, -math.inf
        for i in filled:
            full = any(held.get(g, 0) >= limits[g] for g in (groups or {}).get(i, []))
            if i in picked or full:
                continue
            relevance = (keys[i] - low) / (high - low) if high > low else 1.0
            closest = max((float(unit[i] @ unit[j]) for j in picked), default=0.0)
            value = (1 - weight) * relevance - weight * closest
            if value > best_value + 1e-6:
                best, best_value = i, value
        if best is None:
            break
        picked.append(best)
        for g in (groups or {}).get(best, []):
            held[g] = held.get(g, 0) + 1
    return picked + [-1] * (min(k, len(keys)) - len(picked))


def test_a_planted_duplicate_gives_way_to_another_taste() -> None:
    """Three copies of one item lead the keys; with weight, the second pick is
    the other item, and weight 0 keeps the order as scored."""
    a, b = [1.0, 0.0], [0.0, 1.0]
    vectors = torch.tensor([[a, a, a, b]])
    keys = torch.tensor([[1.0, 0.99, 0.98, 0.5]])
    assert diversify(keys, vectors, 2, weight=0).tolist() == [[0, 1]]
    assert diversify(keys, vectors, 2, weight=0.5).tolist() == [[0, 3]]
    assert diversify(keys, vectors, 4, weight=0.5).tolist() == [[0, 3, 1, 2]]
    # A light weight does not overturn a wide gap in the keys.
    assert diversify(keys, vectors, 2, weight=0.2).tolist() == [[0, 1]]


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.3, 0.7, 1.0])
def test_rows_match_the_textbook_loop(weight: float) -> None:
    generator = torch.Generator().manual_seed(3)
    rows, width, k = 6, 12, 5
    keys = torch.randn(rows, width, generator=generator).sort(descending=True).values
    keys[1, 9:] = -math.inf  # rows run short
    keys[2, 3:] = -math.inf  # fewer filled slots than k
    vectors = torch.randn(rows, width, 4, generator=generator)
    got = diversify(keys, vectors, k, weight=weight)
    for row in range(rows):
        expected = naive_mmr(keys[row].tolist(), vectors[row], k, weight)
        assert got[row].tolist() == expected, row
    assert got[2, 3:].tolist() == [-1, -1]  # nothing left: after the picks


@pytest.mark.parametrize("weight", [0.0, 0.4])
def test_group_limits_match_the_textbook_loop(weight: float) -> None:
    """Each candidate in 0 to 3 of 4 groups (a list column's values); the
    limits 1, 2, 2, 3 pass over a candidate while one of its groups is full,
    and a row whose candidates all fall in full groups runs short."""
    generator = torch.Generator().manual_seed(5)
    rows, width, k = 5, 10, 6
    keys = torch.randn(rows, width, generator=generator).sort(descending=True).values
    vectors = torch.randn(rows, width, 3, generator=generator)
    member = torch.rand(rows, width, 4, generator=generator) < 0.4
    member[4] = False
    member[4, :, 0] = True  # every candidate of row 4 in group 0 (limit 1)
    groups = torch.where(member, torch.arange(4), -1)  # (B, C, G), -1 pads
    limits = torch.tensor([1, 2, 2, 3])
    got = diversify(keys, vectors, k, weight=weight, groups=groups, limits=limits)
    for row in range(rows):
        of = {c: [g for g in groups[row, c].tolist() if g >= 0] for c in range(width)}
        expected = naive_mmr(
            keys[row].tolist(), vectors[row], k, weight, of, limits.tolist()
        )
        assert got[row].tolist() == expected, row
    assert got[4].tolist() == [0, -1, -1, -1, -1, -1]


def test_equal_keys_and_zero_vectors_are_no_error() -> None:
    keys = torch.zeros(1, 4)
    vectors = torch.zeros(1, 4, 3)
    assert diversify(keys, vectors, 3, weight=0.5).tolist() == [[0, 1, 2]]
    assert diversify(keys, vectors, 9, weight=0.5).shape == (1, 4)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, True, "0.3", None])
def test_a_weight_outside_0_to_1_is_named(value: object) -> None:
    with pytest.raises(ConfigError, match="`diversity` should be a number from 0"):
        check_diversity(value)  # type: ignore[arg-type]
    assert check_diversity(1) == 1.0


def test_intra_list_diversity_is_the_mean_pairwise_cosine_distance() -> None:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 5, 4, generator=generator)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 3:] = False
    valid[2, 1:] = False
    got = intra_list_diversity(vectors, valid)
    for row in range(2):
        kept = vectors[row][valid[row]]
        unit = torch.nn.functional.normalize(kept, dim=1)
        pairs = [
            1 - float(unit[i] @ unit[j])
            for i in range(len(kept))
            for j in range(len(kept))
            if i != j
        ]
        assert float(got[row]) == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    assert math.isnan(float(got[2]))  # one item: no pair


def test_the_groups_of_a_list_column_and_of_a_plain_one() -> None:
    """A list column's item belongs to each of its values' groups, a null or an
    empty list to none; the groups are numbered from 0 over what the lists
    meet, each with its column's limit."""
    import polars as pl

    from twostage.inputs import ItemFilters

    frame = pl.DataFrame(
        {
            "item_id": [0, 1, 2, 3, 4],
            "genres": [None, ["a", "b"], ["b"], [], ["c"]],
            "brand": [None, "y", "x", None, "y"],  # row 0: the padding item
        }
    )
    filters = ItemFilters(frame)
    items = torch.tensor([[1, 2, 3, -1], [4, 2, 1, 0]])
    groups, limits = filters.groups(items, {"genres": 2, "brand": 1})
    named = {}
    for row in range(2):
        for slot in range(4):
            named[(row, slot)] = sorted(g for g in groups[row, slot].tolist() if g >= 0)
    a, b, c = named[(0, 0)][0], named[(0, 1)][0], named[(1, 0)][0]  # genres first
    x, y = named[(0, 1)][1], named[(0, 0)][2]
    assert named[(0, 0)] == sorted([a, b, y]) and named[(0, 1)] == sorted([b, x])
    assert named[(0, 2)] == [] and named[(0, 3)] == []  # [] and null; -1: none
    assert named[(1, 0)] == sorted([c, y]) and named[(1, 3)] == []  # the padding row
    assert sorted([a, b, c, x, y]) == list(range(5))
    assert [limits[g] for g in (a, b, c, x, y)] == [2, 2, 2, 1, 1]
    with pytest.raises(ConfigError, match="unknown `max_per` column"):
        filters.check_max_per({"size": 2})
    assert filters.check_max_per(None) == {}


def _value_sets(generator: torch.Generator, rows: int, width: int) -> torch.Tensor:
    """``[rows, width, 3]`` random sets of 0 to 3 of 6 values (-1 pads)."""
    values = torch.full((rows, width, 3), -1, dtype=torch.long)
    for row in range(rows):
        for slot in range(width):
            count = int(torch.randint(0, 4, (1,), generator=generator))
            chosen = torch.randperm(6, generator=generator)[:count]
            values[row, slot, :count] = chosen
    return values


def _multi_hot(values: torch.Tensor) -> torch.Tensor:
    """``[..., 6]`` the rows of ``values``' sets."""
    hot = torch.zeros(*values.shape[:-1], 7)
    hot.scatter_(-1, values.clamp_min(-1) % 7, 1.0)
    return hot[..., :6]  # (a pad, -1, lands in the 7th column, dropped)


@pytest.mark.parametrize("weight", [0.3, 0.7, 1.0])
def test_likeness_by_values_is_the_cosine_of_their_multi_hot_rows(
    weight: float,
) -> None:
    """`values` (a metadata column's values per candidate) pick as the
    textbook loop picks with each candidate's multi-hot row as its vector:
    shared values over the root of the two counts; a candidate without a
    value is like none."""
    generator = torch.Generator().manual_seed(5)
    rows, width, k = 6, 12, 6
    keys = torch.randn(rows, width, generator=generator).sort(descending=True).values
    keys[1, 8:] = -math.inf
    values = _value_sets(generator, rows, width)
    got = diversify(keys, None, k, weight=weight, values=values)
    hot = _multi_hot(values)
    for row in range(rows):
        expected = naive_mmr(keys[row].tolist(), hot[row], k, weight)
        assert got[row].tolist() == expected, row
    # The spread of the lists by the same likeness, against a pairwise loop.
    lists = values[:, :5]
    valid = torch.ones(rows, 5, dtype=torch.bool)
    valid[2, 3:] = False
    valid[3, 1:] = False  # one item: no pair
    spread = intra_list_value_diversity(lists, valid)
    unit = torch.nn.functional.normalize(hot[:, :5], dim=2)
    for row in range(rows):
        kept = [i for i in range(5) if valid[row, i]]
        pairs = [(i, j) for i in kept for j in kept if i != j]
        if not pairs:
            assert math.isnan(float(spread[row]))
            continue
        mean = sum(1 - float(unit[row, i] @ unit[row, j]) for i, j in pairs) / len(
            pairs
        )
        assert float(spread[row]) == pytest.approx(mean, abs=1e-6), row


def test_value_diversity_in_blocks_equals_one_pass() -> None:
    """Many lists of long value sets are measured a block at a time (the pairs
    of values would otherwise fill memory): the same figures."""
    generator = torch.Generator().manual_seed(9)
    values = torch.randint(-1, 40, (300, 10, 30), generator=generator)
    valid = torch.rand(300, 10, generator=generator) > 0.1
    whole = torch.cat(
        [
            intra_list_value_diversity(values[i : i + 1], valid[i : i + 1])
            for i in range(300)
        ]
    )
    got = intra_list_value_diversity(values, valid)
    assert torch.allclose(got, whole, equal_nan=True)
