"""Newline frames still in the chunk they arrived in: many messages held as one object.

Splitting a read of 18-byte frames into one ``bytes`` each costs an allocation per message,
and freeing them another; that was most of what streaming TCP spent per message. A
:class:`Frames` holds a read's complete frames as the one ``bytes`` they came in (each frame
followed by ``b"\\n"``), with their count and payload bytes, so the source, the ring buffer
and the pump move and count them with no step per message. It is a ``Sequence[bytes]``: the
payloads are split out (once, cached) only when something asks for them one by one, such as
a processor, a sink that formats each message, or a drop policy.

A queue can take part of it (``frames[:k]``): the cut is found with ``bytes.count`` and
``bytes.rfind`` (C speed), by interpolation on the average frame length, never by walking
frame by frame. A chunk the decoder counted block by block carries those counts
(``marks``), so a cut counts one block of :data:`MARK_STEP` bytes, not the frames before it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import overload

__all__ = ("Frames",)

_NL = b"\n"
MARK_STEP = 4096
"""Bytes between two marks (:class:`Frames`); the newline decoder's ``MARK_STEP``."""


class Frames(Sequence[bytes]):
    """``nframes`` newline-terminated frames in ``data[start:end]`` (none empty, the last byte
    a newline); ``nbytes`` is their payload bytes (newlines left out)."""

    __slots__ = ("_base", "_known", "_marks", "_split", "data", "end", "nbytes", "nframes", "start")

    def __init__(
        self,
        data: bytes,
        nframes: int,
        start: int = 0,
        end: int | None = None,
        *,
        marks: list[int] | None = None,
        base: int = 0,
    ) -> None:
        self.data = data
        self.start = start
        self.end = len(data) if end is None else end
        self.nframes = nframes
        self.nbytes = self.end - start - nframes
        self._split: list[bytes] | None = None
        self._known = (0, start)  # (k, position just after the k-th newline): the last cut
        self._marks = marks or None  # newlines in data[:i * MARK_STEP], i = 0, 1, ...
        self._base = base  # newlines in data[:start] (with marks)

    def __len__(self) -> int:
        return self.nframes

    def split(self) -> list[bytes]:
        """The payloads, one ``bytes`` each (split once, then cached)."""
        if self._split is None:
            data, start, end = self.data, self.start, self.end
            if start == 0 and end == len(data):
                parts = data.split(_NL)
                parts.pop()  # after the last newline: empty
            else:
                parts = data[start : end - 1].split(_NL)
            self._split = parts
        return self._split

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.split())

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if not isinstance(index, slice):
            return self.split()[index]
        first, stop, step = index.indices(self.nframes)
        if step != 1:
            return self.split()[index]
        if stop <= first:
            return Frames(b"", 0)
        if first == 0 and stop == self.nframes:
            return self
        if self._split is not None:
            return self._split[first:stop]
        start = self._after(first) if first else self.start
        end = self._after(stop) if stop < self.nframes else self.end
        return Frames(
            self.data, stop - first, start, end, marks=self._marks, base=self._base + first
        )

    def cut(self, k: int) -> tuple[Frames, Frames]:
        """The first ``k`` frames and the rest (``0 < k < nframes``), both packed."""
        at = self._after(k)
        marks, base = self._marks, self._base
        return (
            Frames(self.data, k, self.start, at, marks=marks, base=base),
            Frames(self.data, self.nframes - k, at, self.end, marks=marks, base=base + k),
        )

    def _after(self, k: int) -> int:
        """The position just after the ``k``-th newline (``0 < k < nframes``).

        Interpolation: guess from the average frame length, count the newlines up to the
        guess (``bytes.count``), and narrow the bracket; frames of even lengths take one or
        two guesses. The last cut found narrows the next one's bracket: a producer re-offering
        ``frames[done:]`` as the queue makes room does not count from the start each time.
        """
        lo, lo_n = self.start, 0  # lo_n newlines in data[start:lo]
        hi, hi_n = self.end, self.nframes
        known_n, known = self._known
        if known_n == k:
            return known
        marks = self._marks
        if marks is not None:  # the block that holds the k-th newline
            base = self._base
            i = bisect_left(marks, base + k)  # marks[i - 1] < base + k <= marks[i]
            if (i - 1) * MARK_STEP > lo:
                lo, lo_n = (i - 1) * MARK_STEP, marks[i - 1] - base
            if i * MARK_STEP < hi:
                hi, hi_n = i * MARK_STEP, marks[i] - base
        if known_n and lo_n < known_n < k:
            lo, lo_n = known, known_n
        elif known_n and k < known_n < hi_n:
            hi, hi_n = known, known_n
        at = self._find(k, lo, lo_n, hi, hi_n)
        self._known = (k, at)
        return at

    def _find(self, k: int, lo: int, lo_n: int, hi: int, hi_n: int) -> int:
        data = self.data
        while True:
            if hi_n == k:  # the k-th newline is the last one before hi
                return data.rfind(_NL, lo, hi) + 1
            if lo_n == k - 1:  # the k-th newline is the first one from lo
                return data.find(_NL, lo, hi) + 1
            guess = lo + (hi - lo) * (k - lo_n) // (hi_n - lo_n)
            guess = min(max(guess, lo + 1), hi - 1)
            n = lo_n + data.count(_NL, lo, guess)
            if n >= k:
                hi, hi_n = guess, n
            else:
                lo, lo_n = guess, n

    def __repr__(self) -> str:
        return f"<Frames {self.nframes} frames, {self.nbytes} bytes>"
