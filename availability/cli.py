"""`availability serve | migrate | demo | dev`: the console script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from .dev import DEV_ENV
from .logs import configure_logging
from .settings import Settings, SettingsError

log = logging.getLogger("availability")


def _settings(env: dict[str, str] | None = None) -> Settings:
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        print(f"availability: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _progress_bar(total: int) -> Callable[[int], None]:
    width = 30

    def show(done: int) -> None:
        filled = width * done // total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} mitras")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


async def _migrate(settings: Settings) -> None:
    """Waits for Postgres like `serve` does (STARTUP_TIMEOUT_SECONDS): a migration job is
    started by the same orchestrator, as early."""
    from .server import StartupDeadline
    from .truth import Truth

    deadline = StartupDeadline(settings.startup_timeout_seconds)
    truth = await deadline.retry(lambda: Truth.connect(settings))
    try:
        applied = await deadline.retry(truth.migrate)
    finally:
        await truth.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'schema up to date'}")


async def _demo(settings: Settings, mitras: int, online_share: float, only_if_empty: bool) -> None:
    from .truth import Truth

    truth = await Truth.connect(settings)
    try:
        await truth.migrate()
        if only_if_empty and await truth.mitra_count() > 0:
            print("demo fleet already loaded")
            return
        await truth.insert_demo_fleet(mitras, online_share, _progress_bar(mitras))
    finally:
        await truth.close()
    print(f"loaded {mitras} demo mitras")


def _status_env(data_dir: str) -> dict[str, str]:
    """The environment, completed from what `availability dev` (make run) wrote under its data
    folder when DATABASE_URL or VALKEY_URL is unset: status then finds the local stores."""
    env = dict(os.environ)
    written = Path(data_dir) / DEV_ENV
    if written.exists() and not (env.get("DATABASE_URL") and env.get("VALKEY_URL")):
        for line in written.read_text().splitlines():
            name, _, value = line.partition("=")
            if not env.get(name):
                env[name] = value
    return env


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _status(args: argparse.Namespace) -> int:
    from .status import gather, render, watch

    settings = _settings(_status_env(args.data_dir))
    credentials = None
    if args.ca_file:
        credentials = grpc.ssl_channel_credentials(
            _read(args.ca_file), _read(args.key_file), _read(args.cert_file)
        )
    token = settings.auth_tokens[0] if settings.auth_tokens else None
    asked = {
        "address": args.address or settings.grpc_address,
        "token": token,
        "credentials": credentials,
        "timeout": args.timeout,
    }
    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(watch(settings, **asked))
        return 0
    report = asyncio.run(gather(settings, **asked))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="availability", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    commands.add_parser("migrate", help="apply the schema (idempotent)")
    demo = commands.add_parser("demo", help="load a realistic demo fleet")
    demo.add_argument("--mitras", type=int, default=1000)
    demo.add_argument("--online-share", type=float, default=0.6)
    demo.add_argument("--if-empty", action="store_true", help="only when there are no mitras")
    demo.add_argument(
        "--live",
        action="store_true",
        help="then drive the fleet as real traffic against GRPC_ADDRESS until Ctrl-C"
        " (loads it only when there are no mitras)",
    )
    dev = commands.add_parser(
        "dev", help="serve with local Postgres/Valkey started under --data-dir when unset"
    )
    dev.add_argument("--data-dir", default=".data")
    dev.add_argument("--demo-mitras", type=int, default=200, help="0: no demo and no traffic")
    dev.add_argument(
        "--reset",
        action="store_true",
        help="start the demo again: empty the database's tables and the mirror's keys first",
    )
    status = commands.add_parser(
        "status",
        help="health, counts, sweeps, leaders, drift and degraded stores of a running deployment",
    )
    status.add_argument("--address", help="a server to ask (default GRPC_ADDRESS)")
    status.add_argument("--json", action="store_true", help="one JSON document")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds for each store")
    status.add_argument("--ca-file", help="TLS: the CA that signed the server's certificate")
    status.add_argument("--cert-file", help="mutual TLS: this client's certificate chain")
    status.add_argument("--key-file", help="mutual TLS: this client's key")
    status.add_argument("--data-dir", default=".data", help="where `availability dev` runs")
    status.add_argument(
        "--watch",
        action="store_true",
        help="a live view redrawn every second, with calls/s by method; Ctrl-C quits",
    )
    args = parser.parse_args(argv)

    if args.command == "dev":
        from .dev import run_dev

        return run_dev(str(args.data_dir), int(args.demo_mitras), bool(args.reset))
    if args.command == "status":
        if args.watch and args.json:
            parser.error("--watch draws for a person; --json is for scripts")
        return _status(args)
    settings = _settings()
    configure_logging(settings)
    if args.command == "serve":
        if args.workers < 1:
            parser.error("--workers must be >= 1")
        if args.workers > 1:
            from .server import serve_workers

            return serve_workers(settings, args.workers)
        from .server import run
        from .server import serve as serve_forever

        return run(serve_forever(settings))
    if args.command == "migrate":
        from .server import run

        return run(_migrate(settings))
    if args.command == "demo":
        if args.mitras < 1:
            parser.error("--mitras must be >= 1")
        asyncio.run(_demo(settings, args.mitras, args.online_share, args.if_empty or args.live))
        if args.live:
            from .demo_traffic import drive

            print(f"driving the demo fleet against {settings.grpc_address}; Ctrl-C stops")
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(drive(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
