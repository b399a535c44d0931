"""Routing from one pipeline to another: a rule on a field sends a message on to the other
pipeline's queue, both ledgers balance (routed out of one, received into the other), a loop
is refused, and at shutdown the target drains only after its senders have drained into it."""

from __future__ import annotations

import json

import pytest
import trio
from helpers import wait_until

from trio_gateway import (
    Batch,
    ConfigurationError,
    FromPipeline,
    Message,
    Origin,
    Pipeline,
    Pipelines,
    QueuedSink,
    SinkUnavailable,
    ToPipeline,
)
from trio_gateway.testing import MemorySource, RecordingSink


def classify(message: Message) -> object:
    record = json.loads(message.payload)
    return {**record, "route": "alerts" if record["level"] == "error" else "audit"}


async def test_a_route_sends_messages_on_to_another_pipeline() -> None:
    everything, paged = RecordingSink("everything"), RecordingSink("pager")
    source = MemorySource(peer="10.0.0.7:5")
    pipelines = Pipelines(
        [
            Pipeline(
                "logs",
                sources=[source],
                processors=[classify],
                route="route",
                sinks=[everything, QueuedSink(ToPipeline("alerts"), routes=["alerts"])],
            ),
            Pipeline("alerts", sources=[FromPipeline("logs")], sinks=[paged]),
        ]
    )
    levels = ["info", "error", "info", "error", "error"]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(pipelines.run)
            await source.send_many([b'{"level":"%s"}' % x.encode() for x in levels])
            await wait_until(lambda: everything.count == 5 and paged.count == 3)
            pipelines.shutdown()
    assert bound == {"logs": ([],), "alerts": ([],)}  # in the order given
    assert paged.payloads == [b'{"level":"error","route":"alerts"}'] * 3
    assert {o.peer for o in paged.origins} == {"10.0.0.7:5"}  # the origin travels with it
    logs, alerts = pipelines["logs"], pipelines["alerts"]
    assert logs.sink_ledgers["pipeline:alerts"].delivered == 3  # routed out of logs
    assert alerts.ledger.received == 3 and alerts.ledger.delivered == 3  # received into alerts
    assert logs.report()["routed_out"] == {"alerts": 3}
    assert alerts.report()["routed_in"] == {"logs": 3}
    assert logs.ledger.balanced and alerts.ledger.balanced and pipelines.ledger.balanced


async def test_the_target_drains_after_its_senders_at_shutdown() -> None:
    """Shut down with everything still queued in the sender: nothing is abandoned, because
    the target keeps running until the sender has drained into it, then drains itself."""
    source = MemorySource()
    sink = RecordingSink()
    pipelines = Pipelines(
        [
            # Listed target first and sender second, or the other way: the order is the graph's.
            Pipeline("in", sources=[source], sinks=[ToPipeline("out")], batch_size=100),
            Pipeline("out", sources=[FromPipeline("in")], sinks=[sink], batch_size=100),
        ]
    )
    payloads = [b"m%d" % i for i in range(5000)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pipelines.run)
            await source.send_many(payloads)
            pipelines.shutdown()
    assert sink.payloads == payloads
    for pipeline in pipelines:
        assert pipeline.ledger.balanced and pipeline.ledger.abandoned == 0
        assert pipeline.ledger.delivered == 5000


@pytest.mark.parametrize(
    ("build", "key", "match"),
    [
        (
            lambda: [
                Pipeline("a", sources=[FromPipeline("b")], sinks=[ToPipeline("b")]),
                Pipeline("b", sources=[FromPipeline("a")], sinks=[ToPipeline("a")]),
            ],
            "pipelines.a.sinks",
            "routes in a loop: a -> b -> a",
        ),
        (
            lambda: [Pipeline("a", sources=[MemorySource()], sinks=[ToPipeline("nowhere")])],
            "pipelines.a.sinks",
            "there is no pipeline nowhere",
        ),
        (
            lambda: [
                Pipeline("a", sources=[MemorySource()], sinks=[ToPipeline("b")]),
                Pipeline("b", sources=[MemorySource("b")], sinks=[RecordingSink()]),
            ],
            "pipelines.b.sources",
            "add FromPipeline",
        ),
    ],
)
def test_a_bad_route_graph_is_refused(build: object, key: str, match: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigurationError, match=match) as caught:
        Pipelines(build())
    assert caught.value.key == key


async def test_a_route_to_a_pipeline_that_does_not_run_is_unavailable() -> None:
    sink = ToPipeline("out")
    with pytest.raises(SinkUnavailable, match="not connected"):
        await sink.open()  # a Pipeline run alone, outside Pipelines
    sink.connect(FromPipeline("in"))
    await sink.open()
    with pytest.raises(SinkUnavailable, match="pipeline out is not running"):
        await sink.send(Batch.of([(b"x", Origin("tcp", "tcp:x", "peer", 0.0))]))
