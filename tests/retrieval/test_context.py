"""Per-interaction context (tutorial 003): the moment of an interaction feeds the
query tower in training, evaluation, the Recommender and the HTTP API."""

import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import Dataset
from twostage.errors import ConfigError
from twostage.estimator import TwoStageModel
from twostage.recommender import Recommender, load
from twostage.serving import ServeSettings, create_app
from twostage.two_stage import fit_two_stage

HOUR = 3600
MORNING, EVENING = 9 * HOUR, 20 * HOUR  # seconds into a UTC day


def _daypart_log(num: int = 6000, seed: int = 0) -> Dataset:
    """Users pick items 1-50 in the morning and 51-100 in the evening, whoever they
    are: only the time of day tells the two apart."""
    rng = np.random.default_rng(seed)
    day = rng.integers(0, 400, num) * 24 * HOUR
    morning = rng.random(num) < 0.5
    time = day + np.where(morning, MORNING, EVENING) + rng.integers(0, HOUR, num)
    item = np.where(morning, rng.integers(1, 51, num), rng.integers(51, 101, num))
    interactions = pl.DataFrame(
        {
            "user_id": rng.integers(1, 201, num),
            "item_id": item,
            "timestamp": time.astype(np.int64),
        }
    )
    return Dataset(name="daypart", interactions=interactions)


SMALL = [
    "data.validation_fraction=0.1",
    "train.epochs=6",
    "train.num_threads=1",
    "retrieval.use_side_features=false",
    "retrieval.history_length=0",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
    "retrieval.popularity_fallback=0",
]


@pytest.fixture(scope="module")
def trained():
    data = _daypart_log()
    with_context = fit_two_stage(
        apply_overrides(
            ExperimentConfig(), [*SMALL, "retrieval.query_fields=hour_of_day"]
        ),
        data,
        ranking=False,
    )
    without = fit_two_stage(
        apply_overrides(ExperimentConfig(), SMALL), data, ranking=False
    )
    return with_context, without


def test_context_is_learned_and_evaluated_per_interaction(trained) -> None:
    with_context, without = trained
    fields = [f.key for f in with_context.retrieval.spec.query]
    assert fields == ["user_id", "hour_of_day"]
    counts = with_context.retrieval.metrics["counts"]["include_seen"]
    assert counts["num_queries"] == with_context.split.test.num_interactions
    got = with_context.retrieval.metrics["metrics"]["include_seen"]
    base = without.retrieval.metrics["metrics"]["include_seen"]
    # Without the hour, 10 of 100 equally likely items: about 0.1; with it, of 50.
    assert base["factorized_top_k"]["10"] < 0.14
    assert got["factorized_top_k"]["10"] > 0.17


