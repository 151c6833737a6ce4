"""`availability serve | migrate | demo | dev | status | audit | grants | hash-token`: the console
script."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

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


async def _migrate(settings: Settings, contract: bool) -> None:
    """Waits for Postgres like `serve` does (STARTUP_TIMEOUT_SECONDS): a migration job is
    started by the same orchestrator, as early."""
    from .server import StartupDeadline
    from .truth import Truth

    deadline = StartupDeadline(settings.startup_timeout_seconds)
    truth = await deadline.retry(lambda: Truth.connect(settings))
    try:
        applied = await deadline.retry(lambda: truth.migrate(contract=contract))
        pending = await truth.pending_contract_steps()
    finally:
        await truth.close()
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'schema up to date'}")
    if pending:
        print(
            f"{len(pending)} contract step(s) pending ({', '.join(pending)}): run "
            "`availability migrate --contract` once no older release runs (docs/deployment.md: "
            "Upgrades and rollbacks)"
        )


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
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip() or None
        except OSError as exc:
            print(f"availability: --token-file: {exc.strerror}: {args.token_file}", file=sys.stderr)
            return 2
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


def _hash_token(token: str | None) -> int:
    """The digest for token_sha256. From stdin when no argument is given (a prompt that does
    not echo at a terminal), so the token stays out of shell history."""
    from .callers import hash_token

    if token is None:
        token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    token = token.strip()
    if not token:
        print("availability: hash-token: no token given (argument or stdin)", file=sys.stderr)
        return 2
    if any(c.isspace() for c in token):
        print("availability: hash-token: a token cannot contain whitespace", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def since(text: str) -> datetime:
    """--since: a time ago (`90s`, `15m`, `1h`, `2d`, `1w`) or an ISO-8601 time (`2026-12-02`,
    `2026-12-02T13:00:00+07:00`; without an offset, UTC)."""
    if relative := _RELATIVE.fullmatch(text.strip()):
        amount, unit = relative.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO-8601 time (2026-12-02T13:00:00Z) or a time ago (15m, 1h, 2d), "
            f"got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _role(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"expected a role name, got {text!r}")
    return text


def _mitra(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a mitra id (a UUID), got {text!r}") from None


def _audit(args: argparse.Namespace) -> int:
    """Reads only Postgres: VALKEY_URL is not needed (next to `make run`, DATABASE_URL comes
    from its .data/dev.env like for status)."""
    import asyncpg

    from .errors import TruthUnavailable
    from .truth import Truth

    env = _status_env(args.data_dir)
    env["VALKEY_URL"] = env.get("VALKEY_URL") or "redis://unused"
    settings = _settings(env)

    async def read() -> list[dict[str, object]]:
        truth = await Truth.connect(settings)
        try:
            records = await truth.audit_records(args.mitra, args.since, args.limit)
        finally:
            await truth.close()
        return [asdict(r) for r in records]

    try:
        records = asyncio.run(read())
    except (TruthUnavailable, asyncpg.PostgresError) as exc:
        print(f"availability: audit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, default=str, indent=2))
        return 0
    for r in records:
        change = [f"active {_yes(r['active_before'])}->{_yes(r['active_after'])}"]
        change.append(f"online {_yes(r['online_before'])}->{_yes(r['online_after'])}")
        if r["revoked_auth_sessions"]:
            change.append(f"revoked {r['revoked_auth_sessions']} auth session(s)")
        at = r["at"].isoformat(timespec="seconds") if isinstance(r["at"], datetime) else r["at"]
        print(
            f"{at}  {r['caller']}  {r['action']}  mitra {r['mitra_id']}  {'  '.join(change)}"
            f"  request {r['request_id'] or '-'}"
        )
    if not records:
        print("no audited changes", file=sys.stderr)
    return 0


def _yes(value: object) -> str:
    return "yes" if value else "no"


def parser() -> argparse.ArgumentParser:
    """Every command and its options (docs/configuration.md is generated from this)."""
    from .version import describe

    parser = argparse.ArgumentParser(prog="availability", description=__doc__)
    parser.add_argument("--version", action="version", version=f"availability {describe()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    migrate = commands.add_parser("migrate", help="apply the schema (idempotent)")
    migrate.add_argument(
        "--contract",
        action="store_true",
        help="also remove what older releases relied on: only once none of them runs",
    )
    demo = commands.add_parser("demo", help="load a realistic demo fleet")
    demo.add_argument("--mitras", type=int, default=1000, help="how many mitras to make")
    demo.add_argument(
        "--online-share", type=float, default=0.6, help="the share of them set online"
    )
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
    dev.add_argument(
        "--data-dir", default=".data", help="where the local stores keep their data and dev.env"
    )
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
    status.add_argument(
        "--token-file",
        help="a file holding the bearer token to ask with (a caller of AUTH_CALLERS_FILE with "
        "the read scope); default: the first of AUTH_TOKENS",
    )
    status.add_argument("--data-dir", default=".data", help="where `availability dev` runs")
    status.add_argument(
        "--watch",
        action="store_true",
        help="a live view redrawn every second, with calls/s by method; Ctrl-C quits",
    )
    audit = commands.add_parser(
        "audit",
        help="who changed which mitra's state (SetMitraActive; SetOnline/SetOffline by admins)",
    )
    audit.add_argument("--mitra", type=_mitra, help="only this mitra's changes")
    audit.add_argument(
        "--since",
        type=since,
        help="only changes since: a time ago (15m, 1h, 2d) or an ISO-8601 time (UTC if no offset)",
    )
    audit.add_argument("--json", action="store_true", help="one JSON document (a list)")
    audit.add_argument("--limit", type=int, default=1000, help="the newest N (default 1000)")
    audit.add_argument("--data-dir", default=".data", help="where `availability dev` runs")
    granting = commands.add_parser(
        "grants",
        help="print the SQL that gives a runtime database role what `serve` needs (run it "
        "as the schema's owner, after `availability migrate`)",
    )
    granting.add_argument("role", type=_role, help="the role `serve` connects as")
    hashing = commands.add_parser(
        "hash-token",
        help="print a bearer token's SHA-256 digest for AUTH_CALLERS_FILE's token_sha256",
    )
    hashing.add_argument(
        "token",
        nargs="?",
        help="the token; better left out: it is then read from stdin (a hidden prompt at a "
        "terminal), and stays out of shell history",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    commands = parser()
    args = commands.parse_args(argv)

    if args.command == "dev":
        from .dev import run_dev

        return run_dev(str(args.data_dir), int(args.demo_mitras), bool(args.reset))
    if args.command == "hash-token":
        return _hash_token(args.token)
    if args.command == "grants":
        from .truth.grants import grants_sql

        print(grants_sql(args.role))
        return 0
    if args.command == "audit":
        if args.limit < 1:
            commands.error("--limit must be >= 1")
        return _audit(args)
    if args.command == "status":
        if args.watch and args.json:
            commands.error("--watch draws for a person; --json is for scripts")
        return _status(args)
    settings = _settings()
    configure_logging(settings)
    if args.command == "serve":
        if args.workers < 1:
            commands.error("--workers must be >= 1")
        if args.workers > 1:
            from .server import serve_workers

            return serve_workers(settings, args.workers)
        from .server import run
        from .server import serve as serve_forever

        return run(serve_forever(settings))
    if args.command == "migrate":
        from .server import run

        return run(_migrate(settings, args.contract))
    if args.command == "demo":
        if args.mitras < 1:
            commands.error("--mitras must be >= 1")
        asyncio.run(_demo(settings, args.mitras, args.online_share, args.if_empty or args.live))
        if args.live:
            from .demo_traffic import drive

            print(f"driving the demo fleet against {settings.grpc_address}; Ctrl-C stops")
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(drive(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
