"""A NATS JetStream sink on Trio: each batch written in one socket write, counted once acked
(``confirm="stored"``) or once the server has read it all (``confirm="server"``).

The client is this package's own (:mod:`._nats_protocol`, sans-IO, and the connection of
:mod:`._nats_conn`, which the NATS source shares) on a Trio socket: nats-py is asyncio-only,
and crossing to its loop thread cost more CPU per message than the whole relay budget
(docs/sinks.md gives the figures). The sink reads the socket only inside :meth:`NatsSink.open`
and :meth:`NatsSink.send` (one pump task uses a sink at a time), so it needs no task of its
own; after an idle spell it checks the connection with a ``PING`` first, which also answers
the server's pings.

Delivery is at-least-once, made exactly-once within JetStream's duplicate window: every message
carries a ``Nats-Msg-Id`` of ``<sink id>.<sequence>``, where the sink id is random per sink
instance and the sequence numbers are allocated once per batch, so a retried batch carries the
same ids (JetStream drops the copies and says so in the ack) while two different messages never
share one. A message that came with its sender's id (:attr:`Origin.id`: ``Idempotency-Key``,
gRPC ``idempotency-key``) carries that id instead, so the sender's own retry of it, even
through another gateway or after a crash, is dropped too.

``confirm="server"`` publishes without reply subjects and ends each round with a ``PING``: the
server answers it only after it has routed every publish before it on the connection (to the
subscribers then, and into the ingest of a stream that captures the subject), so a batch costs
one round trip and no ack per message, but "delivered" no longer means "stored"
(docs/sinks.md says what each mode promises).
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from typing import Literal

import trio

from .._errors import ConfigurationError, SinkError, SinkRefused, SinkUnavailable
from .._log import logger
from .._message import Batch, Origin
from ._base import Sink
from ._nats_conn import TRANSPORT_ERRORS as _TRANSPORT_ERRORS
from ._nats_conn import ConnectFailed, NatsClient
from ._nats_conn import ConnectionLost as _ConnectionLost
from ._nats_conn import NatsConnection as _Connection
from ._nats_protocol import (
    PING,
    Err,
    Event,
    Msg,
    NatsError,
    NatsProtocolError,
    Pong,
    encode_headers,
    header_value,
)
from ._nats_url import NatsTarget, parse_nats_url

__all__ = ("NatsSink", "NatsTarget", "parse_nats_url")

_log = logger.getChild("sinks.nats")
_IDLE_CHECK = 30.0
"""Seconds without a byte from the server after which ``send`` first checks the connection."""
_ORIGIN_HEADS = 1024
"""Origins (transport, listener, peer) whose header lines the sink keeps encoded."""
Confirm = Literal["stored", "server"]
"""What ``send`` waits for: JetStream's ack of every message, or the server's ``PONG``."""


class NatsSink(Sink):
    """Publishes every message of a batch to a JetStream subject; ``send`` returns once all are
    acknowledged (stored, or recognised as duplicates of stored ones); with
    ``confirm="server"``, once the server has read and routed them all (one ``PING``/``PONG``
    per round, no ack per message; a ``stream`` is then checked once per connection to
    capture the subject, instead of per message).

    ``NatsSink("nats://127.0.0.1:4222/telemetry.in?stream=TELEMETRY&create=true")``. The
    payload is the message body, unchanged; the origin travels in headers (``Gateway-Transport``,
    ``Gateway-Listener``, ``Gateway-Peer``, ``Gateway-Received-At``) unless
    ``origin_headers=False``.

    Failures raise :class:`SinkError` and the gateway's pump retries the batch with backoff:
    the server away (``send`` reconnects, at most once per ``reconnect_wait``, doubling up to
    5 s while it fails, and fails fast in between), an ack missing after ``ack_timeout``, the
    connection lost mid-batch, a JetStream error. A message larger than the server's
    ``max_payload`` can never be published: ``send`` delivers the rest and raises
    :class:`SinkRefused` naming it. Bounds: at most ``max_in_flight`` unacknowledged publishes
    and ``max_buffer_bytes`` per socket write (a larger batch goes out in several rounds),
    ``connect_timeout`` per connection attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 5.0,
        ack_timeout: float = 10.0,
        max_in_flight: int = 4096,
        max_buffer_bytes: int = 8 * 1024 * 1024,
        reconnect_wait: float = 0.5,
        origin_headers: bool = True,
        confirm: str = "stored",
    ) -> None:
        self.target = parse_nats_url(url)
        if confirm not in ("stored", "server"):
            raise ConfigurationError(
                "sink", f'nats sink: confirm must be "stored" or "server", got {confirm!r}'
            )
        self.confirm: Confirm = "server" if confirm == "server" else "stored"
        if connect_timeout <= 0 or ack_timeout <= 0 or reconnect_wait <= 0:
            raise ConfigurationError("sink", "nats sink: timeouts must be positive")
        if max_in_flight < 1 or max_buffer_bytes < 64 * 1024:
            raise ConfigurationError(
                "sink", "nats sink: max_in_flight >= 1 and max_buffer_bytes >= 64 KiB"
            )
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_in_flight = max_in_flight
        self.max_buffer_bytes = max_buffer_bytes
        self.reconnect_wait = reconnect_wait
        self.origin_headers = origin_headers
        self.name = f"nats:{','.join(s.removeprefix('nats://') for s in self.target.servers)}/" + (
            self.target.subject
        )
        self.sink_id = secrets.token_urlsafe(12)
        """Prefix of every ``Nats-Msg-Id`` this sink sends (random per sink instance)."""
        self.stored = 0
        """Messages JetStream acknowledged as new."""
        self.duplicates = 0
        """Messages JetStream acknowledged as duplicates (a retried batch's earlier copies)."""
        self.published = 0
        """Messages the server confirmed reading, not storing (``confirm="server"``)."""
        self.refused = 0
        """Messages refused for good (larger than the server's ``max_payload``)."""
        self.failures: Counter[str] = Counter()
        """Failed batches by reason (``unavailable``, ``connection_lost``, ``ack_timeout``...)."""
        self._client = NatsClient(
            self.target,
            self.name,
            connect_timeout=connect_timeout,
            reconnect_wait=reconnect_wait,
            setup=self._setup,
        )
        self._inbox = self._client.inbox
        self._round = 0
        self._next_seq = 1
        self._retrying: Batch | None = None
        self._retrying_seq = 0
        self._errors = self._client.errors
        self._origin_heads: dict[tuple[str, str, str], bytes] = {}

    @property
    def connects(self) -> int:
        """Connections made (the first, then each reconnection)."""
        return self._client.connects

    # -- connecting -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (and create the stream if asked): a server that cannot be reached, refuses
        the credentials or the stream is :class:`SinkUnavailable`."""
        if self._client.conn is None:
            try:
                await self._client.connect()
            except ConnectFailed as exc:
                raise SinkUnavailable(self.name, str(exc)) from exc

    async def _setup(self, conn: _Connection) -> None:
        """On each new connection, before it is used (the shared client's ``setup``): create
        the stream if asked and, under ``confirm="server"``, check that it captures the
        subject. A :class:`SinkError` here is this server's refusal, so the client
        tries the next one."""
        try:
            if self.target.create and self.target.stream is not None:
                await self._ensure_stream(conn, self.target.stream)
            if self.confirm == "server" and self.target.stream is not None:
                await self._check_capture(conn, self.target.stream)
        except SinkError as exc:
            raise NatsError(str(exc).removeprefix(f"{self.name}: ")) from exc

    async def _request(self, conn: _Connection, subject: str, payload: bytes) -> Msg:
        """One JetStream API request over the sink's connection (reply to its inbox)."""
        try:
            return await self._client.request(conn, subject, payload)
        except NatsError as exc:
            raise SinkError(f"{self.name}: {exc} on {conn.server}") from exc

    async def _ensure_stream(self, conn: _Connection, stream: str) -> None:
        target = self.target
        found = json.loads(
            (await self._request(conn, f"$JS.API.STREAM.INFO.{stream}", b"")).payload
        )
        error = found.get("error")
        if error is None:
            return
        if error.get("code") != 404:
            raise SinkError(f"{self.name}: stream {stream}: {error.get('description')}")
        config = {
            "name": stream,
            "subjects": [target.subject],
            "retention": "limits",
            "storage": target.storage,
            "num_replicas": target.replicas,
            "duplicate_window": int(target.duplicate_window * 1e9),
            "discard": "old",
        }
        reply = await self._request(
            conn, f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode()
        )
        error = json.loads(reply.payload).get("error")
        if error is not None and error.get("err_code") != 10058:  # created meanwhile: fine
            raise SinkError(
                f"{self.name}: cannot create stream {stream}: {error.get('description')}"
            )
        _log.info("%s: created stream %s", self.name, stream)

    # -- the connection (send's calls into the shared client) --------------------------------

    async def _next_event(self, conn: _Connection) -> Event:
        return await conn.next_event()

    async def _handle(self, conn: _Connection, event: Event) -> Event:
        return await self._client.handle(conn, event)

    async def _drop(self) -> None:
        await self._client.drop()

    async def _connection(self) -> _Connection:
        client = self._client
        conn = client.conn
        idle = conn is not None and trio.current_time() - conn.last_read > _IDLE_CHECK
        if conn is not None and idle and not await client.alive(conn):
            self._errors.warning("%s: connection dead after an idle spell", self.name)
            await self._drop()
            client.retry_at = 0.0
            conn = None
        if conn is not None:
            return conn
        now = trio.current_time()
        if now < client.retry_at:
            raise self._fail(
                "unavailable",
                f"server unavailable (reconnecting in {client.retry_at - now:.2f} s)",
            )
        try:
            return await client.connect()
        except ConnectFailed as exc:
            raise self._fail("unavailable", str(exc), exc) from exc

    # -- publishing -------------------------------------------------------------------------

    def _fail(self, reason: str, message: str, cause: BaseException | None = None) -> SinkError:
        self.failures[reason] += 1
        error = SinkError(f"{self.name}: {message}")
        error.__cause__ = cause
        return error

    async def _check_capture(self, conn: _Connection, stream: str) -> None:
        """``confirm="server"`` with a ``stream``: no publish carries ``Nats-Expected-Stream``
        (without a reply subject, a mismatch would be dropped without a word), so the
        connection checks once that the stream captures the subject."""
        subject = self.target.subject
        reply = await self._request(
            conn, "$JS.API.STREAM.NAMES", json.dumps({"subject": subject}).encode()
        )
        found = json.loads(reply.payload)
        if "error" in found:
            raise SinkError(f"{self.name}: stream {stream}: {_describe(reply.payload)}")
        if stream not in (found.get("streams") or ()):
            raise SinkError(
                f"{self.name}: stream {stream} does not capture subject {subject!r}, so "
                'confirm="server" could not store what it publishes'
            )

    async def send(self, batch: Batch) -> None:
        conn = await self._connection()
        # A retry of the batch that failed last gets the same sequence numbers, so the same
        # Nats-Msg-Ids; a new batch gets the next ones.
        if batch is not self._retrying:
            self._retrying = batch
            self._retrying_seq = self._next_seq
            self._next_seq += len(batch)
        try:
            if self.confirm == "server":
                published, refused = await self._publish_to_server(conn, batch)
            else:
                stored, duplicates, refused = await self._publish(conn, batch)
        except (*_TRANSPORT_ERRORS, _ConnectionLost, NatsProtocolError) as exc:
            await self._drop()
            what = "every ack" if self.confirm == "stored" else "the PONG"
            raise self._fail(
                "connection_lost", f"connection lost before {what} arrived: {exc!r}", exc
            ) from exc
        self._retrying = None
        if self.confirm == "server":
            self.published += published
        else:
            self.stored += stored
            self.duplicates += duplicates
        if refused:
            self.refused += len(refused)
            raise SinkRefused(
                f"{self.name}: {len(refused)} message(s) larger than the server's max_payload "
                f"({conn.info.max_payload} bytes)",
                indices=refused,
                reason="max_payload",
            )

    def _rounds(
        self, conn: _Connection, batch: Batch, round_no: int, refused: list[int]
    ) -> list[tuple[bytes, int]]:
        """The batch encoded as HPUBs, cut into rounds of at most ``max_in_flight`` messages
        and ``max_buffer_bytes``: (bytes, messages) each. Under ``confirm="stored"`` reply
        subjects are ``<inbox><round>.<index>``, so a late ack of an earlier round is told
        apart; under ``"server"`` there are none, every round ends with a ``PING``, and the
        ids are sent only where a stream can use them."""
        target = self.target
        limit = conn.info.max_payload
        acked = self.confirm == "stored"
        subject = target.subject.encode()
        if acked:
            head = b"HPUB " + subject + b" " + f"{self._inbox}{round_no}.".encode()
            trailer = b""
        else:
            head = b"HPUB " + subject
            trailer = PING
        with_ids = acked or target.stream is not None
        expected = None
        if acked and target.stream is not None:
            expected = b"Nats-Expected-Stream: " + header_value(target.stream) + b"\r\n"
        prefix = f"{self.sink_id}.".encode()
        seq = self._retrying_seq
        index = 0
        rounds: list[tuple[bytes, int]] = []
        parts: list[bytes] = []
        size = count = 0
        payloads = batch.payloads
        for origin, run in batch.runs:
            # The header block of the run: NATS/1.0, the origin, the expected stream.
            block = self._origin_block(origin) if self.origin_headers else b"NATS/1.0\r\n"
            if expected is not None:
                block += expected
            if with_ids:
                block += b"Nats-Msg-Id: "
                fixed = None if origin.id is None else block + header_value(origin.id) + b"\r\n\r\n"
            else:  # the same headers for the whole run (none at all: a PUB)
                fixed = block + b"\r\n" if self.origin_headers or expected else b""
            for payload in payloads[index : index + run]:
                headers = fixed if fixed is not None else b"%s%s%d\r\n\r\n" % (block, prefix, seq)
                seq += 1
                if len(headers) + len(payload) > limit:
                    refused.append(index)
                    index += 1
                    continue
                if acked:
                    line = b"%s%d %d %d\r\n" % (
                        head,
                        index,
                        len(headers),
                        len(headers) + len(payload),
                    )
                elif headers:
                    line = b"%s %d %d\r\n" % (head, len(headers), len(headers) + len(payload))
                else:
                    line = b"PUB %s %d\r\n" % (subject, len(payload))
                parts += (line, headers, payload, b"\r\n")
                size += len(line) + len(headers) + len(payload) + 2
                count += 1
                index += 1
                if count >= self.max_in_flight or size >= self.max_buffer_bytes:
                    parts.append(trailer)
                    rounds.append((b"".join(parts), count))
                    parts, size, count = [], 0, 0
        if count:
            parts.append(trailer)
            rounds.append((b"".join(parts), count))
        return rounds

    def _origin_block(self, origin: Origin) -> bytes:
        """``NATS/1.0`` and the origin headers of a run, the block open (encoded once per
        transport, listener and peer: a run of one message is common, and encoding the same
        three headers for each cost more than the rest of its publish)."""
        key = (origin.transport, origin.listener, origin.peer)
        head = self._origin_heads.get(key)
        if head is None:
            if len(self._origin_heads) >= _ORIGIN_HEADS:
                self._origin_heads.clear()
            head = self._origin_heads[key] = encode_headers(
                {
                    "Gateway-Transport": origin.transport,
                    "Gateway-Listener": origin.listener,
                    "Gateway-Peer": origin.peer,
                },
                close=False,
            )
        return b"%sGateway-Received-At: %r\r\n" % (head, origin.received_at)

    async def _write_round(self, conn: _Connection, data: bytes) -> None:
        sent = self._client.write_nowait(conn, data)  # nearly always all of it
        if sent == len(data):
            return  # the caller's wait for the answer is the checkpoint
        # The rest has its own bound: a tiny ack_timeout must not stop the publishes.
        with trio.move_on_after(max(self.ack_timeout, self.connect_timeout)) as writing:
            await self._client.write(conn, memoryview(data)[sent:])
        if writing.cancelled_caught:
            raise _ConnectionLost("the socket write did not finish in time")

    async def _publish(self, conn: _Connection, batch: Batch) -> tuple[int, int, list[int]]:
        """Write each round in one socket write, wait for its acks; (stored, duplicates,
        refused indices)."""
        self._round += 1
        round_no = self._round
        refused: list[int] = []
        rounds = self._rounds(conn, batch, round_no, refused)
        subject = self.target.subject
        prefix = f"{self._inbox}{round_no}."
        stored = duplicates = 0
        deadline = trio.current_time() + self.ack_timeout
        for data, expected in rounds:
            await self._write_round(conn, data)
            acked: set[str] = set()
            with trio.move_on_at(deadline):
                parser = conn.parser
                while len(acked) < expected:
                    # Every event already read is taken without awaiting (acks come in bursts).
                    event = parser.next_event()
                    if event is None:
                        event = await self._next_event(conn)
                    if type(event) is not Msg:
                        await self._handle(conn, event)
                        continue
                    if not event.subject.startswith(prefix):
                        continue  # a late ack of an earlier round, or a stray reply
                    token = event.subject[len(prefix) :]
                    if token in acked:
                        continue
                    body = event.payload
                    if event.status == 503:
                        raise self._fail(
                            "no_stream", f"no JetStream stream takes subject {subject!r}"
                        )
                    if b'"error"' in body:
                        raise self._fail(
                            "jetstream_error", f"JetStream refused a message: {_describe(body)}"
                        )
                    acked.add(token)
                    if b'"duplicate"' in body and json.loads(body).get("duplicate"):
                        duplicates += 1
                    else:
                        stored += 1
            if len(acked) < expected:
                missing = len(batch) - len(refused) - stored - duplicates
                raise self._fail(
                    "ack_timeout",
                    f"{missing} of {len(batch)} acks missing after {self.ack_timeout} s",
                )
        return stored, duplicates, refused

    async def _publish_to_server(self, conn: _Connection, batch: Batch) -> tuple[int, list[int]]:
        """``confirm="server"``: write each round with a ``PING`` at its end and wait for the
        ``PONG``, which the server sends once it has processed every publish before it;
        (published, refused indices)."""
        refused: list[int] = []
        published = 0
        deadline = trio.current_time() + self.ack_timeout
        for data, count in self._rounds(conn, batch, 0, refused):
            await self._write_round(conn, data)
            ponged = False
            with trio.move_on_at(deadline):
                parser = conn.parser
                while True:
                    event = parser.next_event()
                    if event is None:
                        event = await self._next_event(conn)
                    if type(event) is Pong:
                        ponged = True
                        break
                    if isinstance(await self._handle(conn, event), Err):
                        # Only a permissions violation gets past _handle: the server
                        # dropped a publish, so the round is not all delivered.
                        raise self._fail("permissions", f"server refused a publish: {event}")
            if not ponged:
                # PONGs carry no id: a late one would confirm the next batch. Start afresh.
                await self._drop()
                raise self._fail(
                    "ack_timeout", f"no PONG after {self.ack_timeout} s for {count} publishes"
                )
            published += count
        return published, refused

    async def aclose(self) -> None:
        await self._drop()

    def statistics(self) -> dict[str, int]:
        """The counts above, for /metrics (``trio_gateway_sink_stored_total`` ...)."""
        keys = ("stored", "duplicates", "published", "refused")
        return {key: getattr(self, key) for key in keys}


def _describe(body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return f"{error.get('description')} (err_code {error.get('err_code')})"
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode("utf-8", "replace")
