"""Items added to a trained model's catalogue (`Recommender.add_items`, `twostage
add-items`): a shop's new products, retrieved, filtered, shown and ranked from
their features until the next training run."""

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from twostage.catalogue import check_added_items, like_metadata, merged_metadata
from twostage.cli import app
from twostage.config import ExperimentConfig, IndexConfig, apply_overrides
from twostage.data.synthetic import planted_impressions
from twostage.data.tables import read_interactions
from twostage.errors import ConfigError, UnknownIdError
from twostage.estimator import TwoStageModel
from twostage.features.vocab import Vocabulary
from twostage.recommender import Recommender, load
from twostage.serving import ServeSettings, create_app
from twostage.two_stage import fit_two_stage

SMALL = [
    "train.epochs=4",
    "train.num_threads=1",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "ranking.embedding_dim=16",
    "ranking.hidden_dims=16",
    "ranking.epochs=4",
    "ranking.hard_negative_pool=20",
    "ranking.batch_size=128",
    "ranking.ease_weight=0.5",
    "retrieval.popularity_fallback=0",
]

#: Two good new items and one bad, with a title the trained items lack.
NEW = pl.DataFrame(
    {
        "item_id": [901, 902, 903],
        "kind": ["good", "bad", "good"],
        "title": ["Fresh A", "Fresh B", "Fresh C"],
    }
)


