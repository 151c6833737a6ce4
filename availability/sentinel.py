"""Valkey behind Sentinel (VALKEY_SENTINELS, VALKEY_SENTINEL_MASTER): to be written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import ConnectionPool

from .settings import Settings


def sentinel_pool(
    settings: Settings, url: str, *, on_moved: Callable[[], None] | None = None, **options: Any
) -> ConnectionPool:
    raise NotImplementedError("Sentinel mode")
