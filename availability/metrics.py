"""Prometheus metrics on METRICS_ADDRESS: RPCs by method, code and caller (the names of the
gRPC ecosystem's go-grpc-prometheus, plus `caller`), and the domain's own counters, read at
scrape time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .mirror import Trust
from .timing import BUCKETS
from .version import VERSION, commit

if TYPE_CHECKING:
    from .callers import Callers
    from .domain import Availability
    from .sweeps import Sweeps


class Measured(Protocol):
    """What the metrics read at scrape time: the server's domain and sweeps, once started."""

    @property
    def availability(self) -> Availability | None: ...

    @property
    def sweeps(self) -> Sweeps | None: ...

    @property
    def callers(self) -> Callers | None: ...


log = logging.getLogger(__name__)


class Metrics:
    """One registry a process (several servers in one test process do not collide)."""

    def __init__(self, server: Measured) -> None:
        """Made on the server's event loop, whose tasks it counts."""
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method, status code and caller.",
            ["grpc_service", "grpc_method", "grpc_code", "caller"],
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC (a stream: until it ends), by method and caller.",
            ["grpc_service", "grpc_method", "caller"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        Gauge(
            "availability_build_info",
            "1, labelled with the version and commit this process runs.",
            ["version", "commit"],
            registry=self.registry,
        ).labels(VERSION, commit()).set(1)
        self.registry.register(_Domain(server, asyncio.get_running_loop()))
        self._http: WSGIServer | None = None
        self.port = 0

    def serve(self, address: str) -> None:
        """Serve /metrics on host:port (port 0: any free one). A port that is taken is
        logged, not fatal: the service matters more than its metrics."""
        host, _, port = address.rpartition(":")
        try:
            self._http, _thread = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.registry
            )
        except OSError as exc:
            log.error("metrics: cannot serve on %s (%s); serving without metrics", address, exc)
            return
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def record(self, service: str, method: str, seconds: float, code: str, caller: str) -> None:
        """One RPC ended (interceptors.Observed calls this for every call). Callers are the
        names in AUTH_CALLERS_FILE (or anonymous, token, `-`), so the series stay bounded."""
        self.handling.labels(service, method, caller).observe(seconds)
        self.handled.labels(service, method, code, caller).inc()


