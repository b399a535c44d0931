"""The NATS client protocol, sans-IO: bytes in, events out; commands out as bytes.

Hand-written rather than taken from nats-py because nats-py is asyncio-only: under Trio it runs
on an asyncio loop in a thread, and that crossing (about 400 µs of CPU per batch plus 40-50 µs
per message, bench/chat_relay.py ``--stages``) was the measured bound of the chat relay. The
protocol itself is small and line-based (https://docs.nats.io/reference/reference-protocols/nats-protocol):
the server sends ``INFO``, ``MSG``, ``HMSG``, ``PING``, ``PONG``, ``+OK``, ``-ERR``; a
client sends ``CONNECT``, ``PUB``/``HPUB``, ``SUB``, ``PING``/``PONG``. The NATS sink and the
NATS source both speak it (JetStream's acks are ``PUB``s of ``+ACK``/``-NAK`` to each
message's reply subject; its pull requests and statuses are messages too).

:class:`NatsParser` is fed whatever the socket returned (:meth:`~NatsParser.receive_data`) and
hands out complete events (:meth:`~NatsParser.next_event`); a control line longer than
``max_control_line`` or a message body longer than ``max_payload`` is a
:class:`NatsProtocolError`, so the buffer is bounded. It imports no trio.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = (
    "ACK",
    "Err",
    "Info",
    "Msg",
    "NatsError",
    "NatsParser",
    "NatsProtocolError",
    "Ok",
    "Ping",
    "Pong",
    "acks",
    "connect_command",
    "encode_headers",
    "header_value",
    "hpub",
    "nak",
    "parse_headers",
    "pub",
    "sub",
)

PING = b"PING\r\n"
PONG = b"PONG\r\n"


class NatsProtocolError(Exception):
    """The server sent something that is not NATS (or is larger than the bounds)."""


class NatsError(Exception):
    """A server answered and could not be used: a ``-ERR`` in the handshake, credentials it
    refused or that cannot be sent, JetStream refusing a request."""


@dataclass(frozen=True, slots=True)
class Info:
    """The server's ``INFO``: what it is and what it allows (``max_payload``, ``headers``...)."""

    fields: dict[str, Any]

    @property
    def max_payload(self) -> int:
        return int(self.fields.get("max_payload", 1024 * 1024))

    @property
    def headers(self) -> bool:
        return bool(self.fields.get("headers", False))

    @property
    def nonce(self) -> str | None:
        nonce = self.fields.get("nonce")
        return nonce if isinstance(nonce, str) else None

    @property
    def tls_required(self) -> bool:
        return bool(self.fields.get("tls_required", False))


class Msg(NamedTuple):
    """A ``MSG`` or ``HMSG``: ``headers`` is the raw header block (``None`` for ``MSG``).
    (A tuple: one is made per message received, and a tuple is the cheapest to make.)"""

    subject: str
    sid: str
    reply: str | None
    payload: bytes
    headers: bytes | None = None

    @property
    def status(self) -> int | None:
        """The status code of the header block's first line (``NATS/1.0 503``), if any."""
        if self.headers is None:
            return None
        line = self.headers.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) > 1 and line[1].isdigit() else None

    @property
    def description(self) -> str:
        """The text after the status code (``Request Timeout``, ``Exceeded MaxWaiting``)."""
        if self.headers is None:
            return ""
        line = self.headers.split(b"\r\n", 1)[0].split(None, 2)
        return line[2].decode("utf-8", "replace").strip() if len(line) > 2 else ""


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    """``-ERR 'message'``: the server closes the connection after most of them."""

    message: str


Event = Info | Msg | Ping | Pong | Ok | Err


