"""A TCP proxy in front of a store, for the failures a real server cannot show on demand: a
slow network or store (latency added per direction) and a stall (bytes held until released).

    async with FaultProxy(port_of_the_store) as proxy:
        settings = replace(settings, valkey_url=f"redis://127.0.0.1:{proxy.port}")
        proxy.slow(to_server=0.05)      # each chunk towards the store waits 50 ms
        proxy.stall()                   # nothing moves, either way, until
        proxy.heal()                    # no latency, no stall

Each chunk is delayed, in order, on its own direction: the delay adds to every round trip,
as a slow link does, without reordering bytes. Runs on the event loop that started it; from
another thread, `call_soon` on `proxy.loop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from types import TracebackType
from typing import Self

_CHUNK = 65536


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.to_server = 0.0
        """Seconds each chunk towards the store waits."""
        self.to_client = 0.0
        """Seconds each chunk towards the client waits."""
        self.connections = 0
        """Connections open through the proxy now."""
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Self:
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def slow(self, to_server: float = 0.0, to_client: float = 0.0) -> None:
        self.to_server, self.to_client = to_server, to_client

    def stall(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self.to_server = self.to_client = 0.0
        self._flowing.set()

    def cut(self) -> None:
        """Drop every connection open through the proxy (new ones are still accepted)."""
        for pipe in list(self._pipes):
            pipe.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.accepted += 1
        self.connections += 1
        pipes = [
            asyncio.create_task(self._pipe(reader, upstream_writer, "to_server")),
            asyncio.create_task(self._pipe(upstream_reader, writer, "to_client")),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
            self.connections -= 1
            for w in (writer, upstream_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        """Reads as bytes come; each chunk leaves after its delay, in order (a second task
        sends, so reading never waits on the delay of the chunk before)."""
        due: deque[tuple[float, bytes]] = deque()
        ready = asyncio.Event()
        sender = asyncio.create_task(self._send(due, ready, writer))
        try:
            while chunk := await reader.read(_CHUNK):
                due.append((time.monotonic() + getattr(self, direction), chunk))
                ready.set()
            due.append((0.0, b""))
            ready.set()
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender

    async def _send(
        self, due: deque[tuple[float, bytes]], ready: asyncio.Event, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            while not due:
                ready.clear()
                await ready.wait()
            at, chunk = due.popleft()
            if not chunk:
                return
            if (wait := at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            writer.write(chunk)
            await writer.drain()
