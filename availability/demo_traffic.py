"""The demo fleet, alive: its mitras' apps, its customers' chats and its admins, as a
deployment would see them. Everything goes through the public API (AvailabilityClient) but
the chat backend's writes to chat_sessions, which are SQL as that backend's are: the
service follows them by itself. `availability dev` (make run) runs this beside the server,
`availability demo --live` against any server.

At HEARTBEAT_STALE_SECONDS=90 (every period scales with it: at 9 s the demo runs ten times
faster, so the sweeps' cadences set for a test meet traffic to match):

- each online app heartbeats every 15-30 s, jittered. When the traffic starts every app
  heartbeats at once, as apps do when the service comes back, so a fleet that went stale
  while nothing ran is fresh before the first auto-offline sweep; the heartbeat's answer
  tells each app whether it is online, and apps go online until 60 % of the active are;
- an app considers going online or offline every 2.5 s on average, which keeps about 60 %
  of the active mitras online;
- 1.5 customers a second start a chat: searching, offered to one of the least loaded
  mitras FindAvailableMitras returns (pending_acceptance), accepted (pending_payment), paid
  (active), ended after 1-4 minutes; some are cancelled or expire on the way;
- every 45-75 s a mitra is deactivated, or the one deactivated longest is reactivated
  (SetMitraActive) and its app goes online;
- one app when the traffic starts, then one every 30 s on average, goes quiet for 2-4
  minutes (at most 5 % of the online at once, far below the mass-stale guard): it stops
  heartbeating without going offline, so the auto-offline sweep takes it offline; back, its
  heartbeat answers online=false and it sets itself online again.

One INFO line every 30 s (scaled) says what it did.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar
from uuid import UUID

import asyncpg
import grpc

from . import demo_backend as backend
from .client import AvailabilityClient
from .settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

_STALE_SECONDS = 90.0
"""The HEARTBEAT_STALE_SECONDS the periods below are written for."""
_HEARTBEAT = (15.0, 30.0)
_HEARTBEAT_RETRY = (2.0, 5.0)
_SWITCH_EVERY = 2.5
_ONLINE_SHARE = 0.6
_CHATS_PER_SECOND = 1.5
_SEARCH = (1.0, 5.0)
_SEARCH_GIVE_UP = 60.0
_ACCEPT = (2.0, 10.0)
_PAY = (3.0, 15.0)
_CHAT = (60.0, 240.0)
_CANCELLED_WHILE_SEARCHING = 0.05
_NOT_ACCEPTED = 0.12
_NOT_PAID = 0.1
_SENSITIVE = 0.2
_ADMIN = (45.0, 75.0)
_QUIET_EVERY = 30.0
_QUIET = (120.0, 240.0)
"""Longer than the staleness and a sweep: the auto-offline sweep takes every quiet app offline."""
_QUIET_SHARE = 0.05
_REPORT = 30.0
_TICK = 0.25
_IN_FLIGHT = 64
_CHAT_RETRY = 1.0

_OFF_DUTY = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION})
"""A Heartbeat or SetOnline refused so: the mitra was deactivated (by someone else)."""


@dataclass
class _App:
    mitra_id: UUID
    active: bool
    online: bool = False
    next_beat: float = 0.0
    quiet_until: float | None = None


@dataclass
class _Chat:
    session_id: UUID
    status: str
    mitra_id: UUID | None
    due: float
    since: float


class DemoTraffic:
    """The traffic of one demo fleet, until cancelled."""

    def __init__(
        self, client: AvailabilityClient, pool: asyncpg.Pool, *, scale: float = 1.0
    ) -> None:
        """scale: every period of the module's docstring times this."""
        self._client = client
        self._pool = pool
        self._scale = scale
        self._rng = random.Random()
        self._apps: dict[UUID, _App] = {}
        self._deactivated: list[UUID] = []
        self._chats: dict[UUID, _Chat] = {}
        self._in_flight = asyncio.Semaphore(_IN_FLIGHT)
        self.tally: Counter[str] = Counter()
        """What it did since the last report line."""
        self.errors: Counter[str] = Counter()
        """Calls that failed since the last report line, by 'Method CODE'."""
        self._late = 0.0
        self.started = asyncio.Event()
        """Set once it knows its fleet (mitras added later are not its own)."""

    async def run(self) -> None:
        await self._start()
        self.started.set()
        self._go_quiet()
        async with asyncio.TaskGroup() as tasks:
            for loop in (
                self._heartbeats,
                self._switches,
                self._chats_loop,
                self._admins,
                self._quiet,
                self._reports,
            ):
                tasks.create_task(loop(), name=f"demo-{loop.__name__.strip('_')}")

    async def _start(self) -> None:
        async with self._pool.acquire() as conn:
            fleet = await conn.fetch(backend.FLEET)
            chats = await conn.fetch(backend.OPEN_CHATS)
        self._apps = {row["id"]: _App(row["id"], row["is_active"]) for row in fleet}
        self._deactivated = [app.mitra_id for app in self._apps.values() if not app.active]
        active = [app for app in self._apps.values() if app.active]
        await self._each(active, self._learn)
        offline = [app for app in active if not app.online]
        missing = round(_ONLINE_SHARE * len(active)) - (len(active) - len(offline))
        await self._each(self._rng.sample(offline, max(0, missing)), self._set_online)
        now = time.monotonic()
        first = {
            "searching": _SEARCH,
            "pending_acceptance": _ACCEPT,
            "pending_payment": _PAY,
            "active": (0.0, _CHAT[1]),
        }
        for row in chats:
            due = now + self._between(first[row["status"]])
            self._chats[row["id"]] = _Chat(row["id"], row["status"], row["mitra_id"], due, now)
        log.info(
            "demo traffic: %d mitras, %d of %d active online (%d set online now), %d chats open",
            len(self._apps),
            sum(app.online for app in active),
            len(active),
            self.tally["set online"],
            len(self._chats),
        )
        self.tally.clear()

    def _between(self, bounds: tuple[float, float]) -> float:
        return self._rng.uniform(*bounds) * self._scale

    def _every(self, mean: float) -> float:
        return self._rng.expovariate(1 / (mean * self._scale))

    async def _each(self, items: Iterable[T], action: Callable[[T], Awaitable[None]]) -> None:
        async def bounded(item: T) -> None:
            async with self._in_flight:
                await action(item)

        await asyncio.gather(*(bounded(item) for item in items))

    async def _call(
        self, method: str, call: Awaitable[T], app: _App | None = None
    ) -> T | grpc.StatusCode:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            # CANCELLED is the server going away under a call in flight (Ctrl-C on `make
            # run`): the end of the demo, not an error of its traffic. An app's call refused
            # because the demo itself deactivated its mitra meanwhile is not one either.
            mine = app is not None and not app.active and code in _OFF_DUTY
            if code is not grpc.StatusCode.CANCELLED and not mine:
                self.errors[f"{method} {code.name}"] += 1
            return code

    def _refused(self, app: _App, code: grpc.StatusCode) -> None:
        if code in _OFF_DUTY and app.active:
            app.active = app.online = False
            app.quiet_until = None
            self._deactivated.append(app.mitra_id)
        elif code is grpc.StatusCode.NOT_FOUND:
            self._apps.pop(app.mitra_id, None)

    # Apps: heartbeats, online and offline, quiet spells.

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            due = [
                app
                for app in self._apps.values()
                if app.active
                and app.online
                and app.next_beat <= now
                and (app.quiet_until is None or app.quiet_until <= now)
            ]
            punctual = [app.next_beat for app in due if app.quiet_until is None]
            if punctual:
                self._late = max(self._late, now - min(punctual))
            await self._each(due, self._beat)

    async def _learn(self, app: _App) -> None:
        """An app's first heartbeat: the answer says whether its mitra is online."""
        answer = await self._call("Heartbeat", self._client.heartbeat(app.mitra_id), app)
        if isinstance(answer, grpc.StatusCode):
            self._refused(app, answer)
            return
        app.online = answer
        app.next_beat = time.monotonic() + self._between(_HEARTBEAT)

    async def _beat(self, app: _App) -> None:
        back = app.quiet_until is not None
        app.quiet_until = None
        answer = await self._call("Heartbeat", self._client.heartbeat(app.mitra_id), app)
        if isinstance(answer, grpc.StatusCode):
            self._refused(app, answer)
            app.next_beat = time.monotonic() + self._between(_HEARTBEAT_RETRY)
            return
        self.tally["heartbeats"] += 1
        app.next_beat = time.monotonic() + self._between(_HEARTBEAT)
        if answer:
            return
        if back:
            self.tally["back after the sweep"] += 1
            await self._set_online(app)
        else:  # someone else took it offline (a person with grpcurl): the app respects it
            app.online = False

    async def _set_online(self, app: _App) -> None:
        answer = await self._call("SetOnline", self._client.set_online(app.mitra_id), app)
        if isinstance(answer, grpc.StatusCode):
            self._refused(app, answer)
            return
        self.tally["set online"] += 1
        app.online = True
        app.next_beat = time.monotonic() + self._between(_HEARTBEAT)

    async def _set_offline(self, app: _App) -> None:
        answer = await self._call("SetOffline", self._client.set_offline(app.mitra_id), app)
        if isinstance(answer, grpc.StatusCode):
            self._refused(app, answer)
            return
        self.tally["set offline"] += 1
        app.online = False

    async def _switches(self) -> None:
        """Online with probability _ONLINE_SHARE, offline with the rest: the share holds."""
        while True:
            await asyncio.sleep(self._every(_SWITCH_EVERY))
            apps = [a for a in self._apps.values() if a.active and a.quiet_until is None]
            if not apps:
                continue
            app = self._rng.choice(apps)
            if app.online and self._rng.random() >= _ONLINE_SHARE:
                await self._set_offline(app)
            elif not app.online and self._rng.random() < _ONLINE_SHARE:
                await self._set_online(app)

    async def _quiet(self) -> None:
        while True:
            await asyncio.sleep(self._every(_QUIET_EVERY))
            self._go_quiet()

    def _go_quiet(self) -> None:
        online = [app for app in self._apps.values() if app.active and app.online]
        talking = [app for app in online if app.quiet_until is None]
        if talking and len(online) - len(talking) < max(1, int(_QUIET_SHARE * len(online))):
            self._rng.choice(talking).quiet_until = time.monotonic() + self._between(_QUIET)
            self.tally["went quiet"] += 1

    async def _admins(self) -> None:
        """Deactivate a mitra, then reactivate the one deactivated longest, and again."""
        deactivate = True
        while True:
            await asyncio.sleep(self._between(_ADMIN))
            if deactivate:
                active = [app for app in self._apps.values() if app.active]
                if active:
                    await self._set_active(self._rng.choice(active), False)
            elif self._deactivated:
                if app := self._apps.get(self._deactivated[0]):
                    await self._set_active(app, True)
                else:
                    del self._deactivated[0]
            deactivate = not deactivate

    async def _set_active(self, app: _App, active: bool) -> None:
        before = app.active, app.online, app.quiet_until
        if not active:  # no more calls for it from now: those in flight may be refused
            app.active, app.online, app.quiet_until = False, False, None
        call = self._client.set_mitra_active(app.mitra_id, active)
        if isinstance(answer := await self._call("SetMitraActive", call), grpc.StatusCode):
            app.active, app.online, app.quiet_until = before
            self._refused(app, answer)
            return
        app.active = active
        if active:
            self._deactivated.remove(app.mitra_id)
            self.tally["reactivated"] += 1
            await self._set_online(app)
        else:
            self._deactivated.append(app.mitra_id)
            self.tally["deactivated"] += 1

    # Chats: the chat backend's SQL, the pairing service's FindAvailableMitras.

    async def _chats_loop(self) -> None:
        per_second = _CHATS_PER_SECOND / self._scale
        owed, last = 0.0, time.monotonic()
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            owed += per_second * (now - last)
            last, starting = now, int(owed)
            owed -= starting
            offered = {
                chat.mitra_id
                for chat in self._chats.values()
                if chat.status == "pending_acceptance" and chat.mitra_id is not None
            }
            due = [chat for chat in self._chats.values() if chat.due <= now]
            await self._each(range(starting), self._start_chat)
            await self._each(due, partial(self._advance, offered=offered))

    async def _start_chat(self, _: int) -> None:
        sensitivity = "sensitive" if self._rng.random() < _SENSITIVE else "normal"
        try:
            async with self._pool.acquire() as conn:
                session_id = await conn.fetchval(backend.START_CHAT, sensitivity)
        except backend.ERRORS as exc:
            self.errors[f"chat backend {type(exc).__name__}"] += 1
            return
        now = time.monotonic()
        due = now + self._between(_SEARCH)
        self._chats[session_id] = _Chat(session_id, "searching", None, due, now)
        self.tally["chats started"] += 1

    async def _advance(self, chat: _Chat, offered: set[UUID]) -> None:
        """One step of a chat's life, as the chat backend would take it."""
        draw = self._rng.random()
        if chat.status == "searching":
            if draw < _CANCELLED_WHILE_SEARCHING:
                await self._move(chat, "cancelled")
            elif time.monotonic() - chat.since > _SEARCH_GIVE_UP * self._scale:
                await self._move(chat, "expired")
            elif mitra := await self._pair(offered):
                offered.add(mitra)
                await self._move(chat, "pending_acceptance", _ACCEPT, mitra)
            else:
                chat.due = time.monotonic() + self._between(_SEARCH)
        elif chat.status == "pending_acceptance":
            app = self._apps.get(chat.mitra_id) if chat.mitra_id else None
            if app is None or not (app.active and app.online) or draw < _NOT_ACCEPTED:
                await self._move(chat, "expired")
            else:
                await self._move(chat, "pending_payment", _PAY)
        elif chat.status == "pending_payment":
            if draw < _NOT_PAID:
                await self._move(chat, "cancelled")
            else:
                await self._move(chat, "active", _CHAT)
        else:
            await self._move(chat, "ended")

    async def _pair(self, offered: set[UUID]) -> UUID | None:
        """One of the least loaded available mitras not already asked (a pairing blast)."""
        found = await self._call(
            "FindAvailableMitras", self._client.find_available_mitras(10, offered)
        )
        if isinstance(found, grpc.StatusCode) or not found:
            return None
        least = [mitra for mitra in found if mitra.load == found[0].load]
        return self._rng.choice(least).mitra_id

    async def _move(
        self,
        chat: _Chat,
        status: str,
        lasts: tuple[float, float] = (0.0, 0.0),
        mitra_id: UUID | None = None,
    ) -> None:
        try:
            async with self._pool.acquire() as conn:
                moved = await conn.execute(
                    backend.MOVE_CHAT, chat.session_id, chat.status, status, mitra_id
                )
        except backend.ERRORS as exc:
            self.errors[f"chat backend {type(exc).__name__}"] += 1
            chat.due = time.monotonic() + _CHAT_RETRY * self._scale
            return
        if moved != "UPDATE 1" or status in backend.CLOSED:
            # Closed, or moved by someone else (a reset, a person with psql): forgotten.
            del self._chats[chat.session_id]
        else:
            chat.status, chat.mitra_id = status, mitra_id or chat.mitra_id
            chat.due = time.monotonic() + self._between(lasts)
        if moved == "UPDATE 1":
            self.tally[status] += 1

    # The report line.

    async def _reports(self) -> None:
        while True:
            await asyncio.sleep(_REPORT * self._scale)
            log.info("%s", self.summary(_REPORT * self._scale))
            self.tally.clear()
            self.errors.clear()
            self._late = 0.0

    def summary(self, seconds: float) -> str:
        t = self.tally
        active = [app for app in self._apps.values() if app.active]
        errors = ", ".join(f"{name} {count}" for name, count in self.errors.most_common())
        return (
            f"demo traffic, last {seconds:.0f} s: {t['heartbeats']} heartbeats (at most"
            f" {self._late:.1f} s late), {t['set online']} set online, {t['set offline']}"
            f" offline, {t['went quiet']} went quiet, {t['back after the sweep']} back after"
            f" the sweep took them offline, {t['deactivated']} deactivated,"
            f" {t['reactivated']} reactivated; chats {t['chats started']} started,"
            f" {t['pending_acceptance']} offered, {t['pending_payment']} accepted,"
            f" {t['active']} paid, {t['ended']} ended, {t['expired']} expired,"
            f" {t['cancelled']} cancelled; errors: {errors or 'none'}; now"
            f" {sum(app.online for app in active)} of {len(active)} active mitras online"
            f" ({sum(app.quiet_until is not None for app in active)} quiet),"
            f" {len(self._chats)} chats open"
        )


