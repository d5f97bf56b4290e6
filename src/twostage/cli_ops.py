"""Operations commands of the CLI: ``twostage serve``, ``twostage index build|bench``,
``twostage add-items`` and ``twostage remove-items``.

Registered on the main app by :mod:`twostage.cli`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

__all__ = [
    "add_items_command",
    "index_app",
    "remove_items_command",
    "restore_items_command",
    "serve_command",
]

from twostage.cli_group import OnceGroup, joined
from twostage.cli_output import JsonOutput, console, print_json, status_console

#: ``--out`` of the commands that save a changed bundle.
NextVersion = Annotated[
    Path | None,
    typer.Option(help="Where to save (default: the next version of the model)."),
]

index_app = typer.Typer(
    cls=OnceGroup,
    help="Build and measure nearest-neighbour indexes.",
    no_args_is_help=True,
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
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="TCP port (1 to 65535).")
    ] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes, each holding its own models; on Linux each "
            "accepts on its own SO_REUSEPORT socket, so connections spread over them, "
            "and a worker that dies is replaced (the server exits with an error if "
            "workers keep dying).",
        ),
    ] = 1,
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 100,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger request bodies get 413.")
    ] = 64 * 1024,
    max_instances: Annotated[
        int, typer.Option(help="Most users one :predict request may ask for (413).")
    ] = 100,
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
    num_candidates: Annotated[
        int | None,
        typer.Option(
            help="Retrieved items the ranking stage re-scores per request "
            "that does not say (default: the bundle's ranking.num_candidates)."
        ),
    ] = None,
    max_num_candidates: Annotated[
        int,
        typer.Option(
            help="Most candidates a request's own num_candidates may ask for "
            "(a wider pool for max_per or diversity costs time per request)."
        ),
    ] = 1000,
    widening: Annotated[
        int,
        typer.Option(
            help="How many times wider than its num_candidates a list max_per "
            "leaves short may be picked from (1: never; each widening costs the "
            "ranker on the wider pool)."
        ),
    ] = 16,
    docs: Annotated[
        bool,
        typer.Option(
            help="Serve /docs (Swagger UI from local files) and /openapi.json (open even with --api-key: "
            "they describe the API, not the models)."
        ),
    ] = True,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve recommendations over HTTP (FastAPI + uvicorn); docs at /docs, UI at /."""
    import uvicorn

    from twostage.serving.app import SETTINGS_ENV, ServeSettings, settings_to_env
    from twostage.serving.registry import ModelRegistry
    from twostage.serving.workers import reuse_port_supported, run_workers

    settings = ServeSettings(
        models=str(models),
        max_k=max_k,
        max_body_bytes=max_body_bytes,
        api_key=api_key,
        poll_seconds=poll_seconds,
        torch_threads=torch_threads,
        num_candidates=num_candidates,
        max_num_candidates=max_num_candidates,
        widening=widening,
        max_instances=max_instances,
        docs=docs,
    )
    ModelRegistry(models)  # a wrong path fails here, before uvicorn starts
    if not (workers > 1 and reuse_port_supported()):  # those bind below, and say so
        _check_port_free(host, port)
    os.environ[SETTINGS_ENV] = settings_to_env(settings)
    console.print(
        f"serving {escape(str(models))} on http://{host}:{port}/ (API docs at /docs)"
    )
    if workers > 1 and reuse_port_supported():
        try:
            code = run_workers(host, port, workers, log_level=log_level)
        except OSError as e:
            raise typer.BadParameter(
                f"cannot listen on {host}:{port}: {e}", param_hint="--port"
            ) from e
        raise typer.Exit(code)
    uvicorn.run(
        "twostage.serving.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
    )


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port something else listens on before the models load: uvicorn
    would load them all, then exit 3 with a line of its own."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise typer.BadParameter(
            f"cannot resolve {host!r}: {e}", param_hint="--host"
        ) from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn
        try:
            probe.bind(address)
        except OSError as e:
            raise typer.BadParameter(
                f"cannot listen on {host}:{port}: {e.strerror or e}.",
                param_hint="--port",
            ) from e