def test_recommender_and_api_take_the_context(trained, tmp_path: Path) -> None:
    with_context, without = trained
    with_context.recommender().save(tmp_path / "models" / "daypart" / "1")
    rec = load(tmp_path / "models" / "daypart")
    user = rec.user_vocab.values[0]
    day = 100 * 24 * HOUR

    def top(moment: int) -> list[int]:
        answer = rec.recommend(user, k=10, context={"timestamp": day + moment})
        return [item["item_id"] for item in answer.items]

    assert sum(i <= 50 for i in top(MORNING)) >= 8
    assert sum(i > 50 for i in top(EVENING)) >= 8
    assert len(rec.recommend(user, k=10).items) == 10  # no context: unknown hour
    # An ISO 8601 moment is those seconds (UTC without an offset).
    when = datetime.datetime.fromtimestamp(day + EVENING, datetime.UTC)
    for text in (when.isoformat(), when.strftime("%Y-%m-%dT%H:%M:%SZ")):
        answer = rec.recommend(user, k=10, context={"timestamp": text})
        assert [item["item_id"] for item in answer.items] == top(EVENING)
    with pytest.raises(ConfigError, match="ISO 8601"):
        rec.recommend(user, k=5, context={"timestamp": "tonight"})
    with pytest.raises(ConfigError, match="unknown context"):
        rec.recommend(user, k=5, context={"weather": "rain"})
    with pytest.raises(ConfigError, match="reads no context"):
        without.recommender().recommend(user, k=5, context={"timestamp": day})
    app = create_app(ServeSettings(models=str(tmp_path / "models"), poll_seconds=0))
    with TestClient(app) as client:
        # The page's inputs: the context apart from the user features (a new
        # user's `user_features` naming hour_of_day was a 400).
        meta = client.get("/v1/models/daypart/metadata").json()
        assert [f["column"] for f in meta["context"]] == ["hour_of_day"]
        assert meta["user_features"] == []
        body = {"user_id": user, "k": 10, "context": {"timestamp": day + EVENING}}
        answer = client.post("/v1/recommend", json=body)
        assert answer.status_code == 200, answer.text
        assert sum(i["item_id"] > 50 for i in answer.json()["items"]) >= 8
        body["context"] = {"weather": "rain"}
        assert client.post("/v1/recommend", json=body).status_code == 400
        # Values the columns cannot hold were read as unknown, a silent default.
        for bad in (
            {"timestamp": "noon"},
            {"timestamp": 1e30},
            {"hour_of_day": 24},
            {"hour_of_day": "9am"},
        ):
            body["context"] = bad
            refused = client.post("/v1/recommend", json=body)
            assert refused.status_code == 400, (bad, refused.text)
            assert refused.json()["error"].startswith("`context`[")
        body["context"] = {"timestamp": str(day + EVENING)}  # digits as text: fine
        assert client.post("/v1/recommend", json=body).status_code == 200


def test_timestamp_is_accepted_as_a_query_field() -> None:
    """Regression: `--set retrieval.query_fields=timestamp` said 'unknown feature
    column'."""
    config = apply_overrides(
        ExperimentConfig(),
        [*SMALL, "train.epochs=1", "retrieval.query_fields=timestamp,day_of_week"],
    )
    stages = fit_two_stage(config, _daypart_log(num=1500), ranking=False)
    keys = [f.key for f in stages.retrieval.spec.query]
    assert keys == ["user_id", "timestamp", "day_of_week"]
    unknown = [
        *SMALL,
        "retrieval.use_side_features=true",
        "retrieval.query_fields=weather",
    ]
    with pytest.raises(ConfigError, match=r"unknown feature column.*hour_of_day"):
        fit_two_stage(
            apply_overrides(ExperimentConfig(), unknown),
            _daypart_log(num=500),
            ranking=False,
        )


def test_a_context_number_far_out_of_range_is_the_client_s_mistake() -> None:
    """A numeric context column (a temperature of 1e308, when training saw tens)
    made the query NaN, for a known user and for a session alike, and 1e20 made
    it noise: refused, as a client's mistake, where it was NaN scores (a 500 over
    HTTP) or a meaningless list."""
    rng = np.random.default_rng(0)
    num = 3000
    log = pl.DataFrame(
        {
            "user_id": rng.integers(1, 101, num),
            "item_id": rng.integers(1, 61, num),
            "timestamp": np.arange(num, dtype=np.int64) * 60,
            "temperature": rng.normal(15, 5, num),
        }
    )
    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "train.epochs=1",
            "retrieval.history_length=10",
            "retrieval.query_fields=user_id,temperature",
        ],
    )
    rec = fit_two_stage(config, Dataset(name="t", interactions=log), ranking=False)
    rec = rec.recommender()
    assert len(rec.recommend(1, 3, context={"temperature": 20.0}).items) == 3
    # 1e308 made the query NaN; 1e20 kept it finite, every item scored by the
    # temperature's direction alone. Both are refused before the towers run.
    for far in (1e308, 1e20, -1e7):
        with pytest.raises(
            ConfigError, match=r"`context`\['temperature'\] = .*standard"
        ):
            rec.recommend(1, 3, context={"temperature": far})
        with pytest.raises(
            ConfigError, match=r"`context`\['temperature'\] = .*standard"
        ):
            rec.recommend(None, 3, session=[1, 2], context={"temperature": far})
    assert len(rec.recommend(1, 3, context={"temperature": -40.0}).items) == 3


