"""The server's lifecycle: start-up order, background tasks, graceful shutdown. Waiting for
Postgres (startup.py) and `--workers` (workers.py) are offered here too, where callers look."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio.connection import Connection

from .callers import Callers
from .domain import Availability
from .interceptors import ErrorMapping, Guard, Observed
from .listener import ChangeListener
from .logs import ANONYMOUS, UNIDENTIFIED
from .metrics import Metrics
from .mirror import MIRROR_ERRORS, Mirror, MirrorUntrusted, connect_valkey
from .services.availability import AvailabilityService
from .services.dashboard import DashboardService
from .settings import Settings
from .startup import StartupDeadline as StartupDeadline
from .startup import StartupFailed as StartupFailed
from .startup import _named
from .startup import run as run
from .sweeps import RECONCILE, Sweeps
from .tasks import cancel_and_wait
from .timing import Recent
from .tracing import server_tracer
from .truth import Truth
from .truth.grants import SchemaMissing
from .v1 import availability_pb2 as pb
from .v1 import availability_pb2_grpc as pb_grpc
from .v1 import dashboard_pb2 as dashboard_pb
from .v1 import dashboard_pb2_grpc as dashboard_pb_grpc
from .version import VERSION, commit, describe
from .workers import serve_workers as fan_out

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["AvailabilityService"].full_name,
    dashboard_pb.DESCRIPTOR.services_by_name["DashboardService"].full_name,
)
_STEP_SECONDS = 5.0
ANNOUNCE_SECONDS = 2.0
"""How often each instance reports itself in Valkey for `availability status`."""
RECENT_SECONDS = 10.0
"""The report's `recent_fallbacks` counts the fallbacks of about this long before it."""
_FORGET_SECONDS = 60.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Services(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The two services' handlers. grpc takes handlers only before it starts, the port and
    health must be up before Postgres answers, and the services need Postgres: so this one
    handler is registered up front and handed the services once start-up is done. Until
    then their calls get UNAVAILABLE."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add(self, availability: Availability) -> None:
        server = cast(grpc.aio.Server, self)
        pb_grpc.add_AvailabilityServiceServicer_to_server(AvailabilityService(availability), server)
        dashboard_pb_grpc.add_DashboardServiceServicer_to_server(
            DashboardService(availability), server
        )

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The generated code offers each service twice; the registered handlers suffice."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._handlers.update((f"/{service}/{name}", h) for name, h in handlers.items())

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if self._handlers:
            return self._handlers.get(details.method)
        return _STARTING if details.method.startswith(_OURS) else None


_OURS = tuple(f"/{name}/" for name in SERVICE_NAMES)


async def _starting(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "starting up: not serving yet")


_STARTING = grpc.unary_unary_rpc_method_handler(_starting)


class Server:
    """One serving process: stores, domain, gRPC server and the background tasks."""

    def __init__(self, settings: Settings, *, tracer_provider: object = None) -> None:
        """tracer_provider: OpenTelemetry's, when not the global one (tests)."""
        self.settings = settings
        self._tracer = server_tracer(tracer_provider)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.availability: Availability | None = None
        self.listener: ChangeListener | None = None
        self.sweeps: Sweeps | None = None
        self.port = 0
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: Metrics | None = None
        self.callers: Callers | None = None
        self._serving = False
        self._started_at = datetime.now(UTC)
        self._fallbacks_announced: deque[int] = deque(
            maxlen=round(RECENT_SECONDS / ANNOUNCE_SECONDS)
        )
        self._recent: dict[str, Recent] = {}

    async def start(self, *, reuse_port: bool = False) -> None:
        """Bind (health NOT_SERVING), connect, migrate, seed, start tasks, then SERVING.

        Postgres is waited for up to STARTUP_TIMEOUT_SECONDS (StartupFailed after that), so
        an orchestrator may start the stores and this server in any order."""
        started = time.perf_counter()
        settings = self.settings
        deadline = StartupDeadline(settings.startup_timeout_seconds)
        services = _Services()
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMapping()]  # type: ignore[type-arg]
        guard = None
        if settings.auth_callers_file:
            self.callers = Callers(settings.auth_callers_file)
            guard = Guard(
                self.callers,
                tls=settings.mutual_tls,
                peer_refusals=settings.auth_refusals_per_peer_per_second,
            )
            self._tasks.append(
                asyncio.create_task(
                    self.callers.watch(settings.auth_callers_poll_seconds), name="callers-file"
                )
            )
        elif settings.auth_tokens:
            guard = Guard.of_tokens(
                settings.auth_tokens,
                tls=False,
                peer_refusals=settings.auth_refusals_per_peer_per_second,
            )
        if guard is not None:
            interceptors.insert(0, guard)
        self.metrics = Metrics(self)
        interceptors.insert(
            0,
            Observed(
                settings.log_slow_rpc_seconds,
                self.metrics.record,
                self._tracer,
                UNIDENTIFIED if guard is not None else ANONYMOUS,
            ),
        )
        self._grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", int(reuse_port)),
                ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                *_connection_age(settings),
            ],
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        )
        self._grpc.add_generic_rpc_handlers((services,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        if settings.grpc_reflection:
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
            )
        await self._set_health(_NOT_SERVING)
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self._grpc.add_insecure_port(settings.grpc_address)
        else:
            self.port = self._grpc.add_secure_port(settings.grpc_address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind GRPC_ADDRESS {settings.grpc_address}")
        await self._grpc.start()
        if settings.metrics_address:
            self.metrics.serve(settings.metrics_address)

        truth = await deadline.retry(lambda: Truth.connect(settings))
        mirror = Mirror(
            connect_valkey(settings, self._valkey_connected, on_moved=self._valkey_moved),
            settings,
        )
        self.availability = availability = Availability(truth, mirror, settings)
        await _check_role(truth, settings.migrate_on_start)
        if settings.migrate_on_start:
            await deadline.retry(truth.migrate)
        # The change listener connects before seeding, so the seed counts as its first
        # connection and only a later reconnect reconciles again.
        self.listener = ChangeListener(availability)
        self._tasks.append(asyncio.create_task(self.listener.run(), name="change-listener"))
        try:
            async with asyncio.timeout(settings.database_timeout_seconds):
                await self.listener.connected.wait()
        except TimeoutError:
            self.listener.reconcile_on_connect = True
            log.warning("change listener not connected yet; it keeps trying and reconciles then")
        self.sweeps = sweeps = Sweeps(availability)
        try:
            seeding = time.perf_counter()
            seeded, drift = await deadline.retry(availability.reconcile)
            log.info("mirror seeded with %d mitras (%d changes)", seeded, drift.total)
            await sweeps.record(
                RECONCILE,
                settings.valkey_online_mirror_sweep_seconds,
                time.perf_counter() - seeding,
                "ok",
                drift.total,
                {"mitras": seeded, "drift": asdict(drift), "at_start_up": True},
            )
        except MirrorUntrusted as exc:
            log.warning("mirror not seeded at start-up (%s); serving from Postgres", exc)
        except MIRROR_ERRORS as exc:
            log.warning(
                "Valkey unreachable at start-up (%s); serving from Postgres, and seeding the "
                "mirror once Valkey answers",
                _named(exc),
            )
        await availability.watch_hub.start()
        sweeps.start()
        services.add(availability)
        await self._set_health(_SERVING)
        self._serving = True
        self._tasks.append(asyncio.create_task(self._announce(), name="announce"))
        log.info(
            "serving on %s (pid %d, version %s) after %.2fs",
            settings.grpc_address.rsplit(":", 1)[0] + f":{self.port}",
            os.getpid(),
            describe(),
            time.perf_counter() - started,
        )

    def reload_callers(self) -> bool:
        """SIGHUP: read AUTH_CALLERS_FILE again (a bad file keeps the last good one)."""
        if self.callers is None:
            log.info("SIGHUP: no AUTH_CALLERS_FILE to reload")
            return False
        return self.callers.reload()

    def report(self) -> dict[str, object]:
        """This instance as `availability status` shows it."""
        availability, listener = self.availability, self.listener
        assert availability is not None
        counters = availability.counters
        fallbacks = sum(counters.fallbacks.values())
        host = self.settings.grpc_address.rsplit(":", 1)[0]
        return {
            "address": f"{host}:{self.port}",
            "metrics_address": f"{self.settings.metrics_address.rpartition(':')[0]}:{port}"
            if self.metrics and (port := self.metrics.port)
            else "",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": VERSION,
            "commit": commit(),
            "started_at": self._started_at.isoformat(),
            "serving": self._serving,
            "valkey_breaker_open": availability.mirror.breaker.is_open,
            "layout": availability.mirror.layout,
            "mirror": trust.verdict.value if (trust := availability.mirror.trust) else "unchecked",
            "distrusted": availability.mirror.distrusted,
            "fallbacks": fallbacks,
            "recent_fallbacks": fallbacks - next(iter(self._fallbacks_announced), 0),
            "mirror_misses": sum(counters.mirror_misses.values()),
            "untrusted_reads": sum(counters.untrusted_reads.values()),
            "valkey_write_errors": sum(counters.mirror_write_errors.values()),
            "unmirrored": len(availability.unmirrored),
            "postgres_listener_connected": listener is not None and listener.connected.is_set(),
            "watchers": availability.watch_hub.watchers,
            "callers_reload_failing": self.callers is not None and self.callers.failing,
            "store_seconds": {store: asdict(recent) for store, recent in self._recent.items()},
            "postgres_pool": availability.truth.pool(),
            "listener_error": listener.last_error if listener is not None else None,
            "sweeps_failing": {
                name: stats.failing
                for name, stats in (self.sweeps.report.stats if self.sweeps else {}).items()
                if stats.failing
            },
        }

    async def _announce(self) -> None:
        assert self.availability is not None and self.sweeps is not None
        mirror, instance = self.availability.mirror, self.sweeps.owner
        truth = self.availability.truth
        while True:
            self._recent = {"valkey": mirror.seconds.mark(), "postgres": truth.seconds.mark()}
            with contextlib.suppress(*MIRROR_ERRORS):
                await mirror.announce(instance, json.dumps(self.report()), _FORGET_SECONDS)
            self._fallbacks_announced.append(sum(self.availability.counters.fallbacks.values()))
            await asyncio.sleep(ANNOUNCE_SECONDS)

    async def _valkey_connected(self, connection: Connection) -> None:
        """Every new Valkey connection checks the data set before its first command, so no
        call is answered from a replaced one (mirror/trust.py)."""
        if self.availability is not None:
            await self.availability.mirror.check_trust(connection=connection)
        if self.sweeps is not None:
            self.sweeps.valkey_connected()

    def _valkey_moved(self) -> None:
        if self.sweeps is not None:
            self.sweeps.valkey_moved()

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking calls, let in-flight ones finish, stop tasks, close pools. Each step
        is bounded, so a stuck one is logged by name and shutdown still completes."""
        self._serving = False
        if self.availability is not None:
            self.availability.stopping = True
        await self._step("health", self.health.enter_graceful_shutdown())
        if self.availability is not None:
            await self._step("watches", self.availability.watch_hub.stop())
        if self._grpc is not None:
            await self._step("draining calls", self._grpc.stop(grace), grace + _STEP_SECONDS)
        if self.sweeps is not None:
            await self._step("sweeps", self.sweeps.stop())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await self._step(task.get_name(), cancel_and_wait([task]))
        self._tasks.clear()
        if self.availability is not None and self.sweeps is not None:
            await self._step("withdraw", self._withdraw(self.availability.mirror))
        if self.metrics is not None:
            self.metrics.close()
        if self.availability is not None:
            await self._step("Valkey client", self.availability.mirror.close())
            await self._step("Postgres pool", self.availability.truth.close())

    async def _withdraw(self, mirror: Mirror) -> None:
        assert self.sweeps is not None
        with contextlib.suppress(*MIRROR_ERRORS):
            await mirror.withdraw(self.sweeps.owner)

    @staticmethod
    async def _step(name: str, step: Awaitable[object], seconds: float = _STEP_SECONDS) -> None:
        try:
            async with asyncio.timeout(seconds):
                await step
        except TimeoutError:
            log.error("shutdown: %s did not finish within %.0fs; going on", name, seconds)


async def _check_role(truth: Truth, migrating: bool) -> None:
    """Start with a role that can do the work, or stop at once in one line naming what it
    lacks: not serve with a grant missing and fail call after call (or loop reconnecting)."""
    role = await truth.role()
    if migrating:
        if not await truth.owns_schema():
            raise StartupFailed(
                f"MIGRATE_ON_START=true, but the database role {role} does not own the schema: "
                "run `availability migrate` as the owner and serve with MIGRATE_ON_START=false"
            )
        return
    try:
        missing = await truth.missing_grants()
    except SchemaMissing as exc:
        raise StartupFailed(
            f"table {exc} does not exist: run `availability migrate` as the schema's owner"
        ) from None
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StartupFailed(
            f"the database role {role} lacks {missing[0]}{more}: as the schema's owner, run "
            f"the SQL that `availability grants {role}` prints"
        )


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    """GRPC_MAX_CONNECTION_AGE_SECONDS: a connection older than this gets a GOAWAY (gRPC adds
    +-10 % jitter), so long-lived clients reconnect, re-resolve and reach instances added since;
    calls in flight then have the grace to end."""
    if not settings.grpc_max_connection_age_seconds:
        return []
    return [
        ("grpc.max_connection_age_ms", round(settings.grpc_max_connection_age_seconds * 1000)),
        (
            "grpc.max_connection_age_grace_ms",
            round(settings.grpc_max_connection_age_grace_seconds * 1000),
        ),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from TLS_CERT_FILE/TLS_KEY_FILE; with TLS_CLIENT_CA_FILE, clients must present a
    certificate that CA signed (mutual TLS). None: plaintext."""
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    chain = Path(settings.tls_cert_file).read_bytes()
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.mutual_tls else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, *, tracer_provider: object = None) -> AsyncIterator[Server]:
    """A started server for the length of the block (tests and tools use this)."""
    server = Server(settings, tracer_provider=tracer_provider)
    try:
        await server.start()
        yield server
    finally:
        await server.stop(grace=1.0)


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. A signal while start-up
    still waits for Postgres ends the wait; StartupFailed when the wait ran out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(settings)
    loop.add_signal_handler(signal.SIGHUP, server.reload_callers)
    starting = asyncio.create_task(server.start(reuse_port=reuse_port))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopping
            log.info("shutting down: draining in-flight calls")
        else:
            log.info("shutting down before start-up finished")
    finally:
        await cancel_and_wait(task for task in (starting, stopping) if not task.done())
        await server.stop()
    log.info("stopped")


def serve_workers(settings: Settings, workers: int) -> int:
    """`workers` processes, each running serve() on the shared port (workers.py)."""
    return fan_out(settings, workers, serve)
