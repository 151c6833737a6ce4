"""Logs: one JSON object a line carrying the request id (the caller's or one we made, told back
in trailing metadata), the method, the mitra and the trace; OpenTelemetry spans continue the
caller's trace."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from availability.local_stores import LocalPostgres, LocalValkey
from availability.logs import JsonFormatter, TextFormatter
from availability.mirror import Keys
from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, eventually, notified, store_env

SERVICE = "availability.v1.AvailabilityService"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def parsed(self) -> list[dict[str, object]]:
        """Every line, each of which must be one JSON object."""
        return [json.loads(line) for line in self.lines]

    async def one(self, method: str) -> dict[str, object]:
        """The line that ends the one call of this method, once it is written: the server's
        interceptor writes it after the answer went out, so the caller can be first."""
        await eventually(lambda: asyncio.sleep(0, self.of(method)), what=f"a {method} line")
        (line,) = self.of(method)
        return line

    def of(self, method: str) -> list[dict[str, object]]:
        """The lines that end calls of one method."""
        return [
            line
            for line in self.parsed()
            if line["logger"] == "availability.rpc" and line["method"] == f"/{SERVICE}/{method}"
        ]


@pytest.fixture
def logged() -> Iterator[Lines]:
    root = logging.getLogger("availability")
    handler, level = Lines(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_each_call_logs_one_json_line_with_the_callers_request_id(
    server: Server, fleet: Fleet, logged: Lines
) -> None:
    mitra = str(await fleet.mitra())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.AvailabilityServiceStub(channel).SetOnline(
            pb.SetOnlineRequest(mitra_id=mitra), metadata=(("x-request-id", "req-42"),)
        )
        await call
        trailing = dict(await call.trailing_metadata() or ())

    line = await logged.one("SetOnline")
    assert line["request_id"] == "req-42" and trailing["x-request-id"] == "req-42"
    assert line["mitra_id"] == mitra
    assert line["code"] == "OK" and line["level"] == "DEBUG"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert line["logger"] == "availability.rpc" and isinstance(line["time"], str)


async def test_a_failed_call_gets_an_id_made_for_it_and_told_back(
    server: Server, logged: Lines
) -> None:
    logging.getLogger("availability").setLevel(logging.INFO)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = pb_grpc.AvailabilityServiceStub(channel).GetMitraStatus(
            pb.GetMitraStatusRequest(mitra_id="not-a-uuid")
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
    told = dict(refused.value.trailing_metadata() or ())["x-request-id"]

    line = await logged.one("GetMitraStatus")
    assert line["code"] == "INVALID_ARGUMENT" and line["level"] == "INFO"
    assert line["request_id"] == told and len(str(told)) == 32
    assert logged.of("SetOnline") == []


async def test_lines_logged_inside_a_call_carry_its_request_id(
    server_on_own_valkey: Server, own_valkey: LocalValkey, fleet: Fleet, logged: Lines
) -> None:
    mitra = str(await fleet.mitra())
    # The new mitra reaches the mirror first, so the only mirror write that fails is the call's.
    direct = redis.Redis(port=own_valkey.port)
    try:
        await notified(
            direct,
            Keys.for_prefix(server_on_own_valkey.settings.valkey_key_prefix),
            uuid.UUID(mitra),
        )
    finally:
        await direct.aclose()
    own_valkey.stop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as channel:
        await pb_grpc.AvailabilityServiceStub(channel).SetOnline(
            pb.SetOnlineRequest(mitra_id=mitra), metadata=(("x-request-id", "outage-1"),)
        )

    # The call's own lines; the change feed's resync of that SetOnline may fail on the stopped
    # Valkey too, in the background, with no call to name.
    warnings = [
        line
        for line in logged.parsed()
        if line["logger"] == "availability.domain" and "set_online" in str(line["message"])
    ]
    assert warnings, logged.lines
    for line in warnings:
        assert line["request_id"] == "outage-1" and line["level"] == "WARNING"
        assert line["mitra_id"] == mitra and "mirror write failed" in str(line["message"])


async def test_the_callers_trace_id_is_logged_without_opentelemetry(
    server: Server, fleet: Fleet, logged: Lines
) -> None:
    mitra = str(await fleet.mitra())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await pb_grpc.AvailabilityServiceStub(channel).GetMitraStatus(
            pb.GetMitraStatusRequest(mitra_id=mitra), metadata=(("traceparent", TRACEPARENT),)
        )
    line = await logged.one("GetMitraStatus")
    assert line["trace_id"] == TRACE_ID and line["span_id"] == CALLER_SPAN


async def test_spans_continue_the_callers_trace(
    settings: Settings, fleet: Fleet, logged: Lines
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mitra = str(await fleet.mitra())
    async with (
        running(settings, tracer_provider=provider) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        await stub.SetOnline(
            pb.SetOnlineRequest(mitra_id=mitra), metadata=(("traceparent", TRACEPARENT),)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(uuid.uuid4())))

    spans = {span.name: span for span in exporter.get_finished_spans()}
    online = spans[f"{SERVICE}/SetOnline"]
    assert online.parent is not None and format(online.parent.span_id, "016x") == CALLER_SPAN
    assert format(online.context.trace_id, "032x") == TRACE_ID
    assert online.attributes is not None and online.attributes["rpc.grpc.status_code"] == 0
    line = await logged.one("SetOnline")
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == format(online.context.span_id, "016x")
    unknown = spans[f"{SERVICE}/GetMitraStatus"]
    assert unknown.parent is None and format(unknown.context.trace_id, "032x") != TRACE_ID
    assert unknown.attributes is not None and unknown.attributes["rpc.grpc.status_code"] == 5


def test_text_lines_for_a_terminal_carry_the_same_fields() -> None:
    record = logging.LogRecord("availability.rpc", logging.INFO, "", 0, "done", None, None)
    record.code = "OK"
    text = TextFormatter().format(record)
    assert text.endswith(f"INFO availability.rpc [{os.getpid()}] done  code=OK")


def test_the_served_process_writes_json_lines(settings: Settings, tmp_path: Path) -> None:
    from .test_process import _free_port, _wait_serving

    address = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "server.log"
    env = store_env(settings, address, METRICS_ADDRESS="", LOG_LEVEL="DEBUG")
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", "serve"], env=env, stderr=out, stdout=out
        )
    try:
        _wait_serving(address, process, log)  # type: ignore[arg-type]
        with grpc.insecure_channel(address) as channel:
            pb_grpc.AvailabilityServiceStub(channel).CountAvailableMitras(
                pb.CountAvailableMitrasRequest(), metadata=(("x-request-id", "from-test"),)
            )
    finally:
        process.terminate()
        process.wait(30)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(line["message"].startswith("serving on") for line in lines)
    (counted,) = [line for line in lines if line.get("request_id") == "from-test"]
    assert counted["method"] == f"/{SERVICE}/CountAvailableMitras" and counted["code"] == "OK"
    assert lines[-1]["message"] == "stopped"


def test_opentelemetry_instrument_prints_the_calls_spans_to_the_console(
    settings: Settings, tmp_path: Path
) -> None:
    """docs/observability.md: Logs and traces, as on-call runs it with the `otel` extra's
    packages."""
    from .test_process import _free_port, _wait_serving

    address = f"127.0.0.1:{_free_port()}"
    spans, log = tmp_path / "spans.txt", tmp_path / "server.log"
    bin_dir = Path(sys.executable).parent
    env = store_env(
        settings,
        address,
        METRICS_ADDRESS="",
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="availability",
        LOG_LEVEL="DEBUG",
    )
    with spans.open("w") as out, log.open("w") as err:
        process = subprocess.Popen(
            [str(bin_dir / "opentelemetry-instrument"), str(bin_dir / "availability"), "serve"],
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        _wait_serving(address, process, log)  # type: ignore[arg-type]
        with grpc.insecure_channel(address) as channel:
            pb_grpc.AvailabilityServiceStub(channel).CountAvailableMitras(
                pb.CountAvailableMitrasRequest(), metadata=(("traceparent", TRACEPARENT),)
            )
    finally:
        process.terminate()
        process.wait(30)

    printed = _json_objects(spans.read_text())
    (span,) = [s for s in printed if s["name"] == f"{SERVICE}/CountAvailableMitras"]
    assert span["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert span["parent_id"] == f"0x{CALLER_SPAN}" and span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["rpc.grpc.status_code"] == 0
    assert span["resource"]["attributes"]["service.name"] == "availability"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    # The line that ends the call (a line logged inside it, a fallback under load say, carries
    # its method too).
    (call,) = [
        line
        for line in lines
        if line.get("method") == f"/{SERVICE}/CountAvailableMitras"
        and line["logger"] == "availability.rpc"
    ]
    assert call["trace_id"] == TRACE_ID
    assert call["span_id"] == span["context"]["span_id"].removeprefix("0x")


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The console exporter's output: indented JSON objects one after another."""
    decoder, found, rest = json.JSONDecoder(), [], text.strip()
    while rest:
        value, end = decoder.raw_decode(rest)
        found.append(value)
        rest = rest[end:].lstrip()
    return found


