"""The WebSocket broadcast sink: serve connected clients, each subscribed to a topic (messages
back out to the clients of a chat room, commands back to devices).

The handshake, the clients' frames (pings, closes, their own messages, which are dropped) and
the close are handled by the Sans-I/O protocol layer of the ``websockets`` package
(:class:`websockets.server.ServerProtocol`) over a Trio stream. The outgoing messages are
framed here (a server's data frame is a 2-to-10-byte header and the payload, unmasked) and
each client's writer sends every message waiting in its queue in one write: one system call
per wake-up, not one per message. With trio-websocket's server (one ``send_message``, so one
lock and one ``send`` per message per client), the relay's receiving gateway spent most of its
time in those sends (``python -m bench.chat_relay --profile``; docs/examples/chat/README.md).
A batch reaches each client's queue (an :class:`_Outbox`) with one call and one wake-up of
its writer, not a memory-channel send per message.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import trio
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from .._errors import ConfigurationError
from .._log import logger
from .._message import Batch, Origin
from ._base import Sink

__all__ = ("WebSocketBroadcastSink",)

_log = logger.getChild("sinks.websocket")
_protocol_log = logger.getChild("sinks.websocket.protocol")
_READ_SIZE = 64 * 1024
_WRITE_BYTES = 256 * 1024
"""A writer sends what is waiting in its client's queue in writes of about this many bytes."""
_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client has to complete its opening handshake."""
_BINARY_FIN = 0x82
_DECODER = json.JSONDecoder()
_decode_json = _DECODER.decode
"""``json.loads`` without its per-call set-up and encoding detection (a message's topic is
read once per message: 3.5 -> 2.1 us for a chat message)."""
_scan_json: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
"""The C scanner that ``_decode_json`` runs: called on a payload that starts with ``{`` and
ends with ``}`` it is the whole decode (see :meth:`WebSocketBroadcastSink._topics`)."""
_OPEN_BRACE = ord("{")
_CLOSE_BRACE = ord("}")
_write_fd = os.write
"""A client's socket write (a name of its own, so that tests can make it partial)."""
_SMALL_HEADERS = tuple(bytes((_BINARY_FIN, size)) for size in range(126))
"""The header of every frame of a payload under 126 bytes (a chat message's), made once: a
table lookup instead of a call and a ``bytes`` per message."""


class _Outbox:
    """One client's queue: at most ``capacity`` messages, filled a batch at a time by
    :meth:`WebSocketBroadcastSink.send` and emptied by the client's writer task."""

    __slots__ = ("_lot", "capacity", "items")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[bytes] = deque()
        self._lot = trio.lowlevel.ParkingLot()

    def put_many(self, payloads: list[bytes]) -> int:
        """Queue what fits (the rest is dropped for this client) and wake the writer; the
        number queued."""
        room = self.capacity - len(self.items)
        taken = payloads if len(payloads) <= room else payloads[: max(room, 0)]
        if taken:
            self.items.extend(taken)
            self._lot.unpark_all()
        return len(taken)

    async def wait(self) -> None:
        """Until there is something to send."""
        while not self.items:
            await self._lot.park()


def frame_header(size: int) -> bytes:
    """The header of an unmasked, final binary frame of ``size`` bytes (RFC 6455, 5.2)."""
    if size < 126:
        return bytes((_BINARY_FIN, size))
    if size < 1 << 16:
        return struct.pack("!BBH", _BINARY_FIN, 126, size)
    return struct.pack("!BBQ", _BINARY_FIN, 127, size)


