"""Length-prefixed framing: a 4-byte big-endian length, and gRPC's 5-byte message prefix.

Both decoders share one state machine for the frame that straddles reads, and each has its
own fast loop for the frames that a read holds whole. The fast loop slices the payloads
straight out of the bytes that were read, so a read that starts on a frame boundary is
never copied into a buffer: only the incomplete frame at the end of a read is kept, and
only that frame's bytes are copied. A header that announces more than the limit raises
:class:`FrameTooLarge` before any of its body is buffered.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Generic, TypeVar

from .._errors import FrameTooLarge, ProtocolError
from ._base import check_limit

__all__ = (
    "GrpcMessageDecoder",
    "LengthPrefixDecoder",
    "encode_grpc_message",
    "encode_length_prefixed",
)

FrameT = TypeVar("FrameT")

_LENGTH = struct.Struct(">I")
_GRPC = struct.Struct(">BI")
_MAX_LENGTH = (1 << 32) - 1
_COPY_THRESHOLD = 16 * 1024


def _tail(data: bytes, start: int, end: int) -> bytes | memoryview:
    """``data[start:end]`` for appending to a buffer, without a copy when that matters."""
    if start == 0 and end == len(data):
        return data
    if end - start < _COPY_THRESHOLD:
        return data[start:end]  # a small copy is cheaper than a memoryview
    return memoryview(data)[start:end]


class _PrefixDecoder(ABC, Generic[FrameT]):
    """The shared state: the one frame that is split across reads."""

    __slots__ = ("_flag", "_limit", "_pending", "_size", "payload_bytes")

    _header: struct.Struct

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending = bytearray()
        """The partial header while ``_size < 0``, else the partial body."""
        self._size = -1
        """The body size announced by the current frame's header; -1 before it is complete."""
        self._flag = 0
        self.payload_bytes = 0
        """Payload bytes in the frames the last ``feed`` returned (for counters)."""

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete frame (header included) held for the next feed."""
        if self._size < 0:
            return len(self._pending)
        return self._header.size + len(self._pending)

    @abstractmethod
    def _parse_header(self, buffer: bytes | bytearray, pos: int) -> tuple[int, int]:
        """``(flag, size)`` of the header at ``buffer[pos:]``; FrameTooLarge past the limit."""

    @abstractmethod
    def _make(self, flag: int, payload: bytes) -> FrameT:
        """The frame as this decoder returns it."""

    def _resume(self, data: bytes, pos: int, frames: list[FrameT]) -> int:
        """Continue the incomplete frame with ``data[pos:]``.

        Appends the frame to ``frames`` if ``data`` completes it and returns the position just
        after it; returns ``len(data)`` when everything was consumed and the frame is still
        incomplete.
        """
        n = len(data)
        pending = self._pending
        if self._size < 0:
            header_size = self._header.size
            take = min(header_size - len(pending), n - pos)
            pending += data[pos : pos + take]
            pos += take
            if len(pending) < header_size:
                return n
            self._flag, self._size = self._parse_header(pending, 0)
            pending.clear()
        end = pos + self._size - len(pending)
        if end > n:
            pending += _tail(data, pos, n)
            return n
        if pending:
            pending += _tail(data, pos, end)
            payload = bytes(pending)
            pending.clear()
        else:
            payload = data[pos:end]
        frames.append(self._make(self._flag, payload))
        self._size = -1
        return end

    def close(self) -> list[FrameT]:
        """End of stream: [] after a whole frame, :class:`ProtocolError` inside one."""
        if self._size < 0 and not self._pending:
            return []
        have = self.buffered
        header_size = self._header.size
        known = self._size >= 0
        expected = str(header_size + self._size) if known else f"at least {header_size}"
        self._pending.clear()
        self._size = -1
        raise ProtocolError(f"truncated frame: {have} of {expected} bytes")


class LengthPrefixDecoder(_PrefixDecoder[bytes]):
    """Frames as a 4-byte big-endian unsigned length, then that many bytes of payload.

    Zero-length frames are legal and come out as ``b""``. :class:`FrameTooLarge` is raised as
    soon as a header announces more than ``max_frame_size`` bytes. :meth:`close` raises
    :class:`ProtocolError` ("truncated frame: N of M bytes") if the stream ends inside a
    frame, and resets the decoder.
    """

    __slots__ = ()

    _header = _LENGTH

    def __init__(self, max_frame_size: int = 1 << 20) -> None:
        super().__init__(check_limit("max_frame_size", max_frame_size))

    @property
    def max_frame_size(self) -> int:
        return self._limit

    def _parse_header(self, buffer: bytes | bytearray, pos: int) -> tuple[int, int]:
        (size,) = _LENGTH.unpack_from(buffer, pos)
        if size > self._limit:
            raise FrameTooLarge(size, self._limit)
        return 0, size

    def _make(self, flag: int, payload: bytes) -> bytes:
        return payload

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Return the frames that ``data`` completes, in order."""
        if type(data) is not bytes:
            data = bytes(data)
        before = self.buffered
        frames: list[bytes] = []
        n = len(data)
        pos = 0
        if self._size >= 0 or self._pending:
            pos = self._resume(data, 0, frames)
        unpack = _LENGTH.unpack_from
        limit = self._limit
        while pos + 4 <= n:
            (size,) = unpack(data, pos)
            if size > limit:
                raise FrameTooLarge(size, limit, frames)
            end = pos + 4 + size
            if end > n:
                break
            frames.append(data[pos + 4 : end])
            pos = end
        if pos < n:
            self._resume(data, pos, frames)
        # What was consumed, less the 4-byte headers: no per-frame sum.
        self.payload_bytes = before + n - self.buffered - 4 * len(frames)
        return frames

    def __repr__(self) -> str:
        return f"<LengthPrefixDecoder buffered={self.buffered} max_frame_size={self._limit}>"


