"""A TCP proxy that counts round trips: how many times a client, having sent, waited for the
server's answer. Between the service and Postgres it counts what a write RPC costs in
latency to the database, whatever the statements are (a pipeline of several counts once)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RoundTrips:
    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self._target = target_port
        self.delay = delay
        """Seconds added to each answer (a database further away)."""
        self.count = 0
        self.last_at = 0.0
        """When the last round trip ended (the event loop's clock)."""
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def quiet(self, seconds: float, timeout: float = 30.0) -> None:
        """Wait until no round trip has ended for `seconds` (a server's start-up work, its
        first sweeps and its listener's first round, is behind it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (idle := loop.time() - self.last_at) < seconds:
            assert loop.time() < deadline, f"round trips went on for {timeout}s"
            await asyncio.sleep(seconds - idle)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._links:
            task.cancel()
        for task in list(self._links):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target)
        waiting = False  # the client sent, and has had no answer since

        async def upstream() -> None:
            nonlocal waiting
            while data := await client_r.read(65536):
                waiting = True
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            nonlocal waiting
            while data := await server_r.read(65536):
                if waiting:
                    self.count += 1
                    self.last_at = asyncio.get_running_loop().time()
                    waiting = False
                if self.delay:
                    await asyncio.sleep(self.delay)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            client_w.close()
            server_w.close()
            self._links.discard(task)


@contextlib.asynccontextmanager
async def counting(target_port: int, delay: float = 0.0) -> AsyncIterator[RoundTrips]:
    proxy = RoundTrips(target_port, delay)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
