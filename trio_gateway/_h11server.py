"""One HTTP/1.1 server connection on a Trio stream, every read bounded.

Used by the HTTP source's HTTP/1.1 path and by the admin endpoint, which differ only in what
they answer. :class:`H11Server` drives :class:`~._http1.RequestParser` (sans-IO, llhttp
through ``httptools``) on the stream: it reads a request's head (at most ``max_header_size``
bytes, whether it trickles in or arrives whole) and its body (at most a caller's limit), each
by an absolute deadline that bytes trickling in never push back (slowloris), and writes each
response in one write. Bad HTTP is raised as :class:`BadRequest` carrying the status to
answer. A request whose bytes are already buffered (pipelined, or a body that came with its
head) costs no read and no cancel scope.

A plain TCP connection (a :class:`trio.SocketStream`, on POSIX) is read and written with
non-blocking ``os.read``/``os.write`` on its socket: :class:`trio.SocketStream` follows every
call that succeeds at once with a trip through the scheduler, three per request of a client
that writes the head and the body separately, about a third of the server's time per request.
Here a connection waits only when its socket is not ready, and one that served
:data:`_UNWAITED` requests in a row without waiting yields (a pipelining client cannot
starve the others).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Sequence
from http import HTTPStatus

import trio

from ._errors import ProtocolError
from ._http1 import BadRequest, BodyTooLarge, Request, RequestParser

__all__ = ("BadRequest", "BodyTooLarge", "H11Server", "Request", "RequestTooSlow")

READ_SIZE = 64 * 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY = frozenset({204, 304})
_POSIX = os.name == "posix"
_UNWAITED = 16
"""Requests a connection may serve in a row without waiting before it yields to the others
(a keep-alive client often has its next request in before the answer to the last is out)."""
_ENCODED = 8
"""Responses a connection keeps encoded (see :meth:`H11Server.respond`)."""
_MISSES = 2
"""Reads in a row that found nothing after a response before a connection waits first."""
_RETRY = 8
"""How often (in requests) such a connection tries a read first again."""
HeaderList = Sequence[tuple[bytes, bytes]]


class RequestTooSlow(ProtocolError):
    """A request had begun and was not complete by its deadline."""


def reason_phrase(status: int) -> bytes:
    """``404`` -> ``b"Not Found"`` (empty for a code HTTP does not name)."""
    return _REASONS.get(status, b"")


def encode_response(
    status: int, headers: HeaderList, body: bytes, close: bool, head_only: bool = False
) -> bytes:
    """One response's bytes: ``Content-Length`` added unless ``headers`` hold it (or the
    status has no body), ``Connection: close`` with ``close``, the body unless ``head_only``."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
    length = status in _NO_BODY
    for name, value in headers:
        out.append(b"%s: %s\r\n" % (name, value))
        length = length or name.lower() == b"content-length"
    if not length:
        out.append(b"content-length: %d\r\n" % len(body))
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    if body and not head_only:
        out.append(body)
    return b"".join(out)


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
        self.parser = RequestParser(max_header_size=max_header_size)
        if received:
            self.parser.receive_data(received)
        self._responded = False
        self._continued = False
        self._must_close = False
        self._unwaited = 0  # requests served since this connection last waited or yielded
        self._misses = 0  # reads in a row that found nothing right after a response
        self._socket = stream.socket if type(stream) is trio.SocketStream and _POSIX else None
        self._fd = self._socket.fileno() if self._socket is not None else -1
        self._encoded: dict[int, tuple[HeaderList, bytes, int, bytes]] = {}
        self._timer: trio.CancelScope | None = None  # see read_deadlines
        self._now = trio.current_time

    @property
    def can_respond(self) -> bool:
        """Whether a response may still be sent for the current request."""
        return not self._responded

    @property
    def body_pending(self) -> bool:
        """Whether the request's body (or its end) has not been read."""
        return self.parser.request is not None and not self.parser.complete

    @contextlib.contextmanager
    def read_deadlines(self) -> Iterator[trio.CancelScope]:
        """Enforce every read's deadline with this one cancel scope, for as long as the
        connection is served inside the ``with`` block.

        A cancel scope per wait costs about 10 us of CPU (as much as the rest of a request's
        wait for its socket): here a wait only moves the scope's deadline to the request's
        (once per request that waits) and the other waits put it off (:meth:`disarm`). A read
        still waiting at its deadline is cancelled, which ends the ``with`` block
        (``cancelled_caught``): the caller then answers or closes, as it would on
        :class:`RequestTooSlow` or ``None`` outside the block. The caller must :meth:`disarm`
        before its own waits inside the block (the ones of this class do it themselves)."""
        self._now = trio.lowlevel.current_clock().current_time
        with trio.CancelScope() as timer:
            self._timer = timer
            try:
                yield timer
            finally:
                self._timer = None

    def disarm(self) -> None:
        """No read deadline until the next read waits (see :meth:`read_deadlines`)."""
        timer = self._timer
        if timer is not None and timer.deadline != math.inf:
            timer.deadline = math.inf

    def _read_nowait(self) -> bool:
        """Read what the socket holds into the parser, without waiting; False if nothing."""
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc!r}") from exc
        self.parser.receive_data(data)
        return True

    async def _wait_readable(self, deadline: float) -> bool:
        """Wait until the socket has bytes; False at ``deadline`` (inside
        :meth:`read_deadlines`: cancelled instead)."""
        self._unwaited = 0
        timer = self._timer
        if timer is None:
            with trio.CancelScope(deadline=deadline):
                await trio.lowlevel.wait_readable(self._fd)
                return True
            return False
        if timer.deadline != deadline:
            timer.deadline = deadline
        await trio.lowlevel.wait_readable(self._fd)
        if self._now() >= deadline:  # it came as the bytes did: cancelled here
            await trio.lowlevel.checkpoint()
        return True

    async def _receive_next(self, deadline: float) -> bool:
        """The first bytes of the next request (nothing buffered); False at ``deadline``.

        Most keep-alive clients send a request once they have read the previous answer, so a
        read right after it often finds nothing (a failed system call, then the wait). After
        :data:`_MISSES` such reads in a row the connection waits for its socket first, with
        a read first again every :data:`_RETRY` requests to notice a client that keeps up."""
        misses = self._misses = self._misses + 1
        if misses > _MISSES and misses % _RETRY == 0 and self._read_nowait():
            self._misses = 0
            return True
        while True:
            if not await self._wait_readable(deadline):
                return False
            if self._read_nowait():
                return True

    async def _receive(self, deadline: float) -> bool:
        """Read once into the parser; False if nothing came by ``deadline`` (inside
        :meth:`read_deadlines`: cancelled instead)."""
        if self._socket is not None:
            while not self._read_nowait():
                if not await self._wait_readable(deadline):
                    return False
            return True
        timer = self._timer
        if timer is None:
            with trio.CancelScope(deadline=deadline):
                self.parser.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
                return True
            return False
        if timer.deadline != deadline:
            timer.deadline = deadline
        self.parser.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
        return True

    def _write_nowait(self, data: bytes | memoryview) -> int:
        """Write what the socket takes now; how many bytes."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc!r}") from exc

    async def _send(self, data: bytes, sent: int = 0) -> None:
        """Write all of ``data`` from ``sent`` on (what a write has taken already)."""
        if self._socket is None:
            self.disarm()
            await self.stream.send_all(data)
            return
        with memoryview(data) as view:
            while sent < len(data):
                written = self._write_nowait(view[sent:])
                if not written:
                    self._unwaited = 0
                    self.disarm()
                    await trio.lowlevel.wait_writable(self._fd)
                sent += written

    async def receive_request(self, deadline: float) -> Request | None:
        """The next request's head; ``None`` when the peer closed, or sent nothing more by
        ``deadline``. Raises :class:`RequestTooSlow` (begun, not complete by ``deadline``) or
        :class:`BadRequest` (``431`` for a head over ``max_header_size``)."""
        parser = self.parser
        if self._socket is not None:  # (a stream's calls are checkpoints)
            self._unwaited += 1
            if self._unwaited > _UNWAITED:
                self._unwaited = 0
                self.disarm()
                await trio.lowlevel.checkpoint()
        while True:
            if parser.buffered or parser.eof or self._socket is None:
                request = parser.head()
                if request is not None:
                    return request
                if parser.eof:
                    return None
                if await self._receive(deadline):
                    continue
            elif self._misses < _MISSES and self._read_nowait():
                self._misses = 0
                continue  # (after a response, nothing is buffered: read before parsing)
            elif await self._receive_next(deadline):
                continue
            if parser.started:
                raise RequestTooSlow("request not complete by its deadline")
            return None

    async def receive_body(self, max_size: int, deadline: float) -> bytes:
        """The whole body of the current request (``100 Continue`` first if the client waits
        for it). Raises :class:`BodyTooLarge` past ``max_size`` bytes,
        :class:`RequestTooSlow` at ``deadline`` and :class:`BadRequest` if the peer closes
        before the end."""
        parser = self.parser
        if parser.expects_continue and not (self._continued or parser.buffered or parser.complete):
            self._continued = True
            await self._send(_CONTINUE)
        try:
            while not parser.body(max_size):
                if not await self._receive(deadline):
                    raise RequestTooSlow("request not complete by its deadline")
        except BodyTooLarge:
            self._must_close = True  # the rest of it is not read
            raise
        return parser.take_body()

    def skip_buffered_body(self) -> None:
        """Discard the body bytes already received, without reading more: a small body that
        came with the head then leaves the connection reusable."""
        try:
            self.parser.body(sys.maxsize)
        except ProtocolError:
            self._must_close = True  # answered anyway; the connection closes after it
        self.parser.take_body()

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
        """Send one complete response in one write. ``Content-Length`` is added unless
        ``headers`` hold it. ``Connection: close`` is added with ``close``, when the request's
        body was not read (the connection cannot be reused then) or the client asked to
        close. ``head_only`` (a ``HEAD`` request) leaves the body out. Returns False if the
        write did not finish by ``deadline``."""
        data = self._encode(status, headers, body, close, head_only)
        sent = self._write_nowait(data) if self._socket is not None else 0
        if sent == len(data):
            return True  # (the usual case: no await, no cancel scope)
        if deadline == math.inf:
            await self._send(data, sent)
            return True
        with trio.CancelScope(deadline=deadline):
            await self._send(data, sent)
            return True
        return False

    def _encode(
        self, status: int, headers: HeaderList, body: bytes, close: bool, head_only: bool
    ) -> bytes:
        """The response's bytes, and the connection marked to close if it must."""
        parser = self.parser
        self._responded = True
        if close or not parser.complete or not parser.keep_alive:
            self._must_close = True
        # A server answers the same few responses again and again (the same headers object):
        # a keep-alive one is encoded once per connection.
        cached = self._encoded.get(id(headers))
        if (
            cached is not None
            and cached[0] is headers
            and cached[1] is body
            and cached[2] == status
            and not self._must_close
            and not head_only
        ):
            return cached[3]
        data = encode_response(status, headers, body, self._must_close, head_only)
        if not (self._must_close or head_only) and len(self._encoded) < _ENCODED:
            self._encoded[id(headers)] = (headers, body, status, data)
        return data

    @property
    def fd(self) -> int:
        """The socket's file descriptor when the connection is served with non-blocking
        reads and writes on it (plain TCP on POSIX), else -1."""
        return self._fd

    @property
    def idle(self) -> bool:
        """Between requests with nothing received: what the next read brings is a new
        request (and only a socket's connection can be waited for by someone else)."""
        parser = self.parser
        return (
            self._fd >= 0
            and parser.request is None
            and not parser.buffered
            and not parser.eof
            and not parser.started
        )

    def receive_nowait(self) -> bool:
        """Read what the socket holds into the parser; False if it held nothing. Raises
        :class:`trio.BrokenResourceError` if the read fails (socket connections only)."""
        return self._read_nowait()

    def receive_next_nowait(self) -> bool:
        """Right after a response, read the next request's first bytes if they are in
        already, as :meth:`receive_request` does (see :meth:`_receive_next`); False if it
        did not read or found nothing."""
        misses = self._misses
        if (misses < _MISSES or misses % _RETRY == 0) and self._read_nowait():
            self._misses = 0
            return True
        self._misses = misses + 1
        return False

    def respond_nowait(self, status: int, headers: HeaderList, body: bytes) -> bytes:
        """Write a keep-alive response (as :meth:`respond`) without waiting; what the socket
        did not take (empty: all of it), for :meth:`send_rest`. Socket connections only."""
        data = self._encode(status, headers, body, False, False)
        sent = self._write_nowait(data)
        return data[sent:] if sent < len(data) else b""

    async def send_rest(self, data: bytes) -> None:
        """Write what :meth:`respond_nowait` left."""
        await self._send(data)

    def next_cycle(self) -> bool:
        """Get ready for the next request on this connection; False if it must close."""
        if self._must_close or not self._responded or not self.parser.complete:
            return False
        self.parser.next_cycle()
        self._responded = False
        self._continued = False
        return True
