"""BatchHeartbeat: one result per id in request order, each what a unary Heartbeat would
answer; a bad id never fails the call; with Valkey down the batch takes Postgres's guard."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
import redis.asyncio as redis

from availability.local_stores import LocalValkey
from availability.server import Server
from availability.settings import Settings
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import Fleet, code_of, scrape_metrics

Stub = pb_grpc.AvailabilityServiceStub
Result = pb.HeartbeatResult


def outcomes(reply: pb.BatchHeartbeatResponse) -> list[tuple[str, bool, int]]:
    return [(r.mitra_id, r.online, r.outcome) for r in reply.results]


@pytest.mark.single_and_cluster
async def test_each_id_gets_its_own_answer_in_request_order(
    stub: Stub, fleet: Fleet, server: Server, valkey: redis.Redis, settings: Settings
) -> None:
    online = await fleet.mitra("Online")
    offline = await fleet.mitra("Offline")
    deactivated = await fleet.mitra("Deactivated")
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(online)))
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(offline)))
    await stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(offline)))
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(deactivated), active=False))
    ghost = str(uuid.uuid4())
    tag = "{" + settings.valkey_key_prefix + "}"
    await valkey.zadd(f"{tag}:heartbeats", {str(online): 0})
    ids = [str(online), "not-a-uuid", str(offline), ghost, str(deactivated), "", str(online)]

    reply = await stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=ids))

    assert outcomes(reply) == [
        (str(online), True, Result.OUTCOME_RECORDED),
        ("not-a-uuid", False, Result.OUTCOME_INVALID_ID),
        (str(offline), False, Result.OUTCOME_OFFLINE),
        (ghost, False, Result.OUTCOME_NOT_FOUND),
        (str(deactivated), False, Result.OUTCOME_DEACTIVATED),
        ("", False, Result.OUTCOME_INVALID_ID),
        (str(online), True, Result.OUTCOME_RECORDED),
    ]
    assert (await valkey.zscore(f"{tag}:heartbeats", str(online)) or 0) > 0, "recorded"
    assert await valkey.zscore(f"{tag}:heartbeats", str(offline)) is None
    assert server.availability is not None
    assert server.availability.counters.heartbeats == {
        "recorded": 1,  # the same id twice is recorded once
        "offline": 1,
        "not_found": 1,
        "deactivated": 1,
        "invalid_id": 2,
    }


async def test_metrics_count_heartbeats_not_calls(stub: Stub, fleet: Fleet, server: Server) -> None:
    mitras = [await fleet.mitra(f"Mitra {i}") for i in range(3)]
    for mitra in mitras:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))

    await stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=[str(m) for m in mitras]))
    await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitras[0])))
    await stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=["nope", str(uuid.uuid4())]))

    assert server.metrics is not None
    samples = await scrape_metrics(server.metrics.port)
    counted = {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "availability_heartbeats_total"
    }
    assert counted == {"recorded": 4, "invalid_id": 1, "not_found": 1}


async def test_a_batch_above_the_maximum_is_invalid_argument_naming_the_field(
    stub: Stub,
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(5_001)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=ids))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mitra_ids" in (caught.value.details() or "")
    assert "5000" in (caught.value.details() or "").replace(",", "")


async def test_an_empty_batch_answers_nothing(stub: Stub) -> None:
    reply = await stub.BatchHeartbeat(pb.BatchHeartbeatRequest())
    assert list(reply.results) == []


async def test_a_batch_of_thousands_is_split_into_bounded_script_calls(
    stub: Stub, fleet: Fleet, server: Server
) -> None:
    """5,000 ids (the maximum): unknown ones ask Postgres, known ones anywhere in the batch
    are recorded, and no script call carries more than its bound."""
    known = [await fleet.mitra(f"Known {i}") for i in range(4)]
    for mitra in known:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    ids = [str(uuid.uuid4()) for _ in range(5_000)]
    spots = [0, 1_777, 3_001, 4_999]
    for spot, mitra in zip(spots, known, strict=True):
        ids[spot] = str(mitra)
    assert server.availability is not None
    mirror = server.availability.mirror
    before = mirror.heartbeat_calls

    reply = await stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=ids))

    assert [r.mitra_id for r in reply.results] == ids
    recorded = [i for i, r in enumerate(reply.results) if r.outcome == Result.OUTCOME_RECORDED]
    assert recorded == spots
    assert all(
        r.outcome == Result.OUTCOME_NOT_FOUND for i, r in enumerate(reply.results) if i not in spots
    )
    assert mirror.heartbeat_calls - before >= 10, "500 ids a script call at most"


async def test_concurrent_batches_and_single_heartbeats_each_get_their_answers(
    stub: Stub, fleet: Fleet
) -> None:
    online = [await fleet.mitra(f"Online {i}") for i in range(6)]
    deactivated = await fleet.mitra("Deactivated")
    for mitra in online:
        await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(deactivated), active=False))
    batch = [str(m) for m in online[:3]] + [str(deactivated)]

    async def single(mitra: uuid.UUID) -> bool:
        return (await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(mitra)))).online

    async def batched() -> list[int]:
        reply = await stub.BatchHeartbeat(pb.BatchHeartbeatRequest(mitra_ids=batch))
        return [r.outcome for r in reply.results]

    answers = await asyncio.gather(
        *(batched() for _ in range(20)), *(single(m) for m in online[3:] * 20)
    )

    recorded, denied = Result.OUTCOME_RECORDED, Result.OUTCOME_DEACTIVATED
    assert answers[:20] == [[recorded] * 3 + [denied]] * 20
    assert answers[20:] == [True] * 60
    assert await code_of(stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(deactivated)))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


async def test_mitras_the_mirror_has_not_seen_are_answered_by_the_truth_and_resynced(
    stub: Stub, fleet: Fleet, server: Server, valkey: redis.Redis, db: asyncpg.Connection
) -> None:
    # Made with our triggers off: no change is noted, so the mirror cannot have heard of
    # them by the time the batch comes (the change feed would tell it within milliseconds).
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        unseen_online = await fleet.mitra(online=True)
        unseen_deactivated = await fleet.mitra(active=False)

    reply = await stub.BatchHeartbeat(
        pb.BatchHeartbeatRequest(mitra_ids=[str(unseen_deactivated), str(unseen_online)])
    )

    assert outcomes(reply) == [
        (str(unseen_deactivated), False, Result.OUTCOME_DEACTIVATED),
        (str(unseen_online), True, Result.OUTCOME_RECORDED),
    ]
    tag = "{" + server.settings.valkey_key_prefix + "}"
    assert await valkey.sismember(f"{tag}:online", str(unseen_online)), "resynced"
    assert server.availability is not None
    assert server.availability.counters.mirror_misses["heartbeat"] == 2


async def test_with_valkey_down_the_batch_takes_the_postgres_guard(
    server_on_own_valkey: Server, own_valkey: LocalValkey, fleet: Fleet, db: asyncpg.Connection
) -> None:
    active, offline, deactivated = [await fleet.mitra(n) for n in ("A", "O", "D")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_on_own_valkey.port}") as channel:
        stub = pb_grpc.AvailabilityServiceStub(channel)
        for mitra in (active, deactivated):
            await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
        await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(deactivated), active=False))
        await db.execute(
            "UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'"
            " WHERE mitra_id = ANY($1::uuid[])",
            [active, offline, deactivated],
        )
        own_valkey.stop()
        ghost = str(uuid.uuid4())

        reply = await stub.BatchHeartbeat(
            pb.BatchHeartbeatRequest(
                mitra_ids=[str(deactivated), str(active), ghost, str(offline), "x"]
            )
        )

    assert outcomes(reply) == [
        (str(deactivated), False, Result.OUTCOME_DEACTIVATED),
        (str(active), True, Result.OUTCOME_RECORDED),
        (ghost, False, Result.OUTCOME_NOT_FOUND),
        (str(offline), False, Result.OUTCOME_OFFLINE),
        ("x", False, Result.OUTCOME_INVALID_ID),
    ]
    ages = dict(
        await db.fetch(
            "SELECT mitra_id, extract(epoch FROM now() - last_heartbeat_at) FROM"
            " mitra_online_status WHERE mitra_id = ANY($1::uuid[])",
            [active, deactivated],
        )
    )
    assert ages[active] < 60, "recorded in Postgres"
    assert ages[deactivated] > 3_000, "a deactivated mitra's heartbeat is not recorded"
    assert server_on_own_valkey.availability is not None
    assert server_on_own_valkey.availability.counters.fallbacks["heartbeat"] == 4