class NatsParser:
    """Incremental parser of what a NATS server sends to a client.

    Each time it runs out of parsed events it parses everything complete in what it holds in
    one pass: a read of a thousand small ``MSG``s costs a thousand slices and tuples, nothing
    more. What a read brings is parsed where it lies (no copy into a buffer, no copy out of
    it); only an incomplete tail is kept, joined to the next read.

    Both gateways of the chat relay run every message through here, so the loop is written
    for speed (``python -m bench.nats_parse``, 20 messages a read: 2.1 -> 1.4 µs per relayed
    ``HMSG``, 2.0 -> 1.1 per 100-byte ``MSG``): a ``MSG``/``HMSG`` line in its usual form
    (upper case, single spaces, sizes of at most 12 digits, no longer than
    ``max_control_line``) is taken by one regular expression, and the strings of its subject,
    sid and reply are decoded once per line shape rather than once per message. Any other
    line (``msg`` in lower case, tabs, garbage) takes the general path,
    :meth:`_line`, which says what is wrong with it."""

    def __init__(self, *, max_control_line: int = 4096, max_payload: int = 64 * 1024 * 1024):
        self.max_control_line = max_control_line
        self.max_payload = max_payload
        self._held = b""
        """The unparsed tail of what was received: an incomplete line or message."""
        self._received: list[bytes] = []
        """Reads since the last parse, joined to ``_held`` by the next."""
        self._size = 0
        """Bytes in ``_held`` and ``_received``."""
        self._need = 0
        """Bytes the buffer needs before the message it starts with is complete."""
        self._ready: list[Event] = []
        self._taken = 0
        """Events of ``_ready`` handed out by :meth:`next_event`."""
        self._error: NatsProtocolError | None = None
        """Met after the events in ``_ready``: raised once they are taken."""
        self._shapes: dict[bytes, tuple[str, str, str | None]] = {}
        """``subject sid [reply] `` of a line -> its strings (the same few come again and again)."""

    def receive_data(self, data: bytes | bytearray) -> None:
        self._received.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)

    def next_event(self) -> Event | None:
        """The next complete event, or ``None`` when more bytes are needed."""
        ready = self._ready
        taken = self._taken
        if taken == len(ready):
            self._refill()
            ready = self._ready
            if not ready:
                return None
            taken = 0
        self._taken = taken + 1
        return ready[taken]

    def next_events(self) -> list[Event]:
        """Every complete event at once (the list is the caller's), empty when more bytes are
        needed: :meth:`next_event` for a reader that takes a whole read's messages."""
        if self._taken == len(self._ready):
            self._refill()
        events = self._ready[self._taken :] if self._taken else self._ready
        self._ready = []
        self._taken = 0
        return events

    def _refill(self) -> None:
        """Parse into a new ``_ready``; if nothing came of it, the error met, if any."""
        self._ready = []
        self._taken = 0
        if self._error is None and self._size >= self._need and self._received:
            self._parse()
        if not self._ready and self._error is not None:
            raise self._error

    def _parse(self) -> None:
        received = self._received
        if self._held:
            received.insert(0, self._held)
        data = b"".join(received)  # one read and nothing held: the read itself, not a copy
        received.clear()
        size = len(data)
        longest = self.max_control_line + 2  # with its CRLF
        max_payload = self.max_payload
        shapes = self._shapes
        append = self._ready.append
        match_msg, match_hmsg = _MSG_LINE, _HMSG_LINE
        pos = 0
        self._need = 0
        try:
            while pos < size:
                first = data[pos]
                if first == 77:  # M
                    line = match_msg(data, pos)
                elif first == 72:  # H
                    line = match_hmsg(data, pos)
                else:
                    line = None
                if line is not None and (body := line.end()) - pos <= longest:
                    shape = line[1]
                    strings = shapes.get(shape)
                    if strings is None:
                        strings = self._shape(shape)
                    subject, sid, reply = strings
                    if first == 77:
                        header_size = -1
                        total = int(line[2])
                    else:
                        header_size = int(line[2])
                        total = int(line[3])
                else:
                    general = self._line(data, pos)
                    if general is None:
                        break  # an incomplete line
                    if isinstance(general, int):
                        pos = general  # another operation, appended
                        continue
                    subject, sid, reply, header_size, total, body = general
                if header_size > total:
                    raise NatsProtocolError("HMSG header size exceeds total size")
                if total > max_payload:
                    raise NatsProtocolError(f"message of {total} bytes over {max_payload}")
                stop = body + total
                if stop + 2 > size:
                    self._need = stop + 2 - pos
                    break
                if data[stop : stop + 2] != b"\r\n":
                    raise NatsProtocolError("message body not followed by CRLF")
                if header_size < 0:
                    append(_new(Msg, (subject, sid, reply, data[body:stop], None)))
                else:
                    split = body + header_size
                    append(_new(Msg, (subject, sid, reply, data[split:stop], data[body:split])))
                pos = stop + 2
        except NatsProtocolError as exc:
            self._error = exc
        self._held = data[pos:] if pos else data
        self._size = size - pos

    def _shape(self, shape: bytes) -> tuple[str, str, str | None]:
        """The strings of a line's ``subject sid [reply] ``, kept for the next line of the
        same shape unless it has a reply subject (JetStream's differ for each message)."""
        args = [arg.decode("ascii", "replace") for arg in shape.split()]
        if len(args) == 2:
            strings = (args[0], args[1], None)
            if len(self._shapes) >= _SHAPES:
                self._shapes.clear()
            self._shapes[shape] = strings
            return strings
        return (args[0], args[1], args[2])

    def _line(
        self, data: bytes, pos: int
    ) -> tuple[str, str, str | None, int, int, int] | int | None:
        """The general path, for the line at ``pos`` in any form: ``None`` if it is not
        complete; the position after it once its event is appended (an operation other than
        a message); for a ``MSG``/``HMSG``, its subject, sid, reply, header size (-1: none),
        total size and where its body starts."""
        limit = self.max_control_line
        end = data.find(b"\r\n", pos, pos + limit + 2)
        if end < 0:
            if len(data) - pos > limit:
                raise NatsProtocolError(f"control line longer than {limit} bytes")
            return None
        verb, _, rest = data[pos:end].partition(b" ")
        verb = verb.upper()
        if verb == b"MSG" or verb == b"HMSG":
            return (*_control(verb, rest), end + 2)
        self._ready.append(_operation(verb, rest, data[pos:end]))
        return end + 2


