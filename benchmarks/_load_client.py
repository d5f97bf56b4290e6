"""A closed-loop HTTP/1.1 load generator for serve_load.py, run in its own process.

Raw asyncio streams with keep-alive: each of ``concurrency`` connections sends one
request, waits for the whole response, then sends the next, until ``num_requests`` have
been sent or ``time_cap_s`` has passed. A non-200 answer, a broken connection or a
timeout counts as an error (and the connection is reopened); answers are also counted
by status, and the latency of the 200s is kept apart.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed by the server")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _run(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    *,
    concurrency: int,
    num_requests: int,
    time_cap_s: float,
    timeout_s: float,
) -> dict[str, Any]:
    latencies: list[float] = []
    good_latencies: list[float] = []  # of the requests answered 200
    statuses: dict[int, int] = {}
    errors: list[str] = []
    versions: dict[int, int] = {}
    sent = 0
    started = time.perf_counter()
    deadline = started + time_cap_s

    async def connection() -> None:
        nonlocal sent
        reader = writer = None
        while sent < num_requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            request = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            began = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(request)
                status, payload = await asyncio.wait_for(
                    _read_response(reader), timeout_s
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            latencies.append(time.perf_counter() - began)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                good_latencies.append(latencies[-1])
            if status != 200:
                errors.append(f"HTTP {status}: {payload[:200]!r}")
                continue
            version = json.loads(payload).get("version", -1)
            versions[version] = versions.get(version, 0) + 1
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return {
        "latencies": latencies,
        "good_latencies": good_latencies,
        "statuses": statuses,
        "errors": errors,
        "versions": versions,
        "seconds": time.perf_counter() - started,
    }


def run_load(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    concurrency: int,
    num_requests: int,
    time_cap_s: float,
    results: Any,
    timeout_s: float = 10.0,
) -> None:
    """Process entry point: drive the load and put the raw figures on ``results``.

    Puts ``"started"`` first, so the caller can time events (a version swap) from the
    moment the load begins rather than from the process start.
    """
    results.put("started")
    outcome = asyncio.run(
        _run(
            host,
            port,
            path,
            bodies,
            concurrency=concurrency,
            num_requests=num_requests,
            time_cap_s=time_cap_s,
            timeout_s=timeout_s,
        )
    )
    results.put(outcome)
