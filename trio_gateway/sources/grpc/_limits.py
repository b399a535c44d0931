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
    """Largest frame a client may send (HTTP/2's default is 16 KiB): fewer, larger frames
    cost less per byte. A longer one is refused from its header, before its body is read."""
    max_resets: int = 200
    """Streams reset (the client's RST_STREAM on a call in progress, or refused here) allowed
    within :attr:`reset_window` before GOAWAY(ENHANCE_YOUR_CALM): "rapid reset"."""
    reset_window: float = 1.0
    connection_budget: int = 32 << 20
    """Bytes one connection may make the server hold in its calls: messages received and not
    yet taken, partial messages, and inflated batches in a handler's hands. Past it the call
    that asked for more ends RESOURCE_EXHAUSTED (``over_budget``). The default is the
    connection window plus four messages of the default ``max_message_size``."""

    @property
    def stall_limit(self) -> int:
        """The most a connection may have sent that completes no frame or header block: one
        frame's header and body (a longer frame is refused from its header) plus one header
        block with its slack (a longer block is refused when it passes it)."""
        return self.max_frame_size + 9 + self.max_header_list_size + 1024
