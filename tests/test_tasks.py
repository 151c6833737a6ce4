"""Background tasks end when stopped, even when a cancellation was lost on the way: on
Python 3.11 redis-py's commands can return instead of raising a cancel that lands as they
complete (asyncio.wait_for, CPython gh-86296), and a server whose shutdown awaited such a
task once hung forever (seen as a test_audit teardown that never ended)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import RedisError

from availability.mirror import connect_valkey
from availability.settings import Settings
from availability.tasks import cancel_and_wait


async def test_a_loop_on_real_valkey_always_ends_though_its_cancels_can_be_lost(
    settings: Settings,
) -> None:
    client = connect_valkey(settings)
    lost = 0

    async def loop() -> None:
        while True:
            await client.eval("return 1", 0)

    try:
        for _ in range(30):
            task = asyncio.create_task(loop())
            await asyncio.sleep(0.002)
            task.cancel()
            await asyncio.wait({task}, timeout=0.2)
            lost += not task.done()  # the cancel was returned as a result: it carries on
            # Ends, whatever the machine's load (each cancel lands between slow replies).
            async with asyncio.timeout(30):
                await cancel_and_wait([task])
            # Cancelled; or, cancelled mid-reply, failed with the connection it left behind.
            assert task.cancelled() or isinstance(task.exception(), RedisError | OSError)
    finally:
        await client.aclose()
    print(f"{lost} of 30 single cancels were lost")


async def test_a_task_that_swallows_a_cancel_is_cancelled_again() -> None:
    swallowed: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if len(swallowed) < 3:
                    swallowed.append(1)
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_and_wait([task])
    assert task.cancelled() and len(swallowed) == 3


async def test_the_callers_own_cancellation_is_never_swallowed() -> None:
    release = asyncio.Event()

    async def unending() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(unending())
    stopping = asyncio.create_task(cancel_and_wait([task]))
    await asyncio.sleep(0.3)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    release.set()
    async with asyncio.timeout(5):
        await cancel_and_wait([task])


async def test_a_task_that_had_failed_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise ValueError("a bug")

    task = asyncio.create_task(broken(), name="broken-loop")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="availability.tasks"):
        await cancel_and_wait([task])
    assert any(
        "broken-loop" in r.getMessage() and "a bug" in r.getMessage() for r in caplog.records
    )


async def test_a_task_is_still_cancelled_after_its_waiter_gave_up() -> None:
    """A shutdown step's deadline stops the waiting, not the cancelling: the task ends once it
    lets a cancel through, though nobody waits for it any more."""
    swallowed: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if len(swallowed) < 50:  # would swallow cancels for longer than anyone waits
                    swallowed.append(1)
                    await asyncio.sleep(0.05)
                    continue
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.25):
            await cancel_and_wait([task])
    assert not task.done(), "still running when the waiter gave up"
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled(), "the cancelling went on until a cancel got through"
