"""The report as a person reads it at a terminal. The live view prints these lines under its
own, all but the first two (the verdict and a blank), which its own header replaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .report import version_of


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
        f"  {version_of(instance)}"
        f"  {'serving' if instance.get('serving') else 'NOT SERVING'}"
        f"  seen {instance['seen_seconds_ago']} s ago"
        f"  breaker {'OPEN' if instance.get('valkey_breaker_open') else 'closed'}"
        f"  fallbacks {instance.get('fallbacks')} ({instance.get('recent_fallbacks')} recent)"
        f"  misses {instance.get('mirror_misses')}"
        f"  write errors {instance.get('valkey_write_errors')}"
        f"  listener {'up' if instance.get('postgres_listener_connected') else 'DOWN'}"
        f"  watchers {instance.get('watchers')}"
        + "".join(
            f"  {store} p99 {recent['p99_seconds'] * 1000:.1f} ms"
            for store, recent in sorted(instance.get("store_seconds", {}).items())
        )
        + (
            f"  pool {pool['in_use']}/{pool['max']} in use, {pool['waiting']} waiting"
            if (pool := instance.get("postgres_pool"))
            else ""
        )
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
