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

import trio

from .._budget import connection_cut
from .._errors import TransportError
from .._ingress import Ingress
from .._log import RateLimitedLogger, logger
from ._accept import Lobby, accept_waiting, duplicate_listening, spoke
from ._live import LiveConnection, LiveConnections
from ._options import DEFAULT_MAX_MESSAGE_SIZE, ListenOptions, check_reuse_port
from ._refuse import LINGER_MAX_BYTES, REFUSAL_DEBUG_DATA, linger, refuse_http2, refuse_with
from ._sockets import format_peer, open_tcp_listeners, peer_of, unread_bytes

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
    "say_goodbye_when_cut",
    "serve_connections",
    "tls_and_peer",
)

MAX_REFUSALS = 64
"""Connections past ``max_connections`` answered at the same time; past this, closed unanswered."""
REFUSAL_TIMEOUT = 1.0
"""Seconds one refusal may take, all included: TLS handshake, reading, the answer, the linger."""
EVICT_AFTER: float | None = 1.0
"""Seconds of silence after which a connection may be closed to make room for a new one when
the listener is at ``max_connections``: the default of ``serve_connections``' ``evict_after``,
read when it starts (``None``: never)."""
EVICT_MUTE_AFTER = 0.1
"""Seconds after which, at ``max_connections``, a connection whose peer has sent nothing at all
since it connected may be closed to make room, before any that has spoken (at most
``evict_after``)."""
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


class _BudgetCut:
    """How the memory budget cuts one connection (``connection_cut``, called by the budget
    to make room for another): count it ``over_budget_evicted`` and cancel its handler, or,
    when the handler registered its protocol's last words (:func:`say_goodbye_when_cut`),
    let it say them and close, within :data:`REFUSAL_TIMEOUT`."""

    __slots__ = ("entry", "goodbye", "ingress", "used")

    def __init__(self, entry: LiveConnection, ingress: Ingress) -> None:
        self.entry = entry
        self.ingress = ingress
        self.goodbye: Callable[[], None] | None = None
        self.used = False

    def __call__(self) -> bool:
        entry = self.entry
        if self.used or entry.evicted or entry.scope.cancel_called or unread_bytes(entry.socket):
            return False  # going already, or held back by the gateway itself
        self.used = True
        self.ingress.reject("over_budget_evicted")
        connection_errors.info(
            "%s: a connection holding bytes for long closed to make room in the budget",
            self.ingress.listener,
        )
        if self.goodbye is None:
            entry.scope.cancel()
        else:
            entry.scope.deadline = min(entry.scope.deadline, trio.current_time() + REFUSAL_TIMEOUT)
            self.goodbye()
        return True


def say_goodbye_when_cut(goodbye: Callable[[], None]) -> None:
    """Should the memory budget cut the connection the current task serves (see
    :func:`serve_connections`), call ``goodbye`` instead of cancelling the handler at once:
    it queues the protocol's last words (HTTP/2: a GOAWAY saying why) and makes the handler
    return once they are written. The handler is cancelled anyway :data:`REFUSAL_TIMEOUT`
    seconds after the cut (a peer that does not read). Outside ``serve_connections``:
    nothing."""
    cut = connection_cut.get()
    if isinstance(cut, _BudgetCut):
        cut.goodbye = goodbye


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

    Each connection's task also gets a way for the memory budget to cut it
    (:data:`~trio_gateway._budget.connection_cut`, given to the shares the handler makes):
    when the budget has no room for another connection, it cancels the one that has held
    bytes longest (``over_budget_evicted``), unless the gateway itself holds that one back;
    a handler that can say why in its protocol first (an HTTP/2 GOAWAY) registers how with
    :func:`say_goodbye_when_cut`.

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
        connection_cut.set(_BudgetCut(entry, ingress))  # this task's own context
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
