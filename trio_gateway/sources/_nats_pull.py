"""The NATS source's JetStream side: finding (or creating) the durable pull consumer, and the
state of one pull request (``$JS.API.CONSUMER.MSG.NEXT``) as the reading task sees it.

A pull asks for ``batch`` messages with an expiry and an idle heartbeat. JetStream delivers
them with their own subject and a ``$JS.ACK...`` reply subject (where the ack goes), and says
the rest with status messages on the request's reply subject: ``100 Idle Heartbeat`` while it
has nothing, ``408 Request Timeout`` when the request expired, ``404 No Messages``, ``409``
when it refused or ended the request (a limit of the consumer, a leadership change, the
consumer deleted). A pull that hears nothing for three heartbeats is given up and asked
again (a server may lose a request, as in a leadership change).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable

import trio

from ..sinks._nats_conn import NatsClient, NatsConnection, describe_error
from ..sinks._nats_protocol import PING, Msg, NatsError, Pong

__all__ = ("PULL_EXPIRES", "PULL_HEARTBEAT", "AckBook", "Pull", "ensure_consumer")

PULL_EXPIRES = 30.0
"""Seconds a pull request waits on the server for its ``batch`` before it expires (408)."""
PULL_HEARTBEAT = 5.0
"""Seconds between the server's idle heartbeats on a waiting pull."""
_MAX_BATCH = re.compile(r"MaxRequestBatch of (\d+)")


class Pull:
    """One pull request: how many of its messages came, and whether it is over."""

    __slots__ = ("batch", "count", "ended", "last_heard", "refused", "reply")

    def __init__(self, reply: str, batch: int) -> None:
        self.reply = reply
        """Where its messages' statuses come (``<inbox>p.<number>``)."""
        self.batch = batch
        self.count = 0
        self.ended = False
        self.refused = False
        """Ended by the server with a complaint (a 409 but for the consumer's deletion)."""
        self.last_heard = trio.current_time()

    def request(self) -> bytes:
        """The body of its ``MSG.NEXT`` request."""
        return json.dumps(
            {
                "batch": self.batch,
                "expires": round(PULL_EXPIRES * 1e9),
                "idle_heartbeat": round(PULL_HEARTBEAT * 1e9),
            }
        ).encode()

    def received(self, count: int) -> None:
        self.count += count
        self.last_heard = trio.current_time()
        if self.count >= self.batch:
            self.ended = True

    def heard(self) -> None:
        self.last_heard = trio.current_time()

    def end(self, *, refused: bool = False) -> None:
        self.ended = True
        self.refused = refused

    def silent_after(self) -> float:
        """When (``trio.current_time()``) to give it up if nothing more is heard."""
        return self.last_heard + 3 * PULL_HEARTBEAT

    @staticmethod
    def batch_limit(description: str) -> int | None:
        """The consumer's limit when a 409 says the batch is over it."""
        found = _MAX_BATCH.search(description)
        return int(found[1]) if found and int(found[1]) > 0 else None


def stream_sequence(reply: str) -> int:
    """The stream sequence in a JetStream message's ack subject (``$JS.ACK.<stream>.
    <consumer>.<delivered>.<stream seq>...``, or the form with a domain and an account
    hash); 0 if it holds none."""
    tokens = reply.split(".")
    token = tokens[5] if len(tokens) == 9 else tokens[7] if len(tokens) >= 11 else ""
    return int(token) if token.isdigit() else 0


async def ensure_consumer(
    client: NatsClient,
    conn: NatsConnection,
    stream: str,
    consumer: str,
    subject: str,
    others: list[Msg],
    start: int | None = None,
) -> float:
    """Find the durable consumer, or create it (explicit acks, every message of the stream
    on ``subject``, or from stream sequence ``start`` on) as nats-py's ``pull_subscribe``
    did, and return its ``ack_wait`` in seconds; a push consumer, or a stream that does not
    exist, is a :class:`NatsError`. What else arrives meanwhile (a pull of the connection
    before, still delivering to the same inbox) goes to ``others``."""
    info = f"$JS.API.CONSUMER.INFO.{stream}.{consumer}"
    found = await client.api(conn, info, None, others=others)
    error = found.get("error")
    if error is None:
        config = found.get("config")
        if isinstance(config, dict) and config.get("deliver_subject"):
            raise NatsError(f"consumer {consumer} of stream {stream} is a push consumer")
        return _ack_wait(config)
    if not isinstance(error, dict) or error.get("code") != 404 or error.get("err_code") == 10059:
        raise NatsError(f"consumer {consumer} of stream {stream}: {describe_error(error)}")
    wanted: dict[str, object] = {
        "name": consumer,
        "durable_name": consumer,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "filter_subject": subject,
    }
    if start is not None:  # deleted under a running source: on from where it was
        wanted["deliver_policy"] = "by_start_sequence"
        wanted["opt_start_seq"] = start
    version = str(conn.info.fields.get("version", "0.0"))
    major, minor = (int(part) if part.isdigit() else 0 for part in version.split(".")[:2])
    # Named consumers since nats-server 2.9; the older durable-only subject before.
    create = "CREATE" if (major, minor) >= (2, 9) else "DURABLE.CREATE"
    answer = await client.api(
        conn,
        f"$JS.API.CONSUMER.{create}.{stream}.{consumer}",
        {"stream_name": stream, "config": wanted},
        others=others,
    )
    error = answer.get("error")
    if error is not None:
        raise NatsError(
            f"cannot create consumer {consumer} of stream {stream}: {describe_error(error)}"
        )
    return _ack_wait(answer.get("config"))


