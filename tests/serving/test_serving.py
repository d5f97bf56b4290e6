"""The HTTP service: every route, every bad-request class, version swaps, API keys."""

import json
import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from twostage.errors import ConfigError
from twostage.recommender import Recommender
from twostage.serving import ServeSettings, create_app


def client_for(models: Path, **options: object) -> TestClient:
    settings = ServeSettings(models=str(models), poll_seconds=0, **options)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def test_every_route_answers(models_dir: Path, small_recommender: Recommender) -> None:
    with client_for(models_dir) as client:
        assert client.get("/healthz").json() == {
            "status": "ok",
            "models": {"synthetic": 1},
            "pid": os.getpid(),  # the worker that answered
        }
        assert client.get("/v1/models").json()["models"] == [
            {"name": "synthetic", "version": 1}
        ]
        status = client.get("/v1/models/synthetic").json()["model_version_status"]
        assert status[0]["version"] == "1" and status[0]["state"] == "AVAILABLE"
        meta = client.get("/v1/models/synthetic/metadata").json()
        assert meta["num_items"] == 80 and meta["sample_users"]
        assert meta["reads_session_ratings"] is False  # the page hides its box
        assert meta["reads_session_times"] is False  # and its times box
        assert {f["column"] for f in meta["user_features"]} >= {"age"}

        answer = client.post(
            "/v1/recommend", json={"user_id": 3, "k": 5, "include_history": True}
        ).json()
        expected = small_recommender.recommend(3, 5).to_dict()
        assert answer["path"] == "personalised" and answer["version"] == 1
        assert answer["items"] == expected["items"]
        assert answer["history"] == small_recommender.history(3)
        # IDs arrive as strings from TF Serving clients; they mean the same user.
        assert (
            client.post("/v1/recommend", json={"user_id": "3", "k": 5}).json()["items"]
            == expected["items"]
        )

        cold = client.post("/v1/recommend", json={"user_id": "nobody", "k": 4}).json()
        assert cold["path"] == "popularity" and len(cold["items"]) == 4
        new = client.post(
            "/v1/recommend", json={"user_features": {"age": 30}, "k": 4}
        ).json()
        assert new["path"] == "cold_start_features"
        # An object where a feature is expected names a feature it does not hold.
        odd = client.post(
            "/v1/recommend", json={"user_features": {"age": {"years": 30}}, "k": 4}
        )
        assert odd.status_code == 400 and "age.years" in odd.text, odd.text
        # A list is a set-valued feature's value; for a one-value column, the
        # model says so (it was the schema's 422 for every column).
        listed = client.post(
            "/v1/recommend", json={"user_features": {"age": [1]}, "k": 4}
        )
        assert listed.status_code == 400
        assert "`user_features`['age'] holds a list" in listed.text, listed.text
        nested = client.post(
            "/v1/recommend", json={"user_features": {"geo": {"c": [[1]]}}, "k": 4}
        )
        assert nested.status_code == 422
        assert "user_features['geo']['c'] should be null" in nested.text, nested.text

        similar = client.post("/v1/similar", json={"item_id": 7, "k": 3}).json()
        assert similar["items"] == small_recommender.similar_items(7, 3)
        only = {"category": "cat2"}
        kept = client.post(
            "/v1/similar", json={"item_id": 7, "k": 3, "filters": only}
        ).json()
        assert kept["items"] == small_recommender.similar_items(7, 3, filters=only)
        assert all(i["category"] == "cat2" for i in kept["items"])

        predicted = client.post(
            "/v1/models/synthetic:predict",
            json={"instances": ["3", {"user_id": 4, "k": 2}]},
        ).json()["predictions"]
        assert (
            predicted[0]["output_2"]
            == [i["item_id"] for i in expected["items"]][:5]
            + [i["item_id"] for i in small_recommender.recommend(3, 10).items][5:]
        )
        assert len(predicted[1]["output_1"]) == 2
        # TF Serving reads the body as JSON whatever the Content-Type (curl -d sends
        # a form type); clients that rely on that keep working.
        for content_type in ("application/x-www-form-urlencoded", "text/plain"):
            formless = client.post(
                "/v1/models/synthetic:predict",
                content=b'{"instances": ["3"]}',
                headers={"content-type": content_type},
            )
            assert formless.status_code == 200, formless.text
            assert formless.json()["predictions"][0] == predicted[0]

        metrics = client.get("/metrics").text
        assert (
            'twostage_requests_total{method="POST",route="/v1/recommend",status="200"} 4.0'
            in metrics
        )
        assert 'twostage_model_version{model="synthetic"} 1.0' in metrics
        assert client.get("/docs").status_code == 200
        assert "/v1/recommend" in client.get("/openapi.json").json()["paths"]
        assert "<title>twostage</title>" in client.get("/").text


