"""Sending a batch until it goes through or the retry policy gives up.

The gateway's pump and each fan-out branch send batches to a sink the same way: exponential
backoff with full jitter, at least the ``Retry-After`` a destination asks for, no retry once
the destination is gone (:class:`~trio_gateway.SinkUnavailable`). One loop serves both; each
keeps its own counters through the ``failed`` callback.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ._errors import ConfigurationError, SinkError, SinkUnavailable
from ._log import RateLimitedLogger

__all__ = ("RetryPolicy", "send_with_retry")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the pump retries a batch the sink failed to send: exponential backoff, full jitter.

    ``max_attempts=None`` retries until the gateway stops (then the batch is abandoned at the
    drain deadline, never silently lost); a number gives up after that many attempts and counts
    the batch as ``sink_failed``.
    """

    initial: float = 0.1
    maximum: float = 5.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ConfigurationError("retry", "need 0 < initial <= maximum and multiplier >= 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ConfigurationError("retry.max_attempts", "must be at least 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): full jitter."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


async def send_with_retry(
    send: Callable[[], Awaitable[None]],
    policy: RetryPolicy,
    *,
    sink: str,
    log: RateLimitedLogger,
    failed: Callable[[SinkError, bool], None],
    final: tuple[type[Exception], ...] = (),
) -> float | None:
    """Call ``send`` until it succeeds (the seconds the successful call took) or ``policy``
    gives up (None).

    Each failure is passed to ``failed`` as a :class:`SinkError` (another exception wrapped,
    its ``repr`` kept), with whether a retry follows: the caller counts it and shows it as its
    sink's problem. :class:`SinkUnavailable` propagates after that (retrying cannot help);
    the exceptions in ``final`` propagate untouched, neither counted nor retried (the pump's
    :class:`~trio_gateway.SinkRefused`: delivered but for a part refused for good).
    """
    attempt = 0
    while True:
        attempt += 1
        started = time.perf_counter()
        try:
            await send()
        except final:
            raise
        except SinkUnavailable as exc:
            failed(exc, False)
            raise
        except Exception as exc:
            problem = exc if isinstance(exc, SinkError) else SinkError(repr(exc))
            limit = policy.max_attempts
            if limit is not None and attempt >= limit:
                failed(problem, False)
                log.warning("sink %s: send failed %d times, giving up: %r", sink, attempt, exc)
                return None
            delay = policy.delay(attempt)
            if isinstance(exc, SinkError) and exc.retry_after is not None:
                delay = max(delay, exc.retry_after)  # the destination asked for it
            failed(problem, True)
            log.warning("sink %s: send failed (%r); retry %d in %.2f s", sink, exc, attempt, delay)
            await trio.sleep(delay)
        else:
            return time.perf_counter() - started