class _Domain(Collector):
    """The service's own counters, read when Prometheus scrapes (from its thread: each read
    is one copy of a dict or a number, safe under the GIL)."""

    def __init__(self, server: Measured, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        yield _gauge(
            "availability_asyncio_tasks",
            "Tasks on the server's event loop (calls in flight, streams, sweeps, listeners).",
            len(asyncio.all_tasks(self._loop)),
        )
        availability = self._server.availability
        if availability is None:
            return
        yield from self._stores(availability)
        counters = availability.counters
        yield _by(
            "availability_fallbacks",
            "Reads (and heartbeat guards) that Postgres answered because Valkey failed "
            "(unreachable, timed out, breaker open, an error).",
            "path",
            counters.fallbacks.copy(),
        )
        yield _by(
            "availability_mirror_misses",
            "Reads (and heartbeat guards) of a mitra the mirror does not know, which Postgres "
            "answered while Valkey was healthy (an unknown id, or one the mirror has not heard "
            "of yet).",
            "path",
            counters.mirror_misses.copy(),
        )
        yield _by(
            "availability_mirror_untrusted_reads",
            "Reads (and heartbeat guards) that Postgres answered because the mirror may not be "
            "read yet: unseeded, being reseeded, distrusted, or owned by another layout.",
            "path",
            counters.untrusted_reads.copy(),
        )
        yield _by(
            "availability_heartbeats",
            "Heartbeats (a BatchHeartbeat counts each id), by outcome: recorded, offline, "
            "deactivated, not_found, invalid_id, session_refused.",
            "outcome",
            counters.heartbeats.copy(),
        )
        yield _by(
            "availability_session_checks",
            "Auth sessions a caller bound to mitras (bind_presence) sent, by who answered: "
            "cache (the mirror vouched for it), database (Postgres found it live), refused.",
            "answered",
            availability.sessions.checked.copy(),
        )
        yield _by(
            "availability_valkey_write_errors",
            "Mirror writes that failed after Postgres committed (healed later).",
            "path",
            counters.mirror_write_errors.copy(),
        )
        breaker = availability.mirror.breaker
        yield _gauge(
            "availability_valkey_breaker_open",
            "1 while the Valkey breaker is open.",
            float(breaker.is_open),
        )
        yield _counter(
            "availability_valkey_breaker_short_circuits",
            "Valkey calls not attempted because the breaker was open.",
            breaker.short_circuits,
        )
        mirror = availability.mirror
        yield _gauge(
            "availability_mirror_trusted",
            "1 while this instance reads the mirror (its last check found the data set a seed "
            "wrote); 0 while it answers from Postgres.",
            float(mirror.trust is not None and mirror.trust.verdict is Trust.TRUSTED),
        )
        yield _counter(
            "availability_mirror_distrusted",
            "Times this instance found Valkey's data set replaced (restart, restore, failover, "
            "eviction) and distrusted the mirror.",
            mirror.distrusted,
        )
        hub = availability.watch_hub
        yield _gauge("availability_watchers", "Open WatchAvailableMitras streams.", hub.watchers)
        yield _counter(
            "availability_watch_changes", "Changes the watch hub followed.", hub.stats.changes
        )
        yield _counter(
            "availability_watch_overflows",
            "Watchers that fell behind their buffer and got a fresh snapshot.",
            hub.stats.overflows,
        )
        count = availability.last_count
        if count is not None:
            yield _gauge(
                "availability_online_mitras", "Online mitras (the beacon's count).", count.online
            )
            yield _gauge(
                "availability_available_mitras",
                "Available mitras (the beacon's count).",
                count.available,
            )
        if (callers := self._server.callers) is not None:
            yield _counter(
                "availability_callers_reload_errors",
                "Readings of AUTH_CALLERS_FILE that failed (unreadable, writable by others, not "
                "valid); the last good callers stay in force.",
                callers.failed_reloads,
            )
            yield _gauge(
                "availability_callers_reload_failing",
                "1 while the last reading of AUTH_CALLERS_FILE failed.",
                int(callers.failing),
            )
        sweeps = self._server.sweeps
        if sweeps is None:
            return
        report = sweeps.report
        stats = dict(report.stats)
        yield _by(
            "availability_sweep_runs",
            "Sweep runs, by sweep.",
            "sweep",
            {n: s.runs for n, s in stats.items()},
        )
        yield _by(
            "availability_sweep_aborted",
            "Sweeps aborted by a store error.",
            "sweep",
            {n: s.aborted for n, s in stats.items()},
        )
        yield _by(
            "availability_sweep_affected_mitras",
            "Mitras a sweep changed (taken offline, flushed, drift healed).",
            "sweep",
            {n: s.affected for n, s in stats.items()},
        )
        duration = GaugeMetricFamily(
            "availability_sweep_last_duration_seconds",
            "How long each sweep's last run took.",
            labels=["sweep"],
        )
        for name, sweep in stats.items():
            duration.add_metric([name], sweep.last_duration_seconds)
        yield duration
        yield _counter(
            "availability_mass_stale_guard_trips",
            "Times the mass-stale guard limited the auto-offline sweep.",
            report.guard_trips,
        )
        drift = CounterMetricFamily(
            "availability_drift_healed",
            "Mirror drift the reconcile sweep healed, by kind.",
            labels=["kind"],
        )
        for kind, value in asdict(report.drift).items():
            drift.add_metric([kind], value)
        yield drift

    @staticmethod
    def _stores(availability: Availability) -> Iterator[Metric]:
        yield from availability.mirror.seconds.collect()
        yield from availability.truth.seconds.collect()
        connections = GaugeMetricFamily(
            "availability_valkey_connections",
            "Open connections to Valkey, by state (in_use, idle).",
            labels=["state"],
        )
        for state, count in availability.mirror.connections().items():
            connections.add_metric([state], count)
        yield connections
        pool = availability.truth.pool()
        yield _gauge(
            "availability_postgres_pool_connections",
            "Open connections of the Postgres pool.",
            pool["size"],
        )
        yield _gauge(
            "availability_postgres_pool_in_use",
            "Connections of the Postgres pool in use.",
            pool["in_use"],
        )
        yield _gauge(
            "availability_postgres_pool_max",
            "The most connections the Postgres pool opens (DATABASE_POOL_SIZE).",
            pool["max"],
        )
        yield _gauge(
            "availability_postgres_pool_waiting",
            "Operations waiting for a connection of the Postgres pool (above 0: exhausted).",
            pool["waiting"],
        )


def _by(name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _counter(name: str, documentation: str, value: float) -> Metric:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(name, documentation, value=value)
