"""Sources: one per transport, each a supervised server feeding the gateway's queue."""

from ._base import Source as Source
from ._base import serve_connections as serve_connections
from .tcp import TcpSource as TcpSource
from .udp import UdpSource as UdpSource

__all__ = ("Source", "TcpSource", "UdpSource", "serve_connections")
