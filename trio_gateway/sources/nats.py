"""The NATS source: messages back out of a broker into the gateway, from a subject or a
JetStream consumer, on the package's own NATS client on a Trio socket (the NATS sink's:
``sinks/_nats_conn.py`` and the sans-IO ``sinks/_nats_protocol.py``). docs/pipelines.md
("Messages back out") is the user's side of what follows.

``NatsSource("nats://127.0.0.1:4222/chat.>")`` subscribes to a subject (wildcards allowed;
``queue_group`` shares the messages between gateways). Core NATS has no backpressure: the
messages wait in a buffer of ``max_pending`` (taken in batches of up to ``batch``); past it,
the newest are refused and counted (``rejected{reason="slow_consumer"}``), as the NATS server
would do to a slow subscriber.

``NatsSource("nats://127.0.0.1:4222/telemetry.in", stream="TELEMETRY", consumer="gateway")``
pulls from a durable JetStream consumer instead (:mod:`._nats_pull`): ``batch`` messages are
asked for only once the previous ones are in the gateway's queue (under ``block``, a full
queue stops the fetching: real backpressure). They are acknowledged as the source's ``ack``
mode says: ``"queued"`` once in the queue; ``"delivered"`` once the sink confirmed them (the
pump settles each batch after its send, ``_receipts.py``), with a ``-NAK`` for those whose
delivery failed, which JetStream delivers again after ``redelivery_delay`` seconds (one batch
in flight then). What was fetched and not acknowledged (a stop, a crash) comes again after the
consumer's ``ack_wait``. A core subscription has no acks: ``"delivered"`` is refused for it.

When the server goes away the source reconnects (the next server; ``reconnect_wait`` seconds,
doubling up to 5 s, between rounds), subscribes again or pulls again, and writes again the
acks the server had not confirmed. One task reads the socket (every message of a read handed
over at once) and another offers them to the gateway, so the reading never waits for the
queue. The origin of each message: transport ``nats``, the listener's label
(``nats:HOST:PORT/SUBJECT``), the message's **subject** as its peer (so a processor can route
by subject: a chat room, a device), and the time the batch was taken.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from itertools import groupby
from operator import itemgetter
from typing import Any

import trio

from .._errors import ConfigurationError, TransportError
from .._ingress import Answer, Ingress
from .._log import RateLimitedLogger, logger
from .._message import Origin
from ..sinks._nats_conn import (
    TRANSPORT_ERRORS,
    ConnectFailed,
    ConnectionLost,
    NatsClient,
    NatsConnection,
)
from ..sinks._nats_protocol import (
    PING,
    PONG,
    Msg,
    NatsProtocolError,
    Ping,
    Pong,
    acks,
    nak,
    pub,
    sub,
)
from ..sinks._nats_url import parse_nats_url
from ._base import Source
from ._nats_pull import AckBook, Pull, ensure_consumer
from ._options import DEFAULT_MAX_MESSAGE_SIZE

__all__ = ("NatsSource",)

_log = logger.getChild("sources.nats")
_errors = RateLimitedLogger(_log)
_SUBSCRIPTION_SID = "2"
_PING_INTERVAL = 30.0
"""Seconds without a byte from the server after which the source sends a ``PING``; no answer
within ``connect_timeout`` means the connection is dead."""
_ACK_PREFIX = "$JS.ACK."
_QUEUE_AT_ONCE = 16
"""Up to this many messages of one read are queued by the reading task itself when the
offering task is idle (one call each, cheaper than waking it for a few)."""
_subject = itemgetter(0)  # Msg.subject, at C speed


class NatsSource(Source):
    """Subscribes to a NATS subject or pulls from a JetStream consumer (module docstring)."""

    transport = "nats"

    def __init__(
        self,
        url: str,
        *,
        queue_group: str | None = None,
        stream: str | None = None,
        consumer: str | None = None,
        batch: int = 256,
        max_pending: int = 65_536,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        redelivery_delay: float = 1.0,
    ) -> None:
        target = parse_nats_url(url, subscribe=True)
        host, _, port = target.servers[0].removeprefix("nats://").rpartition(":")
        super().__init__(host.strip("[]"), int(port), max_message_size=max_message_size)
        if (stream is None) != (consumer is None):
            raise ConfigurationError("nats.consumer", "a JetStream pull needs stream and consumer")
        if queue_group is not None and stream is not None:
            raise ConfigurationError("nats.queue_group", "a JetStream consumer is shared already")
        for name, value in (("stream", stream), ("consumer", consumer)):
            if value is not None and (not value or any(c in value for c in " \t.*>/\\")):
                raise ConfigurationError(f"nats.{name}", f"bad {name} name {value!r}")
        positive = min(connect_timeout, reconnect_wait) > 0
        if batch < 1 or max_pending < batch or not positive or redelivery_delay < 0:
            raise ConfigurationError(
                "nats",
                "need batch >= 1, max_pending >= batch, connect_timeout > 0, "
                "reconnect_wait > 0, redelivery_delay >= 0",
            )
        self.url = url
        self.target = target
        self.subject = target.subject
        self.queue_group = queue_group
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self.max_pending = max_pending
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.redelivery_delay = redelivery_delay
        self.statuses: Counter[int] = Counter()
        """JetStream status messages by code: 100 (a pull's heartbeat), 404, 408 (a pull
        expired), 409 (a pull refused or ended: the consumer deleted, a limit)."""
        self._client: NatsClient | None = None
        # Handed from the reading task to the offering one, a read at a time.
        self._pending: deque[Msg] = deque()
        self._arrived = trio.Event()
        self._waiting = False
        self._ingress: Ingress | None = None
        self._acks = AckBook()
        self._writing = trio.StrictFIFOLock()
        self._live = trio.Event()
        self._pull: Pull | None = None
        self._held: list[Msg] = []
        """The pulled messages the offering task is queueing or waiting on."""
        self._ack_wait = 30.0

    @property
    def label(self) -> str:
        return f"nats:{self.host}:{self.port}/{self.subject}"

    @property
    def acked(self) -> int:
        """JetStream messages acknowledged, once the server confirmed it (:class:`AckBook`)."""
        return self._acks.acked

    @property
    def nacked(self) -> int:
        """JetStream messages whose delivery failed under ``ack="delivered"`` (``-NAK``)."""
        return self._acks.nacked

    @property
    def connects(self) -> int:
        """Connections made (the first, then each reconnection)."""
        return 0 if self._client is None else self._client.connects

    # -- running ---------------------------------------------------------------------------

    async def run(
        self, ingress: Ingress, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if ingress.ack == "delivered" and self.stream is None:
            raise ConfigurationError(
                "nats.ack", "delivered needs a JetStream consumer (stream and consumer)"
            )
        self._ingress = ingress
        client = self._client = NatsClient(
            self.target,
            self.label,
            connect_timeout=self.connect_timeout,
            reconnect_wait=self.reconnect_wait,
            setup=self._setup,
        )
        try:
            conn = await client.connect()
        except ConnectFailed as exc:
            raise TransportError(f"{self.label}: cannot subscribe: {exc}") from exc
        self._live.set()
        self.bound = [(self.host, self.port)]
        task_status.started(self.bound)
        ingress.connection_opened()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_reading, client, conn)
                nursery.start_soon(self._watch, client)
                if self.stream is None:
                    nursery.start_soon(self._take_subscribed, ingress)
                else:
                    nursery.start_soon(self._take_pulled, ingress)
                    nursery.start_soon(self._mark_in_progress)
                await ingress.wait_stopping()
                nursery.cancel_scope.cancel()
        finally:
            ingress.connection_closed()
            with trio.CancelScope(shield=True), trio.move_on_after(self.connect_timeout):
                await self._flush_acks(client)
            await client.drop()

    async def _setup(self, conn: NatsConnection) -> None:
        """On each new connection, before the reading starts: subscribe (a PING and its
        PONG: the subscription is live when the connection is handed out), or find (or
        create) the JetStream consumer. Messages that arrive meanwhile are handed over."""
        client = self._client
        assert client is not None
        others: list[Msg] = []
        if self.stream is None:
            await client.write(conn, sub(self.subject, _SUBSCRIPTION_SID, self.queue_group))
            await client.flush(conn, others=others)
        else:
            assert self.consumer is not None
            # Deleted under the source (a 409): created again from where the source was.
            start = self._acks.resume(m[0].reply or "" for m in (self._held, self._pending) if m)
            self._ack_wait = await ensure_consumer(
                client, conn, self.stream, self.consumer, self.subject, others, start
            )
        arrived = [message for message in others if _deliverable(message)]
        if arrived:
            self._hand_over(arrived)

    async def _write(self, data: bytes) -> bool:
        """Write on the current connection (one writer at a time); False if there is none or
        it broke (the reading task then reconnects)."""
        client = self._client
        assert client is not None
        async with self._writing:
            conn = client.conn
            if conn is None:
                return False
            try:
                await client.write(conn, data)
            except TRANSPORT_ERRORS:
                return False
        return True

    async def _write_confirmed(self, data: bytes, acked: int = 0, nacked: int = 0) -> bool:
        """Write ``data`` and a ``PING``, whose ``PONG`` counts ``acked`` and ``nacked``
        (:class:`AckBook`); without a connection it waits for the next."""
        client = self._client
        assert client is not None
        async with self._writing:
            conn = client.conn
            if conn is None:
                self._acks.unsent(data, acked, nacked)
                return False
            self._acks.written(data, acked, nacked)
            try:
                await client.write(conn, data + PING)
            except TRANSPORT_ERRORS:
                return False  # the reader sees the loss, and it is written again
        return True

    # -- reading (one task, the socket's only reader) ---------------------------------------

    async def _keep_reading(self, client: NatsClient, conn: NatsConnection) -> None:
        while True:
            try:
                await self._read(client, conn)
            except (*TRANSPORT_ERRORS, ConnectionLost, NatsProtocolError) as exc:
                client.errors.warning("%s: connection lost (%r); reconnecting", self.label, exc)
            self._live = trio.Event()
            await client.drop()  # wakes a write blocked on it
            async with self._writing:  # what was written on it and not confirmed: again
                self._acks.lost()
            if self._pull is not None:
                self._pull.end()  # its messages and statuses now come to no one
            self._wake()
            while True:
                await trio.sleep_until(client.retry_at)
                try:
                    conn = await client.connect()
                    break
                except ConnectFailed as exc:
                    client.errors.warning("%s: %s; retrying", self.label, exc)
            again = self._acks.take_unsent()
            if again is not None:
                await self._write_confirmed(*again)
            self._live.set()

    async def _read(self, client: NatsClient, conn: NatsConnection) -> None:
        """Read until the connection ends; hand over what each read brought at once."""
        parser = conn.parser
        pull_replies = f"{client.inbox}p."
        while True:
            await conn.receive()
            # A read's events at once; the subscription's told by their sid, without a call.
            arrived: list[Msg] = []
            while events := parser.next_events():
                for event in events:
                    if type(event) is Msg:
                        if event.sid == _SUBSCRIPTION_SID or _deliverable(event):
                            arrived.append(event)
                        elif event.subject.startswith(pull_replies) and event.status is not None:
                            self._status(event)
                        # else: a late API reply: nothing to do
                    elif type(event) is Pong:
                        self._acks.confirmed()
                    elif type(event) is Ping:
                        await self._write(PONG)
                    else:
                        await client.handle(conn, event)  # INFO; -ERR (a fatal one ends it)
            if arrived:
                self._hand_over(arrived)

    async def _watch(self, client: NatsClient) -> None:
        """After ``_PING_INTERVAL`` without a byte from the server, a ``PING``; without an
        answer in ``connect_timeout``, the connection is closed (the reader reconnects)."""
        while True:
            conn = client.conn
            if conn is None:
                await self._live.wait()
                continue
            quiet_until = conn.last_read + _PING_INTERVAL
            if trio.current_time() < quiet_until:
                await trio.sleep_until(quiet_until)
                continue
            await self._write_confirmed(b"")
            await trio.sleep(self.connect_timeout)
            if client.conn is conn and trio.current_time() - conn.last_read >= self.connect_timeout:
                client.errors.warning("%s: no answer to a PING: reconnecting", self.label)
                await client.drop()

    def _hand_over(self, arrived: list[Msg]) -> None:
        pending = self._pending
        if self.stream is not None:
            if self._pull is not None:  # bounded by the pull's batch: no room to check
                self._pull.received(len(arrived))
        else:
            if self._waiting and not pending and len(arrived) <= _QUEUE_AT_ONCE:
                arrived = self._queue_now(arrived)
                if not arrived:
                    return
            room = self.max_pending - len(pending)
            if len(arrived) > room:
                assert self._ingress is not None
                self._ingress.reject("slow_consumer", len(arrived) - room)
                arrived = arrived[:room]
        pending.extend(arrived)
        self._wake()

    def _queue_now(self, arrived: list[Msg]) -> list[Msg]:
        """A few messages while the offering task waits for more: queued from here if the
        queue takes them at once (no task switch), which is the usual case at a low rate.
        What it does not take, from the first refused on, is left for the offering task."""
        ingress = self._ingress
        assert ingress is not None
        received_at = time.time()
        origin = Origin("nats", self.label, arrived[0].subject, received_at)
        for index, message in enumerate(arrived):
            if message.subject != origin.peer:
                origin = Origin("nats", self.label, message.subject, received_at)
            if len(message.payload) > self.max_message_size:
                ingress.reject("oversize")
            elif not ingress.offer_one_nowait(message.payload, origin):
                return arrived[index:]
        return []

    def _wake(self) -> None:
        if self._waiting:
            self._waiting = False
            self._arrived.set()

    def _status(self, message: Msg) -> None:
        """A JetStream status message on a pull's reply subject."""
        code = message.status
        assert code is not None
        self.statuses[code] += 1
        pull = self._pull
        if pull is None or message.subject != pull.reply:
            return  # a pull given up (lost, or replaced): its end says nothing now
        if code == 100:
            pull.heard()
            return
        if code == 503 or (code == 409 and "Consumer Deleted" in message.description):
            raise ConnectionLost(f"the JetStream consumer is gone ({code}): set it up again")
        refused = code not in (404, 408)
        if refused:
            _errors.warning("%s: a pull ended: %s %s", self.label, code, message.description)
            self.batch = pull.batch_limit(message.description) or self.batch
        pull.end(refused=refused)
        self._wake()

    # -- offering (one task) ------------------------------------------------------------------

    async def _wait_arrivals(self) -> None:
        """Until the reader hands something over (or a pull ends)."""
        self._arrived = trio.Event()
        self._waiting = True
        await self._arrived.wait()

    async def _next_arrivals(self, limit: int) -> list[Msg]:
        """Up to ``limit`` of what the reader handed over, waiting for the first."""
        pending = self._pending
        while not pending:
            await self._wait_arrivals()
        return [pending.popleft() for _ in range(min(limit, len(pending)))]

    async def _offer(self, ingress: Ingress, messages: list[Msg]) -> list[tuple[list[Msg], Answer]]:
        """Offer ``messages``, one offer per run of the same subject (the origin's peer);
        (run, its answer) for each. Those over ``max_message_size`` are refused."""
        received_at = time.time()
        limit = self.max_message_size
        confirm = ingress.ack == "delivered"
        answers: list[tuple[list[Msg], Answer]] = []
        for run in _runs(messages):
            payloads = [m.payload for m in run]
            if max(map(len, payloads)) > limit:
                run = [m for m in run if len(m.payload) <= limit]
                ingress.reject("oversize", len(payloads) - len(run))  # acked: as large again
                if not run:
                    continue
                payloads = [m.payload for m in run]
            origin = Origin("nats", self.label, run[0].subject, received_at)
            if confirm:
                answers.append((run, await ingress.offer_later(payloads, origin)))
            else:
                await ingress.offer(payloads, origin)
        return answers

    async def _take_subscribed(self, ingress: Ingress) -> None:
        while True:
            await self._offer(ingress, await self._next_arrivals(self.batch))

    async def _take_pulled(self, ingress: Ingress) -> None:
        """Ask for ``batch`` messages; offer each read of them as it comes and acknowledge
        it; ask again once all have come (or the pull ended) and are offered."""
        client = self._client
        assert client is not None and self.stream is not None and self.consumer is not None
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}".encode()
        number = 0
        while True:
            await self._live.wait()
            number += 1
            pull = self._pull = Pull(f"{client.inbox}p.{number}", self.batch)
            if not await self._write(pub(subject, pull.reply.encode(), pull.request())):
                pull.end()
            while self._pending or not pull.ended:
                if not self._pending:
                    with trio.move_on_at(pull.silent_after()):
                        await self._wait_arrivals()
                    if not pull.ended and trio.current_time() >= pull.silent_after():
                        _errors.info("%s: a pull went silent (no heartbeat): again", self.label)
                        pull.end()
                    continue
                messages = self._held = await self._next_arrivals(self.batch)
                answers = await self._offer(ingress, messages)
                failed: list[Msg] = []
                for run, answer in answers:
                    done = await answer.wait()
                    failed += run[done:]
                await self._acknowledge(messages, failed)
                self._held = []
            if pull.refused:  # ended by the server with a complaint: not at once again
                await trio.sleep(self.reconnect_wait)

    async def _acknowledge(self, messages: list[Msg], failed: list[Msg]) -> None:
        """``+ACK`` each message (``-NAK`` the failed ones) in one write, then a ``PING``:
        its ``PONG`` counts them. Without a connection they wait for the next."""
        again = {id(message) for message in failed}
        good = [m.reply for m in messages if id(m) not in again and m.reply is not None]
        bad = [m.reply for m in failed if m.reply is not None]
        self._acks.note(good, bad)
        data = acks(good) + (acks(bad, nak(self.redelivery_delay)) if bad else b"")
        await self._write_confirmed(data, len(good), len(bad))

    async def _flush_acks(self, client: NatsClient) -> None:
        """At the end: the acks not confirmed yet, written and confirmed if they can be."""
        conn = client.conn
        if conn is not None and self.stream is not None:
            try:
                await self._acks.flush(client, conn)
            except (*TRANSPORT_ERRORS, ConnectionLost, NatsProtocolError) as exc:
                _log.debug("%s: final acks: %r", self.label, exc)

    async def _mark_in_progress(self) -> None:
        """Messages held for a third of the consumer's ``ack_wait`` (waiting for room in the
        queue, or for the sink under ``delivered``) get a ``+WPI`` (work in progress), with
        those waiting behind them, so JetStream does not deliver them again meanwhile."""
        seen: list[Msg] = []
        while True:
            await trio.sleep(self._ack_wait / 3)
            held = self._held
            if held and held is seen:
                replies = [m.reply for m in (*held, *self._pending) if m.reply is not None]
                await self._write(acks(replies, b"+WPI"))
            seen = held


def _deliverable(message: Msg) -> bool:
    """A message of the subscription, or one pulled from JetStream (its reply is where its
    ack goes), rather than a status or an API reply."""
    reply = message.reply
    return message.sid == _SUBSCRIPTION_SID or (reply is not None and reply.startswith(_ACK_PREFIX))


def _runs(messages: list[Msg]) -> list[list[Msg]]:
    """Runs of one subject (one offer each); one run, the usual case, told at C speed."""
    subjects = list(map(_subject, messages))
    if subjects and subjects.count(subjects[0]) == len(subjects):
        return [messages]
    return [list(run) for _, run in groupby(messages, _subject)]
