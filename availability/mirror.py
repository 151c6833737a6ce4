"""The Valkey mirror: its key schema and scripts. Nobody else spells a key.

Every key is `{<prefix>}:<name>`: the prefix is the hash tag, so one deployment's keys
share a cluster slot (multi-key scripts work on Valkey Cluster) and several deployments
or test runs can share one Valkey under different prefixes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from uuid import UUID

import redis.asyncio as redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .cluster import SlotPool, slot_of
from .model import (
    SWEEPS,
    AvailabilityChange,
    AvailabilityCount,
    AvailabilitySnapshot,
    AvailableMitra,
    ChangeKind,
    Drift,
    MitraLoad,
    MitraState,
    MitraStatus,
    Source,
    UnavailableReason,
)
from .settings import Settings

log = logging.getLogger(__name__)

_APPLY_BATCH = 1000
_OUTAGES = (RedisConnectionError, RedisTimeoutError, OSError)
"""Failures that say Valkey is unreachable (a script's own error, like UNSEEDED, does not)."""
_FIELD = "\x1f"  # ASCII unit separator: cannot occur in ids or numbers; names are cleaned of it
_EXPIRE_BATCH = 10_000
_HEARTBEAT_BATCH = 500
WATCH_BLOCK_SECONDS = 1.0
_KINDS = {b"a": ChangeKind.AVAILABLE, b"u": ChangeKind.UNAVAILABLE, b"l": ChangeKind.LOAD_CHANGED}
_REASONS = {reason.value.encode(): reason for reason in UnavailableReason}


class MirrorMiss(Exception):
    """The mirror does not know this mitra (yet): ask the truth."""


class MirrorDown(Exception):
    """The breaker is open: Valkey failed repeatedly, so calls fail at once for a while."""


class MirrorUntrusted(Exception):
    """A seed cannot make the mirror trusted: another version's layout owns it, or the data
    set changed under the seed (a flush, a restart, an eviction) and it must run again."""


MIRROR_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    MirrorMiss,
    MirrorDown,
    MirrorUntrusted,
)
"""What makes a reader fall back to Postgres."""


def untrusted(exc: BaseException) -> bool:
    """Valkey answered, but the mirror may not be read: a script's UNSEEDED (unseeded, being
    reseeded, distrusted, or marked by another layout) or a seed that could not finish."""
    return isinstance(exc, MirrorUntrusted) or (
        isinstance(exc, ResponseError) and str(exc).startswith("UNSEEDED")
    )


class Breaker:
    """After `failures` consecutive failed calls, Valkey is taken as down for `seconds`: calls
    fail at once (MirrorDown), so readers reach Postgres without first waiting out
    VALKEY_TIMEOUT_SECONDS each. Then one call probes; its success closes the breaker, its
    failure opens it again."""

    def __init__(self, failures: int, seconds: float) -> None:
        self._threshold = failures
        self._seconds = seconds
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._probe_deadline = 0.0
        self.opened = 0
        self.short_circuits = 0

    @property
    def is_open(self) -> bool:
        return self._failures >= self._threshold

    def check(self) -> None:
        if not self.is_open:
            return
        now = time.monotonic()
        # A probe that never reported back (a path that forgot to) must not hold it shut.
        if now < self._open_until or (self._probing and now < self._probe_deadline):
            self.short_circuits += 1
            raise MirrorDown("Valkey is failing; not trying again for now")
        self._probing = True
        self._probe_deadline = now + self._seconds

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self._failures >= self._threshold:
            if self._failures == self._threshold:
                self.opened += 1
                log.warning("Valkey breaker open: %d calls in a row failed", self._failures)
            self._open_until = time.monotonic() + self._seconds

    def judge(self, exc: BaseException) -> None:
        """A call raised: an outage counts against Valkey; an error Valkey itself answered
        (a script's UNSEEDED) proves it is there; a cancelled call says nothing."""
        if isinstance(exc, _OUTAGES):
            self.failed()
        elif isinstance(exc, RedisError):
            self.succeeded()
        else:
            self._probing = False

    def succeeded(self) -> None:
        if self.is_open:
            log.info("Valkey breaker closed: the probe succeeded")
        self._failures = 0
        self._probing = False


