"""One gRPC call's state, sans-IO: its request messages, its flow-control accounting, its end.

:class:`Call` is fed the payload of each DATA frame by :class:`~._protocol.GrpcProtocol`,
splits it into gRPC messages (the 5-byte prefix, bounded by ``max_message_size``) and holds
the complete ones until the handler takes them. Flow control is the backpressure: bytes of
held messages are acknowledged to the client only when the handler comes back for more
(:meth:`Call.release`), so a handler blocked on a full queue keeps the stream's window closed.
Bytes of a message still being assembled are acknowledged at once (they are bounded by
``max_message_size``), so messages larger than the window still get through.

:class:`CompressedCall` (``grpc-encoding`` gzip or deflate) holds its messages as they came,
so the window still counts wire bytes, and inflates them when the handler takes them, never
past ``max_message_size`` of output. Identity calls never see that code.

Every byte a call holds (messages not taken, a partial message, an inflated batch in the
handler's hands) is charged to its connection (``GrpcProtocol.held``), which refuses the call
that would take it past ``GrpcProtocol.budget`` (``ServerLimits.connection_budget``, or less:
what the gateway's memory budget has room for; RESOURCE_EXHAUSTED, ``over_budget``). A call
holding part of a message is listed, with when that message began, in
``GrpcProtocol.partial``, so that the I/O layer can cut it if it takes too long.

No trio here: the handler-facing :class:`~._stream.GrpcStream` waits on a call and wakes when
the protocol reports it changed.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError

from ..._errors import FrameTooLarge, ProtocolError, TransportError
from ...codecs import GrpcMessageDecoder

if TYPE_CHECKING:
    from ._protocol import GrpcProtocol

__all__ = ("Call", "CallChanged", "CompressedCall", "StreamReset", "inflate_message")

PREFIX_SIZE = 5
"""gRPC's message prefix: a compressed flag byte and a 4-byte big-endian length."""
_PREFIX = struct.Struct(">BL")


class StreamReset(TransportError):
    """The client reset the stream (RST_STREAM) or the connection went away."""


class CallChanged:
    """Event: the call has new messages, ended, failed or was reset (see its attributes)."""

    __slots__ = ("call",)

    def __init__(self, call: Call) -> None:
        self.call = call

    def __repr__(self) -> str:
        return f"CallChanged(stream_id={self.call.stream_id})"


