"""The Recommender and its saved bundle."""

import dataclasses
from pathlib import Path

import polars as pl
import pytest
import torch

from twostage.artifacts import latest_version, verify_bundle
from twostage.config import ExperimentConfig, IndexConfig, apply_overrides
from twostage.errors import ArtifactError, ConfigError, UnknownIdError
from twostage.index import make_index
from twostage.recommender import Recommender, load
from twostage.retrieval.fit import fit_retrieval

CONFIG = [
    "data.dataset=synthetic:num_users=200,num_items=80,num_interactions=4000",
    "train.epochs=2",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.history_length=10",
    "retrieval.popularity_fallback=0",  # the paths of the model itself
]


@pytest.fixture(scope="module")
def fitted() -> tuple[Recommender, object]:
    run, split = fit_retrieval(apply_overrides(ExperimentConfig(), CONFIG))
    return Recommender(run, items=split.train.items), split


def test_seen_items_never_come_back(fitted: tuple[Recommender, object]) -> None:
    rec, _ = fitted
    for user_id in range(1, 60):
        seen = {i["item_id"] for i in rec.history(user_id)}
        seen |= set(
            rec.run.spec.vocabulary("item_id")
            .inverse_transform(rec._seen.row(rec.user_vocab.lookup(user_id)))
            .to_list()
        )
        got = [i["item_id"] for i in rec.recommend(user_id, 30).items]
        assert len(got) == 30 and not set(got) & seen
        with_seen = [
            i["item_id"] for i in rec.recommend(user_id, 80, exclude_seen=False).items
        ]
        assert set(with_seen) & seen  # the switch really switches


def test_a_candidate_list_is_ranked_as_the_catalogue_would_be(
    fitted: tuple[Recommender, object],
) -> None:
    """`candidates`: a client with a retrieval of its own asks for its list in
    the model's order; nothing could score a given list before."""
    rec, _ = fitted
    everything = [i["item_id"] for i in rec.recommend(3, 80).items]
    mine = everything[40:50][::-1] + everything[:3]
    ranked = rec.recommend(3, len(mine), candidates=mine)
    assert [i["item_id"] for i in ranked.items] == [
        i for i in everything if i in set(mine)
    ]
    assert ranked.path == "personalised"
    assert len(rec.recommend(3, 2, candidates=mine).items) == 2
    # seen items still leave unless asked to stay; filters still apply
    seen = [i["item_id"] for i in rec.history(3)][:2]
    assert [
        i["item_id"] for i in rec.recommend(3, 10, candidates=seen + mine[:1]).items
    ] == mine[:1]
    kept = rec.recommend(3, 10, candidates=seen, exclude_seen=False).items
    assert sorted(i["item_id"] for i in kept) == sorted(seen)
    cold = rec.recommend("stranger", 5, candidates=mine)  # most popular of them
    assert cold.path == "popularity" and {i["item_id"] for i in cold.items} <= set(mine)
    assert ranked.left_out_candidates == [] and cold.left_out_candidates == []
    assert "left_out_candidates" not in ranked.to_dict()
    with pytest.raises(UnknownIdError, match=r"`candidates` holds .*\[10000\]"):
        rec.recommend(3, 5, candidates=[mine[0], 10_000])
    for bad, message in [([], "at least one item"), ("12", "a list of item IDs")]:
        with pytest.raises(ConfigError, match=message):
            rec.recommend(3, 5, candidates=bad)
    with pytest.raises(ConfigError, match=r"`candidates\[1\]` should be an integer"):
        rec.recommend(3, 5, candidates=[mine[0], 1.5])


def test_the_candidates_an_answer_cannot_hold_are_named(
    fitted: tuple[Recommender, object],
) -> None:
    """A seen, filtered or repeated candidate left the answer with no word of it
    (the CLI said only that the list ran short)."""
    rec, _ = fitted
    seen = [i["item_id"] for i in rec.history(3)][:1]
    pool = [i["item_id"] for i in rec.recommend(3, 80).items]
    category = rec.items[rec.item_vocab.lookup(pool[0])]["category"]
    other = next(
        i for i in pool if rec.items[rec.item_vocab.lookup(i)]["category"] != category
    )
    asked = [pool[0], *seen, pool[0], other, {"item_id": pool[0]}]
    answer = rec.recommend(3, 10, candidates=asked, filters={"category": category})
    assert [i["item_id"] for i in answer.items] == [pool[0]]
    assert answer.left_out_candidates == [
        {"position": 1, "item_id": seen[0], "reason": "seen"},
        {"position": 2, "item_id": pool[0], "reason": "repeated"},
        {"position": 3, "item_id": other, "reason": "filters"},
        {"position": 4, "item_id": pool[0], "reason": "repeated"},
    ]
    assert answer.to_dict()["left_out_candidates"] == answer.left_out_candidates
    # Kept as seen when asked to; a cold start has no seen items.
    kept = rec.recommend(3, 10, candidates=seen, exclude_seen=False)
    assert [i["item_id"] for i in kept.items] == seen and not kept.left_out_candidates
    cold = rec.recommend("stranger", 10, candidates=seen)
    assert [i["item_id"] for i in cold.items] == seen and not cold.left_out_candidates


def test_paths_are_labelled(fitted: tuple[Recommender, object]) -> None:
    rec, _ = fitted
    assert rec.recommend(3, 5).path == "personalised"
    assert rec.recommend("stranger", 5).path == "popularity"
    answer = rec.recommend("stranger", 5, user_features={"age": 30})
    assert answer.path == "cold_start_features" and len(answer.items) == 5
    with pytest.raises(ConfigError, match="shoe_size"):
        rec.recommend("stranger", 5, user_features={"shoe_size": 44})


def test_answers_carry_metadata_and_respect_filters(
    fitted: tuple[Recommender, object],
) -> None:
    rec, _ = fitted
    items = rec.recommend(5, 5, filters={"category": "cat3"}).items
    assert items and all(i["category"] == "cat3" for i in items)
    assert {"item_id", "score", "title"} <= set(items[0])


