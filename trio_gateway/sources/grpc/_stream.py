"""GrpcStream: one call as its handler sees it (grpclib's ``Stream`` API plus a batch API).

The call's state (messages, flow control, compression, trailers sent or not) is a sans-IO
:class:`~._calls.Call`; this wraps it with what needs Trio: the cancel scope the handler runs
in (deadline from ``grpc-timeout``, cancelled by the client's RST_STREAM or a broken limit),
waiting for messages, and waiting for the client's window to send.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio
from grpclib.const import Cardinality, Status
from grpclib.metadata import Deadline, decode_metadata

from ..._wire import IDEMPOTENCY_KEY
from ._calls import Call, StreamReset
from ._protocol import header_value

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ("GrpcStream",)


class GrpcStream:
    """One call, as its handler sees it.

    Duck-types :class:`grpclib.server.Stream` (``recv_message``, ``async for``,
    ``send_message``, ``send_initial_metadata``, ``send_trailing_metadata``, ``metadata``,
    ``deadline``, ``peer``, ``user_agent``), so grpclib-generated ``*Base`` handlers run
    unchanged, and adds the batch API the gateway's services use: :meth:`recv_batch` and
    :meth:`send_messages`. ``peer`` is a ``host:port`` string.
    """

    __slots__ = ("_call", "_conn", "_readable", "cancel_scope", "deadline", "peer", "stream_id")

    def __init__(self, conn: Connection, call: Call) -> None:
        self._conn = conn
        self._call = call
        self.stream_id = call.stream_id
        self.peer = conn.peer
        timeout = call.timeout
        self.deadline = None if timeout is None else Deadline.from_timeout(timeout)
        self.cancel_scope = trio.CancelScope()
        if timeout is not None:
            self.cancel_scope.deadline = trio.current_time() + timeout
        self._readable: trio.Event | None = None

    @property
    def message_sent(self) -> bool:
        """Whether a reply has been sent."""
        return self._call.message_sent

    # -- what a handler reads ---------------------------------------------------------------

    @property
    def metadata(self) -> Any:
        """The request's custom metadata (a ``multidict.MultiDict``, as in grpclib)."""
        return decode_metadata(self._call.headers)

    @property
    def idempotency_key(self) -> str | None:
        """The raw ``idempotency-key`` metadata (the sender's message id), or None."""
        return header_value(self._call.headers, IDEMPOTENCY_KEY)

    @property
    def user_agent(self) -> str | None:
        return header_value(self._call.headers, "user-agent")

    @property
    def cardinality(self) -> Cardinality:
        return self._call.handler.cardinality  # type: ignore[no-any-return]

    async def recv_batch(self) -> list[bytes]:
        """Every complete message received so far, undecoded; ``[]`` once the client is done.

        Waits only when nothing is buffered, so a fast stream costs no checkpoint per
        message. The bytes of the previous batch are handed back to the client's flow-control
        window now: calling this again means the handler is done with them. A compressed call
        inflates at most a stream window's worth of output per batch.
        """
        call = self._call
        if call.release():
            self._conn.emit()
        if not call.messages and not await self._wait_messages():
            return []
        conn = self._conn
        conn.settle()  # a compressed batch is inflated within what the budget has room for
        batch = call.take_batch()
        conn.settle()  # the handler's now; its bytes stay out of the window until queued
        return batch

    async def recv_message(self) -> Any:
        """The next message decoded as the method's request type; ``None`` at the end."""
        call = self._call
        if call.release():
            self._conn.emit()
        if not call.messages and not await self._wait_messages():
            return None
        conn = self._conn
        conn.settle()
        data = call.pop()
        conn.settle()
        return call.decode(data)

    def decode(self, data: bytes) -> Any:
        """Parse one message of the request type; INVALID_ARGUMENT if it is not valid."""
        return self._call.decode(data)

    def __aiter__(self) -> GrpcStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    async def _wait_messages(self) -> bool:
        """Wait until a message is held (True) or the client is done (False); raises the
        call's error or :class:`StreamReset` once the messages before it are taken."""
        call = self._call
        while not call.messages:
            await self._wait_readable()
            if call.ended and not call.messages:
                return False
        return True

    async def _wait_readable(self) -> None:
        call = self._call
        if call.error is not None:
            raise call.error
        if call.reset:
            raise StreamReset(f"stream {self.stream_id} was reset by the client")
        if call.ended:
            return
        self._readable = event = trio.Event()
        await event.wait()
        if call.error is not None and not call.messages:  # complete messages come first
            raise call.error
        if call.reset:
            raise StreamReset(f"stream {self.stream_id} was reset by the client")

    def _changed(self) -> None:
        """The protocol reported the call changed: cancel the handler if the call is over for
        it, and wake a waiting read."""
        if self._call.cancelled:
            self.cancel_scope.cancel()
        event = self._readable
        if event is not None:
            self._readable = None
            event.set()

    def hold_answers(self, n: int) -> bool:
        """Charge ``n`` bytes the handler holds for answers it owes to the connection's share
        of the memory budget; False if there is no room (:meth:`Connection.hold_answers`)."""
        return self._conn.hold_answers(n)

    def release_answers(self, n: int) -> None:
        self._conn.release_answers(n)

    # -- what a handler writes --------------------------------------------------------------

    async def send_initial_metadata(self, *, metadata: Any = None) -> None:
        if self._call.headers_sent:
            raise ValueError("initial metadata was already sent")
        self._check_open()
        self._conn.proto.send_headers(self._call, metadata)
        self._conn.emit()

    async def send_message(self, message: Any) -> None:
        """Send one reply (waits while the client's flow-control window is closed)."""
        await self.send_messages((message,))

    async def send_messages(self, messages: Iterable[Any]) -> None:
        """Send several replies in as few DATA frames as the client's window allows."""
        call = self._call
        reply_type = call.handler.reply_type
        parts = []
        for message in messages:
            if not isinstance(message, reply_type):
                raise TypeError(f"reply must be {reply_type.__name__}, not {type(message)!r}")
            body = message.SerializeToString()
            parts.append(len(body).to_bytes(5, "big"))  # compressed flag 0, length
            parts.append(body)
        if not parts:
            return
        if call.trailers_sent:
            raise ValueError("the call is already finished")
        if not call.headers_sent:
            await self.send_initial_metadata()
        await self._conn.send_data(self, b"".join(parts))
        call.message_sent = True

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: Any = None,
        metadata: Any = None,
    ) -> None:
        self.finish(status, status_message, metadata)

    async def cancel(self) -> None:
        self.cancel_scope.cancel()

    def finish(self, status: Status, message: str | None = None, metadata: Any = None) -> None:
        """Send the trailers (or a trailers-only response); the call is over for the client."""
        self._conn.proto.finish(self._call, status, message, metadata)
        self._conn.emit()

    def _check_open(self) -> None:
        if self._call.reset:
            raise StreamReset(f"stream {self.stream_id} was reset by the client")