def _with_ranker(use_context: bool, *extra: str) -> Recommender:
    """Both stages on the daypart log, retrieval reading the hour; the ranker
    trained with each row's own context (``use_context``) or with it unknown."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "train.epochs=2",
            "retrieval.query_fields=user_id,hour_of_day",
            "retrieval.history_length=5",
            "ranking.epochs=1",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            f"ranking.use_context={str(use_context).lower()}",
            *extra,
        ],
    )
    rec = fit_two_stage(config, _daypart_log(num=2000)).recommender()
    assert rec.ranker is not None and rec.ranker.reads_context == use_context
    return rec


@pytest.mark.parametrize("use_context", [False, True])
def test_a_session_s_ranker_reads_the_request_context_when_it_trained_on_it(
    use_context: bool,
) -> None:
    """A ranker trained with the context unknown (`ranking.use_context=false`)
    leaves the request's context out of its fields: the same session at two
    moments gets the same click score for an item both answers hold, while
    retrieval reads the moment. One trained with each row's own reads it."""
    rec = _with_ranker(use_context, "ranking.use_retrieval_features=false")
    day = 100 * 24 * HOUR
    temperature = float(rec.run.model.temperature)
    blend = rec.ranker.blend_weight

    def clicks(moment: int) -> dict[int, float]:
        answer = rec.recommend(
            None, 60, session=[3, 60], context={"timestamp": day + moment}
        )
        assert answer.path == "session"
        return {
            i["item_id"]: i["rank_score"] - blend * i["score"] / temperature
            for i in answer.items
        }

    morning, evening = clicks(MORNING), clicks(EVENING)
    assert list(morning)[:10] != list(evening)[:10]  # retrieval reads the moment
    both = set(morning) & set(evening)
    assert len(both) >= 10
    same = [morning[i] == pytest.approx(evening[i], abs=1e-4) for i in both]
    assert all(same) if not use_context else not any(same)


def test_the_two_stage_lists_are_measured_with_each_test_row_s_context() -> None:
    """The ranker's lists retrieved with the context unknown (the users' own
    query vectors), so a context model's two-stage figures (and the blend picked
    on them) measured candidates and retrieval logits that serving never uses:
    on this log retrieval's list there scored NDCG@10 0.042 against 0.079 in
    retrieval's own figures. Now each test row's list is the one
    `recommend(context=...)` serves."""
    from twostage.ranking.evaluation import evaluated_lists

    data = _daypart_log(num=3000)
    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "retrieval.query_fields=hour_of_day",
            "ranking.epochs=2",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
        ],
    )
    stages = fit_two_stage(config, data)
    assert stages.ranker is not None and stages.ranking_metrics is not None
    retrieval = stages.retrieval.metrics["metrics"]["exclude_seen"]
    ranked = stages.ranking_metrics["retrieval_only"]
    for metric in ("ndcg", "hit_rate"):
        assert ranked[metric]["10"] == pytest.approx(retrieval[metric]["10"], abs=1e-6)
    test = stages.split.test
    user_idx, lists = evaluated_lists(stages.ranker, test)
    assert len(user_idx) == test.num_interactions  # one query per row
    rec = stages.recommender()
    items = stages.retrieval.spec.vocabulary("item_id")
    rows = test.interactions.head(40).to_dicts()
    for row, ranked_row, index in zip(rows, lists, user_idx, strict=False):
        if int(index) == 0:
            continue
        served = rec.recommend(
            row["user_id"], k=100, context={"timestamp": row["timestamp"]}
        )
        evaluated = items.inverse_transform(ranked_row[ranked_row >= 0].numpy())
        assert [i["item_id"] for i in served.items] == evaluated.to_list()


