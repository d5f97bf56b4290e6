"""The serving app's edge, as pure ASGI middleware (:class:`Edge`): request metrics,
the body-size limit, the API key, and ``:predict`` bodies read as JSON whatever
their Content-Type; and how the routes read a request (:class:`StrictRoute`): a
key given twice in one JSON object, and stray or repeated query parameters, are
refused. Refusals here are JSON errors of the API's shape."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse, Response

from twostage.serving.metrics import Metrics

if TYPE_CHECKING:
    from twostage.serving.app import ServeSettings

__all__ = ["Edge", "StrictRoute"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def _send_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "details": []}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Edge:
    """Pure ASGI middleware: metrics, the body-size limit and the API key, in that order;
    and ``:predict`` bodies read as JSON whatever their Content-Type, as TF Serving does."""

    def __init__(self, app: Any, settings: ServeSettings, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(
                label, scope["method"], status, time.perf_counter() - started
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        path = scope["path"]
        key = self.settings.api_key
        if key and (path.startswith("/v1/") or path == "/metrics"):
            # Bytes against bytes: a non-ASCII header must be a 401, not a 500.
            given = headers.get(b"x-api-key", b"")
            if not secrets.compare_digest(given, key.encode("ascii")):
                await _send_error(
                    send, 401, "missing or wrong API key: send it in header X-API-Key."
                )
                return
        limit = self.settings.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(
                send,
                413,
                f"request body of {int(length)} bytes is over the limit of {limit} bytes.",
            )
            return
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:  # chunked upload: read it, up to the limit
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    await _send_error(
                        send, 413, f"request body is over the limit of {limit} bytes."
                    )
                    return

            async def replay() -> Message:
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay
        if path.endswith(":predict"):
            # TF Serving reads the body as JSON whatever Content-Type says (clients
            # often send none, or curl's form default): do the same.
            scope = dict(scope)
            scope["headers"] = [
                (name, value)
                for name, value in scope["headers"]
                if name.lower() != b"content-type"
            ] + [(b"content-type", b"application/json")]
        await self.app(scope, receive, send)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body, object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                # FastAPI answers a JSONDecodeError as malformed JSON (our 400).
                raise json.JSONDecodeError(
                    f"the key {e.key!r} is given twice in one object (which one was "
                    "meant? a JSON parser keeps either); send it once",
                    body.decode("utf-8", "replace"),
                    0,
                ) from None
        return self._json


class StrictRoute(APIRoute):
    """Routes that refuse what they would otherwise ignore or overwrite without a
    word: a key given twice in one JSON object (``{"user_id": 1, "user_id": 2}``
    was answered for user 2; RFC 8259 leaves it to the parser, RFC 7493's I-JSON
    forbids it) is a 400; under ``/v1/``, a query parameter the route does not
    take (``?limt=5``) or one given twice (``?q=a&q=b`` searched for "b") is a 422.
    A route class with a custom ``Request`` is FastAPI's own way to change how a
    request is read; the standard library's ``object_pairs_hook`` finds the repeats.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        taken = {param.alias for param in self.dependant.query_params}
        checked = self.path.startswith("/v1/")

        async def strict(request: Request) -> Response:
            if checked and (refusal := _query_refusal(request, taken)) is not None:
                return refusal
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


def _query_refusal(request: Request, taken: set[str]) -> Response | None:
    names = [name for name, _ in request.query_params.multi_items()]
    details = [
        f"query.{name}: this route takes no such parameter"
        + (f" (it takes: {', '.join(sorted(taken))})" if taken else "")
        for name in dict.fromkeys(names)
        if name not in taken
    ]
    details += [
        f"query.{name}: given {names.count(name)} times; send it once"
        for name in dict.fromkeys(names)
        if name in taken and names.count(name) > 1
    ]
    if not details:
        return None
    return JSONResponse(
        {
            "error": "the request does not match the schema: " + "; ".join(details),
            "details": details,
        },
        422,
    )
