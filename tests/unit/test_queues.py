"""The four queues against one reference model (hypothesis stateful), and the awaiting paths."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from trio_gateway._errors import ConfigurationError
from trio_gateway._frames import Frames
from trio_gateway.queues import (
    POLICIES,
    QUEUE_KINDS,
    ChannelQueue,
    LockedListQueue,
    LockedRingBuffer,
    OverflowPolicy,
    Queue,
    RingBuffer,
)
from trio_gateway.queues import queue_class as lookup_queue

# -- the reference model -----------------------------------------------------------------


class Model:
    """A plain list and the policy's rules, written from the contract, not from the code."""

    def __init__(self, capacity: int, policy: OverflowPolicy, max_bytes: int | None) -> None:
        self.capacity = capacity
        self.policy = policy
        self.max_bytes = max_bytes
        self.items: list[bytes] = []
        self.offered = 0
        self.put = 0
        self.got = 0
        self.refused = 0
        self.dropped = {"drop_newest": 0, "drop_oldest": 0}
        self.closed = False

    @property
    def queued_bytes(self) -> int:
        return sum(map(len, self.items))

    def fits(self, items: list[bytes]) -> bool:
        if len(items) > self.capacity:
            return False
        return self.max_bytes is None or sum(map(len, items)) <= self.max_bytes

    def put_many(self, batch: list[bytes], drop: bool) -> int:
        """Apply the policy; return how many of ``batch`` are now queued."""
        self.offered += len(batch)
        if self.policy == "drop_oldest":
            # The longest suffix of the batch that fits on its own survives; the batch's
            # older items and then the queue's oldest make room (all counted drop_oldest).
            start = len(batch)
            while start > 0 and self.fits(batch[start - 1 :]):
                start -= 1
            kept = batch[start:]
            self.dropped["drop_oldest"] += start
            while self.items and not self.fits(self.items + kept):
                self.items.pop(0)
                self.dropped["drop_oldest"] += 1
            self.items += kept
            self.put += len(kept)
            return len(kept)
        # block and drop_newest: the longest prefix that fits is accepted.
        accepted = 0
        while accepted < len(batch) and self.fits(self.items + batch[: accepted + 1]):
            accepted += 1
        self.items += batch[:accepted]
        self.put += accepted
        rest = len(batch) - accepted
        if self.policy == "drop_newest" and drop:
            self.dropped["drop_newest"] += rest
        else:
            self.refused += rest
        return accepted

    def get_batch(self, max_items: int) -> list[bytes]:
        batch, self.items = self.items[:max_items], self.items[max_items:]
        self.got += len(batch)
        return batch


# -- the state machine -------------------------------------------------------------------


