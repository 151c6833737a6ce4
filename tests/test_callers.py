"""Named callers (AUTH_CALLERS_FILE): every scope against every RPC, tokens by digest only,
client certificates mapped to callers, rotation by reload (file change and SIGHUP, in every
worker) with no failed call, and the caller's name in logs, metrics and spans."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from availability.callers import SCOPES, CallersError, hash_token, parse
from availability.local_stores import free_port
from availability.logs import JsonFormatter
from availability.server import Server, running
from availability.settings import Settings, SettingsError
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from availability.v1 import dashboard_pb2 as dashboard_pb

from .callers_file import callers_toml, token, write_callers
from .certificates import Authority
from .helpers import Fleet, code_of, eventually, scrape_metrics, stop_process, store_env

SERVICES = (
    pb.DESCRIPTOR.services_by_name["AvailabilityService"],
    dashboard_pb.DESCRIPTOR.services_by_name["DashboardService"],
)
RPCS = {m.name: m for service in SERVICES for m in service.methods}
EVERY_RPC = frozenset(RPCS)

GRANTS: dict[str, frozenset[str]] = {
    "presence": frozenset({"SetOnline", "SetOffline", "Heartbeat", "BatchHeartbeat"}),
    "read": frozenset(
        {
            "GetMitraStatus",
            "IsMitraReachable",
            "FindAvailableMitras",
            "CountAvailableMitras",
            "WatchAvailableMitras",
        }
    ),
    "load": frozenset({"RecomputeLoad"}),
    "admin": frozenset({"SetMitraActive"}),
    "dashboard": frozenset({"GetDashboardStats", "WatchDashboardStats"}),
    "*": EVERY_RPC,
}
"""The issue's table, as written there: what each scope grants."""

DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def call(
    channel: grpc.aio.Channel,
    rpc: str,
    metadata: tuple[tuple[str, str], ...] = (),
    request: Any = None,
) -> tuple[grpc.StatusCode, str]:
    """Any RPC by name with an empty request (or the one given); a stream counts as answered
    at its first message. The code and the details."""
    method = RPCS[rpc]
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = (
        request if request is not None else message_factory.GetMessageClass(method.input_type)()
    )
    reply = message_factory.GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=reply.FromString,
            )(request, metadata=metadata, timeout=10)
            async for _ in stream:
                stream.cancel()
                break
        else:
            await channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=reply.FromString,
            )(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def callers_path(tmp_path: Path) -> Path:
    return tmp_path / "callers.toml"


def guarded_settings(settings: Settings, path: Path) -> Settings:
    return replace(settings, auth_callers_file=str(path), auth_callers_poll_seconds=0.1)


def test_the_table_covers_every_rpc_and_every_scope() -> None:
    """A new RPC must be given a scope here (and in callers.SCOPE_METHODS), or only `*` has it."""
    assert set(GRANTS) == set(SCOPES)
    named = set().union(*(rpcs for scope, rpcs in GRANTS.items() if scope != "*"))
    assert named == EVERY_RPC


@pytest.mark.parametrize("scope", sorted(GRANTS))
async def test_each_scope_grants_exactly_its_rpcs(
    scope: str, settings: Settings, db: asyncpg.Connection, callers_path: Path
) -> None:
    secret = token("caller")
    name = f"holds-{scope}".replace("*", "all")
    write_callers(callers_path, {name: {"tokens": [secret], "scopes": [scope]}})
    outcomes: dict[str, tuple[grpc.StatusCode, str]] = {}
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        for rpc in sorted(EVERY_RPC):
            outcomes[rpc] = await call(channel, rpc, bearer(secret))

    table = "\n".join(f"  {scope:9} {rpc:22} {code.name}" for rpc, (code, _) in outcomes.items())
    print(f"\nscope {scope!r} against every RPC:\n{table}")
    for rpc, (code, details) in outcomes.items():
        if rpc in GRANTS[scope]:
            assert code not in (DENIED, UNAUTHENTICATED), (rpc, code, details)
        else:
            assert code == DENIED, (rpc, code, details)
            assert f"caller {name} " in details and rpc in details, details
    audited = "SELECT count(*) FROM availability_audit WHERE caller = $1"
    assert await db.fetchval(audited, name) == 0, "calls refused or invalid change nothing"


async def test_unknown_credentials_are_unauthenticated_and_health_stays_open(
    settings: Settings, db: asyncpg.Connection, callers_path: Path
) -> None:
    secret = token("pairing")
    write_callers(callers_path, {"pairing": {"tokens": [secret], "scopes": ["read"]}})
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        refused = [
            (await call(channel, "CountAvailableMitras", metadata))[0]
            for metadata in (
                (),
                bearer("not-a-token"),
                bearer(secret[:-1]),
                bearer(hash_token(secret)),  # the digest is not a credential
                (("authorization", f"Basic {secret}"),),
            )
        ]
        streamed = await call(channel, "WatchAvailableMitras")
        allowed = await call(channel, "CountAvailableMitras", bearer(secret))
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def services(metadata: tuple[tuple[str, str], ...]) -> list[str]:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            names = []
            async for reply in reflection.ServerReflectionInfo(iter([request]), metadata=metadata):
                names += [s.name for s in reply.list_services_response.service]
            return names

        listed = await services(bearer(secret))
        # Refused on its metadata alone: a request written meanwhile can race the refusal in
        # the client, which then reports INTERNAL ("Failed execute_batch").
        unlisted = await reflection.ServerReflectionInfo(metadata=()).code()

    assert refused == [UNAUTHENTICATED] * 5
    assert streamed[0] == UNAUTHENTICATED and "Bearer" in streamed[1]
    assert allowed[0] == grpc.StatusCode.OK
    assert health.status == health_pb2.HealthCheckResponse.SERVING, "health stays open"
    assert "availability.v1.AvailabilityService" in listed, "reflection: any known caller"
    assert unlisted == UNAUTHENTICATED


async def test_client_certificates_map_to_callers_by_san_uri_dns_or_cn(
    settings: Settings, db: asyncpg.Connection, callers_path: Path, tmp_path: Path
) -> None:
    authority = Authority()
    files = authority.server_files(tmp_path)
    write_callers(
        callers_path,
        {
            "chat-backend": {"tls_identities": ["spiffe://halo/chat-backend"], "scopes": ["read"]},
            "pairing": {"tls_identities": ["pairing.halo.internal"], "scopes": ["read"]},
            "on-call": {"tls_identities": ["on-call-laptop"], "scopes": ["dashboard"]},
            "admin-console": {"tokens": [admin := token("admin")], "scopes": ["admin"]},
        },
    )
    mutual = replace(
        guarded_settings(settings, callers_path),
        tls_cert_file=str(files["cert"]),
        tls_key_file=str(files["key"]),
        tls_client_ca_file=str(files["ca"]),
    )
    leaves = {
        "chat-backend": authority.issue("chat-backend-7f9c", uris=("spiffe://halo/chat-backend",)),
        "pairing": authority.issue("pairing-3", dns=("pairing.halo.internal",)),
        "on-call": authority.issue("on-call-laptop"),
        "stranger": authority.issue("stranger", dns=("stranger.halo.internal",)),
    }
    seen: dict[str, tuple[grpc.StatusCode, str]] = {}
    allowed: dict[str, grpc.StatusCode] = {}
    async with running(mutual) as server:
        for holder, leaf in leaves.items():
            credentials = grpc.ssl_channel_credentials(
                authority.cert_pem, leaf.key_pem, leaf.cert_pem
            )
            async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
                seen[holder] = await call(channel, "SetMitraActive")
                granted = "GetDashboardStats" if holder == "on-call" else "CountAvailableMitras"
                allowed[holder] = (await call(channel, granted))[0]
                if holder == "chat-backend":
                    # A token, when sent, names the caller, whatever the certificate says.
                    as_admin = await call(channel, "SetMitraActive", bearer(admin))

    for holder in ("chat-backend", "pairing", "on-call"):
        code, details = seen[holder]
        assert code == DENIED and f"caller {holder} " in details, (holder, details)
        assert allowed[holder] == grpc.StatusCode.OK, holder
    assert seen["stranger"][0] == UNAUTHENTICATED, "signed by the CA, but no caller's identity"
    assert allowed["stranger"] == UNAUTHENTICATED
    assert as_admin[0] == grpc.StatusCode.INVALID_ARGUMENT, as_admin  # admitted, then validated


async def test_tokens_rotate_by_reload_under_load_without_a_failed_call(
    settings: Settings, db: asyncpg.Connection, fleet: Fleet, callers_path: Path
) -> None:
    """The operator's rotation: add the new digest beside the old, move the callers to the
    new token, drop the old digest. Calls run all along, and every one succeeds."""
    old, new = token("old"), token("new")
    mitra = str(await fleet.mitra(online=True))
    write_callers(callers_path, {"pairing": {"tokens": [old], "scopes": ["read"]}})
    current = {"token": old}
    failures: list[str] = []
    calls = 0
    stop = asyncio.Event()
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert server.callers is not None
        stub = pb_grpc.AvailabilityServiceStub(channel)

        async def load() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    await stub.GetMitraStatus(
                        pb.GetMitraStatusRequest(mitra_id=mitra), metadata=bearer(current["token"])
                    )
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                calls += 1

        async def reloads(count: int) -> bool:
            assert server.callers is not None
            return server.callers.reloads >= count

        workers = [asyncio.create_task(load()) for _ in range(8)]
        await asyncio.sleep(0.3)
        write_callers(callers_path, {"pairing": {"tokens": [old, new], "scopes": ["read"]}})
        await eventually(lambda: reloads(1))
        await asyncio.sleep(0.3)
        current["token"] = new
        await asyncio.sleep(0.3)
        write_callers(callers_path, {"pairing": {"tokens": [new], "scopes": ["read"]}})
        await eventually(lambda: reloads(2))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        retired = await code_of(
            stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=mitra), metadata=bearer(old))
        )

    print(f"\n{calls} calls during the rotation, {len(failures)} failed")
    assert calls > 100
    assert failures == []
    assert retired == UNAUTHENTICATED


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logged() -> Iterator[Lines]:
    lines = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(lines)
        root.setLevel(level)


