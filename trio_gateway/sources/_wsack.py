"""The WebSocket ack subprotocol (``trio-gateway.ack.v1``) and the connection writer.

A client that offers :data:`ACK_SUBPROTOCOL` gets it selected and receives, after each read's
messages are offered to the queue, at most one text frame
``{"acked":N,"refused":[[first,last,"reason"],...]}`` (``docs/websocket.md``).
:class:`AckState` is the sans-IO bookkeeping; :class:`AckConnection` writes the acks beside
the protocol's own frames, so that a peer that does not read them never holds up the reader.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from .._budget import ConnectionShare
from .._ingress import NOT_DELIVERED, Answer, Ingress
from .._message import Origin
from .._wire import ACK_SUBPROTOCOL
from ._flight import Flight

__all__ = (
    "ACK_SUBPROTOCOL",
    "MAX_ACK_RANGES",
    "AckConnection",
    "AckState",
    "Connection",
    "acked_offer",
    "select_ack",
)

MAX_ACK_RANGES = 64
"""The most refused ranges one ack carries. When a connection's unsent ack holds this many
(its refusals keep alternating with acceptances and the peer does not read its acks), the
source stops reading that connection until the ack is on its way."""

Outcome = Callable[[int, int], tuple[int, str]]
"""From (messages the answer allows to acknowledge, messages in the read): how many are
acknowledged, and the reason the rest are refused."""


def select_ack(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
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


class Connection:
    """One WebSocket connection: the protocol object and its writer lock."""

    __slots__ = ("lock", "protocol", "stream")

    answers_held = 0
    """Bytes held for the acks the connection owes, charged to its share of the memory
    budget beside what its reader holds (:class:`AckConnection`'s reads in flight)."""

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


class AckConnection(Connection):
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

    __slots__ = (
        "_close_written",
        "_flight",
        "_reading",
        "_share",
        "_taken",
        "_wake",
        "acking",
        "acks",
        "answers_held",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: ServerProtocol,
        share: ConnectionShare,
        reading: Callable[[], int],
    ) -> None:
        """``share``: the connection's share of the memory budget, which also holds what
        ``reading()`` says its reader holds."""
        super().__init__(stream, protocol)
        self.acks = AckState()
        self.acking = True  # False once no ack can be sent any more
        self._close_written = False
        self._wake = trio.lowlevel.ParkingLot()  # send_acks waits here for something to send
        self._taken = trio.lowlevel.ParkingLot()  # the reader waits here while acks are full
        self._share = share
        self._reading = reading
        self.answers_held = 0
        # Reads whose answer waits (delivery, a commit), oldest first; what each holds is
        # charged to the share: a connection cannot make the gateway keep answers for
        # thousands of one-message reads beyond its share (a read the share has no room
        # for waits until nothing older is in flight).
        self._flight: Flight[tuple[int, int, Outcome]] = Flight(
            hold=self._hold_answers, release=self._release_answers
        )

    def _hold_answers(self, n: int) -> bool:
        """Charge ``n`` more bytes of answers: at most half the share, so that the reader
        keeps room to grow its buffer and gather a message's fragments."""
        held = self.answers_held + n
        share = self._share
        if held > share.budget.connection_share // 2 or not share.hold_nowait(
            self._reading() + held
        ):
            return False
        self.answers_held += n
        return True

    def _release_answers(self, n: int) -> None:
        self.answers_held -= n
        self._share.hold_nowait(self._reading() + self.answers_held)  # less: always room

    async def answer(self, answer: Answer, n: int, nbytes: int, outcome: Outcome) -> None:
        """Record the answer to the next read of ``n`` messages: at once when it is final and
        nothing is in flight, otherwise once it is (by :meth:`answer_in_order`), in order.
        Waits while the reads in flight hold :data:`~._flight.MAX_IN_FLIGHT` messages or
        :data:`~._flight.MAX_IN_FLIGHT_BYTES`."""
        if not self.acking:  # no ack can be sent any more: nothing to wait for
            answer.forget()
            return
        if answer.final and not self._flight:
            done, reason = outcome(answer.accepted, n)
            await self.record(done, n - done, reason)
            return
        await self._flight.add(answer, n, nbytes, (n, answer.accepted, outcome))

    async def answer_in_order(self) -> None:
        """A task of the connection: wait for the oldest read's answer, record it, and so on.
        At its end the answers still in flight are forgotten (never acknowledged)."""

        async def record(item: tuple[int, int, Outcome], delivered: int) -> None:
            n, queued, outcome = item
            done, reason = outcome(queued, n)
            if delivered < done:  # taken by the queue, not confirmed by the sink
                await self.record(delivered, done - delivered, NOT_DELIVERED)
                if n > done:
                    await self.record(0, n - done, reason)
            else:
                await self.record(done, n - done, reason)

        await self._flight.answer_in_order(record)

    async def wait_answered(self) -> None:
        """Wait until every read in flight is answered (before the reply to the client's
        close frame, which no ack may follow)."""
        await self._flight.wait_answered()

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
        self._flight.close()

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
        closing = False
        try:
            while True:
                while not self.acks.pending:
                    await self._wake.park()
                async with self.lock:
                    if self.protocol.close_sent is not None:
                        # The close frame is queued, maybe not written yet: the write that
                        # carries it takes the last ack, so the reader's records until then
                        # must still count (acking stays on until _outgoing writes it).
                        closing = not self._close_written
                        return
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
            if not closing:
                self._stop_acking()


def acked_offer(
    ingress: Ingress, connection: AckConnection
) -> Callable[[list[bytes], Origin], Awaitable[int]]:
    """``ingress.offer`` for a connection with acks: offer, then record how it went.

    ``block``: waits for room, so everything is accepted (unless the queue closed: the
    rest is refused ``gateway_stopping``, and abandoned in the ledger). ``drop_newest``:
    what does not fit is refused ``queue_full`` and counted as rejected (the sender knows),
    not received and dropped. ``drop_oldest``: everything is accepted; older messages make
    room (the ledger's ``dropped``, as for any connection); with ``ack = "delivered"`` what
    was evicted or failed at the sink is refused.

    An answer that waits (``ack = "delivered"``, a disk queue) does not hold the reader: it
    goes in flight (:meth:`AckConnection.answer`) and is recorded in order once final.
    """
    queue = ingress.buffer.queue
    policy = queue.policy
    # drop_oldest takes every batch whole, so "queued" acks all of it; "delivered" acks only
    # what the sink confirmed (the answer's own count).
    takes_all = policy == "drop_oldest" and ingress.ack != "delivered"

    def outcome(done: int, n: int) -> tuple[int, str]:
        if takes_all and not queue.closed:
            done = n  # the queue took the batch (it may drop its head: "dropped")
        return done, "gateway_stopping" if queue.closed else "queue_full"

    async def offer(payloads: list[bytes], origin: Origin) -> int:
        if policy == "drop_newest":
            answer = await ingress.offer_or_reject_later(payloads, origin)
        else:
            answer = await ingress.offer_later(payloads, origin)
        await connection.answer(answer, len(payloads), sum(map(len, payloads)), outcome)
        return answer.accepted

    return offer
