"""One run of ``send``: its payloads, how connections share and pace them, and the tally.

Every message ends in exactly one bucket of the :class:`SendSummary`: accepted, or rejected
under one reason. Connections :meth:`Run.claim` ranges of sequence numbers (so
``concurrency`` connections split the work without a lock: nothing awaits between reading and
advancing the counter), pace themselves on the sequence number against ``rate`` (the whole
run's rate, whatever the concurrency), and report what became of their messages.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from .._errors import GatewayError, TransportError
from ._connect import Misdirected

__all__ = ("LOST", "Run", "SendSummary", "make_payload", "run_workers", "unwrapped_errors")

CHUNK_BYTES = 256 * 1024
"""About how much one write carries."""
READ_SIZE = 64 * 1024
MAX_REPLY = 64 * 1024
"""The most of an answer's body kept (the gateway's answers are tiny JSON or protobuf)."""
USER_AGENT = "trio_gateway-send"
LOST = "connection lost"
"""The reason for messages whose fate is unknown because the gateway went away."""


def make_payload(size: int, seq: int) -> bytes:
    """A deterministic JSON document of exactly ``size`` bytes (no newline inside).

    Below 19 bytes the JSON object does not fit: the payload is then the JSON number
    ``seq mod 10**size``, right-aligned with spaces (still valid JSON, for NDJSON batches).
    """
    head = b'{"seq":%d,"data":"' % seq
    tail = b'"}'
    fill = size - len(head) - len(tail)
    if fill < 0:
        return b"%*d" % (size, seq % 10**size) if size else b""
    return head + b"x" * fill + tail


@dataclass(frozen=True, slots=True)
class SendSummary:
    """What one run did. ``accepted`` is ``None`` for TCP and UDP (they never answer)."""

    messages: int
    bytes: int
    seconds: float
    accepted: int | None = None
    rejected: Mapping[str, int] = field(default_factory=dict)
    """Messages refused, by reason: an HTTP status (``"503"``), a gRPC status name
    (``"RESOURCE_EXHAUSTED"``), a bidi ack's reason (``"queue_full"``), ``"close 1009"``."""
    resent: int = 0
    """Messages sent again (with ``retries``), each time: after a refusal that asks for it
    (HTTP ``503``/``429``, gRPC ``UNAVAILABLE``) or after a lost connection."""
    resent_after_loss: int = 0
    """The part of ``resent`` sent again on a new connection because the old one was lost
    before they were acknowledged (at-least-once: the gateway may have had them)."""
    reconnects: int = 0
    """Connections opened again after one was lost (with ``retries``)."""
    given_up: int = 0
    """Messages still refused or unacknowledged when their ``retries`` were spent (they are
    also under ``rejected``, by their last reason)."""
    sent: int | None = None
    """Messages written, when fewer than ``messages`` (a refusal or the gateway's going away
    stopped the run first); ``None`` when every message was written."""
    stopped: str | None = None
    """Why the run ended early, when the gateway went away during it (its connection lost or
    refused after it had answered); the messages it left unsettled count as ``LOST``."""

    @property
    def rejected_count(self) -> int:
        return sum(self.rejected.values())

    @property
    def all_accepted(self) -> bool:
        """True when the gateway accepted every message (TCP/UDP: every message was written)."""
        if self.stopped is not None:
            return False
        if self.accepted is None:
            return True
        return self.accepted == self.messages and not self.rejected_count

    def line(self) -> str:
        seconds = max(self.seconds, 1e-9)
        sent = self.messages if self.sent is None else self.sent
        of = "" if sent == self.messages else f" of {self.messages}"
        text = (
            f"sent {sent}{of} messages, {self.bytes} bytes in {self.seconds:.3f} s: "
            f"{sent / seconds:,.0f} msg/s, {self.bytes / seconds / 1e6:,.2f} MB/s"
        )
        if self.accepted is not None:
            text += f"; accepted {self.accepted}, rejected {self.rejected_count}"
            if self.rejected:
                reasons = sorted(self.rejected.items(), key=lambda item: (-item[1], item[0]))
                text += " (" + ", ".join(f"{reason}: {n}" for reason, n in reasons) + ")"
            if self.resent:
                refused = self.resent - self.resent_after_loss
                parts = [f"{refused} after a refusal"] if refused else []
                if self.resent_after_loss:
                    parts.append(f"{self.resent_after_loss} after a lost connection")
                text += f"; resent {self.resent} ({', '.join(parts)})"
            if self.reconnects:
                times = "time" if self.reconnects == 1 else "times"
                text += f"; reconnected {self.reconnects} {times}"
            if self.given_up:
                text += f"; gave up on {self.given_up}"
        if self.stopped is not None:
            text += f"; stopped: {self.stopped}"
        return text


