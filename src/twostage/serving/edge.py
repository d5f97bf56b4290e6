"""The serving app's edge, as pure ASGI middleware (:class:`Edge`): request metrics,
the body-size limit, the API key, and ``:predict`` bodies read as JSON whatever
their Content-Type; and the routes' JSON reading (:class:`StrictJSONRoute`), which
refuses a key given twice in one object. Refusals here are JSON errors of the API's
shape."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from twostage.serving.metrics import Metrics

if TYPE_CHECKING:
    from twostage.serving.app import ServeSettings

__all__ = ["Edge", "StrictJSONRoute"]

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


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies refuse a key given twice in one object:
    ``{"user_id": 1, "user_id": 2}`` was answered for user 2 without a word (RFC
    8259 leaves it to the parser; RFC 7493's I-JSON forbids it). FastAPI's own way
    to change how a request is read (a custom ``Request`` in a route class); the
    standard library's ``object_pairs_hook`` finds the repeats."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict
