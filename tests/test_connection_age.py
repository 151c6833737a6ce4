"""GRPC_MAX_CONNECTION_AGE_SECONDS: behind a headless Service, a long-lived client resolves the
name again only when a connection ends. With a maximum age, the server ends each connection
after it (a GOAWAY, then the grace for calls in flight), so the client re-resolves and its
calls reach the instances the autoscaler added since, with no failed call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from availability.client import AvailabilityClient
from availability.local_stores import free_port
from availability.server import Server, running
from availability.settings import Settings

from .dns import NameServer


@pytest.fixture
def service_name() -> Iterator[NameServer]:
    names = NameServer("availability.test", ["127.0.0.1"])
    yield names
    names.close()


def _handled(server: Server) -> float:
    assert server.metrics is not None
    return sum(
        sample.value
        for family in server.metrics.registry.collect()
        if family.name == "grpc_server_handled"
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels["grpc_method"] == "CountAvailableMitras"
    )


@pytest.mark.parametrize("age", [0.0, 1.0], ids=["no-age", "age-1s"])
async def test_clients_reach_an_added_instance_after_the_connection_age(
    settings: Settings, service_name: NameServer, age: float
) -> None:
    port = free_port()
    settings = replace(
        settings,
        grpc_max_connection_age_seconds=age,
        grpc_max_connection_age_grace_seconds=1.0,
    )
    async with (
        running(replace(settings, grpc_address=f"127.0.0.1:{port}")) as first,
        AvailabilityClient(
            service_name.target(port),
            attempts=1,
            # Kubernetes' resolvers answer at once; gRPC's default floor between two
            # resolutions (30 s) would only slow the test.
            options=[("grpc.dns_min_time_between_resolutions_ms", 100)],
        ) as client,
    ):
        await client.count_available_mitras()
        async with running(replace(settings, grpc_address=f"127.0.0.2:{port}")) as second:
            service_name.addresses.append("127.0.0.2")  # the autoscaler added a pod
            deadline, calls = time.monotonic() + 4.0, 0
            while time.monotonic() < deadline and not _handled(second):
                await client.count_available_mitras()  # any failure fails the test
                calls += 1
                await asyncio.sleep(0.01)
            reached = _handled(second)
    assert _handled(first) >= 1
    if age:
        assert reached >= 1, f"{calls} calls, none reached the added instance"
    else:
        assert reached == 0, "without a maximum age the client keeps its first connection"
