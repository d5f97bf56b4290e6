"""Maximal marginal relevance and intra-list diversity, against naive loops."""

import math

import pytest
import torch

from twostage.diversity import check_diversity, diversify, intra_list_diversity
from twostage.errors import ConfigError


def naive_mmr(keys: list[float], vectors: torch.Tensor, k: int, weight: float) -> list:
    """One list by the textbook loop: relevance scaled over the filled slots,
    the highest cosine to a picked item, empty slots last in their order."""
    filled = [i for i, key in enumerate(keys) if math.isfinite(key)]
    low, high = min(keys[i] for i in filled), max(keys[i] for i in filled)
    unit = torch.nn.functional.normalize(vectors, dim=1)
    picked: list[int] = []
    while len(picked) < min(k, len(filled)):
        best, best_value = None, -math.inf
        for i in filled:
            if i in picked:
                continue
            relevance = (keys[i] - low) / (high - low) if high > low else 1.0
            closest = max((float(unit[i] @ unit[j]) for j in picked), default=0.0)
            value = (1 - weight) * relevance - weight * closest
            if value > best_value + 1e-6:
                best, best_value = i, value
        picked.append(best)
    empty = [i for i in range(len(keys)) if i not in filled]
    return (picked + empty)[:k]


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
    assert got[2, 3:].tolist() == [3, 4]  # the empty slots after the filled ones


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
