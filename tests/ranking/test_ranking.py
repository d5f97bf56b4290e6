"""The ranking stage on small known answers and small synthetic data."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from twostage.config import ExperimentConfig, apply_overrides, from_dict
from twostage.data.split import prepare_split
from twostage.data.synthetic import generate
from twostage.errors import ArtifactError, ConfigError, DataError
from twostage.models.ranking import CrossLayer, CrossNetwork, RankingModel
from twostage.models.towers import FieldInfo
from twostage.ranking import (
    RankingConfig,
    RankingRun,
    auc,
    evaluate_ranking,
    fit_ranking,
    load_ranking,
    mae,
    rmse,
    save_ranking,
)
from twostage.ranking import run as ranking_module
from twostage.ranking.fit import _train_config
from twostage.ranking.run import forward_pairs
from twostage.retrieval.fit import fit_retrieval

RETRIEVAL = [
    "data.validation_fraction=0.1",
    "train.epochs=3",
    "train.batch_size=256",
    "train.num_threads=1",
    "retrieval.use_side_features=false",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.history_length=20",
]
SMALL = RankingConfig(
    embedding_dim=16,
    hidden_dims=(64,),
    dropout=0.1,
    num_hard_negatives=1,
    num_random_negatives=1,
    hard_negative_pool=60,
    num_candidates=100,
    epochs=40,
    batch_size=256,
    learning_rate=0.01,
    early_stopping_patience=3,
    blend_weight=None,  # picked on validation
)


@pytest.fixture(scope="module")
def trained():
    """A retrieval run and a ranker on 300 users x 120 items with planted clusters."""
    torch.set_num_threads(1)  # `make test` runs two workers on two cores
    dataset = generate(num_users=300, num_items=120, num_interactions=6000)
    config = apply_overrides(ExperimentConfig(), RETRIEVAL)
    run, _ = fit_retrieval(config, dataset=dataset, evaluate_test=False)
    split = prepare_split(dataset, config)
    fit, test = split.fit, split.test
    ranking = fit_ranking(run, fit, config=SMALL, validation=split.validation)
    return run, ranking, fit, test


def test_cross_layer_matches_a_hand_computed_example() -> None:
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.linear.bias.copy_(torch.tensor([0.5, -1.0]))
    x0 = torch.tensor([[1.0, 2.0]])
    # W x = [1*3 + 2*-1, 3*3 + 4*-1] = [1, 5]; + b = [1.5, 4]; * x0 = [1.5, 8]; + x
    out = layer(x0, torch.tensor([[3.0, -1.0]]))
    torch.testing.assert_close(out, torch.tensor([[4.5, 7.0]]))
    network = CrossNetwork(2, 2)
    network.layers[0].load_state_dict(layer.state_dict())
    network.layers[1].load_state_dict(layer.state_dict())
    # x1 = x0 * (W x0 + b) + x0 = [1, 2] * [5.5, 10] + [1, 2] = [6.5, 22]
    # x2 = x0 * (W x1 + b) + x1 = [1, 2] * [51, 106.5] + [6.5, 22] = [57.5, 235]
    torch.testing.assert_close(network(x0), torch.tensor([[57.5, 235.0]]))
    torch.testing.assert_close(CrossNetwork(2, 0)(x0), x0)


def test_low_rank_cross_layer_is_the_product_of_its_factors() -> None:
    layer = CrossLayer(3, rank=1)
    with torch.no_grad():
        layer.down.weight.copy_(torch.tensor([[1.0, 0.0, 2.0]]))  # V: [1, 3]
        layer.up.weight.copy_(torch.tensor([[1.0], [-1.0], [0.5]]))  # U: [3, 1]
        layer.up.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    x0, x = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 0.0, 1.0]])
    # V x = 2 + 2 = 4; U V x + b = [4, -3, 2]; x0 * that + x = [6, -6, 7]
    torch.testing.assert_close(layer(x0, x), torch.tensor([[6.0, -6.0, 7.0]]))
    weight, bias = layer.matrix()
    assert weight.shape == (3, 3)
    torch.testing.assert_close(x0 * (x @ weight.T + bias) + x, layer(x0, x))
    assert sum(p.numel() for p in layer.parameters()) == 3 + 3 + 3


def _tiny_model(
    query_fields: list[FieldInfo], candidate_fields: list[FieldInfo], **options
) -> RankingModel:
    """A ranker over 7 users and 9 items with 4-wide embeddings and an 8-4 MLP."""
    return RankingModel(
        query_fields,
        candidate_fields,
        user_field="user_id",
        item_field="item_id",
        num_users=7,
        num_items=9,
        embedding_dim=4,
        hidden_dims=(8, 4),
        rating_mean=3.5,
        **options,
    )


@pytest.mark.parametrize(
    ("architecture", "structure", "extra_dim"),
    [("dcn", "parallel", 4), ("dcn", "stacked", 0), ("mlp", "parallel", 0)],
)
def test_model_variants_score_rows(architecture, structure, extra_dim) -> None:
    torch.manual_seed(0)
    model = _tiny_model(
        [FieldInfo("user_id", "index", 7)],
        [FieldInfo("item_id", "index", 9), FieldInfo("price", "dense", width=1)],
        architecture=architecture,
        structure=structure,
        use_biases=architecture == "dcn",
        extra_dim=extra_dim,
    )
    query = {"user_id": torch.tensor([1, 2, 3]), "history": torch.tensor([[0, 4]] * 3)}
    candidate = {"item_id": torch.tensor([4, 5, 6]), "price": torch.rand(3)}
    extras = {}
    if extra_dim:
        extras = {
            "retrieval_score": torch.rand(3),
            "query_embedding": torch.rand(3, extra_dim),
            "candidate_embedding": torch.rand(3, extra_dim),
        }
    out = model(query, candidate, **extras)
    assert out["rating"].shape == out["click"].shape == (3,)
    assert len(model.cross.layers) == (2 if architecture == "dcn" else 0)
    if extra_dim:
        with pytest.raises(ConfigError, match="retrieval features"):
            model(query, candidate)


@pytest.mark.parametrize(
    ("architecture", "structure", "extra_dim", "cross_rank"),
    [
        ("dcn", "parallel", 4, 0),
        ("dcn", "parallel", 0, 0),
        ("dcn", "parallel", 4, 3),
        ("dcn", "stacked", 4, 0),
        ("mlp", "parallel", 3, 0),
    ],
)
def test_per_query_scoring_equals_scoring_expanded_rows(
    architecture, structure, extra_dim, cross_rank
) -> None:
    """The first layers split into query and item parts: same scores as `combine`."""
    torch.manual_seed(1)
    model = _tiny_model(
        [FieldInfo("user_id", "index", 7), FieldInfo("age", "dense", width=1)],
        [FieldInfo("item_id", "index", 9), FieldInfo("tags", "indices", 5)],
        architecture=architecture,
        structure=structure,
        extra_dim=extra_dim,
        cross_rank=cross_rank,
    ).eval()
    users, width = 3, 5
    query = model.embed_queries(
        {
            "user_id": torch.tensor([1, 2, 6]),
            "age": torch.randn(users),
            "history": torch.tensor([[0, 4], [3, 8], [0, 0]]),
        }
    )
    items = torch.randint(1, 9, (users * width,))
    candidate = model.embed_candidates(
        {"item_id": items, "tags": torch.randint(0, 5, (users * width, 3))}
    )
    q = c = score = None
    extras = None
    if extra_dim:
        q, c = torch.randn(users, extra_dim), torch.randn(users * width, extra_dim)
        score = torch.randn(users * width)
        extras = torch.cat(
            [score[:, None], q.repeat_interleave(width, dim=0), c], dim=-1
        )
    with torch.no_grad():
        expected = model.combine(query.expand(width), candidate, extras)
        first = model.first_layers()
        projection = model.project_items(first, candidate, c)
        got = model.combine_per_query(
            query,
            candidate,
            first,
            projection,
            query_embedding=q,
            candidate_embedding=c,
            retrieval_score=score,
        )
    for head in ("rating", "click"):
        torch.testing.assert_close(got[head], expected[head], rtol=1e-5, atol=1e-5)
    if extra_dim:
        with pytest.raises(ConfigError, match="retrieval features"):
            model.combine_per_query(query, candidate, first, projection)


def test_rmse_mae_auc_match_naive_references() -> None:
    rng = np.random.default_rng(0)
    predicted, target = rng.normal(size=50), rng.normal(size=50)
    naive_rmse = math.sqrt(
        sum((p - t) ** 2 for p, t in zip(predicted, target, strict=True)) / 50
    )
    naive_mae = sum(abs(p - t) for p, t in zip(predicted, target, strict=True)) / 50
    assert rmse(torch.tensor(predicted), torch.tensor(target)) == pytest.approx(
        naive_rmse
    )
    assert mae(torch.tensor(predicted), torch.tensor(target)) == pytest.approx(
        naive_mae
    )
    # Rounded scores make ties, which count one half.
    pos, neg = rng.normal(0.5, 1, 40).round(1), rng.normal(0, 1, 60).round(1)
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    assert auc(torch.tensor(pos), torch.tensor(neg)) == pytest.approx(
        sum(pairs) / len(pairs)
    )
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0, 1.0])) == 0.5
    with pytest.raises(DataError, match="at least one positive"):
        auc(torch.tensor([]), torch.tensor([1.0]))


def test_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        RankingConfig.from_dict({"embeding_dim": 16})
    with pytest.raises(ConfigError, match="epochs"):
        from_dict(RankingConfig, {"epochs": "many"})
    with pytest.raises(ConfigError, match="architecture"):
        RankingConfig.from_dict({"architecture": "transformer"})
    with pytest.raises(ConfigError, match="dropout"):
        RankingConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="num_candidates"):
        RankingConfig(num_candidates=0)
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(RankingConfig(), ["cross_layer=3"])
    config = apply_overrides(RankingConfig(), ["hidden_dims=128,32", "blend_weight=1"])
    assert config.hidden_dims == (128, 32) and config.blend_weight == 1.0
    assert RankingConfig.from_dict(json.loads(json.dumps(config.__dict__))) == config


def test_ranker_learns_the_planted_structure(trained) -> None:
    _, ranking, fit, test = trained
    result = evaluate_ranking(ranking, test)
    ratings = test.interactions["rating"].to_numpy()
    mean_rmse = float(
        np.sqrt(((ratings - fit.interactions["rating"].mean()) ** 2).mean())
    )
    assert result["rmse"] < 0.85 * mean_rmse, (result["rmse"], mean_rmse)
    assert result["mae"] < result["rmse"]
    assert result["auc"] > 0.7
    for name in ("retrieval_only", "two_stage"):
        assert set(result[name]) == {"ndcg", "hit_rate", "recall"}
        assert list(result[name]["ndcg"]) == ["1", "5", "10", "50", "100"]
    # with 120 items every unseen item is a candidate: HitRate@100 is ~1 for both
    assert result["two_stage"]["hit_rate"]["100"] > 0.95
    assert [r["epoch"] for r in ranking.history] == list(range(len(ranking.history)))


def test_score_is_vectorised_over_candidates(trained) -> None:
    _, ranking, _, _ = trained
    users = torch.tensor([1, 5, 0])
    items = torch.tensor([[3, 4, 5, 6], [7, 1, 2, 3], [9, 9, 1, 2]])
    grid = ranking.score(users, items)
    assert grid["rating"].shape == grid["click"].shape == (3, 4)
    for row in range(3):
        for col in range(4):
            one = ranking.score(
                users[row : row + 1], items[row : row + 1, col : col + 1]
            )
            for head in ("rating", "click"):
                torch.testing.assert_close(one[head][0, 0], grid[head][row, col])
    low, high = ranking.rating_bounds
    assert grid["rating"].min() >= low and grid["rating"].max() <= high
    with pytest.raises(DataError, match="item_idx"):
        ranking.score(users, items[0])


def _assert_score_matches_embedding_per_call(ranking: RankingRun) -> None:
    """`score` gathers cached item rows and factors the first layers per user: the
    same scores, up to float rounding, as embedding the items per call."""
    generator = torch.Generator().manual_seed(2)
    num_users, num_items = ranking.tensors.history.shape[0], ranking.tensors.num_items
    for rows, cols in [(1, 300), (7, 40), (2, 1)]:
        users = torch.randint(0, num_users, (rows,), generator=generator)
        items = torch.randint(0, num_items, (rows, cols), generator=generator)
        with torch.no_grad():
            direct = forward_pairs(ranking, users, items, exclude_target=False)
        scored = ranking.score(users, items)
        torch.testing.assert_close(
            scored["click"], direct["click"], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            scored["rating"],
            direct["rating"].clamp(*ranking.rating_bounds),
            rtol=1e-5,
            atol=1e-5,
        )


def test_score_reuses_item_rows_until_the_weights_change(
    trained, tmp_path, monkeypatch
) -> None:
    """Regression (slow `recommend`): item rows are embedded once, not per call."""
    run, ranking, _, _ = trained
    save_ranking(ranking, tmp_path)
    loaded = load_ranking(tmp_path, run)
    _assert_score_matches_embedding_per_call(loaded)
    side = loaded.candidate_side()
    assert side is not None and loaded.candidate_side() is side
    # Catalogues too big for the cache of item projections project per call.
    monkeypatch.setattr(ranking_module, "_PROJECTION_CACHE_BYTES", 0)
    loaded.model.load_state_dict(loaded.model.state_dict())  # a fresh cache
    assert loaded._inference().projection is None
    _assert_score_matches_embedding_per_call(loaded)
    # ... and too big for the item rows: each call embeds its candidates.
    monkeypatch.setattr(ranking_module, "_ITEM_CACHE_BYTES", 0)
    loaded.model.load_state_dict(loaded.model.state_dict())
    assert loaded.candidate_side() is None
    _assert_score_matches_embedding_per_call(loaded)
    monkeypatch.undo()
    users, items = torch.tensor([1, 2]), torch.tensor([[3, 4, 5], [6, 7, 8]])
    before = loaded.score(users, items)["click"]
    state = loaded.model.state_dict()
    state["item_click_bias.weight"] = state["item_click_bias.weight"] + 1.0
    loaded.model.load_state_dict(state)  # new weights: the cached rows are stale
    torch.testing.assert_close(loaded.score(users, items)["click"], before + 1.0)


def test_save_load_gives_identical_scores(trained, tmp_path: Path) -> None:
    run, ranking, _, test = trained
    save_ranking(ranking, tmp_path)
    loaded = load_ranking(tmp_path, run)
    users = torch.arange(1, 40)
    items = torch.randint(1, 100, (39, 25), generator=torch.Generator().manual_seed(1))
    before, after = ranking.score(users, items), loaded.score(users, items)
    for head in ("rating", "click"):
        assert torch.equal(before[head], after[head])
    assert loaded.config == ranking.config
    assert loaded.blend_weight == ranking.blend_weight
    assert evaluate_ranking(loaded, test) == evaluate_ranking(ranking, test)


def test_load_rejects_mismatched_weights(trained, tmp_path: Path) -> None:
    run, ranking, _, _ = trained
    save_ranking(ranking, tmp_path)
    weights = load_file(tmp_path / "ranking.safetensors")
    weights["unexpected.weight"] = weights.pop("click_head.weight")
    save_file(weights, tmp_path / "ranking.safetensors")
    with pytest.raises(ArtifactError, match="missing keys"):
        load_ranking(tmp_path, run)
    save_ranking(ranking, tmp_path)
    config = json.loads((tmp_path / "ranking_config.json").read_text())
    config["embedding_dim"] += 1
    (tmp_path / "ranking_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="cannot load"):
        load_ranking(tmp_path, run)
    with pytest.raises(ArtifactError, match="cannot load"):
        load_ranking(tmp_path / "nowhere", run)
    config["embedding_dim"] = 0  # our own message, quoted: one full stop, not two
    (tmp_path / "ranking_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="positive integer") as error:
        load_ranking(tmp_path, run)
    assert ".." not in str(error.value)


def test_retrieval_only_lists_match_the_retrieval_evaluation(trained) -> None:
    """The ranker's seen items and history are the retrieval run's: same lists."""
    run, ranking, _, test = trained
    ours = evaluate_ranking(ranking, test)["retrieval_only"]
    theirs = run.evaluate(test).metrics["exclude_seen"]
    for metric in ("ndcg", "hit_rate"):
        for k in (1, 5, 10, 50, 100):
            assert ours[metric][str(k)] == pytest.approx(theirs[metric][k]), (metric, k)


def test_side_features_are_embedded_per_field() -> None:
    """Text (bag of indices), categorical and numeric fields all reach the ranker."""
    torch.set_num_threads(1)
    dataset = generate(num_users=80, num_items=40, num_interactions=1200)
    overrides = [o for o in RETRIEVAL if "side_features" not in o]
    config = apply_overrides(ExperimentConfig(), [*overrides, "train.epochs=1"])
    run, _ = fit_retrieval(config, dataset=dataset, evaluate_test=False)
    kinds = {f.output for f in run.spec.describe()}
    assert kinds == {"index", "indices", "dense"}
    split = prepare_split(dataset, config)
    small = dataclasses.replace(SMALL, epochs=2, hard_negative_pool=10)
    ranking = fit_ranking(run, split.fit, config=small, validation=split.validation)
    parts = ranking.model.query.num_parts + ranking.model.candidate.num_parts
    assert parts == len(run.spec.describe()) + 1  # every field plus the history
    scores = ranking.score(torch.tensor([1, 2]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert all(torch.isfinite(v).all() for v in scores.values())
    _assert_score_matches_embedding_per_call(ranking)  # bags and dense fields too


def test_sparse_ranker_tables_touch_only_the_batch_rows(
    trained, tmp_path: Path
) -> None:
    """`ranking.sparse_embeddings`: every ID-keyed table takes sparse gradients and
    the row-wise Adam step, so a user no training row names keeps its initial
    bias; the ranker learns as the dense one does, and saves and loads."""
    from twostage.training.optim import RowSparseAdam, make_optimizer

    run, dense, fit, test = trained
    sparse = fit_ranking(
        run,
        fit,
        config=dataclasses.replace(SMALL, sparse_embeddings=True, epochs=8),
        validation=None,
    )
    tables = [
        m
        for m in sparse.model.modules()
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag)
    ]
    assert len(tables) >= 5 and all(t.sparse for t in tables)  # fields, history, biases
    optimizers = make_optimizer(sparse.model, _train_config(sparse)).optimizers
    assert any(isinstance(o, RowSparseAdam) for o in optimizers)
    trained_users = set(
        run.spec.vocabulary("user_id").transform(fit.interactions["user_id"]).tolist()
    )
    biases = sparse.model.user_bias.weight[:, 0]
    untouched = [u for u in range(len(biases)) if u not in trained_users]
    assert untouched and bool((biases[untouched] == 0).all())  # OOV row at least
    assert bool((biases[sorted(trained_users)] != 0).any())
    mine, theirs = evaluate_ranking(sparse, test), evaluate_ranking(dense, test)
    assert mine["rmse"] < 1.1 * theirs["rmse"] and mine["auc"] > 0.7
    save_ranking(sparse, tmp_path)
    loaded = load_ranking(tmp_path, run)
    assert loaded.config.sparse_embeddings and evaluate_ranking(loaded, test) == mine


def test_max_steps_stops_the_ranker(trained) -> None:
    """`ranking.max_steps`: the ranker stops after that many steps in all, within
    an epoch, and that partial epoch is validated and kept."""
    run, _, fit, _ = trained
    steps: list[int] = []
    ranking = fit_ranking(
        run,
        fit,
        config=dataclasses.replace(SMALL, max_steps=5, epochs=3),
        validation=None,
        on_step=lambda progress: steps.append(progress["step"]),
    )
    assert steps == [0, 1, 2, 3, 4]
    assert len(ranking.history) == 1  # the partial epoch, validated and kept
    with pytest.raises(ConfigError, match="max_steps"):
        dataclasses.replace(SMALL, max_steps=-1)


def test_candidates_above_the_catalogue_are_reported(
    trained, caplog: pytest.LogCaptureFixture
) -> None:
    """More candidates than items trains (the ranker re-scores every unseen item),
    and says so."""
    run, _, fit, _ = trained
    with caplog.at_level("WARNING", logger="twostage"):
        fit_ranking(
            run,
            fit,
            config=dataclasses.replace(SMALL, num_candidates=500, max_steps=1),
            validation=None,
        )
    assert "ranking.num_candidates=500 is not below the catalogue's 120 items" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage"):
        fit_ranking(
            run, fit, config=dataclasses.replace(SMALL, max_steps=1), validation=None
        )
    assert "num_candidates" not in caplog.text


def test_a_candidate_list_is_reranked_as_served(trained) -> None:
    """`candidates` with a ranker: every listed unseen item is scored by the
    ranker and ordered by the served key, as the catalogue's top would be."""
    from twostage.recommender import Recommender

    run, ranking, _, _ = trained
    rec = Recommender(run, ranker=ranking)
    user = int(rec.user_vocab.values[0])
    full = rec.recommend(user, 100).items  # all of retrieval's top, re-ranked
    mine = [i["item_id"] for i in full[5:25]]
    ranked = rec.recommend(user, 20, candidates=mine[::-1]).items
    assert [i["item_id"] for i in ranked] == mine  # the served order, kept
    keys = [i["rank_score"] for i in ranked]
    assert keys == sorted(keys, reverse=True)
    assert all("predicted_rating" in i for i in ranked)


