"""The shape every decoder has, for typing, and the shared validation of a size limit."""

from __future__ import annotations

from typing import Protocol, TypeVar

from .._errors import ConfigurationError

__all__ = ("Decoder", "DecoderFactory", "check_limit")

FrameT = TypeVar("FrameT")


class Decoder(Protocol[FrameT]):
    """A sans-IO framing decoder: bytes in, complete frames out, never touching a socket.

    ``feed`` takes the bytes of one read (``bytes``, or a ``bytearray``/``memoryview``,
    copied once so that frames are always ``bytes``) and returns every frame they complete
    (possibly none), keeping the incomplete tail. ``close`` is called at end of stream: it
    returns what a clean end completes, or raises :class:`~trio_gateway.ProtocolError` if
    the stream ended in the middle of a frame. ``buffered`` is the number of bytes held for
    the next frame. Every decoder bounds what it holds and raises
    :class:`~trio_gateway.FrameTooLarge` past its limit.
    """

    @property
    def payload_bytes(self) -> int:
        """Payload bytes in the frames the last ``feed``/``close`` returned (for counters)."""
        ...

    def feed(self, data: bytes | bytearray | memoryview) -> list[FrameT]: ...

    def close(self) -> list[FrameT]: ...

    @property
    def buffered(self) -> int: ...


class DecoderFactory(Protocol):
    """What :data:`~trio_gateway.codecs.FRAMINGS` maps a framing name to (a decoder class)."""

    def __call__(self, max_frame_size: int = ...) -> Decoder[bytes]: ...


def check_limit(name: str, value: int) -> int:
    """Return ``value`` if it is a positive integer, else raise ConfigurationError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(name, f"must be a positive integer, got {value!r}")
    return value
