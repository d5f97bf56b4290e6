"""Baselines on toy matrices with known answers, and through the shared evaluation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from twostage.baselines import (
    BASELINES,
    EASE,
    ItemKNN,
    Popularity,
    RecencyEASE,
    RecentPopularity,
    SessionKNN,
    Transition,
)
from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError, NotFittedError
from twostage.evaluate import evaluate_scores
from twostage.models import session_knn
from twostage.models.session_knn import SessionNeighbours, activity_ranks

# Users 0..3; items 0 and 1 always co-occur, item 2 is mildly popular, item 4 unused.
ROWS = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
ITEMS = [0, 1, 2, 0, 1, 0, 1, 3, 2, 3]
NUM_ITEMS = 5


def toy() -> UserItems:
    return UserItems.from_pairs(ROWS, ITEMS, num_rows=4)


def dense_toy() -> np.ndarray:
    x = np.zeros((4, NUM_ITEMS))
    x[ROWS, ITEMS] = 1.0
    return x


def test_popularity_orders_by_count_for_everyone():
    model = Popularity().fit(toy(), num_items=NUM_ITEMS)
    scores = model.score(torch.tensor([0, 3, 99]))  # 99: a user never seen
    assert scores.shape == (3, NUM_ITEMS)
    assert scores[0].tolist() == [3.0, 3.0, 2.0, 2.0, 0.0]
    assert torch.equal(scores[0], scores[2])


def test_popularity_weights_count_repeated_events():
    train, counts = UserItems.from_pairs_counted([0, 0, 0, 1], [2, 2, 2, 1])
    model = Popularity().fit(train, num_items=3, weights=counts)
    assert model.score(torch.tensor([0]))[0].tolist() == [0.0, 1.0, 3.0]


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)]
)
def test_ease_matches_numpy_closed_form(dtype, tol):
    l2 = 0.7
    model = EASE(l2=l2, dtype=dtype).fit(toy(), num_items=NUM_ITEMS)
    x = dense_toy()
    p = np.linalg.inv(x.T @ x + l2 * np.eye(NUM_ITEMS))
    b = np.eye(NUM_ITEMS) - p / np.diag(p)  # column j divided by P[j, j]
    np.fill_diagonal(b, 0.0)
    assert model.weights is not None
    np.testing.assert_allclose(model.weights.numpy(), b, atol=tol)
    scores = model.score(torch.arange(4)).numpy()
    np.testing.assert_allclose(scores, x @ b, atol=tol * 10)


def test_ease_gives_zeros_to_users_without_history():
    model = EASE(l2=1.0).fit(toy(), num_items=NUM_ITEMS)
    assert model.score(torch.tensor([7])).abs().sum() == 0.0


def test_ease_refuses_catalogues_above_the_cap():
    with pytest.raises(ConfigError, match=r"dense num_items x num_items.*ItemKNN"):
        EASE(max_items=4).fit(toy(), num_items=NUM_ITEMS)


def test_item_knn_finds_the_co_occurring_pair():
    model = ItemKNN(k=2, shrink=0.0).fit(toy(), num_items=NUM_ITEMS)
    sims, ids = model.neighbours(0)
    assert ids[0].item() == 1 and sims[0].item() == pytest.approx(1.0)
    assert model.neighbours(1)[1][0].item() == 0
    assert len(model.neighbours(4)[1]) == 0  # an unused item has no neighbours


def test_item_knn_matches_dense_cosine_top_k():
    rng = np.random.default_rng(0)
    rows, items = rng.integers(0, 30, 200), rng.integers(0, 12, 200)
    train = UserItems.from_pairs(rows, items, num_rows=30)
    k, shrink = 3, 2.0
    model = ItemKNN(k=k, shrink=shrink, neighbours_of="history")
    model.fit(train, num_items=13)  # item 12 unused
    x = np.zeros((30, 13))
    x[rows, items] = 1.0
    norms = np.sqrt((x * x).sum(0))
    sim = (x.T @ x) / (norms[:, None] * norms[None, :] + shrink)
    np.fill_diagonal(sim, 0.0)
    kept = np.zeros_like(sim)
    for i in range(13):  # keep each row's top k (no ties in this draw)
        top = np.argsort(-sim[i], kind="stable")[:k]
        kept[i, top] = sim[i, top]
    assert model.similarity is not None
    np.testing.assert_allclose(model.similarity.to_dense().numpy(), kept, atol=1e-6)
    scores = model.score(torch.arange(31)).numpy()  # user 30 has no history
    np.testing.assert_allclose(scores[:30], x @ kept, atol=1e-5)
    assert np.all(scores[30] == 0.0)


@pytest.mark.parametrize("weighted", [True, False])
def test_item_knn_from_sparse_blocks_equals_the_dense_fit(
    monkeypatch, weighted
) -> None:
    """Large catalogues keep each item's neighbours among the items it shares a
    user with (sparse blocks of several items) instead of scoring every pair: the
    same similarities and top k where no two are tied, and ties go to the lower
    item index; an item that shares no user keeps no neighbour either way."""
    import twostage.baselines as baselines

    rng = np.random.default_rng(5)
    users, items = rng.integers(0, 300, 4000), rng.integers(1, 150, 4000)
    train = UserItems.from_pairs(users, items, num_rows=300)
    weights = rng.random(len(train.indices)) + 0.5 if weighted else None

    def fitted(dense_items: int, block: int = 2048) -> ItemKNN:
        monkeypatch.setattr(baselines, "DENSE_ITEMS", dense_items)
        monkeypatch.setattr(baselines, "_SPARSE_BLOCK", block)
        return ItemKNN(k=7).fit(train, num_items=160, weights=weights)

    dense, sparse, small_blocks = fitted(10**6), fitted(0), fitted(0, block=13)
    assert sparse.similarity is not None and dense.similarity is not None
    got, want = sparse.similarity.to_dense(), dense.similarity.to_dense()
    assert torch.equal(sparse.similarity.to_dense(), small_blocks.similarity.to_dense())
    assert int((got > 0).sum(1).max()) == 7 and not got[150:].any()
    if weighted:  # no ties: the same matrix
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(
            sparse.score(torch.arange(300)), dense.score(torch.arange(300))
        )
    else:  # the same values kept by each row; of tied ones, the lowest indices
        torch.testing.assert_close(got.sort(1).values, want.sort(1).values)
        x = torch.zeros(300, 160)
        x[torch.from_numpy(users), torch.from_numpy(items)] = 1.0
        norms = x.square().sum(0).sqrt()
        full = (x.T @ x) / (norms[:, None] * norms[None, :] + 10.0)
        full.fill_diagonal_(0.0)
        broken = 0
        for row in range(1, 150):  # item 0 has no user
            kept = got[row] > 0
            lowest = got[row][kept].min()
            tied = (full[row] == lowest).nonzero().flatten()
            chosen = (kept & (full[row] == lowest)).nonzero().flatten()
            assert chosen.tolist() == tied[: len(chosen)].tolist(), row
            broken += len(chosen) < len(tied)
        assert broken > 0  # the draw has ties at the boundary to break


@pytest.mark.parametrize("shuffled", [False, True])
def test_best_first_is_the_three_key_lexsort(shuffled) -> None:
    from twostage.baselines import _best_first

    rng = np.random.default_rng(2)
    pairs = np.unique(rng.integers(0, 50 * 400, 3000))  # distinct (row, col)
    rows, cols = pairs // 400, pairs % 400
    values = rng.choice(np.array([0.125, 0.2, 0.5, 3.0], dtype=np.float32), 3000)
    values = values[: len(rows)]  # many ties within a row
    if shuffled:  # columns out of order within rows
        mix = rng.permutation(len(rows))
        rows, cols, values = rows[mix], cols[mix], values[mix]
    expected = np.lexsort((cols, -values, rows))
    assert np.array_equal(_best_first(rows, cols, values, 400), expected)


def test_item_knn_candidate_neighbourhoods_score_with_the_transposed_top_k():
    rng = np.random.default_rng(3)
    rows, items = rng.integers(0, 25, 150), rng.integers(1, 10, 150)
    train = UserItems.from_pairs(rows, items, num_rows=25)
    by_candidate = ItemKNN(k=3).fit(train, num_items=10)
    by_history = ItemKNN(k=3, neighbours_of="history").fit(train, num_items=10)
    x = np.zeros((25, 10), dtype=np.float32)
    x[rows, items] = 1.0
    assert by_candidate.similarity is not None
    kept = by_candidate.similarity.to_dense().numpy()  # row j: j's top 3
    users = torch.arange(25)
    np.testing.assert_allclose(by_candidate.score(users), x @ kept.T, atol=1e-5)
    np.testing.assert_allclose(by_history.score(users), x @ kept, atol=1e-5)
    with pytest.raises(ConfigError, match="neighbours_of"):
        ItemKNN(neighbours_of="user")  # type: ignore[arg-type]


def test_transition_scores_what_followed_the_last_item():
    history = torch.tensor([[0, 1, 2, 3], [1, 2, 4, 2], [0, 0, 0, 0]])
    model = Transition().fit_sequences(history, num_items=5)
    scores = model.score(torch.tensor([0, 1, 2, 9]))
    assert scores[0].tolist() == [0.0] * 5  # nothing ever followed item 3
    assert scores[1].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # 2 -> 3, 2 -> 4
    assert scores[2:].abs().sum() == 0  # no history, unknown user
    with pytest.raises(NotFittedError):
        Transition().score(torch.tensor([0]))


def test_transition_from_the_log_reads_every_row_in_time_order():
    # Rows out of order; user 1 rated 2 and 4 in the same second (row order wins);
    # item 0 (unknown) breaks a chain; user 3 has no rows.
    users = np.array([1, 0, 1, 0, 1, 2, 1, 0, 2])
    items = np.array([2, 3, 1, 1, 4, 0, 3, 2, 3])
    times = np.array([20, 30, 10, 10, 20, 5, 40, 20, 6])
    model = Transition().fit_log(users, items, times, num_users=4, num_items=5)
    # Sequences: user 0: 1 2 3; user 1: 1 2 4 3; user 2: 0 3.
    assert model.counts is not None
    dense = model.counts.to_dense()
    expected = torch.zeros(5, 5)
    for a, b in [(1, 2), (2, 3), (1, 2), (2, 4), (4, 3)]:
        expected[a, b] += 1
    assert torch.equal(dense, expected)
    assert model.last_items is not None
    assert model.last_items.tolist() == [3, 3, 3, 0]
    # The same counts as the full-length [U, L] table the retrieval tables hold.
    history = torch.tensor([[0, 1, 2, 3], [1, 2, 4, 3], [0, 0, 0, 3], [0, 0, 0, 0]])
    by_table = Transition().fit_sequences(history, num_items=5)
    assert by_table.counts is not None
    assert torch.equal(by_table.counts.to_dense(), dense)
    every = torch.arange(4)
    assert torch.equal(model.score(every), by_table.score(every))
    with pytest.raises(DataError, match="one entry per"):
        Transition().fit_log(users, items[:3], times, num_users=4, num_items=5)
    with pytest.raises(DataError, match="user_idx"):
        Transition().fit_log(users, items, times, num_users=2, num_items=5)


@pytest.mark.parametrize(
    "times_of",
    [
        lambda t: t.astype(np.int64) + 1_600_000_000,  # Unix seconds
        lambda t: t.astype(np.int64) - 7,  # negative times
        lambda t: t.astype(np.uint32),
        lambda t: t.astype(np.float64) / 3,  # the two-key sort
        lambda t: t.astype(np.int64) * 2**61,  # too wide for one key
    ],
)
def test_transition_counts_and_scores_equal_a_by_hand_count(times_of):
    # Every user's rows in time order, ties in row order, whatever the times'
    # type (one int64 key where it fits, else lexsort); each last item's row.
    rng = np.random.default_rng(5)
    users = rng.integers(0, 12, 300)
    items = rng.integers(0, 9, 300)  # 0: unknown, breaks a chain
    times = times_of(rng.integers(0, 4, 300))  # many ties
    model = Transition().fit_log(users, items, times, num_users=13, num_items=9)
    expected = torch.zeros(9, 9)
    last = [0] * 13
    for user in range(13):
        rows = sorted(np.flatnonzero(users == user), key=lambda r: (times[r], r))
        chain = [int(items[r]) for r in rows]
        for a, b in itertools.pairwise(chain):
            if a > 0 and b > 0:
                expected[a, b] += 1
        last[user] = chain[-1] if chain else 0
    assert model.counts is not None and model.last_items is not None
    assert torch.equal(model.counts.to_dense(), expected)
    assert model.last_items.tolist() == last
    scores = model.score(torch.arange(15))  # two users beyond the log
    assert torch.equal(scores[:13], expected[torch.tensor(last)])
    assert scores[:13][torch.tensor(last) == 0].abs().sum() == 0
    assert scores[13:].abs().sum() == 0


def test_recent_popularity_counts_the_last_days_and_breaks_ties_by_all_time():
    day = 86_400
    items = np.array([1, 1, 1, 2, 3, 4])
    times = np.array([0, 0, 0, 20 * day, 40 * day, 40 * day])
    model = RecentPopularity(days=15).fit_log(items, times, num_items=5)
    order = model.score(torch.tensor([0, 7])).argsort(dim=1, descending=True)
    assert order[0, :2].tolist() in ([3, 4], [4, 3])
    assert order[0, 2].item() == 1  # outside the window, but the most events ever
    assert torch.equal(order[0], order[1])
    with pytest.raises(ConfigError, match="days"):
        RecentPopularity(days=0)


def test_item_knn_without_shrink_ignores_items_without_users():
    # Regression: with shrink=0 an unused item gave 0/0 = NaN, which topk ranked
    # first and then dropped, losing a real neighbour.
    model = ItemKNN(k=2, shrink=0.0).fit(toy(), num_items=NUM_ITEMS)
    assert model.neighbours(2)[1].tolist() == [3, 0]
    assert not torch.isnan(model.score(torch.arange(4))).any()


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_refuse_use_before_fit_and_plug_into_evaluation(name):
    model = BASELINES[name]()
    with pytest.raises(NotFittedError):
        model.score(torch.tensor([0]))
    # Planted blocks: users 0..9 like items 1..5, users 10..19 like items 6..10.
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(20), 4)
    items = np.where(users < 10, 1, 6) + rng.integers(0, 5, users.size)
    train = UserItems.from_pairs(users, items, num_rows=20)
    test = UserItems.from_pairs(np.arange(20), np.where(np.arange(20) < 10, 3, 8))
    test = test.difference(train)
    model.fit(train, num_items=11)
    valid = np.ones(11, dtype=bool)
    valid[0] = False
    result = evaluate_scores(
        model.score,
        num_items=11,
        queries=np.arange(20),
        relevant=test,
        seen=train,
        ks=(5,),
        valid_items=valid,
    )
    recall = result.metrics["exclude_seen"]["recall"][5]
    if name == "popularity":
        assert 0.0 <= recall <= 1.0
    else:  # the block structure puts the held-out item within the user's block
        assert recall == 1.0


def test_baselines_reject_bad_configuration_and_data():
    with pytest.raises(ConfigError, match="l2"):
        EASE(l2=0.0)
    with pytest.raises(ConfigError, match="`k`"):
        ItemKNN(k=0)
    with pytest.raises(ConfigError, match="shrink"):
        ItemKNN(shrink=-1.0)
    with pytest.raises(DataError, match="num_items"):
        Popularity().fit(toy(), num_items=3)
    with pytest.raises(DataError, match="weights"):
        Popularity().fit(toy(), num_items=NUM_ITEMS, weights=np.ones(3))
    with pytest.raises(DataError, match="user_idx"):
        Popularity().fit(toy(), num_items=NUM_ITEMS).score(torch.tensor([-1]))


def _session_knn_by_hand(
    sequences: list[list[int]],
    user: int,
    num_items: int,
    k: int,
    r: float,
    p: float,
    latest: list[int] | None = None,
    sample: int = 0,
) -> np.ndarray:
    """SessionKNN's docstring, one user and one neighbour at a time; with
    ``sample``, among the ``sample`` users sharing an item with ``user`` who rank
    highest in ``latest``."""
    own = sequences[user]
    candidates = set(range(len(sequences)))
    if sample:
        assert latest is not None
        sharing = [
            n for n, seq in enumerate(sequences) if n != user and set(own) & set(seq)
        ]
        candidates = set(sorted(sharing, key=lambda n: -latest[n])[:sample])
    scores = np.zeros(num_items)
    if not own:
        return scores
    weight = {i: np.exp(-(len(own) - 1 - q) / r) for q, i in enumerate(own)}
    recency = {i: q for q, i in enumerate(own)}  # the latest occurrence wins
    sims = []
    for n, seq in enumerate(sequences):
        shared = set(own) & set(seq)
        if n == user or not shared or n not in candidates:
            continue
        sims.append((sum(weight[i] for i in shared) / np.sqrt(len(own) * len(seq)), n))
    sims.sort(reverse=True)
    if len(sims) > k:
        assert sims[k - 1][0] > sims[k][0], "a tie at the k-th neighbour"
    for sim, n in sims[:k]:
        seq = sequences[n]
        latest = max(set(own) & set(seq), key=recency.__getitem__)
        anchor = max(q for q, i in enumerate(seq) if i == latest)
        for q, i in enumerate(seq):
            scores[i] += sim * np.exp(-abs(q - anchor) / p)
    return scores


def test_session_knn_follows_its_definition():
    rng = np.random.default_rng(4)  # no tie at any user's third neighbour
    num_items = 12
    sequences = [
        list(rng.integers(1, num_items, size=rng.integers(1, 9))) for _ in range(14)
    ]
    sequences[5] = []  # no history
    history = torch.zeros(len(sequences), 8, dtype=torch.long)
    for u, seq in enumerate(sequences):
        if seq:
            history[u, -len(seq) :] = torch.tensor(seq)
    model = SessionKNN(neighbours=3, recency=2.0, proximity=1.5).fit_sequences(
        history, num_items=num_items
    )
    users = torch.arange(len(sequences) + 1)  # and one past the end: unknown
    scores = model.score(users)
    for u in range(len(sequences)):
        expected = _session_knn_by_hand(sequences, u, num_items, 3, 2.0, 1.5)
        np.testing.assert_allclose(scores[u].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert scores[5].abs().sum() == 0 and scores[-1].abs().sum() == 0
    # Scored a few at a time, the same.
    small = SessionKNN(neighbours=3, recency=2.0, proximity=1.5, batch_size=4)
    small.fit_sequences(history, num_items=num_items)
    assert torch.allclose(small.score(users), scores)


def _fourteen_sequences(
    rng: np.random.Generator, num_items: int
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """14 users' random sequences of 1 to 8 items (user 5's empty), and the
    same as ``(lengths, items)`` end to end."""
    sequences = [
        [int(i) for i in rng.integers(1, num_items, size=rng.integers(1, 9))]
        for _ in range(14)
    ]
    sequences[5] = []
    lengths = torch.tensor([len(seq) for seq in sequences])
    return sequences, lengths, torch.tensor([i for seq in sequences for i in seq])


def test_session_knn_reads_a_session_after_a_stored_user_in_capped_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``score_users(sessions=)`` reads each user's stored items, then the
    session's, as one query (the user never their own neighbour); and blocks
    shrink to keep ``[batch, U]`` under BLOCK_CELLS without changing a score."""
    rng = np.random.default_rng(4)
    num_items = 12
    sequences, lengths, items = _fourteen_sequences(rng, num_items)
    model = SessionNeighbours(
        lengths, items, num_items=num_items, neighbours=3, recency=2.0, proximity=1.5
    )
    stored = model.items.split(torch.diff(model.indptr).tolist())
    assert [seq.tolist() for seq in stored] == sequences
    users = torch.tensor([0, 5, 9, 14])  # 14: past the end, the session alone
    sessions = torch.tensor([[0, 3, 4], [0, 0, 7], [0, 0, 0], [2, 0, 6]])
    scores = model.score_users(users, sessions=sessions)
    for row, user in enumerate(users.tolist()):
        own = [int(i) for i in sessions[row] if i > 0]
        mine = [*sequences, []]
        mine[user] = (sequences[user] if user < 14 else []) + own
        expected = _session_knn_by_hand(mine, user, num_items, 3, 2.0, 1.5)
        np.testing.assert_allclose(scores[row].numpy(), expected, rtol=1e-5, atol=1e-6)
    plain = model.score_users(users)
    assert model.block_size == 256
    monkeypatch.setattr(session_knn, "BLOCK_CELLS", 2 * 14)
    assert model.block_size == 2
    torch.testing.assert_close(model.score_users(users, sessions=sessions), scores)
    torch.testing.assert_close(model.score_users(users), plain)