def test_the_ranker_learns_each_row_s_context_and_keeps_it_through_a_bundle(
    tmp_path: Path,
) -> None:
    """The ranker trains on each row's own context (`ranking.use_context`, on by
    default): on the daypart log, where only the hour tells items 1-50 from
    51-100, its click head alone (no retrieval features) prefers the morning
    items in the morning and the evening ones in the evening, and its two-stage
    list beats one trained with the context unknown. A saved bundle keeps it,
    and its ONNX ranker takes the context as an input."""
    from twostage.export import export_bundle

    data = _daypart_log(num=4000)
    base = [
        *SMALL,
        "retrieval.query_fields=hour_of_day",
        "ranking.epochs=8",
        "ranking.batch_size=256",
        "ranking.use_retrieval_features=false",
    ]
    stages = {}
    for use in (True, False):
        config = apply_overrides(
            ExperimentConfig(), [*base, f"ranking.use_context={str(use).lower()}"]
        )
        stages[use] = fit_two_stage(config, data)
    ranker = stages[True].ranker
    assert ranker is not None and ranker.reads_context
    assert stages[False].ranker is not None and not stages[False].ranker.reads_context
    users = torch.arange(1, 31)
    items = torch.arange(1, 101).expand(30, 100)  # indices, not IDs: map below
    vocab = stages[True].retrieval.spec.vocabulary("item_id")
    ids = np.asarray(vocab.inverse_transform(np.arange(1, 101)).to_list())
    morning_items = torch.from_numpy(ids <= 50)

    def preference(hour: int) -> float:
        context = ranker.encode_context(pl.DataFrame({"hour_of_day": [hour] * 30}))
        click = ranker.score(users, items, context=context)["click"]
        return float(click[:, morning_items].mean() - click[:, ~morning_items].mean())

    assert preference(9) > 0.5 and preference(20) < -0.5
    served = stages[True].ranking_metrics
    without = stages[False].ranking_metrics
    assert served is not None and without is not None
    assert served["two_stage"]["ndcg"]["10"] > 1.2 * without["two_stage"]["ndcg"]["10"]

    stages[True].recommender().save(tmp_path / "bundle")
    loaded = load(tmp_path / "bundle")
    assert loaded.ranker is not None and loaded.ranker.reads_context
    user = loaded.user_vocab.values[0]
    day = 100 * 24 * HOUR
    for moment in (MORNING, EVENING):
        context = {"timestamp": day + moment}
        again = loaded.recommend(user, 10, context=context).items
        first = stages[True].recommender().recommend(user, 10, context=context).items
        assert [i["rank_score"] for i in again] == [i["rank_score"] for i in first]
    # The exported ranker takes the context beside the indices.
    ort = pytest.importorskip("onnxruntime")
    export_bundle(loaded, tmp_path / "onnx")
    session = ort.InferenceSession(
        str(tmp_path / "onnx" / "ranker.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == [
        "user_idx",
        "item_idx",
        "hour_of_day",
    ]
    hours = pl.DataFrame({"hour_of_day": [9, 20, 9, 20, None]})
    context = loaded.ranker.encode_context(hours)
    users5, items5 = torch.arange(1, 6), torch.randint(1, 100, (5, 12))
    _, click = session.run(
        None,
        {
            "user_idx": users5.numpy(),
            "item_idx": items5.numpy(),
            "hour_of_day": context["hour_of_day"].numpy(),
        },
    )
    want = loaded.ranker.score(users5, items5, context=context)["click"]
    np.testing.assert_allclose(click, want.numpy(), atol=1e-5)
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "bundle")])
    assert shown.exit_code == 0, shown.output
    assert "at the request's context" in " ".join(shown.output.split())


