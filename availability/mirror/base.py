"""What every part of Mirror shares: one client, one breaker, one set of keys, and the
settings the scripts take as arguments. Each part registers the scripts it calls; they run
through `_run`, so that every call counts for or against the breaker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as redis

from ..settings import Settings
from ..timing import StoreTimes
from .connection import Breaker
from .keys import Keys


def _script(name: str, *, layout: int = 0) -> str:
    """A script's source; with a layout, behind the shared prelude, which then reads only
    the marker of that layout as seeded."""
    folder = resources.files("availability.mirror") / "lua"
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    if not layout:
        return body
    prelude = (folder / "prelude.lua").read_text(encoding="utf-8")
    return prelude.replace("@MARK@", _mark(layout)) + "\n" + body


def _mark(layout: int) -> str:
    return f"v{layout} "


class _Script:
    """A registered script whose every call is timed (as its name); like redis's Script,
    `script` is its source and `sha` its hash."""

    def __init__(self, script: Any, seconds: Any) -> None:
        self._call = script
        self.script: str = script.script
        self.sha: str = script.sha
        self._seconds = seconds

    async def __call__(self, keys: Sequence[str], args: Sequence[object]) -> Any:
        started = time.perf_counter()
        try:
            return await self._call(keys=keys, args=args)
        finally:
            self._seconds.observe(time.perf_counter() - started)


class MirrorBase:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.seconds = StoreTimes(
            "availability_valkey_seconds",
            "Time of a Valkey operation as this process sees it (the round trip, its event "
            "loop's delay included), by operation: each script, and heartbeat for the "
            "group-committed heartbeat call.",
        )
        self.breaker = Breaker(settings.valkey_breaker_failures, settings.valkey_breaker_seconds)
        self.keys = Keys.for_prefix(settings.valkey_key_prefix)
        self._all_keys = self.keys.all()
        self._stale_ms = int(settings.heartbeat_stale_seconds * 1000)
        self._credit_ms = int(settings.heartbeat_mirror_interval_seconds * 1000)
        self._beacon_ttl_ms = int(settings.beacon_shared_seconds * 1000)
        self._retain = settings.watch_retained_changes
        self.layout = settings.mirror_layout
        self._mark = _mark(self.layout)

    def _register(self, name: str, *, prelude: bool = True) -> _Script:
        script = self.client.register_script(_script(name, layout=self.layout if prelude else 0))
        return _Script(script, self.seconds.op(name))

    async def _run(self, script: _Script, *args: object, past_the_breaker: bool = False) -> Any:
        return await self._run_with(script, (), args, past_the_breaker=past_the_breaker)

    async def _run_with(
        self,
        script: _Script,
        keys: Sequence[str],
        args: Sequence[object],
        *,
        past_the_breaker: bool = False,
    ) -> Any:
        """A script on the whole mirror's keys (as the prelude names them) and then its own.
        past_the_breaker: tried even while the breaker is open (a call that must reach Valkey
        if it can, and is rare); its success closes the breaker like a probe's."""
        if not past_the_breaker:
            self.breaker.check()
        try:
            reply = await script(keys=[*self._all_keys, *keys], args=list(args))
        except BaseException as exc:
            self.breaker.judge(exc)
            raise
        self.breaker.succeeded()
        return reply
