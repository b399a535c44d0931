"""One exception tree for everything trio_gateway raises on purpose."""

from __future__ import annotations

from typing import Any

__all__ = (
    "ConfigurationError",
    "FrameTooLarge",
    "GatewayError",
    "ProtocolError",
    "SinkError",
    "SinkUnavailable",
    "TransportError",
)


class GatewayError(Exception):
    """Base class of every error trio_gateway raises on purpose."""


class ConfigurationError(GatewayError, ValueError):
    """A configuration value is missing or wrong.

    ``key`` names the offending setting (``"queue.capacity"``, ``"--tcp"``), so the
    command line can print one line that tells the user what to fix.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ProtocolError(GatewayError):
    """A peer sent bytes that break the framing or the protocol."""


class FrameTooLarge(ProtocolError):
    """A frame is larger than the decoder's ``max_frame_size``.

    ``frames`` holds the whole frames that the same feed completed before the oversize one:
    they were well formed, so a source accepts them before it drops the connection.
    """

    def __init__(self, size: int, limit: int, frames: list[Any] | None = None) -> None:
        super().__init__(f"frame of at least {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.frames: list[Any] = frames if frames is not None else []


class TransportError(GatewayError):
    """A socket-level failure (connect, send, receive), translated at the boundary."""


class SinkError(GatewayError):
    """A sink could not deliver a batch; the pump may retry it.

    ``retry_after``, when set, is the least number of seconds the pump waits before the next
    attempt (a destination's ``Retry-After``); the backoff applies when it asks for longer.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkRefused(SinkError):
    """The destination refused some messages of a batch for good (an HTTP 400 or 413 for a
    single record): sending them again cannot help, so the pump does not retry them.

    Everything else of the batch was delivered. ``indices`` are the refused messages'
    positions in the batch; ``reason`` says why in a word (``http_413``). The pump hands them
    to the dead-letter sink when there is one (ledger ``dead_letter``), else drops them
    (ledger ``refused``).
    """

    def __init__(self, message: str, *, indices: list[int], reason: str) -> None:
        super().__init__(message)
        self.indices = indices
        self.reason = reason


class SinkUnavailable(SinkError):
    """A sink's destination cannot be used: retrying the same batch cannot help.

    Raised by :meth:`Sink.open <trio_gateway.Sink.open>`, which the gateway calls before it is
    ready (a missing directory, no permission, a refused connection), and by a sink whose
    destination went away for good while it ran (the reader of a pipe exited). ``sink`` names
    the sink, ``cause`` says what is wrong in a few words; ``str()`` is one line with both.
    """

    def __init__(self, sink: str, cause: str) -> None:
        super().__init__(f"sink {sink}: {cause}")
        self.sink = sink
        self.cause = cause
