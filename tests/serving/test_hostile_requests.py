"""Every client mistake is a 4xx in the documented shape, on a bundle with a ranker
(issue 15's 14 request shapes that answered 500), and the API key checks bytes."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from twostage.config import ExperimentConfig, apply_overrides
from twostage.errors import ConfigError
from twostage.serving import ServeSettings, create_app
from twostage.two_stage import fit_two_stage


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=60,num_items=120,num_interactions=1500",
            "train.epochs=1",
            "train.num_threads=1",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "retrieval.popularity_fallback=0",
            "ranking.embedding_dim=8",
            "ranking.hidden_dims=8",
            "ranking.epochs=1",
            "ranking.hard_negative_pool=10",
        ],
    )
    root = tmp_path_factory.mktemp("models")
    fit_two_stage(config, evaluate_test=False).recommender().save(root / "m" / "1")
    return root


BAD = [
    {"user_id": 3, "user_features": {"age": "old"}},
    {"user_features": {"age": "old"}},
    {"user_features": [1, 2]},
    {"user_features": {"a": 1}},
    {"user_features": {"age": 10**40}},
    {"user_id": 3, "filters": {"category": "no-such-category"}, "expect": 200},
    {"user_id": 3, "filters": {"colour": "red"}},
    {"user_id": 3, "filters": {"category": ["cat1", "cat2"]}},
    {"user_id": 3, "filters": {"category": {"a": 1}}},
    {"user_id": 3, "k": "5"},
    {"user_id": 3, "k": True},
    {"user_id": 3, "exclude_seen": "no"},
    {"user_id": True},
    {"user_id": 3, "context": {"timestamp": 1}},
]


@pytest.mark.parametrize("body", BAD, ids=[str(i) for i in range(len(BAD))])
def test_no_request_shape_gets_a_5xx(models: Path, body: dict) -> None:
    expect = body.pop("expect", None)
    with TestClient(
        create_app(ServeSettings(models=str(models), poll_seconds=0))
    ) as client:
        response = client.post("/v1/recommend", json=body)
        if expect == 200:  # a filter nothing passes: an empty answer
            assert response.status_code == 200 and response.json()["items"] == []
        else:
            assert 400 <= response.status_code < 500, (body, response.text)
            assert response.json()["error"], body
        # The connection stays usable: the next good request is answered.
        assert client.post("/v1/recommend", json={"user_id": 3}).status_code == 200


def test_nan_and_infinity_are_not_ages(models: Path) -> None:
    with TestClient(
        create_app(ServeSettings(models=str(models), poll_seconds=0))
    ) as client:
        for raw in (
            b'{"user_features": {"age": NaN}}',
            b'{"user_features": {"age": Infinity}}',
        ):
            response = client.post(
                "/v1/recommend",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 422, response.text
        # As text they passed the schema and were read as a missing age: a cold
        # start answered as if the client had left the age out.
        for text in ("nan", "inf", "-Infinity", "1e400"):
            response = client.post(
                "/v1/recommend", json={"user_features": {"age": text}}
            )
            assert response.status_code == 400, response.text
            assert "['age'] should be a finite number" in response.json()["error"]
        fine = client.post("/v1/recommend", json={"user_features": {"age": "31"}})
        assert fine.status_code == 200, fine.text
        # Text that is no number is named with its value (the encoder's error
        # said "should be numeric. Received dtype String", naming neither).
        old = client.post("/v1/recommend", json={"user_features": {"age": "old"}})
        assert old.status_code == 400, old.text
        assert old.json()["error"] == (
            "`user_features`['age'] should be a number, or left out when unknown. "
            "Received: 'old'."
        )


def test_unknown_routes_and_methods_answer_in_the_api_error_shape(
    models: Path,
) -> None:
    # They answered Starlette's {"detail": "Not Found"}, unlike every other error.
    with TestClient(
        create_app(ServeSettings(models=str(models), poll_seconds=0))
    ) as client:
        missing = client.get("/v1/no-such-route")
        assert missing.status_code == 404
        assert missing.json() == {
            "error": "no route GET /v1/no-such-route; the routes are listed at /docs.",
            "details": [],
        }
        wrong = client.get("/v1/recommend")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert (
            wrong.json()["error"] == "/v1/recommend does not take GET; it takes POST."
        )


def test_predict_instances_are_capped(models: Path) -> None:
    settings = ServeSettings(models=str(models), poll_seconds=0, max_instances=5)
    with TestClient(create_app(settings)) as client:
        many = client.post("/v1/models/m:predict", json={"instances": [3] * 6})
        assert many.status_code == 413 and "at most 5" in many.json()["error"]
        bad = client.post(
            "/v1/models/m:predict", json={"instances": [{"user_id": 3, "k": 0}]}
        )
        assert bad.status_code == 400


def test_api_key_is_compared_as_bytes_and_must_be_printable(models: Path) -> None:
    settings = ServeSettings(models=str(models), poll_seconds=0, api_key="s3cret")
    with TestClient(create_app(settings)) as client:
        odd = client.post(
            "/v1/recommend",
            json={"user_id": 3},
            headers={"X-API-Key": "sécret".encode()},  # raw UTF-8 bytes
        )
        assert odd.status_code == 401
        good = client.post(
            "/v1/recommend", json={"user_id": 3}, headers={"X-API-Key": "s3cret"}
        )
        assert good.status_code == 200
    for key in ("", " padded ", "clé"):
        with pytest.raises(ConfigError, match="api_key"):
            ServeSettings(models=str(models), api_key=key)


@pytest.mark.parametrize(
    ("setting", "value", "allowed"),
    [
        ("poll_seconds", -1.0, "0 (never) or a positive, finite"),
        ("poll_seconds", float("nan"), "0 (never) or a positive, finite"),
        ("poll_seconds", float("inf"), "0 (never) or a positive, finite"),
        ("max_k", 0, "a positive integer"),
        ("max_body_bytes", 0, "a positive integer"),
        ("max_instances", 0, "a positive integer"),
        ("torch_threads", 0, "a positive integer"),
        ("num_candidates", 0, "unset (the bundle's) or a positive integer"),
    ],
)
def test_out_of_range_settings_are_refused_not_coerced(
    models: Path, setting: str, value: float, allowed: str
) -> None:
    # Each once started a server that misbehaved quietly: an infinite poll killed
    # the watcher thread, 0 threads became 1, 0 candidates became k.
    with pytest.raises(ConfigError) as error:
        ServeSettings(models=str(models), **{setting: value})
    assert str(error.value).startswith(f"`{setting}` should be {allowed}")


def test_serve_refuses_a_port_or_worker_count_out_of_range(models: Path) -> None:
    from typer.testing import CliRunner

    from twostage.cli import app

    runner = CliRunner()
    for option, value in (("--port", "99999"), ("--port", "0"), ("--workers", "0")):
        result = runner.invoke(app, ["serve", str(models), option, value])
        assert result.exit_code == 2, (option, value, result.output)
        assert option in result.output
    result = runner.invoke(app, ["serve", str(models), "--poll-seconds", "-1"])
    assert result.exit_code != 0 and "`poll_seconds` should be" in str(result.exception)
    # A port in use: uvicorn loaded every model, then exited 3 with its own line.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = runner.invoke(
            app, ["serve", str(models), "--port", port], env={"COLUMNS": "200"}
        )
    assert busy.exit_code == 2 and "cannot listen on 127.0.0.1:" in busy.output


def test_docs_routes_are_open_and_can_be_closed(models: Path) -> None:
    settings = ServeSettings(models=str(models), poll_seconds=0, api_key="s3cret")
    with TestClient(create_app(settings)) as client:
        assert client.get("/openapi.json").status_code == 200  # documented as open
    closed = ServeSettings(models=str(models), poll_seconds=0, docs=False)
    with TestClient(create_app(closed)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path


def test_a_run_directory_is_refused_and_an_empty_one_is_announced(
    models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Both once started a server that served nothing and said nothing.
    from twostage.recommender import load

    run = tmp_path / "run"
    load(models / "m").run.save(run)  # what `twostage train retrieval --out` holds
    with pytest.raises(ConfigError, match="is a training run"):
        create_app(ServeSettings(models=str(run), poll_seconds=0))
    # A run saved where a version goes (`train retrieval --out models/m/1`) was
    # taken for a half-copied bundle and waited for in silence.
    nested = tmp_path / "served" / "m"
    load(models / "m").run.save(nested / "1")
    served = ServeSettings(models=str(nested.parent), poll_seconds=0)
    with TestClient(create_app(served)) as client:
        answer = client.post("/v1/recommend", json={"user_id": 3})
        status = client.get("/v1/models/m").json()["model_version_status"]
    assert answer.status_code == 503 and "is a training run" in answer.json()["error"]
    assert status[0]["state"] == "FAILED"
    assert "Recommender(load_run(" in status[0]["status"]["error_message"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with (
        caplog.at_level("WARNING", logger="twostage.serving.app"),
        TestClient(create_app(ServeSettings(models=str(empty), poll_seconds=0))),
    ):
        pass
    assert "no loadable model under" in caplog.text
    assert "--poll-seconds 0 never looks again" in caplog.text