async def test_a_file_that_does_not_parse_keeps_the_last_good_one_and_never_logs_a_token(
    settings: Settings, db: asyncpg.Connection, callers_path: Path, logged: Lines
) -> None:
    secret = token("pairing")
    write_callers(callers_path, {"pairing": {"tokens": [secret], "scopes": ["read"]}})
    pasted = token("pasted")  # a token where its digest belongs
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert server.callers is not None
        write_callers(callers_path, '[callers.pairing\ntoken_sha256 = ["')
        await eventually(lambda: _failed(server, 1))
        write_callers(
            callers_path,
            callers_toml({"pairing": {"token_sha256": [pasted], "scopes": ["read"]}}),
        )
        await eventually(lambda: _failed(server, 2))
        await asyncio.sleep(0.3)  # more polls of the same bad file: no more lines
        still = await call(channel, "CountAvailableMitras", bearer(secret))
        pasted_refused = await call(channel, "CountAvailableMitras", bearer(pasted))
        bad_token = await call(channel, "CountAvailableMitras", bearer(token("wrong")))
        denied = await call(channel, "SetMitraActive", bearer(secret))
        assert server.reload_callers() is False, "SIGHUP on the same bad file"

    errors = [json.loads(line) for line in logged.lines if '"level": "ERROR"' in line]
    assert still[0] == grpc.StatusCode.OK, "the last good file stays in force"
    assert pasted_refused[0] == bad_token[0] == UNAUTHENTICATED
    assert denied[0] == DENIED
    assert len(errors) == 3, errors  # one a bad content, and the forced reload
    assert "not valid TOML" in errors[0]["message"]
    assert "token_sha256[0] is not a SHA-256 digest" in errors[1]["message"]
    assert all("keeping the 1 callers" in e["message"] for e in errors)
    text = "\n".join(logged.lines)
    assert secret not in text and pasted not in text, "no token in any log line"


async def _failed(server: Server, count: int) -> bool:
    assert server.callers is not None
    return server.callers.failed_reloads >= count


