"""What every source shares: the Source contract and a supervised, bounded connection server."""

from __future__ import annotations

import contextlib
import errno
import logging
import ssl
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import EllipsisType
from typing import Any, ClassVar, TypeVar, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from h2.errors import ErrorCodes

from .._errors import TransportError
from .._ingress import Ingress
from .._log import RateLimitedLogger, logger
from ._accept import Lobby, accept_waiting, duplicate_listening, spoke
from ._live import LiveConnection, LiveConnections
from ._options import DEFAULT_MAX_MESSAGE_SIZE, ListenOptions, check_reuse_port
from ._sockets import format_peer, open_tcp_listeners, peer_of

__all__ = (
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EVICT_AFTER",
    "EVICT_MUTE_AFTER",
    "LINGER_MAX_BYTES",
    "MAX_REFUSALS",
    "REFUSAL_DEBUG_DATA",
    "REFUSAL_TIMEOUT",
    "ListenOptions",
    "Source",
    "check_reuse_port",
    "format_peer",
    "linger",
    "open_tcp_listeners",
    "peer_of",
    "refuse_http2",
    "refuse_with",
    "serve_connections",
    "tls_and_peer",
)

MAX_REFUSALS = 64
"""Connections past ``max_connections`` answered at the same time; past this, closed unanswered."""
REFUSAL_TIMEOUT = 1.0
"""Seconds one refusal may take, all included: TLS handshake, reading, the answer, the linger."""
LINGER_MAX_BYTES = 1 << 20
"""Bytes a refusal reads (and discards) at most: :func:`linger`, and the requests that
:func:`refuse_http2` waits for."""
EVICT_AFTER: float | None = 1.0
"""Seconds of silence after which a connection may be closed to make room for a new one when
the listener is at ``max_connections``: the default of ``serve_connections``' ``evict_after``,
read when it starts (``None``: never)."""
EVICT_MUTE_AFTER = 0.1
"""Seconds after which, at ``max_connections``, a connection whose peer has sent nothing at all
since it connected may be closed to make room, before any that has spoken (at most
``evict_after``)."""
REFUSAL_DEBUG_DATA = b"too many connections"
"""The debug data of the GOAWAY that ends a refused HTTP/2 connection."""
_GOAWAY_MARGIN = 0.1
"""Seconds before the caller's deadline at which :func:`refuse_http2` stops waiting for
requests and answers as things are."""
_ACCEPT_BATCH = 1024
"""Connections a listener takes from the kernel's accept queue in one go (see
``serve_connections``)."""
_LOBBY_SIZE = 1024
"""Newcomers of a flood that may wait for their first bytes at once, per listener."""
_LOBBY_LOOK = 0.02
"""Seconds between looks at the lobby: what a good client that was slow to speak may wait."""
_log = logger.getChild("sources")
connection_errors = RateLimitedLogger(_log)

# Errors that mean "the system is out of resources": wait and accept again (as trio does).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

StreamT = TypeVar("StreamT", bound=trio.abc.Stream)


class Source(ABC):
    """One listener of one transport. Subclasses implement :meth:`run`.

    ``run`` serves until the gateway starts stopping (``ingress.wait_stopping()``): then it
    closes its listeners, gives open connections ``ingress.grace_period`` seconds to finish,
    cancels the rest and returns. It reports its bound addresses through
    ``task_status.started(...)`` as a list of ``(host, port)`` tuples (port 0 is allowed).
    """

    transport: ClassVar[str]

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_connections: int = 1024,
        idle_timeout: float = 60.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._configure(
            ListenOptions(
                transport=self.transport,
                host=host,
                port=port,
                max_connections=max_connections,
                idle_timeout=idle_timeout,
                max_message_size=max_message_size,
            )
        )

    def _configure(self, options: ListenOptions) -> None:
        """Take validated listen options (stream sources build theirs with TLS and token)."""
        self.listen_options = options
        self.host = options.host
        self.port = options.port
        self.max_connections = options.max_connections
        self.idle_timeout = options.idle_timeout
        self.max_message_size = options.max_message_size
        self.ssl_context: ssl.SSLContext | None = options.tls
        """TLS for stream sources (``None``: cleartext)."""
        self.reuse_port = options.reuse_port
        """Bind with SO_REUSEPORT (``serve --workers``)."""
        self.bound: list[tuple[str, int]] = []
        """The addresses actually bound, once :meth:`run` has started."""

    async def listen(
        self, *, https_compatible: bool = False, backlog: int | None = None
    ) -> list[trio.abc.Listener[Any]]:
        """Bind the stream listeners, record :attr:`bound`, wrap them in TLS if configured.

        A bind failure (a port in use) is a :class:`TransportError` naming the listener.
        """
        try:
            sockets = await open_tcp_listeners(
                self.host, self.port, reuse_port=self.reuse_port, backlog=backlog
            )
        except OSError as exc:
            raise TransportError(
                f"{self.label}: cannot listen on {self.host}:{self.port}: {exc}"
            ) from exc
        self.bound = [tuple(listener.socket.getsockname()[:2]) for listener in sockets]
        if self.ssl_context is None:
            return list(sockets)
        return [
            trio.SSLListener(listener, self.ssl_context, https_compatible=https_compatible)
            for listener in sockets
        ]

    @property
    def label(self) -> str:
        """The listener's name in metrics and logs, e.g. ``tcp:127.0.0.1:7000``.

        Once bound, the port is the one the OS gave (so port-0 listeners stay distinct).
        """
        if self.bound:
            return f"{self.transport}:{format_peer(self.bound[0])}"
        return f"{self.transport}:{format_peer((self.host, self.port))}"

    @abstractmethod
    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until stopping (see the class docstring)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