@dataclass(frozen=True, slots=True)
class Keys:
    online: str
    deactivated: str
    capacity: str
    names: str
    loads: str
    heartbeats: str
    ready: str
    versions: str
    dirty: str
    beacon: str
    synced: str
    seeded: str
    busy: str
    beacon_computed: str
    flushing: str
    published: str
    revision: str
    events: str
    checked: str
    instances: str
    reports: str
    sweeps: str
    seeding: str
    layouts: str
    resync: str
    prefix: str

    @classmethod
    def for_prefix(cls, prefix: str) -> Keys:
        tag = "{" + prefix + "}"
        return cls(
            online=f"{tag}:online",
            deactivated=f"{tag}:deactivated",
            capacity=f"{tag}:capacity",
            names=f"{tag}:names",
            loads=f"{tag}:loads",
            heartbeats=f"{tag}:heartbeats",
            ready=f"{tag}:ready",
            versions=f"{tag}:versions",
            dirty=f"{tag}:heartbeats:dirty",
            beacon=f"{tag}:beacon",
            synced=f"{tag}:synced",
            seeded=f"{tag}:seeded",
            busy=f"{tag}:busy",
            beacon_computed=f"{tag}:beacon:computed",
            flushing=f"{tag}:heartbeats:flushing",
            published=f"{tag}:watch:available",
            revision=f"{tag}:watch:revision",
            events=f"{tag}:watch:events",
            checked=f"{tag}:watch:checked",
            instances=f"{tag}:instances",
            reports=f"{tag}:instances:reports",
            sweeps=f"{tag}:sweeps",
            seeding=f"{tag}:seeding",
            layouts=f"{tag}:layouts",
            resync=f"{tag}:resync",
            prefix=tag,
        )

    def lease(self, name: str) -> list[str]:
        return [f"{self.prefix}:lease:{name}", f"{self.prefix}:lease:{name}:epoch"]

    def all(self) -> list[str]:
        """Every key, in the order the scripts' prelude names them."""
        return [
            self.online,
            self.deactivated,
            self.capacity,
            self.names,
            self.loads,
            self.heartbeats,
            self.ready,
            self.versions,
            self.dirty,
            self.beacon,
            self.synced,
            self.seeded,
            self.busy,
            self.beacon_computed,
            self.flushing,
            self.published,
            self.revision,
            self.events,
            self.checked,
            self.seeding,
            self.layouts,
            self.resync,
        ]


class Trust(enum.Enum):
    """What an instance may make of the mirror (trust.lua decides)."""

    TRUSTED = "trusted"
    """A complete seed wrote it into this very data set: read it."""
    UNSEEDED = "unseeded"
    """No marker (a fresh or flushed Valkey, or one distrusted a moment ago): reseed."""
    DISTRUSTED = "distrusted"
    """The marker named another data set or layout; this check dropped it: reseed."""
    GUEST = "guest"
    """A newer layout is live and owns the mirror: use Postgres and leave the mirror alone."""
    VOID = "void"
    """A seed's end found the data set changed since its start: seed again."""


@dataclass(frozen=True, slots=True)
class TrustCheck:
    verdict: Trust
    marker: str
    """The marker the check found ('' for none): 'v<layout> <run_id> <replid> <evicted> <ms>'."""
    identity: str
    """The data set now: '<run_id> <master_replid> <evicted_keys>'."""
    highest_layout: int
    maxmemory_policy: str
    role: str


LAYOUT_LIVE_SECONDS = 10.0
"""A layout counts as live this long after an instance of it last checked the mirror."""


@dataclass(frozen=True)
class Deployment:
    """The deployment's shared state: the seed, the mirrored online count, each sweep's last
    run (JSON) and lease (owner, epoch, seconds left), and each instance's report (seconds
    since it was seen, JSON)."""

    seeded: bool
    trust: TrustCheck
    online: int
    sweeps: dict[str, str]
    leases: dict[str, tuple[str, int, float]]
    instances: dict[str, tuple[float, str]]


class HeartbeatOutcome(enum.Enum):
    RECORDED = 1
    OFFLINE = 0
    DEACTIVATED = -1
    UNKNOWN = -2
    UNSEEDED = -3


