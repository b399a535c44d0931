"""``sources/_idle.py``: read deadlines cut by one reaper task, without a scope per read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio.testing import MockClock

from trio_gateway.sources._idle import ReadWatch, Reaper


@asynccontextmanager
async def reaping() -> AsyncIterator[tuple[Reaper, trio.Nursery]]:
    """A reaper running in a nursery (cancelled at the end), as a listener runs one."""
    reaper = Reaper()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reaper.run)
        yield reaper, nursery
        nursery.cancel_scope.cancel()


async def _read(watch: ReadWatch, arrived: trio.Event) -> str:
    """A read as the WebSocket source does it: in the watch's scope, marked as waiting."""
    with trio.CancelScope() as scope:
        watch.scope = scope
        if watch.expired():
            return "expired before the read"
        watch.arm()
        watch.waiting = True
        try:
            await arrived.wait()
        finally:
            watch.waiting = False
        if scope.cancel_called:
            return "read, then cut"
        return "read"
    return "cut while waiting"


async def test_a_read_that_waits_past_its_deadline_is_cut_then(autojump_clock: MockClock) -> None:
    async with reaping() as (reaper, _):
        start = trio.current_time()
        watch = ReadWatch(reaper, start + 5)
        assert await _read(watch, trio.Event()) == "cut while waiting"
        assert trio.current_time() - start == 5


async def test_a_deadline_pushed_back_is_honoured(autojump_clock: MockClock) -> None:
    async with reaping() as (reaper, nursery):
        start = trio.current_time()
        watch = ReadWatch(reaper, start + 5)

        async def push_back() -> None:
            for _ in range(4):  # frames keep coming for 12 s
                await trio.sleep(3)
                watch.deadline = trio.current_time() + 5

        nursery.start_soon(push_back)
        assert await _read(watch, trio.Event()) == "cut while waiting"
        assert trio.current_time() - start == 17  # 5 s after the last frame, at 12 s


async def test_a_connection_busy_elsewhere_is_not_cut_there(autojump_clock: MockClock) -> None:
    """Past its deadline while not in a read (an offer waiting for room): no cancel; the
    next read sees the deadline passed."""
    async with reaping() as (reaper, _):
        watch = ReadWatch(reaper, trio.current_time() + 5)
        with trio.CancelScope() as scope:
            watch.scope = scope
            watch.arm()
            await trio.sleep(20)  # the offer
        assert not scope.cancel_called
        assert await _read(watch, trio.Event()) == "expired before the read"
        watch.deadline = trio.current_time() + 5  # frames read meanwhile: not expired
        assert await _read(watch, trio.Event()) == "cut while waiting"


async def test_a_cut_that_comes_after_the_read_finished_keeps_what_was_read() -> None:
    """The race: the read's wait has completed (the reader is rescheduled, not yet run) when
    the reaper cancels. The reader still gets its bytes and sees ``cancel_called`` before
    any checkpoint, so it can carry on in a fresh scope."""
    reaper = Reaper()
    watch = ReadWatch(reaper, trio.current_time() + 3600)
    arrived = trio.Event()
    result: list[str] = []

    async def reader() -> None:
        result.append(await _read(watch, arrived))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert watch.waiting
        arrived.set()  # the bytes are there: the reader is rescheduled...
        watch.scope.cancel()  # ...and the reaper cuts before it runs
    assert result == ["read, then cut"]


async def test_a_thousand_connections_are_each_cut_at_their_own_deadline(
    autojump_clock: MockClock,
) -> None:
    """One reaper for a listener's connections: each waiting one is cut at its deadline."""
    cut: list[float] = []
    async with reaping() as (reaper, _):
        start = trio.current_time()

        async def connection(i: int) -> None:
            watch = ReadWatch(reaper, start + 10 + i / 1000)
            assert await _read(watch, trio.Event()) == "cut while waiting"
            cut.append(trio.current_time() - start - i / 1000)

        async with trio.open_nursery() as connections:
            for i in range(1000):
                connections.start_soon(connection, i)
    assert len(cut) == 1000
    assert all(abs(c - 10) < 1e-6 for c in cut)


async def test_a_flood_of_short_connections_does_not_grow_the_heap() -> None:
    """Each ended connection's entry would wait for its deadline; the dead are swept once
    they are most of the heap, so the heap stays near the number of live connections."""
    reaper = Reaper()
    now = trio.current_time()
    live = [ReadWatch(reaper, now + 60) for _ in range(10)]
    for watch in live:
        watch.arm()
    for _ in range(10_000):
        watch = ReadWatch(reaper, now + 60)
        watch.arm()
        watch.close()
    assert len(reaper._heap) <= 2 * 64 + len(live)
    assert {entry[2] for entry in reaper._heap} >= set(live)
