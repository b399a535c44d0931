"""The reads in flight of one connection (``sources._flight``): answered in order, bounded,
and charged to the memory budget, with answers resolved by hand (no sockets, no pump)."""

from __future__ import annotations

import trio
import trio.testing

from trio_gateway._receipts import Answer, Receipt, Receipts
from trio_gateway.sources._flight import HELD_PER_MESSAGE, HELD_PER_READ, Flight


def pending(receipts: Receipts, n: int) -> tuple[Answer, Receipt]:
    receipt = receipts.open()
    receipt.add(0, n)
    receipts.close(receipt)  # resolved by hand in these tests, not by a settle
    return Answer(n, receipts, receipt), receipt


async def test_answers_are_recorded_in_the_order_of_the_reads() -> None:
    receipts = Receipts()
    flight: Flight[str] = Flight()
    recorded: list[tuple[str, int]] = []

    async def record(item: str, accepted: int) -> None:
        recorded.append((item, accepted))

    first, first_receipt = pending(receipts, 2)
    second, second_receipt = pending(receipts, 3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flight.answer_in_order, record)
        await flight.add(first, 2, 10, "first")
        await flight.add(second, 3, 10, "second")
        second_receipt.resolve([(1, 2)])  # the second settles first: its ack waits
        await trio.testing.wait_all_tasks_blocked()
        assert recorded == []
        first_receipt.resolve([])
        await flight.wait_answered()
        nursery.cancel_scope.cancel()
    assert recorded == [("first", 2), ("second", 1)]


async def test_the_reader_waits_while_the_flight_is_full_and_one_read_always_goes() -> None:
    receipts = Receipts()
    flight: Flight[int] = Flight(max_messages=4, max_bytes=100)
    big, big_receipt = pending(receipts, 10)
    added = trio.Event()

    async def add_big() -> None:
        await flight.add(big, 10, 1000, 0)  # past both bounds: in flight, the reader waits
        added.set()

    async def record(item: int, accepted: int) -> None:
        pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flight.answer_in_order, record)
        nursery.start_soon(add_big)
        await trio.testing.wait_all_tasks_blocked()
        assert len(flight) == 10 and not added.is_set()
        big_receipt.resolve([])
        await added.wait()
        assert not flight
        nursery.cancel_scope.cancel()


async def test_what_the_flight_holds_is_charged_and_a_read_without_room_waits_its_turn() -> None:
    receipts = Receipts()
    held = 0
    room = HELD_PER_READ + HELD_PER_MESSAGE  # one read of one message

    def hold(n: int) -> bool:
        nonlocal held
        if held + n > room:
            return False
        held += n
        return True

    def release(n: int) -> None:
        nonlocal held
        held -= n

    flight: Flight[int] = Flight(hold=hold, release=release)
    first, first_receipt = pending(receipts, 1)
    second, second_receipt = pending(receipts, 1)
    added = trio.Event()

    async def add_second() -> None:
        await flight.add(second, 1, 1, 1)  # no room in the budget: waits until alone
        added.set()

    async def record(item: int, accepted: int) -> None:
        pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flight.answer_in_order, record)
        await flight.add(first, 1, 1, 0)
        assert held == room
        nursery.start_soon(add_second)
        await trio.testing.wait_all_tasks_blocked()
        assert not added.is_set() and held == room  # the second is in flight, uncharged
        first_receipt.resolve([])
        await added.wait()
        assert held == 0
        flight.close()  # the connection ended: the second is forgotten, never answered
        assert not flight and not second.final
        nursery.cancel_scope.cancel()
    assert not second_receipt.done.is_set()