def _open(bundle: Path) -> tuple[Path, Any]:
    from twostage.artifacts import resolve_bundle
    from twostage.recommender import load
    from twostage.retrieval.run import RUN_WEIGHTS

    if (bundle / RUN_WEIGHTS).exists():  # resolve_bundle would say "no version"
        raise typer.BadParameter(
            f"{str(bundle)!r} is a training run (the --out of `twostage train "
            "retrieval`); the index commands work on bundles, models/<name>/<version>/ "
            "(`twostage train --out models/<name>/1`).",
            param_hint="BUNDLE",
        )
    path = resolve_bundle(bundle)
    return path, load(path)


def _new_version(source: Path, out: Path | None) -> Path:
    """Where a command that changes the bundle at ``source`` saves the result:
    ``--out``, else the next version beside it (``models/<name>/<n+1>``).

    Raises:
        typer.BadParameter: no ``--out`` for a bundle saved without a version
            number, where the next version "beside it" would be a version of
            its parent folder.
    """
    from twostage.artifacts import is_version_name, next_version, versioning_hint

    if out is not None:
        return out
    if not is_version_name(source.name):
        raise typer.BadParameter(
            f"{str(source)!r} is a bundle saved without a version number (not "
            "models/<name>/<n>/), so no next version sits beside it: pass --out "
            f"for the new bundle. {versioning_hint(source)}",
            param_hint="--out",
        )
    return next_version(source.parent)


@index_app.command("build")
def index_build(
    bundle: Annotated[
        Path, typer.Argument(help="A saved bundle, or a model directory (newest).")
    ],
    kind: Annotated[
        str, typer.Option(help="exact, hnsw, ivf, ivf_sq or scann (optional extra).")
    ] = "hnsw",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Index setting, e.g. --set index.ef_search=128 (the index section "
            "of the config; `ef_search=128` works too).",
        ),
    ] = None,
    out: NextVersion = None,
) -> None:
    """Rebuild a bundle's index and save the result as a new version."""
    from twostage.config import apply_overrides

    source, rec = _open(bundle)
    target = _new_version(source, out)
    settings = [item.removeprefix("index.") for item in set_ or []]
    config = apply_overrides(rec.run.config.index, [f"kind={kind}", *settings])
    kind = config.kind  # `--set kind=...` has the last word, as any --set
    # make_index logs the settings this kind does not read.
    started = time.perf_counter()
    with status_console.status(
        f"building the {kind} index over {rec.index.size:,} items"
    ):
        rebuilt = rec.with_index(config)
    seconds = time.perf_counter() - started
    rebuilt.save(target)
    console.print(
        f"built the {kind} index in {seconds:.1f} s; saved {escape(str(target))}"
    )
    if kind != "exact" and rebuilt.user_vocab.size > 1:
        width = min(100, rec.index.size)
        found = rebuilt.index_recall(width, 1000)
        console.print(
            f"Recall@{width} against exact search, 1,000 known users' queries at "
            f"most: {found:.4f}."
            + (
                " Lists will miss items exact search finds: raise "
                f"{'ef_search' if kind == 'hnsw' else 'nprobe'} "
                f"(`twostage index bench BUNDLE --kind {kind} --set ...` measures "
                "it first)."
                if found < 0.95
                else ""
            )
        )


