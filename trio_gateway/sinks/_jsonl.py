"""JSON Lines encoding of a batch, shared by the stdout and file sinks.

A record is ``{"transport", "peer", "received_at", "payload"}``, with ``"id"`` before the
payload when the message has one (:attr:`Origin.id`), and ``"payload_b64"`` instead
of ``"payload"`` when the bytes are not clean text: not UTF-8, or holding a control character
other than tab, newline and carriage return (JSON would write each as ``\\u00XX``, six bytes for
one: a payload of NUL bytes would grow sixfold; base64 grows by a third). Clean text keeps its
non-ASCII characters as they are (UTF-8), so no payload grows by more than its quotes and
backslashes. The per-origin prefix is encoded once per run of messages from the same read.

:func:`iter_jsonl` yields a batch's records in pieces of about :data:`PIECE_BYTES` (a record
larger than that is a piece of its own), so that a sink writes a large batch piece by piece
and never holds its whole encoding; :func:`encode_jsonl` joins them.

Printable ASCII payloads (``0x20``-``0x7e``: what JSON documents and log lines usually are;
one ``bytes.translate`` checks) are encoded without a Python step per byte or per message:

* the short payloads of a run (under 512 bytes, judging by its first and last) are joined
  with a printable separator that none of them contains (``~``, else a backquote, ``^``,
  ``|``), escaped together by ``json``'s C string encoder, and the separators, which the
  encoder leaves alone, are then replaced by the record boundaries (quote-dense 18-byte
  documents: about 75 ns a record, against 130 one payload at a time);
* long payloads only need ``"`` and ``\\`` escaped: two ``bytes.replace``, about 0.5 ns a
  byte, where ``json``'s string encoder takes 3 to 4.

Anything else (other Unicode, control characters, invalid UTF-8) goes through ``json``'s
encoder or base64 payload by payload. The output is byte for byte the same on every path.

A batch still packed (newline frames from a TCP read, :class:`~trio_gateway._frames.Frames`)
is not split at all when its frames are short printable ASCII: their newlines are turned into
the separator with one ``bytes.replace`` and the same escape applies (:func:`_packed_run`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from json.encoder import encode_basestring, encode_basestring_ascii

from .._frames import Frames
from .._message import Batch, Origin

__all__ = ("PIECE_BYTES", "decode_jsonl_record", "encode_jsonl", "iter_jsonl")

PIECE_BYTES = 192 << 10
"""About how much of a batch's JSON Lines :func:`iter_jsonl` yields at a time."""
_CONTROLS = bytes(c for c in range(0x20) if c not in b"\t\n\r")
"""Bytes that make a payload not clean text (UTF-8 never uses them inside a character)."""
_NOT_CONTROLS = bytes(c for c in range(256) if c not in _CONTROLS)

_PRINTABLE = bytes(range(0x20, 0x7F))
"""Bytes a JSON string may carry as they are, but for ``"`` and ``\\`` (escaped by replace)."""
_SEPARATORS = tuple(
    (sep, bytes(c for c in _PRINTABLE if c != sep[0])) for sep in (b"~", b"`", b"^", b"|")
)
"""Candidate separators for a run of short payloads, each with the printable bytes but it.
None occurs in what the JSON string encoder writes for an escape (``\\"``, ``\\u00XX``)."""
_SHORT = 512
"""Average payload length under which a run's payloads are escaped together."""
_END = b'"}\n'


def _prefix(origin: Origin) -> str:
    prefix = (
        f'{{"transport":{json.dumps(origin.transport)},"peer":{json.dumps(origin.peer)},'
        f'"received_at":{origin.received_at!r},'
    )
    if origin.id is not None:
        prefix += f'"id":{json.dumps(origin.id)},'
    return prefix


def _escape(data: bytes) -> bytes:
    """Escape printable ASCII for a JSON string (``replace`` returns ``data`` if unchanged)."""
    return data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')


def _record(prefix: str, payload: bytes) -> bytes:
    """One record through the ``json`` string encoder, or base64 (any payload)."""
    if not payload.translate(None, _NOT_CONTROLS):
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            pass
        else:
            return (prefix + '"payload":' + encode_basestring(text) + "}\n").encode()
    encoded = base64.b64encode(payload).decode("ascii")
    return (prefix + '"payload_b64":"' + encoded + '"}\n').encode("ascii")


def _short_run(run: list[bytes], head: bytes) -> bytes | None:
    """The records of a run of short printable-ASCII payloads, or None if one is not."""
    for sep, others in _SEPARATORS:
        joined = sep.join(run)
        leftover = joined.translate(None, others)
        if leftover == sep * (len(run) - 1):
            # The encoder adds the quotes around the whole; each separator becomes '"}\n'
            # + the next record's head (which ends with the opening quote).
            quoted = encode_basestring_ascii(joined.decode("ascii")).encode("ascii")
            return head[:-1] + quoted.replace(sep, _END + head) + b"}\n"
        if leftover.translate(None, sep):  # not printable ASCII: no separator will do
            return None
    return None


