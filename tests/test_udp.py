"""The UDP source: one datagram = one message, drained in batches, drops counted."""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import pytest
import trio

import trio_gateway.sources.udp
from trio_gateway import Gateway, Item, RingBuffer, Sink, UdpSource
from trio_gateway.sources._mmsg import available as recvmmsg_available


@pytest.fixture(autouse=True, params=["recvmmsg", "recvfrom"])
def receive_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test runs on both ways of reading: recvmmsg (Linux) and recvfrom (elsewhere)."""
    if request.param == "recvmmsg":
        if not recvmmsg_available():
            pytest.skip("no recvmmsg on this platform")
    else:
        monkeypatch.setattr(trio_gateway.sources.udp, "multi_receive_available", lambda: False)
    yield request.param


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


async def test_a_burst_from_two_senders_keeps_each_senders_order_and_address() -> None:
    sink = RecordingSink()
    gateway = Gateway(sources=[UdpSource(port=0)], sink=sink, grace_period=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            with _client() as first, _client() as second:
                first.bind(("127.0.0.1", 0))
                second.bind(("127.0.0.1", 0))
                # Sent without yielding to the loop: the source finds all 400 waiting and
                # takes them in one drain (several recvmmsg calls, interleaved senders).
                for i in range(200):
                    first.sendto(b"first %d" % i, address)
                    second.sendto(b"second %d" % i, address)
                peers = {
                    "127.0.0.1:%d" % first.getsockname()[1]: b"first",
                    "127.0.0.1:%d" % second.getsockname()[1]: b"second",
                }
            while len(sink.items) < 400:
                await trio.sleep(0.01)
            gateway.shutdown()
    by_peer: dict[str, list[bytes]] = {}
    for payload, origin in sink.items:
        by_peer.setdefault(origin.peer, []).append(payload)
    assert set(by_peer) == set(peers)
    for peer, name in peers.items():
        assert by_peer[peer] == [b"%s %d" % (name, i) for i in range(200)]


async def test_sizes_either_side_of_the_recvmmsg_limit_arrive_intact() -> None:
    sizes = [1, 3072, 3073, 18, 20_000, 65_507, 500]
    payloads = [bytes([65 + i % 26]) * sizes[i % len(sizes)] for i in range(70)]
    sink = RecordingSink()
    gateway = Gateway(sources=[UdpSource(port=0)], sink=sink, grace_period=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            with _client() as sock:
                for i, payload in enumerate(payloads):
                    sock.sendto(payload, address)
                    if i % 7 == 0:
                        await trio.sleep(0.005)  # some drains end on a large one, some small
            while len(sink.items) < len(payloads):
                await trio.sleep(0.01)
            gateway.shutdown()
    assert [p for p, _ in sink.items] == payloads


async def test_ipv6_sender_address_is_bracketed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sink = RecordingSink()
    gateway = Gateway(sources=[UdpSource(host="::1", port=0)], sink=sink, grace_period=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            try:
                ((address,),) = await nursery.start(gateway.run)
            except OSError:
                pytest.skip("no IPv6 loopback")
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                sock.bind(("::1", 0))
                sock.sendto(b"over six", address)
                peer = "[::1]:%d" % sock.getsockname()[1]
            while not sink.items:
                await trio.sleep(0.01)
            gateway.shutdown()
    assert sink.items[0][0] == b"over six" and sink.items[0][1].peer == peer