@pytest.mark.parametrize(
    ("route", "body", "status", "message"),
    [
        ("/v1/recommend", b'{"user_id": 3, "k": ', 400, "malformed JSON"),
        ("/v1/recommend", {"user_id": 3, "exclude_sen": False}, 422, "exclude_sen"),
        ("/v1/recommend", {"user_id": 3, "k": "ten"}, 422, "body.k"),
        (
            "/v1/recommend",
            {"user_id": 3, "k": 0},
            400,
            "`k` should be between 1 and 50",
        ),
        ("/v1/recommend", {"user_id": 3, "k": 51}, 400, "Received: `k` = 51"),
        ("/v1/recommend", {"user_features": {"shoe_size": 44}}, 400, "shoe_size"),
        ("/v1/recommend", {"model": "nope"}, 404, "unknown model 'nope'"),
        ("/v1/similar", {"item_id": 10_000}, 404, "not in the catalogue"),
        ("/v1/similar", {"item_id": 7, "k": 500}, 400, "`k`"),
        ("/v1/similar", {"item_id": 7, "filters": {"colour": "red"}}, 400, "colour"),
        ("/v1/similar", {"item_id": 7, "filters": {"category": [1]}}, 422, "filters"),
        ("/v1/models/nope:predict", {"instances": ["3"]}, 404, "unknown model"),
        ("/v1/models/synthetic:predict", {"instances": [{"k": 0}]}, 400, "`k`"),
        ("/v1/recommend", {"user_id": "x" * 3000}, 413, "over the limit of 2000"),
        ("/v1/recommend", {"user_id": 3, "candidates": [10_000]}, 404, "candidates"),
        ("/v1/recommend", {"user_id": 3, "candidates": []}, 400, "at least one item"),
        ("/v1/recommend", {"user_id": 3, "diversity": 1.5}, 422, "body.diversity"),
        ("/v1/recommend", {"user_id": 3, "diversity": "x"}, 422, "body.diversity"),
        ("/v1/recommend", {"user_id": 3, "exclude": "7"}, 422, "body.exclude"),
        ("/v1/recommend", {"user_id": 3, "exclude": [[7]]}, 422, "body.exclude"),
        ("/v1/recommend", {"user_id": 3, "max_per": {"colour": 2}}, 400, "colour"),
        ("/v1/recommend", {"user_id": 3, "max_per": {"category": 0}}, 400, "max_per"),
        ("/v1/recommend", {"user_id": 3, "max_per": {"category": "x"}}, 422, "max_per"),
        (
            "/v1/models/synthetic:predict",
            {"instances": [{"user_id": 3, "diversity": -1}]},
            422,
            "instances.0.diversity",
        ),
        # Half a surrogate pair: an answer echoing it could not be encoded (a 500).
        ("/v1/recommend", b'{"user_id": "\\ud800"}', 422, "user_id holds an unpaired"),
        (
            "/v1/recommend",
            b'{"session": [{"item_id": 7}, "\\udfff"]}',
            422,
            "session[1] holds an unpaired",
        ),
        (
            "/v1/models/synthetic:predict",
            b'{"instances": [{"user_id": "\\ud800"}]}',
            422,
            "instances[0].user_id holds an unpaired",
        ),
        # A key given twice was answered with its last value, without a word.
        (
            "/v1/recommend",
            b'{"user_id": 3, "user_id": 4}',
            400,
            "'user_id' is given twice",
        ),
        (
            "/v1/models/synthetic:predict",
            b'{"instances": [{"user_id": 3, "k": 2, "k": 5}]}',
            400,
            "'k' is given twice",
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_message(
    models_dir: Path, route: str, body: object, status: int, message: str
) -> None:
    with client_for(models_dir, max_k=50, max_body_bytes=2000) as client:
        if isinstance(body, bytes):
            response = client.post(
                route, content=body, headers={"content-type": "application/json"}
            )
        else:
            response = client.post(route, json=body)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        metrics = client.get("/metrics").text
        assert f'status="{status}"' in metrics


def test_chunked_body_over_the_limit_is_413(models_dir: Path) -> None:
    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"user_id": "'
        yield b"x" * 5000
        yield b'"}'

    with client_for(models_dir, max_body_bytes=2000) as client:
        response = client.post(
            "/v1/recommend",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413


def test_api_key_is_checked_when_set(models_dir: Path) -> None:
    with client_for(models_dir, api_key="s3cret") as client:
        assert client.get("/healthz").status_code == 200  # probes need no key
        denied = client.post("/v1/recommend", json={"user_id": 3})
        assert denied.status_code == 401 and "X-API-Key" in denied.json()["error"]
        assert client.get("/metrics").status_code == 401
        wrong = client.post(
            "/v1/recommend", json={"user_id": 3}, headers={"X-API-Key": "guess"}
        )
        assert wrong.status_code == 401
        ok = client.post(
            "/v1/recommend", json={"user_id": 3}, headers={"X-API-Key": "s3cret"}
        )
        assert ok.status_code == 200


def test_new_version_swaps_in_without_failed_requests(
    models_dir: Path, small_recommender: Recommender
) -> None:
    with client_for(models_dir) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        results: list[tuple[int, int]] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                response = client.post("/v1/recommend", json={"user_id": 3, "k": 5})
                version = response.json().get("version", -1)
                results.append((response.status_code, version))

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for thread in threads:
            thread.start()
        # Version 1 answers first (on a loaded machine the threads' first
        # answers once came after the swap, and the test saw only version 2).
        deadline = time.monotonic() + 60
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
        small_recommender.save(models_dir / "synthetic" / "2")
        assert registry.refresh() == ["synthetic: version 2"]
        # Bounded: a swap that never serves version 2 fails here instead of hanging.
        deadline = time.monotonic() + 60
        while sum(v == 2 for _, v in results) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert sum(v == 2 for _, v in results) >= 20, "version 2 was never served"
        assert {code for code, _ in results} == {200}
        assert {v for _, v in results} == {1, 2}
        states = {
            s["version"]: s["state"]
            for s in client.get("/v1/models/synthetic").json()["model_version_status"]
        }
        assert states == {"2": "AVAILABLE", "1": "END"}


def test_corrupt_or_half_written_version_is_refused_and_reported(
    models_dir: Path, small_recommender: Recommender, caplog: pytest.LogCaptureFixture
) -> None:
    with client_for(models_dir) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        corrupt = small_recommender.save(models_dir / "synthetic" / "2")
        weights = corrupt / "retrieval.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])  # truncated
        half = small_recommender.save(models_dir / "synthetic" / "3")
        (half / "tables.safetensors").unlink()  # a copy that stopped half-way
        (models_dir / "synthetic" / "4").mkdir()  # no manifest yet: not a version

        assert registry.refresh() == []
        assert "refused" in caplog.text
        answer = client.post("/v1/recommend", json={"user_id": 3}).json()
        assert answer["version"] == 1
        status = {
            s["version"]: s
            for s in client.get("/v1/models/synthetic").json()["model_version_status"]
        }
        assert status["1"]["state"] == "AVAILABLE"
        assert status["2"]["state"] == "FAILED"
        assert "retrieval.safetensors" in status["2"]["status"]["error_message"]
        assert status["3"]["state"] == "FAILED"
        assert "incomplete" in status["3"]["status"]["error_message"]
        assert "4" not in status
        assert (
            'twostage_model_versions_failed{model="synthetic"} 2'
            in client.get("/metrics").text
        )
        # Refused versions are not retried until they are rewritten.
        assert registry.refresh() == []
        weights.unlink()
        (models_dir / "synthetic" / "2" / "manifest.json").unlink()
        small_recommender.save(models_dir / "synthetic" / "5")
        assert registry.refresh() == ["synthetic: version 5"]


def test_model_without_any_valid_version_is_unavailable(
    models_dir: Path,
) -> None:
    bundle = models_dir / "synthetic" / "1"
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["config.json"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with client_for(models_dir) as client:
        health = client.get("/healthz")
        assert health.status_code == 503
        response = client.post("/v1/recommend", json={"user_id": 3})
        assert response.status_code == 503
        assert "no loadable version" in response.json()["error"]


def test_a_single_bundle_directory_is_refused_with_a_hint(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="serve the directory above"):
        create_app(ServeSettings(models=str(models_dir / "synthetic" / "1")))


def test_a_bundle_saved_without_a_version_number_is_named_with_the_fix(
    small_recommender: Recommender, tmp_path: Path
) -> None:
    """`train --out models/shop` saves a bundle at models/shop: serving it
    alone, or serving models/ beside a versioned model, says how to make it a
    version, and the model serves once it is one."""
    models = tmp_path / "models"
    small_recommender.save(models / "shop")
    small_recommender.save(models / "synthetic" / "1")
    with pytest.raises(ValueError, match="without a version number") as refused:
        create_app(ServeSettings(models=str(models / "shop")))
    assert "serve the directory above" not in str(refused.value)
    assert f"mv {models / 'shop'} {models / 'shop.1'}" in str(refused.value)
    with client_for(models) as client:
        answered = client.post(
            "/v1/recommend", json={"user_id": 3, "model": "synthetic"}
        )
        assert answered.status_code == 200
        response = client.post("/v1/recommend", json={"user_id": 3, "model": "shop"})
        assert response.status_code == 503
        error = response.json()["error"]
        assert "without a version number" in error and "shop/1" in error
        (models / "shop").rename(models / "shop.1")
        (models / "shop").mkdir()
        (models / "shop.1").rename(models / "shop" / "1")
        client.app.state.registry.refresh()  # type: ignore[attr-defined]
        response = client.post("/v1/recommend", json={"user_id": 3, "model": "shop"})
        assert response.status_code == 200


def test_session_times_may_be_iso_8601(models_dir: Path) -> None:
    """A session entry's timestamp as text (ISO 8601, a browser's
    toISOString()) was a 422; it is the same moment in seconds."""
    with client_for(models_dir) as client:
        answers = [
            client.post(
                "/v1/recommend",
                json={"session": [{"item_id": 3, "timestamp": t}, 5], "k": 4},
            )
            for t in (1767225600, "2026-01-01T00:00:00Z", "2026-01-01")
        ]
        assert all(a.status_code == 200 for a in answers), answers[1].text
        assert answers[1].json()["items"] == answers[0].json()["items"]
        assert answers[2].json()["items"] == answers[0].json()["items"]
        wrong = client.post(
            "/v1/recommend",
            json={"session": [{"item_id": 3, "timestamp": "soon"}], "k": 4},
        )
        assert wrong.status_code == 400
        assert "ISO 8601" in wrong.json()["error"]


def test_an_answer_says_when_the_user_features_were_not_read(
    models_dir: Path,
) -> None:
    with client_for(models_dir) as client:
        body = {"user_id": 3, "user_features": {"age": 30}, "k": 2}
        answer = client.post("/v1/recommend", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["user_features_unread"] == "known_user"
        body = {"user_features": {"age": 30}, "k": 2}
        new = client.post("/v1/recommend", json=body).json()
        assert new["path"] == "cold_start_features"
        assert "user_features_unread" not in new


def test_predict_scores_follow_the_two_stage_order(tmp_path: Path) -> None:
    """Regression: with a ranker, `output_1` held retrieval scores in re-ranked order
    (not sorted); it now holds the two-stage key the list is ordered by."""
    from twostage.config import ExperimentConfig, apply_overrides
    from twostage.two_stage import fit_two_stage

    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=120,num_interactions=1500",
            "train.epochs=1",
            "train.num_threads=1",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.epochs=1",
            "ranking.hard_negative_pool=10",
            "retrieval.popularity_fallback=0",  # every known user is re-ranked
        ],
    )
    rec = fit_two_stage(config, evaluate_test=False).recommender()
    rec.save(tmp_path / "models" / "two" / "1")
    user = rec.user_vocab.values[0]
    with client_for(tmp_path / "models") as client:
        predicted = client.post(
            "/v1/models/two:predict", json={"instances": [{"user_id": user, "k": 20}]}
        ).json()["predictions"][0]
    scores = predicted["output_1"]
    assert scores == sorted(scores, reverse=True)
    answer = rec.recommend(user, 20)
    assert predicted["output_2"] == [item["item_id"] for item in answer.items]
    assert scores == pytest.approx([item["rank_score"] for item in answer.items])


def test_body_without_json_content_type_gets_a_hint(models_dir: Path) -> None:
    with client_for(models_dir) as client:
        response = client.post(
            "/v1/recommend",
            content=b'{"user_id": 3}',
            headers={"Content-Type": "text/plain"},
        )
        assert response.status_code == 415
        assert "Content-Type: application/json" in response.json()["error"]


def test_predict_instance_of_the_wrong_shape_is_a_422(models_dir: Path) -> None:
    with client_for(models_dir) as client:
        for instance in ({"user_id": 3, "k": "many"}, {"user_id": 3, "colour": 1}):
            response = client.post(
                "/v1/models/synthetic:predict", json={"instances": [instance]}
            )
            assert response.status_code == 422, instance
            assert "instances.0." in response.json()["error"], response.json()


def test_a_client_candidate_list_is_ranked(
    models_dir: Path, small_recommender: Recommender
) -> None:
    with client_for(models_dir) as client:
        whole = client.post("/v1/recommend", json={"user_id": 3, "k": 30}).json()
        mine = [i["item_id"] for i in whole["items"]][10:20]
        body = {"user_id": 3, "k": 10, "candidates": mine[::-1]}
        ranked = client.post("/v1/recommend", json=body)
        assert ranked.status_code == 200, ranked.text
        assert [i["item_id"] for i in ranked.json()["items"]] == mine
        assert "left_out_candidates" not in ranked.json()
        instance = {"instances": [{"user_id": 3, "k": 10, "candidates": mine}]}
        predicted = client.post("/v1/models/synthetic:predict", json=instance)
        assert predicted.json()["predictions"][0]["output_2"] == mine
        assert set(predicted.json()["predictions"][0]) == {"output_1", "output_2"}
        # A seen or repeated candidate is named with its place, not dropped unsaid.
        seen = small_recommender.history(3)[0]["item_id"]
        body = {"user_id": 3, "k": 10, "candidates": [mine[0], seen, mine[0]]}
        short = client.post("/v1/recommend", json=body).json()
        assert [i["item_id"] for i in short["items"]] == [mine[0]]
        assert short["left_out_candidates"] == [
            {"position": 1, "item_id": seen, "reason": "seen"},
            {"position": 2, "item_id": mine[0], "reason": "repeated"},
        ]
        both = {"instances": [{"user_id": 3, "k": 10, "candidates": mine}, body]}
        predicted = client.post("/v1/models/synthetic:predict", json=both).json()
        outputs = [p["left_out_candidates"] for p in predicted["predictions"]]
        assert outputs == [[], short["left_out_candidates"]]


def test_predict_takes_the_columnar_inputs_form(models_dir: Path) -> None:
    """TF Serving's other request form, `inputs`, was a 422 ("inputs: extra
    inputs are not permitted"); it is answered as TF Serving answers it, by output."""
    with client_for(models_dir, max_instances=3) as client:
        route = "/v1/models/synthetic:predict"
        rows = client.post(route, json={"instances": [{"user_id": 3, "k": 4}, 5]})
        columns = client.post(route, json={"inputs": {"user_id": [3, 5], "k": [4, 10]}})
        assert rows.status_code == columns.status_code == 200, columns.text
        by_user = rows.json()["predictions"]
        outputs = columns.json()["outputs"]
        for name in ("output_1", "output_2"):
            assert outputs[name] == [p[name] for p in by_user]
        listed = client.post(
            route, json={"inputs": [3, 5], "signature_name": "serving_default"}
        ).json()["outputs"]
        assert listed["output_2"][1] == by_user[1]["output_2"]
        for body, status, message in [
            ({"inputs": [3], "instances": [3]}, 422, "exactly one of them"),
            ({}, 422, "exactly one of them"),
            ({"inputs": {"user_id": [3, 5], "k": [4]}}, 422, "one length"),
            ({"inputs": {"user_id": [3], "kk": [4]}}, 422, "inputs.0.kk"),
            ({"inputs": [1, 2, 3, 4]}, 413, "`inputs` holds 4 users"),
            ({"inputs": [3], "signature_name": "rank"}, 422, "'serving_default'"),
        ]:
            refused = client.post(route, json=body)
            assert refused.status_code == status, refused.text
            assert message in refused.json()["error"]


def test_a_version_pinned_request_is_answered_by_the_served_version(
    models_dir: Path,
) -> None:
    # TF Serving clients may name a version: the served one answers as unpinned.
    with client_for(models_dir) as client:
        body = {"instances": [3, 5]}
        plain = client.post("/v1/models/synthetic:predict", json=body)
        pinned = client.post("/v1/models/synthetic/versions/1:predict", json=body)
        assert pinned.status_code == 200 and pinned.json() == plain.json()
        other = client.post("/v1/models/synthetic/versions/2:predict", json=body)
        assert other.status_code == 404
        assert "serves version 1" in other.json()["error"]
        assert (
            client.post(
                "/v1/models/synthetic/versions/two:predict", json=body
            ).status_code
            == 422
        )
        status = client.get("/v1/models/synthetic/versions/1").json()
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        assert client.get("/v1/models/synthetic/versions/9").status_code == 404
        assert client.get("/v1/models/nothing/versions/1").status_code == 404


def _break(bundle: Path, how: str) -> None:
    """Damage a saved version the ways the reliability probe found (issue 15)."""
    manifest = bundle / "manifest.json"
    if how == "files_is_a_list":
        data = json.loads(manifest.read_text())
        data["files"] = list(data["files"])
        manifest.write_text(json.dumps(data))
    elif how == "nested_json":
        manifest.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "negative_dim":
        config = bundle / "config.json"
        data = json.loads(config.read_text())
        data["retrieval"]["embedding_dim"] = -1
        config.write_text(json.dumps(data))
        _rehash(bundle)
    elif how == "corrupt_parquet":
        (bundle / "items.parquet").write_bytes(b"PAR1 not really parquet PAR1")
        _rehash(bundle)


def _rehash(bundle: Path) -> None:
    """Make the manifest agree with edited files (an operator's bad hand edit)."""
    import hashlib

    manifest = bundle / "manifest.json"
    data = json.loads(manifest.read_text())
    for name in data["files"]:
        data["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "how", ["files_is_a_list", "nested_json", "negative_dim", "corrupt_parquet"]
)
def test_a_bad_newest_version_never_stops_the_server(
    models_dir: Path, small_recommender: Recommender, how: str
) -> None:
    """Regression: these made `twostage serve` exit although version 1 was good."""
    _break(small_recommender.save(models_dir / "synthetic" / "2"), how)
    small_recommender.save(models_dir / "other" / "1")
    with client_for(models_dir) as client:  # start-up: serves what loads
        answer = client.post("/v1/recommend", json={"model": "synthetic", "user_id": 3})
        assert answer.status_code == 200 and answer.json()["version"] == 1
        status = client.get("/v1/models/synthetic").json()["model_version_status"]
        failed = next(s for s in status if s["version"] == "2")
        assert failed["state"] == "FAILED" and failed["status"]["error_message"]
        other = client.post("/v1/recommend", json={"model": "other", "user_id": 3})
        assert other.status_code == 200


def test_a_partial_copy_is_retried_when_its_files_arrive(
    models_dir: Path, small_recommender: Recommender, tmp_path: Path
) -> None:
    """Regression: a copy that wrote manifest.json before the weights stayed FAILED,
    because only the manifest's mtime was watched."""
    complete = small_recommender.save(tmp_path / "staging" / "2")
    target = models_dir / "synthetic" / "2"
    target.mkdir()
    (target / "manifest.json").write_bytes((complete / "manifest.json").read_bytes())
    with client_for(models_dir) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        assert registry.slots["synthetic"].versions[2].state == "FAILED"
        for item in complete.rglob("*"):  # the rest of the copy lands
            destination = target / item.relative_to(complete)
            if item.is_dir():
                destination.mkdir(exist_ok=True)
            elif item.name != "manifest.json":
                destination.write_bytes(item.read_bytes())
        assert registry.refresh() == ["synthetic: version 2"]


def test_version_names_are_ascii_digits(
    models_dir: Path, small_recommender: Recommender
) -> None:
    small_recommender.save(models_dir / "synthetic" / "²")  # isdigit() says yes
    with client_for(models_dir) as client:
        answer = client.post("/v1/recommend", json={"user_id": 3})
        assert answer.status_code == 200 and answer.json()["version"] == 1


def test_docs_work_offline_and_search_explain_compare(models_dir: Path) -> None:
    """/docs loads Swagger UI from the server itself (no CDN); the page's search,
    "because you watched" and retrieval-only list come from the API."""
    settings = ServeSettings(models=str(models_dir), poll_seconds=0)
    with TestClient(create_app(settings)) as client:
        page = client.get("/docs").text
        assert "cdn" not in page.lower() and "/static/swagger-ui/" in page
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            got = client.get(f"/static/swagger-ui/{asset}")
            assert got.status_code == 200 and len(got.content) > 10_000, asset

        found = client.get("/v1/models/synthetic/items", params={"q": "1"}).json()
        assert found["items"] and all(
            "1" in f"{i['label']} {i['item_id']}" for i in found["items"]
        )
        assert (
            client.get("/v1/models/synthetic/items", params={"q": ""}).json()["items"]
            == []
        )
        bad = client.get("/v1/models/synthetic/items", params={"q": "x", "limit": 0})
        assert bad.status_code == 422
        # A misspelt or repeated parameter was ignored, or the last one kept.
        for params, message in (
            ([("q", "x"), ("limt", "5")], "query.limt: this route takes no such"),
            ([("q", "x"), ("q", "y")], "query.q: given 2 times"),
        ):
            bad = client.get("/v1/models/synthetic/items", params=params)
            assert bad.status_code == 422 and message in bad.json()["error"], bad.text
        assert client.get("/v1/models", params={"x": "1"}).status_code == 422
        assert client.get("/", params={"utm_source": "mail"}).status_code == 200

        body = {"user_id": 3, "k": 5, "explain": True}
        answer = client.post("/v1/recommend", json=body).json()
        history = {
            h["item_id"]
            for h in client.post(
                "/v1/recommend", json={"user_id": 3, "include_history": True}
            ).json()["history"]
        }
        assert all(item["because"]["item_id"] in history for item in answer["items"])
        plain = client.post("/v1/recommend", json={**body, "use_ranker": False}).json()
        assert len(plain["items"]) == 5


def test_exclude_and_diversity_reach_the_model(
    models_dir: Path, small_recommender: Recommender
) -> None:
    """`exclude` and `diversity` answer as the Recommender does, on both routes;
    unknown excluded IDs are named, on `:predict` as a third output."""
    with client_for(models_dir) as client:
        plain = [i["item_id"] for i in small_recommender.recommend(3, 6).items]
        body = {
            "user_id": 3,
            "k": 6,
            "exclude": [plain[0], 99_999],
            "diversity": 0.7,
            "max_per": {"category": 1},
        }
        answer = client.post("/v1/recommend", json=body).json()
        expected = small_recommender.recommend(
            3, 6, exclude=[plain[0], 99_999], diversity=0.7, max_per={"category": 1}
        ).to_dict()
        categories = [i["category"] for i in answer["items"]]
        assert len(set(categories)) == len(categories)
        assert answer["items"] == expected["items"]
        assert plain[0] not in [i["item_id"] for i in answer["items"]]
        assert answer["unknown_excluded_items"] == [99_999]
        predicted = client.post(
            "/v1/models/synthetic:predict", json={"instances": [body, {"user_id": 4}]}
        ).json()["predictions"]
        assert predicted[0]["output_2"] == [i["item_id"] for i in expected["items"]]
        assert predicted[0]["unknown_excluded_items"] == [99_999]
        assert predicted[1]["unknown_excluded_items"] == []
        similar = client.post(
            "/v1/similar",
            json={"item_id": 7, "k": 4, "diversity": 0.5, "max_per": {"category": 1}},
        ).json()
        assert similar["items"] == small_recommender.similar_items(
            7, 4, diversity=0.5, max_per={"category": 1}
        )
        left = client.post(
            "/v1/similar", json={"item_id": 7, "k": 4, "exclude": [plain[0], "nope"]}
        ).json()
        assert left["items"] == small_recommender.similar_items(
            7, 4, exclude=[plain[0]]
        )
        assert left["unknown_excluded_items"] == ["nope"]
        assert "unknown_excluded_items" not in similar
        bad = client.post("/v1/similar", json={"item_id": 7, "exclude": "7"})
        assert bad.status_code == 422 and "body.exclude" in bad.text
        by = {"diversity": 1.0, "diversity_by": "category"}
        spread = client.post("/v1/recommend", json={"user_id": 3, "k": 6, **by})
        assert (
            spread.json()["items"]
            == small_recommender.recommend(3, 6, **by).to_dict()["items"]
        )
        similar_by = client.post("/v1/similar", json={"item_id": 7, "k": 4, **by})
        assert similar_by.json()["items"] == small_recommender.similar_items(7, 4, **by)
        predicted = client.post(
            "/v1/models/synthetic:predict",
            json={"instances": [{"user_id": 3, "k": 6, **by}]},
        ).json()["predictions"][0]
        assert predicted["output_2"] == [
            i["item_id"] for i in small_recommender.recommend(3, 6, **by).items
        ]
        for route, body in (
            ("/v1/recommend", {"user_id": 3, "diversity_by": "colour"}),
            ("/v1/similar", {"item_id": 7, "diversity": 0.5, "diversity_by": "colour"}),
        ):
            refused = client.post(route, json=body)
            assert refused.status_code == 400 and "colour" in refused.text
        # A limit past any list limits nothing (10^22 overflowed the counts: a 500).
        huge = client.post(
            "/v1/recommend",
            json={"user_id": 3, "k": 6, "max_per": {"category": 10**22}},
        )
        assert huge.status_code == 200, huge.text
        assert (
            huge.json()["items"] == small_recommender.recommend(3, 6).to_dict()["items"]
        )


def test_a_request_sets_its_own_candidate_pool(
    models_dir: Path, small_recommender: Recommender
) -> None:
    """`num_candidates` in a request is the pool its list is picked from, on
    every route, up to the server's `max_num_candidates` (a 400 past it)."""
    with client_for(models_dir, max_num_candidates=40) as client:
        rules = {"max_per": {"category": 1}, "diversity": 0.5}
        narrow = small_recommender.recommend(3, 6, num_candidates=6, **rules)
        wide = small_recommender.recommend(3, 6, num_candidates=40, **rules)
        assert narrow.to_dict()["items"] != wide.to_dict()["items"]
        for pool, expected in ((6, narrow), (40, wide)):
            body = {"user_id": 3, "k": 6, "num_candidates": pool, **rules}
            answer = client.post("/v1/recommend", json=body).json()
            assert answer["items"] == expected.to_dict()["items"]
            predicted = client.post(
                "/v1/models/synthetic:predict", json={"instances": [body]}
            ).json()["predictions"][0]
            assert predicted["output_2"] == [i["item_id"] for i in expected.items]
            similar = client.post(
                "/v1/similar",
                json={"item_id": 7, "k": 4, "num_candidates": pool, **rules},
            ).json()
            assert similar["items"] == small_recommender.similar_items(
                7, 4, num_candidates=pool, **rules
            )
        # Fewer than k: the list is picked from k, as the Recommender does.
        few = client.post(
            "/v1/recommend", json={"user_id": 3, "k": 6, "num_candidates": 2}
        ).json()
        assert few["items"] == small_recommender.recommend(3, 6).to_dict()["items"]
        for route, body in (
            ("/v1/recommend", {"user_id": 3, "num_candidates": 41}),
            ("/v1/similar", {"item_id": 7, "num_candidates": 41}),
            ("/v1/models/synthetic:predict", {"instances": [{"num_candidates": 41}]}),
        ):
            refused = client.post(route, json=body)
            assert refused.status_code == 400, refused.text
            assert "at most 40" in refused.json()["error"]
            assert "--max-num-candidates" in refused.json()["error"]
        zero = client.post("/v1/recommend", json={"user_id": 3, "num_candidates": 0})
        assert zero.status_code == 422
        assert "num_candidates" in zero.text


def test_the_server_sets_how_far_a_short_list_widens(
    models_dir: Path, small_recommender: Recommender
) -> None:
    """`widening` reaches every served model: 1 answers a list the limit
    leaves short from the request's pool alone."""
    body = {"user_id": 3, "k": 8, "num_candidates": 8, "max_per": {"category": 1}}
    short = small_recommender._recommend(
        3, 8, num_candidates=8, max_per={"category": 1}
    )
    assert len(short.items) < 8  # (the limit leaves it short from 8)
    with client_for(models_dir, widening=1) as client:
        answer = client.post("/v1/recommend", json=body).json()
        assert answer["items"] == short.to_dict()["items"]
        assert answer["short_reason"] == "max_per"  # the answer says why
        predicted = client.post(
            "/v1/models/synthetic:predict",
            json={"instances": [body, {"user_id": 3, "k": 2}]},
        ).json()["predictions"]
        assert [p["short_reason"] for p in predicted] == ["max_per", None]
        plain = client.post(
            "/v1/models/synthetic:predict", json={"instances": [{"user_id": 3}]}
        ).json()["predictions"][0]
        assert "short_reason" not in plain  # the tutorials' clients see two
    with client_for(models_dir) as client:
        answer = client.post("/v1/recommend", json=body).json()
        assert len(answer["items"]) > len(short.items)
    with pytest.raises(ConfigError, match="`widening` should be a positive"):
        ServeSettings(models=str(models_dir), widening=0)


def test_the_server_default_pool_fits_its_limit(models_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match="`num_candidates` \\(50\\) should be at most"
    ):
        ServeSettings(models=str(models_dir), num_candidates=50, max_num_candidates=40)
    with pytest.raises(ConfigError, match="`max_num_candidates` should be"):
        ServeSettings(models=str(models_dir), max_num_candidates=0)
