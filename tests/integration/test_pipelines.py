"""Fan-out and named pipelines: every message to every sink, each sink behind its own queue
(a stalled one loses only its own messages, counted), processor chains handing on parsed
records, several pipelines in one nursery with one admin endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio
from helpers import read_payloads, wait_until

from trio_gateway import (
    Batch,
    FanOutSink,
    Gateway,
    Message,
    Pipeline,
    Pipelines,
    QueuedSink,
    RetryPolicy,
    SinkRefused,
    TcpSource,
)
from trio_gateway.admin import AdminServer
from trio_gateway.testing import MemorySource, RecordingSink


async def send_lines(address: tuple[str, int], lines: list[bytes]) -> None:
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(b"".join(line + b"\n" for line in lines))


async def test_every_message_reaches_every_sink_in_order() -> None:
    first, second = RecordingSink("first"), RecordingSink("second")
    pipeline = Pipeline("both", sources=[TcpSource(port=0)], sinks=[first, second], batch_size=64)
    lines = [b"m%d" % i for i in range(1000)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(pipeline.gateway.run)
            await send_lines(address, lines)
            await wait_until(lambda: first.count == second.count == len(lines))
            pipeline.gateway.shutdown()
    assert first.payloads == second.payloads == lines
    ledgers = pipeline.sink_ledgers
    assert set(ledgers) == {"first", "second"}
    for ledger in ledgers.values():
        assert ledger.balanced and (ledger.accepted, ledger.delivered) == (1000, 1000)
    assert pipeline.ledger.balanced and pipeline.ledger.delivered == 1000
    assert first.closed and second.closed


async def test_a_stalled_sink_drops_its_own_messages_and_never_stalls_the_other() -> None:
    fast, stalled = RecordingSink("fast"), RecordingSink("stalled")
    stalled.stall()
    source = MemorySource()
    pipeline = Pipeline(
        "p",
        sources=[source],
        sinks=[
            QueuedSink(fast, capacity=100),
            QueuedSink(stalled, capacity=100, policy="drop_oldest"),
        ],
        batch_size=10,
        drain_timeout=0.5,
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.gateway.run)
            for i in range(200):
                await source.send_many([b"%d.%d" % (i, k) for k in range(10)])
            await wait_until(lambda: fast.count == 2000)
            pipeline.gateway.shutdown()
    assert fast.payloads[-1] == b"199.9"
    stalled_ledger = pipeline.sink_ledgers["stalled"]
    assert stalled_ledger.accepted == 2000 and stalled_ledger.dropped >= 1800
    assert stalled_ledger.balanced and stalled_ledger.queued > 0  # abandoned at the deadline
    assert pipeline.sink_ledgers["fast"].as_dict() == {
        "accepted": 2000, "delivered": 2000, "dropped": 0, "failed": 0, "queued": 0,
    }  # fmt: skip
    assert pipeline.ledger.balanced


async def test_a_fanout_outside_a_pipeline_needs_its_service_slot() -> None:
    sink = RecordingSink()
    fanout = FanOutSink([sink, RecordingSink("other")])
    source = MemorySource()
    gateway = Gateway(sources=[source], sink=fanout, services=[fanout])
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        await source.send(b"x")
        await wait_until(lambda: sink.count == 1)
        gateway.shutdown()
    assert gateway.ledger.delivered == 1


async def test_a_processor_chain_hands_on_parsed_records() -> None:
    def parse(message: Message) -> object:
        return json.loads(message.payload)

    def only_errors(message: Message) -> object:
        record = message.payload
        assert isinstance(record, dict)
        return record if record["level"] == "error" else None

    async def enrich(message: Message) -> object:
        record = message.payload
        assert isinstance(record, dict)
        return {**record, "peer": message.origin.peer}

    sink = RecordingSink()
    source = MemorySource(peer="10.0.0.1:9")
    pipeline = Pipeline("logs", sources=[source], sinks=[sink],
                        processors=[parse, only_errors, enrich])  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.gateway.run)
        await source.send_many([b'{"level":"info"}', b'{"level":"error","m":1}'])
        await wait_until(lambda: sink.count == 1)
        pipeline.gateway.shutdown()
    assert sink.payloads == [b'{"level":"error","m":1,"peer":"10.0.0.1:9"}']
    assert pipeline.ledger.dropped["filtered"] == 1


async def test_named_pipelines_in_one_nursery_with_labelled_metrics() -> None:
    a, b1, b2 = RecordingSink("a"), RecordingSink("b1"), RecordingSink("b2")
    pipelines = Pipelines(
        [
            Pipeline("alpha", sources=[TcpSource(port=0)], sinks=[a]),
            Pipeline("beta", sources=[TcpSource(port=0)], sinks=[b1, b2]),
        ],
        admin=AdminServer(port=0, process_metrics=False),
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(pipelines.run)
            await send_lines(bound["alpha"][0][0], [b"to alpha"] * 3)
            await send_lines(bound["beta"][0][0], [b"to beta"] * 5)
            await wait_until(lambda: a.count == 3 and b1.count == b2.count == 5)
            host, port = pipelines.admin_address
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"http://{host}:{port}/metrics")).text
                ready = await client.get(f"http://{host}:{port}/readyz")
            assert ready.status_code == 200
            pipelines.shutdown()
    assert 'trio_gateway_delivered_messages_total{pipeline="alpha"} 3.0' in metrics
    assert 'trio_gateway_delivered_messages_total{pipeline="beta"} 5.0' in metrics
    assert 'trio_gateway_fanout_delivered_messages_total{pipeline="beta",sink="b2"} 5.0' in metrics
    assert pipelines["alpha"].ledger.delivered == 3 and pipelines.ledger.received == 8
    assert pipelines.ledger.balanced


async def test_routing_by_a_field_a_processor_sets() -> None:
    def classify(message: Message) -> object:
        record = json.loads(message.payload)
        return {**record, "route": "alerts" if record["level"] == "error" else "audit"}

    everything, alerts = RecordingSink("everything"), RecordingSink("alerts")
    source = MemorySource()
    pipeline = Pipeline(
        "routed",
        sources=[source],
        sinks=[everything, QueuedSink(alerts, routes=["alerts"])],
        processors=[classify],
        route="route",
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.gateway.run)
        await source.send_many([b'{"level":"info"}', b'{"level":"error"}', b'{"level":"x"}'])
        await wait_until(lambda: everything.count == 3 and alerts.count == 1)
        pipeline.gateway.shutdown()
    assert alerts.payloads == [b'{"level":"error","route":"alerts"}']
    assert pipeline.sink_ledgers["alerts"].accepted == 1
    assert pipeline.fanout is not None and pipeline.fanout.unrouted == 0


class Picky(RecordingSink):
    """Refuses for good every message that contains ``poison`` (as an HTTP sink does a 400),
    delivering the rest of the batch."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sends = 0

    async def send(self, batch: Batch) -> None:
        self.sends += 1
        refused = [i for i, payload in enumerate(batch.payloads) if b"poison" in payload]
        kept = [m for i, m in enumerate(batch) if i not in refused]
        if kept:
            await super().send(Batch.of(kept))
        if refused:
            raise SinkRefused("poison", indices=refused, reason="http_400")