def _script(name: str, *, layout: int = 0) -> str:
    """A script's source; with a layout, behind the shared prelude, which then reads only
    the marker of that layout as seeded."""
    folder = resources.files("availability") / "lua"
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    if not layout:
        return body
    prelude = (folder / "prelude.lua").read_text(encoding="utf-8")
    return prelude.replace("@MARK@", _mark(layout)) + "\n" + body


def _mark(layout: int) -> str:
    return f"v{layout} "


def _us(when: datetime) -> str:
    return str(int(when.timestamp() * 1_000_000))


def _ms(when: datetime | None) -> str:
    return "" if when is None else str(int(when.timestamp() * 1000))


def _time(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _bulk(part: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(part), part)


def _distinct_batches(states: Sequence[MitraState], size: int) -> list[list[MitraState]]:
    """Batches in order, none naming a mitra twice (apply.lua reads a batch's state once)."""
    batches: list[list[MitraState]] = []
    batch: list[MitraState] = []
    seen: set[UUID] = set()
    for state in states:
        if len(batch) == size or state.mitra_id in seen:
            batches.append(batch)
            batch, seen = [], set()
        batch.append(state)
        seen.add(state.mitra_id)
    if batch:
        batches.append(batch)
    return batches


def _change(entry_id: bytes, payload: bytes) -> AvailabilityChange:
    kind, reason, mitra_id, load, capacity, name = payload.split(b"\x1f", 5)
    return AvailabilityChange(
        revision=int(entry_id.split(b"-", 1)[0]),
        kind=_KINDS[kind],
        mitra=AvailableMitra(UUID(mitra_id.decode()), name.decode(), int(load), int(capacity)),
        reason=_REASONS.get(reason),
    )


def connect_valkey(
    settings: Settings,
    on_connect: Callable[[Connection], Awaitable[None]] | None = None,
    *,
    blocking_seconds: float = 0.0,
    on_moved: Callable[[], None] | None = None,
) -> redis.Redis:
    """A client that fails fast: no retries or backoff, since every caller has a fallback.

    on_connect runs on every new connection before its first command, so a restarted or
    replaced Valkey is checked the moment the client reaches it again. blocking_seconds
    extends the read timeout for a client whose commands block on purpose (XREAD BLOCK).
    With VALKEY_CLUSTER, the client talks to the master of the deployment's one slot
    (cluster.py), and on_moved runs when that master changed.
    """

    async def connected(connection: Connection) -> None:
        await connection.on_connect()
        if on_connect is not None:
            await on_connect(connection)

    url = settings.valkey_url.replace("valkey://", "redis://", 1).replace(
        "valkeys://", "rediss://", 1
    )
    options: dict[str, Any] = {
        "socket_timeout": settings.valkey_timeout_seconds + blocking_seconds,
        "socket_connect_timeout": settings.valkey_timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
        "redis_connect_func": connected,
    }
    if settings.valkey_sentinels:
        from .sentinel import sentinel_pool

        return redis.Redis.from_pool(sentinel_pool(settings, url, on_moved=on_moved, **options))
    if settings.valkey_cluster:
        pool = SlotPool.from_url(
            url, slot=slot_of(settings.valkey_key_prefix), on_moved=on_moved, **options
        )
        return redis.Redis.from_pool(pool)
    client: redis.Redis = redis.Redis.from_url(url, **options)
    return client


class Mirror:
    """Reads and writes of the availability mirror; each call is one round trip."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        # XREAD BLOCK holds its connection: the watch hub gets a client of its own.
        self._reader = connect_valkey(settings, blocking_seconds=WATCH_BLOCK_SECONDS)
        self.breaker = Breaker(settings.valkey_breaker_failures, settings.valkey_breaker_seconds)
        self.keys = Keys.for_prefix(settings.valkey_key_prefix)
        self._all_keys = self.keys.all()
        self._stale_ms = int(settings.heartbeat_stale_seconds * 1000)
        self._credit_ms = int(settings.heartbeat_mirror_interval_seconds * 1000)
        self._beacon_ttl_ms = int(settings.beacon_shared_seconds * 1000)
        self._retain = settings.watch_retained_changes
        self.layout = settings.mirror_layout
        self._mark = _mark(self.layout)
        self._trust_keys = [*self._all_keys, *(k for name in SWEEPS for k in self.keys.lease(name))]
        self.trust: TrustCheck | None = None
        """The last check's answer (on a new connection, or the once-a-second check)."""
        self.distrusted = 0
        """How many times this instance found the data set replaced and dropped the marker."""
        self.deferred = 0
        """Mitras whose mirror write this instance left to another layout's owner."""
        self._beats: deque[tuple[list[str], asyncio.Future[list[int]]]] = deque()
        self._beating = False
        self._sender: asyncio.Task[None] | None = None
        self._beat_connection: Connection | None = None
        self.heartbeat_calls = 0
        """Script calls that carried heartbeats (fewer than heartbeats under load)."""

        def script(name: str, *, prelude: bool = True) -> Any:
            return client.register_script(_script(name, layout=self.layout if prelude else 0))

        self._heartbeat = script("heartbeat")
        self._apply = script("apply")
        self._status = script("status")
        self._find = script("find")
        self._count = script("count")
        self._dashboard = script("dashboard")
        self._stale = script("stale")
        self._take_dirty = script("take_dirty")
        self._release_dirty = script("release_dirty")
        self._forget = script("forget")
        self._trust = script("trust")
        self._resync = script("resync")
        self._lease = script("lease", prelude=False)
        self._release = script("release", prelude=False)
        self._watch_expire = script("watch_expire")
        self._watch_snapshot = script("watch_snapshot")
        self._announce = script("announce", prelude=False)
        self._beat_head = [
            _bulk(part)
            for part in (
                b"EVALSHA",
                self._heartbeat.sha.encode(),
                str(len(self._all_keys)).encode(),
                *(key.encode() for key in self._all_keys),
                str(self._stale_ms).encode(),
                str(self._retain).encode(),
            )
        ]

    async def _run(self, script: Any, *args: object) -> Any:
        self.breaker.check()
        try:
            reply = await script(keys=self._all_keys, args=list(args))
        except BaseException as exc:
            self.breaker.judge(exc)
            raise
        self.breaker.succeeded()
        return reply

    async def close(self) -> None:
        if self._beat_connection is not None:
            await self._beat_connection.disconnect()
        await self.client.aclose()
        await self._reader.aclose()

    @property
    def identity(self) -> str:
        """Which mirror this is, to tell instances on another Valkey apart (a move to a new
        Valkey, blue/green): the Valkey process's run_id and the key prefix; '' until the
        first trust check."""
        if self.trust is None:
            return ""
        return f"{self.trust.identity.split(' ', 1)[0]} {self.keys.prefix}"

    @property
    def guest(self) -> bool:
        """Another version's newer layout owns the mirror: this instance must not use it."""
        return self.trust is not None and self.trust.verdict is Trust.GUEST

    async def check_trust(
        self, action: str = "check", seed: str = "", connection: Connection | None = None
    ) -> TrustCheck:
        """Run trust.lua (see there), on `connection` when given: a new connection is checked
        before its first command."""
        args = [action, self.layout, int(LAYOUT_LIVE_SECONDS * 1000), seed]
        if connection is None:
            reply = await self._trust(keys=self._trust_keys, args=args)
        else:
            head = [len(self._trust_keys), *self._trust_keys, *args]
            try:
                await connection.send_command("EVALSHA", self._trust.sha, *head)
                reply = await connection.read_response()
            except NoScriptError:
                await connection.send_command("EVAL", self._trust.script, *head)
                reply = await connection.read_response()
        verdict, marker, identity, highest, policy, role = reply
        check = TrustCheck(
            Trust(verdict.decode()),
            marker.decode(),
            identity.decode(),
            int(highest),
            policy.decode(),
            role.decode(),
        )
        if action != "peek":
            self._observe(check)
        return check

    def _observe(self, check: TrustCheck) -> None:
        """Log what changed since the last check (each is rare and worth a line)."""
        last, self.trust = self.trust, check
        if check.verdict is Trust.DISTRUSTED:
            self.distrusted += 1
            log.warning(
                "mirror distrusted: Valkey holds a data set the seed did not write (marker %r, "
                "data set now %r): every instance reads Postgres until a reseed",
                check.marker,
                check.identity,
            )
        if check.verdict is Trust.GUEST and (last is None or last.verdict is not Trust.GUEST):
            log.warning(
                "mirror layout v%d is live and owns the mirror; this instance (v%d) answers "
                "from Postgres and leaves the mirror to it",
                check.highest_layout,
                self.layout,
            )
        elif last is not None and last.verdict is Trust.GUEST and check.verdict is not Trust.GUEST:
            log.warning(
                "mirror layout v%d is gone; this instance (v%d) takes the mirror over",
                last.highest_layout,
                self.layout,
            )
        if check.maxmemory_policy != "noeviction" and (
            last is None or last.maxmemory_policy != check.maxmemory_policy
        ):
            log.error(
                "Valkey's maxmemory-policy is %s, not noeviction: an evicted key would be a "
                "silent wrong answer. Every eviction distrusts the mirror until a reseed; set "
                "maxmemory-policy noeviction (README: Valkey in production)",
                check.maxmemory_policy,
            )

    async def begin_seed(self) -> str:
        """Before a seed writes anything: the identity of the data set it starts on."""
        check = await self.check_trust("seed")
        if check.verdict is Trust.GUEST:
            raise MirrorUntrusted(f"mirror layout v{check.highest_layout} owns the mirror")
        return check.identity

    async def finish_seed(self, identity: str) -> None:
        """After a complete seed: the marker, if the data set is still the one it started on."""
        check = await self.check_trust("mark", identity)
        if check.verdict is not Trust.TRUSTED:
            raise MirrorUntrusted(
                f"the data set changed during the seed ({check.verdict.value}); seeding again"
            )

    async def request_resync(self, mitra_ids: Sequence[UUID]) -> None:
        """Ask whichever instance owns the mirror to resync these from Postgres (the one
        structure every layout shares, so a guest's writes reach the owner's mirror); until
        then the owner answers them from Postgres (resync.lua)."""
        if mitra_ids:
            await self._run(self._resync, "request", *map(str, mitra_ids))

    async def resync_requests(self, count: int = 10_000) -> tuple[int, list[UUID]]:
        """(Valkey's time now, up to count ids asked for): release them after the resync."""
        now, *ids = await self._run(self._resync, "take", count)
        return int(now), [UUID(i.decode()) for i in ids]

    async def release_resync_requests(self, taken_at: int, mitra_ids: Sequence[UUID]) -> None:
        """Drop the requests a resync that read Postgres after `taken_at` answered."""
        await self._run(self._resync, "release", taken_at, *map(str, mitra_ids))

    async def heartbeats(self, mitra_ids: Sequence[UUID]) -> list[HeartbeatOutcome]:
        """One outcome an id, in order. Group commit: while one script call is in flight, the
        heartbeats that arrive (single ones and batches) wait and go together in the next.
        Alone, they go at once; under load the Redis client's cost per call (a third of a
        single heartbeat's CPU) is shared by the batch. No script call carries more than
        _HEARTBEAT_BATCH ids, so no call holds Valkey's one thread for long."""
        ids = [str(i) for i in mitra_ids]
        if len(ids) <= _HEARTBEAT_BATCH:
            return await self._group_beat(ids)
        parts = await asyncio.gather(
            *(
                self._group_beat(ids[at : at + _HEARTBEAT_BATCH])
                for at in range(0, len(ids), _HEARTBEAT_BATCH)
            )
        )
        return [outcome for part in parts for outcome in part]

    async def _group_beat(self, ids: list[str]) -> list[HeartbeatOutcome]:
        if self._beating:
            future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
            self._beats.append((ids, future))
            return [HeartbeatOutcome(o) for o in await future]
        # Nothing in flight: these go at once, in this task, without a future.
        self._beating = True
        try:
            outcomes = await self._beat(ids)
        finally:
            if self._beats:
                self._sender = asyncio.create_task(self._send_heartbeats())
            else:
                self._beating = False
        return [HeartbeatOutcome(int(o)) for o in outcomes]

    async def _send_heartbeats(self) -> None:
        beats = self._beats
        try:
            while beats:
                batch = [beats.popleft()]
                size = len(batch[0][0])
                while beats and size + len(beats[0][0]) <= _HEARTBEAT_BATCH:
                    batch.append(beats.popleft())
                    size += len(batch[-1][0])
                try:
                    outcomes = await self._beat([i for ids, _ in batch for i in ids])
                except BaseException as exc:
                    for _, future in batch:
                        if future.done():
                            continue
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:
                            future.cancel()
                    if not isinstance(exc, Exception):
                        raise
                    continue
                at = 0
                for ids, future in batch:
                    if not future.done():
                        future.set_result(outcomes[at : at + len(ids)])
                    at += len(ids)
        finally:
            self._beating = False
            for _, future in beats:
                future.cancel()
            beats.clear()

    async def _beat(self, ids: list[str]) -> list[int]:
        """One heartbeat script call, on a connection of its own with the command packed by
        hand: heartbeats go one call at a time (the group commit above), and the client's
        pool and packing cost more than the rest of a heartbeat's Redis work."""
        self.heartbeat_calls += 1
        self.breaker.check()
        packed = [b"*%d\r\n" % (len(self._beat_head) + len(ids)), *self._beat_head]
        packed += [b"$%d\r\n%s\r\n" % (len(i), i.encode()) for i in ids]
        try:
            connection = self._beat_connection
            if connection is None:
                pool = self.client.connection_pool
                connection = pool.make_connection()  # type: ignore[no-untyped-call]
                await pool.ensure_connection(connection)
                self._beat_connection = connection
            await connection.send_packed_command(b"".join(packed), check_health=False)
            reply: list[int] = await connection.read_response()
        except NoScriptError:
            # Valkey lost its scripts (restarted): the regular path loads it again.
            self.breaker.succeeded()
            return list(await self._run(self._heartbeat, self._stale_ms, self._retain, *ids))
        except BaseException as exc:
            if self._beat_connection is not None:
                await self._beat_connection.disconnect()
                self._beat_connection = None
            self.breaker.judge(exc)
            raise
        self.breaker.succeeded()
        return reply

    async def apply(self, states: Sequence[MitraState]) -> Drift:
        """Mirror states read from the truth (write-through, resync and reconcile all use this);
        returns what changed."""
        changed = Drift()
        if self.guest:
            await self.request_resync([s.mitra_id for s in states])
            self.deferred += len(states)
            return changed
        for batch in _distinct_batches(states, _APPLY_BATCH):
            args: list[object] = [self._stale_ms, self._retain, self._credit_ms]
            args += [
                _FIELD.join(
                    (
                        str(s.mitra_id),
                        s.display_name.replace(_FIELD, " "),
                        str(s.max_concurrent_sessions),
                        "1" if s.active else "0",
                        "1" if s.online else "0",
                        str(s.version),
                        str(s.load),
                        _ms(s.last_heartbeat_at),
                        _us(s.read_at),
                    )
                )
                for s in batch
            ]
            counts = await self._run(self._apply, *args)
            if counts[0] < 0:  # another layout's marker: apply.lua asked its owner to resync
                self.deferred += len(batch)
                continue
            changed += Drift(*counts)
        return changed

    async def status(self, mitra_id: UUID) -> MitraStatus:
        reply = await self._run(self._status, str(mitra_id))
        if not reply:
            raise MirrorMiss(mitra_id)
        online, deactivated, capacity, load, heartbeat, now, name = reply
        heartbeat_ms = None if heartbeat is None else float(heartbeat)
        return MitraStatus(
            mitra_id=mitra_id,
            display_name=name.decode(),
            online=bool(online),
            active=not deactivated,
            fresh=heartbeat_ms is not None and heartbeat_ms >= now - self._stale_ms,
            load=int(load),
            max_concurrent_sessions=int(capacity),
            last_heartbeat_at=None if heartbeat_ms is None else _time(heartbeat_ms),
            source=Source.CACHE,
        )

    async def find_available(self, limit: int, exclude: Sequence[UUID]) -> list[AvailableMitra]:
        reply = await self._run(self._find, self._stale_ms, limit, *map(str, exclude))
        return [
            AvailableMitra(
                UUID(reply[i].decode()), reply[i + 3].decode(), reply[i + 1], reply[i + 2]
            )
            for i in range(0, len(reply), 4)
        ]

    async def count_available(self) -> AvailabilityCount:
        reply = await self._run(self._count, self._stale_ms, self._beacon_ttl_ms)
        available, online, as_of = reply.decode().split(":")
        return AvailabilityCount(int(available), int(online), _time(float(as_of)), Source.CACHE)

    async def stale(self, limit: int) -> tuple[int, int, list[UUID]]:
        """(online count, stale count, up to limit stale ids), by Valkey's clock."""
        reply = await self._run(self._stale, self._stale_ms, limit)
        return int(reply[0]), int(reply[1]), [UUID(i.decode()) for i in reply[2:]]

    async def take_dirty_heartbeats(self, epoch: int, batch: int = 10_000) -> dict[str, int]:
        """The heartbeats recorded since the last flush (id -> Valkey ms), set aside for this
        flush; heartbeats arriving meanwhile wait for the next one. Scanned, never one
        blocking HGETALL, since all 100,000 can be there at once."""
        if not await self._run(self._take_dirty, epoch):
            return {}
        found: dict[str, int] = {}
        async for key, value in self.client.hscan_iter(self.keys.flushing, count=batch):
            found[key.decode()] = int(value)
        found.pop("__epoch", None)
        return found

    async def release_flushed(self, epoch: int) -> bool:
        """Drop what this flush (epoch) wrote to Postgres; False if a newer flush took it."""
        return bool(await self._run(self._release_dirty, epoch))

    async def unknown_members(
        self, known: set[str], serving: int, deactivated: int, ready: int, batch: int = 5000
    ) -> set[str]:
        """Members of any reader-facing structure that are not in known (garbage included,
        as text), right after a reconcile wrote every known mitra. serving, deactivated and
        ready are how many members the truth gives each structure; one that holds no more
        cannot hold a stranger (every member it should have was just written), so only
        larger ones are scanned: a reconcile without drift reads no members at all."""
        k = self.keys
        expected = {
            k.capacity: len(known),
            k.online: serving,
            k.deactivated: deactivated,
            k.heartbeats: serving,
            k.ready: ready,
            k.busy: serving,
            k.published: ready,
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.hlen(k.capacity)
        for name in (k.online, k.deactivated):
            pipe.scard(name)
        for name in (k.heartbeats, k.ready, k.busy):
            pipe.zcard(name)
        pipe.hlen(k.published)
        sizes = dict(zip(expected, await pipe.execute(), strict=True))
        found: set[str] = set()

        def add(member: bytes) -> None:
            if (text := member.decode()) not in known:
                found.add(text)

        larger = {name for name in expected if sizes[name] > expected[name]}
        for name in larger & {k.capacity, k.published}:
            async for key, _value in self.client.hscan_iter(name, count=batch):
                add(key)
        for name in larger & {k.online, k.deactivated}:
            async for member in self.client.sscan_iter(name, count=batch):
                add(member)
        for name in larger & {k.heartbeats, k.ready, k.busy}:
            async for member, _score in self.client.zscan_iter(name, count=batch):
                add(member)
        return found

    async def forget(self, members: Sequence[str], snapshot: datetime) -> int:
        """Drop members the truth does not have, unless synced since the snapshot."""
        forgotten = 0
        ids = list(members)
        for first in range(0, len(ids), _APPLY_BATCH):
            chunk = ids[first : first + _APPLY_BATCH]
            forgotten += int(
                await self._run(self._forget, self._stale_ms, self._retain, _us(snapshot), *chunk)
            )
        return forgotten

    async def take_lease(self, name: str, owner: str, ttl_seconds: float) -> int:
        """The lease's epoch if owner holds it now (taken or renewed), else 0."""
        return int(
            await self._lease(keys=self.keys.lease(name), args=[owner, int(ttl_seconds * 1000)])
        )

    async def release_lease(self, name: str, owner: str) -> None:
        await self._release(keys=self.keys.lease(name)[:1], args=[owner])

    async def expire_stale(self) -> int:
        """Publish the mitras that went stale since any instance last asked; returns how many."""
        return int(await self._run(self._watch_expire, self._stale_ms, self._retain, _EXPIRE_BATCH))

    async def watch_snapshot(
        self,
    ) -> tuple[AvailabilitySnapshot, list[AvailabilityChange], str]:
        """Every published mitra at the current revision, the retained changes up to it
        (oldest first) and the marker of the seed they belong to: where a watch hub starts."""
        revision, published, retained, marker = await self._run(self._watch_snapshot, self._retain)
        mitras = []
        for i in range(0, len(published), 2):
            load, capacity, name = published[i + 1].split(b"\x1f", 2)
            mitras.append(
                AvailableMitra(UUID(published[i].decode()), name.decode(), int(load), int(capacity))
            )
        mitras.sort(key=lambda m: (m.load, str(m.mitra_id)))
        changes = [_change(entry_id, fields[1]) for entry_id, fields in reversed(retained)]
        snapshot = AvailabilitySnapshot(int(revision), tuple(mitras))
        return snapshot, changes, self._ours(marker)

    async def read_changes(
        self, after: int, block_seconds: float = WATCH_BLOCK_SECONDS, count: int = 1000
    ) -> list[AvailabilityChange]:
        """Changes after a revision, oldest first; waits up to block_seconds for the first."""
        reply: Any = await self._reader.xread(
            {self.keys.events: f"{after}-0"}, count=count, block=int(block_seconds * 1000)
        )
        if not reply:
            return []
        return [_change(entry_id, fields[b"e"]) for entry_id, fields in reply[0][1]]

    async def watch_position(self) -> tuple[str, int]:
        """(this layout's marker or '', current revision or 0): how a hub notices a flushed,
        replaced or reseeded mirror (a reseed writes a new marker)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.seeded)
        pipe.get(self.keys.revision)
        marker, revision = await pipe.execute()
        return self._ours(marker), int(revision or 0)

    def _ours(self, marker: bytes | None) -> str:
        text = (marker or b"").decode()
        return text if text.startswith(self._mark) else ""

    async def busiest(self, limit: int) -> tuple[int, list[MitraLoad]]:
        """(online count, the `limit` busiest online mitras), one round trip."""
        reply = await self._run(self._dashboard, limit)
        return int(reply[0]), [
            MitraLoad(UUID(reply[i].decode()), reply[i + 2].decode(), int(reply[i + 1]))
            for i in range(1, len(reply), 3)
        ]

    async def record_sweep(self, name: str, record: str) -> None:
        """The last run of a sweep, whichever instance ran it (for `availability status`)."""
        await self.client.hset(self.keys.sweeps, name, record)

    async def announce(self, instance: str, report: str, forget_seconds: float) -> None:
        """This instance's report, seen now by Valkey's clock; forgets silent instances."""
        await self._announce(
            keys=[self.keys.instances, self.keys.reports],
            args=[instance, report, int(forget_seconds * 1000)],
        )

    async def withdraw(self, instance: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.keys.instances, instance)
        pipe.hdel(self.keys.reports, instance)
        await pipe.execute()

    async def deployment(self, sweeps: Sequence[str]) -> Deployment:
        """What the deployment shares in Valkey, in one round trip."""
        trust = await self.check_trust("peek")
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.scard(self.keys.online)
        pipe.hgetall(self.keys.sweeps)
        pipe.zrange(self.keys.instances, 0, -1, withscores=True)
        pipe.hgetall(self.keys.reports)
        for name in sweeps:
            lease = self.keys.lease(name)[0]
            pipe.get(lease)
            pipe.pttl(lease)
        now, online, records, seen, reports, *leases = await pipe.execute()
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        held: dict[str, tuple[str, int, float]] = {}
        for name, value, ttl in zip(sweeps, leases[::2], leases[1::2], strict=True):
            if value:
                owner, _, epoch = value.decode().rpartition("/")
                held[name] = (owner, int(epoch), max(int(ttl), 0) / 1000)
        return Deployment(
            seeded=trust.verdict is Trust.TRUSTED,
            trust=trust,
            online=int(online),
            sweeps={k.decode(): v.decode() for k, v in records.items()},
            leases=held,
            instances={
                member.decode(): ((now_ms - score) / 1000, reports.get(member, b"{}").decode())
                for member, score in seen
            },
        )

    async def clear(self) -> int:
        """Delete every key of this prefix (the demo's reset); the next start seeds again."""
        # The prefix has no glob characters (settings.py checks it).
        match = f"{self.keys.prefix}*"
        keys = [key async for key in self.client.scan_iter(match=match, count=1000)]
        for start in range(0, len(keys), 1000):
            await self.client.delete(*keys[start : start + 1000])
        return len(keys)

    async def beacon_computations(self) -> int:
        """How many times any instance computed the beacon (for stampede checks)."""
        return int(await self.client.get(self.keys.beacon_computed) or 0)