def add_items_command(
    bundle: Annotated[
        Path, typer.Argument(help="A saved bundle, or a model directory (newest).")
    ],
    items: Annotated[
        Path,
        typer.Option(
            "--items",
            help="CSV, TSV or Parquet file of the items to add: a header naming "
            "the ID column (item_id, or the training item table's key, as "
            "--item-col or data.item_table_key named it) and every item feature "
            "column the model reads (`twostage info` lists them; empty where "
            "unknown), then a row per item; other columns (title, tags...) are "
            "kept as metadata.",
        ),
    ],
    out: NextVersion = None,
    json_output: JsonOutput = False,
) -> None:
    """Add items the model never trained on to a bundle's catalogue, without
    retraining, and save the result as a new version.

    Each item is embedded from its features (its ID at the unknown row), indexed
    beside the trained items and ranked from the same features: retrieved,
    filtered by its metadata and found by `similar` from then on. The model's
    weights do not change; a server polling the model directory picks the new
    version up.
    """
    import numpy as np

    from twostage.catalogue import item_keys, read_item_rows
    from twostage.errors import TwostageError

    source, rec = _open(bundle)
    target = _new_version(source, out)
    try:
        table = read_item_rows(items, item_keys(rec.run.config.data))
        started = time.perf_counter()
        with status_console.status(f"adding {table.height:,} items"):
            grown = rec.add_items(table)
    except (TwostageError, OSError) as e:
        message = str(e).replace("`items`", f"`--items` {str(items)!r}", 1)
        raise typer.BadParameter(message, param_hint="--items") from e
    seconds = time.perf_counter() - started
    grown.save(target)
    trained = grown.num_trained_items - 1
    added = grown.item_vocab.size - 1 - trained
    before = rec.index.ids
    # An approximate index grows by the new vectors; an exact one is built again.
    index = (
        "grown"
        if not rec.index.is_exact
        and np.array_equal(grown.index.ids[: len(before)], before)
        else "built"
    )
    if json_output:
        print_json(
            {
                "saved": str(target),
                "added": table.height,
                "added_in_all": added,
                "trained_items": trained,
                "index": index,
                "seconds": seconds,
            }
        )
        return
    console.print(
        f"added {table.height:,} items in {seconds:.1f} s (the {grown.index_kind} "
        f"index {index} with them): the catalogue holds {trained:,} trained and "
        f"{added:,} added items; saved {escape(str(target))}"
    )


BundleOfItems = Annotated[
    Path, typer.Argument(help="A saved bundle, or a model directory (newest).")
]
ItemIdList = Annotated[
    list[str] | None,
    typer.Option(
        "--ids",
        help="Item IDs separated by commas, e.g. 50,172 (or repeated: --ids 50 "
        "--ids 172).",
    ),
]
ItemIdFile = Annotated[
    Path | None,
    typer.Option(
        "--items",
        help="CSV, TSV or Parquet file with an item_id column: the items (other "
        "columns are not read).",
    ),
]


def _listed_items(
    ids_given: list[str] | None, items: Path | None
) -> tuple[str, Callable[[], list[Any]]]:
    """The flag that names the items of ``remove-items`` / ``restore-items``
    and how to read them (``--ids``, repeated: all of them, in order; or the
    ``item_id`` column of ``--items``)."""
    from twostage.catalogue import read_item_rows

    ids = joined(ids_given)
    if (ids is None) == (items is None):
        raise typer.BadParameter("give --ids or --items (one of them).")
    if ids is not None:
        return "--ids", lambda: [part.strip() for part in ids.split(",")]
    assert items is not None
    return "--items", lambda: read_item_rows(items)["item_id"].to_list()


def _change_served(
    bundle: Path,
    ids_given: list[str] | None,
    items: Path | None,
    out: Path | None,
    json_output: bool,
    *,
    restore: bool,
) -> None:
    """``remove-items`` (``restore``: ``restore-items``): the listed items
    leave the served catalogue (or return to it) in a new version."""
    from twostage.errors import TwostageError

    flag, read = _listed_items(ids_given, items)
    source, rec = _open(bundle)
    target = _new_version(source, out)
    try:
        given = read()
        changed = rec.restore_items(given) if restore else rec.remove_items(given)
    except (TwostageError, OSError) as e:
        message = str(e).replace("`item_ids`", f"`{flag}`", 1)
        raise typer.BadParameter(message, param_hint=flag) from e
    changed.save(target)
    removed = 0 if changed.removed_items is None else len(changed.removed_items)
    served = changed.index.size
    verb = "restored" if restore else "removed"
    if json_output:
        print_json(
            {
                "saved": str(target),
                verb: len(given),
                "removed_in_all": removed,
                "served_items": served,
            }
        )
        return
    console.print(
        f"{verb} {len(given):,} items: the catalogue serves {served:,} "
        f"({removed:,} removed in all); saved {escape(str(target))}"
    )