async def test_a_fanout_branch_sets_refused_messages_aside_instead_of_retrying(
    tmp_path: Path,
) -> None:
    """A permanent refusal is not retried forever in a fan-out branch: with a dead letter the
    refused messages are written there, without one they are dropped, counted per sink."""
    dead = tmp_path / "dead.jsonl"
    kept, dropped = Picky("kept"), Picky("dropped")
    source = MemorySource()
    pipeline = Pipeline(
        "p",
        sources=[source],
        sinks=[QueuedSink(kept, dead_letter=str(dead)), dropped],
        batch_size=8,
    )
    payloads = [b"ok%d" % i for i in range(10)]
    payloads[3] = payloads[7] = b"poison"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.gateway.run)
            await source.send_many(payloads)
            await wait_until(lambda: kept.count == dropped.count == 8)
            await wait_until(lambda: pipeline.sink_ledgers["dropped"].refused == 2)
            pipeline.gateway.shutdown()
    good = [p for p in payloads if p != b"poison"]
    assert kept.payloads == dropped.payloads == good
    assert kept.sends == dropped.sends <= 2  # each batch sent once: no retry of the refusal
    assert read_payloads(dead) == [b"poison", b"poison"]
    assert pipeline.sink_ledgers["kept"].as_dict() == {
        "accepted": 10, "delivered": 8, "dropped": 0, "failed": 0, "dead_letter": 2, "queued": 0,
    }  # fmt: skip
    assert pipeline.sink_ledgers["dropped"].as_dict() == {
        "accepted": 10, "delivered": 8, "dropped": 0, "failed": 0, "refused": 2, "queued": 0,
    }  # fmt: skip
    assert all(ledger.balanced for ledger in pipeline.sink_ledgers.values())
    assert pipeline.ledger.balanced


async def test_a_fanout_branch_out_of_retries_goes_to_its_dead_letter(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    failing = RecordingSink("failing")
    failing.fail_forever()
    source = MemorySource()
    pipeline = Pipeline(
        "p",
        sources=[source],
        sinks=[
            QueuedSink(failing, dead_letter=str(dead), retry=RetryPolicy(0.01, max_attempts=2)),
            RecordingSink("fine"),
        ],
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.gateway.run)
            await source.send_many([b"a", b"b"])
            await wait_until(lambda: pipeline.sink_ledgers["failing"].dead_lettered == 2)
            pipeline.gateway.shutdown()
    assert read_payloads(dead) == [b"a", b"b"]
    assert pipeline.sink_ledgers["failing"].failed == 0
    assert pipeline.sink_ledgers["failing"].balanced
