"""A NATS client connection on Trio, shared by the NATS sink and the NATS source.

One server at a time out of several (the URL's, then those the cluster announces in ``INFO``'s
``connect_urls``), TLS when asked or required, the ``INFO``/``CONNECT`` handshake with the
URL's credentials (:mod:`._nats_auth`), ``PING``/``PONG``, and a backoff between failed
rounds of attempts (``reconnect_wait``, doubling up to 5 s). What is read and written is the
sans-IO protocol of :mod:`._nats_protocol`; who reads the socket when is the user's choice
(the sink reads it inside ``send``, the source in a task of its own), so this module owns no
task. It lives beside the sink, which had it first; the source imports this module and the
protocol, never the sinks themselves.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .._log import RateLimitedLogger, logger
from ._nats_auth import credentials
from ._nats_protocol import (
    PING,
    PONG,
    Err,
    Event,
    Info,
    Msg,
    NatsError,
    NatsParser,
    NatsProtocolError,
    Ping,
    Pong,
    connect_command,
    pub,
    sub,
)
from ._nats_url import NatsTarget

__all__ = (
    "INBOX_SID",
    "TRANSPORT_ERRORS",
    "ConnectFailed",
    "ConnectionLost",
    "NatsClient",
    "NatsConnection",
    "describe_error",
)

_log = logger.getChild("nats")
INBOX_SID = "1"
"""The subscription id of the client's inbox (``<inbox>>``): API replies, pulled messages."""
MAX_RECONNECT_WAIT = 5.0
RECEIVE_BYTES = 64 * 1024
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def describe_error(error: object) -> str:
    """A JetStream API answer's ``error`` object, for a message."""
    if isinstance(error, dict):
        return f"{error.get('description')} (err_code {error.get('err_code')})"
    return repr(error)


class ConnectionLost(Exception):
    """The server closed the connection, or sent a ``-ERR`` that ends it."""


class ConnectFailed(Exception):
    """Every server was tried once and none could be used."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered
        """Whether a server answered (and refused): credentials, TLS, JetStream..."""


@dataclass(slots=True)
class NatsConnection:
    """One connected, handshaken socket and its parser."""

    stream: trio.abc.Stream
    parser: NatsParser
    info: Info
    server: str
    last_read: float
    writing: bool = False
    """A ``send_all`` is under way: nothing may be written beside it."""

    async def receive(self) -> None:
        """One socket read into the parser; the server's close is :class:`ConnectionLost`."""
        data = await self.stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise ConnectionLost("the server closed the connection")
        self.last_read = trio.current_time()
        self.parser.receive_data(data)

    async def next_event(self) -> Event:
        while True:
            event = self.parser.next_event()
            if event is not None:
                return event
            await self.receive()


Setup = Callable[[NatsConnection], Awaitable[None]]
"""Run on each new connection before it is handed out (create a stream, subscribe)."""


