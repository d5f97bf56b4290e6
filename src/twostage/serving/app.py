"""The FastAPI application: an app factory, a lifespan that loads the models, thin routes.

Nothing is loaded at import: :func:`create_app` builds the app, and its lifespan loads
the newest valid version of every model and starts the version watcher. Handlers are
plain ``def`` (CPU-bound inference runs in the thread pool); domain errors become HTTP
errors only here, at the edge.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from twostage.errors import ArtifactError, ConfigError, UnknownIdError
from twostage.serving.docs import add_offline_docs
from twostage.serving.edge import Edge, StrictRoute
from twostage.serving.metrics import CONTENT_TYPE, Metrics
from twostage.serving.registry import LoadedModel, ModelRegistry, UnknownModelError
from twostage.serving.schemas import (
    ErrorResponse,
    PredictRequest,
    PredictResponse,
    RecommendRequest,
    RecommendResponse,
    SearchResponse,
    SimilarRequest,
    SimilarResponse,
)

__all__ = ["ServeSettings", "app_from_env", "create_app"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SETTINGS_ENV = "TWOSTAGE_SERVE_SETTINGS"
#: ``:predict``'s outputs past the two of TF Serving's tutorials, each present
#: only when an instance has something in it: a session's items added after
#: training, and the candidates an answer cannot hold.
UNREAD = "unread_session_items"
LEFT_OUT = "left_out_candidates"
ALIKE = "alike_new_items"
UNKNOWN_EXCLUDED = "unknown_excluded_items"
SHORT = "short_reason"


@dataclass(frozen=True)
class ServeSettings:
    """How the server runs.

    Args:
        models: directory of ``<name>/<version>/`` bundles (or one model's directory).
        max_k: the largest ``k`` a request may ask for.
        max_body_bytes: larger request bodies get 413.
        api_key: when set, ``/v1/*`` and ``/metrics`` need header ``X-API-Key``.
        poll_seconds: how often to look for new model versions (0: never).
        torch_threads: torch CPU threads per process (1 suits many small requests).
        num_candidates: how many retrieved items the ranking stage re-scores (None:
            the bundle's ``ranking.num_candidates``) when a request does not say.
        max_num_candidates: the most a request's own ``num_candidates`` may ask
            for (a wider pool for ``max_per`` or ``diversity`` costs time per
            request).
        widening: how many times wider than its ``num_candidates`` a list
            ``max_per`` leaves short may be picked from (1: never; each served
            model's :attr:`~twostage.recommender.Recommender.widening`).
        max_instances: the most users one ``:predict`` request may ask for.
        docs: serve ``/docs`` (Swagger UI from local files: it works offline) and
            ``/openapi.json``, open even with an API key: they describe the API, not
            the models.

    Raises:
        ConfigError: the API key is empty or not printable ASCII (an empty key
            would silently turn authentication off), or a number is out of its
            range (a negative ``poll_seconds``, ``torch_threads`` of 0...): named,
            never coerced.
    """

    models: str
    max_k: int = 100
    max_body_bytes: int = 64 * 1024
    api_key: str | None = None
    poll_seconds: float = 5.0
    torch_threads: int = 1
    num_candidates: int | None = None
    max_num_candidates: int = 1000
    widening: int = 16
    max_instances: int = 100
    docs: bool = True

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and not (
            key and key.isascii() and key.isprintable() and key.strip() == key
        ):
            raise ConfigError(
                "`api_key` should be non-empty printable ASCII without surrounding "
                f"spaces (it is sent in an HTTP header). Received {len(key)} "
                "character(s) that are not."
            )
        candidates = self.num_candidates
        rules = {
            "max_k": (self.max_k >= 1, "a positive integer"),
            "max_body_bytes": (self.max_body_bytes >= 1, "a positive integer"),
            "max_instances": (self.max_instances >= 1, "a positive integer"),
            "poll_seconds": (
                math.isfinite(self.poll_seconds) and self.poll_seconds >= 0,
                "0 (never) or a positive, finite number of seconds",
            ),
            "torch_threads": (self.torch_threads >= 1, "a positive integer"),
            "num_candidates": (
                candidates is None or candidates >= 1,
                "unset (the bundle's) or a positive integer",
            ),
            "max_num_candidates": (
                self.max_num_candidates >= 1,
                "a positive integer",
            ),
            "widening": (self.widening >= 1, "a positive integer (1: never widen)"),
        }
        for name, (ok, expected) in rules.items():
            if not ok:
                raise ConfigError(
                    f"`{name}` should be {expected}. "
                    f"Received: `{name}` = {getattr(self, name)!r}."
                )
        if candidates is not None and candidates > self.max_num_candidates:
            raise ConfigError(
                f"`num_candidates` ({candidates}) should be at most "
                f"`max_num_candidates` ({self.max_num_candidates}): the default "
                "a request gets is one a request could ask for."
            )


def _error(status: int, message: str, details: list[str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "details": details or []}, status)


def _check_k(k: int, limit: int) -> None:
    if not 1 <= k <= limit:
        raise ConfigError(f"`k` should be between 1 and {limit}. Received: `k` = {k}.")


def _num_candidates(settings: ServeSettings, k: int, asked: int | None) -> int | None:
    """The pool a request's list is picked from: its own ``num_candidates``
    (at most the server's ``max_num_candidates``), else the server's, else the
    bundle's (None)."""
    if asked is not None:
        if asked > settings.max_num_candidates:
            raise ConfigError(
                f"`num_candidates` should be at most {settings.max_num_candidates} "
                f"on this server (`serve --max-num-candidates`). Received: "
                f"`num_candidates` = {asked}."
            )
        return max(asked, k)
    if settings.num_candidates is None:
        return None
    return max(settings.num_candidates, k)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, list[str]]:
    details = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            return 400, f"malformed JSON in the request body: {reason}.", []
        details.append(f"{where}: {error.get('msg')}")
    return 422, "the request does not match the schema: " + "; ".join(details), details


def create_app(settings: ServeSettings) -> FastAPI:
    """The HTTP app for the models under ``settings.models`` (loaded at startup)."""
    registry = ModelRegistry(
        settings.models, poll_seconds=settings.poll_seconds, widening=settings.widening
    )
    metrics = Metrics()
    # One model call at a time per process: concurrent calls in the thread pool only
    # fight over the GIL and the cores (measured: fewer requests/s, longer tails).
    # Use --workers for more cores.
    inference = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        for event in registry.refresh():
            logger.info("serving %s", event)
        if not any(slot.current for slot in registry.slots.values()):
            logger.warning(
                "no loadable model under %s yet: requests get 404 (or 503 for a "
                "model whose versions were all refused) until a "
                "<name>/<version>/ bundle appears%s.",
                registry.root,
                f" (looked for every {settings.poll_seconds:g} s)"
                if settings.poll_seconds > 0
                else "; --poll-seconds 0 never looks again",
            )
        registry.start()
        yield
        registry.stop()

    app = FastAPI(
        title="twostage",
        summary="Two-stage recommendations over HTTP.",
        version=_version(),
        lifespan=lifespan,
        # The API description is open (it holds no model data); `docs=False` closes it.
        # /docs is added below with local assets (FastAPI's loads them from a CDN).
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.router.route_class = StrictRoute  # before the routes below are added
    if settings.docs:
        add_offline_docs(app)
    app.state.registry = registry
    app.state.metrics = metrics
    app.add_middleware(Edge, settings=settings, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        media = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in media.lower():
            return _error(
                415,
                "the request body should be JSON: send the header "
                f"`Content-Type: application/json` (received: {media or 'none'!r}).",
            )
        status, message, details = _validation_message(exc)
        return _error(status, message, details)

    @app.exception_handler(StarletteHTTPException)
    def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The router's own 404 and 405 (and any other HTTPException) in the API's
        # error shape, {"error", "details"}, not Starlette's {"detail"}.
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no route {where}" + (
                "; the routes are listed at /docs." if settings.docs else "."
            )
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.url.path} does not take {request.method}" + (
                f"; it takes {allowed}." if allowed else "."
            )
        else:
            message = f"{where}: {exc.detail}"
        response = _error(exc.status_code, message)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(ConfigError)
    def on_config(request: Request, exc: ConfigError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(UnknownIdError)
    def on_unknown_id(request: Request, exc: UnknownIdError) -> JSONResponse:
        return _error(404, str(exc).strip("'\""))

    @app.exception_handler(UnknownModelError)
    def on_unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(ArtifactError)
    def on_artifact(request: Request, exc: ArtifactError) -> JSONResponse:
        return _error(503, str(exc))

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
    }

    @app.post(
        "/v1/recommend",
        response_model=None,
        responses={200: {"model": RecommendResponse}, **errors},
        tags=["recommendations"],
    )
    def recommend(body: RecommendRequest) -> JSONResponse:
        """Top-k items for a user; an unknown user gets the cold-start answer."""
        _check_k(body.k, settings.max_k)
        model = registry.get(body.model)
        rec = model.recommender
        with inference:
            answer = rec.recommend(
                body.user_id,
                body.k,
                user_features=body.user_features,
                exclude_seen=body.exclude_seen,
                num_candidates=_num_candidates(settings, body.k, body.num_candidates),
                filters=body.filters,
                context=body.context,
                use_ranker=body.use_ranker,
                explain=body.explain,
                session=body.session_items(),
                candidates=body.candidates,
                exclude=body.exclude,
                diversity=body.diversity,
                diversity_by=body.diversity_by,
                max_per=body.max_per,
            )
        out = {"model": model.name, "version": model.version, **answer.to_dict()}
        if body.include_history:
            out["history"] = (
                rec.history(body.user_id) if body.user_id is not None else []
            )
        return JSONResponse(out)  # already JSON types: skip FastAPI's re-encoding

    @app.post(
        "/v1/similar",
        response_model=None,
        responses={200: {"model": SimilarResponse}, **errors},
        tags=["recommendations"],
    )
    def similar(body: SimilarRequest) -> JSONResponse:
        """Items closest to one item in the candidate embedding space."""
        _check_k(body.k, settings.max_k)
        model = registry.get(body.model)
        with inference:
            items = model.recommender.similar_items(
                body.item_id,
                body.k,
                filters=body.filters,
                item_features=body.item_features,
                diversity=body.diversity,
                diversity_by=body.diversity_by,
                max_per=body.max_per,
                num_candidates=_num_candidates(settings, body.k, body.num_candidates),
                exclude=body.exclude,
            )
            unknown = model.recommender.unknown_item_ids(body.exclude or [])
        out = {
            "model": model.name,
            "version": model.version,
            "item_id": body.item_id,
            "items": items,
        }
        if unknown:  # as /v1/recommend names them: a typo must not pass unseen
            out[UNKNOWN_EXCLUDED] = unknown
        return JSONResponse(out)

    @app.post(
        "/v1/models/{name}:predict",
        response_model=None,
        responses={200: {"model": PredictResponse}, **errors},
        tags=["tf-serving"],
    )
    def predict(name: str, body: PredictRequest) -> JSONResponse:
        """TF Serving's REST ``:predict``: ``{"instances": ["42"]}`` -> scores and IDs.

        ``output_1`` holds the scores the list is ordered by, best first: the
        two-stage key when the bundle has a ranker, else the retrieval score;
        ``output_2`` the item IDs in the same order; ``unread_session_items``,
        only when an instance's session held items added after training, those
        items (seen, not read), one list per instance; ``left_out_candidates``,
        ``alike_new_items`` and ``unknown_excluded_items`` likewise, and
        ``short_reason`` (null where a list is full), as ``/v1/recommend``
        gives them.
        """
        return _predict(registry.get(name), body)

    @app.post(
        "/v1/models/{name}/versions/{version}:predict",
        response_model=None,
        responses={200: {"model": PredictResponse}, **errors},
        tags=["tf-serving"],
    )
    def predict_version(name: str, version: int, body: PredictRequest) -> JSONResponse:
        """``:predict`` pinned to a version, as TF Serving clients may ask: answered
        by the version this server serves (its newest valid one), 404 for others."""
        return _predict(_served_version(name, version), body)

    def _served_version(name: str, version: int) -> LoadedModel:
        model = registry.get(name)
        if model.version != version:
            raise UnknownModelError(
                f"model {name!r} version {version} is not served; this server serves "
                f"version {model.version} (the newest valid one)."
            )
        return model

    def _predict(model: LoadedModel, body: PredictRequest) -> JSONResponse:
        rows = body.rows()
        form = "instances" if body.instances is not None else "inputs"
        if len(rows) > settings.max_instances:
            return _error(
                413,
                f"`{form}` holds {len(rows)} users; this server answers "
                f"at most {settings.max_instances} per request (split the request).",
            )
        predictions = []
        for number, instance in enumerate(rows):
            options = instance if isinstance(instance, dict) else {"user_id": instance}
            try:
                request = RecommendRequest.model_validate(options)
            except ValidationError as e:
                details = [
                    f"{form}.{number}."
                    + ".".join(str(part) for part in error.get("loc", ()))
                    + f": {error.get('msg')}"
                    for error in e.errors()
                ]
                return _error(
                    422,
                    "an instance does not match the schema: " + "; ".join(details),
                    details,
                )
            _check_k(request.k, settings.max_k)
            with inference:
                answer = model.recommender.recommend(
                    request.user_id,
                    request.k,
                    user_features=request.user_features,
                    exclude_seen=request.exclude_seen,
                    num_candidates=_num_candidates(
                        settings, request.k, request.num_candidates
                    ),
                    filters=request.filters,
                    context=request.context,
                    session=request.session_items(),
                    candidates=request.candidates,
                    exclude=request.exclude,
                    diversity=request.diversity,
                    diversity_by=request.diversity_by,
                    max_per=request.max_per,
                )
            predictions.append(
                {
                    "output_1": [
                        item.get("rank_score", item["score"]) for item in answer.items
                    ],
                    "output_2": [item["item_id"] for item in answer.items],
                    UNREAD: answer.unread_session_items,
                    LEFT_OUT: answer.left_out_candidates,
                    ALIKE: answer.alike_new_items,
                    UNKNOWN_EXCLUDED: answer.unknown_excluded_items,
                    SHORT: answer.short_reason,
                }
            )
        # An output past the two only when some instance has something in it,
        # then for every instance (TF Serving's outputs share the batch): the
        # tutorials' clients never send sessions or candidates and see the two
        # they know.
        names = ["output_1", "output_2"]
        names += [
            n
            for n in (UNREAD, LEFT_OUT, ALIKE, UNKNOWN_EXCLUDED, SHORT)
            if any(p[n] for p in predictions)
        ]
        predictions = [{name: p[name] for name in names} for p in predictions]
        if form == "inputs":  # TF Serving answers the columnar form by output
            return JSONResponse(
                {"outputs": {name: [p[name] for p in predictions] for name in names}}
            )
        return JSONResponse({"predictions": predictions})

    @app.get("/v1/models", tags=["models"])
    def models() -> dict[str, Any]:
        """Every model and the version it serves."""
        return {
            "models": [
                {
                    "name": name,
                    "version": slot.current.version if slot.current else None,
                }
                for name, slot in sorted(registry.slots.items())
            ]
        }

    @app.get("/v1/models/{name}", tags=["models"], responses=errors)
    def model_status(name: str) -> dict[str, Any]:
        """TF Serving's model status: every version seen, its state and any error."""
        slot = registry.slots.get(name)
        if slot is None:
            raise UnknownModelError(
                f"unknown model {name!r}; this server holds {sorted(registry.slots)}."
            )
        versions = sorted(slot.versions.values(), key=lambda s: -s.version)
        return {"model_version_status": [s.to_dict() for s in versions]}

    @app.get("/v1/models/{name}/versions/{version}", tags=["models"], responses=errors)
    def version_status(name: str, version: int) -> dict[str, Any]:
        """TF Serving's status of one version: its state and any error."""
        statuses = model_status(name)["model_version_status"]
        found = [s for s in statuses if s["version"] == str(version)]
        if not found:
            raise UnknownModelError(
                f"model {name!r} has no version {version}; seen: "
                f"{[s['version'] for s in statuses]}."
            )
        return {"model_version_status": found}

    @app.get("/v1/models/{name}/metadata", tags=["models"], responses=errors)
    def model_metadata(name: str) -> dict[str, Any]:
        """What a client needs to build requests: user features, sample users, sizes."""
        return _metadata(registry.get(name))

    @app.get(
        "/v1/models/{name}/items",
        response_model=SearchResponse,
        responses=errors,
        tags=["models"],
    )
    def search_items(
        name: str,
        q: Annotated[str, Query(max_length=200, description="Text in the title.")],
        limit: Annotated[int, Query(ge=1, le=100)] = 10,
    ) -> JSONResponse:
        """Items whose title (or ID) contains ``q``, case-insensitive: to pick an
        item by its title."""
        model = registry.get(name)
        items = model.recommender.search_items(q, limit)
        return JSONResponse(
            {"model": model.name, "version": model.version, "query": q, "items": items}
        )

    @app.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """200 when every model serves a version, 503 otherwise."""
        serving = {
            name: slot.current.version if slot.current else None
            for name, slot in registry.slots.items()
        }
        ready = bool(serving) and all(v is not None for v in serving.values())
        return JSONResponse(
            {
                "status": "ok" if ready else "unavailable",
                "models": serving,
                "pid": os.getpid(),
            },
            200 if ready else 503,
        )

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Request counts, latency histograms, errors and model versions."""
        versions = [
            (
                name,
                slot.current.version if slot.current else None,
                sum(s.state == "FAILED" for s in slot.versions.values()),
            )
            for name, slot in sorted(registry.slots.items())
        ]
        return PlainTextResponse(metrics.render(versions), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _metadata(model: LoadedModel) -> dict[str, Any]:
    from twostage.retrieval.tensors import context_keys

    rec = model.recommender
    keys = context_keys(rec.run.spec)
    fields = [
        {"column": f.column, "kind": f.kind}
        for f in rec.run.spec.describe(side="query")
        if f.column != "user_id"
    ]
    # A request's `user_features` and its `context` take different columns.
    features = [f for f in fields if f["column"] not in keys]
    context = [f for f in fields if f["column"] in keys]
    users = rec.user_vocab.values
    retrieval = rec.run.config.retrieval
    return {
        "model": model.name,
        "version": model.version,
        "num_users": len(users),
        "num_items": len(rec.item_vocab.values),
        # Of them, items added to the catalogue after training (`add-items`).
        "num_added_items": rec.item_vocab.size - rec.num_trained_items,
        # ... and items no longer served (`remove-items`).
        "num_removed_items": (
            0 if rec.removed_items is None else len(rec.removed_items)
        ),
        "user_features": features,
        # The per-interaction context a request may carry (`context`); the
        # hour and weekday come from its `timestamp`.
        "context": context,
        "sample_users": users.head(50).to_list(),
        "has_ranker": rec.ranker is not None,
        "index": rec.index_kind,
        # How the query reads the history (several: `retrieval.ensemble`), and how
        # many recent items a request's `session` may bring to it (0: none).
        "query_encoders": [retrieval.query_encoder, *retrieval.ensemble],
        "history_length": int(rec.run.tensors.history.shape[1]),
        # whether a session entry's `rating` is read (`retrieval.sequence_ratings`)
        "reads_session_ratings": rec.run.tensors.reads_ratings,
        # the lowest and highest training rating, where they are read: a
        # session's ratings must lie in it (null: not read, or not kept)
        "session_rating_range": rec.run.tensors.rating_range.tolist() or None,
        # whether the gaps between a session's `timestamp`s are read
        # (`retrieval.sequence_time_gaps`; any model orders the entries by them)
        "reads_session_times": bool(rec.run.tensors.history_times.numel()),
        # > 0: retrieval adds the session-kNN term and scores every item exactly
        # (the index serves similar items only); the run's weight, picked on
        # validation where the config says -1.
        "session_knn_weight": rec.run.session_knn_weight,
        # The item columns the answers' `label` and `tags` come from; a client
        # filters on the tags column (`filters={tags_column: value}`).
        "title_column": rec.display.title,
        "tags_column": rec.display.tags,
    }


def _version() -> str:
    from twostage import __version__

    return __version__


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (several workers): settings from the env."""
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise ConfigError(
            f"{SETTINGS_ENV} is not set; start the server with `twostage serve`."
        )
    return create_app(ServeSettings(**json.loads(raw)))


def settings_to_env(settings: ServeSettings) -> str:
    """The JSON that :func:`app_from_env` reads back."""
    return json.dumps(asdict(settings))