def test_the_estimator_predicts_pairs_at_a_moment() -> None:
    """`TwoStageModel.predict(..., context=)`: a pair's click probability read at
    the moment given, as `recommend` reads it; refused by a model that reads no
    context."""
    import twostage

    frame = _daypart_log(num=3000).interactions
    settings = {
        "data.validation_fraction": 0.1,
        "train.epochs": 6,
        "train.num_threads": 1,
        "retrieval.use_side_features": False,
        "retrieval.history_length": 0,
        "retrieval.popularity_fallback": 0,
        "retrieval.query_fields": "hour_of_day",
        "ranking.epochs": 6,
        "ranking.batch_size": 256,
    }
    model = twostage.TwoStageModel(settings=settings, progress=False).fit(frame)
    user = int(frame["user_id"][0])
    items = [3, 17, 42, 63, 77, 96]  # three morning items, three evening ones
    day = 100 * 24 * HOUR
    at = {
        moment: model.predict([user] * 6, items, context={"timestamp": day + moment})
        for moment in (MORNING, EVENING)
    }
    assert at[MORNING][:3].mean() > at[MORNING][3:].mean()
    assert at[EVENING][3:].mean() > at[EVENING][:3].mean()
    unknown = model.predict([user] * 6, items)  # no moment: the context unknown
    assert np.isfinite(unknown).all()
    blind = twostage.TwoStageModel(
        settings={**settings, "retrieval.query_fields": ""}, progress=False
    ).fit(frame)
    with pytest.raises(ConfigError, match="reads no context"):
        blind.predict([user], [3], context={"timestamp": day})


def test_batch_lists_are_made_at_one_moment(trained, tmp_path: Path) -> None:
    """`recommend --all-users --context timestamp=...` (and `recommend_table(...,
    context=)`): every user's list at that moment, as `recommend` gives it; a
    mistake in it is named before any list is written."""
    with_context, without = trained
    rec = with_context.recommender()
    rec.save(tmp_path / "bundle")
    day = 100 * 24 * HOUR
    users = rec.user_vocab.values.head(5).to_list()
    table = rec.recommend_table(users, 10, context={"timestamp": day + EVENING})
    for user in users:
        served = rec.recommend(user, 10, context={"timestamp": day + EVENING})
        mine = table.filter(pl.col("user_id") == user)["item_id"].to_list()
        assert mine == [i["item_id"] for i in served.items]
    assert (table["item_id"] > 50).mean() > 0.8  # the evening's items
    out = tmp_path / "lists.parquet"
    done = CliRunner().invoke(
        app,
        [
            "recommend",
            str(tmp_path / "bundle"),
            "--all-users",
            "--out",
            str(out),
            "--context",
            f"timestamp={day + MORNING}",
        ],
    )
    assert done.exit_code == 0, done.output
    assert (pl.read_parquet(out)["item_id"] <= 50).mean() > 0.8  # the morning's
    bad = CliRunner().invoke(
        app,
        [
            "recommend",
            str(tmp_path / "bundle"),
            "--all-users",
            "--out",
            str(tmp_path / "bad.parquet"),
            "--context",
            "weather=rain",
        ],
    )
    # (a domain error: `main` prints it as one red line, exit code 2)
    assert isinstance(bad.exception, ConfigError), bad.output
    assert "weather" in str(bad.exception)
    assert not (tmp_path / "bad.parquet").exists()
    with pytest.raises(ConfigError, match="reads no context"):
        without.recommender().recommend_table(users, 3, context={"timestamp": day})