class Call:
    """The state of one call: what the client sent, what the server has answered.

    ``cancelled`` becomes true when the call is over for its handler (the client reset it,
    or its request broke a limit: ``error``); ``error`` is raised to the handler once the
    messages before it are taken.
    """

    __slots__ = (
        "_charged",
        "_decoder",
        "_held",
        "_in_partial",
        "_limit",
        "_proto",
        "_to_release",
        "_unacked",
        "cancelled",
        "changed",
        "ended",
        "error",
        "handler",
        "headers",
        "headers_sent",
        "message_sent",
        "messages",
        "path",
        "reset",
        "stream_id",
        "timeout",
        "trailers_sent",
    )

    def __init__(
        self,
        proto: GrpcProtocol,
        stream_id: int,
        path: str,
        headers: Sequence[tuple[str, str]],
        handler: Handler,
        timeout: float | None,
    ) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self.path = path
        self.headers = headers
        self.handler = handler
        self.timeout = timeout
        """Seconds from ``grpc-timeout``, or None."""
        self.changed = CallChanged(self)
        self._limit = proto.limits.max_message_size
        self._decoder = GrpcMessageDecoder(self._limit)
        self.messages: deque[bytes] = deque()
        self._held = 0  # wire bytes of complete messages not yet taken by the handler
        self._to_release = 0  # wire bytes taken, acknowledged when the handler asks again
        self._unacked = 0  # flow-controlled bytes received and not yet acknowledged
        self._charged = 0  # bytes charged to the connection (see the module docstring)
        self._in_partial = False
        self.ended = False
        self.reset = False
        self.cancelled = False
        self.error: GRPCError | None = None
        self.headers_sent = False
        self.trailers_sent = False
        self.message_sent = False

    @property
    def buffered(self) -> int:
        """Bytes held for this call: complete messages not taken, plus a partial one."""
        return self._held + self._decoder.buffered

    @property
    def ready(self) -> bool:
        """Whether a read would not wait: messages held, the end, an error or a reset."""
        return bool(self.messages) or self.ended or self.error is not None or self.reset

    # -- what the handler takes ------------------------------------------------------------

    def take_batch(self) -> list[bytes]:
        """Every held message, undecoded (the caller checked there is one)."""
        batch = list(self.messages)
        self.messages.clear()
        self._to_release += self._held
        self._held = 0
        self.recharge()
        return batch

    def pop(self) -> bytes:
        """The oldest held message, its bytes counted as ready to be released to the peer."""
        data = self.messages.popleft()
        size = len(data) + PREFIX_SIZE
        self._held -= size
        self._to_release += size
        self.recharge()
        return data

    def decode(self, data: bytes) -> Any:
        """Parse one message of the request type; INVALID_ARGUMENT if it is not valid."""
        try:
            return self.handler.request_type.FromString(data)
        except DecodeError as exc:
            self._proto.reject("malformed")
            raise GRPCError(Status.INVALID_ARGUMENT, "invalid protobuf message") from exc

    def release(self) -> bool:
        """Hand consumed bytes back to the client's window, in bulk: when the handler has
        taken everything buffered (it is about to wait), or a quarter window has piled up.
        True if a WINDOW_UPDATE may have been queued."""
        if self._to_release and (
            not self.messages or self._to_release >= self._proto.release_threshold
        ):
            self._to_release = 0
            surplus = self._unacked - self._held
            if surplus > 0:
                self._ack(surplus)
                return True
        return False

    def release_all(self) -> bool:
        """The handler is done: every byte received goes back to the client's window.
        True if a WINDOW_UPDATE may have been queued."""
        self._to_release = 0
        if self._unacked > 0:
            self._ack(self._unacked)
            return True
        return False

    def recharge(self) -> None:
        """Charge the connection with what the call holds now."""
        charge = self._held + self._decoder.buffered
        self._proto.held += charge - self._charged
        self._charged = charge

    def discharge(self) -> None:
        """The call holds nothing more: its charge and its partial message are forgotten."""
        self._proto.held -= self._charged
        self._charged = 0
        if self._in_partial:
            self._in_partial = False
            del self._proto.partial[self]

    # -- fed by the protocol ---------------------------------------------------------------

    _whole_messages_fast = True
    """Whether :meth:`feed` may take a frame holding exactly one plain message as is."""

    def feed(self, data: bytes, flow_len: int) -> bool:
        """One DATA frame's payload (``flow_len`` counts its padding too); True if the call
        changed (messages completed, or the call failed)."""
        proto = self._proto
        if self.error is not None or self.reset:
            proto.acknowledge(self.stream_id, flow_len)
            return False
        self._unacked += flow_len
        size = len(data)
        # the fast path: a DATA frame carrying one whole plain message, as grpc clients send
        # it, and no partial message before it (the decoder is empty iff not _in_partial)
        if not self._in_partial and size >= PREFIX_SIZE and self._whole_messages_fast:
            flag, length = _PREFIX.unpack_from(data)
            if not flag and length == size - PREFIX_SIZE and length <= self._limit:
                self.messages.append(data[PREFIX_SIZE:])
                self._held += size
                surplus = self._unacked - self._held - self._to_release
                if surplus > 0:  # padding
                    self._ack(surplus)
                proto.held += size
                self._charged += size
                if proto.held > proto.budget:
                    proto.over_budget(self)
                return True
        decoder = self._decoder
        try:
            frames = decoder.feed(data)
        except FrameTooLarge as exc:
            proto.reject("oversize")
            self.fail(GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)))
            return True
        except ProtocolError as exc:
            proto.reject("malformed")
            self.fail(GRPCError(Status.INTERNAL, str(exc)))
            return True
        if frames and not self._hold(frames):
            return True
        partial = decoder.buffered
        if partial:
            if not self._in_partial:
                self._in_partial = True
                proto.partial[self] = proto.clock()
        elif self._in_partial:
            self._in_partial = False
            del proto.partial[self]
        surplus = self._unacked - self._held - self._to_release
        if surplus > 0:
            # padding and the part of a message still being assembled: bounded, so let it in
            self._ack(surplus)
        charge = self._held + partial
        proto.held += charge - self._charged
        self._charged = charge
        if proto.held > proto.budget:
            proto.over_budget(self)
            return True
        return bool(frames)

    def _hold(self, frames: list[tuple[bool, bytes]]) -> bool:
        """Keep a DATA frame's decoded messages for the handler; False if one failed the
        call (here: a compressed message on a call without an encoding)."""
        messages = self.messages
        held = PREFIX_SIZE * len(frames)
        for compressed, payload in frames:
            if compressed:
                self.fail(GRPCError(Status.INTERNAL, "compressed message, no grpc-encoding"))
                return False
            messages.append(payload)
            held += len(payload)
        self._held += held
        return True

    def fail(self, error: GRPCError) -> None:
        """The request broke a limit: drop what is held, cancel the handler."""
        self.error = error
        self.messages.clear()
        self._held = 0
        self._decoder = GrpcMessageDecoder(self._decoder.max_message_size)
        self.cancelled = True
        self.release_all()
        self.discharge()

    def end(self) -> None:
        """The client ended its side (END_STREAM)."""
        if self._decoder.buffered and self.error is None:
            # The stream ended inside a message: the complete ones before it are still handed
            # over, then the call fails (INTERNAL, as grpc-go and grpc-java answer).
            self._proto.reject("truncated")
            self.error = GRPCError(Status.INTERNAL, "the stream ended inside a message")
            self._drop_partial()
        self.ended = True

    def _drop_partial(self) -> None:
        self._decoder = GrpcMessageDecoder(self._decoder.max_message_size)
        self.recharge()
        if self._in_partial:
            self._in_partial = False
            del self._proto.partial[self]

    def on_reset(self) -> None:
        """The client reset the stream, or the connection went away: what the call holds is
        dropped (the handler is cancelled) and its bytes go back to the connection window."""
        self.reset = True
        self.cancelled = True
        self.messages.clear()
        self._held = 0
        self._drop_partial()
        self.release_all()

    def _ack(self, size: int) -> None:
        self._unacked -= size
        self._proto.acknowledge(self.stream_id, size)