def make_machine(kind: str, policy: OverflowPolicy, with_max_bytes: bool) -> type[Any]:
    queue_class = QUEUE_KINDS[kind]

    class QueueMachine(RuleBasedStateMachine):
        queue: Queue[bytes]
        model: Model

        def __init__(self) -> None:
            super().__init__()
            self.seq = 0

        @initialize(
            capacity=st.integers(min_value=1, max_value=6),
            max_bytes=st.integers(min_value=1, max_value=40),
        )
        def create(self, capacity: int, max_bytes: int) -> None:
            limit = max_bytes if with_max_bytes else None
            self.queue = queue_class(capacity, policy=policy, max_bytes=limit)  # type: ignore[assignment]
            self.model = Model(capacity, policy, limit)

        def item(self, size: int) -> bytes:
            # Unique and ordered, so FIFO violations and lost or duplicated items show.
            self.seq += 1
            label = b"%d:" % self.seq
            return label + b"." * max(0, size - len(label))

        def expect_closed(self, batch: list[bytes], drop: bool = True) -> None:
            with pytest.raises(trio.ClosedResourceError):
                self.queue.put_many_nowait(batch, drop=drop)

        @rule(size=st.integers(min_value=0, max_value=24))
        def put_nowait(self, size: int) -> None:
            item = self.item(size)
            if self.model.closed:
                with pytest.raises(trio.ClosedResourceError):
                    self.queue.put_nowait(item)
                return
            assert self.queue.put_nowait(item) == (self.model.put_many([item], True) == 1)

        @rule(
            sizes=st.lists(st.integers(min_value=0, max_value=24), max_size=10),
            drop=st.booleans(),
        )
        def put_many_nowait(self, sizes: list[int], drop: bool) -> None:
            batch = [self.item(size) for size in sizes]
            if self.model.closed and batch:
                self.expect_closed(batch, drop)
                return
            if self.model.closed:
                return
            assert self.queue.put_many_nowait(batch, drop=drop) == self.model.put_many(batch, drop)

        @rule(
            sizes=st.lists(st.integers(min_value=0, max_value=24), max_size=10),
            drop=st.booleans(),
        )
        def put_frames(self, sizes: list[int], drop: bool) -> None:
            # Packed newline frames (one TCP read's): the ring keeps them in one slot, every
            # queue counts and bounds them as their frames.
            batch = [self.item(size) for size in sizes]
            frames = Frames(b"".join(item + b"\n" for item in batch), len(batch))
            if self.model.closed and batch:
                with pytest.raises(trio.ClosedResourceError):
                    self.queue.put_many_nowait(frames, drop=drop)
                return
            if self.model.closed:
                return
            assert self.queue.put_many_nowait(frames, drop=drop) == self.model.put_many(batch, drop)

        @rule(max_items=st.integers(min_value=1, max_value=8))
        def get_pieces_nowait(self, max_items: int) -> None:
            if not self.model.items:
                expected = trio.EndOfChannel if self.model.closed else trio.WouldBlock
                with pytest.raises(expected):
                    self.queue.get_pieces_nowait(max_items)
                return
            pieces, count, packed = self.queue.get_pieces_nowait(max_items)
            taken: list[bytes] = []
            for piece in pieces:
                taken += piece if type(piece) is Frames else [piece]
            assert packed == any(type(piece) is Frames for piece in pieces)
            assert count == len(taken)
            assert taken == self.model.get_batch(max_items)

        @rule(max_items=st.integers(min_value=1, max_value=8))
        def get_batch_nowait(self, max_items: int) -> None:
            if not self.model.items:
                expected = trio.EndOfChannel if self.model.closed else trio.WouldBlock
                with pytest.raises(expected):
                    self.queue.get_batch_nowait(max_items)
                return
            assert self.queue.get_batch_nowait(max_items) == self.model.get_batch(max_items)

        @rule()
        def get_nowait(self) -> None:
            if not self.model.items:
                expected = trio.EndOfChannel if self.model.closed else trio.WouldBlock
                with pytest.raises(expected):
                    self.queue.get_nowait()
                return
            assert self.queue.get_nowait() == self.model.get_batch(1)[0]

        @rule()
        def close(self) -> None:
            self.queue.close()
            self.model.closed = True

        @invariant()
        def statistics_match_the_model(self) -> None:
            stats = self.queue.statistics()
            model = self.model
            assert len(self.queue) == stats.depth == len(model.items)
            assert stats.depth <= stats.capacity
            assert stats.put == model.put
            assert stats.got == model.got
            assert dict(stats.dropped) == model.dropped
            assert stats.closed == model.closed
            if model.max_bytes is not None:
                assert stats.bytes == model.queued_bytes <= model.max_bytes
            # Conservation: every offered item is queued, delivered, dropped or refused.
            assert model.offered == (
                stats.got + stats.depth + sum(stats.dropped.values()) + model.refused
            )

        def teardown(self) -> None:
            # After close, consumers drain exactly what is left, then see end-of-stream.
            self.queue.close()
            drained: list[bytes] = []
            while True:
                try:
                    drained += self.queue.get_batch_nowait(3)
                except trio.EndOfChannel:
                    break
            assert drained == self.model.items
            with pytest.raises(trio.EndOfChannel):
                self.queue.get_nowait()

    QueueMachine.__name__ = f"QueueMachine[{kind},{policy},{with_max_bytes}]"
    return QueueMachine