def test_session_lists_are_made_at_one_moment(tmp_path: Path) -> None:
    """`recommend --sessions FILE --context timestamp=...` (and
    `recommend_sessions(..., context=)`): every session's list at that moment,
    as one `recommend(session=..., context=...)` gives it; a model that reads no
    context refuses it, and a mistake in it is named before any list is written."""
    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "retrieval.query_fields=user_id,hour_of_day",
            "retrieval.history_length=5",
        ],
    )
    rec = fit_two_stage(config, _daypart_log(num=3000), ranking=False).recommender()
    day = 100 * 24 * HOUR
    walks = {"a": [3, 60], "b": [70, 12], "c": [13, 80, 5, 90]}  # both dayparts
    table = pl.DataFrame(
        [{"session_id": s, "item_id": i} for s, items in walks.items() for i in items]
    )
    evening_share = {}  # of the lists' items: the evening's (51-100)
    for moment in (MORNING, EVENING):
        context = {"timestamp": day + moment}
        lists = rec.recommend_sessions(table, 10, context=context).lists
        for session, items in walks.items():
            alone = rec.recommend(None, 10, session=items, context=context)
            mine = lists.filter(pl.col("session_id") == session)["item_id"]
            assert mine.to_list() == [i["item_id"] for i in alone.items]
        evening_share[moment] = (lists["item_id"] > 50).mean()
    assert evening_share[EVENING] - evening_share[MORNING] > 0.2
    path = tmp_path / "sessions.csv"
    table.write_csv(path)
    rec.save(tmp_path / "bundle")
    out = tmp_path / "lists.parquet"
    args = ["recommend", str(tmp_path / "bundle"), "--sessions", str(path)]
    done = CliRunner().invoke(
        app, [*args, "--out", str(out), "--context", f"timestamp={day + EVENING}"]
    )
    assert done.exit_code == 0, done.output
    assert (pl.read_parquet(out)["item_id"] > 50).mean() == evening_share[EVENING]
    estimator = TwoStageModel.load(tmp_path / "bundle")
    evening = {"timestamp": day + EVENING}
    assert estimator.recommend_sessions(table, 10, context=evening).lists.equals(
        rec.recommend_sessions(table, 10, context=evening).lists
    )
    bad = tmp_path / "bad.parquet"
    refused = CliRunner().invoke(
        app, [*args, "--out", str(bad), "--context", "weather=rain"]
    )
    assert isinstance(refused.exception, ConfigError), refused.output
    assert "weather" in str(refused.exception) and not bad.exists()
    plain = apply_overrides(ExperimentConfig(), [*SMALL, "retrieval.history_length=5"])
    without = fit_two_stage(plain, _daypart_log(num=1000), ranking=False)
    with pytest.raises(ConfigError, match="reads no context"):
        without.recommender().recommend_sessions(table, 3, context={"timestamp": day})


@pytest.mark.parametrize("use_context", [False, True])
def test_session_lists_with_a_context_are_made_in_batches(use_context: bool) -> None:
    """A model that reads the request's context answers a sessions table in
    batches, each session at its own moment (or the shared one, or unknown),
    with the lists one `recommend(session=, context=)` gives: retrieval reads the
    moment, and the ranker too where it trained on each row's own."""
    from twostage.session_batch import _batched_lists, recommend_sessions

    rec = _with_ranker(use_context)
    day = 100 * 24 * HOUR
    walks = {"a": [3, 60], "b": [70, 12], "c": [13, 80, 5], "d": [40]}
    owner = {"a": None, "b": None, "c": int(rec.user_vocab.values[3]), "d": None}
    rows = [
        {"session_id": s, "item_id": i, "user_id": owner[s]}
        for s, items in walks.items()
        for i in items
    ]
    table = pl.DataFrame(rows)
    entries = {s: [{"item_id": i} for i in items] for s, items in walks.items()}
    users = {s: rec.user_vocab.lookup(u) for s, u in owner.items() if u is not None}
    moments = {"a": {"timestamp": day + MORNING}, "b": {"timestamp": day + EVENING}}
    shared = {"timestamp": day + EVENING}
    contexts = {
        s: rec.encode_context(moments.get(s, shared)) for s in walks if s != "d"
    }
    contexts["d"] = {}  # unknown
    batched = _batched_lists(
        rec, list(walks), entries, users, 8, True, rec.ranker, None, contexts
    )
    assert set(batched) == set(walks)  # every one answered in the batch
    found = recommend_sessions(
        rec,
        table.filter(pl.col("session_id") != "d"),
        8,
        context=shared,
        session_contexts=moments,
    ).lists
    for session, items in walks.items():
        moment = None if session == "d" else moments.get(session, shared)
        alone = rec.recommend(owner[session], 8, session=items, context=moment)
        ids = [i["item_id"] for i in alone.items]
        keys = [i.get("rank_score", i["score"]) for i in alone.items]
        assert batched[session][0] == ids, session
        assert batched[session][1] == pytest.approx(keys, rel=1e-5, abs=1e-5)
        if session != "d":
            mine = found.filter(pl.col("session_id") == session)
            assert mine["item_id"].to_list() == ids, session
    assert batched["a"][0] != batched["b"][0]  # the same model, two moments


