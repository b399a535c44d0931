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
import re
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
from websockets.typing import Subprotocol

from .._errors import ConfigurationError
from .._ingress import Ingress
from .._message import Origin
from .._tls import resolve_server_tls
from .._wire import ACK_SUBPROTOCOL
from ._base import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Source,
    check_reuse_port,
    connection_errors,
    format_peer,
    linger,
    refuse_with,
    serve_connections,
)
from ._wsframes import MessageReader

__all__ = ("ACK_SUBPROTOCOL", "MAX_ACK_RANGES", "WebSocketSource")

_log = logging.getLogger("trio_gateway.sources.websocket")
# websockets logs every handshake and close at INFO: keep that below our own lines.
_protocol_log = _log.getChild("protocol")


class _RedactSecrets(logging.Filter):
    """At debug level websockets logs every handshake header and the request path: hide the
    bearer token (``Authorization`` header, ``?token=`` query) before anything is written."""

    _SECRETS = re.compile(r"(?i)(authorization:\s*).*|([?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self._SECRETS.sub(lambda m: (m[1] or m[2]) + "[redacted]", message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_protocol_log.addFilter(_RedactSecrets())

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


MAX_ACK_RANGES = 64
"""The most refused ranges one ack carries. When a connection's unsent ack holds this many
(its refusals keep alternating with acceptances and the peer does not read its acks), the
source stops reading that connection until the ack is on its way."""


def _select_ack(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Select the ack subprotocol when the client offers it; otherwise none (as if the server
    knew no subprotocol: a client offering others is not refused)."""
    return Subprotocol(ACK_SUBPROTOCOL) if ACK_SUBPROTOCOL in offered else None


def _text_frame(body: bytes) -> bytes:
    """An unmasked (server-to-client) text frame."""
    n = len(body)
    if n < 126:
        return bytes((0x81, n)) + body
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + body
    return b"\x81\x7f" + n.to_bytes(8, "big") + body


class AckState:
    """The acknowledgements of one connection, sans-IO: what has been settled, what is sent.

    The connection's messages are numbered 1, 2, ... in the order received. After each offer
    the caller :meth:`record` s how the batch fared: a prefix accepted, the tail refused
    (every queue policy refuses a batch's tail, never its middle). :meth:`take` returns the
    frame of everything settled since the last take -- ``{"acked":N}``, with
    ``"refused":[[first,last,"reason"],...]`` when some were refused -- or ``b""``. Until it is
    taken, a newer record extends the same ack: ``acked`` moves on and adjacent refused ranges
    with the same reason merge, so an ack that waits costs a few integers, however many reads
    pass, unless refusals and acceptances alternate: :attr:`full` then says to wait for a
    take.
    """

    __slots__ = ("_refused", "numbered", "sent")

    def __init__(self) -> None:
        self.numbered = 0
        """The highest message number settled so far (messages received and offered)."""
        self.sent = 0
        """The ``acked`` of the last frame taken."""
        self._refused: list[list[Any]] = []  # [first, last, reason], not taken yet

    @property
    def pending(self) -> bool:
        return self.numbered > self.sent

    @property
    def full(self) -> bool:
        return len(self._refused) >= MAX_ACK_RANGES

    def record(self, accepted: int, refused: int, reason: str) -> None:
        first = self.numbered + accepted + 1
        self.numbered += accepted + refused
        if refused:
            ranges = self._refused
            if ranges and ranges[-1][1] == first - 1 and ranges[-1][2] == reason:
                ranges[-1][1] = self.numbered
            else:
                ranges.append([first, self.numbered, reason])

    def take(self) -> bytes:
        if self.numbered == self.sent:
            return b""
        self.sent = self.numbered
        if not self._refused:
            return _text_frame(b'{"acked":%d}' % self.sent)
        ranges = b",".join(
            b'[%d,%d,"%s"]' % (first, last, reason.encode())
            for first, last, reason in self._refused
        )
        self._refused = []
        return _text_frame(b'{"acked":%d,"refused":[%s]}' % (self.sent, ranges))


class _Connection:
    """One WebSocket connection: the protocol object and its writer lock."""

    __slots__ = ("lock", "protocol", "stream")

    def __init__(self, stream: trio.abc.Stream, protocol: ServerProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.lock = trio.Lock()

    async def flush(self) -> bool:
        """Send what the protocol has queued. Returns False once the protocol sent EOF."""
        protocol = self.protocol
        # Taken before the lock, so that a read with nothing to answer (the usual case)
        # costs no checkpoint; taken in order, and the lock is FIFO, so writes keep it.
        writes = protocol.data_to_send()
        if not writes:
            return not protocol.eof_sent
        async with self.lock:
            out = self._outgoing(writes)
            if out:
                await self.stream.send_all(out)
            return not protocol.eof_sent

    def _outgoing(self, writes: list[bytes]) -> bytes:
        """What one flush writes, with the writer lock held: the protocol's bytes."""
        return b"".join(writes)


class _AckConnection(_Connection):
    """A connection that negotiated :data:`ACK_SUBPROTOCOL`: its acks, and the task that sends
    them.

    The reader records each offer (:meth:`record`) and goes on reading; :meth:`send_acks`
    (a task of the connection) writes the newest ack whenever the writer lock is free. While a
    write waits for a peer that does not read, the reader's records extend the one unsent ack
    (:class:`AckState`): memory stays a few integers and the reader is never held up by the
    peer's reading, only by its own refusals piling up (:data:`MAX_ACK_RANGES`). Any write of
    the protocol's own (a pong, the close frame) carries the unsent ack in front of it, so the
    last ack always precedes the close frame; after the close frame, no more acks.
    """

    __slots__ = ("_close_written", "_taken", "_wake", "acking", "acks")

    def __init__(self, stream: trio.abc.Stream, protocol: ServerProtocol) -> None:
        super().__init__(stream, protocol)
        self.acks = AckState()
        self.acking = True  # False once no ack can be sent any more
        self._close_written = False
        self._wake = trio.lowlevel.ParkingLot()  # send_acks waits here for something to send
        self._taken = trio.lowlevel.ParkingLot()  # the reader waits here while acks are full

    async def record(self, accepted: int, refused: int, reason: str) -> None:
        """Settle the next ``accepted + refused`` messages; wake the ack writer."""
        if not self.acking:
            return
        acks = self.acks
        acks.record(accepted, refused, reason)
        self._wake.unpark_all()
        while acks.full and self.acking:
            await self._taken.park()

    def _take(self) -> bytes:
        """The unsent ack, if one may still be sent (with the writer lock held)."""
        if self._close_written:
            return b""
        self._taken.unpark_all()
        return self.acks.take()

    def _stop_acking(self) -> None:
        self.acking = False
        self._taken.unpark_all()

    def _outgoing(self, writes: list[bytes]) -> bytes:
        """The unsent ack in front of the protocol's bytes."""
        out = self._take() + b"".join(writes)
        if self.protocol.close_sent is not None:
            # The close frame is in this write (or an earlier one): no ack after it.
            self._close_written = True
            self._stop_acking()
        return out

    async def send_acks(self, stall_after: float, stalled: Callable[[], None]) -> None:
        """Write each new ack (coalesced while a write waits). A write that makes no progress
        for ``stall_after`` seconds (the peer does not read) calls ``stalled`` and ends."""
        try:
            while True:
                while not self.acks.pending:
                    await self._wake.park()
                async with self.lock:
                    if self.protocol.close_sent is not None:
                        return  # the write with the close frame carries the last ack
                    frame = self._take()
                    if frame:
                        with trio.move_on_after(stall_after) as scope:
                            await self.stream.send_all(frame)
                        if scope.cancelled_caught:
                            stalled()
                            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the reader finds the connection broken by itself
        finally:
            self._stop_acking()


class WebSocketSource(Source):
    """A WebSocket endpoint at ``path`` (default ``/``); one WS message = one message.

    ``token`` requires ``Authorization: Bearer <token>`` or ``?token=<token>`` on the
    handshake. TLS from ``ssl_context`` or ``certfile``/``keyfile`` (``client_ca`` for mutual
    TLS). Compression extensions are not negotiated, so ``max_message_size`` bounds memory.
    ``reuse_port`` sets ``SO_REUSEPORT`` so several processes can listen on the port
    (``serve --workers N``). ``acks`` (default True) selects :data:`ACK_SUBPROTOCOL` for the
    clients that offer it; False leaves it unselected (those clients get no acks).
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
    ) -> None:
        super().__init__(
            host,
            port,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            max_message_size=max_message_size,
        )
        if not path.startswith("/"):
            raise ConfigurationError("websocket.path", f"must start with '/', got {path!r}")
        if token is not None and not token:
            raise ConfigurationError("websocket.token", "must not be empty")
        if handshake_timeout <= 0:
            raise ConfigurationError("websocket.handshake_timeout", "must be positive")
        ssl_context = resolve_server_tls(
            "websocket", ssl_context, certfile, keyfile, client_ca, alpn=("http/1.1",)
        )
        self.path = path
        self.token = token
        self._token = token.encode() if token is not None else None
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        check_reuse_port("websocket.reuse_port", reuse_port)
        self.reuse_port = reuse_port
        self.acks = acks
        self.bound: list[tuple[str, int]] = []

    @property
    def scheme(self) -> str:
        return "wss" if self.ssl_context is not None else "ws"

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await self.listen(https_compatible=True)

        async def handler(stream: trio.abc.Stream) -> None:
            await self._connection(ingress, stream)

        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_connections(
                    handler,
                    listeners,
                    ingress,
                    max_connections=self.max_connections,
                    refuse=refuse_with(_TOO_MANY_CONNECTIONS),
                    task_status=task_status,
                )
            )
            task_status.started(list(self.bound))

    # -- handshake ------------------------------------------------------------------------

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        path, _, query = request.path.partition("?")
        if path != self.path:
            return 404, "not found"
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
        self, ingress: Ingress, connection: _Connection
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

    async def _connection(self, ingress: Ingress, stream: trio.abc.Stream) -> None:
        if isinstance(stream, trio.SSLStream):
            try:
                with trio.fail_after(self.handshake_timeout):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                ingress.reject("tls_handshake")
                connection_errors.info("%s: TLS handshake failed: %r", self.label, exc)
                return
            sock = stream.transport_stream.socket
        else:
            assert isinstance(stream, trio.SocketStream)
            sock = stream.socket
        try:
            peer = format_peer(sock.getpeername())
        except OSError:
            return
        protocol = ServerProtocol(
            max_size=self.max_message_size,
            select_subprotocol=_select_ack if self.acks else None,
            logger=_protocol_log,
        )
        connection = _Connection(stream, protocol)
        handshake = await self._handshake(ingress, connection)
        if handshake is None:
            return
        early, behind = handshake
        reader = MessageReader(protocol, behind_handshake=behind)
        offer: Callable[[list[bytes], Origin], Awaitable[int]] = ingress.offer
        acked: _AckConnection | None = None
        if protocol.subprotocol == ACK_SUBPROTOCOL:
            connection = acked = _AckConnection(stream, protocol)
            offer = self._acked_offer(ingress, acked)

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
            await self._read_messages(ingress, connection, reader, peer, early, offer)
            nursery.cancel_scope.cancel()

    @staticmethod
    def _acked_offer(
        ingress: Ingress, connection: _AckConnection
    ) -> Callable[[list[bytes], Origin], Awaitable[int]]:
        """``ingress.offer`` for a connection with acks: offer, then record how it went.

        ``block``: waits for room, so everything is accepted (unless the queue closed: the
        rest is refused ``gateway_stopping``, and abandoned in the ledger). ``drop_newest``:
        what does not fit is refused ``queue_full`` and counted as rejected (the sender knows),
        not received and dropped. ``drop_oldest``: everything is accepted; older messages make
        room (the ledger's ``dropped``, as for any connection).
        """
        queue = ingress.buffer.queue
        policy = queue.policy

        async def offer(payloads: list[bytes], origin: Origin) -> int:
            n = len(payloads)
            if policy == "drop_newest":
                done = await ingress.offer_or_reject(payloads, origin)
            else:
                done = await ingress.offer(payloads, origin)
                if policy == "drop_oldest" and not queue.closed:
                    done = n  # the queue took the batch (it may drop its head: "dropped")
            await connection.record(
                done, n - done, "gateway_stopping" if queue.closed else "queue_full"
            )
            return done

        return offer

    async def _read_messages(
        self,
        ingress: Ingress,
        connection: _Connection,
        reader: MessageReader,
        peer: str,
        early: list[Any],
        offer: Callable[[list[bytes], Origin], Awaitable[int]],
    ) -> None:
        protocol = connection.protocol
        stream = connection.stream
        # Plain TCP reads into the reader's buffer; TLS hands its decrypted chunks over.
        sock = stream.socket if type(stream) is trio.SocketStream else None
        listener = ingress.listener
        idle = self.idle_timeout
        # A frame must complete within idle_timeout of the previous one: bytes that only
        # extend a partial frame do not push the deadline back (slowloris).
        deadline = trio.current_time() + idle
        partial = False  # bytes received since the last complete frame
        # Frames that arrived with the handshake request are processed first.
        payloads = reader.take_events(early + protocol.events_received())
        while True:
            if payloads:
                await offer(payloads, Origin("websocket", listener, peer, time.time()))
            if reader.invalid_text:
                ingress.reject("malformed")
                reader.invalid_text = False
            if not await connection.flush():
                self._count_close(ingress, protocol, partial)
                await self._linger(stream)
                return
            if reader.frames:
                deadline = trio.current_time() + idle
            with trio.move_on_at(deadline):
                if sock is not None:
                    size = await sock.recv_into(reader.read_buffer())
                    payloads = reader.received(size)
                else:
                    data = await stream.receive_some(MAX_RECV)
                    size = len(data)
                    payloads = reader.feed(data)
                if reader.frames:
                    partial = False
                elif size:
                    partial = True
                continue
            if partial:
                ingress.reject("too_slow")
                if protocol.state is State.OPEN:
                    protocol.send_close(CloseCode.POLICY_VIOLATION, "too slow")
                    await connection.flush()
                    await self._linger(stream)
                return
            # Nothing for idle_timeout seconds.
            ingress.reject("idle_timeout")
            if protocol.state is State.OPEN:
                protocol.send_close(CloseCode.GOING_AWAY, "idle timeout")
                await connection.flush()
            return

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
