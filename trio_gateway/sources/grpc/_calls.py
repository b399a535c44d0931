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

No trio here: the handler-facing :class:`~._stream.GrpcStream` waits on a call and wakes when
the protocol reports it changed.
"""

from __future__ import annotations

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
        "_decoder",
        "_held",
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
        self._decoder = GrpcMessageDecoder(proto.limits.max_message_size)
        self.messages: deque[bytes] = deque()
        self._held = 0  # wire bytes of complete messages not yet taken by the handler
        self._to_release = 0  # wire bytes taken, acknowledged when the handler asks again
        self._unacked = 0  # flow-controlled bytes received and not yet acknowledged
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
        return batch

    def pop(self) -> bytes:
        """The oldest held message, its bytes counted as ready to be released to the peer."""
        data = self.messages.popleft()
        size = len(data) + PREFIX_SIZE
        self._held -= size
        self._to_release += size
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

    # -- fed by the protocol ---------------------------------------------------------------

    def feed(self, data: bytes, flow_len: int) -> bool:
        """One DATA frame's payload (``flow_len`` counts its padding too); True if the call
        changed (messages completed, or the call failed)."""
        if self.error is not None or self.reset:
            self._proto.acknowledge(self.stream_id, flow_len)
            return False
        self._unacked += flow_len
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            self._proto.reject("oversize")
            self.fail(GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)))
            return True
        except ProtocolError as exc:
            self._proto.reject("malformed")
            self.fail(GRPCError(Status.INTERNAL, str(exc)))
            return True
        if frames and not self._hold(frames):
            return True
        surplus = self._unacked - self._held - self._to_release
        if surplus > 0:
            # padding and the part of a message still being assembled: bounded, so let it in
            self._ack(surplus)
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
        self.cancelled = True
        self.release_all()

    def end(self) -> None:
        """The client ended its side (END_STREAM)."""
        if self._decoder.buffered and self.error is None:
            # The stream ended inside a message: the complete ones before it are still handed
            # over, then the call fails (INTERNAL, as grpc-go and grpc-java answer).
            self._proto.reject("truncated")
            self.error = GRPCError(Status.INTERNAL, "the stream ended inside a message")
        self.ended = True

    def on_reset(self) -> None:
        """The client reset the stream, or the connection went away."""
        self.reset = True
        self.cancelled = True

    def _ack(self, size: int) -> None:
        self._unacked -= size
        self._proto.acknowledge(self.stream_id, size)


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

    __slots__ = ("_flags", "_wbits")

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
        """One message inflated; on failure the call is over: every message still held is
        dropped (its bytes released) and the error is returned to any later read."""
        try:
            return inflate_message(data, self._wbits, self._decoder.max_message_size)
        except FrameTooLarge as exc:
            reason, error = (
                "oversize",
                GRPCError(
                    Status.RESOURCE_EXHAUSTED,
                    f"message inflates past the limit of {exc.limit} bytes",
                ),
            )
        except ProtocolError as exc:
            reason, error = "malformed", GRPCError(Status.INTERNAL, str(exc))
        self._proto.reject(reason)
        self.error = error
        self.messages.clear()
        self._flags.clear()
        self._to_release += self._held
        self._held = 0
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
        super().fail(error)