def _ack_wait(config: object) -> float:
    """A consumer's ``ack_wait`` in seconds (JetStream's default, 30 s, if it says none)."""
    wait = config.get("ack_wait") if isinstance(config, dict) else None
    return wait / 1e9 if isinstance(wait, int) and wait > 0 else 30.0


class AckBook:
    """The acks (``+ACK``, ``-NAK``) between the source and the server: each write of them
    is followed by a ``PING``, whose ``PONG`` confirms it (then they are counted); what was
    written on a connection since lost, or while there was none, is written again on the
    next (an ack given twice is harmless)."""

    def __init__(self) -> None:
        self.acked = 0
        self.nacked = 0
        self._unconfirmed: deque[tuple[bytes, int, int]] = deque()
        self._unsent: list[tuple[bytes, int, int]] = []
        self._acked_to = 0  # about the highest stream sequence acked (+ACK written)
        self._nacked: set[int] = set()  # stream sequences -NAK'ed and not acked since

    def note(self, good: list[str], bad: list[str]) -> None:
        """The ack subjects of a read about to be acked (``good``) and nak'ed (``bad``)."""
        if good:
            ends = stream_sequence(good[0]), stream_sequence(good[-1])
            self._acked_to = max(self._acked_to, *ends)
            if self._nacked:
                self._nacked.difference_update(map(stream_sequence, good))
        self._nacked.update(map(stream_sequence, bad))

    def resume(self, unacked: Iterable[str]) -> int | None:
        """Where a consumer created again under the source starts (deleted while it ran):
        the lowest stream sequence not acknowledged (nak'ed, or among the ack subjects of
        the first messages held and pending, ``unacked``), else the one after the highest
        acknowledged; None before any (a new consumer starts at the stream's first). Too low
        only delivers some again: the first and last of a read stand for it (JetStream
        delivers new messages in order, and a redelivery is among the nak'ed)."""
        starts = [*self._nacked, *map(stream_sequence, unacked)]
        if self._acked_to:
            starts.append(self._acked_to + 1)
        return max(1, min(starts)) if starts else None

    @property
    def unconfirmed(self) -> bool:
        return bool(self._unconfirmed)

    def written(self, data: bytes, acked: int, nacked: int) -> None:
        """Written, with a ``PING`` after (in the order of the writes)."""
        self._unconfirmed.append((data, acked, nacked))

    def unsent(self, data: bytes, acked: int, nacked: int) -> None:
        self._unsent.append((data, acked, nacked))

    def confirmed(self) -> None:
        """A ``PONG``: the oldest write is confirmed."""
        if self._unconfirmed:
            _, acked, nacked = self._unconfirmed.popleft()
            self.acked += acked
            self.nacked += nacked

    def lost(self) -> None:
        """The connection is gone: what it did not confirm is to be written again."""
        self._unsent[:0] = self._unconfirmed
        self._unconfirmed.clear()

    async def flush(self, client: NatsClient, conn: NatsConnection) -> None:
        """At the end, the source's reading task over: write what is unsent, and read until
        the server has confirmed every write."""
        again = self.take_unsent()
        if again is not None:
            self.written(*again)
            await client.write(conn, again[0] + PING)
        while self._unconfirmed:
            event = await conn.next_event()
            if type(event) is Pong:
                self.confirmed()
            elif type(event) is not Msg:
                await client.handle(conn, event)

    def take_unsent(self) -> tuple[bytes, int, int] | None:
        """Everything to write again, as one write."""
        entries, self._unsent = self._unsent, []
        if not entries:
            return None
        return (
            b"".join(data for data, _, _ in entries),
            sum(acked for _, acked, _ in entries),
            sum(nacked for _, _, nacked in entries),
        )
