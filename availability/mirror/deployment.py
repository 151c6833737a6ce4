"""What the instances of one deployment share through Valkey: the sweeps' leases (one runner
at a time, with an epoch that fences a late one), each sweep's last run and each instance's
report, so that `availability status` on any machine sees the whole deployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as redis

from ..settings import Settings
from .trust import Trust, TrustCheck, TrustMixin


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


class DeploymentMixin(TrustMixin):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        self._lease = self._register("lease", prelude=False)
        self._release = self._register("release", prelude=False)
        self._announce = self._register("announce", prelude=False)

    async def take_lease(self, name: str, owner: str, ttl_seconds: float) -> int:
        """The lease's epoch if owner holds it now (taken or renewed), else 0."""
        return int(
            await self._lease(keys=self.keys.lease(name), args=[owner, int(ttl_seconds * 1000)])
        )

    async def release_lease(self, name: str, owner: str) -> None:
        await self._release(keys=self.keys.lease(name)[:1], args=[owner])

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