def _local(address: str) -> str:
    """Where to reach a server listening on address (a wildcard host: this machine)."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("", "0.0.0.0", "[::]") else address


async def _serving(client: AvailabilityClient) -> None:
    while True:
        try:
            if await client.health() == "SERVING":
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)


async def drive(settings: Settings, *, address: str | None = None) -> None:
    """The demo traffic against the server at address (by default GRPC_ADDRESS), from the
    moment it is SERVING until cancelled. Periods scale with HEARTBEAT_STALE_SECONDS, so give
    it the server's. An error in the traffic is logged and ends the traffic only."""
    if settings.tls_cert_file:
        log.warning("demo traffic: not started, it speaks plaintext and the server TLS")
        return
    token = settings.auth_tokens[0] if settings.auth_tokens else None
    target = address or _local(settings.grpc_address)
    scale = settings.heartbeat_stale_seconds / _STALE_SECONDS
    try:
        async with (
            asyncpg.create_pool(
                settings.database_url,
                min_size=1,
                max_size=4,
                command_timeout=settings.database_timeout_seconds,
            ) as pool,
            AvailabilityClient(target, token=token) as client,
        ):
            await _serving(client)
            await DemoTraffic(client, pool, scale=scale).run()
    except Exception:
        log.exception("demo traffic stopped by an error; the server runs on")
