"""Several uvicorn worker processes, each accepting on its own ``SO_REUSEPORT`` socket.

With one shared listening socket (uvicorn's ``--workers``), the first worker to wake
accepts every pending connection, so a few keep-alive clients (a gateway, a load
balancer's pool) can all land on one worker while the others idle: with two workers
and four connections we measured the same throughput as with one worker. With one
``SO_REUSEPORT`` socket per worker, Linux spreads new connections over the workers.

The parent binds every socket before starting a worker, so a port in use fails at once
with a clear message. It stops all workers on SIGINT/SIGTERM; if a worker exits on its
own, it stops the others and exits with an error, for a process manager to restart.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess

logger = logging.getLogger(__name__)

__all__ = ["reuse_port_supported", "run_workers"]

#: The app factory every worker imports (reads its settings from the environment).
APP = "twostage.serving.app:app_from_env"


def reuse_port_supported() -> bool:
    """Whether the kernel balances connections over ``SO_REUSEPORT`` sockets (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT`` set (not listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _worker(sock: socket.socket, log_level: str, parent: int) -> None:
    import uvicorn

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()

    config = uvicorn.Config(APP, factory=True, log_level=log_level, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def _exit_with_parent(parent: int) -> None:
    """Shut this worker down gracefully once its supervisor is gone (even killed by
    SIGKILL, which leaves it no chance to stop its workers): no orphan keeps the port."""
    while os.getppid() == parent:
        time.sleep(1.0)
    logger.warning(
        "the supervisor (pid %d) is gone; stopping worker %d", parent, os.getpid()
    )
    os.kill(os.getpid(), signal.SIGTERM)


def run_workers(host: str, port: int, workers: int, *, log_level: str) -> int:
    """Serve with ``workers`` processes until SIGINT/SIGTERM; returns the exit code.

    Raises:
        OSError: ``host:port`` cannot be bound (e.g. in use by another program).
    """
    sockets = []
    try:
        for _ in range(workers):
            sockets.append(bind_reuse_port(host, port))
            if port == 0:  # every socket must share the port the first one got
                port = sockets[0].getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = [
        context.Process(
            target=_worker, args=(sock, log_level, os.getpid()), daemon=False
        )
        for sock in sockets
    ]
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    code = 0
    try:
        for process in processes:
            process.start()
        logger.info(
            "%d workers on %s:%d: pids %s",
            workers,
            host,
            port,
            [p.pid for p in processes],
        )
        while not stop.wait(0.5):
            dead = [p for p in processes if not p.is_alive()]
            if dead:
                logger.error(
                    "worker(s) %s exited (codes %s); stopping the others",
                    [p.pid for p in dead],
                    [p.exitcode for p in dead],
                )
                code = 1
                break
    finally:
        _stop(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
    return code


def _stop(processes: list[BaseProcess], timeout_s: float = 30.0) -> None:
    """SIGTERM (uvicorn's graceful shutdown), then SIGKILL what is still running."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()