class WebSocketBroadcastSink(Sink):
    """Serves WebSocket clients on ``host:port``; each message goes to every client
    subscribed to its topic.

    A client subscribes by the path it connects to: ``ws://HOST:PORT/room1`` gets the
    messages whose topic is ``room1``; ``ws://HOST:PORT/`` gets every message. A message's
    topic is its origin's peer (``topic="$peer"``: for the NATS source, the subject) or a
    field of the payload as a JSON object (``topic="room"``); a payload without it has no
    topic and reaches only the clients of ``/``. Messages go out as binary messages.

    Each client has a queue of ``client_queue`` messages written by a task of its own, so a
    slow client never holds up a batch or the other clients: when its queue is full, the
    message is dropped for that client and counted (:attr:`dropped`). At most ``max_clients``
    are served; more are refused (503 in the handshake). ``send`` never waits: a message is
    delivered once it is in the queues of the clients subscribed at that moment (none: it is
    counted in :attr:`unheard`). A client's own messages larger than ``max_message_size``
    close its connection (1009); the others are read and dropped.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        topic: str = "$peer",
        max_clients: int = 1024,
        client_queue: int = 1024,
        max_message_size: int = 1 << 20,
    ) -> None:
        if max_clients < 1 or client_queue < 1 or not topic or max_message_size < 1:
            raise ConfigurationError("sink", "websocket broadcast: positive limits and a topic")
        self.host = host
        self.port = port
        self.topic = topic
        self.max_clients = max_clients
        self.client_queue = client_queue
        self.max_message_size = max_message_size
        self.name = f"ws-listen:{host}:{port}"
        self.bound: tuple[str, int] | None = None
        self._clients: dict[str, set[_Outbox]] = defaultdict(set)
        self.clients = 0
        self.sent = 0
        """Client-messages queued (one message to three clients: three)."""
        self.dropped = 0
        """Client-messages dropped because that client's queue was full."""
        self.unheard = 0
        """Messages no client was subscribed to."""

    async def run(self, gateway: Any, *, task_status: trio.TaskStatus[Any]) -> None:
        """Serve clients until the gateway cancels its services."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.bound = (self.host, listeners[0].socket.getsockname()[1])
        self.name = f"ws-listen:{self.host}:{self.bound[1]}"
        _log.info("websocket broadcast on ws://%s:%d/TOPIC", *self.bound)
        task_status.started(self.bound)
        await trio.serve_listeners(self._handle, listeners)

    # -- one client -------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._serve(stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError) as gone:
                # A client gone (a reset) while its reader or writer task used the socket
                # arrives in the connection nursery's exception group: it ends this client
                # alone, never the sink and its other clients.
                _log.debug("%s: client gone: %r", self.name, gone.exceptions[0])

    async def _serve(self, stream: trio.SocketStream) -> None:
        protocol = ServerProtocol(max_size=self.max_message_size, logger=_protocol_log)
        request = await _handshake(stream, protocol)
        if request is None:
            return
        if self.clients >= self.max_clients:
            protocol.send_response(protocol.reject(503, "too many clients\n"))
            await _flush(stream, protocol)
            return
        protocol.send_response(protocol.accept(request))
        if protocol.state is not State.OPEN:  # not a WebSocket handshake: answered 4xx
            await _flush(stream, protocol)
            return
        topic = request.path.lstrip("/")
        outbox = _Outbox(self.client_queue)
        lock = trio.Lock()  # the writer's messages and the reader's pongs and close share it
        # Subscribed before the client reads its 101: a message sent once the client is
        # connected reaches it.
        self.clients += 1
        self._clients[topic].add(outbox)
        try:
            await _flush(stream, protocol)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_write, stream, protocol, outbox, lock)
                await _read(stream, protocol, lock)
                nursery.cancel_scope.cancel()
        finally:
            self._clients[topic].discard(outbox)
            if not self._clients[topic]:
                del self._clients[topic]
            self.clients -= 1

    # -- the batches ------------------------------------------------------------------------

    def _topics(self, batch: Batch) -> list[str | None]:
        """Each message's topic, as :meth:`_topic` reads it.

        A payload that starts with ``{`` and ends with ``}`` is handed straight to the C
        scanner that ``json.JSONDecoder.decode`` runs: that is the whole decode (there is no
        leading whitespace to skip, and the document is valid exactly when the scan ends at
        the last byte), without decode's two Python calls and two whitespace matches. A
        string field is the topic as it is. Anything else (another encoding, a scan that
        fails or stops short, a topic that is a number) takes :meth:`_field`. A chat message
        (``{"room":"bench","t":...,"n":...}``): 1.70 -> 0.84 us (``python -m bench.chat_paths
        --paths code``); a hypothesis test holds the two equal on arbitrary JSON and bytes.
        """
        if self.topic == "$peer":
            topics: list[str | None] = []
            for origin, count in batch.runs:
                topics += [origin.peer] * count
            return topics
        key = self.topic
        scan = _scan_json
        topics = []
        append = topics.append
        payloads = batch.payloads
        for payload in payloads:
            if payload and payload[0] == _OPEN_BRACE and payload[-1] == _CLOSE_BRACE:
                try:
                    text = payload.decode()
                    document, end = scan(text, 0)
                except (ValueError, StopIteration, RecursionError):
                    # Not UTF-8, or not JSON as UTF-8 (the scanner raises StopIteration for a
                    # missing value, which decode turns into a ValueError): _field reads it
                    # as json.loads does.
                    pass
                else:
                    if end == len(text):
                        value = document.get(key)
                        if type(value) is str:
                            append(value)
                            continue
            append(self._field(payload))
        return topics

    def _topic(self, payload: bytes, origin: Origin) -> str | None:
        """A message's topic: its origin's peer (``topic="$peer"``) or :meth:`_field`."""
        return origin.peer if self.topic == "$peer" else self._field(payload)

    def _field(self, payload: bytes) -> str | None:
        """The topic field of the payload read as ``json.loads`` reads bytes (UTF-8, -16 or
        -32, a BOM); None when the payload is not a JSON object or the field is missing,
        null, an object or an array. A number that is an integer is written as one (``2.0``:
        ``"2"``)."""
        try:
            document = _decode_json(payload.decode())
        except ValueError:  # not UTF-8 JSON: as json.loads reads bytes (UTF-16, a BOM), or none
            try:
                document = json.loads(payload)
            except (ValueError, RecursionError):
                return None
        except RecursionError:
            # Nested deeper than the interpreter's recursion limit: not a message with a
            # topic (and never a failure of the whole batch).
            return None
        value = document.get(self.topic) if isinstance(document, dict) else None
        if value is None or isinstance(value, dict | list):
            return None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        return str(value)

    async def send(self, batch: Batch) -> None:
        clients = self._clients
        if not clients:
            # Nobody to hear them: no topic to read (a JSON decode per message). A relay's
            # gateway with no clients of its own pays nothing more for the messages back out.
            self.unheard += len(batch)
            return
        everyone = clients.get("", set())
        # Each client's share of the batch, in order, then one call per client.
        shares: dict[_Outbox, list[bytes]] = {}
        if everyone and len(clients) == 1:  # only clients of every topic: no topic to read
            for outbox in everyone:
                shares[outbox] = batch.payloads
        else:
            payloads = batch.payloads
            topics = self._topics(batch)
            if topics and topics.count(topics[0]) == len(topics):
                # One topic for the whole batch (a relay's room, a burst from one device):
                # each of its listeners takes the batch whole, with no step per message.
                listeners = everyone | clients.get(topics[0], set()) if topics[0] else everyone
                if not listeners:
                    self.unheard += len(payloads)
                for outbox in listeners:
                    shares[outbox] = payloads
            else:
                by_topic: dict[str | None, list[list[bytes]]] = {}
                for payload, topic in zip(payloads, topics, strict=True):
                    lists = by_topic.get(topic)
                    if lists is None:
                        listeners = everyone | clients.get(topic, set()) if topic else everyone
                        lists = by_topic[topic] = [
                            shares.setdefault(outbox, []) for outbox in listeners
                        ]
                    if not lists:
                        self.unheard += 1
                    for share in lists:
                        share.append(payload)
        for outbox, payloads in shares.items():
            queued = outbox.put_many(payloads)
            self.sent += queued
            self.dropped += len(payloads) - queued

    statistics_gauges = frozenset({"clients"})

    def statistics(self) -> dict[str, int]:
        """Clients connected now; messages queued to clients (``sent``), dropped by a full
        client queue (``dropped``) and heard by no client (``unheard``)."""
        return {
            "clients": self.clients,
            "sent": self.sent,
            "dropped": self.dropped,
            "unheard": self.unheard,
        }


async def _handshake(stream: trio.SocketStream, protocol: ServerProtocol) -> Request | None:
    """Read the opening handshake's request; None if the client left, sent something that is
    not an HTTP request, or took longer than ``_HANDSHAKE_TIMEOUT``."""
    with trio.move_on_after(_HANDSHAKE_TIMEOUT):
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                return None
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Request):
                    return event
            if protocol.handshake_exc is not None:
                return None  # not HTTP: websockets closes without a word, and so do we
    return None


async def _flush(stream: trio.SocketStream, protocol: ServerProtocol) -> None:
    for data in protocol.data_to_send():
        if data:  # b"" means "half-close": the connection is closed on the way out anyway
            await stream.send_all(data)


async def _read(stream: trio.SocketStream, protocol: ServerProtocol, lock: trio.Lock) -> None:
    """Read the client's frames until it closes: answer pings and the close, drop the rest."""
    while protocol.state is State.OPEN or protocol.state is State.CLOSING:
        data = await stream.receive_some(_READ_SIZE)
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
        protocol.events_received()  # the client's own messages are not for us
        async with lock:
            await _flush(stream, protocol)
        if not data or protocol.close_expected():
            return


