"""Streaming WebSocket source: every WebSocket message (text or binary) is one message.

The handshake and every unusual frame are handled by the Sans-I/O protocol layer of the
``websockets`` package (:class:`websockets.server.ServerProtocol`), driven directly over a
Trio stream; the common data frames are decoded by :class:`._wsframes.MessageReader` straight
out of one reused receive buffer (with websockets' C ``apply_mask``), which hands every other
frame to that protocol. Each read's messages are offered to the queue in one
:meth:`Ingress.offer`: no await per message. ``docs/websocket.md`` explains why (``bench/ws.py``
measures it).

Limits and answers: ``max_message_size`` (default 1 MiB) -> close 1009; invalid UTF-8 in a
text message -> close 1007; protocol violations -> close 1002; ``token`` missing or wrong ->
handshake refused with 401; wrong path -> 404; no data for ``idle_timeout`` -> close 1001;
a frame not complete within ``idle_timeout`` of the previous one (slowloris) -> close 1008;
a handshake not complete within ``handshake_timeout`` -> connection closed;
gateway stopping -> close 1001, then ``grace_period`` for the client to finish.
Under the ``block`` policy a full queue stops reading, so the client's sends back up.

Acknowledgements (opt-in per connection): a client that offers the subprotocol
``trio-gateway.ack.v1`` (:data:`ACK_SUBPROTOCOL`) gets it selected and receives, after each
read's messages are offered to the queue, at most one text frame
``{"acked":N,"refused":[[first,last,"reason"],...]}`` (see ``docs/websocket.md``). A client that
does not offer it sees no difference, and costs nothing more.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qs

import trio
from websockets.exceptions import PayloadTooBig
from websockets.frames import CloseCode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from .._budget import ConnectionShare
from .._errors import ConfigurationError
from .._ingress import Ingress
from .._message import Origin
from ._base import (
    Source,
    connection_errors,
    linger,
    refuse_with,
    serve_connections,
    tls_and_peer,
)
from ._idle import ReadWatch, Reaper
from ._options import DEFAULT_MAX_MESSAGE_SIZE, ListenOptions, check_origins
from ._wsack import (
    ACK_SUBPROTOCOL,
    MAX_ACK_RANGES,
    AckConnection,
    AckState,
    Connection,
    acked_offer,
    select_ack,
)
from ._wsframes import INITIAL_BUFFER, MAX_BUFFER, MessageReader
from ._wslog import protocol_log

__all__ = ("ACK_SUBPROTOCOL", "MAX_ACK_RANGES", "AckState", "WebSocketSource")

_log = logging.getLogger("trio_gateway.sources.websocket")

MAX_RECV = 256 * 1024
"""Read size during the handshake, and on TLS streams (plain TCP reads into the reader's
buffer, which grows to ``_wsframes.MAX_BUFFER`` while the sender keeps it full)."""
_END_OF_HEAD = b"\r\n\r\n"
_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 28\r\n"
    b"Connection: close\r\n\r\nmalformed opening handshake\n"
)
_TOO_MANY_CONNECTIONS = (  # the answer past max_connections (serve_connections(refuse=))
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n"
)


async def _receive_into(sock: trio.socket.SocketType, buffer: memoryview) -> int:
    """``sock.recv_into(buffer)`` for a read that will most likely wait (the last one
    emptied the socket): wait until readable first, then read, once. ``recv_into`` tries
    the read first, fails (``EAGAIN``: a system call and an exception), then waits, all
    inside an async context manager: about 4 us of CPU more per read that waits, which at
    a chat client's rates is a read of one or two messages (a reader and a writer task over
    a socket pair: 34.9 -> 30.2 us a round trip, median of four). A cancellation (the idle
    deadline, the gateway stopping) reaches the wait as it reaches ``recv_into``'s."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.readv(sock.fileno(), (buffer,))
        except BlockingIOError:  # a readiness the kernel took back: wait again
            continue


