"""The gateway core (processor, queue policies, sink retries, shutdown ledger), tested with the
test kit in virtual time: every timeout, backoff and drain deadline here costs no real time."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from trio.testing import MockClock

from trio_gateway import (
    ChannelQueue,
    Gateway,
    LockedListQueue,
    LockedRingBuffer,
    Message,
    Origin,
    Queue,
    RetryPolicy,
    RingBuffer,
    SinkError,
)
from trio_gateway.queues import POLICIES
from trio_gateway.testing import (
    GatewayFactory,
    MemorySource,
    RecordingSink,
    open_gateway,
)


def upper(message: Message) -> bytes:
    return message.payload.upper()


# -- the processor ------------------------------------------------------------------------


async def test_processor_transforms_every_message(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(processor=upper)
    await memory_source.send_many([b"a", b"b"])
    await memory_source.send(b"c")
    await recording_sink.wait_for(3)
    assert recording_sink.payloads == [b"A", b"B", b"C"]
    ledger = await handle.shutdown()
    assert (ledger.received, ledger.delivered) == (3, 3)
    assert ledger.balanced


async def test_processor_returning_none_filters_and_counts(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(
        processor=lambda m: None if m.payload.startswith(b"debug") else m.payload
    )
    await memory_source.send_many([b"debug 1", b"info 1", b"debug 2", b"info 2"])
    ledger = await handle.shutdown()
    assert recording_sink.payloads == [b"info 1", b"info 2"]
    assert handle.statistics().filtered == 2
    assert ledger.dropped["filtered"] == 2
    assert ledger.delivered == 2
    assert ledger.balanced


async def test_processor_errors_are_counted_by_type_and_the_rest_flows_on(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    def picky(message: Message) -> bytes | int:
        if message.payload == b"value":
            raise ValueError("bad value")
        if message.payload == b"key":
            raise KeyError("missing")
        if message.payload == b"int":
            return 42  # not bytes: counted as a TypeError
        return message.payload

    handle = await gateway_factory(processor=picky)
    await memory_source.send_many([b"ok1", b"value", b"key", b"ok2", b"value", b"int", b"ok3"])
    ledger = await handle.shutdown()
    assert recording_sink.payloads == [b"ok1", b"ok2", b"ok3"]
    assert handle.statistics().failed == {"ValueError": 2, "KeyError": 1, "TypeError": 1}
    assert ledger.dropped["processor_error"] == 4
    assert ledger.balanced


async def test_async_processor_runs_in_virtual_time(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    async def slow_upper(message: Message) -> bytes:
        await trio.sleep(10)
        return message.payload.upper()

    handle = await gateway_factory(processor=slow_upper)
    start = trio.current_time()
    await memory_source.send_many([b"x", b"y"])
    await recording_sink.wait_for(2)
    assert recording_sink.payloads == [b"X", b"Y"]
    assert trio.current_time() - start == pytest.approx(20)
    assert (await handle.shutdown()).balanced


async def test_processor_can_return_a_message_with_a_new_origin(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    def tag(message: Message) -> Message:
        origin = Origin("tagged", message.origin.listener, "rewritten", 0.0)
        return Message(message.payload + b"!", origin)

    handle = await gateway_factory(processor=tag)
    await memory_source.send(b"hi", peer="10.0.0.1:5")
    await recording_sink.wait_for(1)
    (delivered,) = recording_sink.items
    assert delivered.payload == b"hi!"
    assert (delivered.origin.transport, delivered.origin.peer) == ("tagged", "rewritten")
    assert (await handle.shutdown()).balanced


async def test_origin_describes_the_memory_source(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory()
    await memory_source.send(b"a")
    await memory_source.send(b"b", peer="sensor-7")
    await recording_sink.wait_for(2)
    first, second = recording_sink.origins
    assert (first.transport, first.listener, first.peer) == ("memory", "memory:memory", "test")
    assert second.peer == "sensor-7"
    await handle.shutdown()


# -- queue policies under a stalled sink --------------------------------------------------


async def _stall_with_one_in_flight(source: MemorySource, sink: RecordingSink) -> None:
    """Stall the sink while it holds message b"first": the queue behind it is empty."""
    sink.stall()
    await source.send(b"first")
    await sink.wait_stalled()


async def test_drop_newest_drops_what_does_not_fit(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(queue=RingBuffer(4, policy="drop_newest"))
    await _stall_with_one_in_flight(memory_source, recording_sink)
    queued = await memory_source.send_many([b"%d" % i for i in range(10)])
    assert queued == 4
    assert not await memory_source.send(b"late")
    assert handle.statistics().queue.dropped["drop_newest"] == 7
    recording_sink.recover()
    await recording_sink.wait_for(5)
    assert recording_sink.payloads == [b"first", b"0", b"1", b"2", b"3"]
    ledger = await handle.shutdown()
    assert ledger.dropped["drop_newest"] == 7
    assert (ledger.received, ledger.delivered) == (12, 5)
    assert ledger.balanced


@pytest.mark.parametrize("queue_class", [RingBuffer, LockedRingBuffer, LockedListQueue])
async def test_drop_oldest_keeps_the_newest(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
    queue_class: Callable[..., Queue[bytes]],
) -> None:
    handle = await gateway_factory(queue=queue_class(4, policy="drop_oldest"))
    await _stall_with_one_in_flight(memory_source, recording_sink)
    for i in range(10):  # one message at a time, as ten reads would
        assert await memory_source.send(b"%d" % i)
    recording_sink.recover()
    await recording_sink.wait_for(5)
    assert recording_sink.payloads == [b"first", b"6", b"7", b"8", b"9"]
    ledger = await handle.shutdown()
    assert ledger.dropped["drop_oldest"] == 6
    assert ledger.balanced


async def test_block_makes_send_wait_until_the_sink_makes_room(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(queue=RingBuffer(4, policy="block"))
    await _stall_with_one_in_flight(memory_source, recording_sink)
    assert await memory_source.send_many([b"1", b"2", b"3", b"4"]) == 4  # the queue is full
    results: list[int] = []

    async def producer() -> None:
        results.append(await memory_source.send_many([b"5", b"6"]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.sleep(60)  # a long (virtual) minute: nothing moves while the sink stalls
        assert results == []
        assert memory_source.sending == 1
        assert handle.statistics().queue.waiting_producers == 1
        recording_sink.recover()
    assert results == [2]
    await recording_sink.wait_for(7)
    assert recording_sink.payloads == [b"first", b"1", b"2", b"3", b"4", b"5", b"6"]
    ledger = await handle.shutdown()
    assert ledger.dropped == dict.fromkeys(ledger.dropped, 0)
    assert (ledger.received, ledger.delivered) == (7, 7)


async def test_send_nowait_under_block_refuses_and_counts_queue_full(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(queue=RingBuffer(3, policy="block"))
    await _stall_with_one_in_flight(memory_source, recording_sink)
    assert memory_source.send_many_nowait([b"1", b"2", b"3", b"4", b"5"]) == 3
    assert not memory_source.send_nowait(b"6")
    assert memory_source.counters.rejected["queue_full"] == 3
    recording_sink.recover()
    ledger = await handle.shutdown()
    assert (ledger.received, ledger.delivered) == (4, 4)
    assert ledger.rejected == {"queue_full": 3}
    assert ledger.balanced


async def test_send_or_reject_waits_at_most_its_timeout(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(queue=RingBuffer(2, policy="block"))
    await _stall_with_one_in_flight(memory_source, recording_sink)
    start = trio.current_time()
    assert await memory_source.send_or_reject([b"1", b"2", b"3"], timeout=5.0) == 2
    assert trio.current_time() - start == pytest.approx(5.0)
    assert memory_source.counters.rejected["queue_full"] == 1
    # With room made within the timeout, everything is accepted.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_recover_after, recording_sink, 2.0)
        assert await memory_source.send_or_reject([b"4", b"5"], timeout=5.0) == 2
    ledger = await handle.shutdown()
    assert recording_sink.payloads == [b"first", b"1", b"2", b"4", b"5"]
    assert ledger.rejected == {"queue_full": 1}
    assert ledger.balanced


async def _recover_after(sink: RecordingSink, seconds: float) -> None:
    await trio.sleep(seconds)
    sink.recover()


# -- sink failures and retries ------------------------------------------------------------


async def test_sink_failing_then_recovering_is_retried_with_backoff(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    retry = RetryPolicy(initial=1.0, maximum=30.0, multiplier=2.0)
    handle = await gateway_factory(retry=retry)
    recording_sink.fail(times=3)
    start = trio.current_time()
    await memory_source.send_many([b"a", b"b"])
    await recording_sink.wait_for(2)
    # Full jitter: attempt n waits between half and all of 1, 2, 4 seconds.
    assert 0.5 + 1 + 2 <= trio.current_time() - start <= 1 + 2 + 4
    assert recording_sink.payloads == [b"a", b"b"]  # recorded once, when it succeeded
    assert (recording_sink.attempts, recording_sink.failures) == (4, 3)
    stats = handle.statistics()
    assert (stats.sink_errors, stats.sink_retries, stats.sink_batches) == (3, 3, 1)
    ledger = await handle.shutdown()
    assert (ledger.delivered, ledger.dropped["sink_failed"]) == (2, 0)
    assert ledger.balanced


async def test_backoff_is_capped_at_the_maximum(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(retry=RetryPolicy(initial=1.0, maximum=4.0))
    recording_sink.fail(times=10)
    start = trio.current_time()
    await memory_source.send(b"a")
    await recording_sink.wait_for(1)
    # 1, 2, 4, then 4 seven times: at most 1 + 2 + 4 + 7 * 4 = 35 s, at least half of it.
    assert 17.5 <= trio.current_time() - start <= 35
    assert handle.statistics().sink_retries == 10
    await handle.shutdown()


async def test_retry_budget_exhausted_counts_sink_failed(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(retry=RetryPolicy(initial=0.5, max_attempts=3))
    recording_sink.fail_forever(error=lambda: OSError("connection refused"))
    await memory_source.send_many([b"1", b"2", b"3"])
    await recording_sink.wait_attempts(3)
    recording_sink.recover()
    await memory_source.send(b"4")
    await recording_sink.wait_for(1)
    assert recording_sink.payloads == [b"4"]
    ledger = await handle.shutdown()
    assert ledger.dropped["sink_failed"] == 3
    assert ledger.delivered == 1
    assert handle.statistics().sink_retries == 2  # three attempts = two retries
    assert ledger.balanced


# -- shutdown -----------------------------------------------------------------------------


async def test_shutdown_flushes_everything_queued(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    recording_sink.latency = 1.0
    handle = await gateway_factory(queue=RingBuffer(100), batch_size=10)
    assert await memory_source.send_many([b"%d" % i for i in range(50)]) == 50
    ledger = await handle.shutdown()
    assert recording_sink.count == 50
    assert recording_sink.batch_sizes == [10] * 5
    assert recording_sink.closed
    assert (ledger.received, ledger.delivered, ledger.abandoned) == (50, 50, 0)
    assert handle.statistics().state == "stopped"


async def test_drain_deadline_abandons_the_rest_and_returns_in_time(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(queue=RingBuffer(10), drain_timeout=5.0, grace_period=1.0)
    await _stall_with_one_in_flight(memory_source, recording_sink)
    await memory_source.send_many([b"%d" % i for i in range(6)])
    start = trio.current_time()
    ledger = await handle.shutdown()
    # No send is in flight, so the grace period is not used; the drain takes its deadline.
    assert trio.current_time() - start == pytest.approx(5.0)
    assert (ledger.received, ledger.delivered, ledger.abandoned) == (7, 0, 7)
    assert ledger.balanced
    assert recording_sink.closed


async def test_read_messages_wait_for_room_until_the_drain_deadline_not_the_grace_period(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    """Messages a connection has read are abandoned only at the drain deadline (issue 16: a
    TCP stream's last read was abandoned when its grace period ended, the drain 8 s short)."""
    recording_sink.latency = 0.5  # 5 batches of 2: 2.5 s, past the 1 s grace period
    handle = await gateway_factory(
        queue=RingBuffer(2), batch_size=2, grace_period=1.0, drain_timeout=5.0
    )
    results: list[int] = []

    async def connection() -> None:
        results.append(await memory_source.send_many([b"%d" % i for i in range(10)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        ledger = await handle.shutdown()
    assert trio.current_time() - start == pytest.approx(2.5)  # five sends of 0.5 s
    assert (ledger.received, ledger.delivered, ledger.abandoned) == (10, 10, 0)
    assert recording_sink.payloads == [b"%d" % i for i in range(10)]
    assert results == [10]


async def test_a_slow_sync_processor_cannot_hold_the_drain_past_its_deadline(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A synchronous processor runs a whole batch without an await; the pump yields between
    messages once it has run for a while (here at once), so the deadline lands mid-batch and
    the ledger still balances (filtered, abandoned)."""
    monkeypatch.setattr("trio_gateway._pump._PROCESS_SLICE", 0.0)

    def slow(message: Message) -> bytes | None:
        autojump_clock.jump(0.01)  # 10 ms of (virtual) work per message
        return None if message.payload.endswith(b"5") else message.payload

    handle = await gateway_factory(
        queue=RingBuffer(2000), processor=slow, grace_period=0.0, drain_timeout=1.0
    )
    assert await memory_source.send_many([b"%d" % i for i in range(1000)]) == 1000
    start = trio.current_time()
    ledger = await handle.shutdown()
    assert trio.current_time() - start <= 1.0 + 0.02  # not 1000 x 10 ms
    assert ledger.delivered == 0 and 0 < ledger.dropped["filtered"] < 100
    assert ledger.abandoned == 1000 - ledger.dropped["filtered"]
    assert ledger.balanced


async def test_shutdown_with_a_retrying_sink_abandons_at_the_deadline(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(drain_timeout=3.0, retry=RetryPolicy(initial=1.0))
    recording_sink.fail_forever()
    await memory_source.send_many([b"a", b"b"])
    await recording_sink.wait_attempts(1)
    start = trio.current_time()
    ledger = await handle.shutdown()
    assert trio.current_time() - start == pytest.approx(3.0)
    assert (ledger.delivered, ledger.abandoned, ledger.dropped["sink_failed"]) == (0, 2, 0)
    assert ledger.balanced


async def test_cancelling_the_gateways_scope_still_flushes(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    recording_sink.latency = 1.0
    handle = await gateway_factory(batch_size=2)
    await memory_source.send_many([b"%d" % i for i in range(10)])
    handle.cancel()
    ledger = await handle.wait_stopped()
    assert recording_sink.count == 10
    assert (ledger.delivered, ledger.abandoned) == (10, 0)
    assert ledger.balanced


async def test_cancelling_a_plain_nursery_still_flushes(autojump_clock: MockClock) -> None:
    """Without the kit's handle: a parent scope's cancellation, as in a user's program."""
    source, sink = MemorySource(), RecordingSink(latency=1.0)
    gateway = Gateway(sources=[source], sink=sink, batch_size=3)
    with trio.move_on_after(0.5):
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.run)
            await source.send_many([b"%d" % i for i in range(9)])
            await trio.sleep_forever()
    assert sink.count == 9
    assert gateway.ledger.balanced
    assert gateway.state == "stopped"


async def test_cancel_with_a_stalled_sink_is_bounded_by_the_drain_timeout(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(drain_timeout=2.0)
    await _stall_with_one_in_flight(memory_source, recording_sink)
    await memory_source.send(b"second")
    start = trio.current_time()
    handle.cancel()
    ledger = await handle.wait_stopped()
    assert trio.current_time() - start == pytest.approx(2.0)
    assert (ledger.abandoned, ledger.delivered) == (2, 0)


async def test_abort_stops_at_once(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory(drain_timeout=60.0, grace_period=30.0)
    await _stall_with_one_in_flight(memory_source, recording_sink)
    await memory_source.send_many([b"a", b"b", b"c"])
    start = trio.current_time()
    handle.abort()
    ledger = await handle.wait_stopped()
    assert trio.current_time() == start  # not one virtual second passed
    assert (ledger.received, ledger.delivered, ledger.abandoned) == (4, 0, 4)
    assert recording_sink.closed


async def test_a_second_shutdown_request_after_shutdown_is_harmless(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    handle = await gateway_factory()
    await memory_source.send(b"x")
    handle.gateway.shutdown()
    handle.gateway.shutdown()
    ledger = await handle.shutdown()
    assert ledger.delivered == 1
    with pytest.raises(RuntimeError, match="runs once"):
        await handle.gateway.run()


async def test_run_returns_the_final_ledger(autojump_clock: MockClock) -> None:
    source, sink = MemorySource(), RecordingSink()
    gateway = Gateway(sources=[source], sink=sink)
    async with trio.open_nursery() as nursery:
        results = []

        async def run(task_status: trio.TaskStatus[object]) -> None:
            results.append(await gateway.run(task_status=task_status))

        await nursery.start(run)
        await source.send_many([b"1", b"2"])
        gateway.shutdown()
    assert results == [gateway.ledger]
    assert results[0].delivered == 2


_SCENARIOS = ["healthy", "stalled", "failing", "budget"]


_QUEUE_POLICIES = [
    pytest.param(queue_class, policy, id=f"{queue_class.__name__}-{policy}")
    for queue_class in (RingBuffer, LockedRingBuffer, ChannelQueue, LockedListQueue)
    for policy in POLICIES
    if policy in queue_class.supported_policies
]


@pytest.mark.parametrize("scenario", _SCENARIOS)
@pytest.mark.parametrize(("queue_class", "policy"), _QUEUE_POLICIES)
async def test_shutdown_ledger_balances(
    autojump_clock: MockClock,
    queue_class: Callable[..., Queue[bytes]],
    policy: str,
    scenario: str,
) -> None:
    """received == delivered + dropped + abandoned, whatever happened on the way."""
    source, sink = MemorySource(), RecordingSink()
    if scenario == "stalled":
        sink.stall()
    elif scenario == "failing":
        sink.fail(times=2)
    elif scenario == "budget":
        sink.fail_forever()
    gateway = Gateway(
        sources=[source],
        sink=sink,
        queue=queue_class(8, policy=policy),
        processor=lambda m: None if m.payload.endswith(b"3") else m.payload,
        batch_size=4,
        drain_timeout=4.0,
        retry=RetryPolicy(initial=0.5, max_attempts=3),
    )
    with trio.fail_after(120):
        async with open_gateway(gateway) as handle:
            for burst in range(5):
                if policy == "block":
                    with trio.move_on_after(1.0):  # a blocked sender gives up: abandoned
                        await source.send_many([b"%d-%d" % (burst, i) for i in range(6)])
                else:
                    await source.send_many([b"%d-%d" % (burst, i) for i in range(6)])
                source.send_many_nowait([b"nowait-%d" % burst])
                await source.send_or_reject([b"reject-%d" % burst])
                await trio.sleep(0.3)
    ledger = handle.ledger
    assert ledger.balanced, ledger.as_dict()
    assert ledger.delivered == sink.count
    assert ledger.received + ledger.rejected.get("queue_full", 0) == 5 * 8
    if scenario == "healthy":
        assert ledger.abandoned == 0


async def test_sink_error_type_is_the_projects(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    """The recording sink fails with SinkError by default, the error a real sink raises."""
    errors: list[BaseException] = []

    def spy() -> BaseException:
        error = SinkError("boom")
        errors.append(error)
        return error

    handle = await gateway_factory(retry=RetryPolicy(initial=0.1))
    recording_sink.fail(times=1, error=spy)
    await memory_source.send(b"x")
    await recording_sink.wait_for(1)
    assert len(errors) == 1
    assert (await handle.shutdown()).delivered == 1


async def test_idle_gateway_with_real_clock_free_virtual_hours(
    autojump_clock: MockClock,
    gateway_factory: GatewayFactory,
    memory_source: MemorySource,
    recording_sink: RecordingSink,
) -> None:
    """Hours of idleness cost nothing under the autojump clock; the gateway is still there."""
    handle = await gateway_factory()
    await trio.sleep(3 * 3600)
    assert handle.statistics().accepting
    await memory_source.send(b"still here")
    await recording_sink.wait_for(1)
    await handle.shutdown()