async def tls_and_peer(
    stream: trio.abc.Stream, ingress: Ingress, *, handshake_timeout: float, label: str
) -> str | None:
    """Finish a TLS stream's handshake within ``handshake_timeout`` (a failure is counted
    ``tls_handshake`` and logged) and name the peer (:func:`peer_of`); ``None`` when the
    handshake failed or the connection is already gone."""
    if isinstance(stream, trio.SSLStream):
        try:
            with trio.fail_after(handshake_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            ingress.reject("tls_handshake")
            connection_errors.info("%s: TLS handshake failed: %r", label, exc)
            return None
    return peer_of(stream) or None


async def linger(stream: trio.abc.Stream, *, max_bytes: int = LINGER_MAX_BYTES) -> None:
    """After the last answer: half-close (plain TCP), then read and discard what the peer
    still sends until it closes or ``max_bytes`` have come. The caller bounds the time.

    Closing a socket with unread data makes the kernel send a reset, and a reset can destroy
    the answer before the client has read it (a client still sending its request, or a
    WebSocket close frame racing the client's messages). A peer that breaks the connection
    meanwhile ends the linger quietly: there is nothing left to save.
    """
    received = 0
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        while received < max_bytes:
            data = await stream.receive_some(min(64 * 1024, max_bytes - received))
            if not data:
                return
            received += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


def refuse_with(answer: bytes) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """A ``refuse`` for :func:`serve_connections` that sends ``answer`` (e.g. a complete
    HTTP/1.1 ``503`` with ``Connection: close``) at once, then lingers: the client's request
    is read and discarded, so it can finish sending and read the answer."""

    async def refuse(stream: trio.abc.Stream) -> None:
        await stream.send_all(answer)
        await linger(stream)

    return refuse


async def refuse_http2(
    stream: trio.abc.Stream,
    received: bytes,
    answer: Callable[[h2.connection.H2Connection, int], None],
    *,
    whole_requests: bool,
) -> None:
    """Refuse an HTTP/2 connection with an answer to its first requests, then ``GOAWAY``.

    Sends the server preface, reads the client's (``received``: bytes already read from it)
    and calls ``answer(h2conn, stream_id)``, which must send a complete response (ending the
    stream), for the first requests: with ``whole_requests``, once a request has ended (its
    body is read and discarded, the flow-control windows kept open), as HTTP clients want
    them (curl gives up on a response that arrives while it is still sending); otherwise at
    its headers (gRPC: a streaming call may wait for the answer before it ends). A request
    whose body is still coming then is reset with ``NO_ERROR`` ("stop sending, the answer
    is final", RFC 9113 section 8.1). Then ``GOAWAY(NO_ERROR)`` naming the last answered
    stream, with :data:`REFUSAL_DEBUG_DATA`, and :func:`linger`.

    Why answer a request rather than send a bare ``GOAWAY``: a ``GOAWAY`` that refuses every
    stream (last stream 0) means "nothing was processed, try again", which grpcio does at once
    and without end (its calls end in ``DEADLINE_EXCEEDED``, or never) and grpclib reports as
    a lost connection. An answered request is a status the client reports as such.

    Bytes that are not HTTP/2 get h2's ``GOAWAY(PROTOCOL_ERROR)``. Past
    :data:`LINGER_MAX_BYTES`, or 0.1 s before the caller's deadline (``serve_connections``'
    ``refusal_timeout``), the requests begun are answered as they are; the end of the stream
    or no request at all ends it with a bare ``GOAWAY``.
    """
    h2conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    h2conn.initiate_connection()
    data = received
    seen = 0
    waiting: list[int] = []  # requests whose end we wait for (whole_requests)
    answered: list[int] = []
    ended: set[int] = set()
    tried = 0  # requests answered, or that could not be (the loop ends after the first)

    def respond(stream_id: int) -> None:
        nonlocal tried
        tried += 1
        try:
            answer(h2conn, stream_id)
        except h2.exceptions.H2Error:
            return  # the client closed it meanwhile (its RST_STREAM, GOAWAY or zero window)
        answered.append(stream_id)

    # Leave time for the answer and the GOAWAY before the caller's deadline.
    with trio.move_on_at(trio.current_effective_deadline() - _GOAWAY_MARGIN):
        while True:
            if data:
                seen += len(data)
                try:
                    events = h2conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    await stream.send_all(h2conn.data_to_send())  # h2's GOAWAY(PROTOCOL_ERROR)
                    await linger(stream)
                    return
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        if whole_requests:
                            waiting.append(event.stream_id)
                        else:
                            respond(event.stream_id)
                    elif isinstance(event, h2.events.DataReceived):
                        h2conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                        if event.stream_id in waiting:
                            waiting.remove(event.stream_id)
                            respond(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        ended.add(event.stream_id)  # the client gave up on it: no answer
                        if event.stream_id in waiting:
                            waiting.remove(event.stream_id)
                            tried += 1
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        tried += 1  # the client's GOAWAY: the connection is over
                if tried or seen >= LINGER_MAX_BYTES:
                    break
            await stream.send_all(h2conn.data_to_send())
            data = bytes(await stream.receive_some(64 * 1024))
            if not data:
                break
    for stream_id in waiting:  # begun, not ended in time: answered as they are
        respond(stream_id)
    try:
        for stream_id in answered:
            if stream_id not in ended:
                h2conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        h2conn.close_connection(
            ErrorCodes.NO_ERROR,
            additional_data=REFUSAL_DEBUG_DATA,
            last_stream_id=max(answered, default=0),
        )
    except h2.exceptions.H2Error:
        pass  # the client's own GOAWAY closed the connection first: nothing more to say
    await stream.send_all(h2conn.data_to_send())
    await linger(stream)


_CONNECTION_ENDED = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What a connection that breaks raises: the peer reset or closed it, or the network failed."""


def _connection_ended(exc: BaseException) -> bool:
    """Whether ``exc`` only says the connection broke: one of :data:`_CONNECTION_ENDED`, or a
    group of nothing else (a handler's own nursery raises its tasks' errors as a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_connection_ended(inner) for inner in exc.exceptions)
    return isinstance(exc, _CONNECTION_ENDED)


@contextlib.contextmanager
def _fails_alone(ingress: Ingress, connection: str, work: str) -> Iterator[None]:
    """One peer fails alone: a connection that breaks is logged (``"<connection> ended"``);
    any other exception, a bug or a library tripped up by what a peer sent, is counted as
    ``internal_error`` and logged with its traceback (``"<work> failed"``), rate-limited, and
    the gateway goes on (:func:`trio.serve_listeners` would let it crash everything)."""
    try:
        yield
    except Exception as exc:
        if _connection_ended(exc):
            connection_errors.info("%s: %s ended: %r", ingress.listener, connection, exc)
            return
        ingress.reject("internal_error")
        connection_errors.log(
            logging.ERROR,
            "%s: %s failed:\n%s",
            ingress.listener,
            work,
            "".join(traceback.format_exception(exc)).rstrip(),
        )


async def serve_connections(
    handler: Callable[[StreamT], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[StreamT]],
    ingress: Ingress,
    *,
    max_connections: int,
    refuse: Callable[[StreamT], Awaitable[None]] | None = None,
    max_refusals: int = MAX_REFUSALS,
    refusal_timeout: float = REFUSAL_TIMEOUT,
    evict_after: float | EllipsisType | None = ...,
    bound: object = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` and run ``handler(stream)`` per connection, supervised.

    Like :func:`trio.serve_listeners`, one bad peer fails alone and resource exhaustion on
    accept (EMFILE) is waited out. When the gateway stops, the listeners close, open
    connections get ``ingress.grace_period`` to finish, and the rest are cancelled.
    ``task_status.started(bound)`` is called once the accept loops run.

    At ``max_connections``, a new connection first takes the slot of a silent one, if the
    gateway has read everything it sent: the one whose peer has sent nothing at all since it
    connected, for longest, once that is :data:`EVICT_MUTE_AFTER` seconds (clients of these
    protocols speak first); else the one whose peer has sent nothing for longest, if that is
    ``evict_after`` seconds or more. That one is cancelled (its handler's cancel scope; the
    stream closes) and counted as ``evicted``. So idle connections cannot lock good clients
    out for a whole idle timeout, nor a flood of them for its first ``evict_after`` seconds,
    while a connection that is sending, or that the gateway holds back (a queue full under
    ``block``), keeps its slot. ``None``: never evict; where the kernel does not say how long
    a peer has been silent (``TCP_INFO``: Linux), nothing is evicted either. Not given:
    :data:`EVICT_AFTER`.

    Plain TCP listeners take what waits in the kernel's accept queue whole (a flood), the
    connections whose peers have spoken first (:mod:`._accept`); at the limit, the others
    wait up to :data:`EVICT_MUTE_AFTER` for their first bytes, then are refused as below,
    without evicting anyone.

    Otherwise a connection past ``max_connections`` is counted as ``too_many_connections``. Without
    ``refuse`` it is closed at once. With ``refuse``, ``refuse(stream)`` answers it in the
    transport's terms (an HTTP ``503``, gRPC ``UNAVAILABLE``) in a task of its own, so the
    accept loop never waits on it; at most ``max_refusals`` run at a time (past that, closed
    at once, unanswered) and each gets ``refusal_timeout`` seconds for everything, a TLS
    handshake included (``refuse`` does it, by its first send or receive). Then the stream is
    closed. ``refuse`` should end with :func:`linger`, so that its answer is not lost to a
    reset.
    """
    live = LiveConnections()
    if evict_after is ...:
        evict_after = EVICT_AFTER
    refusing = 0  # refusal tasks running

    async def refuse_one(stream: StreamT) -> None:
        nonlocal refusing
        assert refuse is not None
        try:
            with _fails_alone(ingress, "refused connection", "refusing a connection"):
                with trio.move_on_after(refusal_timeout):
                    await refuse(stream)
        finally:
            refusing -= 1
            await trio.aclose_forcefully(stream)

    async def run_one(stream: StreamT, entry: LiveConnection) -> None:
        ingress.connection_opened()
        try:
            with _fails_alone(ingress, "connection", "connection handler"):
                async with stream:
                    with entry.scope:
                        await handler(stream)
        finally:
            ingress.connection_closed()
            live.closed(entry)

    async def admit(stream: StreamT, *, may_evict: bool = True) -> None:
        nonlocal refusing
        if (
            live.active >= max_connections
            and may_evict
            and evict_after is not None
            and live.evict(evict_after, mute_for=min(EVICT_MUTE_AFTER, evict_after))
        ):
            ingress.reject("evicted")
            connection_errors.info("%s: a silent connection closed to make room", ingress.listener)
        if live.active < max_connections:
            connections.start_soon(run_one, stream, live.opened(stream))
            return
        ingress.reject("too_many_connections")
        if refuse is not None and refusing < max_refusals:
            connection_errors.info("%s: connection refused: limit reached", ingress.listener)
            refusing += 1
            connections.start_soon(refuse_one, stream)
        else:
            connection_errors.info(
                "%s: connection closed unanswered: limit reached%s",
                ingress.listener,
                ", refusals busy" if refuse is not None else "",
            )
            if isinstance(stream, trio.SocketStream):
                stream.socket.close()  # at once: no await per connection of a flood
            else:
                await trio.aclose_forcefully(stream)

    async def admit_flood(arrived: list[StreamT], lobby: Lobby[StreamT]) -> None:
        """A flood: those whose peers have spoken first; at the limit, the others wait in
        the lobby for their first bytes and are refused if none come (without evicting)."""
        spoken, expired = lobby.sort_out()
        mute: list[StreamT] = []
        for stream in arrived:
            (spoken if spoke(stream) else mute).append(stream)
        for stream in spoken:
            await admit(stream)
        for stream in mute:
            if live.active < max_connections or evict_after is None:
                await admit(stream)
            else:
                expired += lobby.hold(stream)
        for stream in expired:
            await admit(stream, may_evict=False)

    async def accept_loop(listener: trio.abc.Listener[StreamT]) -> None:
        duplicate = duplicate_listening(listener)
        lobby: Lobby[StreamT] = Lobby(wait=EVICT_MUTE_AFTER, every=_LOBBY_LOOK, size=_LOBBY_SIZE)
        try:
            async with listener:
                while True:
                    arrived: list[StreamT] = []
                    with trio.move_on_at(lobby.next_look()):
                        try:
                            arrived.append(await listener.accept())
                        except OSError as exc:
                            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                                raise
                            connection_errors.warning(
                                "%s: accept failed (%s); retrying in 0.1 s", ingress.listener, exc
                            )
                            await trio.sleep(0.1)
                            continue
                    if duplicate is not None:
                        waiting = accept_waiting(duplicate, _ACCEPT_BATCH - len(arrived))
                        arrived += cast("list[StreamT]", waiting)
                    if len(arrived) == 1 and not lobby:
                        await admit(arrived[0])  # one at a time: it may not have spoken yet
                    else:
                        await admit_flood(arrived, lobby)
        finally:
            lobby.close()
            if duplicate is not None:
                duplicate.close()

    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(accept_loop, listener)
            task_status.started(bound)
            await ingress.wait_stopping()
            acceptors.cancel_scope.cancel()
        with trio.move_on_after(ingress.grace_period):
            await live.wait_idle()
        connections.cancel_scope.cancel()