def test_the_logs_weights_scale_the_rankers_loss(trained) -> None:
    """The ranker read none of the log's row weights (`weight_col`), which scale
    the retrieval loss."""
    import polars as pl

    from twostage.ranking.fit import _loss
    from twostage.ranking.run import pairs_of

    run, ranking, fit, _ = trained
    # The loss: a row of weight 0 counts for nothing, one of weight 2 as two rows.
    users, items, ratings = pairs_of(run, fit, known_only=True)
    batch = (users[:64], items[:64], ratings[:64])
    weights = torch.tensor([0.0, 1.0, 2.0, 1.0]).repeat(16)
    rows = torch.cat([torch.nonzero(weights > 0), torch.nonzero(weights == 2)])[:, 0]
    mode = ranking.model.training
    ranking.model.eval()  # no dropout: the two losses see the same network
    try:
        with torch.no_grad():
            generator = torch.Generator()
            weighted = _loss(ranking, None, batch, generator, weights)
            repeated = _loss(ranking, None, tuple(p[rows] for p in batch), generator)
    finally:
        ranking.model.train(mode)
    torch.testing.assert_close(weighted, repeated)

    # Training: weights of 1 train the same ranker as none; others another one.
    config = dataclasses.replace(SMALL, max_steps=8, blend_weight=0.5)

    def trained_with(weight: pl.Expr | None) -> dict[str, torch.Tensor]:
        data = (
            fit
            if weight is None
            else fit.with_interactions(
                fit.interactions.with_columns(weight.cast(pl.Float32).alias("weight"))
            )
        )
        return fit_ranking(run, data, config=config, validation=None).model.state_dict()

    plain = trained_with(None)
    ones = trained_with(pl.lit(1.0))
    thirds = trained_with((pl.col("item_id") % 3 > 0).cast(pl.Float32))
    for name, value in plain.items():
        torch.testing.assert_close(ones[name], value, rtol=0, atol=1e-6)
    assert any(not torch.allclose(thirds[n], v) for n, v in plain.items())


