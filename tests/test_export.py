"""ONNX export: onnxruntime's outputs equal PyTorch's on a two-stage fixture bundle."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.export import sample_inputs
from twostage.recommender import Recommender, load
from twostage.retrieval.fit import fit_retrieval
from twostage.two_stage import fit_two_stage

ort = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-stage bundle with item side features (a text bag, a category, a
    number), user history and the ranker."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=150,num_items=70,num_interactions=3000",
            "train.epochs=1",
            "train.num_threads=1",
            "ranking.epochs=1",
            "retrieval.embedding_dim=16",
            "retrieval.output_dim=16",
            "retrieval.history_length=8",
        ],
    )
    stages = fit_two_stage(config)
    path = tmp_path_factory.mktemp("models") / "synthetic" / "1"
    stages.recommender().save(path)
    return path


def _session(path: Path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnx_towers_and_ranker_match_pytorch(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    result = CliRunner().invoke(
        app, ["export", str(bundle), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)
    assert {"query_tower", "candidate_tower", "ranker", "features"} <= set(files)
    rec: Recommender = load(bundle)
    model = rec.run.model

    # Every user and every item, not the 4 rows the graph was traced with.
    queries = sample_inputs(rec, "query", rows=rec.user_vocab.size - 1)
    got = _session(out / "query_tower.onnx").run(
        None, {k: v.numpy() for k, v in queries.items()}
    )[0]
    with torch.no_grad():
        want = model.encode_queries(queries).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)

    items = rec.run.tensors.item_features
    got = _session(out / "candidate_tower.onnx").run(
        None, {k: v.numpy() for k, v in items.items()}
    )[0]
    np.testing.assert_allclose(got, rec.item_embeddings.numpy(), rtol=0, atol=TOLERANCE)

    users = torch.tensor([0, 1, 2, 3, 5])  # 0: the unknown user
    candidates = torch.randint(1, rec.item_embeddings.shape[0], (5, 30))
    rating, click = _session(out / "ranker.onnx").run(
        None, {"user_idx": users.numpy(), "item_idx": candidates.numpy()}
    )
    want_ranker = rec.ranker.score(users, candidates)
    np.testing.assert_allclose(rating, want_ranker["rating"].numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(click, want_ranker["click"].numpy(), atol=TOLERANCE)
    described = json.loads((out / "export.json").read_text())
    assert [i["name"] for i in described["models"]["ranker.onnx"]["inputs"]] == [
        "user_idx",
        "item_idx",
    ]

    # export.json says how the outputs make the served list (the blend weight and
    # temperature were nowhere in the export): the ONNX graphs give its order.
    order = described["two_stage_order"]
    assert order["blend_weight"] == rec.ranker.blend_weight
    assert "predicted rating" in order["rating"]
    item_vectors = got  # the candidate tower's rows, by item index
    query_vectors = _session(out / "query_tower.onnx").run(
        None, {k: v.numpy() for k, v in queries.items()}
    )[0]
    checked = 0
    for user_idx in range(1, 30):
        user_id = rec.user_vocab.inverse_transform([user_idx])[0]
        served = rec.recommend(user_id, 10)
        if served.path != "personalised":
            continue
        seen = {rec.item_vocab.lookup(h["item_id"]) for h in rec.history(user_id)}
        scores = item_vectors @ query_vectors[user_idx - 1]
        scores[[0, *seen]] = -np.inf
        top = np.argsort(-scores, kind="stable")[: order["num_candidates"]]
        _, clicks = _session(out / "ranker.onnx").run(
            None,
            {
                "user_idx": np.array([user_idx]),
                "item_idx": top[None, :].astype(np.int64),
            },
        )
        key = clicks[0] + order["blend_weight"] * scores[top] / order["temperature"]
        ranked = top[np.argsort(-key, kind="stable")][:10]
        assert rec.item_vocab.inverse_transform(ranked).to_list() == [
            i["item_id"] for i in served.items
        ]
        checked += 1
    assert checked >= 5


def test_unknown_format_names_the_flag(bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(bundle), "--format", "tflite"])
    assert result.exit_code == 2 and "--format" in result.output


def test_an_export_never_lands_in_a_bundle_and_replaces_an_earlier_one(
    bundle: Path, tmp_path: Path
) -> None:
    """Regression: `export --out` a bundle's own directory overwrote its
    features.json and added files its manifest did not list: the bundle no longer
    loaded."""
    from twostage.errors import ConfigError
    from twostage.export import export_bundle

    rec = load(bundle)
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="not an earlier export"):
        export_bundle(rec, bundle)
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before
    load(bundle)  # still verifies
    out = tmp_path / "exported"
    assert "ranker" in export_bundle(rec, out)
    retrieval_only = Recommender(rec.run)  # no ranker: ranker.onnx must go
    export_bundle(retrieval_only, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "candidate_tower.onnx",
        "export.json",
        "features.json",
        "query_tower.onnx",
    ]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes\.txt"):
        export_bundle(rec, out)


@pytest.mark.parametrize(
    "ensemble",
    [
        [],
        ["retrieval.ensemble=gru,pooling", "retrieval.ensemble_weights=5,3,2"],
        ["retrieval.ensemble=ease", "retrieval.ease_rank=8"],
        ["retrieval.ensemble=ease,transition", "retrieval.ease_rank=8"],
    ],
    ids=["transformer", "ensemble", "ease", "transition"],
)
def test_a_transformer_history_with_item_features_exports(
    tmp_path: Path, ensemble: list[str]
) -> None:
    # The causal mask, the history items' side features (a text bag, a category,
    # a number), the time gaps (`history_times`, an input) and the ratings
    # (`history_ratings`) inside the query
    # tower's graph; with `retrieval.ensemble`, every member's towers in one graph
    # (an `ease` or `transition` member's factorised rows and per-query spread
    # included).
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=40,num_interactions=900",
            "train.epochs=1",
            "train.num_threads=1",
            "retrieval.embedding_dim=16",
            "retrieval.output_dim=16",
            "retrieval.history_length=8",
            "retrieval.query_encoder=transformer",
            "retrieval.examples=sequences",
            "retrieval.sequence_item_features=true",
            "retrieval.sequence_time_gaps=true",
            "retrieval.sequence_ratings=true",
            *ensemble,
        ],
    )
    run, _ = fit_retrieval(config)
    assert run.model.reads_item_features
    rec = Recommender(run)
    rec.save(tmp_path / "bundle")
    out = tmp_path / "onnx"
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "bundle"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    queries = sample_inputs(rec, "query", rows=rec.user_vocab.size - 1)
    assert "history_times" in queries and "history_ratings" in queries
    got = _session(out / "query_tower.onnx").run(
        None, {k: v.numpy() for k, v in queries.items()}
    )[0]
    with torch.no_grad():
        want = run.model.eval().encode_queries(queries).numpy()
    # A closed-form member's query entries are standardised scores (up to about 10, not
    # a unit vector's), so float32's rounding reaches past an absolute 1e-5.
    rtol = 1e-5 if "retrieval.ease_rank=8" in ensemble else 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=TOLERANCE)
    items = run.tensors.item_features
    got = _session(out / "candidate_tower.onnx").run(
        None, {k: v.numpy() for k, v in items.items()}
    )[0]
    np.testing.assert_allclose(got, rec.item_embeddings.numpy(), rtol=0, atol=TOLERANCE)


def test_a_ranker_with_the_ease_term_exports_its_scores(tmp_path: Path) -> None:
    # `ranking.ease_weight`: the ranker's graph has a third output, the EASE term
    # of each candidate (every user's query a table in the graph).
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=40,num_interactions=900",
            "train.epochs=1",
            "train.num_threads=1",
            "ranking.epochs=1",
            "retrieval.embedding_dim=16",
            "retrieval.output_dim=16",
            "ranking.ease_weight=0.5",
            "ranking.ease_rank=8",
        ],
    )
    rec = fit_two_stage(config, evaluate_test=False).recommender()
    rec.save(tmp_path / "bundle")
    out = tmp_path / "onnx"
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "bundle"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert rec.ranker is not None
    users = torch.tensor([0, 1, 2, 3, 5])  # 0: the unknown user, a zero term
    candidates = torch.randint(1, rec.item_embeddings.shape[0], (5, 12))
    rating, click, ease = _session(out / "ranker.onnx").run(
        None, {"user_idx": users.numpy(), "item_idx": candidates.numpy()}
    )
    want = rec.ranker.score(users, candidates)
    want_ease = rec.ranker.ease_scores(users, candidates)
    assert want_ease is not None and want_ease[1:].abs().max() > 0.1
    np.testing.assert_allclose(rating, want["rating"].numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(click, want["click"].numpy(), atol=TOLERANCE)
    # standardised scores (a few units): float32 rounding is relative
    np.testing.assert_allclose(ease, want_ease.numpy(), rtol=1e-5, atol=TOLERANCE)
    described = json.loads((out / "export.json").read_text())
    outputs = described["models"]["ranker.onnx"]["outputs"]
    assert [o["name"] for o in outputs] == ["rating", "click", "ease"]
