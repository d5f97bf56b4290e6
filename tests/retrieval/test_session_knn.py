"""The session-kNN term (`retrieval.session_knn_weight`): what it adds, that
evaluation, serving and the ranker's candidates add the same, and that it reloads."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from twostage.config import ExperimentConfig, apply_overrides, apply_settings
from twostage.data.dataset import ITEM, TIME, USER, Dataset
from twostage.data.user_items import UserItems
from twostage.errors import ArtifactError, ConfigError
from twostage.export import export_bundle
from twostage.models.session_knn import SessionNeighbours
from twostage.recommender import Recommender, load
from twostage.retrieval.fallback import (
    FALLBACK_GRID,
    SESSION_KNN_GRID,
    choose_term_weight,
)
from twostage.retrieval.fit import fit_retrieval
from twostage.retrieval.run import load_run
from twostage.retrieval.tensors import latest_rows, with_history_of
from twostage.serving import ServeSettings, create_app
from twostage.two_stage import fit_two_stage

WEIGHT = 0.05


def _walks(num_users: int = 80, num_items: int = 40) -> Dataset:
    """Users walk a chain (item ``a`` then ``successor[a]``, else a random jump)."""
    rng = np.random.default_rng(1)
    successor = rng.permutation(num_items)
    rows = []
    for user in range(num_users):
        item = int(rng.integers(num_items))
        for t in range(int(rng.integers(8, 14))):
            rows.append((user, item, t))
            jump = rng.random() > 0.7
            item = int(rng.integers(num_items)) if jump else int(successor[item])
    frame = pl.DataFrame(rows, schema=[USER, ITEM, TIME], orient="row")
    return Dataset("walks", frame)


#: A small GRU run with the term (its weight set apart).
SETTINGS = [
    "data.split=leave-last-out",
    "data.validation_fraction=0.05",
    "retrieval.examples=sequences",
    "retrieval.query_encoder=gru",
    "retrieval.negatives=full",
    "retrieval.use_side_features=false",
    "retrieval.history_length=6",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.popularity_fallback=0",
    "train.epochs=2",
    "train.num_threads=1",
    "retrieval.session_knn_neighbours=5",
    "retrieval.session_knn_length=10",
]


def _config(*extra: str) -> ExperimentConfig:
    return apply_overrides(
        ExperimentConfig(),
        [*SETTINGS, f"retrieval.session_knn_weight={WEIGHT}", *extra],
    )


@pytest.fixture(scope="module")
def trained():
    run, split = fit_retrieval(_config(), dataset=_walks())
    return run, split


def _stored(run, users: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` the term's stored sequences of ``users``, right-aligned (0 =
    padding), from the run's ragged tables."""
    lengths = run.tensors.neighbour_lengths
    starts = torch.cumsum(lengths, 0) - lengths
    width = int(lengths[users].max())
    out = torch.zeros(len(users), width, dtype=torch.long)
    for row, user in enumerate(users.tolist()):
        n = int(lengths[user])
        start = int(starts[user])
        out[row, width - n :] = run.tensors.neighbour_items[start : start + n]
    return out


