"""Metrics and evaluation against a naive reference and hand-computed answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError
from twostage.evaluate import EvalResult, evaluate_embeddings, evaluate_scores
from twostage.metrics import (
    METRIC_NAMES,
    RANKING_METRICS,
    MetricAccumulator,
    QueryFigures,
    compute_metrics,
    paired_standard_error,
    per_query_metrics,
)

# --------------------------------------------------------------------------- reference


def naive_metrics(
    topk: list[list[int]],
    relevant: list[set[int]],
    ks: tuple[int, ...],
    valid: set[int],
) -> dict[str, dict[int, float]]:
    """Textbook definitions with Python loops and sets."""
    out: dict[str, dict[int, float]] = {name: {} for name in METRIC_NAMES}
    judged = [q for q, rel in enumerate(relevant) if rel]
    num_pairs = sum(len(rel) for rel in relevant)
    for k in ks:
        recall = ndcg = hit = rr = 0.0
        pair_hits = 0
        for q in judged:
            rel, ranked = relevant[q], topk[q][:k]
            hits = [item in rel for item in ranked]
            recall += sum(hits) / len(rel)
            dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
            ndcg += dcg / idcg
            hit += any(hits)
            rr += next((1 / (r + 1) for r, h in enumerate(hits) if h), 0.0)
        for q, rel in enumerate(relevant):
            pair_hits += sum(1 for item in rel if item in topk[q][:k])
        n = len(judged)
        out["recall"][k] = recall / n if n else math.nan
        out["ndcg"][k] = ndcg / n if n else math.nan
        out["hit_rate"][k] = hit / n if n else math.nan
        out["mrr"][k] = rr / n if n else math.nan
        out["factorized_top_k"][k] = pair_hits / num_pairs if num_pairs else math.nan
        shown = {item for ranked in topk for item in ranked[:k]} & valid
        out["coverage"][k] = len(shown) / len(valid) if valid else math.nan
    return out


def naive_topk(
    scores: np.ndarray, seen: list[set[int]], valid: np.ndarray, k: int, exclude: bool
) -> list[list[int]]:
    """Per query: sort all allowed items by score, best first."""
    out = []
    for q in range(scores.shape[0]):
        allowed = [
            i
            for i in range(scores.shape[1])
            if valid[i] and not (exclude and i in seen[q])
        ]
        out.append(sorted(allowed, key=lambda i: -scores[q, i])[:k])
    return out


def as_sets(items: UserItems) -> list[set[int]]:
    return [set(items.row(r).tolist()) for r in range(items.num_rows)]


def assert_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        for k in want[name]:
            g, w = got[name][k], want[name][k]
            assert (math.isnan(g) and math.isnan(w)) or abs(g - w) <= tol, (
                name,
                k,
                g,
                w,
            )


def assert_nested_close(got: object, want: object) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            assert_nested_close(got[key], want[key])
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-12, nan_ok=True)
    else:
        assert got == want


def random_sets(rng: np.random.Generator, rows: int, num_items: int, n: int):
    return UserItems.from_pairs(
        rng.integers(0, rows, n), rng.integers(0, num_items, n), num_rows=rows
    )


# --------------------------------------------------------------------------- UserItems


def test_user_items_from_pairs_sorts_and_dedupes():
    items, counts = UserItems.from_pairs_counted(
        [2, 0, 0, 2, 0], [5, 3, 1, 5, 3], num_rows=4
    )
    assert items.indptr.tolist() == [0, 2, 2, 3, 3]
    assert items.indices.tolist() == [1, 3, 5]
    assert counts.tolist() == [1, 2, 2]
    assert items.take([2, 0, 9]).indices.tolist() == [5, 1, 3]
    assert items.slice(1, 3).indices.tolist() == [5]
    other = UserItems.from_pairs([0], [3], num_rows=4)
    assert items.difference(other).indices.tolist() == [1, 5]
    mask = np.array([False, True, False, False, False, True])
    assert items.filter_items(mask).indices.tolist() == [1, 5]


@pytest.mark.parametrize("one_key", [True, False])
def test_user_items_from_pairs_counts_every_pair_by_either_sort(monkeypatch, one_key):
    # The one-int64-key sort and the two-key fallback (for rows x items beyond
    # int64) must build the same sets and counts as counting the pairs by hand.
    import twostage.data.user_items as user_items

    if not one_key:
        monkeypatch.setattr(user_items, "_ONE_KEY_LIMIT", 0)
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 40, 2000)
    items = rng.integers(0, 30, 2000) ** 2  # sparse, large item indices
    sets, counts = UserItems.from_pairs_counted(rows, items, num_rows=45)
    expected: dict[tuple[int, int], int] = {}
    for r, i in zip(rows.tolist(), items.tolist(), strict=True):
        expected[(r, i)] = expected.get((r, i), 0) + 1
    pairs = sorted(expected)
    assert sets.num_rows == 45
    assert sets.row_ids().tolist() == [r for r, _ in pairs]
    assert sets.indices.tolist() == [i for _, i in pairs]
    assert counts.tolist() == [expected[p] for p in pairs]
    assert counts.dtype == np.int64
    empty, none = UserItems.from_pairs_counted([], [], num_rows=3)
    assert empty.indptr.tolist() == [0, 0, 0, 0] and none.size == 0


def test_user_items_rejects_unsorted_rows_and_bad_pairs():
    with pytest.raises(DataError, match="sorted and unique"):
        UserItems(indptr=np.array([0, 2]), indices=np.array([3, 1]))
    with pytest.raises(DataError, match="num_rows"):
        UserItems.from_pairs([0, 5], [1, 1], num_rows=3)
    with pytest.raises(DataError, match="same length"):
        UserItems.from_pairs([0, 1], [1])


# --------------------------------------------------------------------------- metrics


def test_known_answer_three_users():
    # A: hits at ranks 1 and 3 of 2 relevant; B: hit at rank 3; C: no hit;
    # D has nothing relevant and is left out of the per-user means.
    topk = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 4, 7]])
    relevant = UserItems.from_pairs([0, 0, 1, 2], [1, 3, 6, 0], num_rows=4)
    got = compute_metrics(topk, relevant, ks=(1, 3), num_items=10)
    ndcg_a = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert got["ndcg"][3] == pytest.approx((ndcg_a + 0.5 + 0.0) / 3, abs=1e-12)
    assert got["ndcg"][1] == pytest.approx(1 / 3)
    assert got["recall"][1] == pytest.approx(0.5 / 3)
    assert got["recall"][3] == pytest.approx((1 + 1 + 0) / 3)
    assert got["hit_rate"][3] == pytest.approx(2 / 3)
    assert got["mrr"][3] == pytest.approx((1 + 1 / 3) / 3)
    assert got["mrr"][1] == pytest.approx(1 / 3)
    assert got["factorized_top_k"][3] == pytest.approx(3 / 4)
    assert got["coverage"][1] == pytest.approx(3 / 10)  # items 1, 4, 7
    per = per_query_metrics(topk, relevant, ks=(3,))
    assert per["ndcg"][0, 0].item() == pytest.approx(ndcg_a)
    assert math.isnan(per["ndcg"][3, 0].item())
    assert per["num_relevant"].tolist() == [2, 1, 1, 0]


@st.composite
def rankings(draw):
    num_items = draw(st.integers(1, 12))
    num_queries = draw(st.integers(1, 6))
    width = draw(st.integers(1, 8))
    rows, relevant = [], []
    for _ in range(num_queries):
        perm = draw(st.permutations(range(num_items)))
        filled = draw(st.integers(0, min(width, num_items)))
        rows.append(list(perm[:filled]) + [-1] * (width - filled))
        relevant.append(draw(st.sets(st.integers(0, num_items - 1), max_size=5)))
    ks = draw(st.sets(st.integers(1, width), min_size=1, max_size=3))
    valid = draw(st.lists(st.booleans(), min_size=num_items, max_size=num_items))
    return num_items, rows, relevant, tuple(sorted(ks)), np.array(valid)


@settings(max_examples=150, deadline=None)
@given(rankings())
def test_metrics_match_naive_reference(case):
    num_items, rows, relevant, ks, valid = case
    pairs = [(q, i) for q, rel in enumerate(relevant) for i in rel]
    rel_items = UserItems.from_pairs(
        [q for q, _ in pairs], [i for _, i in pairs], num_rows=len(rows)
    )
    got = compute_metrics(
        torch.tensor(rows), rel_items, ks=ks, num_items=num_items, valid_items=valid
    )
    ranked = [[i for i in row if i >= 0] for row in rows]
    want = naive_metrics(ranked, relevant, ks, set(np.flatnonzero(valid).tolist()))
    assert_close(got, want)


def test_metrics_reject_bad_rankings():
    relevant = UserItems.from_pairs([0], [1], num_rows=1)
    with pytest.raises(DataError, match="repeat"):
        compute_metrics(torch.tensor([[1, 1]]), relevant, ks=(2,), num_items=3)
    with pytest.raises(DataError, match="columns"):
        compute_metrics(torch.tensor([[1, 2]]), relevant, ks=(5,), num_items=3)
    with pytest.raises(ConfigError, match="ks"):
        compute_metrics(torch.tensor([[1, 2]]), relevant, ks=(0,), num_items=3)
    with pytest.raises(DataError, match="num_items"):
        compute_metrics(torch.tensor([[1, 7]]), relevant, ks=(2,), num_items=3)


def test_factorized_top_k_weighs_interactions_not_users():
    # User 0: three test items, all in the top 3; user 1: one test item, missed.
    topk = torch.tensor([[1, 2, 3], [1, 2, 3]])
    relevant = UserItems.from_pairs([0, 0, 0, 1], [1, 2, 3, 4], num_rows=2)
    got = compute_metrics(topk, relevant, ks=(3,), num_items=5)
    assert got["factorized_top_k"][3] == pytest.approx(3 / 4)
    assert got["recall"][3] == pytest.approx(1 / 2)


# --------------------------------------------------------------------------- evaluate


def make_case(seed: int = 0, num_queries: int = 23, num_items: int = 17):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(num_queries, num_items))
    seen = random_sets(rng, num_queries, num_items, 60)
    relevant = random_sets(rng, num_queries, num_items, 40)
    valid = np.ones(num_items, dtype=bool)
    valid[0] = False  # the OOV row
    return scores, seen, relevant, valid


def score_table(scores: np.ndarray):
    table = torch.from_numpy(scores)
    return lambda batch: table[batch]


@pytest.mark.parametrize("mode", ["exclude_seen", "include_seen"])
def test_evaluate_scores_matches_naive_protocol(mode):
    scores, seen, relevant, valid = make_case()
    ks = (1, 3, 10)
    result = evaluate_scores(
        score_table(scores),
        num_items=scores.shape[1],
        queries=np.arange(scores.shape[0]),
        relevant=relevant,
        seen=seen,
        ks=ks,
        exclude_seen=mode == "exclude_seen",
        batch_size=5,
        valid_items=valid,
    )
    exclude = mode == "exclude_seen"
    seen_sets, rel_sets = as_sets(seen), as_sets(relevant)
    if exclude:  # the protocol: seen test items leave the relevant set
        rel_sets = [rel - s for rel, s in zip(rel_sets, seen_sets, strict=True)]
    ranked = naive_topk(scores, seen_sets, valid, max(ks), exclude)
    want = naive_metrics(ranked, rel_sets, ks, set(np.flatnonzero(valid).tolist()))
    assert result.modes == (mode,)
    assert_close(result.metrics[mode], want)
    assert result.counts[mode]["num_test_interactions"] == sum(map(len, rel_sets))


def test_exclude_seen_never_ranks_a_seen_or_invalid_item():
    num_items = 8
    # Everyone has seen items 1, 2, 3 and the model loves them and the OOV row 0.
    scores = np.tile(np.arange(num_items, 0, -1, dtype=float), (4, 1))
    seen = UserItems.from_pairs(np.repeat(np.arange(4), 3), np.tile([1, 2, 3], 4))
    relevant = UserItems.from_pairs([0, 1, 2, 3], [4, 4, 0, 1], num_rows=4)
    valid = np.ones(num_items, dtype=bool)
    valid[0] = False
    loved = np.zeros(num_items, dtype=bool)
    loved[:4] = True
    result = evaluate_scores(
        score_table(scores),
        num_items=num_items,
        queries=np.arange(4),
        relevant=relevant,
        seen=seen,
        ks=(1, 7),
        exclude_seen="both",
        valid_items=valid,
        item_slices={"loved": loved},
    )
    loved_cov = result.slices["loved"].metrics
    assert loved_cov["exclude_seen"]["coverage"][7] == 0.0  # 1, 2, 3 never shown
    assert loved_cov["include_seen"]["coverage"][7] == 1.0  # ... 0 is not in universe
    ex = result.metrics["exclude_seen"]
    # Item 4 comes first for queries 0 and 1; query 2 wants the unrankable OOV row.
    assert ex["hit_rate"][1] == pytest.approx(2 / 3)
    # Query 3's test item 1 was seen: dropped under exclude_seen, a hit otherwise.
    assert result.counts["exclude_seen"]["num_test_interactions"] == 3
    assert result.counts["include_seen"]["num_test_interactions"] == 4
    assert result.metrics["include_seen"]["hit_rate"][1] == pytest.approx(1 / 4)
    # The OOV row is never ranked, so query 2's test item 0 is a miss even at 7.
    assert ex["recall"][7] == pytest.approx(2 / 3)
    # Only 4 items are rankable under exclude_seen: the lists are padded with -1.
    assert ex["coverage"][7] == pytest.approx(4 / 7)


def test_chunked_evaluation_equals_one_shot():
    scores, seen, relevant, valid = make_case(seed=1)
    options = dict(
        num_items=scores.shape[1],
        queries=np.arange(scores.shape[0]),
        relevant=relevant,
        seen=seen,
        ks=(1, 5, 10),
        exclude_seen="both",
        valid_items=valid,
        slices={"even": np.arange(scores.shape[0]) % 2 == 0},
    )
    results = [
        evaluate_scores(score_table(scores), batch_size=b, **options).to_dict()
        for b in (1, 4, 1000)
    ]
    # Equal up to the order of float summation.
    for other in results[1:]:
        assert_nested_close(other, results[0])


@pytest.mark.parametrize("item_batch_size", [1, 5, 17, 64])
def test_evaluate_embeddings_equals_evaluate_scores(item_batch_size):
    rng = np.random.default_rng(2)
    query_emb = torch.from_numpy(rng.normal(size=(19, 4)))
    item_emb = torch.from_numpy(rng.normal(size=(17, 4)))
    _, seen, relevant, valid = make_case(seed=2, num_queries=19)
    options = dict(
        relevant=relevant,
        seen=seen,
        ks=(1, 3, 20),  # 20 > num_items: padded lists
        exclude_seen="both",
        batch_size=6,
        valid_items=valid,
        slices={"first": np.arange(19) < 7},
        item_slices={"low": np.arange(17) < 9},
    )
    by_scores = evaluate_scores(
        lambda batch: query_emb[batch] @ item_emb.T,
        num_items=17,
        queries=np.arange(19),
        **options,
    )
    by_emb = evaluate_embeddings(
        query_emb, item_emb, item_batch_size=item_batch_size, **options
    )
    assert_nested_close(by_emb.to_dict(), by_scores.to_dict())


def test_slices_equal_evaluating_the_subset():
    scores, seen, relevant, valid = make_case(seed=3)
    cold = np.arange(scores.shape[0]) % 3 == 0
    low = np.arange(scores.shape[1]) < 8
    common = dict(num_items=scores.shape[1], ks=(1, 5), valid_items=valid)
    full = evaluate_scores(
        score_table(scores),
        queries=np.arange(scores.shape[0]),
        relevant=relevant,
        seen=seen,
        slices={"cold_users": cold},
        item_slices={"low_items": low},
        **common,
    )
    rows = np.flatnonzero(cold)
    subset = evaluate_scores(
        score_table(scores),
        queries=rows,
        relevant=relevant.take(rows),
        seen=seen.take(rows),
        **common,
    )
    assert_nested_close(full.slices["cold_users"].to_dict(), subset.to_dict())
    assert full.slices["cold_users"].num_queries == rows.size
    restricted = evaluate_scores(
        score_table(scores),
        queries=np.arange(scores.shape[0]),
        relevant=relevant.filter_items(low),
        seen=seen,
        **common,
    )
    got, want = full.slices["low_items"].metrics, restricted.metrics
    for name in ("recall", "ndcg", "hit_rate", "mrr", "factorized_top_k"):
        assert_nested_close(got["exclude_seen"][name], want["exclude_seen"][name])


def test_queries_without_relevant_items_are_counted_not_averaged():
    scores = np.array([[0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    relevant = UserItems.from_pairs([0], [1], num_rows=3)
    result = evaluate_scores(
        score_table(scores),
        num_items=3,
        queries=np.arange(3),
        relevant=relevant,
        ks=(1,),
        exclude_seen=False,
    )
    counts = result.counts["include_seen"]
    assert counts["num_queries"] == 3
    assert counts["num_queries_without_relevant"] == 2
    assert result.metrics["include_seen"]["recall"][1] == 1.0


def test_standard_errors_are_those_of_the_per_query_means():
    rng = np.random.default_rng(11)
    num_items, ks = 30, (1, 5, 10)
    relevant = random_sets(rng, 40, num_items, 90)  # some rows without items
    topk = torch.from_numpy(
        np.stack([rng.permutation(num_items)[:10] for _ in range(40)])
    )
    whole = MetricAccumulator(ks=ks, num_items=num_items)
    whole.update(topk, relevant)
    parts = MetricAccumulator(ks=ks, num_items=num_items)
    for start in range(0, 40, 7):  # batches add up to the same errors
        stop = min(start + 7, 40)
        parts.update(topk[start:stop], relevant.slice(start, stop))
    per = per_query_metrics(topk, relevant, ks=ks)
    judged = ~np.isnan(per["ndcg"][:, 0].numpy())
    assert 2 < judged.sum() < 40
    for errors in (whole.standard_errors(), parts.standard_errors()):
        assert errors.keys() == set(RANKING_METRICS)
        for name in RANKING_METRICS:
            values = per[name].numpy()[judged]
            want = values.std(axis=0, ddof=1) / math.sqrt(len(values))
            assert [errors[name][k] for k in ks] == pytest.approx(want, abs=1e-12)
    assert whole.standard_errors()["ndcg"][10] > 0
    one = MetricAccumulator(ks=(1,), num_items=3)
    one.update(torch.tensor([[1]]), UserItems.from_pairs([0], [1], num_rows=1))
    assert math.isnan(one.standard_errors()["ndcg"][1])  # one query: no spread


def test_kept_queries_give_the_standard_error_of_paired_differences():
    rng = np.random.default_rng(12)
    num_items, ks = 30, (1, 5, 10)
    relevant = random_sets(rng, 40, num_items, 90)  # some rows without items
    topk_a = np.stack([rng.permutation(num_items)[:10] for _ in range(40)])
    topk_b = topk_a.copy()
    topk_b[::3] = np.stack([rng.permutation(num_items)[:10] for _ in range(14)])
    a = MetricAccumulator(ks=ks, num_items=num_items, keep_queries=True)
    for start in range(0, 40, 7):  # rows follow the batches added before
        stop = min(start + 7, 40)
        a.update(torch.from_numpy(topk_a[start:stop]), relevant.slice(start, stop))
    b = MetricAccumulator(ks=ks, num_items=num_items, keep_queries=True)
    for start in reversed(range(0, 40, 9)):  # any order, rows given
        stop = min(start + 9, 40)
        rows = np.arange(start, stop)
        b.update(
            torch.from_numpy(topk_b[start:stop]), relevant.slice(start, stop), rows
        )
    per_a = per_query_metrics(torch.from_numpy(topk_a), relevant, ks=ks)
    per_b = per_query_metrics(torch.from_numpy(topk_b), relevant, ks=ks)
    judged = ~np.isnan(per_a["ndcg"][:, 0].numpy())
    kept_a, kept_b = a.queries(), b.queries()
    np.testing.assert_array_equal(kept_a.rows, np.flatnonzero(judged))
    np.testing.assert_array_equal(kept_b.rows, kept_a.rows)
    for name in RANKING_METRICS:
        for j, k in enumerate(ks):
            want = per_a[name][:, j].numpy()[judged]
            np.testing.assert_allclose(kept_a.of(name, k), want, rtol=1e-6)
    for name, k, j in (("ndcg", 10, 2), ("recall", 5, 1), ("hit_rate", 1, 0)):
        diff = (per_a[name][:, j] - per_b[name][:, j]).numpy()[judged]
        want = diff.std(ddof=1) / math.sqrt(diff.size)
        assert paired_standard_error(kept_a, kept_b, name, k) == pytest.approx(want)
    # Two thirds of the lists are the same: the paired error is well below the
    # unpaired sqrt(a ** 2 + b ** 2) (about sqrt(1 / 3) of it).
    unpaired = math.hypot(
        a.standard_errors()["ndcg"][10], b.standard_errors()["ndcg"][10]
    )
    assert 0 < paired_standard_error(kept_a, kept_b) < 0.75 * unpaired
    # Queries are matched by row: those only one side measured are left out.
    half = QueryFigures(ks=ks, rows=kept_b.rows[::2], values=kept_b.values[::2])
    diff = kept_a.of("ndcg", 10)[::2].astype(np.float64) - half.of("ndcg", 10)
    want = diff.std(ddof=1) / math.sqrt(diff.size)
    assert paired_standard_error(half, kept_a) == pytest.approx(want, rel=1e-6)
    one = QueryFigures(ks=ks, rows=kept_b.rows[:1], values=kept_b.values[:1])
    assert math.isnan(paired_standard_error(kept_a, one))
    with pytest.raises(ConfigError, match="keep_queries=True"):
        MetricAccumulator(ks=ks, num_items=num_items).queries()
    with pytest.raises(ConfigError, match="`k` one of"):
        kept_a.of("ndcg", 3)
    with pytest.raises(ConfigError, match="`metric` should be one of"):
        kept_a.of("coverage", 10)
    with pytest.raises(DataError, match="one row per query"):
        a.update(torch.from_numpy(topk_a[:2]), relevant.slice(0, 2), np.arange(3))
    a.update(torch.from_numpy(topk_a[:2]), relevant.slice(0, 2), np.arange(2))
    with pytest.raises(DataError, match="added twice"):
        a.queries()


def test_evaluations_keep_their_queries_rows_across_blocks():
    scores, seen, relevant, valid = make_case(seed=5)
    num_queries, num_items = scores.shape
    common = dict(
        relevant=relevant, seen=seen, ks=(2, 4), exclude_seen="both", valid_items=valid
    )
    by_scores = evaluate_scores(
        score_table(scores),
        num_items=num_items,
        queries=np.arange(num_queries),
        batch_size=5,
        keep_queries=True,
        **common,
    )
    query_emb = torch.eye(num_queries, dtype=torch.float64)
    item_emb = torch.from_numpy(scores).T.contiguous()  # query i's scores, exactly
    by_embeddings = evaluate_embeddings(
        query_emb,
        item_emb,
        batch_size=4,
        item_batch_size=6,
        keep_queries=True,
        **common,
    )
    kept = by_scores.queries["exclude_seen"]
    assert set(by_scores.queries) == {"exclude_seen"}  # the first mode only
    relevant_unseen = relevant.difference(seen)
    np.testing.assert_array_equal(
        kept.rows, np.flatnonzero(relevant_unseen.lengths() > 0)
    )
    again = by_embeddings.queries["exclude_seen"]
    np.testing.assert_array_equal(again.rows, kept.rows)
    np.testing.assert_allclose(again.values, kept.values)
    assert kept.of("ndcg", 4).mean() == pytest.approx(
        by_scores.metrics["exclude_seen"]["ndcg"][4], rel=1e-6
    )
    assert "queries" not in by_scores.to_dict()
    plain = evaluate_scores(
        score_table(scores),
        num_items=num_items,
        queries=np.arange(num_queries),
        batch_size=5,
        **common,
    )
    assert plain.queries == {} and plain == by_scores  # kept figures are no part of it


def test_result_round_trips_through_json():
    scores, seen, relevant, valid = make_case(seed=4)
    empty_slice = np.zeros(scores.shape[0], dtype=bool)
    result = evaluate_scores(
        score_table(scores),
        num_items=scores.shape[1],
        queries=np.arange(scores.shape[0]),
        relevant=relevant,
        seen=seen,
        ks=(2, 4),
        exclude_seen="both",
        valid_items=valid,
        slices={"nobody": empty_slice},  # NaN metrics -> null
    )
    text = json.dumps(result.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["metrics"]["exclude_seen"]["recall"].keys() == {"2", "4"}
    assert data["slices"]["nobody"]["metrics"]["exclude_seen"]["ndcg"]["2"] is None
    assert EvalResult.from_dict(data).to_dict() == result.to_dict()
    assert data["standard_errors"]["exclude_seen"]["ndcg"]["4"] > 0
    assert (
        data["slices"]["nobody"]["standard_errors"]["include_seen"]["mrr"]["2"] is None
    )
    del data["standard_errors"]  # a result written before they were kept
    assert EvalResult.from_dict(data).standard_errors == {}
    rows = result.to_rows()
    assert len(rows) == 2 * 2 * len(METRIC_NAMES)  # (all, nobody) x modes x metrics
    assert rows[0].keys() == {"slice", "mode", "metric", "@2", "@4"}


def test_evaluate_rejects_bad_inputs():
    scores, seen, relevant, _ = make_case()
    base = dict(num_items=scores.shape[1], queries=np.arange(scores.shape[0]), ks=(1,))
    with pytest.raises(ConfigError, match="seen"):
        evaluate_scores(score_table(scores), relevant=relevant, **base)
    with pytest.raises(DataError, match="one row per query"):
        evaluate_scores(
            score_table(scores), relevant=relevant.slice(0, 3), seen=seen, **base
        )
    nan_scores = scores.copy()
    nan_scores[2, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        evaluate_scores(score_table(nan_scores), relevant=relevant, seen=seen, **base)
    with pytest.raises(DataError, match="score_fn"):
        evaluate_scores(
            lambda b: torch.zeros(len(b), 3), relevant=relevant, seen=seen, **base
        )
    with pytest.raises(ConfigError, match="unique"):
        evaluate_scores(
            score_table(scores),
            relevant=relevant,
            seen=seen,
            slices={"all": np.ones(scores.shape[0], dtype=bool)},
            **base,
        )
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_scores(
            score_table(scores), relevant=relevant, seen=seen, batch_size=0, **base
        )


def test_evaluation_builds_no_autograd_graph():
    # Trainable embeddings must not pile up a graph across item chunks.
    query_emb = torch.randn(6, 3, requires_grad=True)
    item_emb = torch.randn(9, 3, requires_grad=True)
    relevant = UserItems.from_pairs(np.arange(6), np.arange(6) + 1, num_rows=6)
    seen_fn: list[bool] = []

    def score_fn(batch: torch.Tensor) -> torch.Tensor:
        scores = query_emb[batch] @ item_emb.T
        seen_fn.append(scores.requires_grad)
        return scores

    by_scores = evaluate_scores(
        score_fn,
        num_items=9,
        queries=np.arange(6),
        relevant=relevant,
        ks=(2,),
        exclude_seen=False,
    )
    by_emb = evaluate_embeddings(
        query_emb, item_emb, relevant=relevant, ks=(2,), exclude_seen=False
    )
    assert seen_fn == [False]
    assert_nested_close(by_emb.to_dict(), by_scores.to_dict())