class Run:
    """The messages of one run, shared by its connections: who sends which, and the tally."""

    def __init__(
        self,
        count: int,
        size: int,
        *,
        rate: float | None,
        progress: Callable[[int], None] | None,
        progress_on_write: bool = False,
    ) -> None:
        self.count = count
        self.size = size
        self.rate = rate
        # The progress bar moves as messages are answered, or, where the answer only comes
        # at the end of a connection (WebSocket, gRPC Stream), as they are written.
        self._progress = progress
        self._on_write = progress_on_write
        self._next = 0
        self.written = 0
        self.bytes = 0
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.resent = 0
        self.resent_after_loss = 0
        self.reconnects = 0
        self.given_up = 0
        self.stopped: str | None = None
        self.error: str | None = None
        self.reached = False
        """Set once the gateway answered in its protocol (an HTTP answer, the WebSocket
        handshake, the HTTP/2 preface): a connection failing after that is the gateway going
        away, not a wrong address, port or transport."""
        self.start = trio.current_time()
        self.wall = time.perf_counter()

    def chunk(self) -> int:
        """How many messages one write carries: ~256 KiB, ~100 writes a second under a rate."""
        n = max(1, CHUNK_BYTES // max(self.size, 1))
        if self.rate:
            n = max(1, min(n, math.ceil(self.rate / 100)))
        return n

    def claim(self, limit: int) -> range:
        """The next ``limit`` (or fewer) sequence numbers; empty when all are taken."""
        first = self._next
        n = min(limit, self.count - first)
        if n <= 0:
            return range(0)
        self._next = first + n
        return range(first, first + n)

    def payloads(self, seqs: range) -> list[bytes]:
        size = self.size
        return [make_payload(size, seq) for seq in seqs]

    async def pace(self, seq: int) -> None:
        """Wait until message ``seq`` is due under ``rate``."""
        if self.rate:
            delay = self.start + seq / self.rate - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)

    def wrote(self, n: int) -> None:
        self.written += n
        self.bytes += n * self.size
        if self._on_write:
            self._advance(n)

    def accept(self, n: int) -> None:
        if n > 0:
            self.accepted += n
            if not self._on_write:
                self._advance(n)

    def reject(self, reason: str, n: int) -> None:
        if n > 0:
            self.rejected[reason] += n
            if not self._on_write:
                self._advance(n)

    def reject_unsent(self, reason: str, n: int) -> None:
        """Reject messages that were claimed but never written (the refusal came first)."""
        self.reject(reason, n)
        if self._on_write:
            self._advance(n)

    def stop(self, reason: str) -> None:
        """A refusal every further message would meet: count the unsent ones under it."""
        if self.stopped is None:
            self.stopped = reason
        rest = self.count - self._next
        self._next = self.count
        self.reject_unsent(reason, rest)

    def gone(self, exc: TransportError, *, written: int, unsent: int) -> None:
        """A connection failed with ``written`` messages unsettled and ``unsent`` claimed.

        Before the gateway ever answered, that is the run's error (a wrong address, port or
        transport): raised. After it, the gateway went away (it stopped, or something cut the
        connection): those messages and every one not claimed yet count as :data:`LOST`, the
        run stops, and the summary says why."""
        if not self.reached or isinstance(exc, Misdirected):
            raise exc
        if self.error is None:
            self.error = str(exc)
        self.reject(LOST, written)
        self.reject_unsent(LOST, unsent)
        self.stop(LOST)

    def _advance(self, n: int) -> None:
        if self._progress is not None and n > 0:
            self._progress(n)

    def summary(self, *, answers: bool = True) -> SendSummary:
        """The summary; without ``answers`` (TCP, UDP) it counts what was written."""
        if not answers:
            return SendSummary(
                self.written, self.bytes, time.perf_counter() - self.wall, stopped=self.error
            )
        return SendSummary(
            self.count,
            self.bytes,
            time.perf_counter() - self.wall,
            accepted=self.accepted,
            rejected=dict(self.rejected),
            resent=self.resent,
            resent_after_loss=self.resent_after_loss,
            reconnects=self.reconnects,
            given_up=self.given_up,
            sent=self.written if self.written < self.count else None,
            stopped=self.error,
        )


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


@contextmanager
def unwrapped_errors() -> Iterator[None]:
    """Raise a nursery's :class:`GatewayError` as itself, not inside an exception group (the
    first one: the others are usually the same failure seen by another task)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if all(isinstance(leaf, GatewayError) for leaf in leaves):
            raise leaves[0] from leaves[0].__cause__
        raise


async def run_workers(concurrency: int, worker: Callable[[], Awaitable[None]]) -> None:
    """Run ``concurrency`` workers; a failure of theirs is raised as itself."""
    with unwrapped_errors():
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