class GrpcMessageDecoder(_PrefixDecoder[tuple[bool, bytes]]):
    """gRPC's length-prefixed message: a compressed-flag byte (0 or 1), a 4-byte big-endian
    length, then the message. ``feed`` returns ``(compressed, message)`` pairs.

    A flag byte other than 0 or 1 raises :class:`ProtocolError`; a length over
    ``max_message_size`` raises :class:`FrameTooLarge` before the body is buffered (the
    server answers RESOURCE_EXHAUSTED). :meth:`close` behaves as in
    :class:`LengthPrefixDecoder`.
    """

    __slots__ = ()

    _header = _GRPC

    def __init__(self, max_message_size: int = 4 << 20) -> None:
        super().__init__(check_limit("max_message_size", max_message_size))

    @property
    def max_message_size(self) -> int:
        return self._limit

    def _parse_header(self, buffer: bytes | bytearray, pos: int) -> tuple[int, int]:
        flag, size = _GRPC.unpack_from(buffer, pos)
        if flag > 1:
            raise ProtocolError(f"invalid gRPC compressed flag {flag} (must be 0 or 1)")
        if size > self._limit:
            raise FrameTooLarge(size, self._limit)
        return flag, size

    def _make(self, flag: int, payload: bytes) -> tuple[bool, bytes]:
        return flag == 1, payload

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[bool, bytes]]:
        """Return the ``(compressed, message)`` pairs that ``data`` completes, in order."""
        if type(data) is not bytes:
            data = bytes(data)
        frames: list[tuple[bool, bytes]] = []
        n = len(data)
        pos = 0
        if self._size >= 0 or self._pending:
            pos = self._resume(data, 0, frames)
        unpack = _GRPC.unpack_from
        limit = self._limit
        while pos + 5 <= n:
            flag, size = unpack(data, pos)
            if flag > 1:
                raise ProtocolError(f"invalid gRPC compressed flag {flag} (must be 0 or 1)")
            if size > limit:
                raise FrameTooLarge(size, limit, frames)
            end = pos + 5 + size
            if end > n:
                break
            frames.append((flag == 1, data[pos + 5 : end]))
            pos = end
        if pos < n:
            self._resume(data, pos, frames)
        return frames

    def __repr__(self) -> str:
        return f"<GrpcMessageDecoder buffered={self.buffered} max_message_size={self._limit}>"


def encode_length_prefixed(payloads: Iterable[bytes]) -> bytes:
    """Each payload as a 4-byte big-endian length and the payload, concatenated."""
    pack = _LENGTH.pack
    parts: list[bytes] = []
    for payload in payloads:
        size = len(payload)
        if size > _MAX_LENGTH:
            raise ValueError(f"a payload of {size} bytes does not fit a 4-byte length")
        parts += (pack(size), payload)
    return b"".join(parts)


def encode_grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message (the caller compresses ``payload`` if it says so)."""
    size = len(payload)
    if size > _MAX_LENGTH:
        raise ValueError(f"a message of {size} bytes does not fit a 4-byte length")
    return _GRPC.pack(1 if compressed else 0, size) + payload
