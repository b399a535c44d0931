"""The UDP source: one datagram = one message, drained in batches, drops counted."""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from helpers import wait_until

import trio_gateway.sources._mmsg
import trio_gateway.sources.udp
from trio_gateway import Gateway, Message, RingBuffer, UdpSource
from trio_gateway.sources._mmsg import available as recvmmsg_available
from trio_gateway.testing import RecordingSink, open_gateway


@pytest.fixture(autouse=True, params=["recvmmsg", "recvfrom"])
def receive_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test runs on both ways of reading: recvmmsg (Linux) and recvfrom (elsewhere)."""
    if request.param == "recvmmsg":
        if not recvmmsg_available():
            pytest.skip("no recvmmsg on this platform")
    else:
        monkeypatch.setattr(trio_gateway.sources.udp, "multi_receive_available", lambda: False)
    yield request.param


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    return sock


@dataclass
class Served:
    gateway: Gateway
    sink: RecordingSink
    address: tuple[str, int]

    async def received(self, count: int) -> list[Message]:
        """Wait until the sink has ``count`` messages, then shut the gateway down."""
        await self.sink.wait_for(count)
        self.gateway.shutdown()
        return self.sink.items


@asynccontextmanager
async def serving(
    source: UdpSource, *, stalled: bool = False, **options: Any
) -> AsyncIterator[Served]:
    """A gateway with ``source`` and a recording sink (``stalled``: holding its first send until
    ``sink.recover()``), for at most 10 s."""
    sink = RecordingSink()
    if stalled:
        sink.stall()
    gateway = Gateway(sources=[source], sink=sink, grace_period=0.5, **options)
    with trio.fail_after(10):
        async with open_gateway(gateway) as handle:
            yield Served(gateway, sink, handle.address())
            sink.recover()


async def test_datagrams_arrive_with_their_peer() -> None:
    async with serving(UdpSource(port=0)) as served:
        with _client() as sock:
            sock.bind(("127.0.0.1", 0))
            for i in range(500):
                sock.sendto(b"datagram %d" % i, served.address)
                if i % 50 == 0:
                    await trio.sleep(0.001)  # stay under the socket buffer
            peer = "127.0.0.1:%d" % sock.getsockname()[1]
        items = await served.received(500)
    assert [p for p, _ in items] == [b"datagram %d" % i for i in range(500)]
    assert {origin.peer for _, origin in items} == {peer}
    assert {origin.transport for _, origin in items} == {"udp"}
    assert served.gateway.ledger.balanced


async def test_queue_rejections_are_counted_as_drops() -> None:
    queue: RingBuffer[bytes] = RingBuffer(10, policy="drop_newest")
    async with serving(UdpSource(port=0), stalled=True, queue=queue, batch_size=5) as served:
        with _client() as sock:
            for i in range(100):
                sock.sendto(b"%d" % i, served.address)
        await wait_until(lambda: served.gateway.ledger.received == 100)
        served.sink.recover()
        served.gateway.shutdown()
    ledger = served.gateway.ledger
    # The queue holds 10, plus at most one batch of 5 the pump took before the sink stalled
    # (whether it did depends on how the 100 datagrams were split into reads): the rest dropped.
    assert 10 <= ledger.delivered <= 15
    assert ledger.dropped["drop_newest"] == 100 - ledger.delivered
    assert ledger.balanced
    assert served.sink.payloads == [b"%d" % i for i in range(ledger.delivered)]


async def test_oversized_datagram_is_counted_and_skipped() -> None:
    async with serving(UdpSource(port=0, max_message_size=100)) as served:
        with _client() as sock:
            sock.sendto(b"small", served.address)
            sock.sendto(b"L" * 101, served.address)
            sock.sendto(b"after", served.address)
        items = await served.received(2)
    assert [p for p, _ in items] == [b"small", b"after"]
    assert served.gateway.ledger.rejected == {"oversize": 1}


async def test_a_burst_from_two_senders_keeps_each_senders_order_and_address() -> None:
    async with serving(UdpSource(port=0)) as served:
        with _client() as first, _client() as second:
            first.bind(("127.0.0.1", 0))
            second.bind(("127.0.0.1", 0))
            # Sent without yielding to the loop: the source finds all 200 waiting and takes
            # them in one drain (four recvmmsg calls, the senders interleaved). 200 small
            # datagrams fit the receive buffer even where the kernel caps SO_RCVBUF at
            # Linux's default (about 416 KiB, some 1 KiB of it per datagram).
            for i in range(100):
                first.sendto(b"first %d" % i, served.address)
                second.sendto(b"second %d" % i, served.address)
            peers = {
                "127.0.0.1:%d" % first.getsockname()[1]: b"first",
                "127.0.0.1:%d" % second.getsockname()[1]: b"second",
            }
        items = await served.received(200)
    by_peer: dict[str, list[bytes]] = {}
    for payload, origin in items:
        by_peer.setdefault(origin.peer, []).append(payload)
    assert set(by_peer) == set(peers)
    for peer, name in peers.items():
        assert by_peer[peer] == [b"%s %d" % (name, i) for i in range(100)]


async def test_sizes_either_side_of_the_recvmmsg_limit_arrive_intact() -> None:
    sizes = [1, 3072, 3073, 18, 20_000, 65_507, 500]
    payloads = [bytes([65 + i % 26]) * sizes[i % len(sizes)] for i in range(70)]
    async with serving(UdpSource(port=0)) as served:
        with _client() as sock:
            for i, payload in enumerate(payloads):
                sock.sendto(payload, served.address)
                if i % 7 == 0:
                    await trio.sleep(0.005)  # some drains end on a large one, some small
        items = await served.received(len(payloads))
    assert [p for p, _ in items] == payloads


async def test_ipv6_sender_address_is_bracketed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with serving(UdpSource(host="::1", port=0)) as served:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
            sock.sendto(b"over six", served.address)
            peer = "[::1]:%d" % sock.getsockname()[1]
        items = await served.received(1)
    assert items[0][0] == b"over six" and items[0][1].peer == peer


@pytest.mark.parametrize("receive_path", ["recvmmsg"], indirect=True)
async def test_a_kernel_that_refuses_recvmmsg_gets_recvfrom(
    receive_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    # What a seccomp filter (or an emulator without the call) answers; no test can make this
    # kernel refuse a system call it has, so libc's function is stood in for here.
    def refuse(*args: object) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(trio_gateway.sources._mmsg, "_recvmmsg", refuse)
    async with serving(UdpSource(port=0)) as served:
        with _client() as sock:
            for i in range(50):
                sock.sendto(b"%d" % i, served.address)
        items = await served.received(50)
    assert [p for p, _ in items] == [b"%d" % i for i in range(50)]
    assert caplog.text.count("recvmmsg failed") == 1


async def test_raw_framing_keeps_a_trailing_newline_as_sent() -> None:
    # What `echo x | nc -u HOST PORT` sends: the newline is part of the datagram.
    async with serving(UdpSource(port=0)) as served:
        with _client() as sock:
            sock.sendto(b"x\n", served.address)
        items = await served.received(1)
    assert [p for p, _ in items] == [b"x\n"]


async def test_newline_framing_strips_the_newline_and_splits_lines() -> None:
    async with serving(UdpSource(port=0, framing="newline")) as served:
        with _client() as sock:
            for datagram in (b"x\n", b"a\nb\n\nc", b"", b"\n", b"last"):
                sock.sendto(datagram, served.address)
        items = await served.received(5)
    # Empty lines (and so an empty datagram) are no message, as with TCP's newline framing.
    assert [p for p, _ in items] == [b"x", b"a", b"b", b"c", b"last"]
    ledger = served.gateway.ledger
    assert ledger.received == ledger.delivered == 5 and ledger.balanced


def test_framing_is_checked_and_read_in_either_spelling() -> None:
    from trio_gateway import ConfigurationError
    from trio_gateway._config import SourceConfig, build_source

    with pytest.raises(ConfigurationError, match=r"udp\.framing: must be one of raw, newline"):
        UdpSource(framing="lines")  # type: ignore[arg-type]
    built = build_source(SourceConfig("udp", "127.0.0.1", 0, {"framing": "newline"}))
    assert isinstance(built, UdpSource) and built.framing == "newline"
    with pytest.raises(ConfigurationError, match=r"sources\.framing"):
        build_source(SourceConfig("udp", "127.0.0.1", 0, {"framing": "xml"}))


async def test_a_port_in_use_names_the_listener() -> None:
    from trio_gateway import TransportError

    with _client() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        gateway = Gateway(sources=[UdpSource(port=port)], sink=RecordingSink())
        with pytest.RaisesGroup(
            pytest.RaisesExc(
                TransportError, match=f"^udp 127.0.0.1:{port}: address already in use$"
            ),
            flatten_subgroups=True,
        ):
            await gateway.run()
