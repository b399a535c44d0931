"""The streaming TCP source, end to end over real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from helpers import read_payloads, wait_until

from trio_gateway import FileSink, Gateway, Item, RingBuffer, Sink, TcpSource
from trio_gateway.codecs import encode_length_prefixed, encode_newline


class GatedSink(Sink):
    """Records batches, but only while its gate is open (a destination that stalls)."""

    name = "gated"

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.open_gate = trio.Event()

    async def send(self, batch: Sequence[Item]) -> None:
        await self.open_gate.wait()
        self.items.extend(batch)


async def _send(address: tuple[str, int], data: bytes) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        # The server closes after reading everything: wait for that.
        while await stream.receive_some(1024):
            pass


async def test_100k_newline_messages_arrive_byte_exact(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    payloads = [b'{"n":%d,"text":"caf\xc3\xa9"}' % i for i in range(100_000)]
    gateway = Gateway(sources=[TcpSource(port=0)], sink=FileSink(out), grace_period=1)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            await _send(address, encode_newline(payloads))
            gateway.shutdown()
    assert read_payloads(out) == payloads
    ledger = gateway.ledger
    assert ledger.received == ledger.delivered == 100_000
    assert ledger.balanced


@pytest.mark.slow
async def test_2000_large_length_prefixed_messages(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    # 79,435 bytes each: the size the talk's 1024-byte reads could not frame.
    payloads = [(b"%06d" % i) * (79_435 // 6) + b"x" * (79_435 % 6) for i in range(2000)]
    assert all(len(p) == 79_435 for p in payloads)
    gateway = Gateway(
        sources=[TcpSource(port=0, framing="length")], sink=FileSink(out), grace_period=1
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            await _send(address, encode_length_prefixed(payloads))
            gateway.shutdown()
    assert read_payloads(out) == payloads
    assert gateway.ledger.delivered == 2000


async def test_oversized_frame_closes_only_its_connection(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    source = TcpSource(port=0, max_message_size=1000)
    gateway = Gateway(sources=[source], sink=FileSink(out), grace_period=1)
    good = [b"good %d" % i for i in range(5000)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            healthy = await trio.open_tcp_stream(*address)
            await healthy.send_all(encode_newline(good[:2500]))
            bad = await trio.open_tcp_stream(*address)
            await bad.send_all(b"ok before\n" + b"y" * 5000 + b"\n")
            # The server closes the bad connection: we read EOF (or a reset).
            try:
                assert await bad.receive_some(1024) == b""
            except trio.BrokenResourceError:
                pass
            await bad.aclose()
            await healthy.send_all(encode_newline(good[2500:]))
            await healthy.send_eof()
            assert await healthy.receive_some(1024) == b""
            await healthy.aclose()
            gateway.shutdown()
    delivered = read_payloads(out)
    assert [p for p in delivered if p.startswith(b"good")] == good
    assert b"ok before" in delivered
    assert gateway.ledger.rejected == {"oversize": 1}
    assert gateway.source_counters[0].connections_total == 2


async def test_block_policy_pushes_back_on_the_sender() -> None:
    sink = GatedSink()
    queue: RingBuffer[bytes] = RingBuffer(100, policy="block")
    gateway = Gateway(sources=[TcpSource(port=0)], sink=sink, queue=queue, batch_size=10)
    total = 200_000
    data = encode_newline([b"%07d" % i for i in range(total)])
    finished = trio.Event()

    async def client(address: tuple[str, int]) -> None:
        await _send(address, data)
        finished.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            nursery.start_soon(client, address)
            # The sink is stalled: the queue fills, the source stops reading, and the sender's
            # 1.6 MB cannot all leave (loopback buffers hold far less once reading stops).
            await wait_until(lambda: queue.statistics().waiting_producers == 1)
            assert not finished.is_set()
            stats = queue.statistics()
            assert stats.depth == 100
            assert stats.dropped == {"drop_newest": 0, "drop_oldest": 0}
            received_while_stalled = gateway.ledger.received
            assert received_while_stalled < total
            sink.open_gate.set()
            await finished.wait()
            gateway.shutdown()
    assert [p for p, _ in sink.items] == [b"%07d" % i for i in range(total)]
    assert gateway.ledger.delivered == total


async def test_idle_connection_is_closed_and_counted() -> None:
    sink = GatedSink()
    sink.open_gate.set()
    gateway = Gateway(sources=[TcpSource(port=0, idle_timeout=0.2)], sink=sink, grace_period=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            stream = await trio.open_tcp_stream(*address)
            await stream.send_all(b"hello\n")
            started = trio.current_time()
            assert await stream.receive_some(10) == b""
            assert 0.15 < trio.current_time() - started < 2
            await stream.aclose()
            gateway.shutdown()
    assert [p for p, _ in sink.items] == [b"hello"]
    assert gateway.ledger.rejected == {"idle_timeout": 1}


async def test_truncated_length_frame_is_counted() -> None:
    sink = GatedSink()
    sink.open_gate.set()
    gateway = Gateway(sources=[TcpSource(port=0, framing="length")], sink=sink, grace_period=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            await _send(address, encode_length_prefixed([b"whole"]) + b"\x00\x00\x00\x09half")
            gateway.shutdown()
    assert [p for p, _ in sink.items] == [b"whole"]
    assert gateway.ledger.rejected == {"truncated": 1}


@pytest.mark.parametrize("framing", ["newline", "length"])
async def test_frames_split_across_many_small_writes(framing: str) -> None:
    sink = GatedSink()
    sink.open_gate.set()
    payloads = [b"m%d-" % i + b"z" * (i * 37 % 3000) for i in range(300)]
    encode = encode_newline if framing == "newline" else encode_length_prefixed
    data = encode(payloads)
    gateway = Gateway(sources=[TcpSource(port=0, framing=framing)], sink=sink, grace_period=1)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ((address,),) = await nursery.start(gateway.run)
            stream = await trio.open_tcp_stream(*address)
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            for start in range(0, len(data), 1021):
                await stream.send_all(data[start : start + 1021])
            await stream.send_eof()
            assert await stream.receive_some(10) == b""
            await stream.aclose()
            gateway.shutdown()
    assert [p for p, _ in sink.items] == payloads