def _packed_run(frames: Frames, head: bytes) -> bytes | None:
    """:func:`_short_run` for packed frames: their newlines are the separators to replace."""
    region = frames.data[frames.start : frames.end - 1]
    newlines = b"\n" * (frames.nframes - 1)
    for sep, others in _SEPARATORS:
        leftover = region.translate(None, others)
        if leftover == newlines:  # printable ASCII, no sep: the newlines become sep
            joined = region.replace(b"\n", sep)
            quoted = encode_basestring_ascii(joined.decode("ascii")).encode("ascii")
            return head[:-1] + quoted.replace(sep, _END + head) + b"}\n"
        if leftover.translate(None, b"\n" + sep):  # not printable ASCII
            return None
    return None


def _iter_packed(batch: Batch, piece_bytes: int) -> Iterator[bytes]:
    """:func:`iter_jsonl` for a batch still made of packed pieces: short printable frames
    through :func:`_packed_run`, anything else through the general path, piece by piece."""
    pieces = list(batch.pieces)
    pieces.reverse()  # popped from the end, in order
    for origin, count in batch.runs:
        head = (_prefix(origin) + '"payload":"').encode("ascii")
        while count:
            piece = pieces.pop()
            if not isinstance(piece, Frames):
                yield from iter_jsonl(Batch([piece], [(origin, 1)]), piece_bytes=piece_bytes)
                count -= 1
                continue
            if piece.nframes > count:  # a piece spanning two runs (the ring never makes one)
                piece, rest = piece.cut(count)
                pieces.append(rest)
            count -= piece.nframes
            while piece.nframes:
                # A record: the head, the payload escaped (at most twice its length), the end.
                per = len(head) + 4 + 2 * piece.nbytes // piece.nframes
                take = max(1, piece_bytes // per)
                part, piece = (piece, Frames(b"", 0)) if take >= piece.nframes else piece.cut(take)
                records = None
                if part.nbytes < _SHORT * part.nframes:
                    records = _packed_run(part, head)
                if records is None:
                    general = Batch(part.split(), [(origin, part.nframes)])
                    yield from iter_jsonl(general, piece_bytes=piece_bytes)
                else:
                    yield records


def encode_jsonl(batch: Batch) -> bytes:
    """Encode a batch as JSON Lines (one record per message, each ending in ``\\n``)."""
    return b"".join(iter_jsonl(batch))


def iter_jsonl(batch: Batch, *, piece_bytes: int = PIECE_BYTES) -> Iterator[bytes]:
    """A batch's JSON Lines in pieces of whole records, each about ``piece_bytes`` (more only
    when a single record is larger)."""
    if batch.packed:
        yield from _iter_packed(batch, piece_bytes)
        return
    parts: list[bytes] = []
    append = parts.append
    size = 0
    payloads = batch.payloads
    start = 0
    # Short payloads are escaped together by the slice: at most this many records at a time
    # (512 bytes each, escaped at most twice over, fit in a piece).
    step = max(1, piece_bytes // (4 * _SHORT))
    for origin, count in batch.runs:
        if not count:
            continue
        prefix = _prefix(origin)
        head = (prefix + '"payload":"').encode("ascii")
        for first in range(start, start + count, step):
            run = payloads[first : min(first + step, start + count)]
            records = None
            # Short or long: the two ends of the run decide (any choice is correct, the sum
            # of every length would cost 25 ns a message).
            if len(run[0]) + len(run[-1]) < 2 * _SHORT:
                records = _short_run(run, head)
            if records is not None:
                append(records)
                size += len(records)
            else:
                for payload in run:
                    if payload.translate(None, _PRINTABLE):
                        record = _record(prefix, payload)
                        append(record)
                        size += len(record)
                    else:
                        escaped = _escape(payload)
                        append(head)
                        append(escaped)
                        append(_END)
                        size += len(head) + len(escaped) + 3
                    if size >= piece_bytes:
                        yield b"".join(parts)
                        parts.clear()
                        size = 0
            if size >= piece_bytes:
                yield b"".join(parts)
                parts.clear()
                size = 0
        start += count
    if parts:
        yield b"".join(parts)


def decode_jsonl_record(line: bytes | str) -> tuple[bytes, dict[str, object]]:
    """Parse one record back into ``(payload, record)`` (for tests and tools)."""
    record = json.loads(line)
    if "payload_b64" in record:
        return base64.b64decode(record["payload_b64"]), record
    return str(record["payload"]).encode(), record
