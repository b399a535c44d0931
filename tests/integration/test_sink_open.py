"""Sinks checked before the gateway is ready: ``Sink.open`` and ``SinkUnavailable`` (real
destinations on loopback, real pipes)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from test_sink_tcp import _Destination

from trio_gateway import (
    Batch,
    FileSink,
    Gateway,
    HttpSink,
    RetryPolicy,
    Sink,
    SinkUnavailable,
    StdoutSink,
    TcpSink,
    TcpSource,
)

# -- checked before ready: Sink.open and SinkUnavailable (issue 19) ----------------------------


def _refused_port() -> int:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        return int(listener.getsockname()[1])  # closed on return: refused from now on


@pytest.mark.parametrize(
    ("make", "cause"),
    [
        (lambda tmp: FileSink(tmp / "missing" / "dir" / "out.jsonl"), "does not exist"),
        (lambda tmp: FileSink(tmp), "is a directory"),
        (lambda tmp: TcpSink("127.0.0.1", _refused_port()), "connection refused"),
        (lambda tmp: HttpSink(f"http://127.0.0.1:{_refused_port()}/in"), "connection refused"),
    ],
)
async def test_run_fails_fast_naming_a_sink_that_cannot_work(
    tmp_path: Path, make: Callable[[Path], Sink], cause: str
) -> None:
    sink = make(tmp_path)
    source = TcpSource(port=0)
    gateway = Gateway(sources=[source], sink=sink)
    with trio.fail_after(10), pytest.raises(SinkUnavailable) as caught:
        await gateway.run()
    assert caught.value.sink == sink.name
    assert cause in caught.value.cause
    assert str(caught.value) == f"sink {sink.name}: {caught.value.cause}"
    assert not source.bound  # nothing was bound: the check came first
    assert gateway.state == "stopped"


@pytest.mark.slow
async def test_sink_wait_keeps_the_gateway_not_ready_until_the_destination_comes() -> None:
    destination = _Destination()
    destination.port = _refused_port()
    sink = TcpSink("127.0.0.1", destination.port)
    source = TcpSource(port=0)
    gateway = Gateway(
        sources=[source], sink=sink, sink_wait=30, retry=RetryPolicy(initial=0.02, maximum=0.05)
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gateway.run)
            while gateway.sink_problem is None:
                await trio.sleep(0.01)
            assert not gateway.accepting and not source.bound
            assert gateway.readiness == (
                f"waiting for the sink: sink tcp:127.0.0.1:{destination.port}: connection refused"
            )
            await nursery.start(destination.serve)
            while not gateway.accepting:
                await trio.sleep(0.01)
            assert gateway.readiness == "ready" and gateway.sink_problem is None
            assert gateway.pump_counters.sink_errors >= 1  # the refused opens, on /metrics
            gateway.shutdown()
            nursery.cancel_scope.deadline = trio.current_time() + 5
    assert destination.connections == 1


async def test_sink_wait_gives_up_with_the_cause_and_how_long_it_waited() -> None:
    port = _refused_port()
    gateway = Gateway(
        sources=[TcpSource(port=0)],
        sink=TcpSink("127.0.0.1", port),
        sink_wait=0.2,
        retry=RetryPolicy(initial=0.02, maximum=0.05),
    )
    with trio.fail_after(10), pytest.raises(SinkUnavailable) as caught:
        await gateway.run()
    assert str(caught.value) == (f"sink tcp:127.0.0.1:{port}: connection refused (waited 0.2 s)")


async def test_a_broken_stdout_pipe_stops_the_gateway_instead_of_retrying() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "wb", buffering=0)
    sink = StdoutSink(stream)
    gateway = Gateway(
        sources=[TcpSource(port=0)], sink=sink, retry=RetryPolicy(initial=0.01, maximum=0.02)
    )
    try:
        lost = pytest.RaisesGroup(pytest.RaisesExc(SinkUnavailable, match="broken pipe"))
        with trio.fail_after(10), lost:
            async with trio.open_nursery() as nursery:
                ((address,),) = await nursery.start(gateway.run)
                os.close(read_end)  # the reader goes away (`serve | head`)
                client = await trio.open_tcp_stream(*address)
                await client.send_all(b"one\ntwo\n")
                await trio.sleep_forever()  # until the gateway stops itself
    finally:
        stream.close()
    assert gateway.state == "stopped"
    assert gateway.pump_counters.sink_retries == 0
    ledger = gateway.ledger
    assert ledger.balanced and ledger.received == ledger.abandoned == 2


async def test_a_user_sink_whose_open_raises_anything_is_named_too() -> None:
    class Broken(Sink):
        name = "broken"

        async def open(self) -> None:
            raise RuntimeError("no credentials")

        async def send(self, batch: Batch) -> None:
            raise AssertionError("never sent")

    with pytest.raises(SinkUnavailable, match=r"^sink broken: no credentials$"):
        await Gateway(sources=[TcpSource(port=0)], sink=Broken()).run()
