"""`availability serve | migrate | demo | dev`: the console script."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from .logs import configure_logging
from .settings import Settings, SettingsError

log = logging.getLogger("availability")


def _settings() -> Settings:
    try:
        return Settings.from_env()
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
    from .truth import Truth

    truth = await Truth.connect(settings)
    try:
        applied = await truth.migrate()
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
    dev = commands.add_parser(
        "dev", help="serve with local Postgres/Valkey started under --data-dir when unset"
    )
    dev.add_argument("--data-dir", default=".data")
    dev.add_argument("--demo-mitras", type=int, default=200)
    args = parser.parse_args(argv)

    if args.command == "dev":
        from .dev import run_dev

        return run_dev(str(args.data_dir), int(args.demo_mitras))
    settings = _settings()
    configure_logging(settings)
    if args.command == "serve":
        if args.workers < 1:
            parser.error("--workers must be >= 1")
        if args.workers > 1:
            from .server import serve_workers

            return serve_workers(settings, args.workers)
        from .server import serve as serve_forever

        asyncio.run(serve_forever(settings))
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "demo":
        if args.mitras < 1:
            parser.error("--mitras must be >= 1")
        asyncio.run(_demo(settings, args.mitras, args.online_share, args.if_empty))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
