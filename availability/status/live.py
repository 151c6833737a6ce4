"""`availability status --watch`: the report redrawn every second, above it what moves
between two frames. A rate needs two readings of a counter, so this view alone keeps state:
the last frame, and the counts of the last minute."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import urllib.request
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import grpc
from prometheus_client.parser import text_string_to_metric_families

from ..client import AvailabilityClient
from ..model import DashboardStats
from ..settings import Settings
from .report import error_of, gather
from .text import render

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
        return error_of(exc)


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
