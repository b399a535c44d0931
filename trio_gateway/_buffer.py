"""The gateway's queue: any :class:`~trio_gateway.queues.Queue` of payloads, plus their origins.

The queue itself stays generic (it holds ``bytes``); this wrapper keeps, beside it, the origins
as runs ``[origin, count]`` in queue order. Whatever the queue's policy removes, it removes
from the head (``drop_oldest``) or never admits (``drop_newest``, ``block``), so after every
put the runs are trimmed at the head until they add up to the queue's depth again. Every
method is synchronous between the queue operation and the bookkeeping, so no other task can
observe them out of step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from ._message import Batch, Origin
from .queues import Queue

__all__ = ("UNKNOWN_ORIGIN", "MessageBuffer", "tune_allocator")

UNKNOWN_ORIGIN = Origin("unknown", "", "", 0.0)
"""The origin reported for items that reached the queue without going through the buffer."""


class MessageBuffer:
    """A queue of payloads with their origins kept as runs (see the module docstring)."""

    __slots__ = ("_held", "_runs", "queue")

    def __init__(self, queue: Queue[bytes]) -> None:
        self.queue = queue
        self._runs: deque[list[Any]] = deque()  # [origin, count], mutable to trim in place
        self._held = 0

    @property
    def policy(self) -> str:
        return self.queue.policy

    def __len__(self) -> int:
        return len(self.queue)

    def put_many_nowait(
        self, payloads: Sequence[bytes], origin: Origin, *, drop: bool = True
    ) -> int:
        """Offer ``payloads`` (all from ``origin``); returns how many the queue accepted."""
        accepted = self.queue.put_many_nowait(payloads, drop=drop)
        if accepted:
            self._runs.append([origin, accepted])
            self._held += accepted
        excess = self._held - len(self.queue)
        if excess > 0:
            self._drop_head(excess)
        return accepted

    def _drop_head(self, n: int) -> list[tuple[Origin, int]]:
        """Remove ``n`` messages' worth of runs from the head; return them."""
        taken: list[tuple[Origin, int]] = []
        runs = self._runs
        self._held = max(self._held - n, 0)
        while n:
            if not runs:
                # Items put into the queue directly, not through this buffer: origin unknown.
                taken.append((UNKNOWN_ORIGIN, n))
                break
            run = runs[0]
            origin, count = run
            if count <= n:
                runs.popleft()
                taken.append((origin, count))
                n -= count
            else:
                run[1] = count - n
                taken.append((origin, n))
                n = 0
        return taken

    def get_batch_nowait(self, max_items: int) -> Batch:
        """Take up to ``max_items``; :class:`trio.WouldBlock` / :class:`trio.EndOfChannel`."""
        payloads = self.queue.get_batch_nowait(max_items)
        return Batch(payloads, self._drop_head(len(payloads)))

    async def get_batch(self, max_items: int) -> Batch:
        """Wait for at least one message, then take up to ``max_items``.

        Always a checkpoint, and never cancelled between taking the messages and returning
        them (the same discipline as :meth:`trio.MemoryReceiveChannel.receive`).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                batch = self.get_batch_nowait(max_items)
            except trio.WouldBlock:
                await self.queue.wait_not_empty()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return batch


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned: bool | None = None


def tune_allocator(*, trim_threshold: int = 256 << 20, mmap_threshold: int = 32 << 20) -> bool:
    """Let the process reuse freed message memory instead of handing it back after each batch.

    glibc's ``free`` returns the top of the heap to the kernel whenever more than
    ``M_TRIM_THRESHOLD`` (128 KiB by default) is free there. A gateway frees whole batches of
    messages at once, so with large messages every batch went back to the kernel and the next
    reads faulted it in again, page by page: 5 to 7 page faults per 79,435-byte message, which
    cost the TCP source about 40% of its time (measured: 60 us per message instead of 36).
    This sets glibc's trim threshold to ``trim_threshold`` (at most that much free memory is
    kept) and its mmap threshold to ``mmap_threshold`` (larger blocks still come from ``mmap``
    and go back at once), once per process. ``serve`` calls it; a program embedding a gateway
    may. Returns whether the settings are in effect: False where the C library is not glibc
    (nothing is changed there).
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): leave it be
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. The mmap threshold first: setting it explicitly also
    # stops glibc from moving both thresholds on its own.
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    return _tuned