def test_session_knn_samples_the_users_active_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``sample``, a query's candidate neighbours are the ``sample`` users
    who share one of its items and rank highest by latest activity; the scores
    follow the definition over them, equal the exact ones once the sample holds
    every user, and do not change when the walk is split into steps."""
    rng = np.random.default_rng(4)
    num_items = 12
    sequences, lengths, items = _fourteen_sequences(rng, num_items)
    latest = [int(x) for x in rng.permutation(14)]
    options = {"num_items": num_items, "neighbours": 3, "recency": 2.0}
    exact = SessionNeighbours(lengths, items, proximity=1.5, **options)
    every = SessionNeighbours(
        lengths, items, proximity=1.5, sample=14, latest=torch.tensor(latest), **options
    )
    users = torch.arange(15)  # and one past the end: unknown
    sessions = torch.tensor([[0, 3, 4]] * 15)
    torch.testing.assert_close(every.score_users(users), exact.score_users(users))
    torch.testing.assert_close(
        every.score_users(users, sessions=sessions),
        exact.score_users(users, sessions=sessions),
    )
    few = SessionNeighbours(
        lengths, items, proximity=1.5, sample=4, latest=torch.tensor(latest), **options
    )
    scores = few.score_users(users)
    assert not torch.allclose(scores, exact.score_users(users))
    for u in range(14):
        expected = _session_knn_by_hand(
            sequences, u, num_items, 3, 2.0, 1.5, latest=latest, sample=4
        )
        np.testing.assert_allclose(scores[u].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert scores[14].abs().sum() == 0
    queries = torch.tensor([[0, 3, 4], [1, 1, 2], [0, 0, 0]])
    by_sequence = few.score_sequences(queries)
    # Blocks of 3 queries whose walks over their items' users (up to 8 items x 4
    # users each) are split into steps of at most 36 users: the same lists.
    monkeypatch.setattr(session_knn, "BLOCK_CELLS", 36)
    assert few.block_size == 3
    torch.testing.assert_close(few.score_users(users), scores)
    torch.testing.assert_close(few.score_sequences(queries), by_sequence)
    with pytest.raises(DataError, match="latest"):
        SessionNeighbours(lengths, items, sample=4, **options)
    with pytest.raises(DataError, match="each once"):
        SessionNeighbours(
            lengths,
            items,
            sample=4,
            latest=torch.zeros(14, dtype=torch.long),
            **options,
        )
    with pytest.raises(ConfigError, match="sample"):
        SessionKNN(sample=-1)


def test_activity_ranks_order_users_by_their_latest_row() -> None:
    users = np.array([3, 1, 1, 2])
    times = np.array(
        ["2020-01-03", "2020-01-05", "2020-01-01", "2020-01-03"], dtype="datetime64[s]"
    )
    # Users 0 and 4 have no rows; 2 and 3 tie on their latest (index order).
    assert activity_ranks(users, times, num_users=5).tolist() == [0, 4, 2, 3, 1]


def test_session_knn_from_the_log_and_its_errors():
    # User 0 rated 1 and 2 in the same second (row order wins); item 0 is unknown.
    users = np.array([1, 0, 0, 1, 0, 2, 1, 2])
    items = np.array([2, 1, 2, 3, 0, 4, 1, 3])
    times = np.array([20, 10, 10, 30, 5, 7, 10, 9])
    by_log = SessionKNN().fit_log(users, items, times, num_users=4, num_items=5)
    history = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 4, 3], [0, 0, 0, 0]])
    by_table = SessionKNN().fit_sequences(history, num_items=5)
    every = torch.arange(4)
    assert torch.equal(by_log.score(every), by_table.score(every))
    # User 0 (1 then 2) is like user 1 (1, 2, 3), who went on to 3.
    assert int(by_log.score(torch.tensor([0]))[0, 3:].argmax()) == 0
    with pytest.raises(NotFittedError):
        SessionKNN().score(every)
    with pytest.raises(ConfigError, match="neighbours"):
        SessionKNN(neighbours=0)
    with pytest.raises(ConfigError, match="proximity"):
        SessionKNN(proximity=-1.0)
    with pytest.raises(DataError, match="one entry per"):
        SessionKNN().fit_log(users, items[:3], times, num_users=4, num_items=5)
    with pytest.raises(DataError, match="num_items"):
        SessionKNN().fit_sequences(history, num_items=3)
    # Sampling reads each user's latest time, which only the log holds.
    sampled = SessionKNN(sample=4).fit_log(
        users, items, times, num_users=4, num_items=5
    )
    assert torch.equal(sampled.score(every), by_log.score(every))
    with pytest.raises(ConfigError, match="fit_log"):
        SessionKNN(sample=4).fit_sequences(history, num_items=5)


def test_recency_ease_weighs_each_item_by_its_distance_from_the_latest():
    # Rows out of order; user 0 took item 1 twice (its latest place counts) and
    # items 1 and 2 in the same second (row order wins); item 0 is unknown.
    users = np.array([0, 1, 0, 0, 1, 0, 2, 0])
    items = np.array([2, 3, 1, 1, 4, 3, 2, 0])
    times = np.array([10, 5, 10, 2, 6, 11, 1, 3])
    model = RecencyEASE(l2=0.7, recency=2.0).fit_log(
        users, items, times, num_users=4, num_items=NUM_ITEMS
    )
    # User 0 in time order: 1, (0), 2, 1, 3; user 1: 3, 4; user 2: 2.
    x = np.zeros((4, NUM_ITEMS))
    x[[0, 0, 0, 1, 1, 2], [1, 2, 3, 3, 4, 2]] = 1.0
    p = np.linalg.inv(x.T @ x + 0.7 * np.eye(NUM_ITEMS))
    b = np.eye(NUM_ITEMS) - p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    decayed = np.zeros((4, NUM_ITEMS))
    for user, item, after in [(0, 2, 2), (0, 1, 1), (0, 3, 0), (1, 3, 1), (1, 4, 0)]:
        decayed[user, item] = np.exp(-after / 2.0)
    decayed[2, 2] = 1.0
    scores = model.score(torch.arange(5)).numpy()  # user 4: no rows
    np.testing.assert_allclose(scores[:4], decayed @ b, atol=1e-5)
    assert np.abs(scores[4]).sum() == 0.0
    # The same from the [U, L] table the retrieval tables hold.
    history = torch.tensor([[1, 0, 2, 1, 3], [0, 0, 0, 3, 4], [0, 0, 0, 0, 2]])
    by_table = RecencyEASE(l2=0.7, recency=2.0).fit_sequences(
        history, num_items=NUM_ITEMS
    )
    torch.testing.assert_close(
        by_table.score(torch.arange(3)), model.score(torch.arange(3))
    )
    # What the user did last leads: plain EASE ranks otherwise.
    plain = EASE(l2=0.7).fit(UserItems.from_pairs([0, 0, 0], [1, 2, 3]), num_items=5)
    assert not np.allclose(plain.score(torch.tensor([0])).numpy()[0], scores[0])
    with pytest.raises(NotFittedError):
        RecencyEASE().score(torch.tensor([0]))
    with pytest.raises(ConfigError, match="recency"):
        RecencyEASE(recency=0.0)
    with pytest.raises(DataError, match="one entry per"):
        RecencyEASE().fit_log(users, items[:3], times, num_users=4, num_items=5)
    with pytest.raises(DataError, match="history"):
        RecencyEASE().fit_sequences(history.float(), num_items=5)
    # A catalogue EASE refuses is refused before the rows are sorted (the
    # mismatched rows would otherwise be named first).
    with pytest.raises(ConfigError, match="max_items"):
        RecencyEASE(max_items=4).fit_log(
            users, items[:3], times, num_users=4, num_items=5
        )
    with pytest.raises(ConfigError, match="max_items"):
        RecencyEASE(max_items=4).fit_sequences(history, num_items=5)


def test_recency_ease_follows_the_latest_taste_where_ease_reads_a_set():
    """Most users keep to one of two blocks of items; the rest take four items
    of one block, then two of the other. For those, recency-weighted EASE puts
    the block they took last first; EASE, which reads a user's items as a set,
    the block they took more of."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for user in range(200):
        first = 1 if user % 2 else 11  # two blocks of 10 items: 1..10, 11..20
        taken = list(first + rng.permutation(10)[:4])
        if user >= 120:  # moves to the other block
            taken += list(12 - first + rng.permutation(10)[:2])
        users += [user] * len(taken)
        items += taken
    log = (np.array(users), np.array(items), np.arange(len(users)))
    recent = RecencyEASE(l2=1.0, recency=1.0).fit_log(*log, num_users=200, num_items=21)
    train = UserItems.from_pairs(log[0], log[1], num_rows=200)
    plain = EASE(l2=1.0).fit(train, num_items=21)
    movers = torch.arange(120, 200)
    latest = np.where(movers.numpy() % 2, 11, 1)  # the block each mover took last
    found = {}
    for name, model in (("recent", recent), ("plain", plain)):
        scores = model.score(movers)
        rows = train.take(movers.numpy())
        scores[rows.row_ids(), torch.from_numpy(rows.indices)] = -np.inf
        scores[:, 0] = -np.inf
        top = scores.argmax(dim=1).numpy()
        found[name] = int(((top >= latest) & (top < latest + 10)).sum())
    assert found["recent"] >= 76  # of 80 (80 measured)
    assert found["plain"] <= 20  # (14 measured)