def remove_items_command(
    bundle: BundleOfItems,
    ids_given: ItemIdList = None,
    items: ItemIdFile = None,
    out: NextVersion = None,
    json_output: JsonOutput = False,
) -> None:
    """Stop serving items (discontinued products, expired news) without
    retraining, and save the result as a new version.

    They leave the index, the popularity fallback and every answer; the model
    still reads them as history (a user's items, a session's). A client that
    lists one among its candidates gets an error that names it.
    """
    _change_served(bundle, ids_given, items, out, json_output, restore=False)


def restore_items_command(
    bundle: BundleOfItems,
    ids_given: ItemIdList = None,
    items: ItemIdFile = None,
    out: NextVersion = None,
    json_output: JsonOutput = False,
) -> None:
    """Serve again items `remove-items` took out (back in stock, in season),
    and save the result as a new version: they return to the index, the
    popularity fallback and every answer, as before their removal.
    """
    _change_served(bundle, ids_given, items, out, json_output, restore=True)


@index_app.command("bench")
def index_bench(
    bundle: Annotated[
        Path, typer.Argument(help="A saved bundle, or a model directory (newest).")
    ],
    kinds: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            "--kinds",
            help="Backends to compare with exact: repeat --kind or give a "
            "comma-separated list (default: exact,hnsw,ivf).",
        ),
    ] = None,
    k: Annotated[
        int, typer.Option("-k", "--k", help="List length for recall@k.")
    ] = 100,
    num_queries: Annotated[
        int,
        typer.Option(
            min=1,
            help="Known users used as queries (at most; spread evenly over the "
            "model's users, as `index build` measures its index).",
        ),
    ] = 1000,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Index setting for every backend measured, e.g. --set nprobe=128 "
            "(as `index build` takes them; a backend that does not read one says "
            "so). Unset: each backend's defaults.",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the figures as JSON on stdout.")
    ] = False,
) -> None:
    """Recall@k against exact search, latency and throughput of each backend."""
    import torch
    from rich.table import Table

    from twostage.config import IndexConfig, apply_overrides
    from twostage.index import make_index
    from twostage.index.measure import measure_search

    settings = [item.removeprefix("index.") for item in set_ or []]
    if any(item.partition("=")[0].strip() == "kind" for item in settings):
        raise typer.BadParameter(
            "the backends are named by --kind, not by a setting.", param_hint="--set"
        )
    names = [n.strip() for item in kinds or ["exact,hnsw,ivf"] for n in item.split(",")]
    if not all(names):
        raise typer.BadParameter(
            f"should be backends separated by commas, without empty items. Received: "
            f"{','.join(kinds or [])!r}.",
            param_hint="--kind",
        )
    # checked before the bundle loads: an unknown kind or setting costs nothing
    configs = {
        kind: apply_overrides(IndexConfig(), [f"kind={kind}", *settings])
        for kind in names
    }
    _, rec = _open(bundle)
    torch.set_num_threads(1)
    num_items = rec.item_embeddings.shape[0]
    items, ids = rec.item_embeddings[1:], torch.arange(1, num_items)
    queries = rec._queries_of(rec._spread_users(num_queries)).contiguous()
    width = min(k, num_items - 1)
    truth = make_index(IndexConfig()).build(items, ids).search(queries, width)[1]
    table = Table(title=f"{len(queries)} queries, {num_items - 1:,} items, k={width}")
    for column in ("backend", "build s", f"recall@{width}", "p50 ms", "p99 ms", "q/s"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    rows: dict[str, Any] = {}
    for kind, config in configs.items():
        started = time.perf_counter()
        index = make_index(config).build(items, ids)  # logs settings it does not read
        built = time.perf_counter() - started
        row = measure_search(index, queries, truth)
        rows[kind] = {"build_seconds": built, **row}
        table.add_row(
            kind,
            f"{built:.2f}",
            f"{row['recall_at_k']:.4f}",
            f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['batched_qps']:,.0f}",
        )
    if json_output:
        print_json(
            {
                "k": width,
                "num_queries": len(queries),
                "settings": settings,
                "backends": rows,
            }
        )
        return
    console.print(table)
    if settings:
        console.print(f"Settings: {escape(', '.join(settings))}.")
