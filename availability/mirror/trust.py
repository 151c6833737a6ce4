"""Whether the mirror may be read. Valkey can lose or replace its data set without a word (a
restart, a promoted replica, an eviction), and another version's layout may own it; so only
a complete seed into the very data set it started on marks the mirror, and trust.lua checks
that marker against the data set on every new connection and once a second.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

import redis.asyncio as redis
from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError

from ..model import SWEEPS
from ..settings import Settings
from .base import MirrorBase
from .connection import MirrorUntrusted, log


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
    at_ms: int
    """Valkey's clock when the check ran: checks on two connections can be answered in one
    order and read in the other."""

    @property
    def run_id(self) -> str:
        """The Valkey process that answered (the first part of its identity)."""
        return self.identity.split(" ", 1)[0]

    def predates(self, other: TrustCheck) -> bool:
        """Ran before `other` in the same Valkey process (whose clock it shares)."""
        return self.run_id == other.run_id and self.at_ms < other.at_ms


LAYOUT_LIVE_SECONDS = 10.0
"""A layout counts as live this long after an instance of it last checked the mirror."""


class TrustMixin(MirrorBase):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        self._trust_keys = [*self._all_keys, *(k for name in SWEEPS for k in self.keys.lease(name))]
        self.trust: TrustCheck | None = None
        """The last check's answer (on a new connection, or the once-a-second check)."""
        self.distrusted = 0
        """How many times this instance found the data set replaced and dropped the marker."""
        self._trust = self._register("trust")
        self._resync = self._register("resync")

    @property
    def identity(self) -> str:
        """Which mirror this is, to tell instances on another Valkey apart (a move to a new
        Valkey, blue/green): the Valkey process's run_id and the key prefix; '' until the
        first trust check."""
        if self.trust is None:
            return ""
        return f"{self.trust.run_id} {self.keys.prefix}"

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
        # Valkey answered: whatever the breaker thought, it is there (the check runs every
        # second, so an open breaker closes within a second of Valkey's return).
        self.breaker.succeeded()
        verdict, marker, identity, highest, policy, role, at_ms = reply
        check = TrustCheck(
            Trust(verdict.decode()),
            marker.decode(),
            identity.decode(),
            int(highest),
            policy.decode(),
            role.decode(),
            int(at_ms),
        )
        if action != "peek":
            self._observe(check)
        return check

    def _observe(self, check: TrustCheck) -> None:
        """Keep the latest check and log what changed since the one before (each is rare and
        worth a line). A check read after a later one (a new connection's check, run during a
        reseed, read after the reseed's mark) is not kept; a distrust it made is still counted,
        since its check dropped the marker whichever answer is read first."""
        if check.verdict is Trust.DISTRUSTED:
            self.distrusted += 1
            log.warning(
                "mirror distrusted: Valkey holds a data set the seed did not write (marker %r, "
                "data set now %r): every instance reads Postgres until a reseed",
                check.marker,
                check.identity,
            )
        if self.trust is not None and check.predates(self.trust):
            return
        last, self.trust = self.trust, check
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
                "maxmemory-policy noeviction (docs/deployment.md: Valkey in production)",
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

    async def pin(self, mitra_ids: Sequence[UUID], seconds: float) -> int:
        """Until unpinned (or for `seconds`), every reader answers these from Postgres: a
        deactivation pins its mitra before it commits, so a mirror write that fails after
        the commit cannot leave it served from the mirror. Returns the pin, for unpin."""
        # Past the breaker: open after an outage, it may not have noticed Valkey is back, and
        # other instances may be reading the mirror meanwhile.
        pin = await self._run(
            self._resync, "pin", int(seconds * 1000), *map(str, mitra_ids), past_the_breaker=True
        )
        return int(pin)

    async def unpin(self, pin: int, mitra_ids: Sequence[UUID]) -> None:
        """The write reached the mirror (or its owner was asked to resync it): the pin becomes
        an ordinary request, which the owner's next resync releases."""
        await self._run(self._resync, "unpin", pin, *map(str, mitra_ids))

    async def resync_requests(self, count: int = 10_000) -> tuple[int, list[UUID]]:
        """(Valkey's time now, up to count ids asked for): release them after the resync."""
        now, *ids = await self._run(self._resync, "take", count)
        return int(now), [UUID(i.decode()) for i in ids]

    async def release_resync_requests(self, taken_at: int, mitra_ids: Sequence[UUID]) -> None:
        """Drop the requests a resync that read Postgres after `taken_at` answered."""
        await self._run(self._resync, "release", taken_at, *map(str, mitra_ids))
