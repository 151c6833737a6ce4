"""`availability status`: what on-call types first. It asks the deployment itself, not one
process's memory: the server's health and beacon over gRPC, what every instance reported in
Valkey in the last seconds, each sweep's lease and last run, Postgres's own view, and the
drift between the two stores. Every problem it finds is one line pointing at the runbook."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.request
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

import grpc
from prometheus_client.parser import text_string_to_metric_families

from .client import AvailabilityClient
from .mirror import MIRROR_ERRORS, Mirror, connect_valkey
from .model import DashboardStats
from .server import RECENT_SECONDS
from .settings import Settings
from .sweeps import RECONCILE, SWEEPS

_SILENT_SECONDS = 3 * 2.0 + 1
"""An instance reports every 2 s (server.ANNOUNCE_SECONDS); three missed reports: silent."""
_FALLBACKS_PROBLEM = 5
"""Fallbacks in an instance's last RECENT_SECONDS that make a problem; fewer are a blip (one
Valkey timeout under load), a note."""


def _where(url: str) -> str:
    """host:port/path without credentials, to print."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or ''}{parts.path}"


def _error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"[:200]


async def _server(address: str, client: AvailabilityClient) -> dict[str, Any]:
    section: dict[str, Any] = {"address": address}
    try:
        section["health"] = await client.health()
        count = await client.count_available_mitras()
    except grpc.aio.AioRpcError as exc:
        section["error"] = _error(exc)
        return section
    section.update(
        online=count.online,
        available=count.available,
        as_of=count.as_of.isoformat(),
        source=count.source.name,
    )
    return section


async def _valkey(settings: Settings) -> tuple[dict[str, Any], Any]:
    section: dict[str, Any] = {"url": _where(settings.valkey_url)}
    mirror = Mirror(connect_valkey(settings), settings)
    try:
        started = time.perf_counter()
        deployment = await mirror.deployment(SWEEPS)
        section["ping_ms"] = round((time.perf_counter() - started) * 1000, 2)
    except MIRROR_ERRORS as exc:
        section["error"] = _error(exc)
        return section, None
    finally:
        await mirror.close()
    trust = deployment.trust
    section.update(
        seeded=deployment.seeded,
        online=deployment.online,
        mirror=trust.verdict.value,
        layout=trust.highest_layout,
        maxmemory_policy=trust.maxmemory_policy,
        role=trust.role,
    )
    return section, deployment


async def _postgres(settings: Settings) -> dict[str, Any]:
    from .truth import Truth

    section: dict[str, Any] = {"url": _where(settings.database_url)}
    try:
        truth = await Truth.connect(replace(settings, database_pool_size=1))
        try:
            started = time.perf_counter()
            standby, online, mitras, migration = await truth.vitals()
            section["ping_ms"] = round((time.perf_counter() - started) * 1000, 2)
            section["contract_pending"] = await truth.pending_contract_steps()
        finally:
            await truth.close()
    except Exception as exc:
        section["error"] = _error(exc)
        return section
    section.update(standby=standby, online=online, mitras=mitras, schema=migration)
    return section


def _mirror(
    valkey: dict[str, Any], settings: Settings, problems: list[str], notes: list[str]
) -> None:
    if valkey["maxmemory_policy"] != "noeviction":
        problems.append(
            f"Valkey's maxmemory-policy is {valkey['maxmemory_policy']}: an eviction distrusts "
            "the mirror; set noeviction (see Valkey in production)"
        )
    if valkey["role"] != "master":
        problems.append(f"VALKEY_URL reaches a {valkey['role']}: see Runbook: Valkey lost")
    if valkey["mirror"] == "guest":
        notes.append(
            f"mirror layout v{valkey['layout']} owns the mirror; v{settings.mirror_layout} "
            "instances answer from Postgres (a rolling upgrade: see Valkey in production)"
        )
    elif valkey["mirror"] == "distrusted":
        problems.append(
            "the mirror's marker names another data set (Valkey restarted, restored or failed "
            "over): a reseed is due; see Runbook: Valkey lost"
        )
    elif not valkey["seeded"]:
        problems.append("the mirror is not seeded: being rebuilt; see Runbook: Valkey lost")


