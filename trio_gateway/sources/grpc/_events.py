"""What :class:`~._protocol.GrpcProtocol` reports about the bytes it is fed, sans-IO: the
events :meth:`~._protocol.GrpcProtocol.receive_data` returns (with :class:`~._calls.CallChanged`,
which a call keeps one of), and :class:`ConnectionBroken`, which it raises. The I/O layer
(``_connection``) acts on each; the protocol's tests read them. h11 keeps its events in a
module of their own too: what a protocol says is one concern, how it works out the answer
another.
"""

from __future__ import annotations

from ..._errors import ProtocolError
from ._calls import Call, CallChanged

__all__ = (
    "CallStarted",
    "ConnectionBroken",
    "Event",
    "PeerGoingAway",
    "PingAcked",
    "WindowOpened",
)


class ConnectionBroken(ProtocolError):
    """The client broke HTTP/2 or a connection limit; a GOAWAY is queued and the refusal
    counted under ``reason``. Nothing more is read from it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class CallStarted:
    """Event: a valid request's headers came; ``call`` is its state."""

    __slots__ = ("call",)

    def __init__(self, call: Call) -> None:
        self.call = call

    def __repr__(self) -> str:
        return f"CallStarted(stream_id={self.call.stream_id}, path={self.call.path!r})"


class WindowOpened:
    """Event: the client opened a flow-control window (or reset a stream): blocked sends
    may go on."""

    __slots__ = ()


class PingAcked:
    """Event: the client answered the drain PING (:data:`~._protocol.DRAIN_PING`)."""

    __slots__ = ()


class PeerGoingAway:
    """Event: the client sent GOAWAY: finish the calls in progress, then close."""

    __slots__ = ()


Event = CallStarted | CallChanged | WindowOpened | PingAcked | PeerGoingAway