def supports(kind: str, policy: OverflowPolicy, with_max_bytes: bool) -> bool:
    queue_class = QUEUE_KINDS[kind]
    return policy in queue_class.supported_policies and not (
        with_max_bytes and queue_class is ChannelQueue
    )


COMBINATIONS = [
    pytest.param(
        kind, policy, with_max_bytes, id=f"{kind}-{policy}-{'bytes' if with_max_bytes else 'items'}"
    )
    for kind in QUEUE_KINDS
    for policy in POLICIES
    for with_max_bytes in (False, True)
    if supports(kind, policy, with_max_bytes)
]


@pytest.mark.parametrize(("kind", "policy", "with_max_bytes"), COMBINATIONS)
def test_queue_matches_the_model(kind: str, policy: OverflowPolicy, with_max_bytes: bool) -> None:
    machine = make_machine(kind, policy, with_max_bytes)

    async def main() -> None:
        # The locked queues call trio.Lock.acquire_nowait, which needs a running task; the
        # machine's rules are synchronous, so the whole run happens inside one task.
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=35, stateful_step_count=25, deadline=None),
        )

    trio.run(main)


def test_every_kind_and_policy_is_covered() -> None:
    assert len(COMBINATIONS) == 3 * 3 * 2 + 2  # three full queues, the channel without bytes
    assert {param.values[0] for param in COMBINATIONS} == set(QUEUE_KINDS)


# -- the awaiting paths ------------------------------------------------------------------

KINDS = list(QUEUE_KINDS)


def make(kind: str, capacity: int, **options: Any) -> Queue[bytes]:
    cls = lookup_queue(kind)
    assert cls is not None, kind
    return cls(capacity, **options)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("cls", "spelled", "shown"),
    [
        (RingBuffer, "drop-oldest", "drop_oldest"),
        (RingBuffer, "drop_oldest", "drop_oldest"),
        (LockedRingBuffer, "drop-newest", "drop_newest"),
        (ChannelQueue, "drop-newest", "drop_newest"),
        (LockedListQueue, "block", "block"),
    ],
)
def test_a_policy_is_accepted_in_both_spellings_and_shown_in_one(
    cls: type[Queue[bytes]], spelled: str, shown: str
) -> None:
    queue = cls(10, policy=spelled)  # type: ignore[arg-type]
    assert queue.policy == shown
    assert queue.statistics().policy == shown
    assert f"policy={shown}" in repr(queue)


def test_queue_kinds_are_shown_with_underscores_and_found_in_both_spellings() -> None:
    assert list(QUEUE_KINDS) == ["ring", "locked_ring", "channel", "locked_list"]
    assert [cls.kind for cls in QUEUE_KINDS.values()] == list(QUEUE_KINDS)
    assert lookup_queue("locked-ring") is lookup_queue("locked_ring") is LockedRingBuffer
    assert lookup_queue("locked-list") is LockedListQueue
    assert lookup_queue("deque") is None


