"""The UDP source: one datagram = one message, drained in batches, drops counted."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import trio

from trio_gateway import Gateway, Item, RingBuffer, Sink, UdpSource


class RecordingSink(Sink):
    name = "recording"

    def __init__(self, gate: trio.Event | None = None) -> None:
        self.items: list[Item] = []
        self.gate = gate

    async def send(self, batch: Sequence[Item]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.items.extend(batch)


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return sock


async def test_datagrams_arrive_with_their_peer() -> None:
    sink = RecordingSink()
    gateway = Gateway(sources=[UdpSource(port=0)], sink=sink, grace_period=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            with _client() as sock:
                sock.bind(("127.0.0.1", 0))
                for i in range(500):
                    sock.sendto(b"datagram %d" % i, address)
                    if i % 50 == 0:
                        await trio.sleep(0.001)  # stay under the socket buffer
                peer = "127.0.0.1:%d" % sock.getsockname()[1]
            while len(sink.items) < 500:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert [p for p, _ in sink.items] == [b"datagram %d" % i for i in range(500)]
    assert {origin.peer for _, origin in sink.items} == {peer}
    assert {origin.transport for _, origin in sink.items} == {"udp"}
    assert gateway.ledger.balanced


async def test_queue_rejections_are_counted_as_drops() -> None:
    gate = trio.Event()
    sink = RecordingSink(gate)
    queue: RingBuffer[bytes] = RingBuffer(10, policy="drop_newest")
    gateway = Gateway(
        sources=[UdpSource(port=0)], sink=sink, queue=queue, batch_size=5, grace_period=0.5
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            with _client() as sock:
                for i in range(100):
                    sock.sendto(b"%d" % i, address)
            while gateway.ledger.received < 100:
                await trio.sleep(0.01)
            gate.set()
            gateway.shutdown()
    ledger = gateway.ledger
    # The queue holds 10, plus at most one batch of 5 the pump took before the sink stalled
    # (whether it did depends on how the 100 datagrams were split into reads): the rest dropped.
    assert 10 <= ledger.delivered <= 15
    assert ledger.dropped["drop_newest"] == 100 - ledger.delivered
    assert ledger.balanced
    assert [p for p, _ in sink.items] == [b"%d" % i for i in range(ledger.delivered)]


async def test_oversized_datagram_is_counted_and_skipped() -> None:
    sink = RecordingSink()
    gateway = Gateway(sources=[UdpSource(port=0, max_message_size=100)], sink=sink)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            with _client() as sock:
                sock.sendto(b"small", address)
                sock.sendto(b"L" * 101, address)
                sock.sendto(b"after", address)
            while len(sink.items) < 2:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert [p for p, _ in sink.items] == [b"small", b"after"]
    assert gateway.ledger.rejected == {"oversize": 1}
