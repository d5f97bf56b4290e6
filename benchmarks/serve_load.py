"""Closed-loop load on `twostage serve`: throughput, latency, errors, and a version swap.

Three scenarios, each served by a real `twostage serve` subprocess on loopback and loaded
from a separate process (benchmarks/_load_client.py, raw HTTP/1.1 keep-alive):

- ``movielens-100k``: the two-stage bundle (retrieval + ranking, exact index);
- ``movielens-100k-retrieval-only``: the same bundle without its ranking stage;
- ``movielens-100k-session-knn``: the ``movielens-100k`` bundle trained with the
  session-kNN term (``retrieval.session_knn_weight=0.005``), so retrieval scores every
  item exactly and searches the users' neighbourhood per request;
- ``synthetic-1m``: an ID-only bundle of about 1,000,000 items (the number of items in
  its vocabulary is reported) with an HNSW index.

Each scenario runs a bounded load of ``POST /v1/recommend`` (a fixed number of requests
and a time cap), then a second phase that publishes a new model version mid-load and
counts the errors around the swap, and a third phase that mixes hostile requests (wrong
types, unknown fields and filter columns, NaN, oversized k) into the load: they must
all be 4xx, and the good requests' p99 is compared with the first phase's. Usage:

    python benchmarks/serve_load.py --json benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --scenarios movielens-100k --requests 5000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import console, machine, print_table, write_json
from _load_client import run_load
from twostage.config import ExperimentConfig, apply_overrides
from twostage.recommender import load
from twostage.two_stage import fit_two_stage

MOVIELENS = [
    "data.dataset=movielens-100k",
    "train.epochs=3",
    "train.early_stopping_patience=0",
]
SYNTHETIC = [
    # Flat popularity and 5M rows: every item needs a training row to enter the
    # vocabulary (2M Zipf rows reached 344,228 items); the size built is reported.
    "data.dataset=synthetic:num_users=20000,num_items=1000000,num_interactions=5000000,"
    "popularity_exponent=0.0",
    "data.validation_fraction=0",
    "retrieval.use_side_features=false",
    "retrieval.history_length=20",
    "retrieval.sparse_embeddings=true",
    "train.epochs=1",
    "train.max_steps=300",
    "train.batch_size=1024",
    "train.early_stopping_patience=0",
    "index.kind=hnsw",
]


def build_bundle(name: str, root: Path, *, ranking_epochs: int) -> Path:
    """Train the scenario's model and save it as ``root/<name>/1``.

    ``movielens-100k-retrieval-only`` is the ``movielens-100k`` bundle without its
    ranking stage (built first when needed): what the ranker costs per request.
    """
    if name == "movielens-100k-retrieval-only":
        full = root / "movielens-100k" / "1"
        if not full.exists():
            build_bundle("movielens-100k", root, ranking_epochs=ranking_epochs)
        rec = load(full)
        rec.ranker = None
        return rec.save(root / name / "1")
    overrides = {
        "movielens-100k": MOVIELENS,
        "movielens-100k-session-knn": [
            *MOVIELENS,
            "retrieval.session_knn_weight=0.005",
        ],
    }.get(name, SYNTHETIC)
    config = apply_overrides(ExperimentConfig(), overrides)
    started = time.perf_counter()
    ranking = name.startswith("movielens-100k") and ranking_epochs > 0
    if ranking:
        config = apply_overrides(config, [f"ranking.epochs={ranking_epochs}"])
    stages = fit_two_stage(config, ranking=ranking, evaluate_test=False)
    path = stages.recommender().save(root / name / "1")
    console.print(f"built {path} in {time.perf_counter() - started:.0f} s")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Who runs the worker processes: our SO_REUSEPORT supervisor (`twostage serve
#: --workers`), uvicorn's own (`uvicorn --workers`: one shared socket), or gunicorn
#: with uvicorn workers (a shared socket too).
MANAGERS = ("twostage", "uvicorn", "gunicorn")


def server_command(
    manager: str, root: Path, port: int, workers: int, candidates: int | None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that serve ``root`` with ``manager``."""
    env = dict(os.environ)
    if manager == "twostage":
        return [
            sys.executable,
            "-m",
            "twostage",
            "serve",
            str(root),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--poll-seconds",
            "0.5",
            "--max-k",
            "100",
            *(["--num-candidates", str(candidates)] if candidates else []),
            "--log-level",
            "warning",
        ], env
    from twostage.serving.app import SETTINGS_ENV, ServeSettings, settings_to_env

    settings = ServeSettings(
        models=str(root), max_k=100, poll_seconds=0.5, num_candidates=candidates
    )
    env[SETTINGS_ENV] = settings_to_env(settings)
    app = "twostage.serving.app:app_from_env"
    if manager == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", app, "--factory"),
            *("--port", str(port), "--workers", str(workers)),
            *("--log-level", "warning", "--no-access-log"),
        ], env
    return [
        *(sys.executable, "-m", "gunicorn", f"{app}()"),
        *("-k", "uvicorn_worker.UvicornWorker", "-w", str(workers)),
        *("-b", f"127.0.0.1:{port}", "--log-level", "warning"),
    ], env