# The usual form of a message's line, taken in one match (NatsParser's docstring):
# ``subject sid [reply] `` (one group: the line's shape), then the size(s).
_MSG_LINE = re.compile(rb"MSG (\S+ \S+ (?:\S+ )?)(\d{1,12})\r\n").match
_HMSG_LINE = re.compile(rb"HMSG (\S+ \S+ (?:\S+ )?)(\d{1,12}) (\d{1,12})\r\n").match
_SHAPES = 1024
"""Line shapes whose strings a parser keeps (then it starts again)."""
_new = tuple.__new__


def _control(verb: bytes, rest: bytes) -> tuple[str, str, str | None, int, int]:
    """A ``MSG``/``HMSG`` line: subject, sid, reply, header size (-1: none), total size."""
    args = rest.split()
    hmsg = verb == b"HMSG"
    try:
        if len(args) not in ((4, 5) if hmsg else (3, 4)):
            raise ValueError(len(args))
        total_size = _size(args[-1])
        header_size = _size(args[-2]) if hmsg else -1
    except ValueError:
        raise NatsProtocolError(f"malformed {verb.decode()} line {rest[:80]!r}") from None
    reply = args[2].decode("ascii", "replace") if len(args) == (5 if hmsg else 4) else None
    return (
        args[0].decode("ascii", "replace"),
        args[1].decode("ascii", "replace"),
        reply,
        header_size,
        total_size,
    )


def _operation(verb: bytes, rest: bytes, line: bytes) -> Event:
    """Any other line the server sends."""
    if verb == b"PING":
        return Ping()
    if verb == b"PONG":
        return Pong()
    if verb == b"+OK":
        return Ok()
    if verb == b"-ERR":
        return Err(rest.strip().strip(b"'").decode("utf-8", "replace"))
    if verb == b"INFO":
        try:
            fields = json.loads(rest)
        except ValueError as exc:
            raise NatsProtocolError(f"INFO is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise NatsProtocolError("INFO is not a JSON object")
        return Info(fields)
    raise NatsProtocolError(f"unknown operation {line[:40]!r}")


def _size(token: bytes) -> int:
    if not token.isdigit():
        raise ValueError(token)
    return int(token)


# -- what a client sends ----------------------------------------------------------------------


def connect_command(options: dict[str, Any]) -> bytes:
    """``CONNECT {...}`` (follow it with a ``PING``: its ``PONG`` confirms the handshake)."""
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + b"\r\n"


def _check(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise ValueError(f"CR or LF in a NATS header: {text[:40]!r}")
    return text


def header_value(text: str) -> bytes:
    """A header value as bytes; CR or LF (which would end the header) is a ValueError."""
    return _check(text).encode()


def encode_headers(headers: dict[str, str], *, close: bool = True) -> bytes:
    """``NATS/1.0`` and one ``Key: value`` line each; ``close=False`` leaves the block open so
    that per-message lines can follow (then end it with ``b"\\r\\n"``)."""
    lines = ["NATS/1.0\r\n"]
    lines.extend(f"{_check(key)}: {_check(value)}\r\n" for key, value in headers.items())
    if close:
        lines.append("\r\n")
    return "".join(lines).encode()


def parse_headers(block: bytes) -> dict[str, str]:
    """The ``Key: value`` lines of a header block (the status line left out; last one wins)."""
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:
        key, colon, value = line.partition(b":")
        if colon:
            headers[key.decode("utf-8", "replace").strip()] = value.decode(
                "utf-8", "replace"
            ).strip()
    return headers


def hpub(subject: bytes, reply: bytes, headers: bytes, payload: bytes) -> bytes:
    """One ``HPUB`` (``headers`` is a complete block ending in a blank line)."""
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject,
        reply,
        len(headers),
        len(headers) + len(payload),
        headers,
        payload,
    )


def pub(subject: bytes, reply: bytes, payload: bytes) -> bytes:
    """One ``PUB`` (a JetStream API request, for one)."""
    return b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload)


def sub(subject: str, sid: str, queue: str | None = None) -> bytes:
    """``SUB``: with ``queue``, the server hands each message to one member of the group."""
    if queue:
        return f"SUB {subject} {queue} {sid}\r\n".encode()
    return f"SUB {subject} {sid}\r\n".encode()


ACK = b"+ACK"


def nak(delay: float) -> bytes:
    """A JetStream negative ack: deliver the message again after ``delay`` seconds."""
    return b'-NAK {"delay":%d}' % round(delay * 1e9) if delay > 0 else b"-NAK"


def acks(replies: list[str], body: bytes = ACK) -> bytes:
    """One ``PUB`` of ``body`` to each message's reply subject (JetStream's ``$JS.ACK...``)."""
    tail = b" %d\r\n%s\r\n" % (len(body), body)
    return b"".join([b"PUB " + reply.encode() + tail for reply in replies])
