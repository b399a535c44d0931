"""Sources: one per transport, each a supervised server feeding the gateway's queue."""

from ._base import Source as Source
from ._base import serve_connections as serve_connections
from .grpc import GrpcSource as GrpcSource
from .http import HttpSource as HttpSource
from .nats import NatsSource as NatsSource
from .tcp import TcpSource as TcpSource
from .udp import UdpSource as UdpSource
from .websocket import WebSocketSource as WebSocketSource

__all__ = (
    "GrpcSource",
    "HttpSource",
    "NatsSource",
    "Source",
    "TcpSource",
    "UdpSource",
    "WebSocketSource",
    "serve_connections",
)