_GZIP_MIN = 18
"""The shortest gzip stream: a 10-byte header and an 8-byte trailer (CRC32, ISIZE)."""


def gzip_claims(data: bytes, wbits: int) -> int | None:
    """What a gzip message says it inflates to (its trailer's ISIZE), or None (deflate, or
    too short to be gzip). A claim, not a fact: a corrupt or lying stream says anything."""
    if wbits > zlib.MAX_WBITS and len(data) >= _GZIP_MIN:
        return int.from_bytes(data[-4:], "little")
    return None


def inflate_message(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress one message (``wbits`` as for :func:`zlib.decompressobj`), never producing
    more than ``limit`` bytes: :class:`FrameTooLarge` past it, :class:`ProtocolError` if the
    data is not one complete stream in that format. zlib never produces more than ``limit``,
    so a bomb costs at most about twice ``limit`` (its output blocks are joined at the end)
    whatever it claims to inflate to."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit)
        # At the limit with input or zlib's own output still pending, one more byte of
        # output is one too many (the input left may also be just the gzip trailer).
        if (
            len(out) == limit
            and not inflater.eof
            and inflater.decompress(inflater.unconsumed_tail, 1)
        ):
            raise FrameTooLarge(limit + 1, limit)
    except zlib.error as exc:
        raise ProtocolError(f"corrupt compressed message: {exc}") from exc
    if not inflater.eof:
        raise ProtocolError("truncated compressed message")
    if inflater.unused_data:
        raise ProtocolError("data after the end of the compressed message")
    return out


class CompressedCall(Call):
    """A call whose client set ``grpc-encoding`` to gzip or deflate.

    Messages are kept as they arrived, each with its compressed flag (a message whose flag
    is 0 is plain, even here), so the flow-control accounting is in wire bytes as for any
    call. They are inflated when the handler takes them: :meth:`take_batch` inflates until
    the batch holds a stream window's worth of output (the rest waits for the next call),
    so a window of small compressed messages never becomes a window times the inflation
    ratio in memory. A message that inflates past ``max_message_size`` ends the call
    RESOURCE_EXHAUSTED (``oversize``); a corrupt one INTERNAL (``malformed``). Messages
    before the bad one are handed over first.
    """

    __slots__ = ("_flags", "_inflated", "_wbits")

    _whole_messages_fast = False

    def __init__(
        self,
        proto: GrpcProtocol,
        stream_id: int,
        path: str,
        headers: Sequence[tuple[str, str]],
        handler: Handler,
        timeout: float | None,
        wbits: int,
    ) -> None:
        super().__init__(proto, stream_id, path, headers, handler, timeout)
        self._wbits = wbits
        self._flags: deque[bool] = deque()
        self._inflated = 0  # bytes of the last batch inflated, charged until the next read

    def recharge(self) -> None:
        charge = self._held + self._decoder.buffered + self._inflated
        self._proto.held += charge - self._charged
        self._charged = charge

    def release(self) -> bool:
        if self._inflated:
            self._inflated = 0
            self.recharge()
        return super().release()

    def take_batch(self) -> list[bytes]:
        messages = self.messages
        budget = self._proto.limits.stream_window
        batch: list[bytes] = []
        out = 0
        while messages and out < budget:
            try:
                data = self.pop()
            except GRPCError:
                if not batch:
                    raise
                break  # the next read raises it, after this good prefix
            batch.append(data)
            out += len(data)
        return batch

    def pop(self) -> bytes:
        data = super().pop()
        if self._flags.popleft():
            data = self._inflate(data)
        return data

    def _inflate(self, data: bytes) -> bytes:
        """One message inflated, within ``max_message_size`` and what is left of the
        connection's budget; on failure the call is over: every message still held is
        dropped (its bytes released) and the error is returned to any later read."""
        proto = self._proto
        limit = self._decoder.max_message_size
        room = proto.budget - proto.held
        refused_at = proto.inflate_refused_at
        try:
            claimed = gzip_claims(data, self._wbits) if room < limit else None
            if (
                room <= 0
                or (refused_at is not None and room <= refused_at)
                or (claimed is not None and claimed > room)
            ):
                # (zlib reads a max_length of 0 as "no limit"); no more room than when a
                # message last failed for want of it, or a gzip trailer that says it will
                # not fit: refused for want of room without the inflating (under pressure,
                # a corrupt stream's trailer may be taken at its word: over_budget either way)
                raise FrameTooLarge(len(data), max(room, 0))
            out = inflate_message(data, self._wbits, min(limit, room))
        except FrameTooLarge as exc:
            if room < limit:
                proto.inflate_refused_at = room
                reason, error = "over_budget", proto.budget_error()
            else:
                reason, error = (
                    "oversize",
                    GRPCError(
                        Status.RESOURCE_EXHAUSTED,
                        f"message inflates past the limit of {exc.limit} bytes",
                    ),
                )
        except ProtocolError as exc:
            reason, error = "malformed", GRPCError(Status.INTERNAL, str(exc))
        else:
            self._inflated += len(out)
            self.recharge()
            return out
        proto.reject(reason)
        self.error = error
        self.messages.clear()
        self._flags.clear()
        self._to_release += self._held
        self._held = 0
        self.recharge()
        raise error

    def _hold(self, frames: list[tuple[bool, bytes]]) -> bool:
        """Keep the messages as they arrived, each with its compressed flag: they are inflated
        when the handler takes them."""
        messages, flags = self.messages, self._flags
        held = PREFIX_SIZE * len(frames)
        for compressed, payload in frames:
            messages.append(payload)
            flags.append(compressed)
            held += len(payload)
        self._held += held
        return True

    def fail(self, error: GRPCError) -> None:
        self._flags.clear()
        self._inflated = 0
        super().fail(error)

    def on_reset(self) -> None:
        self._flags.clear()
        self._inflated = 0
        super().on_reset()