def _age(at: str, now: datetime) -> float:
    return round((now - datetime.fromisoformat(at)).total_seconds(), 1)


async def gather(
    settings: Settings,
    *,
    address: str,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 3.0,
) -> dict[str, Any]:
    """The deployment's status as one JSON-able dict; `problems` lists what is wrong."""
    settings = replace(settings, valkey_timeout_seconds=timeout, database_timeout_seconds=timeout)
    async with AvailabilityClient(
        address, timeout=timeout, attempts=1, token=token, credentials=credentials
    ) as client:
        server, (valkey, deployment), postgres = await asyncio.gather(
            _server(address, client), _valkey(settings), _postgres(settings)
        )
    now = datetime.now(UTC)
    report: dict[str, Any] = {
        "at": now.isoformat(timespec="seconds"),
        "server": server,
        "valkey": valkey,
        "postgres": postgres,
        "sweeps": {},
        "instances": {},
    }
    problems: list[str] = []
    notes: list[str] = []
    if "error" in server:
        problems.append(f"server {address} did not answer ({server['error']}): see Runbook")
    elif server["health"] != "SERVING":
        problems.append(f"server {address} is {server['health']}: it is starting or stopping")
    if "error" in valkey:
        problems.append(
            f"Valkey unreachable ({valkey['error']}): reads come from Postgres; "
            "see Runbook: Valkey lost"
        )
    else:
        _mirror(valkey, settings, problems, notes)
    if "error" in postgres:
        problems.append(
            f"Postgres unreachable ({postgres['error']}): writes fail UNAVAILABLE; "
            "see Runbook: Postgres failover"
        )
    elif postgres["contract_pending"]:
        notes.append(
            f"contract steps pending ({', '.join(postgres['contract_pending'])}): once no "
            "older release runs, `availability migrate --contract` (README: Upgrades and "
            "rollbacks)"
        )
    if "error" not in postgres and postgres["standby"]:
        problems.append(
            "DATABASE_URL reaches a standby (read-only): writes fail; "
            "see Runbook: Postgres failover"
        )
    if deployment is not None and "error" not in postgres:
        difference = deployment.online - postgres["online"]
        report["drift"] = {"online_mirror_minus_truth": difference}
        if deployment.seeded and abs(difference) > 5 + postgres["online"] // 100:
            problems.append(
                f"the mirror has {deployment.online} online, Postgres {postgres['online']}: "
                "see Runbook: Drift alarms"
            )
    if deployment is not None:
        _sweeps(report, deployment, now, problems, notes)
        _instances(report, deployment, problems, notes)
    report["problems"] = problems
    report["notes"] = notes
    report["ok"] = not problems
    return report


def _sweeps(
    report: dict[str, Any], deployment: Any, now: datetime, problems: list[str], notes: list[str]
) -> None:
    for name in SWEEPS:
        sweep: dict[str, Any] = {}
        if lease := deployment.leases.get(name):
            sweep["leader"], sweep["epoch"], sweep["lease_seconds_left"] = lease
        if raw := deployment.sweeps.get(name):
            last = json.loads(raw)
            last["age_seconds"] = _age(last["at"], now)
            sweep["last"] = last
            if last["age_seconds"] > 3 * last["every"] + 5:
                problems.append(
                    f"{name} last ran {last['age_seconds']:.0f} s ago (every {last['every']:g} s)"
                )
            if last["outcome"] != "ok":
                problems.append(f"{name}'s last run {last['outcome']}")
            if last.get("guard_tripped"):
                problems.append(
                    f"mass-stale guard tripped: {last['stale']} of {last['online']} online "
                    "stale at once; see Runbook: mass-stale guard tripped"
                )
            if name == RECONCILE and last.get("at_start_up"):
                notes.append(
                    f"the last reconcile was the start-up seed ({last['affected']} changes)"
                )
            elif name == RECONCILE and sum(last.get("drift", {}).values()):
                notes.append(
                    f"the last reconcile healed drift {last['drift']}: after a Valkey restart "
                    "that is the reseed; otherwise see Runbook: Drift alarms"
                )
        else:
            notes.append(f"{name} has not run yet in this deployment")
        report["sweeps"][name] = sweep


