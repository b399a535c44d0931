"""trio_gateway: real-time data-pipeline gateways on Trio's structured concurrency.

Sources (TCP, UDP, ...) -> a bounded queue with an overflow policy -> an optional processor ->
a sink, supervised by one nursery, with a cancellation-safe flush and a ledger that accounts for
every message.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._errors import ConfigurationError as ConfigurationError
    from ._errors import FrameTooLarge as FrameTooLarge
    from ._errors import GatewayError as GatewayError
    from ._errors import ProtocolError as ProtocolError
    from ._errors import SinkError as SinkError
    from ._errors import SinkRefused as SinkRefused
    from ._errors import SinkUnavailable as SinkUnavailable
    from ._errors import TransportError as TransportError
    from ._fanout import FanOutSink as FanOutSink
    from ._fanout import QueuedSink as QueuedSink
    from ._fanout import SinkLedger as SinkLedger
    from ._gateway import Gateway as Gateway
    from ._gateway import Processor as Processor
    from ._gateway import RetryPolicy as RetryPolicy
    from ._ingress import Ingress as Ingress
    from ._ledger import Ledger as Ledger
    from ._message import Batch as Batch
    from ._message import Item as Item
    from ._message import Message as Message
    from ._message import Origin as Origin
    from ._pipelines import Pipeline as Pipeline
    from ._pipelines import Pipelines as Pipelines
    from ._routing import FromPipeline as FromPipeline
    from ._routing import ToPipeline as ToPipeline
    from .queues import ChannelQueue as ChannelQueue
    from .queues import LockedListQueue as LockedListQueue
    from .queues import LockedRingBuffer as LockedRingBuffer
    from .queues import Queue as Queue
    from .queues import QueueStatistics as QueueStatistics
    from .queues import RingBuffer as RingBuffer
    from .sinks import FileSink as FileSink
    from .sinks import HttpSink as HttpSink
    from .sinks import NatsSink as NatsSink
    from .sinks import NullSink as NullSink
    from .sinks import PostgresSink as PostgresSink
    from .sinks import Sink as Sink
    from .sinks import SqliteSink as SqliteSink
    from .sinks import StdoutSink as StdoutSink
    from .sinks import TcpSink as TcpSink
    from .sinks import WebSocketBroadcastSink as WebSocketBroadcastSink
    from .sinks import WebSocketSink as WebSocketSink
    from .sources import GrpcSource as GrpcSource
    from .sources import HttpSource as HttpSource
    from .sources import NatsSource as NatsSource
    from .sources import Source as Source
    from .sources import TcpSource as TcpSource
    from .sources import UdpSource as UdpSource
    from .sources import WebSocketSource as WebSocketSource

__version__ = "0.1.0"

__all__ = (
    "Batch",
    "ChannelQueue",
    "ConfigurationError",
    "FanOutSink",
    "FileSink",
    "FrameTooLarge",
    "FromPipeline",
    "Gateway",
    "GatewayError",
    "GrpcSource",
    "HttpSink",
    "HttpSource",
    "Ingress",
    "Item",
    "Ledger",
    "LockedListQueue",
    "LockedRingBuffer",
    "Message",
    "NatsSink",
    "NatsSource",
    "NullSink",
    "Origin",
    "Pipeline",
    "Pipelines",
    "PostgresSink",
    "Processor",
    "ProtocolError",
    "Queue",
    "QueueStatistics",
    "QueuedSink",
    "RetryPolicy",
    "RingBuffer",
    "Sink",
    "SinkError",
    "SinkLedger",
    "SinkRefused",
    "SinkUnavailable",
    "Source",
    "SqliteSink",
    "StdoutSink",
    "TcpSink",
    "TcpSource",
    "ToPipeline",
    "TransportError",
    "UdpSource",
    "WebSocketBroadcastSink",
    "WebSocketSink",
    "WebSocketSource",
    "__version__",
)

_WHERE = {
    "ConfigurationError": "._errors",
    "FrameTooLarge": "._errors",
    "GatewayError": "._errors",
    "ProtocolError": "._errors",
    "SinkError": "._errors",
    "SinkRefused": "._errors",
    "SinkUnavailable": "._errors",
    "TransportError": "._errors",
    "FanOutSink": "._fanout",
    "QueuedSink": "._fanout",
    "SinkLedger": "._fanout",
    "Gateway": "._gateway",
    "Processor": "._gateway",
    "RetryPolicy": "._gateway",
    "Ingress": "._ingress",
    "Ledger": "._ledger",
    "Batch": "._message",
    "Item": "._message",
    "Message": "._message",
    "Origin": "._message",
    "Pipeline": "._pipelines",
    "Pipelines": "._pipelines",
    "FromPipeline": "._routing",
    "ToPipeline": "._routing",
    "ChannelQueue": ".queues",
    "LockedListQueue": ".queues",
    "LockedRingBuffer": ".queues",
    "Queue": ".queues",
    "QueueStatistics": ".queues",
    "RingBuffer": ".queues",
    "FileSink": ".sinks",
    "HttpSink": ".sinks",
    "NatsSink": ".sinks",
    "NullSink": ".sinks",
    "PostgresSink": ".sinks",
    "SqliteSink": ".sinks",
    "Sink": ".sinks",
    "StdoutSink": ".sinks",
    "TcpSink": ".sinks",
    "WebSocketBroadcastSink": ".sinks",
    "WebSocketSink": ".sinks",
    "GrpcSource": ".sources",
    "HttpSource": ".sources",
    "NatsSource": ".sources",
    "Source": ".sources",
    "TcpSource": ".sources",
    "UdpSource": ".sources",
    "WebSocketSource": ".sources",
}
"""Where each public name lives. They are imported on first use (PEP 562), so that
``python -m trio_gateway --help`` does not load every server (hypercorn, h2, websockets)."""


def __getattr__(name: str) -> _typing.Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