async def test_an_outage_logs_a_line_a_second_not_a_line_a_call(
    server_on_own_valkey: Server, own_valkey: LocalValkey, fleet: Fleet, logged: Lines
) -> None:
    mitra = str(await fleet.mitra(online=True))
    own_valkey.stop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as channel:
        stub = pb_grpc.AvailabilityServiceStub(channel)
        for _ in range(20):
            await stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=mitra))

    warned = [line for line in logged.parsed() if "status: mirror failed" in str(line["message"])]
    assert 1 <= len(warned) <= 2, warned
    assert server_on_own_valkey.availability is not None
    assert server_on_own_valkey.availability.counters.fallbacks["status"] >= 20


_LEAKY = """
import logging, sys
from availability.logs import configure_logging
from availability.settings import Settings

configure_logging(Settings.from_env({
    "DATABASE_URL": "postgresql://app:db-password-7@127.0.0.1/x", "VALKEY_URL": "redis://x",
    "AUTH_TOKENS": sys.argv[1], "LOG_FORMAT": sys.argv[2],
}))
token, other = sys.argv[1], sys.argv[3]
grpc_log = logging.getLogger("grpc._cython.cygrpc")
raw = f"Bearer {token}\\xff".encode("latin-1")
grpc_log.error("Unexpected error: metadata ((%r, %r),)", "authorization", raw)
logging.getLogger("asyncio").error("Exception in callback: authorization=Bearer %s", other)
try:
    raise ValueError(f"header authorization: Bearer {token} refused")
except ValueError:
    logging.getLogger("grpc.aio._server").exception("Exception serialising %s", token)
logging.getLogger("availability").info("dsn postgresql://app:db-password-7@127.0.0.1/x")
"""


