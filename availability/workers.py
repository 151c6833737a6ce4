"""`serve --workers N`: the worker processes, and the parent that relays signals to them.

What a worker serves is handed in (server.serve) rather than imported, so server.py can offer
`serve_workers` without the two modules importing each other."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Coroutine
from dataclasses import replace
from types import FrameType
from typing import Any, Protocol

from .settings import Settings
from .startup import run


class Serve(Protocol):
    """server.serve, as a worker calls it."""

    def __call__(self, settings: Settings, *, reuse_port: bool) -> Coroutine[Any, Any, None]: ...


def _worker(settings: Settings, serve: Serve) -> None:
    from .logs import configure_logging

    # Until serve() takes it, a SIGHUP forwarded by the parent must not end the worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    configure_logging(settings)
    raise SystemExit(run(serve(settings, reuse_port=True)))


def _worker_settings(settings: Settings, index: int) -> Settings:
    """Workers share the gRPC port; each serves its own metrics, worker k on port + k."""
    host, _, port = settings.metrics_address.rpartition(":")
    if not settings.metrics_address or port == "0":
        return settings
    return replace(settings, metrics_address=f"{host}:{int(port) + index}")


def serve_workers(settings: Settings, workers: int, serve: Serve) -> int:
    """N processes sharing the port through SO_REUSEPORT (grpc examples/python/multiprocessing).

    The parent only forwards SIGTERM/SIGINT (and SIGHUP: each worker reloads
    AUTH_CALLERS_FILE) and waits; a worker that dies stops the rest.
    """
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker,
            args=(_worker_settings(settings, i), serve),
            name=f"availability-worker-{i}",
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def reload(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    exit_code = 0
    while processes:
        for process in list(processes):
            process.join(timeout=0.2)
            if process.exitcode is None:
                continue
            processes.remove(process)
            if process.exitcode != 0:
                exit_code = exit_code or 1
                forward(signal.SIGTERM, None)
    return exit_code
