import math

import pytest
import torch

from twostage.losses import (
    full_softmax_loss,
    in_batch_softmax_loss,
    log_inclusion_probability,
    multi_positive_softmax_loss,
)


def _naive(
    q,
    c,
    *,
    t,
    ids=None,
    probs=None,
    extra=None,
    extra_ids=None,
    extra_probs=None,
    num_items=None,
    weights=None,
):
    """Row-by-row reference: softmax over every column that is not an accidental hit."""
    cols = [c[j] for j in range(len(c))]
    col_ids = list(ids) if ids is not None else [None] * len(c)
    col_probs = list(probs) if probs is not None else [None] * len(c)
    m = 0
    if extra is not None:
        cols += [extra[j] for j in range(len(extra))]
        col_ids += list(extra_ids)
        col_probs += list(extra_probs)
        m = len(extra)
    losses = []
    for i in range(len(q)):
        logits = []
        for j, (col, cid, p) in enumerate(zip(cols, col_ids, col_probs, strict=True)):
            if ids is not None and j != i and cid == ids[i]:
                continue  # accidental hit
            z = float(q[i] @ col) / t
            if probs is not None:
                z -= math.log(len(q) * float(p) + (m / num_items if m else 0.0))
            logits.append((j, z))
        top = max(z for _, z in logits)
        log_norm = top + math.log(sum(math.exp(z - top) for _, z in logits))
        positive = next(z for j, z in logits if j == i)
        losses.append(log_norm - positive)
    w = [1.0] * len(q) if weights is None else [float(x) for x in weights]
    return sum(a * b for a, b in zip(losses, w, strict=True)) / sum(w)


def test_hand_computed_two_by_two() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # Row 0 logits /0.5: [2.0, 1.2]; row 1: [0.0, 1.6].
    expected = 0.5 * (
        -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
        - math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))
    )
    got = in_batch_softmax_loss(q, c, temperature=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_logq_correction_hand_computed() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    probs = torch.tensor([0.5, 0.1])
    # Column j is shifted by -log(B * p_j) = -log(1.0), -log(0.2).
    row0 = [1.0 - 0.0, 0.0 - math.log(0.2)]
    row1 = [0.0 - 0.0, 1.0 - math.log(0.2)]
    expected = 0.5 * (
        -(row0[0] - math.log(sum(math.exp(z) for z in row0)))
        - (row1[1] - math.log(sum(math.exp(z) for z in row1)))
    )
    got = in_batch_softmax_loss(q, c, temperature=1.0, candidate_probs=probs)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_accidental_hits_are_removed() -> None:
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([7, 7, 3])
    with_mask = in_batch_softmax_loss(q, c, temperature=1.0, candidate_ids=ids)
    without = in_batch_softmax_loss(q, c, temperature=1.0)
    # Rows 0 and 1 share item 7: without masking each sees its twin as a negative.
    expected = 2 * -math.log(math.e / (math.e + 1.0)) + -math.log(math.e / (math.e + 2))
    assert with_mask.item() == pytest.approx(expected / 3, rel=1e-6)
    assert without.item() > with_mask.item()


def test_matches_reference_with_everything_on() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=1)
    extra = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    ids = torch.tensor([1, 2, 2, 5, 6, 1])
    extra_ids = torch.tensor([5, 9, 10])
    probs = torch.tensor([0.3, 0.2, 0.2, 0.05, 0.05, 0.3])
    extra_probs = torch.tensor([0.05, 0.01, 0.02])
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    kwargs = dict(
        candidate_ids=ids,
        candidate_probs=probs,
        extra_candidates=extra,
        extra_ids=extra_ids,
        extra_probs=extra_probs,
        num_items=20,
        weights=weights,
    )
    got = in_batch_softmax_loss(q, c, temperature=0.2, **kwargs)
    want = _naive(
        q,
        c,
        t=0.2,
        ids=ids.tolist(),
        probs=probs,
        extra=extra,
        extra_ids=extra_ids.tolist(),
        extra_probs=extra_probs,
        num_items=20,
        weights=weights,
    )
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_shares_of_a_batch_add_up_to_the_whole_with_repeated_items() -> None:
    """A data-parallel rank's queries (``positive_offset``) see the same masked
    columns as in the whole batch, also when one item fills many columns."""
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    ids = torch.randint(0, 6, (40,), generator=g)  # every item repeated
    ids[:10] = 99  # and one of them ten times
    probs = torch.rand(40, generator=g) / 10
    kwargs = dict(candidate_ids=ids, candidate_probs=probs, temperature=0.1)
    whole = in_batch_softmax_loss(q, c, **kwargs) * 40
    shares = [
        in_batch_softmax_loss(q[lo:hi], c, positive_offset=lo, normaliser=1.0, **kwargs)
        for lo, hi in [(0, 7), (7, 25), (25, 40)]
    ]
    assert sum(float(s) for s in shares) == pytest.approx(float(whole), rel=1e-5)
    want = _naive(q, c, t=0.1, ids=ids.tolist(), probs=probs)
    assert float(whole) / 40 == pytest.approx(want, rel=1e-5)