def _instances(
    report: dict[str, Any], deployment: Any, problems: list[str], notes: list[str]
) -> None:
    for instance, (seen_ago, raw) in sorted(deployment.instances.items()):
        described = {"seen_seconds_ago": round(seen_ago, 1), **json.loads(raw)}
        report["instances"][instance] = described
        if seen_ago > _SILENT_SECONDS:
            problems.append(f"instance {instance} silent for {seen_ago:.0f} s (crashed?)")
            continue
        if not described.get("serving"):
            problems.append(f"instance {instance} is not serving")
        if described.get("valkey_breaker_open"):
            problems.append(
                f"instance {instance}: Valkey breaker open, reads from Postgres; "
                "see Runbook: Valkey lost"
            )
        elif recent := described.get("recent_fallbacks"):
            (problems if recent >= _FALLBACKS_PROBLEM else notes).append(
                f"instance {instance}: {recent} reads fell back to Postgres in the last "
                f"{RECENT_SECONDS:.0f} s because Valkey failed; see Runbook: Valkey lost"
            )
        if not described.get("postgres_listener_connected"):
            problems.append(
                f"instance {instance}: change listener disconnected from Postgres; "
                "see Runbook: Postgres failover"
            )
        if described.get("unmirrored"):
            notes.append(
                f"instance {instance}: {described['unmirrored']} mirror writes waiting for repair"
            )
    if not deployment.instances:
        notes.append("no instance has reported in Valkey in the last minute")
    versions = sorted({_version(i) for i in report["instances"].values()})
    if len(versions) > 1:
        notes.append(
            f"instances run {len(versions)} versions ({', '.join(versions)}): a rolling "
            "upgrade or rollback in progress, or one left behind"
        )


def render(report: dict[str, Any]) -> str:
    """The report for a person: a line a part, then the problems."""
    lines = [
        f"availability status at {report['at']}: "
        + ("OK" if report["ok"] else f"DEGRADED ({len(report['problems'])} problems)"),
        "",
    ]
    server, valkey, postgres = report["server"], report["valkey"], report["postgres"]
    lines += [
        _part("server", server["address"], server, _server_state),
        _part("valkey", valkey["url"], valkey, _valkey_state),
        _part("postgres", postgres["url"], postgres, _postgres_state),
    ]
    if "drift" in report:
        lines.append(
            f"drift      mirror minus truth, online: {report['drift']['online_mirror_minus_truth']}"
        )
    lines += _titled("sweeps", [_sweep_line(n, s) for n, s in report["sweeps"].items()])
    lines += _titled("instances", [_instance_line(n, i) for n, i in report["instances"].items()])
    if report["problems"]:
        lines += ["", "problems:", *(f"  - {problem}" for problem in report["problems"])]
    if report["notes"]:
        lines += ["", "notes:", *(f"  - {note}" for note in report["notes"])]
    return "\n".join(lines)


def _titled(title: str, rows: list[str]) -> list[str]:
    """Rows under a title in the first column: `sweeps     auto_offline ...`."""
    return [f"{title if index == 0 else '':<11}{row}" for index, row in enumerate(rows)]


def _sweep_line(name: str, sweep: dict[str, Any]) -> str:
    leader = (
        f"leader {sweep['leader']} (epoch {sweep['epoch']},"
        f" {sweep['lease_seconds_left']:.0f} s left)"
        if "leader" in sweep
        else "no leader"
    )
    last = sweep.get("last")
    ran = (
        f"last {last['outcome']} {last['age_seconds']:.0f} s ago"
        f" in {last['seconds'] * 1000:.0f} ms, {last['affected']} affected, by {last['instance']}"
        if last
        else "never ran"
    )
    return f"{name:<16} {leader}; {ran}"


def _instance_line(name: str, instance: dict[str, Any]) -> str:
    return (
        f"{name}  {instance.get('address')}"
        f"  {_version(instance)}"
        f"  {'serving' if instance.get('serving') else 'NOT SERVING'}"
        f"  seen {instance['seen_seconds_ago']} s ago"
        f"  breaker {'OPEN' if instance.get('valkey_breaker_open') else 'closed'}"
        f"  fallbacks {instance.get('fallbacks')} ({instance.get('recent_fallbacks')} recent)"
        f"  misses {instance.get('mirror_misses')}"
        f"  write errors {instance.get('valkey_write_errors')}"
        f"  listener {'up' if instance.get('postgres_listener_connected') else 'DOWN'}"
        f"  watchers {instance.get('watchers')}"
    )