def test_similar_items_and_unknown_item(fitted: tuple[Recommender, object]) -> None:
    rec, _ = fitted
    similar = rec.similar_items(7, k=5)
    assert len(similar) == 5 and 7 not in [i["item_id"] for i in similar]
    with pytest.raises(UnknownIdError, match="not in the catalogue"):
        rec.similar_items(10_000)
    with pytest.raises(ConfigError, match="`k`"):
        rec.recommend(3, 0)


def test_similar_items_take_filters(fitted: tuple[Recommender, object]) -> None:
    """ "More like this, in stock": `similar_items` had no filters, in Python, the
    CLI or over HTTP; a shop had to over-fetch and filter by hand."""
    rec, _ = fitted
    categories = [rec.items[i]["category"] for i in range(1, rec.item_vocab.size)]
    category = max(set(categories), key=categories.count)  # the most items
    wanted = {"category": category}
    similar = rec.similar_items(7, k=5, filters=wanted)
    assert len(similar) == 5 and all(i["category"] == category for i in similar)
    assert 7 not in [i["item_id"] for i in similar]
    # The closest items that pass, by an exact search of the candidate vectors.
    passing = [
        i for i in range(1, rec.item_vocab.size) if rec.items[i]["category"] == category
    ]
    scores = (
        rec.item_embeddings[passing] @ rec.item_embeddings[rec.item_vocab.lookup(7)]
    )
    order = [passing[int(j)] for j in scores.argsort(descending=True)]
    expect = [
        rec.item_vocab.values[i - 1] for i in order if i != rec.item_vocab.lookup(7)
    ]
    assert [i["item_id"] for i in similar] == expect[:5]
    table = rec.similar_table([7, 8], 5, filters=wanted)
    assert table.filter(pl.col("item_id") == 7)["similar_item_id"].to_list() == [
        i["item_id"] for i in similar
    ]
    assert rec.similar_items(7, 5, filters={"category": "no-such"}) == []
    assert rec.similar_table([7], 5, filters={"category": "no-such"}).height == 0
    with pytest.raises(ConfigError, match="unknown filter column"):
        rec.similar_items(7, 5, filters={"colour": "red"})
    # A text for a number column: polars' reason, not its query plan (which
    # reached HTTP clients over several lines).
    with pytest.raises(ConfigError) as wrong:
        rec.similar_items(7, 5, filters={"price": "<10"})
    said = str(wrong.value)
    assert said.startswith("`filters['price']` = '<10' cannot be compared with")
    assert "\n" not in said and "equals it" in said


def test_bundle_round_trip_is_identical(
    fitted: tuple[Recommender, object], tmp_path: Path
) -> None:
    rec, _ = fitted
    rec.save(tmp_path / "demo" / "1")
    rec.save(tmp_path / "demo" / "2")
    assert latest_version(tmp_path / "demo").name == "2"
    loaded = load(tmp_path / "demo" / "2")
    for user in (1, 2, 50, "stranger"):
        assert loaded.recommend(user, 10).to_dict() == rec.recommend(user, 10).to_dict()
    assert loaded.similar_items(7, 5) == rec.similar_items(7, 5)
    torch.testing.assert_close(
        loaded.item_embeddings, rec.item_embeddings, rtol=0, atol=0
    )
    with pytest.raises(ArtifactError, match="immutable"):
        rec.save(tmp_path / "demo" / "2")
    rec.save(tmp_path / "demo" / "2", overwrite=True)  # a bundle may be replaced
    assert load(tmp_path / "demo" / "2").recommend(1, 10).to_dict() == (
        rec.recommend(1, 10).to_dict()
    )
    # overwrite=True deleted whatever directory it was given, a user's files and
    # all; and overwrite="no" (truthy) overwrote.
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for target in (mine, mine / "notes.txt"):
        with pytest.raises(ArtifactError, match="is not a twostage bundle"):
            rec.save(target, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(ArtifactError, match="`overwrite` should be True or False"):
        rec.save(tmp_path / "demo" / "2", overwrite="no")  # type: ignore[arg-type]


def test_tampered_and_truncated_bundles_are_refused(
    fitted: tuple[Recommender, object], tmp_path: Path
) -> None:
    rec, _ = fitted
    bundle = rec.save(tmp_path / "b" / "1")
    verify_bundle(bundle)
    weights = bundle / "retrieval.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        ArtifactError, match=r"retrieval\.safetensors.*tampered or truncated"
    ):
        load(bundle)
    other = rec.save(tmp_path / "b" / "2")
    tables = other / "tables.safetensors"
    tables.write_bytes(tables.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"tables\.safetensors"):
        load(other)
    half = tmp_path / "b" / "3"
    half.mkdir()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load(half)
    assert latest_version(tmp_path / "b").name == "2"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_serves_and_round_trips(
    fitted: tuple[Recommender, object], tmp_path: Path, kind: str
) -> None:
    exact, _ = fitted
    config = dataclasses.replace(
        exact.run.config, index=IndexConfig(kind=kind, nprobe=64)
    )
    run = dataclasses.replace(exact.run, config=config)
    rec = Recommender(run)
    assert rec.index_kind == kind and not rec.index.is_exact
    for user in (1, 2, 50):
        got = [i["item_id"] for i in rec.recommend(user, 10).items]
        want = [i["item_id"] for i in exact.recommend(user, 10).items]
        # 80 items: the approximate search visits them all and agrees with exact.
        assert got == want
        seen = set(
            run.spec.vocabulary("item_id")
            .inverse_transform(rec._seen.row(rec.user_vocab.lookup(user)))
            .to_list()
        )
        assert len(got) == 10 and not set(got) & seen
    rec.save(tmp_path / "m" / "1")
    loaded = load(tmp_path / "m" / "1")
    assert loaded.index_kind == kind
    assert loaded.recommend(3, 10).to_dict() == rec.recommend(3, 10).to_dict()
    assert loaded.similar_items(7, 5) == rec.similar_items(7, 5)


def test_index_of_another_model_is_refused(fitted: tuple[Recommender, object]) -> None:
    rec, _ = fitted
    other = make_index(IndexConfig()).build(torch.randn(5, 16), torch.arange(1, 6))
    with pytest.raises(ArtifactError, match="Rebuild the index"):
        Recommender(rec.run, index=other)