def test_gradient_flows_to_learnable_temperature() -> None:
    q = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    c = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    log_t = torch.tensor(math.log(0.1), requires_grad=True)
    in_batch_softmax_loss(q, c, temperature=log_t.exp()).backward()
    assert log_t.grad is not None and torch.isfinite(log_t.grad)


def test_full_softmax_hand_computed() -> None:
    """Every item but row 0 (OOV) and the row's other positives is a negative."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    targets = torch.tensor([1, 3])
    # Row 0 logits over items 1..3: [1, 0, 0.6]; row 1 skips item 2 (another
    # positive of its user): items 1 and 3 -> [0, 0.8].
    row0 = -math.log(math.exp(1.0) / (math.exp(1.0) + 1.0 + math.exp(0.6)))
    row1 = -math.log(math.exp(0.8) / (1.0 + math.exp(0.8)))
    others = torch.tensor([[1, 0], [2, 3]])  # row 1's own target is never masked
    got = full_softmax_loss(q, items, targets, temperature=1.0, other_positives=others)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    weighted = full_softmax_loss(
        q,
        items,
        targets,
        temperature=1.0,
        other_positives=others,
        weights=torch.tensor([1.0, 3.0]),
    )
    assert weighted.item() == pytest.approx((row0 + 3 * row1) / 4, rel=1e-6)
    unmasked = full_softmax_loss(q, items, targets, temperature=0.5)
    assert unmasked.item() > 0


def test_full_softmax_trains_end_to_end() -> None:
    """The training loop takes `retrieval.negatives=full` and the loss falls."""
    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.data.synthetic import generate
    from twostage.retrieval.fit import fit_retrieval

    torch.set_num_threads(1)
    dataset = generate(num_users=120, num_items=60, num_interactions=2000)
    config = apply_overrides(
        ExperimentConfig(),
        [
            "retrieval.negatives=full",
            "retrieval.use_side_features=false",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "train.epochs=3",
            "train.batch_size=128",
            "train.early_stopping_patience=0",
        ],
    )
    run, _ = fit_retrieval(config, dataset=dataset, evaluate_test=False)
    losses = [record["train_loss"] for record in run.train_result.history]
    assert losses[-1] < losses[0]


def test_multi_positive_softmax_hand_computed() -> None:
    """One softmax per query; every positive pair adds its -log p; log q shifts."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0]])
    rows = torch.tensor([0, 0, 1])
    columns = torch.tensor([1, 2, 2])
    # Column 0 excluded: row 0 logits [1, 0], row 1 logits [0, 1].
    p_top = math.exp(1.0) / (math.exp(1.0) + 1.0)
    expected = [-math.log(p_top), -math.log(1 - p_top), -math.log(p_top)]
    got = multi_positive_softmax_loss(
        q, c, rows, columns, temperature=1.0, excluded_column=0
    )
    assert got.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    weights = torch.tensor([1.0, 2.0, 1.0])
    got = multi_positive_softmax_loss(
        q, c, rows, columns, temperature=1.0, excluded_column=0, weights=weights
    )
    assert got.item() == pytest.approx(
        (expected[0] + 2 * expected[1] + expected[2]) / 4, rel=1e-6
    )
    # Sampled candidates: log q is subtracted, so a likelier sample counts for less.
    log_q = torch.log(torch.tensor([0.5, 0.5, 0.25]))
    two = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    got = multi_positive_softmax_loss(
        q[:1], two, torch.tensor([0]), torch.tensor([1]), temperature=0.5, log_q=log_q
    )
    logits = torch.tensor([2.0, 1.0, 0.0]) - log_q
    assert got.item() == pytest.approx(-torch.log_softmax(logits, 0)[1].item())


def test_inclusion_probability_counts_the_uniform_draws_too() -> None:
    probs = torch.tensor([0.01, 0.2])
    # P(in sample) = 1 - (1 - p)^n (1 - 1/N)^m, by its complement
    expected = 1 - (1 - probs) ** 50 * (1 - 1 / 100) ** 30
    got = log_inclusion_probability(probs, 50, num_uniform=30, num_items=100).exp()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        log_inclusion_probability(probs, 50, num_uniform=0, num_items=100),
        log_inclusion_probability(probs, 50),
    )
