"""One local server as a child process: launched behind setpriv, signalled as a whole tree,
stopped for sure when the Python process that started it goes away, on a port picked free.

Postgres and Valkey differ only in how they are prepared, spawned and asked whether they are
ready; the rest (start, stop, kill, pause, resume, retrying a port someone took) is here once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, TypeVar

_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3


class LocalStoreError(RuntimeError):
    """A local server would not start; the message ends with its log so the cause is visible."""


class _PortTaken(LocalStoreError):
    """Another process took the port between `free_port()` and the server binding it."""


_KNOWN_PORTS = frozenset({5432, 6379, 26379, 9090})
_LOWEST_PORT = 10000


def _ephemeral_low() -> int:
    """Where the kernel's ephemeral port range starts."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port nobody listens on right now, picked at random below the kernel's
    ephemeral range: a port from that range (bind to port 0) may become the local end of some
    outgoing connection (to Postgres, to Valkey) before the server meant to listen on it
    binds it, and then the server cannot (seen with six test workers: a metrics port taken).
    Keeps clear of the well-known ports of Postgres, Valkey, Sentinel and Prometheus."""
    low = _ephemeral_low()
    if low - _LOWEST_PORT >= 1000:
        for _ in range(100):
            port = random.randrange(_LOWEST_PORT, low)
            if port in _KNOWN_PORTS:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((_HOST, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        picked: int = sock.getsockname()[1]
        return picked


def _process_table() -> dict[int, int]:
    """pid -> parent pid for every process, read from /proc (or `ps` where there is none)."""
    table: dict[int, int] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            table[int(entry.name)] = int(fields[1])
        return table
    listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        pid, ppid = line.split()
        table[int(pid)] = int(ppid)
    return table


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`: Postgres backends call setsid(), so a process-group signal
    would miss them."""
    table = _process_table()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in table.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _gone(pid: int) -> bool:
    """Whether `pid` has exited. Orphans may linger as zombies, since PID 1 in a container
    does not always reap them, but a zombie holds no port, memory or lock."""
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return status.rpartition(")")[2].split()[0] in ("Z", "X")


def _wait_gone(pids: Iterable[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(pids)
    while waiting and time.monotonic() < deadline:
        waiting = [pid for pid in waiting if not _gone(pid)]
        if waiting:
            time.sleep(0.01)


def _launch(
    command: list[str], account: pwd.struct_passwd | None, death: signal.Signals | None
) -> list[str]:
    """`command` behind setpriv, which switches to `account` (when we are root) and asks Linux
    to send `death` to the server when its parent goes away, after the exec.

    Doing either in the child of a fork (Popen's user= and preexec_fn) makes subprocess fork()
    this whole process, and fork() runs the fork handlers of the C libraries loaded here. gRPC's
    fail in the child while its threads are busy, so the server never starts (118 of 300 starts
    beside gRPC traffic). With nothing left to do before the exec, subprocess uses vfork(),
    which runs no handlers. The death signal is tied to the thread that started the server, so
    it is only armed from the main thread: a server started from a worker thread would
    otherwise die with the thread. Without setpriv the server starts without it, and only the
    exit hook stops it; root needs setpriv to start Postgres at all.
    """
    prefix: list[str] = []
    if account is not None:
        prefix += [f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    if (
        death is not None
        and sys.platform.startswith("linux")
        and threading.current_thread() is threading.main_thread()
    ):
        prefix += ["--pdeathsig", death.name]
    if not prefix:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if account is not None:
            raise LocalStoreError("running Postgres as root needs setpriv (util-linux)")
        return command
    return [setpriv, *prefix, "--", *command]


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


_live: dict[int, _LocalServer] = {}
_owner = os.getpid()


@atexit.register
def _stop_leftovers() -> None:
    """Stops servers a caller forgot; a forked child must not stop its parent's servers."""
    if os.getpid() != _owner:
        return
    for server in list(_live.values()):
        with contextlib.suppress(Exception):
            server.stop(timeout=10.0)


@dataclass(eq=False)
class _LocalServer:
    """What Postgres and Valkey share: one child process, and signals to its whole tree."""

    data_dir: Path
    port: int
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    _name: ClassVar[str] = "server"
    _stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    _start_timeout: ClassVar[float] = 30.0

    @property
    def pid(self) -> int | None:
        """The server's main process, while one is running."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self._name}.log"

    def start(self) -> None:
        """Starts the server on the same port and data directory, returning once it answers;
        a no-op while it runs, so a test can call it without knowing the state."""
        if self.running:
            return
        self._prepare()
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
            log.flush()
            process = self._spawn(log)
        self._process = process
        _live[id(self)] = self
        deadline = time.monotonic() + self._start_timeout
        while not self._ready(process):
            code = process.poll()
            if code is not None or time.monotonic() > deadline:
                self.kill()
                tail = _log_tail(self.log_path)
                error = _PortTaken if "Address already in use" in tail else LocalStoreError
                state = "timed out" if code is None else f"exited with {code}"
                raise error(f"{self._name} on port {self.port} {state}; log:\n{tail}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        """Shuts down the way the server prefers and waits, killing it if that takes too long;
        a no-op when it is not running."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _signal([process.pid], self._stop_signal)
            _signal([*_descendants(process.pid), process.pid], signal.SIGCONT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._forget()

    def kill(self) -> None:
        """SIGKILLs the server and every process under it, as a crash or an OOM kill would, and
        waits until they are gone so that `start()` finds the port and data directory free.

        The main process is stopped first so it cannot fork a new child while the rest die.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _signal([process.pid], signal.SIGSTOP)
            tree = _descendants(process.pid)
            _signal([*tree, process.pid], signal.SIGKILL)
            process.wait()
            _wait_gone(tree)
        self._forget()

    def pause(self) -> None:
        """SIGSTOPs the server and everything under it: connections stay open and new ones are
        queued by the kernel, but nothing answers, which is how a hung server looks."""
        process = self._require_running()
        _signal([process.pid], signal.SIGSTOP)
        _signal(_descendants(process.pid), signal.SIGSTOP)

    def resume(self) -> None:
        """Lets a paused server carry on where it stopped."""
        process = self._require_running()
        _signal(_descendants(process.pid), signal.SIGCONT)
        _signal([process.pid], signal.SIGCONT)

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            raise LocalStoreError(f"{self._name} on port {self.port} is not running")
        return self._process

    def _forget(self) -> None:
        self._process = None
        _live.pop(id(self), None)

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ready(self, process: subprocess.Popen[bytes]) -> bool:
        raise NotImplementedError


_S = TypeVar("_S", bound=_LocalServer)


def _start_on_port(make: Callable[[int], _S], port: int | None) -> _S:
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(attempts):
        server = make(port if port is not None else free_port())
        try:
            server.start()
        except _PortTaken:
            if attempt == attempts - 1:
                raise
            continue
        return server
    raise AssertionError("unreachable")