def _version(instance: dict[str, Any]) -> str:
    """Releases before 0.2.0 do not report theirs."""
    if "version" not in instance:
        return "version unknown (before 0.2.0)"
    return f"{instance['version']} ({instance.get('commit', 'unknown')})"


def _part(
    title: str, where: str, section: dict[str, Any], state: Callable[[dict[str, Any]], str]
) -> str:
    return f"{title:<11}{where}  " + (
        f"ERROR {section['error']}" if "error" in section else state(section)
    )


def _server_state(server: dict[str, Any]) -> str:
    return (
        f"{server['health']}  online {server['online']}  available {server['available']}"
        f"  (as of {server['as_of']}, {server['source']})"
    )


def _valkey_state(valkey: dict[str, Any]) -> str:
    trust = {"trusted": "trusted", "guest": "owned by a newer layout"}.get(
        valkey["mirror"], valkey["mirror"].upper()
    )
    return (
        f"ok {valkey['ping_ms']} ms  {trust} (layout v{valkey['layout']})  online"
        f" {valkey['online']}  maxmemory-policy {valkey['maxmemory_policy']}"
    )


def _postgres_state(postgres: dict[str, Any]) -> str:
    role = "STANDBY (read-only)" if postgres["standby"] else "primary"
    return (
        f"ok {postgres['ping_ms']} ms  {role}  online {postgres['online']} of"
        f" {postgres['mitras']} mitras  schema {postgres['schema']}"
    )


# `availability status --watch`: the report above, redrawn every second, with what moves.

_HOME, _END_OF_LINE, _BELOW, _CLEAR = "\x1b[H", "\x1b[K", "\x1b[J", "\x1b[2J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
_SPARKS = "▁▂▃▄▅▆▇█"
_WATCH_HISTORY = 60
_WATCH_METHODS = 12
_COUNTED = {
    "grpc_server_handled_total": ("grpc_method", "grpc_code"),
    "availability_fallbacks_total": ("path",),
}
"""The counters the view turns into rates, and the labels it keeps of each."""


@dataclass(frozen=True)
class _Scrape:
    """The _COUNTED samples of every metrics endpoint: (endpoint, name, labels) -> value."""

    at: float
    samples: dict[tuple[str, str, tuple[str, ...]], float]
    reached: frozenset[str]
    failed: tuple[str, ...]


@dataclass(frozen=True)
class _Frame:
    """What the next frame compares itself with."""

    report: dict[str, Any]
    dashboard: DashboardStats | str
    scrape: _Scrape


async def watch(
    settings: Settings,
    *,
    address: str,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 3.0,
    every: float = 1.0,
    out: TextIO | None = None,
) -> None:
    """The status redrawn every `every` seconds until cancelled (Ctrl-C), with what moves
    between two frames: the counts and their last minute, the dashboard's chats, calls and
    errors a second by method (from every instance's metrics endpoint, as it reports it in
    Valkey; METRICS_ADDRESS until one does), fallbacks a second."""
    out = out or sys.stdout
    history: deque[tuple[int, int]] = deque(maxlen=_WATCH_HISTORY)
    before: _Frame | None = None
    endpoints = [settings.metrics_address] if settings.metrics_address else []
    out.write(_HIDE_CURSOR + _CLEAR)
    try:
        async with AvailabilityClient(
            address, timeout=timeout, attempts=1, token=token, credentials=credentials
        ) as client:
            while True:
                started = time.monotonic()
                report, dashboard = await asyncio.gather(
                    gather(
                        settings,
                        address=address,
                        token=token,
                        credentials=credentials,
                        timeout=timeout,
                    ),
                    _dashboard(client),
                )
                if (reported := _metrics_endpoints(report)) is not None:
                    endpoints = reported
                scrape = await _scrape(endpoints, timeout)
                if counts := _counts(report):
                    history.append(counts)
                now = _Frame(report, dashboard, scrape)
                lines = _render_frame(now, before, history).split("\n")
                out.write(_HOME + "".join(line + _END_OF_LINE + "\n" for line in lines) + _BELOW)
                out.flush()
                before = now
                await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))
    finally:
        out.write(_SHOW_CURSOR)
        out.flush()


