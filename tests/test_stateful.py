"""A stateful property test: random sequences of online, offline, heartbeat, deactivate,
reactivate, chat-session transitions, time passing, sweeps, Valkey outages and hiccups.

At every step the service's answers equal answers computed from the Postgres truth (and,
for freshness, from the heartbeats the model sent), within the documented bounds; after a
reconcile the mirror equals Postgres exactly.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from availability.local_stores import LocalValkey
from availability.mirror import Keys
from availability.server import Server
from availability.settings import Settings
from availability.sweeps import AUTO_OFFLINE, HEARTBEAT_FLUSH, RECONCILE
from availability.v1 import availability_pb2 as pb
from availability.v1 import availability_pb2_grpc as pb_grpc

from .helpers import eventually

MITRAS = 4
STEP_SECONDS = 60
CAPACITY = 2


@dataclass
class Heartbeats:
    """What the model knows of a mitra's heartbeat, which lives in Valkey, not the truth."""

    fresh: bool = False
    unflushed: bool = False
    uncertain: bool = False  # a heartbeat lost with an outage before it was flushed


class AvailabilityMachine(RuleBasedStateMachine):
    base: Settings
    valkey: LocalValkey
    # One loop for every example, as a process has in production: a new loop per example
    # makes grpc.aio rebind its poller each time.
    shared_loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.loop = self.shared_loop
        self.settings = replace(
            self.base,
            valkey_url=self.valkey.url,
            valkey_key_prefix=f"prop-{uuid.uuid4().hex[:8]}",
            valkey_timeout_seconds=0.2,
        )
        self.keys = Keys.for_prefix(self.settings.valkey_key_prefix)
        self.state = "up"
        self.beats = [Heartbeats() for _ in range(MITRAS)]
        self.sessions: dict[uuid.UUID, uuid.UUID] = {}
        self.failed_mirror_calls = 0
        """The server's failed mirror writes when answers were last checked."""

    def run(self, coro: Any) -> Any:
        """Run one step; a step stuck for a minute fails with every task's stack printed."""

        async def bounded() -> Any:
            try:
                async with asyncio.timeout(STEP_SECONDS):
                    return await coro
            except TimeoutError:
                for task in asyncio.all_tasks():
                    task.print_stack(file=sys.stderr)
                raise AssertionError(f"a step took more than {STEP_SECONDS}s") from None

        return self.loop.run_until_complete(bounded())

    @initialize()
    def start(self) -> None:
        async def setup() -> None:
            self.db = await asyncpg.connect(self.settings.database_url)
            await self.db.execute(
                "TRUNCATE mitras, mitra_online_status, chat_sessions, auth_sessions CASCADE"
            )
            self.mitras = [
                await self.db.fetchval(
                    "INSERT INTO mitras (display_name, max_concurrent_sessions)"
                    " VALUES ($1, $2) RETURNING id",
                    f"Mitra {i}",
                    CAPACITY,
                )
                for i in range(MITRAS)
            ]
            self.server = Server(self.settings)
            await self.server.start()
            self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
            self.stub = pb_grpc.AvailabilityServiceStub(self.channel)
            self.inspect = redis.Redis.from_url(self.valkey.url, decode_responses=True)

        self.run(setup())

    def teardown(self) -> None:
        if self.state == "down":
            self.valkey.start()
        elif self.state == "paused":
            self.valkey.resume()

        async def close() -> None:
            if hasattr(self, "server"):
                for step, closing in (
                    ("channel", self.channel.close()),
                    ("server", self.server.stop(grace=0.5)),
                    ("inspection client", self.inspect.aclose()),
                    ("database", self.db.close()),
                ):
                    try:
                        await asyncio.wait_for(closing, 30)
                    except TimeoutError:
                        raise AssertionError(f"closing the {step} hung") from None

        self.run(close())

    async def call(self, method: str, request: Any) -> tuple[Any, grpc.StatusCode]:
        try:
            return await getattr(self.stub, method)(request, timeout=10), grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return None, exc.code()

    async def truth(self, mitra: uuid.UUID) -> asyncpg.Record:
        row = await self.db.fetchrow(
            "SELECT m.is_active, coalesce(s.is_online, false) AS is_online,"
            " (SELECT count(*) FROM chat_sessions c WHERE c.mitra_id = m.id"
            "  AND c.status IN ('active', 'pending_payment'))::int AS load"
            " FROM mitras m LEFT JOIN mitra_online_status s ON s.mitra_id = m.id"
            " WHERE m.id = $1",
            mitra,
        )
        assert row is not None
        return row

    def beat(self, i: int) -> None:
        self.beats[i] = Heartbeats(fresh=True, unflushed=self.state == "up")

    @rule(i=st.integers(0, MITRAS - 1))
    def set_online(self, i: int) -> None:
        async def step() -> None:
            truth = await self.truth(self.mitras[i])
            _, code = await self.call(
                "SetOnline", pb.SetOnlineRequest(mitra_id=str(self.mitras[i]))
            )
            expected = (
                grpc.StatusCode.OK if truth["is_active"] else grpc.StatusCode.FAILED_PRECONDITION
            )
            assert code == expected
            if code == grpc.StatusCode.OK:
                self.beats[i] = Heartbeats(fresh=True)

        self.run(step())

    @rule(i=st.integers(0, MITRAS - 1))
    def set_offline(self, i: int) -> None:
        _, code = self.run(
            self.call("SetOffline", pb.SetOfflineRequest(mitra_id=str(self.mitras[i])))
        )
        assert code == grpc.StatusCode.OK

    @rule(i=st.integers(0, MITRAS - 1))
    def heartbeat(self, i: int) -> None:
        async def step() -> None:
            truth = await self.truth(self.mitras[i])
            reply, code = await self.call(
                "Heartbeat", pb.HeartbeatRequest(mitra_id=str(self.mitras[i]))
            )
            if not truth["is_active"]:
                assert code == grpc.StatusCode.PERMISSION_DENIED
                return
            assert code == grpc.StatusCode.OK
            assert reply.online == truth["is_online"]
            if reply.online:
                self.beat(i)

        self.run(step())

    @rule(i=st.integers(0, MITRAS - 1), active=st.booleans())
    def set_active(self, i: int, active: bool) -> None:
        request = pb.SetMitraActiveRequest(mitra_id=str(self.mitras[i]), active=active)
        _, code = self.run(self.call("SetMitraActive", request))
        assert code == grpc.StatusCode.OK

    async def recompute(self, *mitras: uuid.UUID) -> None:
        request = pb.RecomputeLoadRequest(mitra_ids=[str(m) for m in mitras])
        reply, code = await self.call("RecomputeLoad", request)
        assert code == grpc.StatusCode.OK
        for load in reply.loads:
            assert load.load == (await self.truth(uuid.UUID(load.mitra_id)))["load"]

    @rule(i=st.integers(0, MITRAS - 1), status=st.sampled_from(["active", "pending_payment"]))
    def accept_session(self, i: int, status: str) -> None:
        async def step() -> None:
            session = await self.db.fetchval(
                "INSERT INTO chat_sessions (mitra_id, customer_id, status)"
                " VALUES ($1, gen_random_uuid(), $2) RETURNING id",
                self.mitras[i],
                status,
            )
            self.sessions[session] = self.mitras[i]
            await self.recompute(self.mitras[i])

        self.run(step())

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data(), status=st.sampled_from(["ended", "expired", "cancelled"]))
    def end_session(self, data: st.DataObject, status: str) -> None:
        session = data.draw(st.sampled_from(sorted(self.sessions)))
        mitra = self.sessions.pop(session)

        async def step() -> None:
            await self.db.execute(
                "UPDATE chat_sessions SET status = $2 WHERE id = $1", session, status
            )
            await self.recompute(mitra)

        self.run(step())

    @precondition(lambda self: bool(self.sessions))
    @rule(data=st.data(), j=st.integers(0, MITRAS - 1))
    def reroute_session(self, data: st.DataObject, j: int) -> None:
        session = data.draw(st.sampled_from(sorted(self.sessions)))
        before, after = self.sessions[session], self.mitras[j]
        self.sessions[session] = after

        async def step() -> None:
            await self.db.execute(
                "UPDATE chat_sessions SET mitra_id = $2 WHERE id = $1", session, after
            )
            await self.recompute(before, after)

        self.run(step())

    @rule(i=st.integers(0, MITRAS - 1))
    def time_passes(self, i: int) -> None:
        """This mitra's app went quiet an hour ago (in both stores, as if flushed)."""

        async def step() -> None:
            await self.db.execute(
                "UPDATE mitra_online_status SET last_heartbeat_at = now() - interval '1 hour'"
                " WHERE mitra_id = $1",
                self.mitras[i],
            )
            if self.state == "up":
                await self.inspect.zadd(self.keys.heartbeats, {str(self.mitras[i]): 1_000}, xx=True)
                await self.inspect.hdel(self.keys.dirty, str(self.mitras[i]))
                await self.inspect.hdel(self.keys.flushing, str(self.mitras[i]))
            self.beats[i] = Heartbeats()

        if self.state != "paused":
            self.run(step())

    @precondition(lambda self: self.state == "up")
    @rule(name=st.sampled_from([AUTO_OFFLINE, HEARTBEAT_FLUSH]))
    def sweep(self, name: str) -> None:
        sweeps = self.server.sweeps
        assert sweeps is not None
        run = {AUTO_OFFLINE: sweeps.auto_offline, HEARTBEAT_FLUSH: sweeps.flush_heartbeats}[name]
        assert self.run(sweeps.run_once(name, 30.0, run))
        if name == HEARTBEAT_FLUSH:
            for beats in self.beats:
                beats.unflushed = False

    @precondition(lambda self: self.state == "up")
    @rule()
    def reconcile_then_mirror_equals_truth(self) -> None:
        sweeps = self.server.sweeps
        assert sweeps is not None
        assert self.run(sweeps.run_once(RECONCILE, 30.0, sweeps.reconcile))
        self.run(self.mirror_equals_truth())

    async def mirror_equals_truth(self) -> None:
        rows = await self.db.fetch(
            "SELECT m.id::text, m.is_active, coalesce(s.is_online, false) AS online,"
            " (SELECT count(*) FROM chat_sessions c WHERE c.mitra_id = m.id"
            "  AND c.status IN ('active', 'pending_payment'))::int AS load"
            " FROM mitras m LEFT JOIN mitra_online_status s ON s.mitra_id = m.id"
        )
        k = self.keys
        assert await self.inspect.smembers(k.online) == {r["id"] for r in rows if r["online"]}
        assert await self.inspect.smembers(k.deactivated) == {
            r["id"] for r in rows if not r["is_active"]
        }
        assert await self.inspect.hgetall(k.loads) == {r["id"]: str(r["load"]) for r in rows}
        assert set(await self.inspect.zrange(k.ready, 0, -1)) == {
            r["id"] for r in rows if r["online"] and r["is_active"] and r["load"] < CAPACITY
        }
        assert set(await self.inspect.zrange(k.heartbeats, 0, -1)) == {
            r["id"] for r in rows if r["online"]
        }
        assert dict(await self.inspect.zrange(k.busy, 0, -1, withscores=True)) == {
            r["id"]: float(r["load"]) for r in rows if r["online"] and r["is_active"]
        }

    @precondition(lambda self: self.state == "up")
    @rule()
    def valkey_outage(self) -> None:
        self.valkey.stop()
        self.state = "down"
        self.lose_unflushed()

    @precondition(lambda self: self.state == "up")
    @rule()
    def valkey_hiccup(self) -> None:
        self.valkey.pause()
        self.state = "paused"

    def unknowable(self, beats: Heartbeats) -> bool:
        """Whether a heartbeat's freshness cannot be judged now: lost with an outage before
        it was flushed, or not flushed yet while a paused Valkey sends reads to Postgres, which
        learns heartbeat times only at each flush (an older one there may be stale)."""
        return beats.uncertain or (self.state == "paused" and beats.unflushed and beats.fresh)

    def lose_unflushed(self) -> None:
        for beats in self.beats:
            if beats.unflushed and beats.fresh:
                beats.uncertain = True
            beats.unflushed = False

    @precondition(lambda self: self.state != "up")
    @rule()
    def valkey_returns(self) -> None:
        if self.state == "down":
            self.valkey.start()
        else:
            self.valkey.resume()
        self.state = "up"
        availability = self.server.availability
        assert availability is not None
        breaker = availability.mirror.breaker

        async def healed() -> bool:
            try:
                seeded = await self.inspect.exists(self.keys.seeded)
            except redis.ConnectionError:  # our own client's connection died with the server
                return False
            # The breaker closes on the first call that reaches Valkey after its cooldown.
            return bool(seeded) and not availability.unmirrored and not breaker.is_open

        self.run(eventually(healed, timeout=15))

    @invariant()
    def answers_match_truth(self) -> None:
        if not hasattr(self, "server"):
            return

        async def check() -> None:
            expected_available = set()
            sources: list[str] = []
            for i, mitra in enumerate(self.mitras):
                truth = await self.truth(mitra)
                reply, code = await self.call(
                    "GetMitraStatus", pb.GetMitraStatusRequest(mitra_id=str(mitra))
                )
                assert code == grpc.StatusCode.OK
                status = reply.status
                where = f"mitra {i} ({pb.Source.Name(status.source)}, state {self.state})"
                sources.append(pb.Source.Name(status.source).removeprefix("SOURCE_").lower())
                assert status.online == truth["is_online"], where
                assert status.active == truth["is_active"], where
                assert status.load == truth["load"], where
                beats = self.beats[i]
                if self.unknowable(beats):
                    continue
                fresh = beats.fresh and truth["is_online"]
                if truth["is_online"]:
                    assert status.fresh == fresh, where
                available = fresh and truth["is_active"] and truth["load"] < CAPACITY
                assert status.available == available, where
                if available:
                    expected_available.add(str(mitra))
            reply, code = await self.call("FindAvailableMitras", pb.FindAvailableMitrasRequest())
            assert code == grpc.StatusCode.OK
            found = {m.mitra_id for m in reply.mitras}
            uncertain = {
                str(m) for m, b in zip(self.mitras, self.beats, strict=True) if self.unknowable(b)
            }
            assert found - uncertain == expected_available, (
                f"state {self.state}; FindAvailableMitras from {pb.Source.Name(reply.source)},"
                f" statuses from {sources} (mitras {self.mitras})"
            )

        async def converged() -> None:
            # Writes are best effort towards Valkey (docs/concepts.md): a mirror write that
            # failed while Valkey was up (a 0.2 s timeout on a loaded machine) leaves the old
            # state in the mirror until the instance's repair, within a second or two. A read
            # that timed out likewise opens the breaker, and reads answered from Postgres
            # meanwhile see a heartbeat only once it is flushed. And a deactivation leaves its
            # mitra awaiting a resync (docs/internals.md: `{P}:resync`) until the instance's
            # next one, within a second: GetMitraStatus answers it from Postgres meanwhile and
            # FindAvailableMitras leaves it out, even once it is reactivated and online. Only
            # then may answers wait; otherwise they match the truth at once. A mirror call that
            # failed during the check itself counts too.
            assert self.server.availability is not None
            counters = self.server.availability.counters

            def failed() -> int:
                return sum(counters.mirror_write_errors.values()) + sum(counters.fallbacks.values())

            async def awaiting_resync() -> bool:
                try:
                    return bool(await self.inspect.zcard(self.keys.resync))
                except redis.RedisError:
                    return False

            deadline = time.monotonic() + 10
            while True:
                try:
                    await check()
                    self.failed_mirror_calls = failed()
                    return
                except AssertionError:
                    waits = self.state == "up" and (
                        failed() != self.failed_mirror_calls or await awaiting_resync()
                    )
                    if not waits or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

        self.run(converged())


@pytest.mark.slow(seconds=30)
def test_service_answers_follow_truth_through_random_histories(
    settings: Settings, own_valkey: LocalValkey, db: asyncpg.Connection
) -> None:
    AvailabilityMachine.base = settings
    AvailabilityMachine.valkey = own_valkey
    AvailabilityMachine.shared_loop = asyncio.new_event_loop()
    try:
        run_state_machine_as_test(AvailabilityMachine, settings=settings_for_ci())
    finally:
        AvailabilityMachine.shared_loop.close()


def settings_for_ci() -> Any:
    return hypothesis_settings(
        max_examples=12,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
