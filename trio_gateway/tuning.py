"""Process-wide tuning a gateway process applies once at start (``serve`` and its workers do).

Not part of the gateway objects' API: these change the whole process (its C library's
allocator, its garbage collector), so a program that embeds a gateway decides for itself
whether to call them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys

__all__ = ("freeze_startup_objects", "tune_allocator")

_log = logging.getLogger("trio_gateway.tuning")  # stdlib only: tuning imports none of ours
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
    and go back at once), once per process, with ``mallopt``. ``serve`` calls it (and each
    worker of ``serve --workers N``); a program embedding a gateway may. Returns whether the
    settings are in effect: False where the C library is not glibc (nothing is changed there).
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


def freeze_startup_objects() -> int:
    """Take what the process holds once it is up out of the cyclic garbage collector's sight.

    A running gateway creates few long-lived objects, but its imports and start leave tens
    of thousands (about 45,000 with the WebSocket source and sink), and every full collection
    walks them all: 20 to 30 ms on the reference machine, during which nothing is read or
    sent. In the chat relay at 10,000 msg/s one such pause held 291 messages past the p99
    (docs/benchmarks.md). This collects once (the start's own garbage), then moves every
    object left to the permanent generation with :func:`gc.freeze`, so later collections
    only see what was created after it: a full collection then costs what the live traffic
    holds. The collector keeps running; frozen objects are simply never collected (their
    cycles, if any, live as long as the process). ``serve`` calls it once its listeners are
    bound (each worker of ``serve --workers N`` too); a program embedding a gateway may call
    it when its own start is done. Logs and returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    _log.debug("froze %d objects of the start (gc.freeze)", frozen)
    return frozen