@pytest.fixture(scope="module")
def recommender(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    """The planted impression log of `planted_impressions`: the ranker learns the
    items' `kind` from what was shown and not chosen (and has an EASE term)."""
    path = tmp_path_factory.mktemp("added") / "impressions.csv"
    planted_impressions().write_csv(path)
    data = read_interactions(path, label_col="clicked", item_features=["kind"])
    stages = fit_two_stage(apply_overrides(ExperimentConfig(), SMALL), data)
    return stages.recommender(items=data.items)


def test_added_items_are_retrieved_ranked_and_shown(recommender: Recommender) -> None:
    rec = recommender.add_items(NEW)
    assert rec.ranker is not None and rec.ranker.ease is not None  # 0 for new items
    trained = recommender.item_vocab.size
    assert rec.item_vocab.size == trained + 3 and rec.num_trained_items == trained
    assert rec.index.size == trained + 2  # every item but the OOV row
    assert recommender.item_vocab.size == trained  # the original is unchanged
    everything = rec.recommend(7, rec.index.size, exclude_seen=False)
    listed = {i["item_id"]: i for i in everything.items}
    assert {901, 902, 903} <= set(listed)
    assert listed[901]["title"] == "Fresh A" and listed[901]["label"] == "Fresh A"
    # The ranker learned the kinds: a good added item above the bad one for
    # (nearly) every user, as a new candidate of a request is ranked.
    first = 0
    for user in range(1, 31):
        answer = rec.recommend(user, 2, candidates=[902, 901], exclude_seen=False)
        first += answer.items[0]["item_id"] == 901
        asked = rec.recommend(
            user, 1, candidates=[{"item_id": 999, "kind": "good"}]
        ).items[0]
        added = next(i for i in answer.items if i["item_id"] == 901)
        assert added["rank_score"] == pytest.approx(asked["rank_score"], abs=1e-5)
        assert "new_item" not in added
    assert first >= 27, first
    # Known items keep their scores; filters and similar items see the new ones.
    before = {i["item_id"]: i for i in recommender.recommend(7, 10).items}
    for item_id, item in before.items():
        assert listed[item_id]["score"] == pytest.approx(item["score"], abs=1e-6)
    assert [
        i["item_id"] for i in rec.recommend(7, 5, filters={"title": "Fresh C"}).items
    ] == [903]
    similar = [i["item_id"] for i in rec.similar_items(901, 10)]
    assert similar[0] == 903  # the same features: the same vector
    assert sum(i <= 40 or i in (901, 903) for i in similar) >= 7, similar
    table = rec.recommend_table([7, 8], rec.index.size, exclude_seen=False)
    assert set(table.filter(pl.col("user_id") == 7)["item_id"]) >= {901, 902, 903}
    # The same items as a pyarrow table: the same catalogue, the same vectors.
    from_arrow = recommender.add_items(NEW.to_arrow())
    assert from_arrow.added_items is not None and rec.added_items is not None
    assert from_arrow.added_items.equals(rec.added_items)
    assert from_arrow.recommend(7, 10).items == rec.recommend(7, 10).items


def test_a_bundle_keeps_its_added_items(
    recommender: Recommender, tmp_path: Path
) -> None:
    rec = recommender.add_items(NEW)
    path = rec.save(tmp_path / "models" / "shop" / "2")
    again = load(path)
    assert again.manifest["added_items"] == 3
    assert again.added_items is not None and again.added_items.height == 3
    torch.testing.assert_close(
        again.item_embeddings, rec.item_embeddings, rtol=0, atol=0
    )
    for user in (7, 8, "stranger"):
        assert again.recommend(user, 12).items == rec.recommend(user, 12).items
    assert again.similar_items(902, 5) == rec.similar_items(902, 5)
    # More items on top of the added ones; the first ones stay as they were.
    more = again.add_items(pl.DataFrame({"item_id": [904], "kind": ["bad"]}))
    assert more.item_vocab.lookup(904) == rec.item_vocab.size
    assert more.item_vocab.lookup(903) == rec.item_vocab.lookup(903)
    with pytest.raises(ConfigError, match=r"in the catalogue already.*903"):
        more.add_items(pl.DataFrame({"item_id": [903], "kind": ["bad"]}))


def test_an_added_item_in_a_session_is_seen_not_read(recommender: Recommender) -> None:
    """A visitor who clicks a product added after training: the model knows
    nothing of it, so the query reads the session's other items; the added one
    is still seen (never recommended back) and the answer names it."""
    rec = recommender.add_items(NEW)
    both = rec.recommend(session=[3, 901, 3], k=10)
    alone = rec.recommend(session=[3], k=11)
    assert both.path == alone.path == "session"
    assert both.unread_session_items == [901]
    assert both.to_dict()["unread_session_items"] == [901]
    assert "unread_session_items" not in alone.to_dict()
    ids = [i["item_id"] for i in both.items]
    assert ids == [i["item_id"] for i in alone.items if i["item_id"] != 901][:10]
    assert [i["score"] for i in both.items] == [
        i["score"] for i in alone.items if i["item_id"] != 901
    ][:10]
    # Nothing left to read: answered as if the session were empty, 901 unlisted.
    only = rec.recommend(session=[901, 902], k=len(rec.item_vocab.values))
    assert only.path == rec.recommend().path == "popularity"
    assert only.unread_session_items == [901, 902]
    assert {901, 902}.isdisjoint(i["item_id"] for i in only.items)
    known = rec.recommend(7, session=[902], k=12)
    assert known.path == "personalised" and known.unread_session_items == [902]
    assert 902 not in [i["item_id"] for i in known.items]
    assert rec.recommend(7, session=[902], k=12, exclude_seen=False).items


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_an_approximate_index_grows_by_the_added_items(
    recommender: Recommender, kind: str, tmp_path: Path
) -> None:
    """Adding items grows a copy of an approximate index (an HNSW graph of a
    million items takes minutes to build) rather than building it again: the
    trained items keep their places, the added ones follow, and the index the
    catalogue had is unchanged. Removing items builds one anew."""
    from twostage.config import IndexConfig

    rec = recommender.with_index(IndexConfig(kind=kind))
    grown = rec.add_items(NEW)
    assert grown.index is not rec.index and grown.index_kind == kind
    before = rec.index.ids
    assert grown.index.ids[: len(before)].tolist() == before.tolist()
    added = [grown.item_vocab.lookup(i) for i in (901, 902, 903)]
    assert grown.index.ids[len(before) :].tolist() == added
    assert rec.index.size == len(before)
    # an added item's own vector finds it (901 and 903 share their features)
    found = grown.index.search(grown.item_embeddings[added], 2)[1]
    assert all(item in row for item, row in zip(added, found.tolist(), strict=True))
    again = load(grown.save(tmp_path / "models" / "shop" / "2"))
    assert again.index_kind == kind
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("item_id,kind\n904,good\n")
    said = CliRunner().invoke(
        app, ["add-items", str(tmp_path / "models" / "shop"), "--items", str(fresh)]
    )
    assert said.exit_code == 0, said.output
    assert f"the {kind} index grown with them" in " ".join(said.output.split())
    assert again.index.ids.tolist() == grown.index.ids.tolist()
    smaller = grown.remove_items([901])
    assert smaller.index.size == grown.index.size - 1
    assert added[0] not in smaller.index.ids


def test_mistakes_in_the_items_to_add_are_named(recommender: Recommender) -> None:
    rec = recommender
    cases = [
        (pl.DataFrame({"id": [901], "kind": ["good"]}), "should have an `item_id`"),
        (pl.DataFrame({"item_id": [901]}), r"lacks the feature column\(s\) \['kind'\]"),
        (pl.DataFrame({"item_id": [901, None], "kind": ["good", "bad"]}), "rows 2"),
        (pl.DataFrame({"item_id": [901, 901], "kind": ["a", "b"]}), "more than once"),
        (
            pl.DataFrame({"item_id": [3, 901], "kind": ["a", "b"]}),
            r"added before\): 3\.",
        ),
        (pl.DataFrame({"item_id": ["x9"], "kind": ["good"]}), r"integers.*'x9'"),
        (pl.DataFrame({"item_id": [901], "kind": [[1, 2]]}), "cannot be encoded"),
        (pl.DataFrame({"item_id": [], "kind": []}), "holds no row"),
        ([{"item_id": 901}], "should be a polars, pandas or pyarrow table"),
    ]
    for items, message in cases:
        with pytest.raises(ConfigError, match=message):
            rec.add_items(items)  # type: ignore[arg-type]
    # Digits for an integer ID are the integer, as a request's IDs are.
    grown = rec.add_items(pl.DataFrame({"item_id": ["901"], "kind": ["good"]}))
    assert grown.item_vocab.lookup(901) == rec.item_vocab.size


def test_a_non_finite_number_in_an_added_item_is_named() -> None:
    catalogue = Vocabulary().fit([1, 2, 3])
    items = pl.DataFrame({"item_id": [7, 8, 9], "price": [1.0, float("nan"), None]})
    with pytest.raises(ConfigError, match=r"\['price'\].*Rows 2 hold NaN"):
        check_added_items(items, catalogue, ["price"], ["price"])
    kept = check_added_items(items[[0, 2]], catalogue, ["price"], ["price"])
    assert kept["item_id"].to_list() == [7, 9]  # a null is an unknown value
    # A CSV's number column with text in it arrives as text: the rows that are
    # no number are named (the encoder said "should be numeric. Received dtype
    # String", naming none), and the others read as the numbers they are.
    texts = pl.DataFrame({"item_id": [7, 8, 9], "price": ["12.5", "abc", None]})
    with pytest.raises(ConfigError, match=r"\['price'\].*row 2 holds 'abc'\.$"):
        check_added_items(texts, catalogue, ["price"], ["price"])
    kept = check_added_items(texts[[0, 2]], catalogue, ["price"], ["price"])
    assert kept["price"].to_list() == [12.5, None]


def test_add_items_from_the_cli_and_serve_them(
    recommender: Recommender, tmp_path: Path
) -> None:
    runner = CliRunner()
    models = tmp_path / "models"
    recommender.save(models / "shop" / "1")
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("item_id,kind,title\n901,good,Fresh A\n902,bad,Fresh B\n")
    added = runner.invoke(
        app, ["add-items", str(models / "shop"), "--items", str(fresh), "--json"]
    )
    assert added.exit_code == 0, added.output
    done = json.loads(added.stdout)
    assert done["saved"] == str(models / "shop" / "2") and done["added"] == 2
    assert done["index"] == "built"  # an exact index costs nothing to build
    info = runner.invoke(app, ["info", str(models / "shop")])
    assert info.exit_code == 0 and "2 (after training" in info.output
    shown = runner.invoke(app, ["similar", str(models / "shop"), "--item", "901"])
    assert shown.exit_code == 0, shown.output
    visit = runner.invoke(
        app, ["recommend", str(models / "shop"), "--session", "3,901", "-k", "3"]
    )
    assert visit.exit_code == 0, visit.output
    assert "item(s) 901 were added after training" in " ".join(visit.output.split())
    # `evaluate` measures the model as trained, as its retrieval figures do: the
    # ranking stage's figures on version 2 are version 1's, and it says why. It
    # crashed where the popularity fallback served a test user.
    log = tmp_path / "later.csv"
    planted_impressions(seed=3).write_csv(log)
    test = ["--test", str(log), "--json"]
    judged = runner.invoke(app, ["evaluate", str(models / "shop"), *test])
    assert judged.exit_code == 0, judged.output
    figures = json.loads(judged.stdout)
    first = runner.invoke(app, ["evaluate", str(models / "shop" / "1"), *test])
    trained = json.loads(first.stdout)
    assert figures["catalogue_since_training"] == {"added_items": 2, "removed_items": 0}
    assert "catalogue_since_training" not in trained
    assert figures["ranking"] == trained["ranking"]
    assert figures["retrieval"] == trained["retrieval"]
    # The Python API's evaluate, and the same figures.
    grown = TwoStageModel.load(models / "shop").evaluate(log, label_col="clicked")
    as_trained = TwoStageModel.load(models / "shop" / "1").evaluate(
        log, label_col="clicked"
    )
    assert grown.ndcg == as_trained.ndcg and grown.recall == as_trained.recall
    assert grown.ranking is not None and as_trained.ranking is not None
    for key, value in as_trained.ranking["impressions"].items():
        assert grown.ranking["impressions"][key] == pytest.approx(value), key
    shown = runner.invoke(app, ["evaluate", str(models / "shop"), *test[:2]])
    said = " ".join(shown.output.split())
    assert "the 2 item(s) added since training are not among the candidates" in said
    for text, message in [
        ("item_id,title\n905,X\n", "lacks the feature column"),
        ("item_id,kind\n901,good\n", "in the catalogue already"),
        ("item_id,kind\n905,good\n905,bad\n", "--items"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        refused = runner.invoke(
            app, ["add-items", str(models / "shop"), "--items", str(bad)]
        )
        assert refused.exit_code == 2, refused.output
        assert message in refused.output
    assert sorted(p.name for p in (models / "shop").iterdir()) == ["1", "2"]

    served = create_app(ServeSettings(models=str(models), poll_seconds=0))
    with TestClient(served) as client:
        meta = client.get("/v1/models/shop/metadata").json()
        assert meta["version"] == 2 and meta["num_added_items"] == 2
        answer = client.post(
            "/v1/recommend", json={"user_id": 7, "k": 2, "candidates": [901, 902]}
        )
        assert answer.status_code == 200, answer.text
        assert [i["item_id"] for i in answer.json()["items"]] == [901, 902]
        added = client.post("/v1/recommend", json={"session": [901], "k": 3})
        assert added.status_code == 200, added.text
        assert added.json()["unread_session_items"] == [901]
        assert 901 not in [i["item_id"] for i in added.json()["items"]]
        # :predict: a third output only when a session held an added item, then
        # one list per instance; the tutorials' requests see the two they know.
        rows = client.post(
            "/v1/models/shop:predict",
            json={"instances": [{"session": [3, 901], "k": 3}, {"user_id": 7}]},
        )
        assert rows.status_code == 200, rows.text
        first, second = rows.json()["predictions"]
        assert first["unread_session_items"] == [901]
        assert second["unread_session_items"] == []
        assert 901 not in first["output_2"] and len(first["output_2"]) == 3
        columns = client.post(
            "/v1/models/shop:predict",
            json={"inputs": {"session": [[901]], "k": [2]}},
        )
        assert columns.status_code == 200, columns.text
        assert columns.json()["outputs"]["unread_session_items"] == [[901]]
        plain = client.post("/v1/models/shop:predict", json={"instances": ["7"]})
        assert set(plain.json()["predictions"][0]) == {"output_1", "output_2"}


def test_added_items_join_an_ensemble_scored_exactly(tmp_path: Path) -> None:
    """EASE and the transition counts as members and the session-kNN term: what
    learned from the log gives an added item 0, and the exact scoring (which no
    index holds) covers it."""
    path = tmp_path / "impressions.csv"
    planted_impressions(users=60).write_csv(path)
    data = read_interactions(path, label_col="clicked", item_features=["kind"])
    members = [
        "retrieval.ensemble=ease,transition",
        "retrieval.ensemble_weights=1,0.01,0.005",
        "retrieval.session_knn_weight=0.05",
    ]
    config = apply_overrides(ExperimentConfig(), [*SMALL, *members])
    rec = fit_two_stage(config, data).recommender(items=data.items).add_items(NEW)
    assert rec.run.scores_exactly
    answer = rec.recommend(7, rec.index.size, exclude_seen=False)
    scores = {i["item_id"]: i["score"] for i in answer.items}
    assert {901, 902, 903} <= set(scores)
    # Alike features, alike scores: nothing item-specific reached them.
    assert scores[901] == pytest.approx(scores[903], abs=1e-6)
    assert rec.recommend(session=[3, 4], k=5).path == "session"


def test_removed_items_are_no_longer_served(
    recommender: Recommender, tmp_path: Path
) -> None:
    """Discontinued products: out of every answer, still read as history."""
    rec = recommender.add_items(NEW)
    first = [i["item_id"] for i in rec.recommend(7, 5).items]
    gone = [first[0], first[1], 901]
    smaller = rec.remove_items(gone)
    assert smaller.index.size == rec.index.size - 3
    every = smaller.recommend(7, smaller.index.size, exclude_seen=False).items
    assert not {i["item_id"] for i in every} & set(gone)
    assert len(every) == smaller.index.size
    # The rest of the list keeps its order.
    assert [i["item_id"] for i in smaller.recommend(7, 3).items] == first[2:5]
    for user in ("stranger", 8):  # the popularity fallback and a filter
        for answer in (
            smaller.recommend(user, 80),
            smaller.recommend(user, 80, filters={"kind": "good"}),
        ):
            assert not {i["item_id"] for i in answer.items} & set(gone)
    similar = smaller.similar_items(gone[0], 100)  # a removed item may be asked
    assert similar and not {i["item_id"] for i in similar} & set(gone)
    table = smaller.similar_table([3, 4], 100)
    assert not set(table["similar_item_id"]) & set(gone)
    users = smaller.recommend_table([7, 8, "stranger"], 100, exclude_seen=False)
    assert not set(users["item_id"]) & set(gone)
    assert smaller.recommend(session=[gone[0], 3], k=3).path == "session"
    with pytest.raises(UnknownIdError, match=r"removed from the catalogue"):
        smaller.recommend(7, 2, candidates=[first[2], first[0]])

    path = smaller.save(tmp_path / "models" / "shop" / "3")
    again = load(path)
    assert again.manifest["removed_items"] == 3
    assert again.recommend(7, 10).items == smaller.recommend(7, 10).items
    for item_ids, message in [
        ([12345], "not in the catalogue"),
        ([first[0]], "removed before"),
        ([3, 3], "more than once"),
        (["x"], "integers"),
        ([], "names no item"),
        ([i for i in [*range(1, 81), 902, 903] if i not in gone], "catalogue empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            again.remove_items(item_ids)
    # Added after removing: the removed stay removed.
    grown = again.add_items(pl.DataFrame({"item_id": [905], "kind": ["good"]}))
    assert grown.removed_items is not None and len(grown.removed_items) == 3
    # Back in stock: restored, served as before their removal (there was no
    # way back: add_items refused them as in the catalogue already).
    with pytest.raises(ConfigError, match=r"served again by `restore_items`"):
        again.add_items(pl.DataFrame({"item_id": [first[0]], "kind": ["good"]}))
    back = again.restore_items([first[0], 901])
    assert back.removed_items is not None and back.removed_items.to_list() == [first[1]]
    assert [i["item_id"] for i in back.recommend(7, 3).items] == [first[0], *first[2:4]]
    whole = back.restore_items([first[1]])
    assert whole.removed_items is None and whole.index.size == rec.index.size
    # An approximate index is grown by their vectors, not built again.
    graph = again.with_index(IndexConfig(kind="hnsw"))
    grown_back = graph.restore_items([first[0]])
    assert grown_back.index_kind == "hnsw"
    assert grown_back.index.size == graph.index.size + 1
    held = grown_back.index.ids.tolist()
    assert held[: graph.index.size] == graph.index.ids.tolist()
    assert held[-1] == grown_back.item_vocab.lookup(first[0])
    for user in (7, 8, "stranger"):
        assert whole.recommend(user, 10).items == rec.recommend(user, 10).items
    for item_ids, message in [
        ([first[2]], "were not removed: the catalogue serves them already"),
        ([12345], "not in the catalogue"),
        ([first[0], first[0]], "more than once"),
        ([], "nothing to restore"),
    ]:
        with pytest.raises(ConfigError, match=message):
            again.restore_items(item_ids)


def test_remove_items_from_the_cli(recommender: Recommender, tmp_path: Path) -> None:
    runner = CliRunner()
    models = tmp_path / "models"
    recommender.save(models / "shop" / "1")
    removed = runner.invoke(  # repeated, --ids joins (the last alone was kept)
        app,
        ["remove-items", str(models / "shop"), "--ids", "3", "--ids", "4", "--json"],
    )
    assert removed.exit_code == 0, removed.output
    assert json.loads(removed.stdout)["served_items"] == 78
    listed = tmp_path / "gone.csv"
    listed.write_text("item_id,reason\n5,discontinued\n")
    assert (
        runner.invoke(
            app, ["remove-items", str(models / "shop"), "--items", str(listed)]
        ).exit_code
        == 0
    )
    info = runner.invoke(app, ["info", str(models / "shop")])
    assert "3 (no longer served)" in info.output
    for args, message in [
        (["--ids", "3"], "removed before"),
        (["--ids", "999"], "not in the catalogue"),
        ([], "give --ids or --items"),
    ]:
        refused = runner.invoke(app, ["remove-items", str(models / "shop"), *args])
        assert refused.exit_code == 2, refused.output
        assert message in refused.output
    served = create_app(ServeSettings(models=str(models), poll_seconds=0))
    with TestClient(served) as client:
        meta = client.get("/v1/models/shop/metadata").json()
        assert meta["version"] == 3 and meta["num_removed_items"] == 3
        refused = client.post("/v1/recommend", json={"user_id": 7, "candidates": [3]})
        assert refused.status_code == 404 and "removed" in refused.text
    restored = runner.invoke(
        app, ["restore-items", str(models / "shop"), "--ids", "3,5", "--json"]
    )
    assert restored.exit_code == 0, restored.output
    assert json.loads(restored.stdout) == {
        "saved": str(models / "shop" / "4"),
        "restored": 2,
        "removed_in_all": 1,
        "served_items": 79,
    }
    again = runner.invoke(app, ["restore-items", str(models / "shop"), "--ids", "3"])
    assert again.exit_code == 2 and "were not removed" in again.output


def test_a_text_file_s_lists_take_the_metadata_s_layout() -> None:
    """A CSV writes genres as "Action|Sci-Fi" where the trained items' metadata
    holds lists: the added rows take the lists (and the reverse), so the two
    tables merge, and filters match the added items by membership."""
    metadata = pl.DataFrame({"item_id": [1], "genres": [["Drama"]], "notes": ["x"]})
    added = pl.DataFrame({"item_id": [7, 8], "genres": ["Action|Sci-Fi", None]})
    shaped = like_metadata(added, metadata, {"genres": "|"})
    assert shaped["genres"].to_list() == [["Action", "Sci-Fi"], None]
    merged = merged_metadata(metadata, shaped)
    assert merged["genres"].to_list() == [["Drama"], ["Action", "Sci-Fi"], None]
    as_text = like_metadata(
        pl.DataFrame({"item_id": [7], "genres": [["A", "B"]]}),
        pl.DataFrame({"item_id": [1], "genres": ["C|D"]}),
        {"genres": "|"},
    )
    assert as_text["genres"].to_list() == ["A|B"]
    # A column of another kind still fails, with the metadata's columns named.
    with pytest.raises(ConfigError, match="do not fit the catalogue's metadata"):
        merged_metadata(metadata, pl.DataFrame({"item_id": [9], "genres": [3]}))
