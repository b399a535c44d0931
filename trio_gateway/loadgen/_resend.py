"""``send --retries``: what one connection of a run does when the gateway refuses for now or
goes away, so that a run survives the gateway's restart.

Each worker keeps what it sent until the gateway acknowledges it. After a refusal that asks to
come back (HTTP ``503``/``429``, gRPC ``UNAVAILABLE``, a WebSocket handshake ``503``/``429`` or a
close ``1001``/``1012``/``1013``) or a lost connection (reset, refused, closed before the
answer), it waits, connects again if it must, and sends the unacknowledged messages again, with
the same sequence numbers (so with ``--ids`` the same ids: the gateway and a JetStream sink drop
the copies). That is at-least-once: the gateway may have queued a message whose answer the
crash took. A worker tries at most ``retries`` times in a row without progress (an answer to a
request, an ack on a stream); then it gives up, and the run ends as it would without retries.
The first contact is not retried: a refused first connection is a wrong address, not a restart.
"""

from __future__ import annotations

import random

import trio

from .._errors import TransportError
from ._connect import Misdirected
from ._run import Run

__all__ = ("RETRYABLE_CLOSES", "Resender", "backoff")

RETRYABLE_CLOSES = frozenset({1001, 1012, 1013})
"""WebSocket close codes that say "come back later": going away, restarting, try again."""
_FIRST_WAIT = 0.1
_MAX_WAIT = 5.0


def backoff(tries: int) -> float:
    """Seconds to wait before try number ``tries`` (1-based): 0.1 s doubling up to 5 s, with
    jitter (half to all of it), so the connections of a run do not come back in step."""
    ceiling = min(_MAX_WAIT, _FIRST_WAIT * 2 ** (tries - 1))
    return random.uniform(ceiling / 2, ceiling)


class Resender:
    """One worker's budget of tries, and the run's counts of what it resent and gave up."""

    def __init__(self, run: Run, retries: int) -> None:
        self.run = run
        self.retries = retries
        self.tries = 0  # in a row, without progress
        self._lost = False  # the connection was lost: the next one counts as a reconnect

    def progress(self) -> None:
        """The gateway answered or acknowledged: the next failure starts a fresh count."""
        self.tries = 0

    def spend(self, n: int) -> bool:
        """One more try for ``n`` unacknowledged messages: False, and ``n`` counted as given
        up, once ``retries`` tries in a row are spent (nothing is counted without retries)."""
        if self.tries >= self.retries:
            if self.retries:
                self.run.given_up += n
            return False
        self.tries += 1
        return True

    async def lost(self, exc: TransportError, n: int) -> bool:
        """The connection failed (or the gateway closed it to come back) with ``n`` messages
        unacknowledged: wait and return True for the caller to connect again and resend them;
        False when the tries are spent. Raises ``exc`` when trying again cannot help: the
        gateway was never reached (a wrong address), or another protocol answered."""
        if not self.run.reached or isinstance(exc, Misdirected):
            raise exc
        if not self.spend(n):
            return False
        self._lost = True
        await trio.sleep(backoff(self.tries))
        return True

    async def refused(self, n: int, wait: float | None = None) -> bool:
        """A refusal that asks to come back: wait (``wait``, else the backoff) and return True
        for the caller to send the ``n`` messages again; False when the tries are spent."""
        if not self.spend(n):
            return False
        await trio.sleep(backoff(self.tries) if wait is None else wait)
        return True

    def connected(self) -> None:
        """A connection is open (count it when it replaces a lost one)."""
        if self._lost:
            self._lost = False
            self.run.reconnects += 1

    def resending(self, n: int, *, after_loss: bool) -> None:
        """``n`` messages are being written again."""
        self.run.resent += n
        if after_loss:
            self.run.resent_after_loss += n

    def take_again(self, again: list[int], per_write: int) -> list[int]:
        """The next write's worth of what a lost connection left (taken off ``again``),
        counted as resent after a loss: a streaming writer's first job after reconnecting."""
        chunk = again[:per_write]
        del again[: len(chunk)]
        self.resending(len(chunk), after_loss=True)
        return chunk
