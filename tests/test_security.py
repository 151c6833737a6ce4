"""Who may call: bearer tokens (several, for rotation), TLS and mutual TLS; health stays open
and reflection can be turned off."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from availability.client import AvailabilityClient
from availability.server import Server, running
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, code_of

GRPCURL = str(Path(sys.executable).parent / "grpcurl")
TOKENS = ("old-token-0123456789", "new-token-9876543210")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def guarded(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Server]:
    async with running(replace(settings, auth_tokens=TOKENS)) as server:
        yield server


async def test_calls_without_a_valid_token_are_unauthenticated(
    guarded: Server, fleet: Fleet, db: asyncpg.Connection
) -> None:
    mitra = str(await fleet.mitra())
    request = pb.SetOnlineRequest(mitra_id=mitra)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = pb_grpc.AvailabilityServiceStub(channel)
        refused = [
            await code_of(stub.SetOnline(request)),
            await code_of(stub.SetOnline(request, metadata=bearer("not-a-token"))),
            await code_of(stub.SetOnline(request, metadata=bearer(TOKENS[0][:-1]))),
            await code_of(
                stub.SetOnline(request, metadata=(("authorization", f"Basic {TOKENS[0]}"),))
            ),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in stub.WatchAvailableMitras(pb.WatchAvailableMitrasRequest()):
                pass
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="")
        )

    assert refused == [UNAUTHENTICATED] * 4
    assert streamed.value.code() == UNAUTHENTICATED
    assert "Bearer" in (streamed.value.details() or "")
    assert TOKENS[0] not in (streamed.value.details() or "")
    assert health.status == health_pb2.HealthCheckResponse.SERVING, "health stays open"
    assert await db.fetchval("SELECT count(*) FROM mitra_online_status") == 0, "nothing written"


async def test_every_configured_token_is_accepted(guarded: Server, fleet: Fleet) -> None:
    """Rotation: the old and the new token both work while both are configured."""
    mitra = await fleet.mitra()
    target = f"127.0.0.1:{guarded.port}"
    async with (
        AvailabilityClient(target, token=TOKENS[0]) as old,
        AvailabilityClient(target, token=TOKENS[1]) as new,
    ):
        online = await old.set_online(mitra)
        status = await new.get_mitra_status(mitra)
        async with new.watch_available() as live:
            await live.wait_in_sync()
    assert online.online and status.online
    assert set(live.mitras) == {mitra}


async def grpcurl(*args: str) -> tuple[int, str, str]:
    """The real grpcurl, without blocking the loop the in-process server runs on."""
    process = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode or 0, out.decode(), err.decode()


async def test_grpcurl_with_a_bearer_header(guarded: Server) -> None:
    address = f"127.0.0.1:{guarded.port}"
    method = "availability.v1.AvailabilityService/CountAvailableMitras"
    header = f"authorization: Bearer {TOKENS[1]}"
    allowed = await grpcurl("-plaintext", "-H", header, "-d", "{}", address, method)
    refused = await grpcurl("-plaintext", "-d", "{}", address, method)
    listed = await grpcurl("-plaintext", "-H", header, address, "list")

    assert allowed[0] == 0, allowed[2]
    assert "as_of" in json.loads(allowed[1])
    assert refused[0] != 0 and "Unauthenticated" in refused[2]
    assert "availability.v1.AvailabilityService" in listed[1], "reflection with the token"


async def test_reflection_can_be_turned_off(settings: Settings, db: asyncpg.Connection) -> None:
    async with (
        running(replace(settings, grpc_reflection=False)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as off:
            async for _ in call:
                pass
    assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    server = ca.issue_cert("127.0.0.1", "localhost")
    files = {
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "ca": tmp_path / "ca.pem",
    }
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    files["key"].write_bytes(server.private_key_pem.bytes())
    files["ca"].write_bytes(ca.cert_pem.bytes())
    return files


def client_credentials(ca: trustme.CA, client: trustme.CA | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca.cert_pem.bytes())
    leaf = client.issue_cert("pairing-service")
    return grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(),
        leaf.private_key_pem.bytes(),
        b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
    )


async def reachable(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    async with AvailabilityClient(target, credentials=credentials, timeout=3.0) as client:
        try:
            await client.count_available_mitras()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_tls_serves_encrypted_only(
    settings: Settings, db: asyncpg.Connection, ca: trustme.CA, tls_files: dict[str, Path]
) -> None:
    tls = replace(
        settings, tls_cert_file=str(tls_files["cert"]), tls_key_file=str(tls_files["key"])
    )
    async with running(tls) as server:
        target = f"127.0.0.1:{server.port}"
        encrypted = await reachable(target, client_credentials(ca, None))
        plaintext = await reachable(target, None)
    assert encrypted == grpc.StatusCode.OK
    assert plaintext == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    settings: Settings, db: asyncpg.Connection, ca: trustme.CA, tls_files: dict[str, Path]
) -> None:
    mutual = replace(
        settings,
        tls_cert_file=str(tls_files["cert"]),
        tls_key_file=str(tls_files["key"]),
        tls_client_ca_file=str(tls_files["ca"]),
    )
    async with running(mutual) as server:
        target = f"127.0.0.1:{server.port}"
        signed = await reachable(target, client_credentials(ca, ca))
        anonymous = await reachable(target, client_credentials(ca, None))
        stranger = await reachable(target, client_credentials(ca, trustme.CA()))
    assert signed == grpc.StatusCode.OK
    assert anonymous == grpc.StatusCode.UNAVAILABLE
    assert stranger == grpc.StatusCode.UNAVAILABLE


async def test_status_reaches_a_server_behind_mutual_tls_and_tokens(
    settings: Settings,
    db: asyncpg.Connection,
    fleet: Fleet,
    ca: trustme.CA,
    tls_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    await fleet.mitra(online=True)
    locked = replace(
        settings,
        auth_tokens=TOKENS,
        tls_cert_file=str(tls_files["cert"]),
        tls_key_file=str(tls_files["key"]),
        tls_client_ca_file=str(tls_files["ca"]),
    )
    leaf = ca.issue_cert("on-call")
    (tmp_path / "client.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    (tmp_path / "client.key").write_bytes(leaf.private_key_pem.bytes())
    async with running(locked) as server:
        env = {
            "PATH": "/usr/bin:/bin",
            "DATABASE_URL": settings.database_url,
            "VALKEY_URL": settings.valkey_url,
            "VALKEY_KEY_PREFIX": settings.valkey_key_prefix,
            "GRPC_ADDRESS": f"127.0.0.1:{server.port}",
            "VALKEY_SLOW_SECONDS": str(settings.valkey_slow_seconds),
            "POSTGRES_SLOW_SECONDS": str(settings.postgres_slow_seconds),
        }
        tls = ["--ca-file", str(tls_files["ca"])]
        mutual = [*tls, "--cert-file", str(tmp_path / "client.pem")]
        mutual += ["--key-file", str(tmp_path / "client.key")]

        async def status(*args: str, tokens: str = ",".join(TOKENS)) -> dict[str, Any]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "availability", "status", "--json", *args,
                env={**env, "AUTH_TOKENS": tokens}, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await process.communicate()
            report: dict[str, Any] = json.loads(out)
            return report

        allowed, anonymous = await status(*mutual), await status(*tls)
        tokenless = await status(*mutual, tokens="")

    assert allowed["ok"] is True, allowed["problems"]
    assert allowed["server"]["health"] == "SERVING" and allowed["server"]["online"] == 1
    assert "UNAUTHENTICATED" in tokenless["server"]["error"]
    assert "error" in anonymous["server"], "no client certificate, no answer"


def _raw_call(port: int, headers: list[tuple[bytes, bytes]]) -> None:
    """One CountAvailableMitras over raw HTTP/2, with headers no gRPC client would send (a
    byte that is not UTF-8, control characters, a megabyte, the header twice)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    # Literal headers: Huffman-coding a megabyte in pure Python takes a minute and a half.
    connection.encoder.encode = functools.partial(connection.encoder.encode, huffman=False)
    ended = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            connection.initiate_connection()
            stream = connection.get_next_available_stream_id()
            connection.send_headers(
                stream,
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":path", b"/availability.v1.AvailabilityService/CountAvailableMitras"),
                    (b":authority", b"127.0.0.1"),
                    (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"),
                    *headers,
                ],
            )
            connection.send_data(stream, b"\x00\x00\x00\x00\x00", end_stream=True)
            sock.sendall(connection.data_to_send())
            while data := sock.recv(65536):
                if any(isinstance(e, ended) for e in connection.receive_data(data)):
                    return
                sock.sendall(connection.data_to_send())
    except OSError:
        return  # the server may close a connection that sent a megabyte of header


def test_malformed_authorization_headers_never_put_the_token_in_a_log(
    settings: Settings, tmp_path: Path
) -> None:
    """The probe that found a token in the log: a valid token followed by a byte that is not
    UTF-8 was refused, and grpcio wrote the raw header at ERROR with a traceback."""
    import subprocess

    from availability.local_stores import free_port

    from .helpers import stop_process, store_env
    from .test_process import _wait_serving

    token = "tok-" + "a1b2c3d4" * 4
    port = free_port()
    log = tmp_path / "serve.log"
    env = store_env(
        settings, f"127.0.0.1:{port}", AUTH_TOKENS=token, LOG_FORMAT="json", METRICS_ADDRESS=""
    )
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", "serve"], env=env, stdout=out, stderr=out
        )
    try:
        _wait_serving(f"127.0.0.1:{port}", process, log)  # type: ignore[arg-type]
        bearer = b"Bearer " + token.encode()
        for headers in (
            [(b"authorization", bearer + b"\xff")],
            [(b"authorization", bearer + b"\x01\x7f")],
            [(b"authorization", bearer + b"x" * 1_000_000)],
            [(b"authorization", bearer), (b"authorization", bearer + b"\xfe")],
        ):
            _raw_call(port, headers)
        _wait_serving(f"127.0.0.1:{port}", process, log)  # type: ignore[arg-type]
    finally:
        stop_process(process)
    text = log.read_text()
    lines = text.splitlines()
    assert all(json.loads(line) for line in lines), "every line stays one JSON object"
    assert any("[redacted]" in line for line in lines), "grpcio logged the header, redacted"
    assert token not in text and token[4:] not in text