def _render_frame(now: _Frame, before: _Frame | None, history: Sequence[tuple[int, int]]) -> str:
    """One frame: what moves first, then the report as `availability status` prints it."""
    report = now.report
    state = "OK" if report["ok"] else f"DEGRADED ({len(report['problems'])} problems)"
    lines = [f"availability status --watch at {report['at']}: {state}   (Ctrl-C quits)", ""]
    lines += _counts_lines(now, before, history)
    lines += _calls_lines(now.scrape, before.scrape if before else None)
    lines += [_fallbacks_line(now, before), ""]
    return "\n".join(lines + render(report).split("\n")[2:])


def _counts_lines(
    now: _Frame, before: _Frame | None, history: Sequence[tuple[int, int]]
) -> list[str]:
    counts, then = _counts(now.report), _counts(before.report) if before else None
    if counts is None:
        line = "the server did not answer"
    else:
        (online, available), server = counts, now.report["server"]
        age = datetime.fromisoformat(now.report["at"]) - datetime.fromisoformat(server["as_of"])
        line = (
            f"online {online}{_delta(online, then[0] if then else None)}"
            f"  available {available}{_delta(available, then[1] if then else None)}"
            f" (the beacon, {max(0.0, age.total_seconds()):.0f} s old)"
        )
    lines = [f"{'counts':<11}{line}"]
    if history:
        for index, name in enumerate(("online", "available")):
            series = [counts[index] for counts in history]
            lines.append(
                f"{'':<11}{name:<10}{_spark(series)} {min(series)}-{max(series)}"
                f" in the last {len(series)} s"
            )
    dashboard = now.dashboard
    if isinstance(dashboard, str):
        lines.append(f"{'chats':<11}the dashboard did not answer ({dashboard})")
    else:
        counts_before = (
            before.dashboard.counts if before and not isinstance(before.dashboard, str) else None
        )
        active, pending = dashboard.counts.active_chats, dashboard.counts.pending_requests
        lines.append(
            f"{'chats':<11}active {active}"
            f"{_delta(active, counts_before.active_chats if counts_before else None)}"
            f"  pending requests {pending}"
            f"{_delta(pending, counts_before.pending_requests if counts_before else None)}"
            f"  last 30 days {dashboard.counts.last_30d_total}"
            f" ({dashboard.counts.last_30d_percent} % sensitive)"
        )
    return lines


def _calls_lines(now: _Scrape, before: _Scrape | None) -> list[str]:
    title = f"{'calls/s':<11}"
    if not now.reached and not now.failed:
        return [title + "no metrics endpoint (no instance reports one; METRICS_ADDRESS off?)"]
    unreachable = f"; unreachable: {', '.join(now.failed)}" if now.failed else ""
    if before is None:
        return [title + f"measuring: a rate needs two scrapes{unreachable}"]
    by_method: dict[str, dict[str, float]] = defaultdict(dict)
    for (method, code), rate in _per_second(before, now, "grpc_server_handled_total").items():
        by_method[method][code] = rate
    calls = {method: sum(codes.values()) for method, codes in by_method.items()}
    errors = {
        method: {code: rate for code, rate in codes.items() if code != "OK" and rate}
        for method, codes in by_method.items()
    }
    lines = [
        title + f"{sum(calls.values()):.1f} in all, errors"
        f" {sum(sum(e.values()) for e in errors.values()):.1f}/s, from"
        f" {len(now.reached)} metrics endpoint(s){unreachable}"
    ]
    busiest = sorted((m for m in calls if calls[m]), key=lambda m: (-calls[m], m))
    for method in busiest[:_WATCH_METHODS]:
        failing = ", ".join(f"{code} {rate:.1f}" for code, rate in sorted(errors[method].items()))
        lines.append(
            f"{'':<13}{method:<26}{calls[method]:>8.1f}"
            + (f"   errors {failing}" if failing else "")
        )
    if not busiest:
        lines.append(f"{'':<13}no calls since the last frame")
    return lines


