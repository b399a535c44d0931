"""The TCP sink against a real listener that goes away and comes back."""

from __future__ import annotations

import trio

from trio_gateway import (
    Gateway,
    RetryPolicy,
    TcpSink,
    TcpSource,
)
from trio_gateway.codecs import LengthPrefixDecoder


class _Destination:
    """A plain length-prefixed TCP server that can go away and come back on the same port."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.port = 0
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        decoder = LengthPrefixDecoder()
        async with stream:
            while data := await stream.receive_some(65536):
                self.payloads.extend(decoder.feed(data))


async def test_tcp_sink_reconnects_and_delivers_everything_at_least_once() -> None:
    destination = _Destination()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            up = trio.CancelScope()

            async def run_destination(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                with up:
                    await destination.serve(task_status=task_status)

            await nursery.start(run_destination)
            sink = TcpSink("127.0.0.1", destination.port)
            gateway = Gateway(
                sources=[TcpSource(port=0)],
                sink=sink,
                retry=RetryPolicy(initial=0.05, maximum=0.2),
                batch_size=100,
            )
            async with trio.open_nursery() as inner:
                ((address,),) = await inner.start(gateway.run)
                client = await trio.open_tcp_stream(*address)
                await client.send_all(b"".join(b"first %d\n" % i for i in range(500)))
                while len(destination.payloads) < 500:
                    await trio.sleep(0.01)
                # The destination goes away: its listener and connections close.
                up.cancel()
                await trio.sleep(0.05)
                await client.send_all(b"".join(b"second %d\n" % i for i in range(500)))
                while gateway.pump_counters.sink_retries < 2:  # the pump fails, backs off
                    await trio.sleep(0.01)
                # It comes back on the same port.
                up = trio.CancelScope()
                await nursery.start(run_destination)
                while len(set(destination.payloads)) < 1000:
                    await trio.sleep(0.01)
                await client.aclose()
                gateway.shutdown()
            up.cancel()
    expected = {b"first %d" % i for i in range(500)} | {b"second %d" % i for i in range(500)}
    assert set(destination.payloads) == expected
    assert sink.connects >= 2
    ledger = gateway.ledger
    assert ledger.delivered == 1000 and ledger.balanced
