"""Delivery receipts through the ingress (``ack = "delivered"``): what a source may
acknowledge when the pump settles batches while an offer is still putting its messages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing

from trio_gateway._ingress import Ingress
from trio_gateway._ledger import SourceCounters
from trio_gateway._message import Origin
from trio_gateway.queues import RingBuffer

A = Origin("grpc", "grpc:test", "peer", 0.0)


def delivered_ingress(capacity: int, policy: str = "block") -> Ingress:
    queue: RingBuffer[bytes] = RingBuffer(capacity, policy=policy)  # type: ignore[arg-type]
    counters = SourceCounters("grpc", "grpc:test")
    return Ingress(queue, counters, trio.Event(), grace_period=1.0, ack="delivered")


async def settle_batches(ingress: Ingress, failed_batches: set[int], done: trio.Event) -> None:
    """The pump's part: take each batch once the offer waits, settle it (the batches whose
    number is in ``failed_batches`` as failed whole), until ``done``."""
    buffer = ingress.buffer
    number = 0
    while not done.is_set():
        await trio.testing.wait_all_tasks_blocked()
        if not len(buffer):
            continue
        batch = buffer.get_batch_nowait(100)
        buffer.settle(range(len(batch)) if number in failed_batches else ())
        number += 1


async def answer_with_a_pump(
    ingress: Ingress, failed_batches: set[int], offer: Callable[[], Awaitable[int]]
) -> int:
    done = trio.Event()
    answers: list[int] = []

    async def offering() -> None:
        answers.append(await offer())
        done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(offering)
            nursery.start_soon(settle_batches, ingress, failed_batches, done)
    return answers[0]


PAYLOADS = [b"m%d" % i for i in range(10)]


async def test_a_batch_that_fails_while_the_offer_waits_for_room_is_not_acknowledged() -> None:
    # 4 of 10 go in, the offer waits for room; that first batch fails, the rest is delivered.
    ingress = delivered_ingress(4)
    answer = await answer_with_a_pump(ingress, {0}, lambda: ingress.offer(PAYLOADS, A))
    assert answer == 0
    assert ingress.counters.received == 10 and ingress.counters.abandoned == 0


async def test_a_later_failure_acknowledges_the_prefix_before_it() -> None:
    ingress = delivered_ingress(4)
    answer = await answer_with_a_pump(ingress, {1}, lambda: ingress.offer(PAYLOADS, A))
    assert answer == 4  # the first batch was delivered, the second failed


async def test_an_answer_taken_for_later_counts_a_failure_during_its_wait_for_room() -> None:
    ingress = delivered_ingress(4)

    async def offer_later() -> int:
        return await (await ingress.offer_later(PAYLOADS, A)).wait()

    assert await answer_with_a_pump(ingress, {0}, offer_later) == 0


async def test_a_rejecting_offer_counts_a_failure_during_its_wait_for_room() -> None:
    ingress = delivered_ingress(4)
    answer = await answer_with_a_pump(
        ingress, {0}, lambda: ingress.offer_or_reject(PAYLOADS, A, timeout=5.0)
    )
    assert answer == 0
    assert ingress.counters.received == 10 and not ingress.counters.rejected


async def test_a_batch_longer_than_a_drop_oldest_queue_acknowledges_none_of_it() -> None:
    # The queue keeps the batch's last 4; its first 6 were never queued: none of the batch,
    # from the first, may be acknowledged, though its tail is delivered.
    ingress = delivered_ingress(4, "drop_oldest")
    answer = await answer_with_a_pump(ingress, set(), lambda: ingress.offer_or_reject(PAYLOADS, A))
    assert answer == 0
