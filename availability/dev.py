"""`availability dev` (what `make run` runs): serve on a laptop with no setup.

Starts a local Postgres and Valkey under the data folder when DATABASE_URL / VALKEY_URL are
unset, migrates, loads a small demo fleet the first time (again after `--reset`), serves
with the demo's traffic beside the server (demo_traffic.py) so the fleet stays alive, and
stops what it started on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from contextlib import ExitStack, suppress
from pathlib import Path

import asyncpg

from .local_stores import start_postgres, start_valkey
from .logs import configure_logging
from .settings import Settings, SettingsError

_DATABASE = "availability"
DEV_ENV = "dev.env"
"""Written under the data folder while `availability dev` runs: what `availability status`
needs to find the stores it started."""


async def _ensure_database(admin_dsn: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", _DATABASE):
            await conn.execute(f'CREATE DATABASE "{_DATABASE}"')
    finally:
        await conn.close()
    return admin_dsn.rpartition("/")[0] + f"/{_DATABASE}"


async def _prepare(settings: Settings, demo_mitras: int, reset: bool) -> str | None:
    """Migrate, (empty both stores,) load the demo fleet once; returns one online mitra id
    to try."""
    from .mirror import Mirror, connect_valkey
    from .truth import Truth

    truth = await Truth.connect(settings)
    try:
        await truth.migrate()
        if reset:
            await truth.empty()
            mirror = Mirror(connect_valkey(settings), settings)
            try:
                keys = await mirror.clear()
            finally:
                await mirror.close()
            print(
                f"reset: emptied the tables of database {settings.database_url.rsplit('/', 1)[-1]}"
                f" and {keys} keys of prefix {settings.valkey_key_prefix} in Valkey",
                file=sys.stderr,
            )
        if demo_mitras and await truth.mitra_count() == 0:
            print(f"loading a demo fleet of {demo_mitras} mitras", file=sys.stderr)
            await truth.insert_demo_fleet(demo_mitras, 0.6, lambda done: None)
        return await truth.sample_online_mitra()
    finally:
        await truth.close()


def _grpcurl() -> str:
    local = Path(sys.executable).parent / "grpcurl"
    return str(local) if local.exists() else (shutil.which("grpcurl") or "grpcurl")


async def _serve(settings: Settings, live: bool) -> None:
    """Serve until Ctrl-C or SIGTERM; live: with the demo traffic beside, which stops with
    the server."""
    from .demo_traffic import drive
    from .server import serve

    traffic = asyncio.create_task(drive(settings), name="demo-traffic") if live else None
    try:
        await serve(settings)
    finally:
        if traffic is not None:
            traffic.cancel()
            with suppress(asyncio.CancelledError):
                await traffic


def run_dev(data_dir: str, demo_mitras: int, reset: bool = False) -> int:
    env = dict(os.environ)
    folder = Path(data_dir).resolve()
    with ExitStack() as stores:
        if not env.get("DATABASE_URL"):
            postgres = start_postgres(folder / "postgres")
            stores.callback(postgres.stop)
            env["DATABASE_URL"] = asyncio.run(_ensure_database(postgres.dsn))
            print(f"started Postgres at {env['DATABASE_URL']}", file=sys.stderr)
        if not env.get("VALKEY_URL"):
            valkey = start_valkey(folder / "valkey")
            stores.callback(valkey.stop)
            env["VALKEY_URL"] = valkey.url
            print(f"started Valkey at {valkey.url}", file=sys.stderr)
        try:
            settings = Settings.from_env(env)
        except SettingsError as exc:
            print(f"availability: bad setting: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings)
        folder.mkdir(parents=True, exist_ok=True)
        written = folder / DEV_ENV
        written.write_text(
            "".join(
                f"{name}={env[name]}\n"
                for name in ("DATABASE_URL", "VALKEY_URL", "GRPC_ADDRESS", "VALKEY_KEY_PREFIX")
                if env.get(name)
            )
        )
        stores.callback(written.unlink, missing_ok=True)
        sample = asyncio.run(_prepare(settings, demo_mitras, reset))
        address = settings.grpc_address
        print(
            "\nTry it:\n"
            f"  {_grpcurl()} -plaintext {address} list\n"
            f"  {_grpcurl()} -plaintext -d '{{}}' {address} "
            "availability.v1.AvailabilityService/CountAvailableMitras\n"
            + (
                f'  {_grpcurl()} -plaintext -d \'{{"mitra_id": "{sample}"}}\' {address} '
                "availability.v1.AvailabilityService/GetMitraStatus\n"
                if sample
                else ""
            )
            + f"  {Path(sys.executable).parent / 'availability'} status --watch\n"
            + (
                "The demo is live: apps heartbeat, go online and offline, chats come and go"
                " (a log line every 30 s says what it did).\n"
                "`availability dev --reset` (make reset) starts the demo data again.\n"
                if demo_mitras
                else ""
            )
            + "Ctrl-C stops the server and the local stores.\n",
            file=sys.stderr,
        )
        with suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings, live=demo_mitras > 0))
    return 0
