"""Fuzzing from the OpenAPI schema (schemathesis): valid and invalid requests to every
route of a server holding a two-stage bundle; no answer may be a 5xx."""

import pytest
from hypothesis import HealthCheck, settings

from twostage.config import ExperimentConfig, apply_overrides
from twostage.serving import ServeSettings, create_app
from twostage.two_stage import fit_two_stage

schemathesis = pytest.importorskip("schemathesis")

#: Examples per route and generation mode: bounded, so `make test` stays quick.
EXAMPLES = 80


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
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
        ],
    )
    root = tmp_path_factory.mktemp("fuzz")
    fit_two_stage(config, evaluate_test=False).recommender().save(root / "m" / "1")
    app = create_app(ServeSettings(models=str(root), poll_seconds=0))
    app.state.registry.refresh()  # what the lifespan hook does at start-up
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_request_gets_a_server_error(api_schema) -> None:
    """Every operation, with data that fits the schema and data that does not."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    checked, failures = [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            strategy = operation.as_strategy(generation_mode=mode)

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def fuzz(case) -> None:
                response = case.call()
                checked.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.formatted_path, case.body))
                assert response.status_code < 500, response.text[:500]

            try:
                fuzz()
            except Unsatisfiable:  # nothing in this operation can be made invalid
                continue
    assert len(checked) > 100 and not failures, failures[:5]
    print(f"fuzz: {len(checked)} requests, {sum(c >= 500 for c in checked)} 5xx")