def _expected_scores(run, queries: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """The term by hand: session-kNN over every stored sequence, as a padded
    table, standardised over the catalogue, times the weight."""
    cfg = run.config.retrieval
    table = _stored(run, torch.arange(len(run.tensors.neighbour_lengths)))
    knn = SessionNeighbours.from_table(
        table,
        num_items=int(run.tensors.item_probs.shape[0]),
        neighbours=cfg.session_knn_neighbours,
        recency=cfg.session_knn_recency,
        proximity=cfg.session_knn_proximity,
    ).score_sequences(queries, exclude=exclude)[:, 1:]
    z = (knn - knn.mean(dim=1, keepdim=True)) / knn.std(dim=1, keepdim=True)
    return torch.nn.functional.pad(WEIGHT * z, (1, 0))


def _served_rows(run, split, length: int) -> torch.Tensor:
    """``[U, length]`` each user's latest training and validation rows."""
    inter = split.train.interactions
    return latest_rows(
        inter[TIME].to_numpy(),
        run.spec.vocabulary(USER).transform(inter[USER]),
        run.spec.vocabulary(ITEM).transform(inter[ITEM]),
        num_users=run.spec.vocabulary(USER).size,
        length=length,
    )[0]


def test_the_sequences_hold_the_served_rows(trained) -> None:
    run, split = trained
    assert split.validation is not None and split.validation.num_interactions
    expected = _served_rows(run, split, 10)
    users = torch.arange(len(run.tensors.neighbour_lengths))
    assert torch.equal(run.tensors.neighbour_lengths, (expected > 0).sum(dim=1))
    assert torch.equal(_stored(run, users), expected)


def test_the_sequences_take_no_room_for_padding() -> None:
    """A length past every user's history (the whole history, as the
    session-kNN baseline reads it) stores each user's rows and nothing more:
    the term's memory is the rows kept, not users x the longest history; and
    the scores equal those over the padded table."""
    run, split = fit_retrieval(
        _config("retrieval.session_knn_length=100000"), dataset=_walks()
    )
    full = _served_rows(run, split, 1000)
    kept = int((full > 0).sum())
    assert len(run.tensors.neighbour_items) == kept < full.numel() // 10
    users = torch.arange(1, full.shape[0])
    assert torch.equal(
        _stored(run, users), full[users, -_stored(run, users).shape[1] :]
    )
    torch.testing.assert_close(
        run.neighbour_term(users), _expected_scores(run, full[users], users)
    )


def test_evaluation_and_serving_add_the_same_term(trained) -> None:
    run, split = trained
    recommender = Recommender(run)
    users = torch.arange(1, len(run.tensors.neighbour_lengths))
    term = run.neighbour_term(users)
    torch.testing.assert_close(term, _expected_scores(run, _stored(run, users), users))
    # Every user's list as served: dot products plus the term, seen items excluded.
    queries = recommender._known_queries()[users]
    scores = queries @ recommender.item_embeddings.T + term
    seen = run.tensors.seen()
    user_ids = run.spec.vocabulary(USER).values
    test = split.test.interactions
    hits = tested = 0
    for row, user in enumerate(users.tolist()):
        row_scores = scores[row].clone()
        row_scores[0] = -torch.inf
        row_scores[torch.from_numpy(seen.row(user))] = -torch.inf
        top = row_scores.topk(3).indices
        user_id = user_ids[user - 1]
        answer = recommender.recommend(user_id, 3)
        assert [e["item_id"] for e in answer.items] == [
            recommender.item_ids[int(i)] for i in top
        ]
        held = test.filter(pl.col(USER) == user_id)[ITEM].to_list()
        # A held-out item the user already has is unreachable once seen items
        # are excluded: the metric leaves such users out.
        tested += bool(
            set(held) - {recommender.item_ids[int(i)] for i in seen.row(user)}
        )
        hits += any(recommender.item_ids[int(i)] in held for i in top)
    figures = run.evaluate(split.test, ks=(3,)).to_dict()["metrics"]
    assert figures["exclude_seen"]["hit_rate"]["3"] == pytest.approx(hits / tested)
    # The term moves lists: without it the same run ranks otherwise.
    plain = dataclasses.replace(
        run,
        config=apply_overrides(run.config, ["retrieval.session_knn_weight=0"]),
    )
    assert plain.evaluate(split.test, ks=(3,)).to_dict()["metrics"] != figures


def test_a_session_reads_after_the_stored_items(trained) -> None:
    run, _ = trained
    recommender = Recommender(run)
    walk = [3, 7, 11]
    session = torch.tensor([recommender.item_vocab.lookup(i) for i in walk])
    answer = recommender.recommend(None, 4, session=walk)
    assert answer.path == "session"
    query = torch.tensor(0)  # row 0: no stored items, nobody to exclude
    expected = _expected_scores(run, session[None], query[None])[0]
    torch.testing.assert_close(
        run.neighbour_term(torch.tensor([0]), sessions=session[None])[0], expected
    )
    known = run.neighbour_term(torch.tensor([1]), sessions=session[None])[0]
    stored = torch.cat([_stored(run, torch.tensor([1]))[0], session])
    torch.testing.assert_close(
        known, _expected_scores(run, stored[None], torch.tensor([1]))[0]
    )


def test_a_session_knn_bundle_reloads_and_serves(trained, tmp_path: Path) -> None:
    run, _ = trained
    recommender = Recommender(run)
    root = tmp_path / "models" / "walks" / "1"
    recommender.save(root)
    again = load(root)
    for name in ("neighbour_lengths", "neighbour_items"):
        assert torch.equal(
            getattr(again.run.tensors, name), getattr(run.tensors, name)
        ), name
    walk = [3, 7]
    expected = recommender.recommend(None, 4, session=walk).to_dict()["items"]
    assert again.recommend(None, 4, session=walk).to_dict()["items"] == expected
    user = run.spec.vocabulary(USER).values[4]
    assert again.recommend(user, 4) == recommender.recommend(user, 4)
    settings = ServeSettings(models=str(tmp_path / "models"), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        metadata = client.get("/v1/models/walks/metadata").json()
        assert metadata["session_knn_weight"] == WEIGHT
        answer = client.post("/v1/recommend", json={"session": walk, "k": 4}).json()
        assert answer["items"] == expected
        predicted = client.post(
            "/v1/models/walks:predict",
            json={"instances": [{"session": walk, "k": 4}]},
        ).json()
        assert predicted["predictions"][0]["output_2"] == [
            e["item_id"] for e in expected
        ]


def _rewrite(root: Path, tables: dict[str, torch.Tensor]) -> None:
    """Replace a bundle's tables, its manifest's digest with them."""
    save_file(tables, root / "tables.safetensors")
    manifest = json.loads((root / "manifest.json").read_text())
    digest = hashlib.sha256((root / "tables.safetensors").read_bytes()).hexdigest()
    manifest["files"]["tables.safetensors"] = digest
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_bundle_saved_with_the_padded_table_loads(trained, tmp_path: Path) -> None:
    """Bundles saved before the sequences were ragged hold a ``[U, M]``
    ``neighbour_history`` table (0 = padding): it loads as the same sequences,
    and serves the same lists; lengths that disagree with the items are the
    artifact's fault, named."""
    run, _ = trained
    recommender = Recommender(run)
    root = tmp_path / "old"
    recommender.save(root)
    flat = load_file(root / "tables.safetensors")
    users = torch.arange(len(run.tensors.neighbour_lengths))
    padded = torch.nn.functional.pad(_stored(run, users), (3, 0))
    del flat["neighbour_lengths"], flat["neighbour_items"]
    _rewrite(root, {**flat, "neighbour_history": padded})
    again = load(root)
    for name in ("neighbour_lengths", "neighbour_items"):
        assert torch.equal(
            getattr(again.run.tensors, name), getattr(run.tensors, name)
        ), name
    user = run.spec.vocabulary(USER).values[4]
    assert again.recommend(user, 4) == recommender.recommend(user, 4)
    lengths, stored = run.tensors.neighbour_lengths, run.tensors.neighbour_items
    wrong = {
        "sum to": (lengths, stored[1:]),
        "one length >= 0 for each": (lengths[1:], stored[: int(lengths[1:].sum())]),
        "item indices 1 to": (lengths, stored + len(run.tensors.item_probs)),
        "integer": (lengths, stored.float()),
    }
    for message, (bad_lengths, bad_items) in wrong.items():
        _rewrite(
            root,
            {**flat, "neighbour_lengths": bad_lengths, "neighbour_items": bad_items},
        )
        with pytest.raises(ArtifactError, match=message):
            load(root)


def test_session_knn_mistakes_are_named(trained) -> None:
    with pytest.raises(ConfigError, match="session_knn_weight` should be -1"):
        _config("retrieval.session_knn_weight=-0.5")
    with pytest.raises(ConfigError, match="has no validation rows"):
        fit_retrieval(
            _config("retrieval.session_knn_weight=-1", "data.validation_fraction=0"),
            dataset=_walks(num_users=10),
        )
    with pytest.raises(ConfigError, match="session_knn_length` should be"):
        _config("retrieval.session_knn_length=0")
    run, _ = trained
    without_table = dataclasses.replace(run, tensors=run.tensors.without_neighbours())
    with pytest.raises(ConfigError, match="hold none"):
        without_table.neighbour_term(torch.tensor([1]))


def test_a_session_knn_run_exports_without_the_term_only_when_asked(
    trained, tmp_path: Path
) -> None:
    """Such a run was refused outright (no network holds the term); asked with
    `without_session_knn`, its networks export and `export.json` says what is
    missing; the option on a run without the term is refused."""
    ort = pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from twostage.cli import app
    from twostage.export import sample_inputs

    run, _ = trained
    rec = Recommender(run)
    with pytest.raises(ConfigError, match="no exported network holds"):
        export_bundle(rec, tmp_path / "refused")
    rec.save(tmp_path / "bundle")
    out = tmp_path / "onnx"
    runner = CliRunner()
    done = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "bundle"),
            "--out",
            str(out),
            "--without-session-knn",
        ],
    )
    assert done.exit_code == 0, done.output
    said = json.loads((out / "export.json").read_text())
    assert "session-kNN term" in said["not_exported"]
    queries = sample_inputs(rec, "query", rows=rec.user_vocab.size - 1)
    graph = ort.InferenceSession(
        str(out / "query_tower.onnx"), providers=["CPUExecutionProvider"]
    )
    got = graph.run(None, {k: v.numpy() for k, v in queries.items()})[0]
    with torch.no_grad():
        want = run.model.eval().encode_queries(queries).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    off = apply_settings(run.config, {"retrieval.session_knn_weight": 0})
    plain = dataclasses.replace(run, config=off)
    assert not plain.scores_exactly
    with pytest.raises(ConfigError, match="has none"):
        export_bundle(Recommender(plain), tmp_path / "plain", without_session_knn=True)


