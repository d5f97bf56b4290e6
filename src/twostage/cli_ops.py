"""Operations commands of the CLI: ``twostage serve`` and ``twostage index build|bench``.

Registered on the main app by :mod:`twostage.cli`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["index_app", "serve_command"]

console = Console()
index_app = typer.Typer(
    help="Build and measure nearest-neighbour indexes.", no_args_is_help=True
)


def serve_command(
    models: Annotated[
        Path,
        typer.Argument(
            help="Directory of <name>/<version>/ bundles (e.g. models/), or one "
            "model's directory; the newest valid version of each model is served."
        ),
    ] = Path("models"),
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int, typer.Option(help="Worker processes (each holds its own models).")
    ] = 1,
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 100,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger request bodies get 413.")
    ] = 64 * 1024,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TWOSTAGE_API_KEY",
            help="Require this key in header X-API-Key on /v1/* and /metrics "
            "(default: off; also read from $TWOSTAGE_API_KEY).",
        ),
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(help="How often to look for new versions (0: never).")
    ] = 5.0,
    torch_threads: Annotated[
        int, typer.Option(help="torch CPU threads per worker.")
    ] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve recommendations over HTTP (FastAPI + uvicorn); docs at /docs, UI at /."""
    import uvicorn

    from twostage.serving.app import SETTINGS_ENV, ServeSettings, settings_to_env
    from twostage.serving.registry import ModelRegistry

    settings = ServeSettings(
        models=str(models),
        max_k=max_k,
        max_body_bytes=max_body_bytes,
        api_key=api_key,
        poll_seconds=poll_seconds,
        torch_threads=torch_threads,
    )
    ModelRegistry(models)  # a wrong path fails here, before uvicorn starts
    os.environ[SETTINGS_ENV] = settings_to_env(settings)
    console.print(f"serving {models} on http://{host}:{port}/ (API docs at /docs)")
    uvicorn.run(
        "twostage.serving.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
    )
