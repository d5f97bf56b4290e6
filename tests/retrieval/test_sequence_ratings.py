"""An ordered history reads the rating the user gave each item
(``retrieval.sequence_ratings``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from twostage.cli import app
from twostage.cli_info import bundle_info
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import Dataset
from twostage.errors import ConfigError
from twostage.models.fields import HISTORY_RATINGS
from twostage.models.sequence import RATING_BUCKETS, SequenceEncoder
from twostage.recommender import Recommender
from twostage.retrieval.fit import fit_retrieval
from twostage.retrieval.run import load_run
from twostage.retrieval.streamed import fit_streamed_retrieval
from twostage.retrieval.tensors import rating_buckets, rating_edges
from twostage.serving import ServeSettings, create_app

_SETTINGS = [
    "data.split=leave-last-out",
    "data.validation_fraction=0",
    "retrieval.query_encoder=transformer",
    "retrieval.examples=sequences",
    "retrieval.negatives=full",
    "retrieval.use_side_features=false",
    "retrieval.history_length=12",
    "retrieval.embedding_dim=32",
    "retrieval.output_dim=32",
    "retrieval.temperature=0.1",
    "retrieval.sequence_dropout=0.0",
    "retrieval.popularity_fallback=0",
    "train.epochs=40",
    "train.batch_size=64",
    "train.learning_rate=0.01",
    "train.num_threads=1",
]


def _successors(num_items: int = 60) -> tuple[np.ndarray, np.ndarray, Any]:
    """(``up``, ``down``, the generator that drew them) of :func:`_rated_walks`."""
    rng = np.random.default_rng(0)
    return rng.permutation(num_items), rng.permutation(num_items), rng


def _rated_walks(num_users: int = 300, num_items: int = 60) -> Dataset:
    """Each user walks the items, and the rating given to an item picks the next
    one: ``up[a]`` after a 4 or 5, ``down[a]`` after a 1 or 2 (a random jump one
    time in ten). The item alone leaves two equally likely successors."""
    up, down, rng = _successors(num_items)
    rows = []
    for user in range(num_users):
        item = int(rng.integers(num_items))
        for t in range(int(rng.integers(10, 15))):
            rating = int(rng.choice([1, 2, 4, 5]))
            rows.append((user, item, t, float(rating)))
            if rng.random() < 0.1:
                item = int(rng.integers(num_items))
            else:
                item = int(up[item] if rating >= 4 else down[item])
    frame = pl.DataFrame(
        rows, schema=["user_id", "item_id", "timestamp", "rating"], orient="row"
    )
    return Dataset("rated-walks", frame)


def test_rating_levels_become_buckets() -> None:
    stars = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 3.0, np.nan])
    edges = rating_edges(stars)
    np.testing.assert_allclose(edges, [1.5, 2.5, 3.5, 4.5])
    # a level between the training ones goes to the nearer; outside, to the ends
    values = np.array([1.0, 5.0, 3.2, 4.6, -3.0, 9.0, np.nan])
    assert rating_buckets(values, edges).tolist() == [1, 5, 3, 5, 1, 5, 0]
    # more levels than buckets: cut at quantiles, never past the table
    many = np.random.default_rng(0).normal(size=1000)
    buckets = rating_buckets(many, rating_edges(many))
    assert buckets.min() == 1 and buckets.max() == RATING_BUCKETS - 1
    counts = np.bincount(buckets)[1:]
    assert counts.min() > 0.5 * counts.max()  # quantiles: near-equal buckets


def test_a_rating_moves_only_its_own_and_later_positions() -> None:
    torch.manual_seed(0)
    encoder = SequenceEncoder(20, 16, max_length=6, ratings=True).eval()
    history = torch.tensor([[0, 3, 4, 5, 6, 7]])
    ratings = torch.tensor([[0, 1, 2, 3, 4, 5]])
    changed = ratings.clone()
    changed[0, 3] = 1
    before, after = (
        encoder.states(history, ratings=ratings),
        encoder.states(history, ratings=changed),
    )
    torch.testing.assert_close(before[:, :3], after[:, :3])
    assert not torch.allclose(before[:, 3:], after[:, 3:])
    # ratings not known (none given, or all 0) add nothing
    torch.testing.assert_close(
        encoder(history), encoder(history, ratings=torch.zeros_like(ratings))
    )


def test_reading_the_ratings_learns_what_the_items_alone_cannot(
    tmp_path: Path,
) -> None:
    dataset = _rated_walks()
    runs = {}
    for reads in (False, True):
        config = apply_overrides(
            ExperimentConfig(),
            [*_SETTINGS, f"retrieval.sequence_ratings={str(reads).lower()}"],
        )
        runs[reads], _ = fit_retrieval(config, dataset=dataset)
    hits = {
        reads: run.metrics["metrics"]["exclude_seen"]["hit_rate"]["1"]
        for reads, run in runs.items()
    }
    # the item alone leaves two successors: at best about half right
    assert hits[False] < 0.6
    assert hits[True] > hits[False] + 0.2, hits
    run = runs[True]
    tensors = run.tensors
    assert tensors.history_ratings.shape == tensors.history.shape
    assert (tensors.history_ratings[tensors.history == 0] == 0).all()
    assert set(tensors.history_ratings[tensors.history > 0].unique().tolist()) == {
        1,
        2,
        3,
        4,
    }  # the four levels 1, 2, 4, 5 in their order
    # saved and reloaded: the same tables and queries
    run.save(tmp_path / "run")
    again = load_run(tmp_path / "run")
    assert torch.equal(again.tensors.history_ratings, tensors.history_ratings)
    assert torch.equal(again.tensors.rating_edges, tensors.rating_edges)
    features = {k: v[:5] for k, v in tensors.user_features.items()}
    features.update(tensors.history_features(slice(0, 5)))
    assert HISTORY_RATINGS in features
    with torch.no_grad():
        torch.testing.assert_close(
            again.model.eval().encode_queries(features),
            run.model.eval().encode_queries(features),
        )
    # A known user's list reads their ratings; a session's items carry none, so
    # the same items sent as a session give another query.
    recommender = Recommender(again)
    user = dataset.interactions["user_id"][0]
    known = recommender.recommend(user, 5)
    spec = recommender.run.spec
    row = int(spec.vocabulary("user_id").transform(pl.Series([user]))[0])
    stored = tensors.history[row]
    items = spec.vocabulary("item_id").values
    offset = spec.vocabulary("item_id").num_oov_buckets
    session = [{"item_id": items[int(i) - offset]} for i in stored[stored > 0]]
    anonymous = recommender.recommend(None, 5, session=session)
    assert [e["score"] for e in known.items] != [e["score"] for e in anonymous.items]
    # A session's ratings are read: the same item rated 5 or 1 leads on to its
    # "up" or its "down" successor, served over HTTP as from the Python API.
    up, down, _ = _successors()
    item = int(items[0])
    liked = recommender.recommend(None, 1, session=[{"item_id": item, "rating": 5}])
    disliked = recommender.recommend(None, 1, session=[{"item_id": item, "rating": 1}])
    assert liked.items[0]["item_id"] == up[item]
    assert disliked.items[0]["item_id"] == down[item]
    recommender.save(tmp_path / "models" / "walks" / "1")
    settings = ServeSettings(models=str(tmp_path / "models"), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        # the page learns from the metadata that a session's ratings are read
        metadata = client.get("/v1/models/walks/metadata").json()
        assert metadata["reads_session_ratings"] is True
        body = {"session": [{"item_id": item, "rating": 1}], "k": 1}
        served = client.post("/v1/recommend", json=body).json()
        assert served["items"] == disliked.to_dict()["items"]
        for bad, status in [
            ({"session": [{"item_id": item, "rating": "good"}]}, 422),
            ({"session": [{"item_id": item, "rating": True}]}, 422),
        ]:
            response = client.post("/v1/recommend", json=bad)
            assert response.status_code == status, (bad, response.text)
    for rating in (float("nan"), float("inf"), "5", True):
        with pytest.raises(ConfigError, match="rating should be a finite number"):
            recommender.recommend(
                None, 1, session=[{"item_id": item, "rating": rating}]
            )
    # `twostage info` says what the history reads
    recommender.save(tmp_path / "bundle")
    assert bundle_info(tmp_path / "bundle")["retrieval"]["history_reads"] == ["ratings"]
    # and the CLI takes a session's ratings beside its items
    for rating, successor in (("5", up), ("1", down)):
        result = CliRunner().invoke(
            app,
            [
                *("recommend", str(tmp_path / "bundle"), "--session", str(item)),
                *("--session-ratings", rating, "-k", "1", "--json"),
            ],
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["items"][0]["item_id"] == successor[item]
    result = CliRunner().invoke(
        app,
        [
            *("recommend", str(tmp_path / "bundle"), "--session", f"{item},{up[item]}"),
            *("--session-ratings", "5"),
        ],
    )
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "one rating per --session item (2)" in said


def test_sequence_ratings_name_what_they_need(tmp_path: Path) -> None:
    dataset = _rated_walks(num_users=30)
    config = apply_overrides(
        ExperimentConfig(),
        [*_SETTINGS, "retrieval.sequence_ratings=true", "train.epochs=1"],
    )
    with pytest.raises(ConfigError, match=r"sequence_ratings.*query_encoder"):
        fit_retrieval(
            apply_overrides(config, ["retrieval.query_encoder=pooling"]),
            dataset=dataset,
        )
    unrated = Dataset("walks", dataset.interactions.drop("rating"))
    with pytest.raises(ConfigError, match="no `rating` column"):
        fit_retrieval(config, dataset=unrated)
    path = tmp_path / "log.parquet"
    unrated.interactions.write_parquet(path)  # a streamed log says the same
    with pytest.raises(ConfigError, match="has no `rating` column"):
        fit_streamed_retrieval(config, path)
