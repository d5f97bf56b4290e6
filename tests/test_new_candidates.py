"""New items among a request's candidates: a news site's fresh articles, a shop's
new products. An item the model never trained on is ranked from the features the
request carries for it, by both stages, as the evaluation of impression logs scores
such items (``RankingRun.with_items``)."""

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient

from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.synthetic import planted_impressions
from twostage.data.tables import read_interactions
from twostage.errors import ConfigError, UnknownIdError
from twostage.inputs import FAR_STANDARD_DEVIATIONS, far_numbers
from twostage.recommender import Recommender
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
    "retrieval.popularity_fallback=0",
]


@pytest.fixture(scope="module")
def recommender(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    """Impressions of one of 40 good items (chosen half the time) and ten of 40
    bad ones (chosen 1 in 20), each item of a `kind`: only what was shown and not
    chosen tells the kinds apart, and the ranker learns it from the shown rows."""
    path = tmp_path_factory.mktemp("new") / "impressions.csv"
    planted_impressions().write_csv(path)
    data = read_interactions(path, label_col="clicked", item_features=["kind"])
    stages = fit_two_stage(apply_overrides(ExperimentConfig(), SMALL), data)
    return stages.recommender(items=data.items)


def test_a_new_item_is_ranked_from_its_features(recommender: Recommender) -> None:
    rec = recommender
    ranked = 0
    for user in range(1, 31):
        answer = rec.recommend(
            user,
            2,
            candidates=[
                {"item_id": 902, "kind": "bad"},
                {"item_id": 901, "kind": "good"},
            ],
            exclude_seen=False,
        )
        assert answer.path == "personalised"
        assert [i["new_item"] for i in answer.items] == [True, True]
        assert {i["kind"] for i in answer.items} == {"good", "bad"}
        ranked += answer.items[0]["item_id"] == 901
    # The ranker learned the kinds from what was shown and not chosen; a new item
    # of the good kind comes first for (nearly) every user.
    assert ranked >= 27, ranked


def test_new_items_leave_the_known_ones_as_they_were(recommender: Recommender) -> None:
    rec = recommender
    known = [i["item_id"] for i in rec.recommend(7, 10).items]
    alone = rec.recommend(7, 10, candidates=known).items
    new = [{"item_id": 900 + n, "kind": k} for n, k in enumerate(["good", "bad"] * 3)]
    answer = rec.recommend(7, 16, candidates=[*known, *new])
    assert answer.alike_new_items == []  # told apart by their features
    mixed = answer.items
    assert len(mixed) == 16 and sum("new_item" in i for i in mixed) == 6
    kept = [i for i in mixed if "new_item" not in i]
    assert [i["item_id"] for i in kept] == [i["item_id"] for i in alone]
    for a, b in zip(kept, alone, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["rank_score"] == pytest.approx(b["rank_score"], abs=1e-6)
    # Items of one kind score alike (the ID is the unknown row for all of them).
    by_kind: dict[str, set[float]] = {}
    for item in mixed:
        if "new_item" in item:
            by_kind.setdefault(item["kind"], set()).add(round(item["rank_score"], 5))
    assert all(len(scores) == 1 for scores in by_kind.values()), by_kind
    # A known item sent as an object is the known item (its values not read).
    again = rec.recommend(7, 1, candidates=[{"item_id": known[0], "kind": "bad"}])
    assert "new_item" not in again.items[0]
    assert again.items[0]["rank_score"] == pytest.approx(alone[0]["rank_score"])


def test_serving_and_evaluation_score_a_new_item_alike(
    recommender: Recommender,
) -> None:
    """The request path (`score_features`) and the evaluation path (`with_items`,
    which grows the ranker's tables) give one new item the same click score."""
    rec = recommender
    ranker = rec.ranker
    assert ranker is not None
    items = pl.DataFrame({"item_id": [901, 902], "kind": ["good", "bad"]})
    grown, index, added = ranker.with_items(items["item_id"], items)
    assert added == 2
    user = torch.tensor([rec.user_vocab.lookup(11)])
    expected = grown.score(user, index[None, :])["click"][0]
    side = rec.run.spec.transform_items(items)
    got = ranker.score_features(user, side, rec.run.model.encode_items(side))
    torch.testing.assert_close(got["click"][0], expected)


def test_new_items_on_every_path(recommender: Recommender) -> None:
    rec = recommender
    new = [{"item_id": 901, "kind": "good"}]
    # A user the model does not know: the most popular known candidates first,
    # then the new ones, which have no popularity yet.
    known = [i["item_id"] for i in rec.recommend(7, 3).items]
    cold = rec.recommend("stranger", 4, candidates=[*new, *known])
    assert cold.path == "popularity"
    assert [i["item_id"] for i in cold.items][-1] == 901
    # Retrieval's order alone, and the explanation of a new item.
    plain = rec.recommend(7, 2, candidates=[*new, known[0]], use_ranker=False)
    assert {i["item_id"] for i in plain.items} == {901, known[0]}
    explained = rec.recommend(7, 1, candidates=new, explain=True)
    assert explained.items[0]["because"]["item_id"] in {
        i["item_id"] for i in rec.history(7)
    }


def test_a_new_item_s_mistakes_are_named(recommender: Recommender) -> None:
    rec = recommender
    with pytest.raises(UnknownIdError, match=r"\[901\].*as a new item"):
        rec.recommend(7, 5, candidates=[901])
    cases = [
        ([{"item_id": 901, "colour": "red"}], r"\['colour'\].*\['kind'\]"),
        ([{"kind": "good"}], r"`candidates\[0\]` should hold the item's 'item_id'"),
        ([{"item_id": 1.5}], r"should be an integer or string ID"),
        ([{"item_id": 901}, {"item_id": 901}], "listed twice"),
        ([{"item_id": 901, "kind": {"a": {"b": 1}}}], r"\['kind\.a\.b'\]"),
        ([{"item_id": 901, "kind": [1, "x"]}], r"\['kind'\] holds a list"),
    ]
    for candidates, message in cases:
        with pytest.raises(ConfigError, match=message):
            rec.recommend(7, 5, candidates=candidates)
    with pytest.raises(ConfigError, match="filter the candidates"):
        rec.recommend(7, 5, candidates=[{"item_id": 901}], filters={"kind": "good"})


def test_new_items_over_http(recommender: Recommender, tmp_path: Path) -> None:
    recommender.save(tmp_path / "models" / "news" / "1")
    app = create_app(ServeSettings(models=str(tmp_path / "models"), poll_seconds=0))
    new = [{"item_id": 901, "kind": "good"}, {"item_id": 902, "kind": "bad"}]
    with TestClient(app) as client:
        answer = client.post(
            "/v1/recommend", json={"user_id": 7, "k": 2, "candidates": new}
        )
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        assert {i["item_id"] for i in items} == {901, 902}
        assert all(i["new_item"] is True for i in items)
        predicted = client.post(
            "/v1/models/news:predict",
            json={"instances": [{"user_id": 7, "k": 2, "candidates": new}]},
        )
        assert predicted.status_code == 200, predicted.text
        assert set(predicted.json()["predictions"][0]["output_2"]) == {901, 902}
        for body, status, message in [
            ({"candidates": [{"kind": "good"}]}, 422, "item_id"),
            ({"candidates": [{"item_id": True}]}, 422, "item_id"),
            ({"candidates": [{"item_id": 903, "kind": [1]}]}, 400, "holds a list"),
            ({"candidates": [{"item_id": 903, "size": 3}]}, 400, "size"),
            ({"candidates": [903]}, 404, "as a new item"),
        ]:
            got = client.post("/v1/recommend", json={"user_id": 7, **body})
            assert got.status_code == status, (body, got.text)
            assert message in got.text


def test_new_items_from_the_cli(recommender: Recommender, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from twostage.cli import app

    runner = CliRunner()
    bundle = recommender.save(tmp_path / "models" / "news" / "1")
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("item_id,kind\n901,good\n902,bad\n")
    known = recommender.recommend(7, 1).items[0]["item_id"]
    result = runner.invoke(
        app,
        [
            *("recommend", str(bundle), "--user", "7", "-k", "3"),
            *("--candidates", str(known), "--new-items", str(fresh), "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)["items"]
    assert {i["item_id"] for i in items} == {known, 901, 902}
    assert sorted(i["item_id"] for i in items if i.get("new_item")) == [901, 902]
    # The table as printed, and the file's mistakes named by its row.
    printed = runner.invoke(
        app, ["recommend", str(bundle), "--user", "7", "--new-items", str(fresh)]
    )
    assert printed.exit_code == 0, printed.output
    assert "among the 2 --candidates and --new-items" in printed.output
    assert "901 (new)" in printed.output and "902 (new)" in printed.output
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,kind,size\n901,good,3\n")
    refused = runner.invoke(
        app, ["recommend", str(bundle), "--user", "7", "--new-items", str(bad)]
    )
    assert refused.exit_code == 2
    assert "`--new-items` row 1 holds feature(s) ['size']" in refused.output
    twice = tmp_path / "twice.csv"
    twice.write_text("item_id,kind\n901,good\n901,bad\n")
    refused = runner.invoke(
        app, ["recommend", str(bundle), "--user", "7", "--new-items", str(twice)]
    )
    assert refused.exit_code == 2 and "--new-items" in refused.output
    # A removed item among them is the file's mistake, not --candidates'.
    smaller = recommender.remove_items([known])
    smaller.save(tmp_path / "models" / "news" / "2")
    gone = tmp_path / "gone.csv"
    gone.write_text(f"item_id,kind\n{known},good\n")
    refused = runner.invoke(
        app, ["recommend", str(bundle.parent), "--user", "7", "--new-items", str(gone)]
    )
    said = " ".join(refused.output.replace("│", " ").split())
    assert refused.exit_code == 2, refused.output
    assert "Invalid value for --new-items: `--new-items` holds item(s) removed" in said


def test_items_like_a_new_one(recommender: Recommender, tmp_path: Path) -> None:
    """A new product's "more like this": the catalogue items closest to an item
    the model never trained on, from its features."""
    rec = recommender
    good = {}
    for kind in ("good", "bad"):
        similar = rec.similar_items(901, 10, item_features={"kind": kind})
        assert len(similar) == 10
        good[kind] = sum(i["item_id"] <= 40 for i in similar)
    # Each kind's items share its vector: a good new item's neighbours are
    # mostly good items, a bad one's mostly bad (by chance: 5 of 10 either way).
    assert good["good"] >= 7 and good["bad"] <= 3, good
    known = rec.similar_items(3, 5)
    assert rec.similar_items(3, 5, item_features={"kind": "bad"}) == known
    with pytest.raises(UnknownIdError, match="item_features"):
        rec.similar_items(901, 5)
    with pytest.raises(ConfigError, match=r"`item_features` holds .*\['size'\]"):
        rec.similar_items(901, 5, item_features={"size": 3})
    with pytest.raises(ConfigError, match="should map feature columns"):
        rec.similar_items(901, 5, item_features=["kind"])  # type: ignore[arg-type]

    from typer.testing import CliRunner

    from twostage.cli import app

    bundle = rec.save(tmp_path / "models" / "shop" / "1")
    runner = CliRunner()
    shown = runner.invoke(
        app, ["similar", str(bundle), "--item", "901", "--feature", "kind=good"]
    )
    assert shown.exit_code == 0, shown.output
    assert "Similar to item 901" in shown.output
    for args, message in [
        (["--item", "901"], "--feature KEY=VALUE"),
        (["--item", "901", "--feature", "size=3"], "`--feature` holds"),
    ]:
        refused = runner.invoke(app, ["similar", str(bundle), *args])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    app_ = create_app(ServeSettings(models=str(tmp_path / "models"), poll_seconds=0))
    with TestClient(app_) as client:
        body = {"item_id": 901, "k": 5, "item_features": {"kind": "good"}}
        answer = client.post("/v1/similar", json=body)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["items"]) == 5
        for extra, status in [({"kind": [1]}, 400), ({"size": 3}, 400)]:
            got = client.post("/v1/similar", json={**body, "item_features": extra})
            assert got.status_code == status, got.text


def test_a_number_far_out_of_range_is_the_client_s_mistake(tmp_path: Path) -> None:
    """A new item's price of 1e20 (the synthetic catalogue's prices are tens) made
    the towers' vectors NaN: the server answered 500 where the request was at
    fault."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=120,num_interactions=1500",
            *("train.epochs=1", "train.num_threads=1", "ranking.epochs=1"),
            *("retrieval.embedding_dim=8", "retrieval.output_dim=8"),
            *("ranking.embedding_dim=8", "ranking.hidden_dims=8"),
            *("ranking.hard_negative_pool=10", "retrieval.popularity_fallback=0"),
        ],
    )
    rec = fit_two_stage(config, evaluate_test=False).recommender()
    assert "price" in rec.item_feature_columns
    fine = rec.recommend(1, 2, candidates=[{"item_id": 10**6, "price": 20.0}, 1])
    assert len(fine.items) == 2
    for price in (1e20, 1e308):
        with pytest.raises(ConfigError, match=r"`candidates`\['price'\] = .* standard"):
            rec.recommend(1, 2, candidates=[{"item_id": 10**6, "price": price}])
        # The towers' vector would stay finite at 1e20, and be read as noise.
        with pytest.raises(
            ConfigError, match=r"`item_features`\['price'\] = .* standard"
        ):
            rec.similar_items(10**6, 2, item_features={"price": price})
    # Far, but within what a column of 10^8 training rows could hold: read.
    spec = rec.run.spec
    price = next(f for f in spec.fields if f.name == "price")
    encoder = spec.encoder(price.key)
    assert far_numbers(spec, "price", pl.Series([20.0, -50.0])) == []
    edge = encoder.mean + 0.99 * FAR_STANDARD_DEVIATIONS * encoder.std
    assert len(
        rec.recommend(1, 2, candidates=[{"item_id": 10**6, "price": edge}]).items
    )
    # Items added to the catalogue are held to the same bound, named by row.
    added = pl.DataFrame(
        {
            "item_id": [10**6, 10**6 + 1],
            **{c: [None, None] for c in rec.item_feature_columns},
        }
    ).with_columns(pl.Series("price", [20.0, 1e20]))
    with pytest.raises(ConfigError, match=r"`items`\['price'\]: rows 2 hold"):
        rec.add_items(added)
    rec.save(tmp_path / "m" / "1")
    app = create_app(ServeSettings(models=str(tmp_path), poll_seconds=0))
    with TestClient(app) as client:
        body = {"user_id": 1, "candidates": [{"item_id": 10**6, "price": 1e20}]}
        answer = client.post("/v1/recommend", json=body)
        assert answer.status_code == 400 and "standard deviations" in answer.text


def test_new_items_for_a_model_without_item_features_are_said_to_score_alike(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from twostage.cli import app as app_cli
    from twostage.retrieval.fit import fit_retrieval

    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=80,num_items=40,num_interactions=1500",
            *("train.epochs=1", "train.num_threads=1", "retrieval.embedding_dim=8"),
            *("retrieval.output_dim=8", "retrieval.use_side_features=false"),
            "retrieval.popularity_fallback=0",
        ],
    )
    run, split = fit_retrieval(config)
    rec = Recommender(run, items=split.train.items)
    assert rec.item_feature_columns == []
    bundle = rec.save(tmp_path / "models" / "ids" / "1")
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("item_id\n901\n902\n")
    said = CliRunner().invoke(
        app_cli, ["recommend", str(bundle), "--user", "7", "--new-items", str(fresh)]
    )
    assert said.exit_code == 0, said.output
    text = " ".join(said.output.split())
    assert "the 2 --new-items are each the unknown item's vector" in text
    new = [{"item_id": 901}, {"item_id": 902}]
    answer = rec.recommend(7, 3, candidates=[*new, 5])
    scores = [i["score"] for i in answer.items if i.get("new_item")]
    assert scores[0] == scores[1]  # what the note says
    assert answer.alike_new_items == [901, 902]
    assert answer.to_dict()["alike_new_items"] == [901, 902]
    assert rec.recommend(7, 3, candidates=[5]).alike_new_items == []
    app = create_app(ServeSettings(models=str(tmp_path / "models"), poll_seconds=0))
    with TestClient(app) as client:
        got = client.post("/v1/recommend", json={"user_id": 7, "candidates": new})
        assert got.status_code == 200, got.text
        assert got.json()["alike_new_items"] == [901, 902]
        plain = client.post("/v1/recommend", json={"user_id": 7, "candidates": [5]})
        assert "alike_new_items" not in plain.json()
        instances = [{"user_id": 7, "candidates": new}, {"user_id": 8}]
        predicted = client.post("/v1/models/ids:predict", json={"instances": instances})
        assert predicted.status_code == 200, predicted.text
        outputs = [p["alike_new_items"] for p in predicted.json()["predictions"]]
        assert outputs == [[901, 902], []]
    said = CliRunner().invoke(
        app_cli,
        ["recommend", str(bundle), "--user", "7", "--new-items", str(fresh), "--json"],
    )
    assert said.exit_code == 0, said.output
    assert json.loads(said.stdout)["alike_new_items"] == [901, 902]