def test_the_rankers_candidates_carry_the_term() -> None:
    stages = fit_two_stage(
        _config(
            "ranking.epochs=1",
            "ranking.max_steps=3",
            "ranking.rating_weight=0",
            "train.epochs=1",
        ),
        _walks(num_users=40),
        evaluate_test=False,
    )
    run, ranker = stages.retrieval, stages.ranker
    assert ranker is not None
    users = torch.arange(1, 6)
    queries, items = ranker.retrieval_vectors()
    expected = (queries[users] @ items.T + run.neighbour_term(users)) / float(
        run.model.temperature
    )
    torch.testing.assert_close(ranker.retrieval_scores(users), expected)
    user = run.spec.vocabulary(USER).values[2]
    answer = Recommender(run, ranker=ranker).recommend(user, 3)
    assert answer.path == "personalised" and len(answer.items) == 3


def test_the_weight_picked_on_validation_is_the_best_lists() -> None:
    """One query; item 5 is wanted, item 1 seen. The dot products rank items 2, 3,
    4, 5 (-0.01 x item); the term favours item 5 (0.9), which climbs to 3rd at
    weight 0.02 and to 1st from 0.04: 0.04 is picked (the larger weights only
    tie)."""
    items = torch.zeros(6, 1)
    items[1:, 0] = -0.01 * torch.arange(1, 6)
    queries = torch.ones(1, 1)
    term = torch.zeros(1, 6)
    term[0, 5] = 0.9
    calls = []
    # The one user: item 5 is the validation item, item 1 a training item.
    user = {
        "relevant": UserItems.from_pairs([0], [5], num_rows=1),
        "seen": UserItems.from_pairs([0], [1], num_rows=1),
    }

    def term_of(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return term[start:stop]

    choice = choose_term_weight(
        queries,
        items,
        term_of,
        **user,
    )
    assert calls == [(0, 1)]  # the term is computed once for every weight
    calls.clear()
    rank = {0.0: 4, 0.0025: 4, 0.005: 4, 0.01: 4, 0.02: 3}
    expected = {w: 1 / np.log2(1 + rank.get(w, 1)) for w in SESSION_KNN_GRID}
    assert choice.ndcg == pytest.approx(expected)
    assert choice.weight == 0.04 and choice.num_users == 1
    assert choice.to_dict()["validation_ndcg_10"]["0.04"] == pytest.approx(1.0)
    assert str(choice).startswith(
        "0.04 (validation NDCG@10 over 1 users by weight: 0: 0.4307, 0.0025: 0.4307"
    )
    # Measured as served: where most-popular ranks item 5 2nd, the fallback serves
    # the user better than the weights below 0.02 (it is the picked threshold there).
    probs = torch.tensor([0.0, 0.1, 0.5, 0.05, 0.05, 0.3])
    served = choose_term_weight(
        queries,
        items,
        term_of,
        **user,
        item_probs=probs,
        num_train_items=np.array([1]),
        thresholds=FALLBACK_GRID,
    )
    assert served.ndcg == pytest.approx(
        {w: max(v, 1 / np.log2(3)) for w, v in expected.items()}
    )
    assert served.weight == 0.04
    nobody = choose_term_weight(
        queries[:0],
        items,
        term_of,
        relevant=UserItems.from_pairs([], [], num_rows=0),
        seen=UserItems.from_pairs([], [], num_rows=0),
    )
    assert nobody.weight == 0 and nobody.num_users == 0
    with pytest.raises(ValueError, match="item_probs"):
        choose_term_weight(
            queries,
            items,
            term_of,
            **user,
            thresholds=FALLBACK_GRID,
        )


def test_a_run_picks_its_weight_on_validation(tmp_path: Path) -> None:
    run, split = fit_retrieval(
        _config("retrieval.session_knn_weight=-1"), dataset=_walks()
    )
    assert run.session_knn is not None
    figures = {float(w): v for w, v in run.session_knn["validation_ndcg_10"].items()}
    assert set(figures) == set(SESSION_KNN_GRID)
    best = max(figures.values())
    assert run.session_knn_weight == min(w for w, v in figures.items() if v == best)
    # On walks along a chain the neighbours' next steps help: the term is kept.
    assert run.session_knn_weight > 0 and best > figures[0.0]
    # Evaluation and serving use the picked weight, and a saved run keeps it.
    fixed = dataclasses.replace(
        run,
        config=apply_overrides(
            run.config, [f"retrieval.session_knn_weight={run.session_knn_weight}"]
        ),
    )
    assert run.evaluate(split.test).to_dict() == fixed.evaluate(split.test).to_dict()
    recommender = Recommender(run)
    recommender.save(tmp_path / "bundle")
    again = load(tmp_path / "bundle")
    assert again.run.session_knn_weight == run.session_knn_weight
    assert again.run.session_knn == run.session_knn
    user = run.spec.vocabulary(USER).values[4]
    assert again.recommend(user, 5) == recommender.recommend(user, 5)
    # A run whose config leaves the weight to validation cannot load without it.
    run.save(tmp_path / "run")
    serving = tmp_path / "run" / "serving.json"
    values = json.loads(serving.read_text())
    del values["session_knn_weight"]
    serving.write_text(json.dumps(values))
    with pytest.raises(ArtifactError, match="session-kNN weight picked on validation"):
        load_run(tmp_path / "run")


def test_the_cli_trains_a_run_that_picks_its_weight(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from twostage.cli import app

    log = tmp_path / "walks.parquet"
    _walks().interactions.write_parquet(log)
    bundle = tmp_path / "models" / "walks" / "1"
    settings = [
        *SETTINGS,
        "data.time_col=timestamp",
        "retrieval.session_knn_weight=-1",
    ]
    args = ["train", "--dataset", str(log), "--out", str(bundle), "--no-ranking"]
    for setting in settings:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    served = load(bundle).run
    assert served.session_knn is not None
    assert f"Session-kNN term: weight {served.session_knn_weight:g}" in result.output
    report = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(bundle), "--out", str(report)])
    assert result.exit_code == 0, result.output
    text = (report / "report.md").read_text()
    assert f"{served.session_knn_weight:g} (picked on validation)" in text
    info = CliRunner().invoke(app, ["info", str(bundle)])
    shown = " ".join(info.output.replace("│", " ").split())
    weight = f"session-kNN term at weight {served.session_knn_weight:g}"
    assert f"serving rules {weight} (picked on validation)" in shown
    settings = ServeSettings(models=str(tmp_path / "models"), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        metadata = client.get("/v1/models/walks/metadata").json()
    assert metadata["session_knn_weight"] == served.session_knn_weight > 0


def test_a_run_that_picks_no_term_keeps_no_table(tmp_path: Path) -> None:
    # Users who share no item have no neighbours: the term adds nothing, every
    # weight ties, and the tie goes to 0, which drops the term and its table.
    walks = _walks().interactions
    apart = walks.with_columns(pl.col(ITEM) + pl.col(USER) * 40)
    config = _config("retrieval.session_knn_weight=-1")
    run, split = fit_retrieval(config, dataset=Dataset("apart", apart))
    assert run.session_knn is not None
    assert len(set(run.session_knn["validation_ndcg_10"].values())) == 1
    assert run.session_knn_weight == 0 and not run.scores_exactly
    assert not run.tensors.has_neighbours
    # The ranker's tables, built again from the run's, stay without it.
    both = with_history_of(run.tensors, run.spec, split.train, run.config.retrieval)
    assert not both.has_neighbours
    recommender = Recommender(run)
    recommender.save(tmp_path / "bundle")
    again = load(tmp_path / "bundle")
    assert again.run.session_knn_weight == 0
    assert not again.run.tensors.has_neighbours
    user = run.spec.vocabulary(USER).values[4]
    assert again.recommend(user, 5) == recommender.recommend(user, 5)
    session = list(run.spec.vocabulary(ITEM).values[1:4])
    assert again.recommend(None, 5, session=session) == recommender.recommend(
        None, 5, session=session
    )


def test_a_sampled_term_reads_the_users_active_last(tmp_path: Path) -> None:
    """``retrieval.session_knn_sample``: the run ranks its users by their latest
    served row, its term takes neighbours among the latest active only, and a
    bundle keeps the ranks (one without them, or with them broken, is named)."""
    run, split = fit_retrieval(
        _config("retrieval.session_knn_sample=3"), dataset=_walks()
    )
    # By hand: each user's latest served row (training and validation), ties by
    # index, users without rows (the unknown user, row 0) first.
    inter = split.train.interactions
    rows = run.spec.vocabulary(USER).transform(inter[USER])
    last = {int(u): t for u, t in zip(rows, inter[TIME].to_list(), strict=True)}
    for u, t in zip(rows, inter[TIME].to_list(), strict=True):
        last[int(u)] = max(last[int(u)], t)
    num_users = len(run.tensors.neighbour_lengths)
    order = sorted(range(num_users), key=lambda u: (u in last, last.get(u, 0), u))
    expected = torch.empty(num_users, dtype=torch.long)
    expected[torch.tensor(order)] = torch.arange(num_users)
    assert torch.equal(run.tensors.neighbour_latest, expected)
    cfg = run.config.retrieval
    users = torch.arange(1, num_users)
    raw = SessionNeighbours(
        run.tensors.neighbour_lengths,
        run.tensors.neighbour_items,
        num_items=int(run.tensors.item_probs.shape[0]),
        neighbours=cfg.session_knn_neighbours,
        sample=3,
        latest=expected,
    ).score_users(users)[:, 1:]
    z = (raw - raw.mean(dim=1, keepdim=True)) / raw.std(dim=1, keepdim=True)
    term = run.neighbour_term(users)
    torch.testing.assert_close(term, torch.nn.functional.pad(WEIGHT * z, (1, 0)))
    every = dataclasses.replace(
        run,
        config=apply_overrides(run.config, ["retrieval.session_knn_sample=0"]),
        # new sequences, so that the neighbours are built again
        tensors=dataclasses.replace(
            run.tensors, neighbour_items=run.tensors.neighbour_items.clone()
        ),
    )
    assert not torch.allclose(every.neighbour_term(users), term)
    # A bundle keeps the ranks and serves the same lists.
    recommender = Recommender(run)
    root = tmp_path / "sampled"
    recommender.save(root)
    again = load(root)
    assert torch.equal(again.run.tensors.neighbour_latest, expected)
    user = run.spec.vocabulary(USER).values[4]
    assert again.recommend(user, 4) == recommender.recommend(user, 4)
    walk = [3, 7]
    assert again.recommend(None, 4, session=walk) == recommender.recommend(
        None, 4, session=walk
    )
    from typer.testing import CliRunner

    from twostage.cli import app

    info = CliRunner().invoke(app, ["info", str(root)])
    shown = " ".join(info.output.replace("│", " ").split())
    assert f"weight {WEIGHT:g}, neighbours among the 3 latest active" in shown
    flat = load_file(root / "tables.safetensors")
    ranks = flat.pop("neighbour_latest")
    _rewrite(root, flat)
    with pytest.raises(ArtifactError, match="do not say when"):
        load(root)
    _rewrite(root, {**flat, "neighbour_latest": torch.zeros_like(ranks)})
    with pytest.raises(ArtifactError, match="each once"):
        load(root)
    with pytest.raises(ConfigError, match="session_knn_sample` should be"):
        _config("retrieval.session_knn_sample=-1")


def test_an_exact_term_over_many_users_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose term compares each query with every one of many stored users
    says so, and names `retrieval.session_knn_sample`; with a sample, or below
    the threshold, nothing is said."""
    from twostage.models import session_knn

    monkeypatch.setattr(session_knn, "EXACT_TERM_USERS", 50)  # the walks' 80 users
    with caplog.at_level("WARNING", logger="twostage.retrieval.fit"):
        fit_retrieval(_config(), dataset=_walks())
    said = [r.getMessage() for r in caplog.records if "stored users" in r.message]
    assert len(said) == 1 and "retrieval.session_knn_sample=1000" in said[0]
    assert "every one of the 80 stored users" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage.retrieval.fit"):
        fit_retrieval(_config("retrieval.session_knn_sample=20"), dataset=_walks())
        fit_retrieval(_config(), dataset=_walks(num_users=40))
    assert not [r for r in caplog.records if "stored users" in r.getMessage()]