def test_a_table_of_lists_is_the_lists_recommend_gives(trained) -> None:
    """`recommend_table` answers known users in chunks (one index search, one
    ranker call): the same items in the same order as one `recommend` per user."""
    from twostage.recommender import Recommender

    run, ranking, _, _ = trained
    rec = Recommender(run, ranker=ranking)
    users = [*rec.user_vocab.values.to_list()[:700], 10**9]  # and a stranger
    for use_ranker in (True, False):
        table = rec.recommend_table(users, 7, use_ranker=use_ranker)
        answers = rec.recommend_batch(users, 7, use_ranker=use_ranker)
        expected = [(a.user_id, i["item_id"]) for a in answers for i in a.items]
        assert list(zip(table["user_id"], table["item_id"], strict=True)) == expected
        keys = [i.get("rank_score", i["score"]) for a in answers for i in a.items]
        assert table["score"].to_list() == pytest.approx(keys, abs=1e-5)
        paths = {a.path for a in answers}
        assert "personalised" in paths and "popularity" in paths


def test_the_listwise_loss_is_the_softmax_of_each_positive_against_its_negatives(
    trained,
) -> None:
    """`ranking.listwise_weight`: the cross-entropy of each row's positive among
    its usable sampled negatives (the unusable ones left out), by hand; a ranker
    trained on it alone orders a user's items."""
    from twostage.ranking.fit import _loss, _negatives
    from twostage.ranking.run import pairs_of

    run, ranking, fit, test = trained
    pairs = pairs_of(run, fit, known_only=True)
    batch = tuple(p[:128] for p in pairs)
    config = dataclasses.replace(
        SMALL, rating_weight=0.0, click_weight=0.0, listwise_weight=2.0
    )
    listwise = dataclasses.replace(ranking, config=config)
    negatives = _negatives(listwise, pairs)
    assert negatives is not None  # drawn for the listwise term alone
    mode = ranking.model.training
    ranking.model.eval()
    try:
        with torch.no_grad():
            loss = _loss(listwise, negatives, batch, torch.Generator().manual_seed(3))
            sampled, usable = negatives.sample(
                batch[0], torch.Generator().manual_seed(3)
            )
            logits = forward_pairs(
                ranking,
                batch[0],
                torch.cat([batch[1][:, None], sampled], dim=1),
                exclude_target=True,
            )["click"]
    finally:
        ranking.model.train(mode)
    assert not usable.all()  # some draws are the user's own items, left out
    expected = []
    for row, ok in zip(logits, usable, strict=True):
        kept = torch.cat([row[:1], row[1:][ok]])
        expected.append(-torch.log_softmax(kept, dim=0)[0])
    torch.testing.assert_close(loss, 2.0 * torch.stack(expected).mean())

    trained_listwise = fit_ranking(
        run,
        fit,
        config=dataclasses.replace(config, epochs=10, blend_weight=0.0),
        validation=None,
    )
    assert evaluate_ranking(trained_listwise, test)["auc"] > 0.7