def test_token_sha256_takes_digests_only() -> None:
    pasted = token("pasted")
    good = hash_token(pasted)
    roster = parse(
        callers_toml({"a": {"token_sha256": [good.upper()], "scopes": ["read"]}}).encode()
    )
    assert roster.by_token(pasted.encode()) is not None, "hex digits in either case"
    for wrong in (pasted, good[:-1], good + "0", "z" * 64, ""):
        with pytest.raises(CallersError) as refused:
            parse(callers_toml({"a": {"token_sha256": [wrong], "scopes": ["read"]}}).encode())
        assert "callers.a.token_sha256" in str(refused.value)
        assert not wrong or wrong not in str(refused.value), "the value is never repeated"
    problems = {
        "no callers": "",
        "unknown scope": callers_toml({"a": {"token_sha256": [good], "scopes": ["writes"]}}),
        "no scopes": callers_toml({"a": {"token_sha256": [good]}}),
        "no credential": callers_toml({"a": {"scopes": ["read"]}}),
        "unknown key": callers_toml({"a": {"token": [pasted], "scopes": ["read"]}}),
        "shared digest": callers_toml(
            {
                "a": {"token_sha256": [good], "scopes": ["read"]},
                "b": {"token_sha256": [good], "scopes": ["read"]},
            }
        ),
        "bad limit": callers_toml(
            {"a": {"token_sha256": [good], "scopes": ["read"], "max_in_flight": 0}}
        ),
    }
    for problem, text in problems.items():
        with pytest.raises(CallersError) as refused:
            parse(text.encode())
        assert pasted not in str(refused.value), problem


def _base_env(path: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": "postgresql://unused/db",
        "VALKEY_URL": "redis://unused",
        "AUTH_CALLERS_FILE": str(path),
        **extra,
    }


