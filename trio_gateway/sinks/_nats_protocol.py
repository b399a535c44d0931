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
from collections import deque
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

    Each time it runs out of parsed events it parses everything complete in its buffer in one
    pass (one copy of the buffer and one ``del`` per socket read, not per message): a read
    of a thousand small ``MSG``s costs a thousand slices and tuples, nothing more."""

    def __init__(self, *, max_control_line: int = 4096, max_payload: int = 64 * 1024 * 1024):
        self.max_control_line = max_control_line
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._ready: deque[Event] = deque()
        self._need = 0
        """Bytes the buffer needs before the message it starts with is complete."""
        self._error: NatsProtocolError | None = None
        """Met after the events in ``_ready``: raised once they are taken."""

    def receive_data(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next complete event, or ``None`` when more bytes are needed."""
        ready = self._ready
        if not ready:
            if self._error is None and len(self._buffer) >= self._need:
                self._parse()
            if not ready:
                if self._error is not None:
                    raise self._error
                return None
        return ready.popleft()

    def _parse(self) -> None:
        buffer = self._buffer
        data = bytes(buffer)
        size = len(data)
        limit = self.max_control_line
        ready = self._ready
        pos = 0
        self._need = 0
        try:
            while pos < size:
                end = data.find(b"\r\n", pos, pos + limit + 2)
                if end < 0:
                    if size - pos > limit:
                        raise NatsProtocolError(f"control line longer than {limit} bytes")
                    break
                verb, _, rest = data[pos:end].partition(b" ")
                verb = verb.upper()
                if verb == b"MSG" or verb == b"HMSG":
                    subject, sid, reply, header_size, total = self._control(verb, rest)
                    body = end + 2
                    stop = body + total
                    if stop + 2 > size:
                        self._need = stop + 2 - pos
                        break
                    if data[stop : stop + 2] != b"\r\n":
                        raise NatsProtocolError("message body not followed by CRLF")
                    if header_size < 0:
                        ready.append(Msg(subject, sid, reply, data[body:stop]))
                    else:
                        split = body + header_size
                        ready.append(Msg(subject, sid, reply, data[split:stop], data[body:split]))
                    pos = stop + 2
                    continue
                ready.append(_operation(verb, rest, data[pos:end]))
                pos = end + 2
        except NatsProtocolError as exc:
            self._error = exc
        del buffer[:pos]

    def _control(self, verb: bytes, rest: bytes) -> tuple[str, str, str | None, int, int]:
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
        if header_size > total_size:
            raise NatsProtocolError(f"{verb.decode()} header size exceeds total size")
        if total_size > self.max_payload:
            raise NatsProtocolError(f"message of {total_size} bytes over {self.max_payload}")
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