def test_an_unknown_policy_still_names_the_choices() -> None:
    with pytest.raises(ConfigurationError, match="drop_newest; got 'drop-sometimes'"):
        ChannelQueue(10, policy="drop-sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
async def test_put_waits_under_block_until_a_consumer_takes(kind: str) -> None:
    queue = make(kind, 1)
    assert queue.put_nowait(b"first")
    assert not queue.put_nowait(b"refused")
    done = trio.Event()

    async def producer() -> None:
        assert await queue.put(b"second")
        done.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            assert queue.statistics().waiting_producers == 1
            assert await queue.get() == b"first"
            await done.wait()
    assert queue.get_batch_nowait(10) == [b"second"]
    stats = queue.statistics()
    assert (stats.put, stats.got, stats.waiting_producers) == (2, 2, 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_put_under_drop_newest_returns_false_without_waiting(kind: str) -> None:
    queue = make(kind, 1, policy="drop_newest")
    with trio.fail_after(5):
        assert await queue.put(b"a")
        assert not await queue.put(b"b")
    assert queue.statistics().dropped["drop_newest"] == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_get_batch_waits_for_the_first_item(kind: str) -> None:
    queue = make(kind, 8)
    got: list[list[bytes]] = []

    async def consumer() -> None:
        got.append(await queue.get_batch(8))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            assert queue.statistics().waiting_consumers == 1
            assert queue.put_many_nowait([b"1", b"2", b"3"]) == 3
    assert got == [[b"1", b"2", b"3"]]


@pytest.mark.parametrize("kind", KINDS)
async def test_get_batch_refuses_a_zero_batch(kind: str) -> None:
    with pytest.raises(ValueError, match="max_items"):
        await make(kind, 1).get_batch(0)


@pytest.mark.parametrize("kind", KINDS)
async def test_wait_not_full(kind: str) -> None:
    queue = make(kind, 2)
    queue.put_many_nowait([b"a", b"b"])
    woke = trio.Event()

    async def waiter() -> None:
        await queue.wait_not_full()
        woke.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            queue.get_nowait()
            await woke.wait()
        await queue.wait_not_full()  # not full: returns at once


async def test_wait_not_full_counts_bytes() -> None:
    for kind in ("ring", "locked_ring", "locked_list"):
        queue = make(kind, 10, max_bytes=4)
        queue.put_nowait(b"abcd")
        with trio.move_on_after(0.05) as scope:
            await queue.wait_not_full()
        assert scope.cancelled_caught, kind


@pytest.mark.parametrize("kind", KINDS)
async def test_close_wakes_consumers_after_draining(kind: str) -> None:
    queue = make(kind, 4)
    results: list[object] = []

    async def consumer() -> None:
        try:
            while True:
                results.append(await queue.get())
        except trio.EndOfChannel:
            results.append("end")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            queue.put_many_nowait([b"x", b"y"])
            queue.close()
    assert sorted(map(str, results)) == sorted(map(str, [b"x", b"y", "end", "end"]))


@pytest.mark.parametrize("kind", KINDS)
async def test_close_wakes_producers_with_closed_resource_error(kind: str) -> None:
    queue = make(kind, 1)
    queue.put_nowait(b"full")
    errors: list[BaseException] = []

    async def producer() -> None:
        try:
            await queue.put(b"waiting")
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            queue.close()
    assert len(errors) == 2
    # What was queued before close is still delivered.
    assert queue.get_batch_nowait(5) == [b"full"]
    with pytest.raises(trio.EndOfChannel):
        await queue.get()
    with pytest.raises(trio.ClosedResourceError):
        await queue.put(b"late")


@pytest.mark.parametrize("kind", KINDS)
async def test_wait_not_full_returns_on_close(kind: str) -> None:
    queue = make(kind, 1)
    queue.put_nowait(b"full")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.wait_not_full)
            await trio.testing.wait_all_tasks_blocked()
            queue.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_cancelled_waiters_leave_the_queue_consistent(kind: str) -> None:
    queue = make(kind, 1)
    queue.put_nowait(b"a")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.put, b"b")
            nursery.start_soon(queue.wait_not_full)
            await trio.testing.wait_all_tasks_blocked()
            assert queue.statistics().waiting_producers == 2
            nursery.cancel_scope.cancel()
        stats = queue.statistics()
        assert (stats.waiting_producers, stats.depth, stats.put) == (0, 1, 1)
        assert queue.get_nowait() == b"a"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(queue.get_batch, 4)
            await trio.testing.wait_all_tasks_blocked()
            assert queue.statistics().waiting_consumers == 1
            nursery.cancel_scope.cancel()
        assert queue.statistics().waiting_consumers == 0
        # Nothing was lost or taken by the cancelled consumer.
        assert queue.put_nowait(b"c")
        assert await queue.get() == b"c"
        stats = queue.statistics()
        assert (stats.put, stats.got, stats.depth) == (2, 2, 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancelled_put_is_not_queued(kind: str) -> None:
    # Cancelled before it could run: the checkpoint comes first, so nothing is enqueued.
    queue = make(kind, 4)
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.put(b"never")
    assert len(queue) == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_awaiting_paths_do_checkpoint(kind: str) -> None:
    queue = make(kind, 4)
    with trio.testing.assert_checkpoints():
        await queue.put(b"a")
    with trio.testing.assert_checkpoints():
        await queue.get()


@pytest.mark.parametrize("kind", KINDS)
async def test_fifo_between_a_producer_and_a_consumer(kind: str) -> None:
    queue = make(kind, 3)
    received: list[bytes] = []
    expected = [b"%d" % i for i in range(200)]

    async def producer() -> None:
        for item in expected:
            await queue.put(item)
        queue.close()

    async def consumer() -> None:
        try:
            while True:
                received.extend(await queue.get_batch(2))
        except trio.EndOfChannel:
            pass

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            nursery.start_soon(producer)
    assert received == expected


def test_channel_queue_refuses_drop_oldest_and_max_bytes() -> None:
    with pytest.raises(ConfigurationError) as info:
        ChannelQueue(4, policy="drop_oldest")
    assert info.value.key == "policy"
    with pytest.raises(ConfigurationError) as info:
        ChannelQueue(4, max_bytes=1024)
    assert info.value.key == "max_bytes"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"capacity": 0}, "capacity"),
        ({"policy": "drop_all"}, "policy"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_bad_configuration_names_the_key(kind: str, options: dict[str, Any], key: str) -> None:
    options = {"capacity": 4, **options}
    with pytest.raises(ConfigurationError) as info:
        QUEUE_KINDS[kind](**options)
    assert info.value.key == key


@pytest.mark.parametrize("kind", KINDS)
async def test_synchronous_puts_never_fail_while_consumers_await(kind: str) -> None:
    # A producer on the hot path calls put_many_nowait between awaiting consumers' operations.
    # It must never see the queue "busy" (trio.WouldBlock) just because a consumer is
    # somewhere inside get(): under Trio nothing holds the queue across a schedule point.
    queue = make(kind, 1024)
    received: list[bytes] = []

    async def consumer() -> None:
        try:
            while True:
                received.append(await queue.get())
        except trio.EndOfChannel:
            pass

    sent = 0
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            nursery.start_soon(consumer)
            for _ in range(300):
                sent += queue.put_many_nowait([b"m"] * 3)
                await trio.lowlevel.checkpoint()
            queue.close()
    assert len(received) == sent == 900


@pytest.mark.parametrize("kind", ["ring", "locked_ring", "locked_list"])
async def test_wait_not_full_waits_for_room_for_the_refused_item(kind: str) -> None:
    # 8 of 10 bytes used: a 5-byte item does not fit although the queue is not "full".
    # wait_not_full must sleep until a consumer frees room for it, not return at once (which
    # turns the producer's retry loop, as in Ingress.offer, into a busy loop).
    queue = make(kind, 10, max_bytes=10)
    assert queue.put_many_nowait([b"a" * 4, b"b" * 4]) == 2
    item = b"c" * 5
    attempts = 0

    async def producer() -> None:
        nonlocal attempts
        while True:
            attempts += 1
            if queue.put_many_nowait([item]):
                return
            await queue.wait_not_full()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert attempts == 1
            assert queue.get_nowait() == b"a" * 4  # 4 bytes left: room for it
    assert attempts == 2
    assert queue.get_batch_nowait(5) == [b"b" * 4, item]


@pytest.mark.parametrize("kind", ["ring", "locked_ring", "locked_list"])
async def test_an_item_that_can_never_fit_does_not_stall_other_producers(kind: str) -> None:
    queue = make(kind, 10, max_bytes=10)
    assert not queue.put_nowait(b"x" * 11)  # larger than max_bytes: refused under block
    with trio.fail_after(5):
        await queue.wait_not_full()  # the queue is empty: there is room for others
        assert await queue.put(b"small")
