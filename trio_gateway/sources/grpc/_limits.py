"""The bounds a gRPC server applies to every connection and call (no I/O, no trio)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("DEFAULT_MAX_MESSAGE_SIZE", "ServerLimits")

DEFAULT_MAX_MESSAGE_SIZE = 4 << 20
"""gRPC's customary default: 4 MiB per message."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The bounds one server applies to every connection and call."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_concurrent_streams: int = 128
    stream_window: int = 1 << 20
    """HTTP/2 flow-control window per stream: the most a client sends ahead of the handler."""
    connection_window: int = 16 << 20
    idle_timeout: float = 60.0
    """A connection with no call in progress for this long is sent GOAWAY and closed."""
    drain_notice: float = 1.0
    """On shutdown, how long to wait for the client's PING reply between the two GOAWAYs."""
    max_header_list_size: int = 16 * 1024
    max_frame_size: int = 1 << 20
    """Largest DATA frame a client may send (HTTP/2's default is 16 KiB): fewer, larger
    frames cost h2 less per byte."""

    @property
    def stall_limit(self) -> int:
        """Bytes a connection may send that complete no HTTP/2 frame: one frame plus one
        header block (h2 buffers a frame whole before it checks its length, up to 16 MiB,
        and keeps up to 64 CONTINUATION frames)."""
        return self.max_frame_size + self.max_header_list_size + 64
