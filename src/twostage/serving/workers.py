"""Several uvicorn worker processes, each accepting on its own ``SO_REUSEPORT`` socket.

With one shared listening socket (uvicorn's ``--workers``), the first worker to wake
accepts every pending connection, so a few keep-alive clients (a gateway, a load
balancer's pool) can all land on one worker while the others idle: with two workers
and four connections we measured the same throughput as with one worker. With one
``SO_REUSEPORT`` socket per worker, Linux spreads new connections over the workers.

The parent binds every socket before starting a worker, so a port in use fails at once
with a clear message. It stops all workers on SIGINT/SIGTERM. A worker that exits on its
own (killed, out of memory) is replaced by a new one on the same socket: the socket
stays open and listening in the parent meanwhile, so connections the kernel hands it
wait in its backlog instead of being refused. Workers that keep dying (more than
``max_restarts`` replacements within ``restart_window_s`` seconds: a model that fails
to load, a port the workers cannot use) make the parent stop the others and exit with
an error, for a process manager to see.
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


def run_workers(
    host: str,
    port: int,
    workers: int,
    *,
    log_level: str,
    max_restarts: int = 5,
    restart_window_s: float = 60.0,
) -> int:
    """Serve with ``workers`` processes until SIGINT/SIGTERM; returns the exit code.

    Args:
        host: interface to bind.
        port: TCP port (0: any free port, shared by every worker).
        workers: number of worker processes.
        log_level: uvicorn's log level in the workers.
        max_restarts: dead workers replaced within ``restart_window_s`` before the
            supervisor gives up (0: never replace one).
        restart_window_s: the window ``max_restarts`` counts in, in seconds.

    Returns:
        0 after SIGINT/SIGTERM, 1 when workers kept dying.

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

    def spawn(sock: socket.socket) -> BaseProcess:
        process = context.Process(
            target=_worker, args=(sock, log_level, os.getpid()), daemon=False
        )
        process.start()
        return process

    processes: list[BaseProcess] = []
    restarts: list[float] = []  # when each dead worker was replaced
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    code = 0
    try:
        processes.extend(spawn(sock) for sock in sockets)
        logger.info(
            "%d workers on %s:%d: pids %s",
            workers,
            host,
            port,
            [p.pid for p in processes],
        )
        while not stop.wait(0.5):
            for slot, process in enumerate(processes):
                if process.is_alive() or stop.is_set():
                    continue
                now = time.monotonic()
                restarts[:] = [t for t in restarts if now - t < restart_window_s]
                if len(restarts) >= max_restarts:
                    logger.error(
                        "worker %d exited (code %s); %d worker(s) already replaced "
                        "in the last %g s, so the workers keep dying: stopping the "
                        "others",
                        process.pid,
                        process.exitcode,
                        len(restarts),
                        restart_window_s,
                    )
                    code = 1
                    break
                restarts.append(now)
                processes[slot] = spawn(sockets[slot])
                logger.error(
                    "worker %d exited (code %s); replaced by worker %d",
                    process.pid,
                    process.exitcode,
                    processes[slot].pid,
                )
            if code:
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
