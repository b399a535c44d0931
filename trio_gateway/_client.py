"""``python -m trio_gateway send``: a load-generating client for the TCP and UDP sources."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._errors import ConfigurationError
from .codecs import encode_length_prefixed, encode_newline

__all__ = ("SendSummary", "make_payload", "send_tcp", "send_udp")

_CHUNK_BYTES = 256 * 1024


def make_payload(size: int, seq: int) -> bytes:
    """A deterministic JSON document of exactly ``size`` bytes (no newline inside)."""
    head = b'{"seq":%d,"data":"' % seq
    tail = b'"}'
    fill = size - len(head) - len(tail)
    if fill < 0:
        # Too small for the JSON envelope: digits only, still exactly ``size`` bytes.
        return (b"%0*d" % (size, seq))[-size:] if size else b""
    return head + b"x" * fill + tail


@dataclass(frozen=True, slots=True)
class SendSummary:
    messages: int
    bytes: int
    seconds: float

    def line(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (
            f"sent {self.messages} messages, {self.bytes} bytes in {self.seconds:.3f} s: "
            f"{self.messages / seconds:,.0f} msg/s, {self.bytes / seconds / 1e6:,.2f} MB/s"
        )


async def _pace(start: float, sent: int, rate: float | None) -> None:
    if rate:
        delay = start + sent / rate - trio.current_time()
        if delay > 0:
            await trio.sleep(delay)


async def send_tcp(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    framing: str = "newline",
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send ``count`` messages of ``size`` bytes over one connection, in large writes."""
    encode = {"newline": encode_newline, "length": encode_length_prefixed}.get(framing)
    if encode is None:
        raise ConfigurationError("--framing", f"must be newline or length, got {framing!r}")
    per_chunk = max(1, _CHUNK_BYTES // max(size, 1))
    if rate:
        per_chunk = max(1, min(per_chunk, math.ceil(rate / 100)))  # about 100 writes a second
    stream = await trio.open_tcp_stream(host, port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    sent = total = 0
    start = trio.current_time()
    wall = time.perf_counter()
    async with stream:
        while sent < count:
            n = min(per_chunk, count - sent)
            data = encode([make_payload(size, sent + i) for i in range(n)])
            await stream.send_all(data)
            sent += n
            if progress is not None:
                progress(n)
            total += n * size
            await _pace(start, sent, rate)
        await stream.send_eof()
        # Wait for the server to close its side: everything we sent has been read by then.
        while await stream.receive_some(65536):
            pass
    return SendSummary(sent, total, time.perf_counter() - wall)


async def send_udp(
    host: str,
    port: int,
    *,
    count: int,
    size: int,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> SendSummary:
    """Send ``count`` datagrams of ``size`` bytes (UDP gives no delivery report)."""
    if size > 65_507:
        raise ConfigurationError("--size", "a UDP datagram carries at most 65507 bytes")
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    sent = 0
    start = trio.current_time()
    wall = time.perf_counter()
    with sock:
        await sock.connect(address)
        while sent < count:
            await sock.send(make_payload(size, sent))
            sent += 1
            if progress is not None and not sent % 1000:
                progress(1000)
            if rate:
                await _pace(start, sent, rate)
    return SendSummary(sent, sent * size, time.perf_counter() - wall)
