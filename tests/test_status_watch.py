"""`availability status --watch` as a person runs it next to a busy server: redrawn every
second with counts, calls/s by method, fallbacks, sweeps and instances; Ctrl-C exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import sys
from pathlib import Path
from uuid import UUID

from availability.client import AvailabilityClient
from availability.server import Server

from .helpers import Fleet, server_env
from .test_status import reported

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FRAMES = 4


async def test_the_watch_redraws_every_second_with_moving_counts_and_rates(
    server: Server, fleet: Fleet, tmp_path: Path
) -> None:
    mitras = [await fleet.mitra(f"Mitra {i}") for i in range(10)]
    await reported(server)
    env = server_env(server)

    async def busy(client: AvailabilityClient) -> None:
        """Every 0.3 s a mitra goes online, seven times, then offline, seven times, and
        again; the online ones heartbeat all the while."""
        online: list[UUID] = []
        for turn in itertools.count():
            if turn % 14 < 7:
                online.append(next(m for m in mitras if m not in online))
                await client.set_online(online[-1])
            else:
                await client.set_offline(online.pop(0))
            for _ in range(6):
                await asyncio.gather(*(client.heartbeat(m) for m in online))
                await asyncio.sleep(0.05)

    async def frames_drawn(stream: asyncio.StreamReader) -> bytes:
        out = b""
        while out.count(b"\x1b[H") < FRAMES:
            chunk = await stream.read(65536)
            assert chunk, out.decode()
            out += chunk
        return out

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "availability",
        "status",
        "--watch",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
    )
    # Unary heartbeats: the frames show rates by method, and Heartbeat is the one that moves.
    async with AvailabilityClient(f"127.0.0.1:{server.port}", heartbeat_window=0) as client:
        driving = asyncio.create_task(busy(client))
        try:
            assert process.stdout is not None
            async with asyncio.timeout(60):
                out = await frames_drawn(process.stdout)
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(15):
                out += (await process.communicate())[0]
        finally:
            driving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driving
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert process.returncode == 0
    text = out.decode()
    assert text.endswith("\x1b[?25h"), "the cursor is back after Ctrl-C"
    frames = [_ANSI.sub("", frame) for frame in text.split("\x1b[H")[1:]]
    assert len(frames) >= FRAMES, frames
    for frame in frames:
        for section in ("counts ", "chats ", "calls/s ", "fallbacks ", "sweeps ", "instances "):
            assert f"\n{section}" in frame, (section, frame)
        assert frame.startswith("availability status --watch at") and ": OK" in frame, frame
    online = [int(re.search(r"^counts +online (\d+)", f, re.M).group(1)) for f in frames]  # type: ignore[union-attr]
    assert len(set(online)) > 1, online
    beats = [re.search(r"^ +Heartbeat +(\d+\.\d)", f, re.M) for f in frames[1:]]
    assert any(b and float(b.group(1)) > 10 for b in beats), frames[-1]
    assert "measuring" in frames[0], "the first frame has no rates yet"
    assert re.search(r"^ +SetOnline +\d+\.\d", "\n".join(frames), re.M), frames
