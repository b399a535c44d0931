"""One HTTP/1.1 server connection: h11 driven directly on a Trio stream, every read bounded.

Used by the HTTP source's HTTP/1.1 path and by the admin endpoint, which differ only in what
they answer. :class:`H11Server` reads a request's head (at most ``max_header_size`` bytes,
whether it trickles in or arrives whole) and its body (at most a caller's limit), each by an
absolute deadline that bytes trickling in never push back (slowloris), and writes each
response in one ``send_all``. Bad HTTP is translated once, here, into :class:`BadRequest`
carrying the status to answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from http import HTTPStatus

import h11
import trio

from ._errors import ProtocolError

__all__ = ("BadRequest", "BodyTooLarge", "H11Server", "RequestTooSlow")

READ_SIZE = 64 * 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
HeaderList = Sequence[tuple[bytes, bytes]]


class BadRequest(ProtocolError):
    """The peer sent something that is not acceptable HTTP/1.1; answer ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLarge(ProtocolError):
    """The request body grew past the caller's limit (the rest is not read)."""


class RequestTooSlow(ProtocolError):
    """A request had begun and was not complete by its deadline."""


def reason_phrase(status: int) -> bytes:
    """``404`` -> ``b"Not Found"`` (empty for a code HTTP does not name)."""
    return _REASONS.get(status, b"")


class H11Server:
    """The server side of one HTTP/1.1 connection over ``stream``.

    ``received`` is what was already read from the stream (to route the connection). The
    cycle: :meth:`receive_request`, then :meth:`receive_body` (or not: a response may be sent
    with the body unread, and the connection then closes), :meth:`respond`, and
    :meth:`next_cycle` for keep-alive.
    """

    def __init__(
        self, stream: trio.abc.Stream, *, max_header_size: int, received: bytes = b""
    ) -> None:
        self.stream = stream
        self.max_header_size = max_header_size
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        if received:
            self.conn.receive_data(received)

    @property
    def can_respond(self) -> bool:
        """Whether a response may still be sent for the current request."""
        return self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def body_pending(self) -> bool:
        """Whether the request's body (or its end) has not been read."""
        return self.conn.their_state is h11.SEND_BODY

    async def _next_event(self, deadline: float) -> object:
        """The next h11 event; raises :class:`RequestTooSlow` at the deadline if a request had
        begun; ``None`` at the deadline between requests."""
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadRequest(str(exc), exc.error_status_hint) from exc
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline):
                conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
                continue
            if conn.their_state is not h11.IDLE or conn.trailing_data[0]:
                raise RequestTooSlow("request not complete by its deadline")
            return None

    async def receive_request(self, deadline: float) -> h11.Request | None:
        """The next request's head; ``None`` when the peer closed, or sent nothing more by
        ``deadline``. Raises :class:`RequestTooSlow` (begun, not complete by ``deadline``) or
        :class:`BadRequest` (``431`` for a head over ``max_header_size``)."""
        event = await self._next_event(deadline)
        if event is None or isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        # h11 bounds a head that arrives in pieces; one that arrives whole is checked here.
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers.raw_items())
        if size > self.max_header_size:
            raise BadRequest("request header fields too large", 431)
        return event

    async def receive_body(self, max_size: int, deadline: float) -> bytes:
        """The whole body of the current request (``100 Continue`` first if the client waits
        for it). Raises :class:`BodyTooLarge` past ``max_size`` bytes,
        :class:`RequestTooSlow` at ``deadline`` and :class:`BadRequest` if the peer closes
        before the end."""
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            interim = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            await self.stream.send_all(interim or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_size:
                    raise BodyTooLarge(f"body over {max_size} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is None:  # pragma: no cover - a body has begun: _next_event raises
                raise RequestTooSlow("request not complete by its deadline")
            else:
                raise BadRequest("connection closed inside the request body")
        # h11 hands over bytearrays: a payload is immutable bytes
        return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)

    def skip_buffered_body(self) -> None:
        """Discard the body bytes already received, without reading more: a small body that
        came with the head then leaves the connection reusable."""
        conn = self.conn
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return  # answered anyway; the connection closes after the response
            if event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
                return

    async def respond(
        self,
        status: int,
        headers: HeaderList,
        body: bytes,
        *,
        close: bool = False,
        head_only: bool = False,
        deadline: float = math.inf,
    ) -> bool:
        """Send one complete response in one write. ``headers`` should hold its
        ``Content-Length`` (without it, h11 sends the body chunked). ``Connection: close`` is
        added with ``close`` or when the request's body was not read (the connection cannot be
        reused then). ``head_only`` (a ``HEAD`` request) leaves the body out. Returns False if
        the write did not finish by ``deadline``."""
        conn = self.conn
        out_headers = list(headers)
        if close or conn.their_state is not h11.DONE:
            out_headers.append((b"connection", b"close"))
        response = h11.Response(
            status_code=status, headers=out_headers, reason=_REASONS.get(status, b"")
        )
        out = conn.send(response) or b""
        if not head_only and body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        if deadline == math.inf:  # no cancel scope to set up on the hot path
            await self.stream.send_all(out)
            return True
        with trio.move_on_at(deadline):
            await self.stream.send_all(out)
            return True
        return False

    def next_cycle(self) -> bool:
        """Get ready for the next request on this connection; False if it must close."""
        conn = self.conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        return True
