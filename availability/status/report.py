"""The report behind `availability status`: each part of the deployment asked at once, and
what it answered read for problems (wrong now: a line pointing at the runbook) and notes
(worth knowing, not wrong). One JSON-able dict, so `--json`, the text and the live view
all show the same findings."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import grpc

from ..client import AvailabilityClient
from ..mirror import MIRROR_ERRORS, Mirror, connect_valkey
from ..server import RECENT_SECONDS
from ..settings import Settings
from ..sweeps import RECONCILE, SWEEPS

_SILENT_SECONDS = 3 * 2.0 + 1
"""An instance reports every 2 s (server.ANNOUNCE_SECONDS); three missed reports: silent."""
_FALLBACKS_PROBLEM = 5
"""Fallbacks in an instance's last RECENT_SECONDS that make a problem; fewer are a blip (one
Valkey timeout under load), a note."""


def _where(url: str) -> str:
    """host:port/path without credentials, to print."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or ''}{parts.path}"


def error_of(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"[:200]


_SLOW_MIN_OPERATIONS = 10
"""Fewer operations in an instance's recent window judge nothing (one slow sweep query on an
idle instance is not a slow store)."""
_STORES = {
    "valkey": ("Valkey", "valkey_slow_seconds", "Valkey slow"),
    "postgres": ("Postgres", "postgres_slow_seconds", "Postgres slow"),
}


async def _server(address: str, client: AvailabilityClient) -> dict[str, Any]:
    section: dict[str, Any] = {"address": address}
    try:
        section["health"] = await client.health()
        count = await client.count_available_mitras()
    except grpc.aio.AioRpcError as exc:
        section["error"] = error_of(exc)
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
        section["error"] = error_of(exc)
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
    from ..truth import Truth

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
        section["error"] = error_of(exc)
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
            "older release runs, `availability migrate --contract` (docs/deployment.md: "
            "Upgrades and rollbacks)"
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
        _stores(report, settings, problems)
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
        if error := described.get("listener_error"):
            problems.append(
                f"instance {instance}: change listener failing ({error}); it retries with "
                "backoff, and loads follow only the reconcile until it recovers"
            )
        for sweep, error in (described.get("sweeps_failing") or {}).items():
            problems.append(
                f"instance {instance}: {sweep} failing ({error}); it retries with backoff"
            )
        if described.get("callers_reload_failing"):
            problems.append(
                f"instance {instance}: AUTH_CALLERS_FILE failed to reload; the last good "
                "callers stay in force until it reads (see its ERROR line)"
            )
        if described.get("unmirrored"):
            notes.append(
                f"instance {instance}: {described['unmirrored']} mirror writes waiting for repair"
            )
    if not deployment.instances:
        notes.append("no instance has reported in Valkey in the last minute")
    versions = sorted({version_of(i) for i in report["instances"].values()})
    if len(versions) > 1:
        notes.append(
            f"instances run {len(versions)} versions ({', '.join(versions)}): a rolling "
            "upgrade or rollback in progress, or one left behind"
        )


def _stores(report: dict[str, Any], settings: Settings, problems: list[str]) -> None:
    """A store whose recent p99 (as an instance saw it) passed its threshold, and a Postgres
    pool with every connection in use and operations waiting."""
    for instance, described in report["instances"].items():
        for store, recent in sorted(described.get("store_seconds", {}).items()):
            name, setting, runbook = _STORES[store]
            limit = getattr(settings, setting)
            if recent["operations"] >= _SLOW_MIN_OPERATIONS and recent["p99_seconds"] > limit:
                problems.append(
                    f"instance {instance}: {name} slow: p99 {recent['p99_seconds'] * 1000:.0f} "
                    f"ms over its last {recent['operations']} operations in "
                    f"{RECENT_SECONDS:.0f} s ({setting.upper()} {limit:g}); "
                    f"see Runbook: {runbook}"
                )
        pool = described.get("postgres_pool")
        if pool and pool["waiting"] and pool["in_use"] >= pool["max"]:
            problems.append(
                f"instance {instance}: Postgres pool exhausted: all {pool['max']} connections "
                f"in use, {pool['waiting']} operations waiting; see Runbook: Postgres pool "
                "exhausted"
            )


def version_of(instance: dict[str, Any]) -> str:
    """Releases before 0.2.0 do not report theirs."""
    if "version" not in instance:
        return "version unknown (before 0.2.0)"
    return f"{instance['version']} ({instance.get('commit', 'unknown')})"
