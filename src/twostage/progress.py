"""Progress bars for training, shared by the CLI and the Python API (notebooks
included: rich draws a live widget in Jupyter and a line in a terminal).

A bar is opt-in display, not logging: library functions take an ``on_step``
callback and never draw one themselves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

from twostage.training import ProgressFn

__all__ = ["training_bars"]


@contextlib.contextmanager
def training_bars(
    *labels: str,
    console: Console | None = None,
    also: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[dict[str, ProgressFn]]:
    """One progress bar per stage (per model of a ``retrieval.ensemble``: records
    with a ``member``), each with epoch, loss, throughput, elapsed time and ETA (one
    live display: rich draws one at a time).

    Args:
        labels: the stages, e.g. ``"retrieval", "ranking"``; a bar appears when its
            stage takes its first step.
        console: where to draw; a new rich console when None.
        also: a callback called with every step's record too (the user's hook),
            with ``"stage"`` added.

    Yields:
        ``label -> on_step`` callbacks for the training loops; their records carry
        ``total_steps``, so each bar has a total and an ETA from its first step.
    """
    from rich.progress import (
        BarColumn,
        Progress,
        TaskID,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # An ensemble's models get a bar each ("retrieval 2"), with its own total.
    width = max(len(label) for label in labels) + 3 if labels else 0
    columns = (
        TextColumn(f"{{task.description:<{width}}}"),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
        TextColumn("loss {task.fields[loss]:.4f} {task.fields[rate]:>8,.0f} ex/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def bar(label: str) -> ProgressFn:
            clocks: dict[str, dict[str, float]] = {}

            def on_step(info: dict[str, Any]) -> None:
                now = time.perf_counter()
                name = label
                if "member" in info:  # 1-based, as the logs say
                    name = f"{label} {info['member'] + 1}"
                if name not in tasks:
                    tasks[name] = progress.add_task(
                        name, total=None, epoch=0, epochs="?", loss=0.0, rate=0.0
                    )
                clock = clocks.setdefault(name, {})
                if info["epoch"] != clock.get("epoch"):
                    # Timed from the epoch's first reported step: the examples
                    # after it over the time after it (0 until a second step).
                    clock.update(epoch=info["epoch"], start=now, base=info["examples"])
                elapsed, done = now - clock["start"], info["examples"] - clock["base"]
                rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
                progress.update(
                    tasks[name],
                    total=info.get("total_steps"),
                    completed=info["step"] + 1,
                    epoch=info["epoch"] + 1,  # 1-based, as the logs say
                    epochs=info.get("num_epochs", "?"),
                    loss=info["loss"],
                    rate=rate,
                )
                if also is not None:
                    also({"stage": label, **info})

            return on_step

        yield {label: bar(label) for label in labels}