class NatsClient:
    """Connects to the target's servers (one at a time), and keeps what the sink and the
    source share about it: the inbox, the servers the cluster announced, the backoff."""

    def __init__(
        self,
        target: NatsTarget,
        name: str,
        *,
        connect_timeout: float,
        reconnect_wait: float,
        setup: Setup | None = None,
    ) -> None:
        self.target = target
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.setup = setup
        self.conn: NatsConnection | None = None
        self.connects = 0
        self.inbox = f"_INBOX.{secrets.token_hex(11)}."
        self.retry_at = 0.0
        """Before this (``trio.current_time()``), a new round of attempts fails fast."""
        self.errors = RateLimitedLogger(_log)
        self._requests = 0
        self._next_server = 0
        self._wait = reconnect_wait
        self._discovered: tuple[str, ...] = ()

    async def connect(self) -> NatsConnection:
        """Try each server once (the one after the last that worked first); raises
        :class:`ConnectFailed` and sets :attr:`retry_at` when none could be used."""
        target = self.target
        servers = target.servers + tuple(s for s in self._discovered if s not in target.servers)
        problems: list[str] = []
        answered = False
        for step in range(len(servers)):
            index = (self._next_server + step) % len(servers)
            try:
                with trio.fail_after(self.connect_timeout):
                    conn = await self._handshake(servers[index])
            except (*TRANSPORT_ERRORS, trio.TooSlowError, ConnectionLost) as exc:
                if isinstance(exc.__cause__, ssl.SSLError):  # trio.SSLStream wraps it
                    answered = True
                    problems.append(f"{servers[index]}: TLS: {exc.__cause__}")
                else:
                    problems.append(f"{servers[index]}: {exc!r}")
                continue
            except (NatsProtocolError, NatsError, ssl.SSLError, ValueError) as exc:
                answered = True  # ValueError: bad JSON from the server
                problems.append(f"{servers[index]}: {exc}")
                continue
            self._next_server = index
            self.conn = conn
            self.connects += 1
            self._wait = self.reconnect_wait
            if self.connects > 1:
                self.errors.info("%s: reconnected to %s", self.name, conn.server)
            else:
                _log.info("%s: connected to %s", self.name, conn.server)
            return conn
        self.retry_at = trio.current_time() + self._wait
        self._wait = min(self._wait * 2, MAX_RECONNECT_WAIT)
        if answered:
            raise ConnectFailed(f"connect failed: {'; '.join(problems)}", answered=True)
        raise ConnectFailed(f"no server answered ({'; '.join(problems)})", answered=False)

    async def _handshake(self, server: str) -> NatsConnection:
        host, _, port = server.removeprefix("nats://").rpartition(":")
        host = host.strip("[]")
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, int(port))
        conn = NatsConnection(stream, NatsParser(), Info({}), server, trio.current_time())
        try:
            first = await conn.next_event()
            if not isinstance(first, Info):
                raise NatsProtocolError(f"expected INFO, got {first!r}")
            self._learn(conn, first)
            target = self.target
            tls = target.tls or target.ca is not None or first.tls_required
            if tls:
                conn.stream = trio.SSLStream(stream, self._ssl_context(), server_hostname=host)
                await conn.stream.do_handshake()
            if not first.headers:
                raise NatsError("the server does not support headers (NATS < 2.2)")
            options: dict[str, object] = {
                "verbose": False,
                "pedantic": False,
                "tls_required": tls,
                "name": "trio_gateway",
                "lang": "python-trio",
                "version": "1",
                "protocol": 1,
                "headers": True,
                "no_responders": True,
                "echo": False,
            }
            options.update(credentials(target, first.nonce))
            await conn.stream.send_all(
                connect_command(options) + sub(self.inbox + ">", INBOX_SID) + PING
            )
            while True:
                event = await conn.next_event()
                if isinstance(event, Pong):
                    break
                if isinstance(event, Err):
                    raise NatsError(f"server refused the connection: {event.message}")
                if isinstance(event, Ping):
                    await conn.stream.send_all(PONG)
                elif isinstance(event, Info):
                    self._learn(conn, event)
            if self.setup is not None:
                await self.setup(conn)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)
            raise
        return conn

    def _learn(self, conn: NatsConnection, info: Info) -> None:
        conn.info = info
        urls = info.fields.get("connect_urls")
        if isinstance(urls, list):
            self._discovered = tuple(f"nats://{url}" for url in urls if isinstance(url, str))

    def _ssl_context(self) -> ssl.SSLContext:
        try:
            return ssl.create_default_context(cafile=self.target.ca)
        except OSError as exc:
            raise NatsError(f"cannot load ca {self.target.ca!r}: {exc}") from exc

    async def handle(self, conn: NatsConnection, event: Event) -> Event:
        """Answer pings, take new INFO, and turn a fatal ``-ERR`` into a lost connection."""
        if isinstance(event, Ping):
            await self.write(conn, PONG)
        elif isinstance(event, Info):
            self._learn(conn, event)
        elif isinstance(event, Err):
            if "permissions violation" in event.message.lower():
                self.errors.warning("%s: %s", self.name, event.message)
            else:
                raise ConnectionLost(f"server error: {event.message}")
        return event

    async def request(
        self, conn: NatsConnection, subject: str, payload: bytes, *, others: list[Msg] | None = None
    ) -> Msg:
        """One request-reply (a JetStream API call) to the client's inbox, reading the socket
        until its reply: only while nobody else reads it (the handshake's setup, the sink).
        Other messages read meanwhile go to ``others`` (dropped if it is ``None``)."""
        self._requests += 1
        reply = f"{self.inbox}r.{self._requests}"
        await self.write(conn, pub(subject.encode(), reply.encode(), payload))
        while True:
            event = await self.handle(conn, await conn.next_event())
            if isinstance(event, Msg):
                if event.subject != reply:
                    if others is not None:
                        others.append(event)
                    continue
                if event.status == 503:
                    raise NatsError(f"no responders for {subject} (JetStream not enabled?)")
                return event

    async def api(
        self,
        conn: NatsConnection,
        subject: str,
        request: object,
        *,
        others: list[Msg] | None = None,
    ) -> dict[str, object]:
        """A JetStream API call: its JSON answer (``{"error": {...}}`` included)."""
        payload = b"" if request is None else json.dumps(request).encode()
        answer = json.loads((await self.request(conn, subject, payload, others=others)).payload)
        if not isinstance(answer, dict):
            raise NatsProtocolError(f"{subject}: the answer is not a JSON object")
        return answer

    async def flush(self, conn: NatsConnection, *, others: list[Msg] | None = None) -> None:
        """A ``PING`` and its ``PONG``: the server has taken everything written before it
        (reading the socket meanwhile, as :meth:`request` does)."""
        await self.write(conn, PING)
        while not isinstance(event := await self.handle(conn, await conn.next_event()), Pong):
            if others is not None and isinstance(event, Msg):
                others.append(event)

    async def alive(self, conn: NatsConnection) -> bool:
        """After an idle spell: a PING answered within ``connect_timeout``?"""
        with trio.move_on_after(self.connect_timeout):
            try:
                await self.flush(conn)
            except (*TRANSPORT_ERRORS, ConnectionLost, NatsProtocolError):
                return False
            return True
        return False

    async def write(self, conn: NatsConnection, data: bytes | memoryview) -> None:
        """Write it all, or give the connection up: a write cut short (cancelled, timed out)
        leaves half a command on the wire, after which nothing sent on it would parse."""
        conn.writing = True
        try:
            await conn.stream.send_all(data)
        except BaseException:
            if self.conn is conn:
                self.conn = None
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)
            raise
        finally:
            conn.writing = False

    def write_nowait(self, conn: NatsConnection, data: bytes) -> int:
        """As much of ``data`` as the socket takes now, without waiting: how many bytes
        (0 under TLS, or beside a ``send_all`` under way). The caller writes the rest with
        :meth:`write`, bounded in time; a round of publishes nearly always fits, and then
        needs neither the scheduler's pass after ``send_all`` nor a cancel scope around it
        (each costs about as much as the write on the reference machine). A failed write is
        left for :meth:`write` to meet and report as it does."""
        stream = conn.stream
        if type(stream) is not trio.SocketStream or conn.writing:
            return 0
        try:
            return os.write(stream.socket.fileno(), data)
        except OSError:  # full (EAGAIN), or broken: write() says which
            return 0

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(conn.stream)