_POOL_OUTAGE = """
import asyncio, sys
import asyncpg
from availability import logs
from availability.settings import Settings

logs.configure_logging(Settings.from_env({
    "DATABASE_URL": sys.argv[1], "VALKEY_URL": "redis://x", "LOG_FORMAT": "json",
}))

async def main() -> None:
    pool = await asyncpg.create_pool(sys.argv[1], min_size=1, max_size=2, timeout=2)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # Postgres is stopped now
    # A call's acquire fails: asyncpg starts its reconnecting task inside that call's context.
    logs.current.set(logs.Request("/availability.v1.AvailabilityService/Z", "call-1", "", "x"))
    try:
        await pool.fetchval("SELECT 1")
    except Exception:
        pass
    await asyncio.sleep(4)  # asyncpg retries 1 s, then 2 s, later
    pool.terminate()

asyncio.run(main())
"""


def test_the_pool_s_reconnects_through_an_outage_are_one_line_each_and_no_call_s(
    own_postgres: LocalPostgres,
) -> None:
    """asyncpg's pool logs each failed reconnect of its floor with a whole traceback, in the
    context of the call that started it (seen in the soak: a dashboard call's request id on
    every line of a Postgres restart). The service logs one line each, without a request."""
    process = subprocess.Popen(
        [sys.executable, "-c", _POOL_OUTAGE, own_postgres.dsn],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "ready"
        own_postgres.stop()
        process.stdin.write("\n")
        process.stdin.flush()
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    pool = [line for line in lines if line["logger"] == "asyncpg.pool"]
    assert pool, err
    for line in pool:
        assert str(line["message"]).startswith(
            "Postgres pool: reconnecting to keep its minimum size failed ("
        ), line
        assert "exception" not in line and "request_id" not in line, line


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_no_credential_reaches_a_log_line_whoever_logs_it(log_format: str) -> None:
    """grpcio logs a refused call's raw metadata, token included, with a traceback; asyncio
    logs callbacks' errors; a DSN may carry a password. The one handler redacts them all."""
    token, other = f"tok-{uuid.uuid4().hex}", f"other-{uuid.uuid4().hex}"
    ran = subprocess.run(
        [sys.executable, "-c", _LEAKY, token, log_format, other],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len([line for line in lines if "[redacted]" in line]) >= 4, lines
    assert token not in ran.stderr and other not in ran.stderr
    assert "db-password-7" not in ran.stderr