def test_start_up_refuses_both_modes_and_a_bad_file_with_one_line(callers_path: Path) -> None:
    secret, pasted = token("pairing"), token("pasted")
    write_callers(callers_path, {"pairing": {"tokens": [secret], "scopes": ["read"]}})
    assert Settings.from_env(_base_env(callers_path)).auth_callers_file == str(callers_path)
    with pytest.raises(SettingsError, match="AUTH_TOKENS and AUTH_CALLERS_FILE"):
        Settings.from_env(_base_env(callers_path, AUTH_TOKENS="some-token"))
    both = subprocess.run(
        [sys.executable, "-m", "availability", "serve"],
        env=_base_env(callers_path, AUTH_TOKENS="some-token"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    write_callers(callers_path, {"pairing": {"token_sha256": [pasted], "scopes": ["read"]}})
    bad = subprocess.run(
        [sys.executable, "-m", "availability", "serve"],
        env=_base_env(callers_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    missing = subprocess.run(
        [sys.executable, "-m", "availability", "serve"],
        env=_base_env(callers_path.with_name("nowhere.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 2 and "AUTH_TOKENS and AUTH_CALLERS_FILE" in both.stderr
    assert bad.returncode == 2 and "token_sha256[0]" in bad.stderr, bad.stderr
    assert pasted not in bad.stderr
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    for run in (both, bad, missing):
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_hash_token_reads_an_argument_or_stdin() -> None:
    secret = token("pairing")
    command = [sys.executable, "-m", "availability", "hash-token"]
    piped = subprocess.run(command, input=f"{secret}\n", capture_output=True, text=True, timeout=60)
    argument = subprocess.run([*command, secret], capture_output=True, text=True, timeout=60)
    empty = subprocess.run(command, input="\n", capture_output=True, text=True, timeout=60)
    expected = __import__("hashlib").sha256(secret.encode()).hexdigest()
    assert piped.stdout.strip() == argument.stdout.strip() == expected
    assert empty.returncode == 2 and "no token" in empty.stderr


async def test_the_caller_is_in_every_log_line_the_metrics_and_the_span(
    settings: Settings, db: asyncpg.Connection, fleet: Fleet, callers_path: Path, logged: Lines
) -> None:
    secret = token("chat")
    write_callers(
        callers_path, {"chat-backend": {"tokens": [secret], "scopes": ["presence", "read"]}}
    )
    mitra = str(await fleet.mitra())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with (
        running(guarded_settings(settings, callers_path), tracer_provider=provider) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await call(channel, "SetOnline", bearer(secret), pb.SetOnlineRequest(mitra_id=mitra))
        await call(channel, "GetMitraStatus", bearer(secret), pb.GetMitraStatusRequest())
        await call(channel, "SetMitraActive", bearer(secret))
        await call(channel, "GetMitraStatus", bearer(token("stranger")))
        assert server.metrics is not None
        samples = await scrape_metrics(server.metrics.port)

    lines = [json.loads(line) for line in logged.lines]
    in_calls = [line for line in lines if "method" in line]
    rpc_lines = [line for line in in_calls if line["logger"] == "availability.rpc"]
    assert len(rpc_lines) == 4
    assert all("caller" in line for line in in_calls)
    assert [line["caller"] for line in rpc_lines] == ["chat-backend"] * 3 + ["-"]
    handled = {
        (dict(labels)["grpc_method"], dict(labels)["grpc_code"], dict(labels)["caller"]): value
        for (name, labels), value in samples.items()
        if name == "grpc_server_handled_total"
    }
    assert handled[("SetOnline", "OK", "chat-backend")] == 1
    assert handled[("SetMitraActive", "PERMISSION_DENIED", "chat-backend")] == 1
    assert handled[("GetMitraStatus", "UNAUTHENTICATED", "-")] == 1
    spans = exporter.get_finished_spans()
    assert [s.attributes["availability.caller"] for s in spans if s.attributes] == [
        "chat-backend",
        "chat-backend",
        "chat-backend",
        "-",
    ]
    assert secret not in "\n".join(logged.lines)


@pytest.fixture
def workers(
    settings: Settings, db: asyncpg.Connection, callers_path: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, list[str]]]:
    """`availability serve --workers 2` polling the file only once an hour: SIGHUP reloads."""
    tokens = [token("first"), token("second")]
    write_callers(callers_path, {"pairing": {"tokens": [tokens[0]], "scopes": ["read"]}})
    address = f"127.0.0.1:{free_port()}"
    env = store_env(
        settings,
        address,
        AUTH_CALLERS_FILE=str(callers_path),
        AUTH_CALLERS_POLL_SECONDS="3600",
        AUTH_REFUSALS_PER_PEER_PER_SECOND="0",  # the old token's refusals are counted here
        METRICS_ADDRESS="",
        LOG_FORMAT="json",
    )
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "availability", "serve", "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield process, address, tokens
    finally:
        stop_process(process)
        log.close()


async def test_sighup_reloads_every_worker(
    workers: tuple[subprocess.Popen[bytes], str, list[str]], callers_path: Path
) -> None:
    process, address, (first, second) = workers

    async def codes(secret: str, connections: int = 24) -> set[grpc.StatusCode]:
        """One call on each of many new connections, which the kernel spreads over both
        workers (SO_REUSEPORT)."""
        found = set()
        for _ in range(connections):
            async with grpc.aio.insecure_channel(address) as channel:
                found.add((await call(channel, "CountAvailableMitras", bearer(secret)))[0])
        return found

    def listening() -> int:
        """Sockets listening on the port: one a worker (SO_REUSEPORT)."""
        port = f"{int(address.rpartition(':')[2]):04X}"
        return sum(
            line.split()[1].endswith(f":{port}") and line.split()[3] == "0A"
            for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for line in Path(table).read_text().splitlines()[1:]
        )

    async def serving() -> bool:
        # Both workers up before the file changes, or a late one starts on the new file.
        return listening() >= 2 and await codes(first, 4) == {grpc.StatusCode.OK}

    await eventually(serving, timeout=60, interval=0.5)
    write_callers(callers_path, {"pairing": {"tokens": [second], "scopes": ["read"]}})
    await asyncio.sleep(0.5)
    before = await codes(second)
    process.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return await codes(second, 8) == {grpc.StatusCode.OK}

    await eventually(reloaded, timeout=10, interval=0.2)
    after_new, after_old = await codes(second), await codes(first)

    assert before == {UNAUTHENTICATED}, "no reload before the signal (polling once an hour)"
    assert after_new == {grpc.StatusCode.OK}, "every worker took the new file"
    assert after_old == {UNAUTHENTICATED}
    assert process.poll() is None, "SIGHUP does not stop the server"


async def test_status_asks_with_a_callers_token_from_a_file(
    settings: Settings, db: asyncpg.Connection, fleet: Fleet, callers_path: Path, tmp_path: Path
) -> None:
    secret = token("on-call")
    write_callers(callers_path, {"on-call": {"tokens": [secret], "scopes": ["read"]}})
    (tmp_path / "token").write_text(f"{secret}\n")
    await fleet.mitra(online=True)
    async with running(guarded_settings(settings, callers_path)) as server:
        env = store_env(settings, f"127.0.0.1:{server.port}")

        async def status(*args: str) -> dict[str, Any]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "availability", "status", "--json", *args,
                env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await process.communicate()
            report: dict[str, Any] = json.loads(out)
            return report

        with_token = await status("--token-file", str(tmp_path / "token"))
        without = await status()

    assert with_token["ok"] is True, with_token["problems"]
    assert with_token["server"]["online"] == 1
    assert "UNAUTHENTICATED" in without["server"]["error"]


def test_a_callers_file_others_may_write_is_refused_at_start_up(callers_path: Path) -> None:
    """As OpenSSH refuses an authorized_keys that others may write: whoever can write the file
    can name themselves any caller."""
    write_callers(callers_path, {"pairing": {"tokens": [token("pairing")], "scopes": ["read"]}})
    callers_path.chmod(0o664)
    with pytest.raises(SettingsError, match=r"writable by group \(mode 0664\); chmod go-w"):
        Settings.from_env(_base_env(callers_path))
    callers_path.chmod(0o646)
    refused = subprocess.run(
        [sys.executable, "-m", "availability", "serve"],
        env=_base_env(callers_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "writable by others (mode 0646)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


async def test_a_callers_file_others_may_write_is_refused_on_reload(
    settings: Settings, db: asyncpg.Connection, callers_path: Path
) -> None:
    secret, intruder = token("pairing"), token("intruder")
    write_callers(callers_path, {"pairing": {"tokens": [secret], "scopes": ["read"]}})
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert server.callers is not None
        _replace_writable_by_all(
            callers_path, callers_toml({"intruder": {"tokens": [intruder], "scopes": ["*"]}})
        )
        assert server.reload_callers() is False
        assert server.callers.failed_reloads == 1
        kept = await call(channel, "CountAvailableMitras", bearer(secret))
        stranger = await call(channel, "CountAvailableMitras", bearer(intruder))
    assert kept[0] == grpc.StatusCode.OK, "the last good roster stays in force"
    assert stranger[0] == UNAUTHENTICATED


def _replace_writable_by_all(path: Path, text: str) -> None:
    """Someone else's edit: a new file that anyone may write, renamed over the old one."""
    fresh = path.with_name(f".{path.name}.other")
    fresh.write_text(text)
    fresh.chmod(0o666)
    os.replace(fresh, path)


async def test_unknown_methods_answer_like_known_ones(
    settings: Settings, db: asyncpg.Connection, callers_path: Path
) -> None:
    """Without credentials an unknown method is UNAUTHENTICATED, as a known one is: a stranger
    learns nothing of which methods exist. A known caller learns it is UNIMPLEMENTED."""
    secret = token("pairing")
    write_callers(callers_path, {"pairing": {"tokens": [secret], "scopes": ["read"]}})
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        nowhere = channel.unary_unary("/availability.v1.AvailabilityService/Nowhere")
        codes = []
        for metadata in ((), bearer("not-a-token"), bearer(secret)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await nowhere(b"", metadata=metadata, timeout=5)
            codes.append(refused.value.code())
    assert codes == [UNAUTHENTICATED, UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED]


async def test_refused_credentials_are_logged_once_a_second_with_their_count(
    settings: Settings, db: asyncpg.Connection, callers_path: Path, logged: Lines
) -> None:
    write_callers(callers_path, {"pairing": {"tokens": [token("pairing")], "scopes": ["read"]}})
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        started = time.monotonic()
        for _ in range(200):
            refused = await call(channel, "CountAvailableMitras", bearer("not-a-token"))
            # Past the peer's budget of refusals: told to back off (the next test).
            assert refused[0] in (UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    shown = [json.loads(line) for line in logged.lines]
    about = [
        line["message"]
        for line in shown
        if line["level"] != "DEBUG" and ("refused" in line["message"] or "UNAUTH" in str(line))
    ]
    seconds = time.monotonic() - started  # about 1 s; more on a loaded machine
    # One a second (with the count), not one a call.
    assert 1 <= len(about) <= math.ceil(seconds) + 1, (seconds, about)
    assert "missing or unknown credentials" in about[0]


async def test_a_peer_past_its_budget_of_unknown_credentials_is_told_to_back_off(
    settings: Settings, db: asyncpg.Connection, callers_path: Path
) -> None:
    """AUTH_REFUSALS_PER_PEER_PER_SECOND: a client looping on a wrong token gets
    RESOURCE_EXHAUSTED with a retry hint past its budget; a known caller on the same host is
    never held back; after the hint, the peer is answered UNAUTHENTICATED again."""
    secret = token("pairing")
    write_callers(callers_path, {"pairing": {"tokens": [secret], "scopes": ["read"]}})
    limited = replace(
        guarded_settings(settings, callers_path), auth_refusals_per_peer_per_second=5.0
    )
    async with (
        running(limited) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        codes, hints = [], []
        for _ in range(30):
            try:
                await stub.CountAvailableMitras(
                    pb.CountAvailableMitrasRequest(), metadata=bearer("guess"), timeout=5
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                hints += [v for k, v in exc.trailing_metadata() or () if k == "retry-after-ms"]
            known = await call(channel, "CountAvailableMitras", bearer(secret))
            assert known[0] == grpc.StatusCode.OK, "a known caller on the same peer is served"
        assert codes[:5] == [UNAUTHENTICATED] * 5, "the budget: 5 at once"
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 15, codes
        assert grpc.StatusCode.OK not in codes
        assert hints and all(0 < int(h) <= 200 for h in hints), hints
        # A token comes back every 1/rate s (200 ms): the budget is whole again after that,
        # however the loop's last calls fell (on a loaded machine, its last call may have
        # taken the token a refused call's hint counted on).
        await asyncio.sleep(1 / limited.auth_refusals_per_peer_per_second + 0.05)
        assert (await call(channel, "CountAvailableMitras", bearer("guess")))[0] == UNAUTHENTICATED


@pytest.mark.parametrize(
    ("change", "code"),
    [("removed", UNAUTHENTICATED), ("narrowed", DENIED)],
)
async def test_a_reload_ends_the_streams_it_revokes(
    settings: Settings, db: asyncpg.Connection, callers_path: Path, change: str, code: object
) -> None:
    """A caller taken out of the file, or out of the scope, loses its open watch at the next
    reload (not at its next call): its stream ends with the code a new call would get."""
    watcher, other = token("pairing"), token("other")
    write_callers(
        callers_path,
        {
            "pairing": {"tokens": [watcher], "scopes": ["read"]},
            "other": {"tokens": [other], "scopes": ["read"]},
        },
    )
    async with (
        running(guarded_settings(settings, callers_path)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = pb_grpc.AvailabilityServiceStub(channel)
        watched = stub.WatchAvailableMitras(
            pb.WatchAvailableMitrasRequest(), metadata=bearer(watcher)
        )
        kept = stub.WatchAvailableMitras(pb.WatchAvailableMitrasRequest(), metadata=bearer(other))
        assert (await watched.read()).HasField("snapshot")
        assert (await kept.read()).HasField("snapshot")
        pairing = {"tokens": [watcher], "scopes": ["dashboard"]} if change == "narrowed" else None
        write_callers(
            callers_path,
            {
                **({"pairing": pairing} if pairing else {}),
                "other": {"tokens": [other], "scopes": ["read"]},
            },
        )
        assert server.reload_callers()
        async with asyncio.timeout(5):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await _read_to_the_end(watched)
        assert ended.value.code() == code
        assert kept.done() is False, "a caller the reload kept keeps its stream"
        kept.cancel()


async def _read_to_the_end(stream: Any) -> None:
    while True:
        await stream.read()


async def test_a_failing_reload_is_counted_and_a_problem_in_status_until_a_good_file_loads(
    settings: Settings, db: asyncpg.Connection, callers_path: Path
) -> None:
    from .test_status import reported

    secret = token("pairing")
    good = {"pairing": {"tokens": [secret], "scopes": ["read"]}}
    write_callers(callers_path, good)
    async with running(guarded_settings(settings, callers_path)) as server:
        assert server.callers is not None and server.metrics is not None
        write_callers(callers_path, "[callers.pairing\n")
        assert server.reload_callers() is False
        failing = await scrape_metrics(server.metrics.port)
        status = await reported(server)
        write_callers(callers_path, {**good, "other": {"tokens": [token("o")], "scopes": ["*"]}})
        assert server.reload_callers() is True
        healed = await scrape_metrics(server.metrics.port)

        async def healed_in_status() -> bool:
            problems = (await reported(server))["problems"]
            return not any("AUTH_CALLERS_FILE" in p for p in problems)

        await eventually(healed_in_status, timeout=10, what="no callers problem once it loads")
    assert failing[("availability_callers_reload_errors_total", ())] >= 1
    assert failing[("availability_callers_reload_failing", ())] == 1
    assert any("AUTH_CALLERS_FILE failed to reload" in p for p in status["problems"])
    assert healed[("availability_callers_reload_failing", ())] == 0