def start_server(
    root: Path, port: int, workers: int, candidates: int | None, manager: str
) -> subprocess.Popen[bytes]:
    command, env = server_command(manager, root, port, workers, candidates)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not become healthy within 600 s")


def drive(
    port: int,
    bodies: list[bytes],
    args: argparse.Namespace,
    requests: int,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    client = context.Process(
        target=run_load,
        args=(
            "127.0.0.1",
            port,
            "/v1/recommend",
            bodies,
            args.concurrency,
            requests,
            args.time_cap,
            results,
        ),
    )
    client.start()
    if results.get() != "started":
        raise SystemExit("the load client did not start")
    if on_start is not None:
        on_start()
    outcome = results.get()
    client.join()
    return outcome


#: Client mistakes mixed into the third phase; each must get a 4xx.
HOSTILE = [
    json.dumps(body).encode()
    for body in (
        {"user_id": 1, "k": "5"},
        {"user_id": 1, "k": 10**6},
        {"user_id": 1, "exclude_seen": "no"},
        {"user_id": 1, "colour": "red"},
        {"user_id": 1, "filters": {"no_such_column": 1}},
        {"user_features": {"age": [1, 2]}},
        {"user_id": True},
    )
] + [b'{"user_features": {"age": NaN}}', b'{"user_id": ']


def summarise(outcome: dict[str, Any]) -> dict[str, Any]:
    latencies = np.asarray(outcome["latencies"]) * 1000
    good = np.asarray(outcome.get("good_latencies", outcome["latencies"])) * 1000
    return {
        "requests_by_status": {
            str(k): v for k, v in sorted(outcome.get("statuses", {}).items())
        },
        "good_p99_ms": float(np.percentile(good, 99)) if len(good) else None,
        "requests": len(latencies),
        "rps": len(latencies) / outcome["seconds"],
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "errors": len(outcome["errors"]),
        "error_samples": outcome["errors"][:5],
        "versions": {str(k): v for k, v in sorted(outcome["versions"].items())},
    }


def _wait_for_version(
    port: int, name: str, version: int, *, timeout_s: float = 600.0
) -> None:
    """Poll until 10 answers in a row (any worker) say ``name`` serves ``version``."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 10:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} did not serve version {version} in time")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as response:
            served = json.loads(response.read())["models"].get(name)
        streak = streak + 1 if served == version else 0
        time.sleep(0.2)


def publish(model_dir: Path, source: Path, version: int) -> None:
    """Copy a bundle to a hidden temp dir, then rename it into place (atomic)."""
    temp = model_dir / f".publish-{version}"
    shutil.copytree(source, temp)
    os.rename(temp, model_dir / str(version))


def scenario(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    given = getattr(args, name.replace("-", "_") + "_bundle", None)
    model_dir = root / name
    if given:
        model_dir.mkdir(parents=True)
        shutil.copytree(given, model_dir / "1")
        bundle = model_dir / "1"
    else:
        bundle = build_bundle(name, root, ranking_epochs=args.ranking_epochs)
    users = load(bundle).user_vocab.values.to_list()
    rng = np.random.default_rng(0)
    picks = rng.choice(len(users), size=min(5000, args.requests), replace=True)
    bodies = [json.dumps({"user_id": users[int(i)], "k": 10}).encode() for i in picks]
    port = free_port()
    server = start_server(model_dir, port, args.workers, args.candidates, args.manager)
    try:
        drive(port, bodies, args, min(500, args.requests))  # warm-up
        steady = summarise(drive(port, bodies, args, args.requests))
        # Phase 2: publish version 2 while the load runs; count failures around it.
        timer = threading.Timer(args.swap_after, publish, (model_dir, bundle, 2))
        swap = summarise(drive(port, bodies, args, args.requests, timer.start))
        timer.join()
        # Version 2 may still be loading in the workers (a large catalogue takes
        # longer than phase 2): wait until it serves, so that phase 3 measures the
        # hostile requests and not the background load.
        _wait_for_version(port, name, 2)
        # Phase 3: one hostile request in five, mixed into the same load.
        mixed = [
            HOSTILE[i // 5 % len(HOSTILE)] if i % 5 == 4 else body
            for i, body in enumerate(bodies)
        ]
        hostile = summarise(drive(port, mixed, args, args.requests))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        **{k: steady[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "requests")},
        "swap_errors": swap["errors"],
        "swap_versions_seen": swap["versions"],
        "swap_rps": swap["rps"],
        "swap_p99_ms": swap["p99_ms"],
        "error_samples": steady["error_samples"] + swap["error_samples"],
        "num_items": load(bundle).item_vocab.size - 1,
        "hostile_requests": hostile["requests_by_status"],
        "hostile_5xx": sum(
            n for code, n in hostile["requests_by_status"].items() if int(code) >= 500
        ),
        "hostile_good_p99_ms": hostile["good_p99_ms"],
        "hostile_p99_ratio": (
            hostile["good_p99_ms"] / steady["p99_ms"]
            if hostile["good_p99_ms"] and steady["p99_ms"]
            else None
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument(
        "--scenarios",
        default="movielens-100k,movielens-100k-retrieval-only,synthetic-1m",
        help="comma-separated",
    )
    parser.add_argument("--requests", type=int, default=10_000, help="per phase")
    parser.add_argument("--time-cap", type=float, default=60.0, help="s per phase")
    parser.add_argument("--concurrency", type=int, default=4, help="connections")
    parser.add_argument(
        "--workers", type=int, default=2, help="server processes (2: one per core here)"
    )
    parser.add_argument(
        "--swap-after", type=float, default=2.0, help="s into phase 2 to publish v2"
    )
    parser.add_argument("--ranking-epochs", type=int, default=3)
    parser.add_argument(
        "--num-candidates",
        dest="candidates",
        type=int,
        help="re-ranked per request (default: the bundle's ranking.num_candidates)",
    )
    parser.add_argument(
        "--movielens-100k-bundle", help="use this bundle, not a new one"
    )
    parser.add_argument("--synthetic-1m-bundle", help="use this bundle, not a new one")
    parser.add_argument(
        "--manager",
        choices=MANAGERS,
        default="twostage",
        help="process manager of the workers (uvicorn and gunicorn share one socket)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two threads crawl when another process holds a core
    results = {}
    with tempfile.TemporaryDirectory(prefix="twostage-serve-load-") as temp:
        for name in args.scenarios.split(","):
            results[name] = scenario(name, args, Path(temp))
    rows = [
        [
            name,
            r["num_items"],
            r["rps"],
            r["p50_ms"],
            r["p99_ms"],
            r["errors"],
            r["swap_errors"],
            ", ".join(f"v{k}: {v}" for k, v in r["swap_versions_seen"].items()),
            r["hostile_5xx"],
            r["hostile_p99_ratio"],
        ]
        for name, r in results.items()
    ]
    print_table(
        f"serve load ({args.manager}): {args.concurrency} connections, "
        f"{args.workers} worker(s), "
        f"{args.requests} requests per phase",
        [
            "scenario",
            "items",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "swap errors",
            "swap",
            "hostile 5xx",
            "good p99 / phase 1",
        ],
        rows,
    )
    payload = {
        **results,
        "config": {
            k: v for k, v in vars(args).items() if k != "json" and v is not None
        },
        "machine": machine(),
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