class WebSocketSource(Source):
    """A WebSocket endpoint at ``path`` (default ``/``); one WS message = one message.

    ``token`` requires ``Authorization: Bearer <token>`` or ``?token=<token>`` on the
    handshake. TLS from ``ssl_context`` or ``certfile``/``keyfile`` (``client_ca`` for mutual
    TLS). Compression extensions are not negotiated, so ``max_message_size`` bounds memory.
    ``reuse_port`` sets ``SO_REUSEPORT`` so several processes can listen on the port
    (``serve --workers N``). ``acks`` (default True) selects :data:`ACK_SUBPROTOCOL` for the
    clients that offer it; False leaves it unselected (those clients get no acks).
    ``allowed_origins`` refuses (``403``) a handshake whose ``Origin`` is not on the list
    (``https://app.example.com``; ``*``: any), so that a page of another site cannot open a
    connection with the user's credentials; a handshake without ``Origin`` (not a browser)
    is not checked. No check unless given.
    """

    transport = "websocket"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        path: str = "/",
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_ca: str | None = None,
        handshake_timeout: float = 10.0,
        reuse_port: bool = False,
        acks: bool = True,
        allowed_origins: Sequence[str] = (),
    ) -> None:
        self._configure(ListenOptions.from_arguments(self.transport, locals(), alpn=("http/1.1",)))
        if not path.startswith("/"):
            raise ConfigurationError("websocket.path", f"must start with '/', got {path!r}")
        self.path = path
        self.token = token
        self._token = token.encode() if token is not None else None
        self.handshake_timeout = handshake_timeout
        self.acks = acks
        self.allowed_origins = check_origins("websocket.allowed_origins", allowed_origins)
        self._origins = frozenset(self.allowed_origins)

    @property
    def scheme(self) -> str:
        return "wss" if self.ssl_context is not None else "ws"

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await self.listen(https_compatible=True)
        reaper = Reaper()  # the connections' read deadlines (see _idle.py)

        async def handler(stream: trio.abc.Stream) -> None:
            with ingress.budget.connection() as share:
                await self._connection(ingress, stream, share, reaper)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reaper.run)

            async def serve(task_status: trio.TaskStatus[Any]) -> None:
                await serve_connections(
                    handler,
                    listeners,
                    ingress,
                    max_connections=self.max_connections,
                    refuse=refuse_with(_TOO_MANY_CONNECTIONS),
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # every connection is done: so is the reaper

            await nursery.start(serve)
            task_status.started(list(self.bound))

    # -- handshake ------------------------------------------------------------------------

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        path, _, query = request.path.partition("?")
        if path != self.path:
            return 404, "not found"
        if self._origins and "*" not in self._origins:
            # Browsers always send Origin on a WebSocket handshake; a client without one is
            # not a page another site could use against the gateway (the token guards it).
            origin = request.headers.get("Origin")
            if origin is not None and origin not in self._origins:
                return 403, "origin not allowed"
        if self._token is None:
            return None
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(" ")
            offered = credentials.strip() if scheme.lower() == "bearer" else ""
        else:
            offered = parse_qs(query).get("token", [""])[0]
        if not offered or not hmac.compare_digest(offered.encode(), self._token):
            return 401, "unauthorized"
        return None

    async def _handshake(
        self, ingress: Ingress, connection: Connection
    ) -> tuple[list[Any], bytes] | None:
        """Answer the opening handshake. Returns the events of the frames that came with the
        request and the bytes behind the request (both already given to the protocol), or
        None if refused."""
        protocol = connection.protocol
        stream = connection.stream
        request: Request | None = None
        early: list[Any] = []
        behind = b""
        last = b""  # the last 3 bytes before this read: the request's end may straddle reads
        received = False
        with trio.move_on_after(self.handshake_timeout):
            while request is None:
                data = await stream.receive_some(MAX_RECV)
                if data:
                    received = True
                    protocol.receive_data(data)
                elif not received:
                    return None  # connected and left (a TCP health check): nothing to count
                else:
                    protocol.receive_eof()
                for event in protocol.events_received():
                    if isinstance(event, Request):
                        request = event
                        # websockets ends the request at the first empty CRLF line (every
                        # line must end in CRLF) and reads no body.
                        seen = last + data
                        behind = seen[seen.index(_END_OF_HEAD) + 4 :]
                    else:
                        early.append(event)
                last = (last + data)[-3:]
                if request is None and not await connection.flush():
                    ingress.reject("malformed")
                    # websockets closes without a word on a request it cannot parse
                    await stream.send_all(_BAD_REQUEST)
                    return None
        if request is None:
            # Silent, or trickling a request that never completed (slowloris).
            ingress.reject("too_slow" if received else "idle_timeout")
            return None
        if protocol.eof_sent:
            # Bytes sent right behind the request broke the frame parser, which gave up on
            # the connection before we could answer (websockets cannot respond after that).
            ingress.reject("malformed")
            await stream.send_all(_BAD_REQUEST)
            return None
        refusal = self._refusal(request)
        if refusal is not None:
            status, text = refusal
            response = protocol.reject(status, text + "\n")
            if status == 401:
                ingress.reject("unauthorized")
                response.headers["WWW-Authenticate"] = 'Bearer realm="trio_gateway"'
            elif status == 403:
                ingress.reject("unauthorized")
            else:
                ingress.reject("not_found")
        else:
            response = protocol.accept(request)
        protocol.send_response(response)
        await connection.flush()
        if protocol.state is not State.OPEN:
            if refusal is None:
                ingress.reject("malformed")
            return None
        return early, behind

    # -- messages -------------------------------------------------------------------------

    async def _connection(
        self, ingress: Ingress, stream: trio.abc.Stream, share: ConnectionShare, reaper: Reaper
    ) -> None:
        peer = await tls_and_peer(
            stream, ingress, handshake_timeout=self.handshake_timeout, label=self.label
        )
        if peer is None:
            return
        protocol = ServerProtocol(
            max_size=self.max_message_size,
            select_subprotocol=select_ack if self.acks else None,
            logger=protocol_log,
        )
        connection = Connection(stream, protocol)
        handshake = await self._handshake(ingress, connection)
        if handshake is None:
            return
        early, behind = handshake
        # The receive buffer is charged to the connection's share of the budget, and it grows
        # while the sender stays ahead: at most a quarter of the share, so that a fast sender
        # under a small budget is never refused for its own buffer (frames larger than it go
        # through the protocol, bounded by max_message_size, as ever).
        max_buffer = max(1024, min(MAX_BUFFER, ingress.budget.connection_share // 4))
        reader = MessageReader(
            protocol,
            behind_handshake=behind,
            initial_buffer=min(INITIAL_BUFFER, max_buffer),
            max_buffer=max_buffer,
        )
        offer: Callable[[list[bytes], Origin], Awaitable[int]] = ingress.offer
        acked: AckConnection | None = None
        if protocol.subprotocol == ACK_SUBPROTOCOL:
            connection = acked = AckConnection(stream, protocol, share, lambda: reader.held)
            offer = acked_offer(ingress, acked)

        async def say_goodbye() -> None:
            await ingress.wait_stopping()
            if protocol.state is State.OPEN:
                protocol.send_close(CloseCode.GOING_AWAY, "gateway stopping")
                await connection.flush()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(say_goodbye)
            if acked is not None:

                def stalled() -> None:
                    # The peer has not read its acks for idle_timeout: drop the connection
                    # (a close frame would not get through either).
                    ingress.reject("too_slow")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(acked.send_acks, self.idle_timeout, stalled)
                nursery.start_soon(acked.answer_in_order)
            watch = ReadWatch(reaper, trio.current_time() + self.idle_timeout)
            try:
                await self._read_messages(
                    ingress, connection, reader, peer, early, offer, share, watch
                )
            finally:
                watch.close()
            nursery.cancel_scope.cancel()

    async def _read_messages(
        self,
        ingress: Ingress,
        connection: Connection,
        reader: MessageReader,
        peer: str,
        early: list[Any],
        offer: Callable[[list[bytes], Origin], Awaitable[int]],
        share: ConnectionShare,
        watch: ReadWatch,
    ) -> None:
        protocol = connection.protocol
        stream = connection.stream
        # Plain TCP reads into the reader's buffer; TLS hands its decrypted chunks over.
        sock = stream.socket if type(stream) is trio.SocketStream else None
        listener = ingress.listener
        idle = self.idle_timeout
        # A frame must complete within idle_timeout of the previous one: bytes that only
        # extend a partial frame do not push the deadline back (slowloris). The reaper
        # cuts a read that waits past it (see _idle.py: no cancel scope per read).
        partial = False  # a frame begun and not complete
        # Frames that arrived with the handshake request are processed first.
        payloads = reader.take_events(early + protocol.events_received())
        again = True
        while again:  # one cancel scope per stretch of reads the reaper did not cut
            again = False
            with trio.CancelScope() as scope:
                watch.scope = scope
                while True:
                    if payloads:
                        await offer(payloads, Origin("websocket", listener, peer, time.time()))
                    if reader.invalid_text:
                        ingress.reject("malformed")
                        reader.invalid_text = False
                    if protocol.close_rcvd is not None and isinstance(connection, AckConnection):
                        # The client said goodbye: its last acks go before our reply to that.
                        with trio.move_on_after(idle):
                            await connection.wait_answered()
                    if not await connection.flush():
                        self._count_close(ingress, protocol, partial)
                        await self._linger(stream)
                        return
                    if reader.frames:
                        watch.deadline = trio.current_time() + idle
                    if not share.hold_nowait(reader.held + connection.answers_held):
                        # Over the memory budget: refuse in WebSocket's terms, "try again later".
                        ingress.reject("over_budget")
                        await self._close(
                            connection, CloseCode.TRY_AGAIN_LATER, "over the memory budget"
                        )
                        return
                    if watch.expired():
                        break
                    watch.arm()
                    watch.waiting = True
                    try:
                        if sock is not None:
                            if reader.filled:  # the last read took all it could: more waits
                                size = await sock.recv_into(reader.read_buffer())
                            else:
                                size = await _receive_into(sock, reader.read_buffer())
                            payloads = reader.received(size)
                        else:
                            data = await stream.receive_some(MAX_RECV)
                            size = len(data)
                            payloads = reader.feed(data)
                    except (trio.BrokenResourceError, OSError) as exc:
                        # An abrupt close (a reset): the end of the stream, counted as one
                        # (truncated if it cut a frame short), not as a failure of ours.
                        connection_errors.info("%s: %s: connection reset: %r", listener, peer, exc)
                        size = 0
                        payloads = reader.received(0)
                    finally:
                        watch.waiting = False
                    if size:  # at the end of the stream, what was held before it counts
                        partial = reader.buffered > 0
                    if scope.cancel_called:
                        # Cut as the read finished: keep what it read, in a fresh scope.
                        again = True
                        break
        # The deadline passed: before a read, or during one (the scope caught the cut).
        if partial:
            ingress.reject("too_slow")
            await self._close(connection, CloseCode.POLICY_VIOLATION, "too slow")
            return
        # Nothing for idle_timeout seconds.
        ingress.reject("idle_timeout")
        if protocol.state is State.OPEN:
            protocol.send_close(CloseCode.GOING_AWAY, "idle timeout")
            await connection.flush()

    async def _close(self, connection: Connection, code: CloseCode, reason: str) -> None:
        """Our close frame (if the connection is still open), then the linger."""
        if connection.protocol.state is State.OPEN:
            connection.protocol.send_close(code, reason)
            await connection.flush()
            await self._linger(connection.stream)

    @staticmethod
    async def _linger(stream: trio.abc.Stream) -> None:
        """After our close frame: half-close, then read (and discard) what the client still
        sends, for at most a second. Closing with unread data would make the kernel send a
        reset, and the client could lose the close frame (it would see 1006, not 1009)."""
        with trio.move_on_after(1.0):
            await linger(stream)

    @staticmethod
    def _count_close(ingress: Ingress, protocol: ServerProtocol, partial: bool) -> None:
        """Count connections that the protocol failed (too big, protocol error, cut off)."""
        if isinstance(protocol.parser_exc, PayloadTooBig):
            ingress.reject("oversize")
        elif isinstance(protocol.parser_exc, EOFError):
            if partial:  # the stream ended inside a frame
                ingress.reject("truncated")
        else:
            sent = protocol.close_sent
            if sent is not None and sent.code == CloseCode.PROTOCOL_ERROR:
                ingress.reject("malformed")
