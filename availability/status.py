"""`availability status`: what on-call types first. It asks the deployment itself, not one
process's memory: the server's health and beacon over gRPC, what every instance reported in
Valkey in the last seconds, each sweep's lease and last run, Postgres's own view, and the
drift between the two stores. Every problem it finds is one line pointing at the runbook."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import grpc

from .client import AvailabilityClient
from .mirror import MIRROR_ERRORS, Mirror, connect_valkey
from .settings import Settings
from .sweeps import RECONCILE, SWEEPS

_SILENT_SECONDS = 3 * 2.0 + 1
"""An instance reports every 2 s (server.ANNOUNCE_SECONDS); three missed reports: silent."""


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
    elif postgres["standby"]:
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
        f"  {'serving' if instance.get('serving') else 'NOT SERVING'}"
        f"  seen {instance['seen_seconds_ago']} s ago"
        f"  breaker {'OPEN' if instance.get('valkey_breaker_open') else 'closed'}"
        f"  fallbacks {instance.get('fallbacks')}"
        f"  write errors {instance.get('valkey_write_errors')}"
        f"  listener {'up' if instance.get('postgres_listener_connected') else 'DOWN'}"
        f"  watchers {instance.get('watchers')}"
    )


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