async def _write(
    stream: trio.SocketStream, protocol: ServerProtocol, outbox: _Outbox, lock: trio.Lock
) -> None:
    """Send the client's queue, every message waiting at once, as long as it is open.

    The writer was just woken for these messages (a scheduler pass), so it takes the lock
    without another checkpoint when nobody holds it, and writes to the socket directly: a
    client that reads keeps room in its socket buffer, and the kernel takes the whole write
    at once, with no wait (what it does not take goes on with ``send_all``). That spares
    the two scheduler passes of ``async with lock`` and ``send_all`` per write: 22.3 and
    23.9 -> 19.5 and 21.3 us of gateway CPU a message at batches of 10, 9.5 and 9.7 -> 8.8
    and 8.7 at 100 (``python -m bench.chat_paths --paths sink``, two runs each way).
    """
    items = outbox.items
    headers = _SMALL_HEADERS
    fd = stream.socket.fileno()
    while True:
        await outbox.wait()
        parts: list[bytes] = []
        size = 0
        while items and size < _WRITE_BYTES:
            payload = items.popleft()
            n = len(payload)
            parts += (headers[n] if n < 126 else frame_header(n), payload)
            size += n
        data = b"".join(parts)
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if protocol.state is not State.OPEN:
                return  # closing: no data frame may follow a close
            try:
                sent = _write_fd(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # reset, or gone: as send_all says it
                raise trio.BrokenResourceError(f"client gone: {exc!r}") from exc
            if sent < len(data):
                await stream.send_all(memoryview(data)[sent:])
        finally:
            lock.release()
