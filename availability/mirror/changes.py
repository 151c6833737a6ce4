"""The change stream the watch hub (watch.py) follows. Every script that changes a mitra's
availability publishes into it in the same atomic step (`publish` in prelude.lua), so the
hub needs only a snapshot to start from, the changes after a revision, and a position that
tells it the mirror it follows was flushed, replaced or reseeded.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import redis.asyncio as redis

from ..model import (
    AvailabilityChange,
    AvailabilitySnapshot,
    AvailableMitra,
    ChangeKind,
    UnavailableReason,
)
from ..settings import Settings
from .base import MirrorBase
from .connection import connect_valkey

_EXPIRE_BATCH = 10_000
WATCH_BLOCK_SECONDS = 1.0
_KINDS = {b"a": ChangeKind.AVAILABLE, b"u": ChangeKind.UNAVAILABLE, b"l": ChangeKind.LOAD_CHANGED}
_REASONS = {reason.value.encode(): reason for reason in UnavailableReason}


def _change(entry_id: bytes, payload: bytes) -> AvailabilityChange:
    kind, reason, mitra_id, load, capacity, name = payload.split(b"\x1f", 5)
    return AvailabilityChange(
        revision=int(entry_id.split(b"-", 1)[0]),
        kind=_KINDS[kind],
        mitra=AvailableMitra(UUID(mitra_id.decode()), name.decode(), int(load), int(capacity)),
        reason=_REASONS.get(reason),
    )


class ChangesMixin(MirrorBase):
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        super().__init__(client, settings)
        # XREAD BLOCK holds its connection: the watch hub gets a client of its own.
        self._reader = connect_valkey(settings, blocking_seconds=WATCH_BLOCK_SECONDS)
        self._watch_expire = self._register("watch_expire")
        self._watch_snapshot = self._register("watch_snapshot")

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
