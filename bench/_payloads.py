"""Deterministic payloads shared by every benchmark: the talk's four message sizes.

``payload(size, seq)`` is a JSON document of exactly ``size`` bytes with no newline in it, so
the same bytes work for newline framing, length prefixes, HTTP bodies, WebSocket messages
and gRPC ``bytes`` fields. The sequence number is in the document (``"seq"``, or ``"s"`` when
the size is too small for the long form) and the padding differs with it, so payloads of one
size are distinct, and equal across runs and machines.
"""

from __future__ import annotations

import json
from functools import lru_cache

__all__ = ("SIZES", "payload", "payloads")

SIZES: tuple[int, ...] = (18, 4266, 6786, 79435)
"""The message sizes of the talk's tables, in bytes."""

_ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_PAD = _ALPHABET * (SIZES[-1] // len(_ALPHABET) + 2)


def _padding(n: int, seq: int) -> bytes:
    if n <= len(_PAD) - len(_ALPHABET):
        start = seq % len(_ALPHABET)
        return _PAD[start : start + n]
    return (_ALPHABET * (n // len(_ALPHABET) + 2))[seq % len(_ALPHABET) :][:n]


def payload(size: int, seq: int = 0) -> bytes:
    """A JSON document of exactly ``size`` bytes for message number ``seq``.

    ``{"seq":N,"data":"..."}`` when it fits, else ``{"s":N,"d":"..."}``, else ``{"s":N}``
    padded with JSON whitespace. Raises :class:`ValueError` when ``size`` cannot hold even
    ``{"s":N}``.
    """
    if seq < 0:
        raise ValueError(f"seq must be non-negative, got {seq}")
    number = b"%d" % seq
    for head, tail in (
        (b'{"seq":' + number + b',"data":"', b'"}'),
        (b'{"s":' + number + b',"d":"', b'"}'),
    ):
        room = size - len(head) - len(tail)
        if room >= 0:
            return head + _padding(room, seq) + tail
    head = b'{"s":' + number
    room = size - len(head) - 1
    if room < 0:
        raise ValueError(f"{size} bytes cannot hold a payload with seq {seq}")
    return head + b" " * room + b"}"


@lru_cache(maxsize=64)
def payloads(size: int, count: int) -> tuple[bytes, ...]:
    """``count`` payloads of ``size`` bytes numbered 0..count-1 (cached: build once, reuse)."""
    return tuple(payload(size, seq) for seq in range(count))


def _self_check() -> None:
    for size in SIZES:
        for seq in (0, 1, 9999, 123456):
            data = payload(size, seq)
            assert len(data) == size and b"\n" not in data, (size, seq)
            document = json.loads(data)
            assert document.get("seq", document.get("s")) == seq


if __name__ == "__main__":
    _self_check()
    for size in SIZES:
        print(size, payload(size, 7)[:60])
