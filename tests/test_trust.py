"""The mirror is trusted only in the data set a seed wrote. A Valkey restored from an older
snapshot, a replica promoted behind the same address, a flush or an eviction each leave a data
set that may predate Postgres, often with the seed's marker inside it: no instance answers
from it, and no deactivated mitra is ever served, until a reseed made it equal to Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from uuid import UUID

import asyncpg
import grpc
import redis.asyncio as redis

from availability import local_stores
from availability.local_stores import LocalValkey
from availability.mirror import Keys, Trust
from availability.server import Server, running
from availability.settings import Settings
from availability.sweeps import AUTO_OFFLINE
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc
from bench.trust import Endpoint

from .helpers import Fleet, code_of, eventually
from .test_sweeps import tick
from .test_watch import _true, snapshot_ids, watching

Stub = pb_grpc.AvailabilityServiceStub


@dataclass
class Pairing:
    """Reads as the pairing service and the backends make them, all along a fault: every
    answer that offered the deactivated mitra is a violation."""

    stub: Stub
    deactivated: str
    violations: list[str] = field(default_factory=list)
    sources: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    reads: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                reachable = await self.stub.IsMitraReachable(
                    pb.IsMitraReachableRequest(mitra_id=self.deactivated)
                )
                found = await self.stub.FindAvailableMitras(
                    pb.FindAvailableMitrasRequest(limit=1000)
                )
                self.codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                self.codes[exc.code().name] += 1
                continue
            self.reads += 2
            self.sources[reachable.source] += 1
            self.sources[found.source] += 1
            if reachable.reachable:
                self.violations.append(f"reachable from {pb.Source.Name(reachable.source)}")
            if self.deactivated in {m.mitra_id for m in found.mitras}:
                self.violations.append(f"offered from {pb.Source.Name(found.source)}")
            code = await code_of(
                self.stub.Heartbeat(pb.HeartbeatRequest(mitra_id=self.deactivated))
            )
            if code != grpc.StatusCode.PERMISSION_DENIED:
                self.violations.append(f"heartbeat answered {code.name}")
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def pairing(stub: Stub, deactivated: UUID) -> AsyncIterator[Pairing]:
    reads = Pairing(stub, str(deactivated))
    stop = asyncio.Event()
    task = asyncio.create_task(reads.run(stop))
    try:
        yield reads
    finally:
        stop.set()
        await task


async def online_in_truth(db: asyncpg.Connection) -> set[str]:
    rows = await db.fetch("SELECT mitra_id FROM mitra_online_status WHERE is_online")
    return {str(r[0]) for r in rows}


async def from_cache(stub: Stub) -> bool:
    reply = await stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=1000))
    return reply.source == pb.SOURCE_CACHE


async def mirror_equals_truth(direct: redis.Redis, keys: Keys, db: asyncpg.Connection) -> bool:
    deactivated = {str(r[0]) for r in await db.fetch("SELECT id FROM mitras WHERE NOT is_active")}
    return (
        await direct.smembers(keys.online) == await online_in_truth(db)
        and await direct.smembers(keys.deactivated) == deactivated
    )


def trust_of(server: Server) -> Trust | None:
    assert server.availability is not None
    check = server.availability.mirror.trust
    return None if check is None else check.verdict


async def test_a_valkey_restored_from_an_older_snapshot_never_serves_what_it_predates(
    settings: Settings, own_valkey: LocalValkey, fleet: Fleet, db: asyncpg.Connection
) -> None:
    """own_valkey loads dump.rdb from its folder when it starts, as one with RDB persistence
    does, or one a managed service restores from a snapshot."""
    on_own = replace(settings, valkey_url=own_valkey.url)
    keys = Keys.for_prefix(on_own.valkey_key_prefix)
    mitras = [await fleet.mitra(f"M{i}", online=True) for i in range(10)]
    abusive, beating = mitras[0], mitras[1]
    direct = redis.Redis(port=own_valkey.port, decode_responses=True)
    async with (
        running(on_own) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = Stub(channel)
        before = await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(abusive)))
        assert before.reachable and before.source == pb.SOURCE_CACHE
        await direct.save()  # the snapshot: the seed's marker and the mitra active inside it
        await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(abusive), active=False))
        assert not await direct.sismember(keys.online, str(abusive)), "the mirror had it"

        async with pairing(stub, abusive) as reads:
            await asyncio.to_thread(own_valkey.kill)
            await asyncio.to_thread(own_valkey.start)  # loads the older dump.rdb
            restarted = time.monotonic()
            beat = await stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(beating)))
            assert beat.online, "a heartbeat meanwhile is taken (by Postgres)"
            await eventually(lambda: from_cache(stub), timeout=15)
            trusted_after = time.monotonic() - restarted
            await asyncio.sleep(0.5)

        assert reads.violations == [], reads.violations[:5]
        assert set(reads.codes) == {"OK"}, reads.codes
        assert server.availability is not None and server.sweeps is not None
        assert server.availability.mirror.distrusted >= 1, "the old marker was seen and dropped"
        assert server.sweeps.report.reseeds >= 1
        assert trust_of(server) is Trust.TRUSTED
        await direct.aclose()
        direct = redis.Redis(port=own_valkey.port, decode_responses=True)
        await eventually(lambda: mirror_equals_truth(direct, keys, db))
        assert await direct.sismember(keys.deactivated, str(abusive))
        after = await stub.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(beating)))
        assert after.reachable and after.source == pb.SOURCE_CACHE, "its heartbeat was kept"
        print(f"trusted again {trusted_after:.2f}s after the restart; {reads.reads} reads")
    await direct.aclose()


async def test_flushall_sends_every_read_to_postgres_until_the_reseed(
    server_on_own_valkey: Server, stub_own: Stub, fleet: Fleet, own_valkey: LocalValkey
) -> None:
    mitras = [await fleet.mitra(f"M{i}", online=True) for i in range(5)]
    await stub_own.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitras[0]), active=False))
    await eventually(lambda: from_cache(stub_own))
    direct = redis.Redis(port=own_valkey.port)
    try:
        async with pairing(stub_own, mitras[0]) as reads:
            await direct.flushall()
            during = await stub_own.FindAvailableMitras(pb.FindAvailableMitrasRequest())
            assert during.source == pb.SOURCE_DATABASE, "no marker: Postgres at once"
            assert server_on_own_valkey.availability is not None
            counters = server_on_own_valkey.availability.counters
            assert counters.untrusted_reads["find_available"] >= 1
            assert counters.fallbacks == {}, "an unseeded mirror is not a Valkey failure"
            assert {m.mitra_id for m in during.mitras} == {str(m) for m in mitras[1:]}
            await eventually(lambda: from_cache(stub_own), timeout=10)
        assert reads.violations == []
        after = await stub_own.FindAvailableMitras(pb.FindAvailableMitrasRequest())
        assert {m.mitra_id for m in after.mitras} == {str(m) for m in mitras[1:]}
    finally:
        await direct.aclose()


async def test_a_replica_promoted_behind_the_same_endpoint_is_distrusted(
    settings: Settings, tmp_path: Path, fleet: Fleet, db: asyncpg.Connection
) -> None:
    primary = local_stores.start_valkey(tmp_path / "primary")
    replica = local_stores.start_valkey(tmp_path / "replica")
    endpoint = Endpoint(primary.port)
    await endpoint.start()
    to_replica = redis.Redis(port=replica.port, decode_responses=True)
    try:
        await to_replica.replicaof("127.0.0.1", primary.port)
        on_endpoint = replace(settings, valkey_url=f"redis://127.0.0.1:{endpoint.port}/0")
        keys = Keys.for_prefix(on_endpoint.valkey_key_prefix)
        mitras = [await fleet.mitra(f"M{i}", online=True) for i in range(10)]
        async with (
            running(on_endpoint) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            stub = Stub(channel)

            async def replicated() -> bool:
                return bool(await to_replica.get(keys.seeded)) and (
                    await to_replica.smembers(keys.online) == await online_in_truth(db)
                )

            await eventually(replicated)
            await to_replica.replicaof("NO", "ONE")  # promoted; what follows never reaches it
            await stub.SetMitraActive(
                pb.SetMitraActiveRequest(mitra_id=str(mitras[0]), active=False)
            )
            async with pairing(stub, mitras[0]) as reads:
                primary.kill()
                assert await to_replica.sismember(keys.online, str(mitras[0])), "it lacks it"
                endpoint.move(replica.port)
                await eventually(lambda: from_cache(stub), timeout=15)
                await asyncio.sleep(0.5)
            assert reads.violations == [], reads.violations[:5]
            assert set(reads.codes) == {"OK"}, reads.codes
            assert server.availability is not None
            assert server.availability.mirror.distrusted >= 1
            await eventually(lambda: mirror_equals_truth(to_replica, keys, db))
    finally:
        await to_replica.aclose()
        await endpoint.stop()
        primary.stop()
        replica.stop()


async def test_an_eviction_alone_is_seen_and_distrusted(
    server_on_own_valkey: Server, stub_own: Stub, fleet: Fleet, own_valkey: LocalValkey
) -> None:
    await fleet.mitra("M", online=True)
    await eventually(lambda: from_cache(stub_own))
    assert server_on_own_valkey.availability is not None
    mirror = server_on_own_valkey.availability.mirror
    direct = redis.Redis(port=own_valkey.port, decode_responses=True)
    try:
        await direct.set("other-tenant:volatile", "x", px=60_000)
        used = int((await direct.info("memory"))["used_memory"])
        await direct.config_set("maxmemory-policy", "volatile-lru")
        await direct.config_set("maxmemory", str(used - 1_000))
        with contextlib.suppress(redis.ResponseError):
            await direct.set("other-tenant:push", "y" * 5_000)
        await direct.config_set("maxmemory", "0")
        assert int((await direct.info("stats"))["evicted_keys"]) >= 1
        await eventually(lambda: _positive(mirror.distrusted), timeout=15)
        assert mirror.trust is not None
        assert mirror.trust.maxmemory_policy == "volatile-lru", "reported, to be warned about"
        await eventually(lambda: from_cache(stub_own), timeout=10)
        assert mirror.trust.verdict is Trust.TRUSTED
    finally:
        await direct.aclose()


async def _positive(value: int) -> bool:
    return value > 0


async def test_an_oom_reply_to_a_mirror_write_is_a_failed_write_never_an_rpc_failure(
    server_on_own_valkey: Server, stub_own: Stub, fleet: Fleet, own_valkey: LocalValkey
) -> None:
    mitra = await fleet.mitra("M", online=True)
    await eventually(lambda: from_cache(stub_own))
    availability = server_on_own_valkey.availability
    assert availability is not None
    direct = redis.Redis(port=own_valkey.port, decode_responses=True)
    online = Keys.for_prefix(server_on_own_valkey.settings.valkey_key_prefix).online
    try:
        await eventually(lambda: direct.sismember(online, str(mitra)))  # mirrored online first
        # noeviction: every write refused. Not the memory in use less a margin: what Valkey
        # frees meanwhile (a client's buffers, an expired key) can bring it under that.
        await direct.config_set("maxmemory", "1")
        reply = await stub_own.SetOffline(pb.SetOfflineRequest(mitra_id=str(mitra)))
        assert not reply.status.online
        assert availability.counters.mirror_write_errors.get("set_offline") == 1
        assert mitra in availability.unmirrored
        await direct.config_set("maxmemory", "0")

        async def healed() -> bool:
            return not await direct.sismember(online, str(mitra))

        await eventually(healed, timeout=5)
    finally:
        await direct.aclose()


async def test_a_write_under_an_older_release_s_marker_reaches_the_mirror(
    server: Server, stub: Stub, fleet: Fleet, valkey: redis.Redis
) -> None:
    """0.1.0 (from before layouts) marks the mirror '1' when it seeds beside a newer release
    and reads the mirror's sets as they are; it knows nothing of resync requests. So a write
    made under its marker is written, not left to an owner that would never come: the
    deactivation is in the deactivated set at once."""
    mitra = await fleet.mitra("Under 0.1.0", online=True)
    await stub.SetOnline(pb.SetOnlineRequest(mitra_id=str(mitra)))
    keys = Keys.for_prefix(server.settings.valkey_key_prefix)
    await valkey.set(keys.seeded, "1")
    await stub.SetMitraActive(pb.SetMitraActiveRequest(mitra_id=str(mitra), active=False))
    assert await valkey.sismember(keys.deactivated, str(mitra))
    assert not await valkey.sismember(keys.online, str(mitra))


async def test_a_newer_layout_owns_the_mirror_and_the_last_version_standing_takes_it(
    settings: Settings, fleet: Fleet, db: asyncpg.Connection, valkey: redis.Redis
) -> None:
    """A rolling upgrade: v(n+1) starts beside v(n). Callers of either see nothing wrong,
    v(n)'s heartbeats keep their mitras online under v(n+1)'s sweeps, and when v(n+1) is rolled
    back v(n) takes the mirror over."""
    keys = Keys.for_prefix(settings.valkey_key_prefix)
    old_layout = settings.mirror_layout
    mitras = [await fleet.mitra(f"M{i}", online=True) for i in range(6)]
    old_only, offline_by_old = mitras[0], mitras[1]
    async with (
        running(settings) as old,
        grpc.aio.insecure_channel(f"127.0.0.1:{old.port}") as a,
        contextlib.AsyncExitStack() as watches,
    ):
        old_stub = Stub(a)
        assert await from_cache(old_stub)
        assert old.availability is not None
        hub = old.availability.watch_hub
        before = await watches.enter_async_context(watching(old_stub))
        (first,) = await before.wait_for(1)
        assert str(mitras[2]) in snapshot_ids(first)
        async with (
            running(replace(settings, mirror_layout=old_layout + 1)) as new,
            grpc.aio.insecure_channel(f"127.0.0.1:{new.port}") as b,
        ):
            new_stub = Stub(b)
            await eventually(lambda: from_cache(new_stub))
            assert (await valkey.get(keys.seeded)).startswith(f"v{old_layout + 1} ")

            async def old_is_guest() -> bool:
                return trust_of(old) is Trust.GUEST

            await eventually(old_is_guest, timeout=5)
            assert not await from_cache(old_stub), "v(n) reads Postgres, never v(n+1)'s layout"
            # Nor does it follow v(n+1)'s mirror for watches: they end, clients resume on v(n+1).
            await eventually(lambda: _true(before.error is not None), timeout=5)
            assert before.error is not None
            assert before.error.code() == grpc.StatusCode.UNAVAILABLE
            found = await old_stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
            assert {m.mitra_id for m in found.mitras} == {str(m) for m in mitras}

            await old_stub.SetOffline(pb.SetOfflineRequest(mitra_id=str(offline_by_old)))

            async def reached_the_owner() -> bool:
                return not await valkey.sismember(keys.online, str(offline_by_old))

            await eventually(reached_the_owner, timeout=5)
            # A deactivation through v(n) is never served by v(n+1), not even before v(n+1)
            # resynced it (v(n) could not write its layout).
            banned = mitras[2]
            await old_stub.SetMitraActive(
                pb.SetMitraActiveRequest(mitra_id=str(banned), active=False)
            )
            reachable = await new_stub.IsMitraReachable(
                pb.IsMitraReachableRequest(mitra_id=str(banned))
            )
            assert not reachable.reachable
            found = await new_stub.FindAvailableMitras(pb.FindAvailableMitrasRequest(limit=100))
            assert str(banned) not in {m.mitra_id for m in found.mitras}
            refused = await code_of(new_stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(banned))))
            assert refused == grpc.StatusCode.PERMISSION_DENIED
            # old_only's app heartbeats through v(n) alone; v(n+1)'s mirror ages it.
            await db.execute(
                "UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'"
                " WHERE mitra_id = $1",
                old_only,
            )
            await valkey.zadd(keys.heartbeats, {str(old_only): 1_000})
            beat = await old_stub.Heartbeat(pb.HeartbeatRequest(mitra_id=str(old_only)))
            assert beat.online
            assert old.sweeps is not None
            assert not await tick(old, AUTO_OFFLINE), "v(n) runs no sweep on v(n+1)'s mirror"
            await tick(new, AUTO_OFFLINE)
            assert str(old_only) in await online_in_truth(db), "kept online: it heartbeats"

            async def reachable_from_cache() -> bool:
                # Postgres answers it until the owner drained the resync v(n) asked for.
                reply = await new_stub.IsMitraReachable(
                    pb.IsMitraReachableRequest(mitra_id=str(old_only))
                )
                assert reply.reachable, "never unreachable: its heartbeats count"
                return reply.source == pb.SOURCE_CACHE

            await eventually(reachable_from_cache, timeout=5)
            assert not hub.ready, "the guest's watch hub followed v(n+1)'s mirror"
            async with watching(old_stub) as refused:
                await eventually(lambda: _true(refused.error is not None))
            assert refused.error is not None
            assert refused.error.code() == grpc.StatusCode.UNAVAILABLE

        # v(n+1) rolled back: once its layout is no longer live, v(n) takes the mirror over.
        await eventually(lambda: from_cache(old_stub), timeout=20)
        # Valkey holds the marker from the moment the seed's last script ran; the instance
        # reads that script's answer a moment later.
        await eventually(lambda: _true(trust_of(old) is Trust.TRUSTED), timeout=5)
        assert (await valkey.get(keys.seeded)).startswith(f"v{old_layout} ")
        assert await valkey.smembers(keys.online) == await online_in_truth(db)
        statuses = [
            (await old_stub.GetMitraStatus(pb.GetMitraStatusRequest(mitra_id=str(m)))).status
            for m in mitras
        ]
        assert all(s.source == pb.SOURCE_CACHE for s in statuses)
        assert {s.mitra_id for s in statuses if s.online} == await online_in_truth(db)
        await eventually(lambda: _true(hub.ready), timeout=5)
        async with watching(old_stub, resume=first.revision) as after:
            (snapshot,) = await after.wait_for(1)
        assert str(banned) not in snapshot_ids(snapshot), "a fresh snapshot, not a replay"
        assert set(snapshot_ids(snapshot)) <= {str(m) for m in mitras}


async def test_a_check_read_after_a_later_one_does_not_undo_it(
    server_on_own_valkey: Server,
) -> None:
    """Checks run on several connections: a new connection's check that ran during a reseed
    can be read after the reseed's mark. The instance keeps the later answer (by Valkey's
    clock), unless the earlier one came from another Valkey process."""
    assert server_on_own_valkey.availability is not None
    mirror = server_on_own_valkey.availability.mirror
    earlier = await mirror.check_trust()
    await asyncio.sleep(0.01)
    later = await mirror.check_trust()
    assert later.at_ms > earlier.at_ms
    stale = replace(earlier, verdict=Trust.UNSEEDED)
    mirror._observe(stale)
    assert mirror.trust is later
    # A distrust read late is not kept, but it happened (its check dropped the marker).
    distrusted = mirror.distrusted
    mirror._observe(replace(earlier, verdict=Trust.DISTRUSTED))
    assert mirror.trust is later
    assert mirror.distrusted == distrusted + 1
    elsewhere = replace(stale, identity="another-run-id " + stale.identity.split(" ", 1)[1])
    mirror._observe(elsewhere)
    assert mirror.trust is elsewhere


async def test_a_valkey_out_of_memory_still_takes_new_connections(
    server_on_own_valkey: Server, stub_own: Stub, fleet: Fleet, own_valkey: LocalValkey
) -> None:
    """Every new connection is checked first; the check must not need memory."""
    mitra = await fleet.mitra("M", online=True)

    async def answered_from_cache() -> bool:
        reply = await stub_own.IsMitraReachable(pb.IsMitraReachableRequest(mitra_id=str(mitra)))
        return reply.reachable and reply.source == pb.SOURCE_CACHE

    # Mirrored first: a mitra the mirror has not heard of yet is rightly answered by Postgres,
    # and a Valkey out of memory refuses the write that would mirror it.
    await eventually(answered_from_cache)
    assert server_on_own_valkey.availability is not None
    mirror = server_on_own_valkey.availability.mirror
    direct = redis.Redis(port=own_valkey.port, decode_responses=True)
    try:
        used = int((await direct.info("memory"))["used_memory"])
        await direct.config_set("maxmemory", str(used - 10_000))
        await direct.client_kill_filter(_type="normal", skipme=True)  # every connection anew
        await eventually(answered_from_cache, timeout=10)
        assert (await mirror.check_trust()).verdict is Trust.TRUSTED
    finally:
        await direct.config_set("maxmemory", "0")
        await direct.aclose()