def test_a_session_is_scored_as_a_user_with_those_items_would_be():
    """``score_sequences`` reads a sequence of items (a new user's prior rows, as a
    session is read) the way ``score`` reads a stored user's: for each baseline
    fitted on a log, a table of the users' own sequences scores as the users do
    (session-kNN: but for the user being its own neighbour)."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 500)
    items = rng.integers(1, 25, 500)
    times = rng.integers(0, 1_000, 500)
    order = np.lexsort((np.arange(500), times, users))
    table = torch.zeros(40, 40, dtype=torch.long)  # left-padded, most recent last
    for user in range(40):
        mine = items[order][users[order] == user]
        table[user, table.shape[1] - len(mine) :] = torch.from_numpy(mine)
    everyone = torch.arange(40)
    fitted = [
        cls().fit(UserItems.from_pairs(users, items, num_rows=40), num_items=25)
        for cls in (Popularity, EASE, ItemKNN)
    ]
    fitted += [
        cls().fit_log(users, items, times, num_users=40, num_items=25)
        for cls in (Transition, RecencyEASE)
    ]
    fitted.append(RecentPopularity().fit_log(items, times, num_items=25))
    for model in fitted:
        expected = model.score(everyone)
        torch.testing.assert_close(model.score_sequences(table), expected)
        # Padding between items changes nothing: only the order of the items.
        spread = torch.zeros(40, 80, dtype=torch.long)
        spread[:, 1::2] = table
        torch.testing.assert_close(model.score_sequences(spread), expected)
    knn = SessionKNN().fit_log(users, items, times, num_users=40, num_items=25)
    assert knn.model is not None
    torch.testing.assert_close(
        knn.score_sequences(table), knn.model.score_sequences(table)
    )
    # Recency: the same items in another order score otherwise.
    recency = fitted[4]
    flipped = table.flip(1)
    assert not torch.allclose(recency.score_sequences(flipped), recency.score(everyone))
    last = fitted[3].score_sequences(torch.tensor([[0, 3, 0, 7, 0]]))
    torch.testing.assert_close(last, fitted[3].score_sequences(torch.tensor([[7]])))
    for model in [*fitted, knn]:
        with pytest.raises(DataError, match=r"sessions|history"):
            model.score_sequences(torch.tensor([[1.5]]))
    with pytest.raises(DataError, match="sessions"):
        fitted[1].score_sequences(torch.tensor([[25]]))
    with pytest.raises(NotFittedError):
        EASE().score_sequences(torch.tensor([[1]]))
