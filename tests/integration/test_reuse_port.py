"""SO_REUSEPORT in-process: two gateways bind one port, and the kernel spreads connections."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from trio_gateway import (
    Gateway,
    GrpcSource,
    HttpSource,
    NullSink,
    Source,
    TcpSource,
    TransportError,
    UdpSource,
    WebSocketSource,
)

SOURCES: dict[str, Callable[..., Source]] = {
    "tcp": TcpSource,
    "udp": UdpSource,
    "http": HttpSource,
    "websocket": WebSocketSource,
    "grpc": GrpcSource,
}


@pytest.mark.parametrize("transport", sorted(SOURCES))
async def test_reuse_port_lets_two_gateways_bind_one_port(transport: str) -> None:
    make = SOURCES[transport]
    first = Gateway(sources=[make("127.0.0.1", 0, reuse_port=True)], sink=NullSink())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            [[(_, port)]] = await nursery.start(first.run)
            second = Gateway(sources=[make("127.0.0.1", port, reuse_port=True)], sink=NullSink())
            [[(_, again)]] = await nursery.start(second.run)
            assert again == port
            # Without the option the port is not shared.
            lone = Gateway(sources=[make("127.0.0.1", port)], sink=NullSink())
            with pytest.raises(BaseException) as caught:
                await nursery.start(lone.run)
            assert all(isinstance(e, OSError | TransportError) for e in _leaves(caught.value))
            if transport == "tcp":  # the kernel spreads the connections over both
                for c in range(16):
                    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                        await stream.send_all(b"m%d\n" % c)
                        await stream.send_eof()
                        assert await stream.receive_some() == b""
            first.shutdown()
            second.shutdown()
    if transport == "tcp":
        assert first.ledger.received + second.ledger.received == 16
        assert first.ledger.received > 0 and second.ledger.received > 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
