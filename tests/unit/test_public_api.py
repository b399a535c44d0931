"""The public surface: what `import trio_gateway` offers, and the README's example."""

from __future__ import annotations

import trio_gateway


def test_exported_names() -> None:
    assert isinstance(trio_gateway.__all__, tuple)
    public = {n for n in dir(trio_gateway) if not n.startswith(("_", "@"))}
    # Subpackages are reachable as attributes once imported; they are not part of __all__.
    modules = {
        "admin",
        "codecs",
        "loadgen",
        "queues",
        "sinks",
        "sources",
        "testing",
        "tuning",
        "workers",
    }
    assert set(trio_gateway.__all__) - {"__version__"} == public - modules
    assert {
        "Gateway",
        "Ledger",
        "Message",
        "Origin",
        "Batch",
        "RingBuffer",
        "ChannelQueue",
        "LockedRingBuffer",
        "LockedListQueue",
        "TcpSource",
        "UdpSource",
        "HttpSource",
        "WebSocketSource",
        "GrpcSource",
        "FileSink",
        "StdoutSink",
        "NullSink",
        "TcpSink",
        "GatewayError",
        "ConfigurationError",
        "ProtocolError",
        "FrameTooLarge",
        "SinkError",
        "TransportError",
    } <= set(trio_gateway.__all__)


def test_one_error_tree() -> None:
    for name in (
        "ConfigurationError",
        "ProtocolError",
        "FrameTooLarge",
        "SinkError",
        "TransportError",
    ):
        assert issubclass(getattr(trio_gateway, name), trio_gateway.GatewayError)