def _fallbacks_line(now: _Frame, before: _Frame | None) -> str:
    total = sum(
        v
        for (_, name, _l), v in now.scrape.samples.items()
        if name.startswith("availability_fallbacks")
    )
    line = f"{'fallbacks':<11}{total:.0f} in all"
    if before is not None:
        rates = _per_second(before.scrape, now.scrape, "availability_fallbacks_total")
        by_path = ", ".join(f"{path} {rate:.1f}" for (path,), rate in sorted(rates.items()) if rate)
        line += f", {sum(rates.values()):.1f}/s" + (f" ({by_path})" if by_path else "")
    written = sum(i.get("valkey_write_errors") or 0 for i in now.report["instances"].values())
    return line + f"  mirror write errors {written} in all"


def _counts(report: dict[str, Any]) -> tuple[int, int] | None:
    """(online, available): online as the mirror has it now (Postgres when Valkey is out),
    available from the beacon, which may be up to BEACON_TTL_SECONDS old."""
    server = report["server"]
    if "available" not in server:
        return None
    online = next(
        (part["online"] for part in (report["valkey"], report["postgres"]) if "online" in part),
        server["online"],
    )
    return online, server["available"]


def _delta(value: int, then: int | None) -> str:
    return "" if then is None or then == value else f" ({value - then:+d})"


def _spark(values: Sequence[int]) -> str:
    """A bar every two values, the last one included, from the lowest to the highest."""
    low, high = min(values), max(values)
    top = len(_SPARKS) - 1
    return "".join(
        _SPARKS[top // 2 if high == low else round((v - low) * top / (high - low))]
        for v in values[(len(values) - 1) % 2 :: 2]
    )


async def _dashboard(client: AvailabilityClient) -> DashboardStats | str:
    try:
        return await client.get_dashboard_stats(customers_per_mitra_limit=1)
    except grpc.aio.AioRpcError as exc:
        return _error(exc)


def _metrics_endpoints(report: dict[str, Any]) -> list[str] | None:
    """Every instance's metrics endpoint as it reported it; None when no instance reports
    one (Valkey unreachable, or a release before the field): the watch keeps the last ones
    known, at first METRICS_ADDRESS."""
    instances = report["instances"].values()
    if not any("metrics_address" in instance for instance in instances):
        return None
    endpoints = set()
    for instance in instances:
        host, _, port = (instance.get("metrics_address") or "").rpartition(":")
        if not port:
            continue
        if host in ("", "0.0.0.0", "[::]"):  # listening everywhere: reach it by its host
            here = instance.get("host") in (None, socket.gethostname())
            host = "127.0.0.1" if here else instance["host"]
        endpoints.add(f"{host}:{port}")
    return sorted(endpoints)


async def _scrape(endpoints: Sequence[str], timeout: float) -> _Scrape:
    texts = await asyncio.gather(
        *(asyncio.to_thread(_fetch, endpoint, timeout) for endpoint in endpoints),
        return_exceptions=True,
    )
    samples: dict[tuple[str, str, tuple[str, ...]], float] = {}
    failed = []
    for endpoint, text in zip(endpoints, texts, strict=True):
        if isinstance(text, BaseException):
            failed.append(endpoint)
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if labels := _COUNTED.get(sample.name):
                    key = tuple(sample.labels.get(label, "") for label in labels)
                    # Summed over the labels not kept (the caller, for calls).
                    at = (endpoint, sample.name, key)
                    samples[at] = samples.get(at, 0.0) + sample.value
    reached = frozenset(endpoints).difference(failed)
    return _Scrape(time.monotonic(), samples, reached, tuple(failed))


def _fetch(endpoint: str, timeout: float) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout) as response:
        text: str = response.read().decode()
        return text


def _per_second(before: _Scrape, now: _Scrape, name: str) -> dict[tuple[str, ...], float]:
    """A counter's rate by its labels between two scrapes, over the endpoints both reached
    (a restarted instance's counter starts again from 0)."""
    seconds = now.at - before.at
    rates: dict[tuple[str, ...], float] = defaultdict(float)
    for (endpoint, counter, labels), value in now.samples.items():
        if counter != name or endpoint not in before.reached or seconds <= 0:
            continue
        earlier = before.samples.get((endpoint, counter, labels), 0.0)
        rates[labels] += (value - earlier if value >= earlier else value) / seconds
    return dict(rates)
