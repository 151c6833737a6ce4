"""Sharing one computation among every concurrent caller (the beacon, the dashboard)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    started: float


class Coalesced(Generic[K, V]):
    """A value per key, recomputed at most once per max_age however many callers ask:
    concurrent callers wait for the one computation in flight instead of starting their own."""

    def __init__(self) -> None:
        self._entries: dict[K, _Entry[V]] = {}
        self._locks: dict[K, asyncio.Lock] = {}
        self.computations = 0

    def _fresh(self, key: K, max_age: float) -> _Entry[V] | None:
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() - entry.started < max_age:
            return entry
        return None

    def latest(self, key: K) -> V | None:
        """The last value computed for key, however old (None before the first)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    async def get(self, key: K, max_age: float, compute: Callable[[], Awaitable[V]]) -> V:
        if entry := self._fresh(key, max_age):
            return entry.value
        async with self._locks.setdefault(key, asyncio.Lock()):
            if entry := self._fresh(key, max_age):
                return entry.value
            started = time.monotonic()
            value = await compute()
            self.computations += 1
            self._entries[key] = _Entry(value, started)
            return value