def test_history_is_complete_beyond_the_model_window(
    fitted: tuple[Recommender, object],
) -> None:
    # Regression: history() used to return only the last `history_length` items.
    rec, _ = fitted
    vocab = rec.run.spec.vocabulary("item_id")
    longer = 0
    for user_id in range(1, 60):
        user_idx = rec.user_vocab.lookup(user_id)
        seen = rec._seen.row(user_idx)
        got = [i["item_id"] for i in rec.history(user_id)]
        assert sorted(got) == sorted(vocab.inverse_transform(seen).to_list())
        window = rec.run.tensors.history[user_idx]
        window_ids = vocab.inverse_transform(window[window > 0].numpy()).to_list()
        recent = [
            item
            for position, item in enumerate(window_ids)
            if item not in window_ids[position + 1 :]
        ]  # each item once, at its latest position
        assert len(set(got)) == len(got)
        assert got[len(got) - len(recent) :] == recent  # most recent last, in order
        longer += len(got) > rec.run.tensors.history.shape[1]
    assert longer > 0  # the fixture really has users past the window
    assert rec.history("nobody") == []


def test_bundle_files_must_be_listed_plain_and_inside(
    fitted: tuple[Recommender, object], tmp_path: Path
) -> None:
    """Regression: an unlisted items.parquet was loaded unchecked (it served an
    injected title), and symlinks and manifest paths that left the bundle were
    followed."""
    import json
    import os

    import polars as pl

    rec, _ = fitted
    bundle = rec.save(tmp_path / "b" / "1")
    (bundle / "items.parquet").unlink(missing_ok=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"].pop("items.parquet", None)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    load(bundle)  # fine without it
    pl.DataFrame({"item_id": [1], "title": ["injected"]}).write_parquet(
        bundle / "items.parquet"
    )
    with pytest.raises(ArtifactError, match=r"items\.parquet is not listed"):
        load(bundle)
    (bundle / "items.parquet").unlink()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (bundle / "extra.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symbolic link"):
        load(bundle)
    (bundle / "extra.json").unlink()
    manifest["files"]["../outside.json"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside"):
        load(bundle)
    # Saved bundles follow the umask (they were 0700/0600 whatever it was).
    previous = os.umask(0o022)
    try:
        other = rec.save(tmp_path / "c" / "1")
    finally:
        os.umask(previous)
    assert other.stat().st_mode & 0o777 == 0o755
    assert (other / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_a_list_of_users_is_a_clear_error(fitted: tuple[Recommender, object]) -> None:
    """Regression: recommend([1, 2]) raised `TypeError: unhashable type: 'list'`."""
    rec, _ = fitted
    with pytest.raises(ConfigError, match="recommend_batch"):
        rec.recommend([1, 2])
    assert len(rec.recommend_batch([1, 2], 3)) == 2


def test_ids_that_are_neither_integers_nor_strings_are_refused(
    fitted: tuple[Recommender, object],
) -> None:
    """Regression: Python's equality served True and 1.0 as user 1, and a NaN (an
    ID column read as floats) as a new user's cold start."""
    import numpy as np

    rec, _ = fitted
    user = int(rec.user_vocab.values[0])
    item = int(rec.item_vocab.values[0])
    for bad in (True, float(user), float("nan"), 1.5):
        with pytest.raises(ConfigError, match="`user_id` should be an integer or"):
            rec.recommend(bad, 3)
        with pytest.raises(ConfigError, match="`user_id` should be an integer or"):
            rec.history(bad)
        with pytest.raises(ConfigError, match="`item_id` should be an integer or"):
            rec.similar_items(bad, 3)
        with pytest.raises(ConfigError, match=r"`session\[1\]` should be an integer"):
            rec.recommend(session=[item, bad], k=3)
    # Integers of any kind, and strings of digits (a form field), are IDs.
    want = rec.recommend(user, 3).items
    assert rec.recommend(np.int64(user), 3).items == want
    assert rec.recommend(str(user), 3).items == want
    assert rec.recommend(session=[np.int32(item)], k=3).path == "session"
    # numpy integers are list lengths; switches are bools, since "no" is truthy
    # and excluded the seen items it asked to keep; a string of users was read
    # one character per user.
    assert len(rec.recommend(user, np.int64(3)).items) == 3
    assert len(rec.similar_items(item, np.int32(2))) == 2
    for switch in ("exclude_seen", "use_ranker", "explain"):
        with pytest.raises(ConfigError, match=f"`{switch}` should be True or False"):
            rec.recommend(user, 3, **{switch: "no"})
    assert rec.recommend(user, 3, exclude_seen=np.bool_(True)).items == want
    for users in (str(user), user):
        with pytest.raises(ConfigError, match="`user_ids` should be a list"):
            rec.recommend_batch(users, 3)  # type: ignore[arg-type]
    # search text: None ended in AttributeError ('NoneType' ... 'strip')
    for bad_text in (None, 3):
        with pytest.raises(ConfigError, match="`text` should be a string"):
            rec.search_items(bad_text)  # type: ignore[arg-type]


def test_a_new_user_s_features_may_come_nested_as_in_the_log(tmp_path: Path) -> None:
    """A log's struct `geo` reads as the feature `geo.country`; a client sending
    the user's record as the log holds it (`{"geo": {"country": "NO"}}`) was
    told the feature `geo` is unknown."""
    from twostage.data.synthetic import generate

    data = generate(num_users=120, num_items=60, num_interactions=2500, seed=3)
    countries = ["NO", "FI", "SE"]
    log = data.interactions.select(
        "user_id",
        "item_id",
        "timestamp",
        pl.struct(
            pl.col("user_id")
            .cast(pl.Int64)
            .mod(3)
            .replace_strict([0, 1, 2], countries)
            .alias("country")
        ).alias("geo"),
    )
    path = tmp_path / "log.parquet"
    log.write_parquet(path)
    config = apply_overrides(
        ExperimentConfig(),
        [
            f"data.dataset={path}",
            "data.user_features=geo.country",
            "train.epochs=1",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "retrieval.popularity_fallback=0",
        ],
    )
    run, _ = fit_retrieval(config)
    rec = Recommender(run)
    flat = rec.recommend("stranger", 5, user_features={"geo.country": "FI"})
    nested = rec.recommend("stranger", 5, user_features={"geo": {"country": "FI"}})
    assert flat.path == nested.path == "cold_start_features"
    assert nested.items == flat.items
    with pytest.raises(ConfigError, match=r"'geo\.country' is given twice"):
        rec.recommend(
            "stranger", 5, user_features={"geo.country": "FI", "geo": {"country": "NO"}}
        )
    with pytest.raises(ConfigError, match=r"unknown user feature\(s\) \['geo.city'\]"):
        rec.recommend("stranger", 5, user_features={"geo": {"city": "Oslo"}})


def test_known_users_queries_are_encoded_a_chunk_at_a_time(
    fitted: tuple[Recommender, object], monkeypatch
) -> None:
    """Every known user's query was encoded in one call: a million users'
    `[U, L, D]` history vectors asked for 25.6 GB and `recommend --all-users`
    died (10M-row log, history 100). Chunks of users give the same vectors."""
    import twostage.retrieval.run as retrieval_run

    rec, _ = fitted
    tensors = rec.run.tensors
    with torch.no_grad():
        whole = rec.run.model.encode_queries(
            {**tensors.user_features, **tensors.history_features(slice(None))}
        )
    monkeypatch.setattr(retrieval_run, "QUERY_CHUNK", 7)
    sizes = []
    encode = rec.run.model.encode_queries

    def counted(features: dict[str, torch.Tensor]) -> torch.Tensor:
        sizes.append(len(features["history"]))
        return encode(features)

    monkeypatch.setattr(rec.run.model, "encode_queries", counted)
    chunked = Recommender(rec.run, items=None)._known_queries()
    assert chunked.shape == whole.shape and whole.shape[0] > 7 * 3
    assert max(sizes) == 7 and sum(sizes) == whole.shape[0]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_a_table_of_lists_with_the_session_knn_term_is_what_recommend_gives() -> None:
    """With the session-kNN term every item is scored exactly (no index holds
    the term); `recommend_table` scores known users in chunks that way, the
    ranker included, with and without filters: the lists and keys one
    `recommend` per user gives."""
    from twostage.two_stage import fit_two_stage

    config = apply_overrides(
        ExperimentConfig(),
        [
            *CONFIG,
            "retrieval.session_knn_weight=0.05",
            "ranking.epochs=1",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.ease_weight=0.5",
            "ranking.blend_weight=1.0",
        ],
    )
    stages = fit_two_stage(config, evaluate_test=False)
    rec = stages.recommender(items=stages.split.train.items)
    assert rec.run.scores_exactly
    users = [*rec.user_vocab.values.to_list()[1:120], 10**9]  # and a stranger
    for options in (
        {},
        {"use_ranker": False},
        {"filters": {"category": "cat3"}},
        {"filters": {"category": "none"}},  # nothing passes: every list empty
        {"exclude_seen": False},
    ):
        table = rec.recommend_table(users, 7, **options)
        answers = rec.recommend_batch(users, 7, **options)
        expected = [(a.user_id, i["item_id"]) for a in answers for i in a.items]
        assert list(zip(table["user_id"], table["item_id"], strict=True)) == expected
        keys = [i.get("rank_score", i["score"]) for a in answers for i in a.items]
        assert table["score"].to_list() == pytest.approx(keys, abs=1e-5)
        assert {a.path for a in answers} >= {"personalised", "popularity"}


def test_a_file_named_as_a_model_is_a_clear_error(tmp_path: Path) -> None:
    """A file where a saved model was expected ended in NotADirectoryError's
    traceback (`twostage info`, `recommend`, `similar`, `evaluate`, `export`,
    `report`, and `--warm-start` all read a model so)."""
    from typer.testing import CliRunner

    from twostage.cli import app

    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(ArtifactError, match="is a file, not a saved model"):
        load(path)
    for command in (["info", str(path)], ["recommend", str(path), "--user", "1"]):
        done = CliRunner().invoke(app, command)  # the entry point prints it, exit 2
        assert isinstance(done.exception, ArtifactError), done.output
        assert "is a file, not a saved model" in str(done.exception)


def test_a_diverse_list_is_re_picked_from_the_same_candidates(
    fitted: tuple[Recommender, object],
) -> None:
    """diversity re-picks the k items from retrieval's candidates by maximal
    marginal relevance: weight 0 is the list as scored, the items keep their
    scores, the lists grow less alike as the weight grows, and the table of
    many users gives each user's list as recommend() does."""
    from twostage.diversity import intra_list_diversity

    rec, _ = fitted
    vectors = rec.item_embeddings

    def spread(answer: object) -> float:
        idx = torch.tensor([rec.item_vocab.lookup(i["item_id"]) for i in answer.items])  # type: ignore[attr-defined]
        return float(intra_list_diversity(vectors[idx][None])[0])

    users = list(range(1, 31))
    spreads = {w: 0.0 for w in (0.0, 0.5, 1.0)}
    for user in users:
        plain = rec.recommend(user, 10)
        assert rec.recommend(user, 10, diversity=0.0).items == plain.items
        scored = {i["item_id"]: i["score"] for i in rec.recommend(user, 80).items}
        pool = set(list(scored)[: rec.num_candidates])
        for weight in spreads:
            answer = rec.recommend(user, 10, diversity=weight)
            got = [i["item_id"] for i in answer.items]
            assert len(got) == 10 and set(got) <= pool
            assert got[0] == plain.items[0]["item_id"]  # the best comes first
            assert all(
                i["score"] == pytest.approx(scored[i["item_id"]]) for i in answer.items
            )
            spreads[weight] += spread(answer) / len(users)
    assert spreads[0.0] < spreads[0.5] < spreads[1.0]
    table = rec.recommend_table(users, 10, diversity=0.5)
    for user in (1, 17, 30):
        expected = [i["item_id"] for i in rec.recommend(user, 10, diversity=0.5).items]
        assert table.filter(pl.col("user_id") == user)["item_id"].to_list() == expected
    # A cold start is re-picked from the popular items the same way.
    cold = rec.recommend("stranger", 5, diversity=1.0)
    assert cold.path == "popularity" and len(cold.items) == 5
    with pytest.raises(ConfigError, match="`diversity` should be a number"):
        rec.recommend(3, 5, diversity=1.5)
    with pytest.raises(ConfigError, match="`diversity` should be a number"):
        rec.recommend_table([3], 5, diversity=-1)


def test_excluded_items_leave_the_answer_and_unknown_ones_are_named(
    fitted: tuple[Recommender, object],
) -> None:
    rec, _ = fitted
    plain = [i["item_id"] for i in rec.recommend(3, 10).items]
    answer = rec.recommend(3, 10, exclude=[plain[0], str(plain[2]), "no-such", 10**9])
    got = [i["item_id"] for i in answer.items]
    assert len(got) == 10 and plain[0] not in got and plain[2] not in got
    assert got[:7] == [plain[1], *plain[3:9]]  # the rest keep their order
    assert answer.unknown_excluded_items == ["no-such", 10**9]
    assert answer.to_dict()["unknown_excluded_items"] == ["no-such", 10**9]
    assert "unknown_excluded_items" not in rec.recommend(3, 10).to_dict()
    # An anonymous answer leaves them out too; so does a candidate list, naming why.
    popular = [i["item_id"] for i in rec.recommend("stranger", 3).items]
    cold = rec.recommend("stranger", 3, exclude=popular[:1])
    assert popular[0] not in [i["item_id"] for i in cold.items]
    ranked = rec.recommend(3, 5, candidates=plain[:3], exclude=[plain[1]])
    assert [i["item_id"] for i in ranked.items] == [plain[0], plain[2]]
    assert ranked.left_out_candidates == [
        {"position": 1, "item_id": plain[1], "reason": "excluded"}
    ]
    for bad in ("12", {12: 1}, [1.5], [[1]]):
        with pytest.raises(ConfigError, match="exclude"):
            rec.recommend(3, 5, exclude=bad)  # type: ignore[arg-type]


def test_at_most_n_items_share_a_metadata_value(
    fitted: tuple[Recommender, object],
) -> None:
    """max_per passes over a candidate whose category already has its n items:
    the answer is the first candidates in order that fit, in batches too."""
    rec, _ = fitted
    category = rec.item_filters.frame["category"].to_list()  # row = item index

    def of(item_id: object) -> str:
        return category[rec.item_vocab.lookup(item_id)]

    pool = [i["item_id"] for i in rec.recommend(5, rec.num_candidates).items]
    for limit in (1, 2):
        expected, held = [], {}
        for item in pool:
            if held.get(of(item), 0) < limit and len(expected) < 10:
                expected.append(item)
                held[of(item)] = held.get(of(item), 0) + 1
        got = rec.recommend(5, 10, max_per={"category": limit})
        assert [i["item_id"] for i in got.items] == expected
    mixed = rec.recommend(5, 10, max_per={"category": 1}, diversity=0.5)
    assert len({of(i["item_id"]) for i in mixed.items}) == len(mixed.items)
    table = rec.recommend_table([5, 6, "stranger"], 10, max_per={"category": 1})
    for user in (5, 6, "stranger"):
        lists = table.filter(pl.col("user_id").cast(pl.String) == str(user))
        expected = rec.recommend(user, 10, max_per={"category": 1}).items
        assert lists["item_id"].to_list() == [i["item_id"] for i in expected]
        assert (
            lists["item_id"].map_elements(of, return_dtype=pl.String).is_unique().all()
        )
    for bad, message in (
        ({"colour": 1}, "unknown `max_per` column"),
        ({"category": 0}, r"`max_per\['category'\]` should be a positive integer"),
        ({"category": True}, "should be a positive integer"),
        ([("category", 1)], "`max_per` should map metadata columns"),
    ):
        with pytest.raises(ConfigError, match=message):
            rec.recommend(5, 10, max_per=bad)  # type: ignore[arg-type]


def test_similar_items_take_the_same_rules(fitted: tuple[Recommender, object]) -> None:
    """ "More like this" with at most one item a category, or diverse: picked
    from the closest num_candidates as an answer is; the table agrees."""
    rec, _ = fitted
    category = rec.item_filters.frame["category"].to_list()
    closest = [i["item_id"] for i in rec.similar_items(7, rec.num_candidates)]
    expected, held = [], set()
    for item in closest:
        value = category[rec.item_vocab.lookup(item)]
        if value not in held and len(expected) < 5:
            expected.append(item)
            held.add(value)
    capped = rec.similar_items(7, 5, max_per={"category": 1})
    assert [i["item_id"] for i in capped] == expected
    diverse = [i["item_id"] for i in rec.similar_items(7, 5, diversity=1.0)]
    assert diverse[0] == closest[0] and set(diverse) <= set(closest)
    assert diverse != closest[:5]
    table = rec.similar_table([7, 9], 5, diversity=0.5, max_per={"category": 2})
    for item in (7, 9):
        rows = table.filter(pl.col("item_id") == item)
        one = rec.similar_items(item, 5, diversity=0.5, max_per={"category": 2})
        assert rows["similar_item_id"].to_list() == [i["item_id"] for i in one]
        assert rows["score"].to_list() == pytest.approx([i["score"] for i in one])
    with pytest.raises(ConfigError, match="unknown `max_per` column"):
        rec.similar_items(7, 5, max_per={"colour": 1})


def test_the_candidates_the_rules_pick_from_can_be_set(
    fitted: tuple[Recommender, object],
) -> None:
    """num_candidates sets the pool a list is picked from, for one list and
    for a table alike; a list max_per leaves short is picked again from a pool
    four times as wide, up to 16 times the first (or the catalogue)."""
    rec, _ = fitted
    rules = {"max_per": {"category": 1}}
    catalogue = rec.item_embeddings.shape[0] - 1
    assert rec.deepest_width(6) == min(96, catalogue)
    assert rec.deepest_width(2) == 32 and rec.deepest_width(10**6) == 10**6
    widened = 0
    for user in range(1, 30):
        pools = (6, 24, rec.deepest_width(6))
        once = {w: rec._recommend(user, 6, num_candidates=w, **rules) for w in pools}
        full = [w for w in pools if len(once[w].items) == 6]
        expected = once[full[0] if full else pools[-1]]
        answer = rec.recommend(user, 6, num_candidates=6, **rules)
        assert answer.to_dict()["items"] == expected.to_dict()["items"], user
        widened += len(once[6].items) < len(answer.items)
        # (at most one a category: never more items than categories)
        categories = {i["category"] for i in answer.items}
        assert len(categories) == len(answer.items)
    assert widened  # some lists ran short from 6 and were filled wider
    for width in (6, 60):
        table = rec.recommend_table([3, 4, 5, 6], 6, num_candidates=width, **rules)
        for user in (3, 4, 5, 6):
            one = rec.recommend(user, 6, num_candidates=width, **rules)
            rows = table.filter(pl.col("user_id") == user)
            assert rows["item_id"].to_list() == [i["item_id"] for i in one.items]
    # Without max_per nothing widens: diversity alone never shortens a list.
    assert rec.recommend(3, 6, num_candidates=6, diversity=1.0).to_dict() == (
        rec._recommend(3, 6, num_candidates=6, diversity=1.0).to_dict()
    )
    # "More like this" widens alike: the walk of the closest items, from the
    # first pool (6, 24, 96) that fills the list.
    category = rec.item_filters.frame["category"].to_list()
    closest = [i["item_id"] for i in rec.similar_items(7, catalogue)]
    for pool in (6, 24, rec.deepest_width(6)):
        walk, held = [], set()
        for item in closest[:pool]:
            value = category[rec.item_vocab.lookup(item)]
            if value not in held and len(walk) < 6:
                walk.append(item)
                held.add(value)
        if len(walk) == 6:
            break
    similar = rec.similar_items(7, 6, num_candidates=6, **rules)
    assert [i["item_id"] for i in similar] == walk
    table = rec.similar_table([7, 9], 6, num_candidates=6, **rules)
    assert table.filter(pl.col("item_id") == 7)["similar_item_id"].to_list() == walk
    nine = [i["item_id"] for i in rec.similar_items(9, 6, num_candidates=6, **rules)]
    assert table.filter(pl.col("item_id") == 9)["similar_item_id"].to_list() == nine
    with pytest.raises(ConfigError, match="`num_candidates` should be a positive"):
        rec.recommend_table([3], 6, num_candidates=0)
    # `widening` bounds the growth: 1 keeps the first pool's short lists, 4
    # stops after one widening; batched lists follow it too.
    try:
        for factor, widest in ((1, 6), (4, 24)):
            rec.widening = factor
            assert rec.deepest_width(6) == widest
            for user in (1, 2, 3, 4, 5):
                expected = rec._recommend(user, 6, num_candidates=6, **rules)
                if len(expected.items) < 6:  # the one widening allowed, if any
                    expected = rec._recommend(user, 6, num_candidates=widest, **rules)
                got = rec.recommend(user, 6, num_candidates=6, **rules)
                assert got.to_dict()["items"] == expected.to_dict()["items"]
            table = rec.recommend_table([1, 2, 3], 6, num_candidates=6, **rules)
            for user in (1, 2, 3):
                one = rec.recommend(user, 6, num_candidates=6, **rules)
                rows = table.filter(pl.col("user_id") == user)
                assert rows["item_id"].to_list() == [i["item_id"] for i in one.items]
        rec.widening = 0
        with pytest.raises(ConfigError, match="`widening` should be a positive"):
            rec.recommend(3, 6, max_per={"category": 1})
    finally:
        rec.widening = 16


def test_similar_items_leave_out_the_excluded(
    fitted: tuple[Recommender, object],
) -> None:
    """`exclude` on "more like this": the named items leave the answer, the
    next closest take their places, rules still apply; unknown IDs are named
    by unknown_item_ids, not an error."""
    rec, _ = fitted
    closest = [i["item_id"] for i in rec.similar_items(7, 8)]
    dropped = [closest[0], closest[3]]
    answer = rec.similar_items(7, 6, exclude=[*dropped, 99_999])
    assert [i["item_id"] for i in answer] == [i for i in closest if i not in dropped][
        :6
    ]
    scores = {i["item_id"]: i["score"] for i in rec.similar_items(7, 8)}
    assert [i["score"] for i in answer] == pytest.approx(
        [scores[i["item_id"]] for i in answer]
    )
    capped = rec.similar_items(7, 5, max_per={"category": 1}, exclude=dropped)
    assert not {i["item_id"] for i in capped} & set(dropped)
    filtered = rec.similar_items(
        7,
        5,
        filters={"category": rec.item_filters.frame["category"][1]},
        exclude=dropped,
    )
    assert not {i["item_id"] for i in filtered} & set(dropped)
    assert rec.unknown_item_ids([*dropped, 99_999, "x", 99_999]) == [99_999, "x"]
    with pytest.raises(ConfigError, match="`exclude` should be a list"):
        rec.similar_items(7, 5, exclude="7")  # type: ignore[arg-type]
    # A table takes each item's own (similar_table had no exclusions): the same
    # lists, item by item; 8 and "8" are one key; rules still apply.
    others = [i["item_id"] for i in rec.similar_items(8, 3)][:2]
    shut = {7: [*dropped, 99_999], "8": others}
    for rules in ({}, {"max_per": {"category": 1}}):
        table = rec.similar_table([7, 8, 9], 5, exclude=shut, **rules)
        for item, out in ((7, dropped), (8, others), (9, [])):
            mine = table.filter(pl.col("item_id") == item)["similar_item_id"]
            one = rec.similar_items(item, 5, exclude=out, **rules)
            assert mine.to_list() == [i["item_id"] for i in one], (item, rules)
    with pytest.raises(ConfigError, match=r"names 1 item\(s\) without a list"):
        rec.similar_table([7], 5, exclude={12: [3]})


def test_a_table_leaves_out_each_user_s_own_items(
    fitted: tuple[Recommender, object],
) -> None:
    """`exclude` on recommend_table: each user's list is recommend()'s with
    that user's exclusions, on the batched path and the one-by-one path (an
    unknown user), under the rules that widen the pool too; users match as
    text; a user without a list is refused by name."""
    rec, _ = fitted
    plain = {u: [i["item_id"] for i in rec.recommend(u, 6).items] for u in (3, 4)}
    exclude = {
        3: plain[3][:2],
        "4": [plain[4][0], 99_999],
        "stranger": [plain[3][0]],  # an unknown user: the popularity answer
    }
    users = [3, 4, 5, "stranger"]
    for options in ({}, {"max_per": {"category": 1}, "num_candidates": 6}):
        table = rec.recommend_table(users, 6, exclude=exclude, **options)
        for user in users:
            own = exclude.get(user, exclude.get(str(user)))
            one = rec.recommend(user, 6, exclude=own, **options)
            rows = table.filter(pl.col("user_id").cast(pl.String) == str(user))
            assert rows["item_id"].to_list() == [i["item_id"] for i in one.items]
            assert rows["score"].to_list() == pytest.approx(
                [i.get("rank_score", i["score"]) for i in one.items], abs=1e-6
            )
    mine = table.filter(pl.col("user_id").cast(pl.String) == "3")["item_id"]
    assert not set(mine.to_list()) & set(plain[3][:2])
    # 3 and "3" are one user: both entries' items leave the list.
    joined = rec.recommend_table([3], 6, exclude={3: plain[3][:1], "3": plain[3][1:2]})
    assert joined["item_id"].to_list() == [
        i["item_id"] for i in rec.recommend(3, 6, exclude=plain[3][:2]).items
    ]
    with pytest.raises(ConfigError, match=r"names 1 user\(s\) without a list here"):
        rec.recommend_table([3], 6, exclude={3: [1], 77: [2]})
    with pytest.raises(ConfigError, match="`exclude` should map user IDs"):
        rec.recommend_table([3], 6, exclude=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`exclude` should be a list"):
        rec.recommend_table([3], 6, exclude={3: "12"})  # type: ignore[dict-item]


def test_diversity_by_a_column_spreads_its_values(
    fitted: tuple[Recommender, object],
) -> None:
    """`diversity_by`: items alike by a metadata column's values. On a
    one-value column, at full weight every next pick is of a category not yet
    in the list while the candidates hold one; the table, the sessions and
    "more like this" pick alike; an unknown column is refused by name."""
    rec, _ = fitted
    category = rec.item_filters.frame["category"].to_list()

    def categories(items: list) -> list:
        return [category[rec.item_vocab.lookup(i)] for i in items]

    by = {"diversity": 1.0, "diversity_by": "category"}
    for user in (3, 4, 5):
        pool = [i["item_id"] for i in rec.recommend(user, rec.num_candidates).items]
        answer = [i["item_id"] for i in rec.recommend(user, 8, **by).items]
        distinct = min(8, len(set(categories(pool))))
        assert answer[0] == pool[0] and set(answer) <= set(pool)
        assert len(set(categories(answer[:distinct]))) == distinct, user
        embedded = [i["item_id"] for i in rec.recommend(user, 8, diversity=1.0).items]
        assert answer != embedded  # not the embeddings' pick
    table = rec.recommend_table([3, 4], 8, **by)
    for user in (3, 4):
        one = [i["item_id"] for i in rec.recommend(user, 8, **by).items]
        assert table.filter(pl.col("user_id") == user)["item_id"].to_list() == one
    visits = pl.DataFrame({"session_id": ["a", "a"], "item_id": [3, 5]})
    found = rec.recommend_sessions(visits, 6, **by).lists["item_id"].to_list()
    assert found == [
        i["item_id"] for i in rec.recommend(None, 6, session=[3, 5], **by).items
    ]
    similar = [i["item_id"] for i in rec.similar_items(7, 6, **by)]
    assert len(set(categories(similar))) == len(similar)
    # Without a weight the column changes nothing.
    assert rec.recommend(3, 8, diversity_by="category").to_dict() == (
        rec.recommend(3, 8).to_dict()
    )
    with pytest.raises(
        ConfigError, match=r"unknown `diversity_by` column\(s\) \['colour'\]"
    ):
        rec.recommend(3, 8, diversity=0.5, diversity_by="colour")
    with pytest.raises(ConfigError, match="`diversity_by` should name a metadata"):
        rec.recommend(3, 8, diversity=0.5, diversity_by=["category"])  # type: ignore[arg-type]


def test_a_short_answer_says_why(fitted: tuple[Recommender, object]) -> None:
    """`short_reason`: absent from a full answer; `no_more_items` when the
    catalogue (less the seen items, or the request's candidates) ran out;
    `max_per` when the limits passed over candidates of the widest pool."""
    rec, _ = fitted
    full = rec.recommend(3, 6)
    assert full.short_reason is None and "short_reason" not in full.to_dict()
    everything = rec.recommend(3, 1000)
    assert 0 < len(everything.items) < 1000
    assert everything.to_dict()["short_reason"] == "no_more_items"
    mine = [i["item_id"] for i in full.items[:3]]
    assert rec.recommend(3, 6, candidates=mine).short_reason == "no_more_items"
    limited = rec.recommend(3, 40, max_per={"category": 1})
    assert len(limited.items) < 40 and limited.short_reason == "max_per"
    # (the limit leaves the list short; no more items would not have)
    assert len(rec.recommend(3, 40).items) == 40
    few = rec.recommend(3, 1000, max_per={"category": 1})
    assert few.short_reason == "max_per"  # it passed over some the pool held
    capped = rec.recommend(3, 6, max_per={"category": 100})
    assert capped.short_reason is None


def test_a_set_valued_text_column_is_read_by_its_values(tmp_path: Path) -> None:
    """A CSV writes a set-valued item feature as text ("hats|kids"): the model
    reads its values, and so now do a filter, a limit per value, diversity by
    the column and the tags shown; the metadata keeps the text as written. A
    filter for "kids" matched nothing, and `max_per` took "hats|kids" and
    "shoes|kids" for two values."""
    from twostage.data.tables import read_interactions

    sets = ["hats|kids", "shoes|kids", "bags", "shoes|men"]
    rows = [
        f"{user},{item},{sets[item % 4]}"
        for user in range(40)
        for item in range(1 + user % 5, 41, 3)
    ]
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,category\n" + "\n".join(rows) + "\n")
    data = read_interactions(log, item_features=["category"])
    config = apply_overrides(
        ExperimentConfig(),
        ["train.epochs=1", "retrieval.embedding_dim=8", "retrieval.output_dim=8"],
    )
    run, _ = fit_retrieval(config, dataset=data)
    assert run.spec.describe(side="candidate")[-1].kind == "multi_hot"
    rec = Recommender(run, items=data.items)
    kids = rec.recommend(None, 20, filters={"category": "kids"}).items
    assert kids and all("kids" in item["category"].split("|") for item in kids)
    assert {item["category"] for item in kids} == {"hats|kids", "shoes|kids"}
    assert all(item["tags"] == item["category"].split("|") for item in kids)
    # A value written as the metadata shows it keeps the items holding all of
    # its values (it matched nothing once the column was read by its values).
    both = rec.recommend(None, 20, filters={"category": "hats|kids"}).items
    assert both and {item["category"] for item in both} == {"hats|kids"}
    assert rec.recommend(None, 20, filters={"category": "hats|men"}).items == []
    once = rec.recommend(None, 10, max_per={"category": 1}).items
    values = [v for item in once for v in item["category"].split("|")]
    assert len(values) == len(set(values)) and len(once) <= 3
    assert rec.recommend(None, 5, diversity=1.0, diversity_by="category").items
    assert rec.item_filters.from_text({"category": "kids"}) == {"category": "kids"}
    # A new item's values may be a list or the text a log writes, one item this
    # way and another that (mixed, they failed to build one column); the same
    # values score alike.
    new = rec.recommend(
        None,
        2,
        candidates=[
            {"item_id": 901, "category": ["hats", "kids"]},
            {"item_id": 902, "category": "hats|kids"},
        ],
    ).items
    assert {i["item_id"] for i in new} == {901, 902}
    assert new[0]["score"] == pytest.approx(new[1]["score"])
    like = rec.similar_items(903, 3, item_features={"category": ["bags"]})
    assert like == rec.similar_items(903, 3, item_features={"category": "bags"})
    # Over HTTP, a list is a set-valued feature's value (it was a 422).
    from fastapi.testclient import TestClient

    from twostage.serving import ServeSettings, create_app

    rec.save(tmp_path / "models" / "sets" / "1")
    settings = ServeSettings(models=str(tmp_path / "models"), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        body = {"k": 2, "candidates": [{"item_id": 901, "category": ["hats", "kids"]}]}
        answer = client.post("/v1/recommend", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["items"][0]["score"] == pytest.approx(new[0]["score"])
        body["candidates"] = [{"item_id": 901, "category": ["hats", None]}]
        assert client.post("/v1/recommend", json=body).status_code == 422


def test_a_table_of_new_users_is_answered_from_their_features(
    small_recommender: Recommender,
) -> None:
    """A campaign's new sign-ups: their lists from their features, as one
    request with `user_features` answers each (every unknown user's list was
    the popularity list)."""
    rec = small_recommender
    known = rec.user_vocab.values[0]
    given = {
        "new-1": {"age": 23, "segment": "s2"},
        "new-2": {"age": 61, "segment": "s10"},
        known: {"age": 99, "segment": "s1"},  # learned: not read
    }
    table = rec.recommend_table(
        ["new-1", known, "new-2", "new-3"], 5, user_features=given
    )
    for user in ("new-1", "new-2"):
        mine = table.filter(pl.col("user_id") == user)
        one = rec.recommend(user, 5, user_features=given[user])
        assert mine["item_id"].to_list() == [i["item_id"] for i in one.items]
        assert set(mine["path"]) == {"cold_start_features"}
    lists = {  # the IDs mix types: the table's column is text
        user: table.filter(pl.col("user_id") == str(user))["item_id"].to_list()
        for user in ("new-1", "new-2", "new-3", known)
    }
    assert lists["new-1"] != lists["new-2"]  # the features matter
    assert lists["new-3"] == [i["item_id"] for i in rec.recommend("new-3", 5).items]
    assert lists[known] == [i["item_id"] for i in rec.recommend(known, 5).items]
    with pytest.raises(ConfigError, match=r"names 1 user\(s\) without a list"):
        rec.recommend_table(["new-1"], 5, user_features={"other": {"age": 3}})
    with pytest.raises(ConfigError, match="should map user IDs to their features"):
        rec.recommend_table(["new-1"], 5, user_features={"new-1": 30})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"^user 'new-1': .*'age'\] should be a"):
        rec.recommend_table(["new-1"], 5, user_features={"new-1": {"age": "old"}})


def test_an_answer_says_why_the_user_features_were_not_read(
    small_recommender: Recommender,
) -> None:
    """Features sent for a known user, or for a new one the popularity
    fallback answers, were checked and then not read, without a word."""
    rec = small_recommender
    features = {"age": 30, "segment": "s2"}
    known = rec.user_vocab.values[0]
    answer = rec.recommend(known, 3, user_features=features)
    assert answer.user_features_unread == "known_user"
    assert answer.to_dict()["user_features_unread"] == "known_user"
    new = rec.recommend("new", 3, user_features=features)
    assert new.path == "cold_start_features" and new.user_features_unread is None
    assert "user_features_unread" not in new.to_dict()
    assert rec.recommend(known, 3).user_features_unread is None
    fallback = Recommender(dataclasses.replace(rec.run, popularity_fallback=3))
    plain = fallback.recommend("new", 3, user_features=features)
    assert plain.path == "popularity"
    assert plain.user_features_unread == "popularity_fallback"