def test_new_sessions_are_measured_at_each_held_out_row_s_time() -> None:
    """`evaluate_sessions` asks a model that reads the request's context at the
    time of each session's held-out row, as the test split's rows are measured:
    its figures are those of one `recommend(session=..., context=...)` per
    session at that moment, and above the same sessions asked with the context
    unknown."""
    from twostage.session_evaluation import evaluate_sessions

    config = apply_overrides(
        ExperimentConfig(),
        [
            *SMALL,
            "retrieval.query_fields=user_id,hour_of_day",
            "retrieval.history_length=5",
        ],
    )
    rec = fit_two_stage(config, _daypart_log(num=3000), ranking=False).recommender()
    rng = np.random.default_rng(3)
    day = 100 * 24 * HOUR
    rows = []
    for session in range(40):
        evening = session % 2 == 1
        items = rng.integers(1, 101, 3).tolist()  # the first two: either daypart
        items[-1] = int(rng.integers(51, 101) if evening else rng.integers(1, 51))
        moment = day + (EVENING if evening else MORNING)
        for step, item in enumerate(items):
            rows.append(
                {"session_id": session, "item_id": item, "timestamp": moment + step}
            )
    table = pl.DataFrame(rows)
    figures = evaluate_sessions(rec, table, ks=(10,))
    hits = 0
    for session in range(40):
        mine = [r for r in rows if r["session_id"] == session]
        answer = rec.recommend(
            None,
            10,
            session=[r["item_id"] for r in mine[:-1]],
            context={"timestamp": mine[-1]["timestamp"]},
        )
        hits += mine[-1]["item_id"] in [i["item_id"] for i in answer.items]
    assert figures["twostage"]["hit_rate"][10] == pytest.approx(hits / 40)
    blind = evaluate_sessions(rec, table.drop("timestamp"), ks=(10,))
    assert figures["twostage"]["hit_rate"][10] > blind["twostage"]["hit_rate"][10]


def test_list_rules_are_measured_at_each_test_row_s_moment() -> None:
    """`evaluate --diversity/--max-per` refused a model that reads context:
    each test row's list is now served at its own moment, as a request with
    that context is, and the row as scored is the ranking report's."""
    from twostage.list_evaluation import evaluate_list_rules

    data = _daypart_log()
    stages = fit_two_stage(
        apply_overrides(
            ExperimentConfig(),
            [
                *SMALL,
                "retrieval.query_fields=hour_of_day",
                "ranking.epochs=1",
                "ranking.embedding_dim=8",
                "ranking.hidden_dims=8",
            ],
        ),
        data,
    )
    rec = stages.recommender()
    test = stages.split.test
    found = evaluate_list_rules(rec, test, diversity=0.5)
    assert found["users"] == test.num_interactions  # one query a test row
    served = stages.ranking_metrics["two_stage"]
    for metric in ("ndcg", "recall", "hit_rate"):
        assert found["as_scored"][metric] == pytest.approx(served[metric]["10"])
    ruled = found["with_rules"]
    assert ruled["intra_list_diversity"] > found["as_scored"]["intra_list_diversity"]
    # Each row's list is the one a request at that moment gets.
    from twostage.list_evaluation import served_lists
    from twostage.retrieval.evaluation import eval_queries

    queries = eval_queries(rec.run, test)
    lists = served_lists(rec, queries, 5, diversity=0.5)
    assert queries.context is not None
    for row in (0, 7):
        moment = queries.context.row(row, named=True)
        user = queries.user_ids[row]
        answer = rec.recommend(user, 5, context=moment, diversity=0.5)
        expected = [rec.item_vocab.lookup(i["item_id"]) for i in answer.items]
        assert lists[row].tolist() == expected
